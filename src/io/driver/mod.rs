//! The executor's I/O driver: one per glommio executor thread, chosen at start-up (`--io uring`,
//! the default, or `--io epoll`), with one collecting task that runs the driver once per
//! scheduling round and, when nothing else can run, sleeps in the driver's own wait until the
//! next I/O event or the next of the executor's timers ([`crate::io::time`]).
//!
//! glommio 0.9 creates its rings without `COOP_TASKRUN`/`DEFER_TASKRUN`/`SINGLE_ISSUER`, so a
//! socket operation on glommio's ring that completes from the other CPU interrupts this one (a
//! reschedule IPI) to run io_uring's task work; measured here at 1.35 IPIs per proxied
//! connection. So the sockets here never use glommio's rings: the uring driver has a ring of its
//! own, set up as current kernels want it ([`uring`]), and the epoll driver ([`epoll`]) is kept as
//! the measured alternative. glommio remains the executor: its task queues, its scheduling.
//!
//! Every task on an executor with a driver must be spawned [`tracked`] (see [`spawn_local`];
//! `clippy.toml` forbids glommio's own spawns): the collecting task sleeps only when no tracked
//! task ran since it last looked, and an untracked task could wait behind that sleep.

pub mod epoll;
pub mod uring;

use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::{Future, poll_fn};
use std::io;
use std::rc::Rc;
use std::task::Waker;
use std::time::{Duration, Instant};

use crate::io::time::Timers;

/// Which driver an executor's sockets use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    /// Socket operations are io_uring operations on a ring of the executor's own
    /// (`SINGLE_ISSUER | DEFER_TASKRUN` where the kernel has them), submitted in one batch per
    /// scheduling round.
    #[default]
    Uring,
    /// Plain non-blocking system calls, waiting on an edge-triggered epoll set.
    Epoll,
}

impl fmt::Display for IoMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoMode::Uring => "uring",
            IoMode::Epoll => "epoll",
        })
    }
}

/// The driver of the current executor thread.
pub struct Driver {
    executor: usize,
    /// The executor's timers.
    pub(crate) timers: Timers,
    kind: Kind,
    /// The collecting task is running: operations queued now will be submitted.
    collecting: Cell<bool>,
}

// One per executor, made once: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Kind {
    Epoll(epoll::Reactor),
    Uring(uring::Ring),
}

thread_local! {
    // One executor per thread; the id tells a later executor on the same thread to start afresh.
    static CURRENT: RefCell<Option<Rc<Driver>>> = const { RefCell::new(None) };
    /// The driver a new executor on this thread gets (set by `placement::spawn_pinned`).
    static MODE: Cell<IoMode> = const { Cell::new(IoMode::Uring) };
    /// Polls of tracked tasks (see [`tracked`]) on this thread: the collecting task compares it
    /// across a yield to learn whether anything else is runnable.
    static POLLS: Cell<u64> = const { Cell::new(0) };
    /// Set when the executor's main future has finished: the collecting task then ends, so
    /// glommio's loop finds nothing to run and returns.
    static EXITING: Cell<bool> = const { Cell::new(false) };
}

impl Driver {
    /// The current executor's driver, created (with its collecting task) on first use, of the
    /// kind [`set_mode`] chose for this thread.
    pub fn current() -> io::Result<Rc<Driver>> {
        let executor = glommio::executor().id();
        if let Some(found) = CURRENT.with(|c| {
            c.borrow()
                .as_ref()
                .filter(|d| d.executor == executor)
                .cloned()
        }) {
            return Ok(found);
        }
        let kind = match MODE.with(Cell::get) {
            IoMode::Epoll => Kind::Epoll(epoll::Reactor::new()?),
            IoMode::Uring => Kind::Uring(uring::Ring::new()?),
        };
        let driver = Rc::new(Driver {
            executor,
            timers: Timers::default(),
            kind,
            collecting: Cell::new(true),
        });
        EXITING.with(|e| e.set(false));
        CURRENT.with(|c| *c.borrow_mut() = Some(driver.clone()));
        // Not tracked: its own polls must not count as other work.
        #[allow(clippy::disallowed_methods)]
        glommio::spawn_local(collect(driver.clone())).detach();
        Ok(driver)
    }

    /// Which driver this is.
    pub fn mode(&self) -> IoMode {
        match self.kind {
            Kind::Epoll(_) => IoMode::Epoll,
            Kind::Uring(_) => IoMode::Uring,
        }
    }

