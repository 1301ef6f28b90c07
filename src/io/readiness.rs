//! Socket readiness for one executor: an edge-triggered epoll set that glommio's io_uring waits on
//! only when the executor has nothing else to run.
//!
//! Measured on this lab's 2-core VM: an io_uring poll that completes from the other CPU makes the
//! kernel interrupt this one to run io_uring's task work (glommio 0.9's rings set neither
//! `COOP_TASKRUN` nor `DEFER_TASKRUN`), about 1.35 reschedule IPIs per proxied connection, and
//! every wait armed a ring operation. An epoll item registered once per socket costs nothing per
//! wait: readiness is queued inside the kernel while this core is busy, and collected in batches
//! by one `epoll_wait` per scheduling round. The executor still sleeps in io_uring: when a round
//! finds nothing ready, one io_uring poll on the epoll descriptor itself is the wake-up.
//!
//! Each direction keeps a readiness flag, as nginx does: events set it, and the caller clears it
//! when a call returned `EAGAIN` or a read came back short (a stream socket's `recv` takes all
//! that is queued, so a short read drained it, unless the peer's FIN is queued too: the flag for
//! that, `peer_closed`, comes from `EPOLLRDHUP`). A direction not known to be ready waits without
//! a system call, so a read that would only say `EAGAIN` is never made; a stale flag costs one
//! retried call and never a lost wake-up, because every new arrival raises a new edge.

use std::cell::{Cell, RefCell};
use std::future::{Future, poll_fn};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::AsyncRead;

/// Events collected per `epoll_wait`; more stay queued for the next round.
const BATCH: usize = 256;

/// Which way a task waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Data, end-of-file, an error, or (for a listener) a queued connection.
    Read,
    /// Room in the send buffer, or a finished connect.
    Write,
}

impl Direction {
    fn mask(self) -> u32 {
        match self {
            Direction::Read => (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            Direction::Write => libc::EPOLLOUT as u32,
        }
    }
}

/// The epoll set and waiters of the current executor.
struct Reactor {
    epfd: OwnedFd,
    executor: usize,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<usize>>,
}

#[derive(Default)]
struct Slot {
    read: Waiter,
    write: Waiter,
    /// `EPOLLRDHUP` without an error: the peer's FIN is queued behind any data left.
    peer_closed: bool,
    /// `EPOLLERR` or `EPOLLHUP`: the connection is over (reset, or both sides closed), and no
    /// further event will come, so a short read must not clear readiness: the next call
    /// reports the end (a reset as an error, never as a clean end-of-file).
    hung_up: bool,
}

#[derive(Default)]
struct Waiter {
    /// An event came since the owner last cleared the flag.
    ready: bool,
    waker: Option<Waker>,
}

impl Slot {
    fn waiter(&mut self, dir: Direction) -> &mut Waiter {
        match dir {
            Direction::Read => &mut self.read,
            Direction::Write => &mut self.write,
        }
    }
}

thread_local! {
    // One executor per thread; the id tells a later executor on the same thread to start afresh.
    static CURRENT: RefCell<Option<Rc<Reactor>>> = const { RefCell::new(None) };
}

impl Reactor {
    /// The current executor's reactor, created (with its collecting task) on first use.
    fn current() -> io::Result<Rc<Reactor>> {
        let executor = glommio::executor().id();
        if let Some(found) = CURRENT.with(|c| {
            c.borrow()
                .as_ref()
                .filter(|r| r.executor == executor)
                .cloned()
        }) {
            return Ok(found);
        }
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let reactor = Rc::new(Reactor {
            // SAFETY: `fd` was just created and is owned here.
            epfd: unsafe { OwnedFd::from_raw_fd(fd) },
            executor,
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
        });
        CURRENT.with(|c| *c.borrow_mut() = Some(reactor.clone()));
        // Not tracked: its own polls must not count as other work.
        #[allow(clippy::disallowed_methods)]
        glommio::spawn_local(collect(reactor.clone())).detach();
        Ok(reactor)
    }

    fn add_slot(&self) -> usize {
        if let Some(key) = self.free.borrow_mut().pop() {
            return key;
        }
        let mut slots = self.slots.borrow_mut();
        slots.push(Slot::default());
        slots.len() - 1
    }

