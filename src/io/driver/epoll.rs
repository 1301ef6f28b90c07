//! The epoll driver (`--io epoll`): sockets do their I/O with plain non-blocking system calls
//! and wait on the executor's edge-triggered epoll set, collected by one `epoll_wait` per
//! scheduling round (see [`crate::io::driver`]). The measured alternative to the uring driver.
//!
//! Each direction keeps a readiness flag, as nginx does: events set it, and the caller clears it
//! when a call returned `EAGAIN` or a read came back short (a stream socket's `recv` takes all
//! that is queued, so a short read drained it, unless the peer's FIN is queued too: the flag for
//! that, `peer_closed`, comes from `EPOLLRDHUP`). A direction not known to be ready waits without
//! a system call, so a read that would only say `EAGAIN` is never made; a stale flag costs one
//! retried call and never a lost wake-up, because every new arrival raises a new edge.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Poll, Waker};
use std::time::Duration;

use crate::io::driver::{Driver, Kind};

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

/// The epoll set and waiters of one executor.
pub struct Reactor {
    epfd: OwnedFd,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<usize>>,
    events: RefCell<Vec<libc::epoll_event>>,
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

/// A timeout in whole milliseconds, rounded up (so a sleep never ends early and spins).
fn whole_ms(t: Duration) -> libc::c_int {
    t.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int
}

/// Whether `epoll_pwait2` may be tried (cleared when the kernel answers ENOSYS).
static PWAIT2: AtomicBool = AtomicBool::new(true);

impl Reactor {
    /// A new, empty epoll set.
    pub fn new() -> io::Result<Reactor> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Reactor {
            // SAFETY: `fd` was just created and is owned here.
            epfd: unsafe { OwnedFd::from_raw_fd(fd) },
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            events: RefCell::new(vec![libc::epoll_event { events: 0, u64: 0 }; BATCH]),
        })
    }

    /// One wait for events, up to `timeout`, handing the events to their waiters. A sleep of
    /// part of a millisecond uses `epoll_pwait2` (Linux 5.11) and its nanosecond timeout, so
    /// timers (the open-loop pacer's above all) fire on time; without it the timeout is rounded
    /// up to whole milliseconds, so a sleep never ends early and spins.
    pub(crate) fn turn(
        &self,
        timeout: Option<Duration>,
        wake: &mut Vec<Waker>,
    ) -> io::Result<usize> {
        let mut events = self.events.borrow_mut();
        let n = match timeout {
            Some(t) if t.subsec_nanos() % 1_000_000 != 0 && PWAIT2.load(Ordering::Relaxed) => {
                match self.wait_precise(&mut events, t) {
                    Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                        PWAIT2.store(false, Ordering::Relaxed);
                        self.wait(&mut events, whole_ms(t))?
                    }
                    other => other?,
                }
            }
            Some(t) => self.wait(&mut events, whole_ms(t))?,
            None => self.wait(&mut events, -1)?,
        };
        self.dispatch(&events[..n], wake);
        Ok(n)
    }

    /// `epoll_wait` with a timeout in milliseconds (-1: none).
    fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: libc::c_int) -> io::Result<usize> {
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
        Ok(n as usize)
    }

    /// `epoll_pwait2` with a nanosecond timeout and no signal mask change.
    fn wait_precise(
        &self,
        events: &mut [libc::epoll_event],
        timeout: Duration,
    ) -> io::Result<usize> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `events` is valid for `events.len()` entries and `ts` outlives the call; a
        // null sigmask leaves the thread's mask alone.
        let n = unsafe {
            libc::syscall(
                libc::SYS_epoll_pwait2,
                self.epfd.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                &ts as *const libc::timespec,
                std::ptr::null::<libc::sigset_t>(),
                0usize,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn add_slot(&self) -> usize {
        if let Some(key) = self.free.borrow_mut().pop() {
            return key;
        }
        let mut slots = self.slots.borrow_mut();
        slots.push(Slot::default());
        slots.len() - 1
    }

    /// Hands the events of one wait to their waiters.
    fn dispatch(&self, events: &[libc::epoll_event], wake: &mut Vec<Waker>) {
        let read = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        let write = (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        let mut slots = self.slots.borrow_mut();
        for event in events {
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
    }
}

/// A descriptor's place in the current executor's epoll set, made on its first wait, with its
/// readiness flags. Drop it after the descriptor is closed (closing removes the epoll item; a
/// stale event for a reused slot only causes a spurious, harmless wake).
pub struct Registration {
    fd: RawFd,
    state: RefCell<Option<(Rc<Driver>, usize)>>,
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
        if let Some((driver, key)) = self.state.borrow_mut().take() {
            let reactor = epoll_of(&driver);
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
            Some((driver, key)) => epoll_of(&driver).slots.borrow_mut()[key].waiter(dir).ready,
            None => self.unregistered.get()[dir as usize],
        }
    }

    /// Records that `dir` is drained (`EAGAIN`, or a short read): the next call waits first.
    pub fn clear(&self, dir: Direction) {
        match self.slot_of(dir) {
            Some((driver, key)) => {
                epoll_of(&driver).slots.borrow_mut()[key].waiter(dir).ready = false;
            }
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
            .is_some_and(|(driver, key)| epoll_of(&driver).slots.borrow()[key].peer_closed)
    }

    /// Whether the connection is known to be over (`EPOLLERR`/`EPOLLHUP`): no event will follow.
    pub fn hung_up(&self) -> bool {
        self.slot_of(Direction::Read)
            .is_some_and(|(driver, key)| epoll_of(&driver).slots.borrow()[key].hung_up)
    }

    /// Records that a call in `dir` returned `EAGAIN`, then waits for the next event.
    pub async fn wait_drained(&self, dir: Direction) -> io::Result<()> {
        self.clear(dir);
        self.wait(dir).await
    }

    /// Waits until `dir` is ready (at once if it already is).
    pub async fn wait(&self, dir: Direction) -> io::Result<()> {
        let (driver, key) = self.register(dir)?;
        let reactor = epoll_of(&driver);
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
    fn slot_of(&self, dir: Direction) -> Option<(Rc<Driver>, usize)> {
        if self.interest.get() & dir.mask() == 0 {
            return None;
        }
        self.state.borrow().as_ref().map(|(r, k)| (r.clone(), *k))
    }

    /// Adds `dir` to the epoll interest (registering the descriptor on first use). Adding or
    /// modifying an item makes epoll report its current state, so the flag starts cleared and
    /// the first event sets it if the direction is ready already.
    fn register(&self, dir: Direction) -> io::Result<(Rc<Driver>, usize)> {
        let mut state = self.state.borrow_mut();
        let fresh = state.is_none();
        if fresh {
            let driver = Driver::current()?;
            if !matches!(driver.kind(), Kind::Epoll(_)) {
                return Err(io::Error::other(
                    "an epoll registration on a uring executor",
                ));
            }
            let key = epoll_of(&driver).add_slot();
            *state = Some((driver, key));
        }
        let (driver, key) = state.as_ref().map(|(r, k)| (r.clone(), *k)).unwrap();
        let reactor = epoll_of(&driver);
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
        Ok((driver, key))
    }
}

/// The epoll reactor of a driver known to be an epoll one.
fn epoll_of(driver: &Driver) -> &Reactor {
    match driver.kind() {
        Kind::Epoll(reactor) => reactor,
        Kind::Uring(_) => unreachable!("registrations are made on epoll drivers only"),
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some((driver, key)) = self.state.get_mut().take() {
            let reactor = epoll_of(&driver);
            let mut slots = reactor.slots.borrow_mut();
            slots[key] = Slot::default();
            reactor.free.borrow_mut().push(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::io::placement::thread_cpu;

    /// A level-triggered listener with a queued connection is reported on every round; paused,
    /// it is out of the set and the executor sleeps instead of spinning on it.
    #[test]
    fn a_paused_level_triggered_listener_lets_the_executor_sleep() {
        crate::io::driver::set_mode(crate::io::driver::IoMode::Epoll);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _queued = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let cpu = glommio::LocalExecutor::default().run(async move {
            let registration = Registration::level(listener.as_raw_fd());
            registration.wait_drained(Direction::Read).await.unwrap();
            registration.pause();
            let cpu = thread_cpu();
            crate::io::time::sleep(Duration::from_millis(300)).await;
            drop(registration);
            thread_cpu() - cpu
        });
        crate::io::driver::set_mode(crate::io::driver::IoMode::default());
        assert!(
            cpu < Duration::from_millis(60),
            "{cpu:?} of CPU in 300 ms paused"
        );
    }
}