    /// How the driver was set up, for start-up lines and results: `epoll (edge-triggered)` or
    /// `io_uring (SINGLE_ISSUER|DEFER_TASKRUN|TASKRUN_FLAG)`.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Epoll(_) => "epoll (edge-triggered, one set per executor)".to_string(),
            Kind::Uring(ring) => format!("io_uring ({})", ring.setup()),
        }
    }

    pub(crate) fn kind(&self) -> &Kind {
        &self.kind
    }

    /// Whether the collecting task still runs (operations queued now will be submitted).
    pub(crate) fn collecting(&self) -> bool {
        self.collecting.get()
    }

    /// Runs the driver once: submits what was queued, collects what is ready (waiting up to
    /// `timeout` for the first event), and adds the wakers of the tasks it concerns to `wake`.
    /// Returns how many events it handled.
    fn turn(&self, timeout: Option<Duration>, wake: &mut Vec<Waker>) -> io::Result<usize> {
        match &self.kind {
            Kind::Epoll(reactor) => reactor.turn(timeout, wake),
            Kind::Uring(ring) => ring.turn(timeout, wake),
        }
    }
}

/// Chooses the driver of executors started on this thread from now on.
pub fn set_mode(mode: IoMode) {
    MODE.with(|m| m.set(mode));
}

/// Checks, once per process, that io_uring can be used at all: glommio (which runs every
/// executor, whichever driver the sockets use) panics deep inside its executor builder when it
/// cannot set up a ring or register a probe, so the check comes first and a failure is an error
/// with the reason, not a panic.
pub fn check_io_uring() -> Result<(), String> {
    static CHECKED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    CHECKED
        .get_or_init(|| {
            let ring = io_uring::IoUring::new(2).map_err(|e| format!("io_uring_setup: {e}"))?;
            let mut probe = io_uring::Probe::new();
            ring.submitter()
                .register_probe(&mut probe)
                .map_err(|e| format!("io_uring probe: {e}"))
        })
        .clone()
}

/// Creates the current executor's driver now (so a failure is reported at start-up, not at
/// the first socket), and returns how it was set up.
pub fn start() -> io::Result<String> {
    Driver::current().map(|d| d.describe())
}

/// Tells the collecting task that the executor's main future has finished.
pub fn exit() {
    EXITING.with(|e| e.set(true));
}

/// Wraps a task's future so that its polls are counted: the collecting task sleeps only when no
/// tracked task ran since it last looked. Every task spawned on an executor with a driver should
/// be tracked (see [`spawn_local`]; `clippy.toml` forbids glommio's own spawns elsewhere).
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

/// The longest single sleep when no timer is armed. The executor's own work always wakes it
/// sooner; this only bounds how long a wake-up that bypasses the driver (a glommio waker from
/// another thread) can wait.
const MAX_SLEEP: Duration = Duration::from_millis(50);