    /// Hands the events of one `epoll_wait` to their waiters; returns how many there were.
    fn dispatch(
        &self,
        events: &mut [libc::epoll_event],
        wake: &mut Vec<Waker>,
        timeout_ms: libc::c_int,
    ) -> io::Result<usize> {
        // SAFETY: `events` is valid for `events.len()` entries.
        let n = unsafe {
            libc::epoll_wait(
                self.epfd.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                timeout_ms,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        let read = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        let write = (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        let mut slots = self.slots.borrow_mut();
        for event in &events[..n] {
            let (bits, key) = (event.events, event.u64 as usize);
            let Some(slot) = slots.get_mut(key) else {
                continue;
            };
            if bits & libc::EPOLLRDHUP as u32 != 0 && bits & libc::EPOLLERR as u32 == 0 {
                slot.peer_closed = true;
            }
            if bits & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
                slot.hung_up = true;
            }
            for (dir, mask) in [(Direction::Read, read), (Direction::Write, write)] {
                if bits & mask != 0 {
                    let waiter = slot.waiter(dir);
                    waiter.ready = true;
                    wake.extend(waiter.waker.take());
                }
            }
        }
        Ok(n)
    }
}

/// How long the collecting task sleeps in `epoll_wait` itself when nothing else on the executor
/// can run, before it hands the sleep to glommio.
const EPOLL_SLEEP_MS: libc::c_int = 1;

/// glommio's own loop (its timers, its io_uring completions, its sleep) gets a turn at least this
/// often while the collecting task is the one sleeping.
const GLOMMIO_TURN: Duration = Duration::from_millis(10);

thread_local! {
    /// Polls of tracked tasks (see [`tracked`]) on this thread: the collecting task compares it
    /// across a yield to learn whether anything else is runnable.
    static POLLS: Cell<u64> = const { Cell::new(0) };
}

/// Wraps a task's future so that its polls are counted: the collecting task sleeps in
/// `epoll_wait` only when no tracked task ran since it last looked. Every task spawned on an
/// executor that uses this module should be tracked (see [`spawn_local`]; `clippy.toml` forbids
/// glommio's own spawns elsewhere); an untracked one that becomes runnable without a socket event
/// waits at most [`EPOLL_SLEEP_MS`].
pub async fn tracked<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    poll_fn(|cx| {
        POLLS.with(|p| p.set(p.get() + 1));
        future.as_mut().poll(cx)
    })
    .await
}

/// `glommio::spawn_local` for a [`tracked`] future.
#[allow(clippy::disallowed_methods)] // the one place tasks are spawned, tracked
pub fn spawn_local<F>(future: F) -> glommio::Task<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    glommio::spawn_local(tracked(future))
}

/// The executor's collecting task. While events keep coming it does one non-blocking
/// `epoll_wait` per scheduling round, after the tasks it woke have run. When a round finds
/// nothing and no other task ran since the last one, the executor has nothing else to do: it then
/// sleeps in `epoll_wait` itself, briefly, which costs one system call, where handing the sleep to
/// glommio costs a dozen io_uring submissions around its timers (the profile showed them at a
/// third of a busy backend's CPU). Only when that sleep ends empty, or glommio's loop has not had
/// a turn for [`GLOMMIO_TURN`], does the task wait through glommio (an io_uring poll on the epoll
/// descriptor), so glommio's timers and completions are never held up for long.
async fn collect(reactor: Rc<Reactor>) {
    // Wakers of a dead executor's tasks must not outlive it in the thread-local.
    struct Forget(usize);
    impl Drop for Forget {
        fn drop(&mut self) {
            let _ = CURRENT.try_with(|c| {
                let mut c = c.borrow_mut();
                if c.as_ref().is_some_and(|r| r.executor == self.0) {
                    *c = None;
                }
            });
        }
    }
    let _forget = Forget(reactor.executor);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; BATCH];
    let mut wake = Vec::new();
    let polls = || POLLS.with(Cell::get);
    let mut seen = polls();
    let mut glommio_turn = Instant::now();
    // Set when the last round only yielded, so a busy task cannot hold collection off.
    let mut deferred = false;
    loop {
        let others_ran = polls() != seen;
        seen = polls();
        if others_ran && !deferred {
            // Others ran since the last look and may have woken more: let those run first.
            deferred = true;
            glommio::executor().yield_now().await;
            continue;
        }
        deferred = false;
        let turn_due = glommio_turn.elapsed() >= GLOMMIO_TURN;
        // Sleep only when nothing else is runnable and glommio's loop is not due a turn.
        let sleep = if others_ran || turn_due {
            0
        } else {
            EPOLL_SLEEP_MS
        };
        match reactor.dispatch(&mut events, &mut wake, sleep) {
            Ok(0) if others_ran && !turn_due => {
                glommio::executor().yield_now().await;
                continue;
            }
            Ok(0) => {}
            Ok(_) => {
                for waker in wake.drain(..) {
                    waker.wake();
                }
                if !turn_due {
                    glommio::executor().yield_now().await;
                    continue;
                }
                // Events keep coming, but glommio's loop is due: the woken tasks run, and its
                // turn comes when they are all waiting again.
            }
            // A signal, or io_uring task work for glommio (a completion): give glommio its turn.
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                // Not expected from a valid epoll set; do not spin on it.
                eprintln!("ringlab: epoll_wait failed: {err}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
        wait_readable(reactor.epfd.as_raw_fd()).await;
        glommio_turn = Instant::now();
        seen = polls();
    }
}

/// Waits until `fd` is readable. glommio exposes no bare readiness wait, so the wait is the
/// creation poll of a throwaway glommio stream over a duplicate of `fd`; the empty read that
/// follows returns at once (with `ENOTSOCK` or `ENOTCONN`, which is not looked at).
async fn wait_readable(fd: RawFd) {
    // SAFETY: dup of a descriptor the caller keeps open.
    let dup = unsafe { libc::dup(fd) };
    if dup < 0 {
        // Out of descriptors: wait a little instead of spinning; callers retry.
        glommio::timer::sleep(Duration::from_millis(10)).await;
        return;
    }
    // SAFETY: `dup` is a fresh descriptor; ownership moves into the stream, which closes it.
    let mut waiter = unsafe { glommio::net::TcpStream::from_raw_fd(dup) };
    let _ = poll_fn(|cx| Pin::new(&mut waiter).poll_read(cx, &mut [])).await;
}

/// A descriptor's place in the current executor's epoll set, made on its first wait, with its
/// readiness flags. Drop it after the descriptor is closed (closing removes the epoll item; a
/// stale event for a reused slot only causes a spurious, harmless wake).
pub struct Registration {
    fd: RawFd,
    state: RefCell<Option<(Rc<Reactor>, usize)>>,
    /// The epoll interest registered so far.
    interest: Cell<u32>,
    /// Readiness (read, write) while a direction has no epoll interest yet: assumed until a call
    /// says otherwise, or cleared by an owner who knows better (a fresh outgoing connection has
    /// nothing to read).
    unregistered: Cell<[bool; 2]>,
    /// `EPOLLET`, or 0 for a level-triggered item.
    trigger: u32,
}

impl Registration {
    /// An edge-triggered registration for `fd`, which must stay open while it is used.
    pub fn new(fd: RawFd) -> Registration {
        Registration::with_trigger(fd, libc::EPOLLET as u32)
    }

    fn with_trigger(fd: RawFd, trigger: u32) -> Registration {
        Registration {
            fd,
            state: RefCell::new(None),
            interest: Cell::new(0),
            unregistered: Cell::new([true, true]),
            trigger,
        }
    }

    /// A level-triggered registration: every `epoll_wait` reports the descriptor while it is
    /// ready, so its owner can act once per event and clear the flag, and never has to call until
    /// `EAGAIN` to find it drained. For listeners: a failed `accept4` is not cheap, because the
    /// kernel allocates the new socket, its file and its inode before it finds the queue empty,
    /// and frees them again (the profile showed that at a quarter of a backend's accept cost). Call
    /// [`Registration::pause`] while the owner stops waiting, or the collector would be told of
    /// the ready descriptor on every round.
    pub fn level(fd: RawFd) -> Registration {
        Registration::with_trigger(fd, 0)
    }

    /// Leaves the epoll set until the next wait (which registers again); readiness is then
    /// assumed, as for a fresh registration.
    pub fn pause(&self) {
        if let Some((reactor, key)) = self.state.borrow_mut().take() {
            // SAFETY: both descriptors are open; a null event is allowed for EPOLL_CTL_DEL.
            unsafe {
                libc::epoll_ctl(
                    reactor.epfd.as_raw_fd(),
                    libc::EPOLL_CTL_DEL,
                    self.fd,
                    std::ptr::null_mut(),
                )
            };
            reactor.slots.borrow_mut()[key] = Slot::default();
            reactor.free.borrow_mut().push(key);
        }
        self.interest.set(0);
        self.unregistered.set([true, true]);
    }

    /// Whether `dir` may be ready: a call is worth making.
    pub fn ready(&self, dir: Direction) -> bool {
        match self.slot_of(dir) {
            Some((reactor, key)) => reactor.slots.borrow_mut()[key].waiter(dir).ready,
            None => self.unregistered.get()[dir as usize],
        }
    }

    /// Records that `dir` is drained (`EAGAIN`, or a short read): the next call waits first.
    pub fn clear(&self, dir: Direction) {
        match self.slot_of(dir) {
            Some((reactor, key)) => reactor.slots.borrow_mut()[key].waiter(dir).ready = false,
            None => {
                let mut flags = self.unregistered.get();
                flags[dir as usize] = false;
                self.unregistered.set(flags);
            }
        }
    }

    /// Whether the peer's FIN is known to be queued (behind any unread data).
    pub fn peer_closed(&self) -> bool {
        self.slot_of(Direction::Read)
            .is_some_and(|(reactor, key)| reactor.slots.borrow()[key].peer_closed)
    }

    /// Whether the connection is known to be over (`EPOLLERR`/`EPOLLHUP`): no event will follow.
    pub fn hung_up(&self) -> bool {
        self.slot_of(Direction::Read)
            .is_some_and(|(reactor, key)| reactor.slots.borrow()[key].hung_up)
    }

    /// Records that a call in `dir` returned `EAGAIN`, then waits for the next event.
    pub async fn wait_drained(&self, dir: Direction) -> io::Result<()> {
        self.clear(dir);
        self.wait(dir).await
    }

    /// Waits until `dir` is ready (at once if it already is).
    pub async fn wait(&self, dir: Direction) -> io::Result<()> {
        let (reactor, key) = self.register(dir)?;
        poll_fn(|cx| {
            let mut slots = reactor.slots.borrow_mut();
            let waiter = slots[key].waiter(dir);
            if waiter.ready {
                return Poll::Ready(Ok(()));
            }
            match &mut waiter.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                other => *other = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    /// The reactor and slot, if `dir` has epoll interest.
    fn slot_of(&self, dir: Direction) -> Option<(Rc<Reactor>, usize)> {
        if self.interest.get() & dir.mask() == 0 {
            return None;
        }
        self.state.borrow().as_ref().map(|(r, k)| (r.clone(), *k))
    }

    /// Adds `dir` to the epoll interest (registering the descriptor on first use). Adding or
    /// modifying an item makes epoll report its current state, so the flag starts cleared and
    /// the first event sets it if the direction is ready already.
    fn register(&self, dir: Direction) -> io::Result<(Rc<Reactor>, usize)> {
        let mut state = self.state.borrow_mut();
        let fresh = state.is_none();
        if fresh {
            let reactor = Reactor::current()?;
            let key = reactor.add_slot();
            *state = Some((reactor, key));
        }
        let (reactor, key) = state.as_ref().map(|(r, k)| (r.clone(), *k)).unwrap();
        let want = self.interest.get() | dir.mask();
        if want != self.interest.get() {
            let op = if fresh {
                libc::EPOLL_CTL_ADD
            } else {
                libc::EPOLL_CTL_MOD
            };
            let mut event = libc::epoll_event {
                events: want | self.trigger,
                u64: key as u64,
            };
            reactor.slots.borrow_mut()[key].waiter(dir).ready = false;
            // SAFETY: both descriptors are open; `event` is a valid epoll_event.
            if unsafe { libc::epoll_ctl(reactor.epfd.as_raw_fd(), op, self.fd, &mut event) } < 0 {
                let err = io::Error::last_os_error();
                if fresh {
                    reactor.slots.borrow_mut()[key] = Slot::default();
                    reactor.free.borrow_mut().push(key);
                    *state = None;
                }
                return Err(err);
            }
            self.interest.set(want);
        }
        Ok((reactor, key))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some((reactor, key)) = self.state.get_mut().take() {
            let mut slots = reactor.slots.borrow_mut();
            slots[key] = Slot::default();
            reactor.free.borrow_mut().push(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    /// A wait ends on data that arrives later, and a second executor on the same thread gets a
    /// reactor of its own (the first one's collecting task died with its executor).
    #[test]
    fn waits_end_on_data_in_successive_executors() {
        for round in 0..2u8 {
            let (mut ours, theirs) = UnixStream::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            let got = glommio::LocalExecutor::default().run(async move {
                let registration = Registration::new(ours.as_raw_fd());
                let writer = spawn_local(async move {
                    glommio::timer::sleep(Duration::from_millis(20)).await;
                    (&theirs).write_all(&[round]).unwrap();
                    theirs
                });
                let mut byte = [0u8; 1];
                loop {
                    match ours.read(&mut byte) {
                        Ok(n) => break (n, byte[0], writer.await),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            let stuck = async {
                                glommio::timer::sleep(Duration::from_secs(5)).await;
                                panic!("round {round}: the wait never ended");
                            };
                            futures_lite::future::or(
                                registration.wait_drained(Direction::Read),
                                stuck,
                            )
                            .await
                            .unwrap()
                        }
                        Err(e) => panic!("read failed: {e}"),
                    }
                }
            });
            assert_eq!((got.0, got.1), (1, round));
        }
    }

    fn thread_cpu() -> Duration {
        // SAFETY: `usage` is a plain C struct the kernel fills.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        assert_eq!(
            unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) },
            0
        );
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        tv(usage.ru_utime) + tv(usage.ru_stime)
    }

    /// With sockets registered and nothing happening, the executor sleeps (it does not spin on
    /// `epoll_wait`), and glommio's timers still fire on time although the collecting task is the
    /// one sleeping most of the time.
    #[test]
    fn an_idle_executor_sleeps_and_its_timers_stay_on_time() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let (cpu, late) = glommio::LocalExecutor::default().run(async move {
            let registration = Registration::new(ours.as_raw_fd());
            let waiting = spawn_local(async move {
                let _ = registration.wait_drained(Direction::Read).await;
            });
            let (cpu, start) = (thread_cpu(), Instant::now());
            glommio::timer::sleep(Duration::from_millis(300)).await;
            let late = start.elapsed() - Duration::from_millis(300);
            drop(waiting);
            (thread_cpu() - cpu, late)
        });
        assert!(
            cpu < Duration::from_millis(60),
            "{cpu:?} of CPU in 300 ms idle"
        );
        assert!(
            late < Duration::from_millis(60),
            "the timer fired {late:?} late"
        );
    }

    /// Under a steady trickle of socket events the collecting task never finds an empty round,
    /// yet glommio's own loop still gets its turn: a glommio timer is not held up.
    #[test]
    fn timers_stay_on_time_under_a_steady_trickle_of_events() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let done = done.clone();
            std::thread::spawn(move || {
                let end = Instant::now() + Duration::from_secs(5);
                while !done.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < end {
                    let _ = (&theirs).write_all(&[1]);
                    // A busy wait: a sleeping thread's wake-up in a VM can take longer than the
                    // collector's 1 ms sleep, and the trickle must never pause that long.
                    let next = Instant::now() + Duration::from_micros(100);
                    while Instant::now() < next {
                        std::hint::spin_loop();
                    }
                }
            })
        };
        let late = glommio::LocalExecutor::default().run(async move {
            let registration = Registration::new(ours.as_raw_fd());
            let reader = spawn_local(async move {
                let mut sink = [0u8; 64];
                loop {
                    match (&ours).read(&mut sink) {
                        Ok(0) => return,
                        Ok(_) => {}
                        Err(_) => {
                            let _ = registration.wait_drained(Direction::Read).await;
                        }
                    }
                }
            });
            // Shorter than glommio's 100 ms preemption timer, which would give its loop a turn
            // regardless.
            let start = Instant::now();
            glommio::timer::sleep(Duration::from_millis(20)).await;
            let late = start.elapsed() - Duration::from_millis(20);
            drop(reader);
            late
        });
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        assert!(
            late < Duration::from_millis(30),
            "the timer fired {late:?} late"
        );
    }

    /// A level-triggered listener with a queued connection is reported on every round; paused,
    /// it is out of the set and the executor sleeps instead of spinning on it.
    #[test]
    fn a_paused_level_triggered_listener_lets_the_executor_sleep() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _queued = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let cpu = glommio::LocalExecutor::default().run(async move {
            let registration = Registration::level(listener.as_raw_fd());
            registration.wait_drained(Direction::Read).await.unwrap();
            registration.pause();
            let cpu = thread_cpu();
            glommio::timer::sleep(Duration::from_millis(300)).await;
            drop(registration);
            thread_cpu() - cpu
        });
        assert!(
            cpu < Duration::from_millis(60),
            "{cpu:?} of CPU in 300 ms paused"
        );
    }
}