/// The executor's collecting task. Once per scheduling round, after the tasks it woke have run,
/// it fires the timers that are due and turns the driver without waiting (for io_uring: one
/// `io_uring_enter` that submits what the round queued and reaps what completed, or none when
/// nothing is queued or pending). When a round found nothing and no other task ran since the
/// last one, the executor has nothing else to do: it then sleeps in the driver's wait until the
/// next event or the next timer. It stays runnable otherwise (a yield per round), so glommio's
/// loop keeps running task queues and never parks in its own rings.
async fn collect(driver: Rc<Driver>) {
    // Wakers of a dead executor's tasks must not outlive it in the thread-local.
    struct Forget(Rc<Driver>);
    impl Drop for Forget {
        fn drop(&mut self) {
            self.0.collecting.set(false);
            let _ = CURRENT.try_with(|c| {
                let mut c = c.borrow_mut();
                if c.as_ref().is_some_and(|d| d.executor == self.0.executor) {
                    *c = None;
                }
            });
        }
    }
    let _forget = Forget(driver.clone());
    // glommio runs a task spawned from its own queue at once, inside the spawner's poll: let the
    // spawner (which is about to use the driver) go on first, rather than sleep in its stead.
    glommio::executor().yield_now().await;
    let mut wake = Vec::new();
    let polls = || POLLS.with(Cell::get);
    let mut seen = polls();
    // Set when the last round only yielded, so a busy task cannot hold collection off.
    let mut deferred = false;
    loop {
        if EXITING.with(Cell::get) {
            // Operations queued last (a final answer with its close) still go out.
            if let Kind::Uring(ring) = &driver.kind {
                ring.settle();
            }
            return;
        }
        let others_ran = polls() != seen;
        seen = polls();
        if others_ran && !deferred {
            // Others ran since the last look and may have woken more: let those run first.
            deferred = true;
            glommio::executor().yield_now().await;
            continue;
        }
        deferred = false;
        let now = Instant::now();
        let fired = driver.timers.fire_due(now);
        // Sleep only when nothing else ran since the last look and no timer fired: then no
        // task can be runnable (every wake-up comes from a task, a timer or the driver).
        let timeout = if others_ran || fired > 0 {
            Duration::ZERO
        } else {
            driver.timers.next().map_or(MAX_SLEEP, |at| {
                at.saturating_duration_since(now).min(MAX_SLEEP)
            })
        };
        match driver.turn(Some(timeout), &mut wake) {
            Ok(_) => {}
            // A signal: nothing was lost, look again.
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                // Not expected from a valid driver; do not spin on it.
                eprintln!("ringlab: the {} driver failed: {err}", driver.mode());
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for waker in wake.drain(..) {
            waker.wake();
        }
        glommio::executor().yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    use crate::io::conn::Conn;
    use crate::io::time;

    use crate::io::placement::thread_cpu;

    fn each_mode(test: impl Fn(IoMode)) {
        for mode in [IoMode::Uring, IoMode::Epoll] {
            set_mode(mode);
            test(mode);
        }
        set_mode(IoMode::default());
    }

    /// A read waits for data that arrives later, and a second executor on the same thread gets
    /// a driver of its own (the first one's collecting task died with its executor).
    #[test]
    fn reads_end_on_data_in_successive_executors() {
        each_mode(|mode| {
            for round in 0..2u8 {
                let (ours, theirs) = UnixStream::pair().unwrap();
                ours.set_nonblocking(true).unwrap();
                let got = glommio::LocalExecutor::default().run(async move {
                    let conn = Conn::new(ours.into()).unwrap();
                    let writer = spawn_local(async move {
                        time::sleep(Duration::from_millis(20)).await;
                        (&theirs).write_all(&[round]).unwrap();
                        theirs
                    });
                    let mut buf = Vec::with_capacity(8);
                    let stuck = async {
                        time::sleep(Duration::from_secs(5)).await;
                        panic!("{mode}, round {round}: the read never ended");
                    };
                    let n = futures_lite::future::or(conn.read(&mut buf), stuck)
                        .await
                        .unwrap();
                    drop(writer.await);
                    (n, buf[0])
                });
                assert_eq!(got, (1, round), "{mode}");
            }
        });
    }

    /// With a socket waiting and nothing happening, the executor sleeps (it does not spin in
    /// the driver), and its timers fire on time although the collecting task is the one
    /// sleeping.
    #[test]
    fn an_idle_executor_sleeps_and_its_timers_stay_on_time() {
        each_mode(|mode| {
            let (ours, _theirs) = UnixStream::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            let (cpu, late) = glommio::LocalExecutor::default().run(async move {
                let conn = Conn::new(ours.into()).unwrap();
                let waiting = spawn_local(async move {
                    let mut buf = Vec::with_capacity(8);
                    let _ = conn.read(&mut buf).await;
                });
                let (cpu, start) = (thread_cpu(), Instant::now());
                time::sleep(Duration::from_millis(300)).await;
                let late = start.elapsed() - Duration::from_millis(300);
                drop(waiting);
                (thread_cpu() - cpu, late)
            });
            assert!(
                cpu < Duration::from_millis(60),
                "{mode}: {cpu:?} of CPU in 300 ms idle"
            );
            assert!(
                late < Duration::from_millis(20),
                "{mode}: the timer fired {late:?} late"
            );
        });
    }

    /// Under a steady trickle of socket events the collecting task never finds an empty round,
    /// yet a timer is not held up.
    #[test]
    fn timers_stay_on_time_under_a_steady_trickle_of_events() {
        each_mode(|mode| {
            let (ours, theirs) = UnixStream::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let writer = {
                let done = done.clone();
                std::thread::spawn(move || {
                    let end = Instant::now() + Duration::from_secs(5);
                    while !done.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < end {
                        let _ = (&theirs).write_all(&[1]);
                        // A busy wait: the trickle must never pause long enough to let the
                        // executor sleep.
                        let next = Instant::now() + Duration::from_micros(100);
                        while Instant::now() < next {
                            std::hint::spin_loop();
                        }
                    }
                })
            };
            let late = glommio::LocalExecutor::default().run(async move {
                let conn = Conn::new(ours.into()).unwrap();
                let reader = spawn_local(async move {
                    let mut sink = Vec::with_capacity(64);
                    loop {
                        sink.clear();
                        match conn.read(&mut sink).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                    }
                });
                let start = Instant::now();
                time::sleep(Duration::from_millis(20)).await;
                let late = start.elapsed() - Duration::from_millis(20);
                drop(reader);
                late
            });
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            writer.join().unwrap();
            assert!(
                late < Duration::from_millis(10),
                "{mode}: the timer fired {late:?} late"
            );
        });
    }

    /// The executor exits as soon as its main future is done, although the collecting task
    /// never parks.
    #[test]
    fn the_executor_exits_when_its_work_is_done() {
        each_mode(|mode| {
            let (ours, mut theirs) = UnixStream::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            let started = Instant::now();
            crate::io::placement::spawn_pinned("exit-test", None, mode, move || async move {
                let conn = Conn::new(ours.into()).unwrap();
                let mut buf = Vec::with_capacity(8);
                theirs.write_all(b"x").unwrap();
                conn.read(&mut buf).await.unwrap();
                drop(theirs);
            })
            .unwrap()
            .join()
            .unwrap();
            assert!(
                started.elapsed() < Duration::from_millis(50),
                "{mode}: took {:?}",
                started.elapsed()
            );
        });
    }
}
