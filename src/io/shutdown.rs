//! Graceful stop: a signal or a test trips one [`Shutdown`], and every executor and thread that
//! watches it wakes at once, without polling a flag.
//!
//! A glommio executor sleeps in io_uring or `epoll_wait`, so an `AtomicBool` alone cannot wake it.
//! Each watcher instead holds the read end of a socketpair whose write end lives in the
//! `Shutdown`; tripping it closes every write end, and the reads complete with end-of-file.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use crate::io::conn::Conn;
use crate::io::driver;
use crate::io::time;

/// A cloneable, thread-safe stop switch.
#[derive(Clone, Default)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    fired: AtomicBool,
    /// Write ends of the watchers' socketpairs; dropping them is the wake-up.
    writers: Mutex<Vec<OwnedFd>>,
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shutdown")
            .field("fired", &self.is_triggered())
            .finish()
    }
}

impl Shutdown {
    /// A switch that has not been tripped.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Trips the switch: every current and future watcher sees it.
    pub fn trigger(&self) {
        let writers = {
            let mut guard = self.inner.writers.lock().unwrap_or_else(|e| e.into_inner());
            self.inner.fired.store(true, Ordering::SeqCst);
            std::mem::take(&mut *guard)
        };
        drop(writers);
    }

    /// Whether the switch has been tripped.
    pub fn is_triggered(&self) -> bool {
        self.inner.fired.load(Ordering::SeqCst)
    }

    /// A file descriptor that becomes readable (end-of-file) once the switch trips, for
    /// `poll(2)`-based threads.
    pub fn wait_fd(&self) -> io::Result<OwnedFd> {
        let (reader, writer) = StdUnixStream::pair()?;
        let mut guard = self.inner.writers.lock().unwrap_or_else(|e| e.into_inner());
        // Checked under the lock that `trigger` takes, so a watcher created during a trigger
        // either lands in the list before it is drained or sees the flag.
        if !self.inner.fired.load(Ordering::SeqCst) {
            guard.push(OwnedFd::from(writer));
        }
        Ok(OwnedFd::from(reader))
    }

    /// Resolves once the switch trips. Must be awaited on a glommio executor.
    pub async fn wait(&self) {
        match self.wait_fd() {
            Ok(fd) => {
                // A connection on the executor's driver, like every socket here: a trip then also
                // ends the collecting task's sleep at once. Nothing is ever written, so the read
                // ends with end-of-file (or an error) when the switch trips.
                if let Ok(watcher) = Conn::new(fd) {
                    let mut byte = Vec::with_capacity(1);
                    if watcher.read(&mut byte).await.is_ok() {
                        return;
                    }
                }
            }
            Err(err) => eprintln!("ringlab: shutdown watcher fell back to polling: {err}"),
        }
        // No socketpair, or no epoll item for it: no wake-up, so check the flag.
        while !self.is_triggered() {
            time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// An executor-local fan-out of a [`Shutdown`]: one socketpair per executor, any number of
/// tasks waiting on it, each waiting future holding one reusable waker slot.
#[derive(Clone, Default)]
pub struct LocalStop {
    inner: Rc<LocalInner>,
}

#[derive(Default)]
struct LocalInner {
    stopped: Cell<bool>,
    slots: RefCell<Slots>,
}

#[derive(Default)]
struct Slots {
    wakers: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl LocalStop {
    /// A local stop that fires when `shutdown` trips. Call on the executor that will use it.
    pub fn watch(shutdown: &Shutdown) -> LocalStop {
        let stop = LocalStop::default();
        let fire = stop.clone();
        let shutdown = shutdown.clone();
        driver::spawn_local(async move {
            shutdown.wait().await;
            fire.fire();
        })
        .detach();
        stop
    }

    /// Fires the local stop directly (a server's own drain uses this).
    pub fn fire(&self) {
        self.inner.stopped.set(true);
        let wakers: Vec<Waker> = {
            let mut slots = self.inner.slots.borrow_mut();
            slots.wakers.iter_mut().filter_map(Option::take).collect()
        };
        for waker in wakers {
            waker.wake();
        }
    }

    /// Whether the stop has fired.
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.get()
    }

    /// A future that resolves once the stop fires.
    pub fn stopped(&self) -> Stopped {
        Stopped {
            inner: self.inner.clone(),
            slot: None,
        }
    }
}

/// The future returned by [`LocalStop::stopped`].
pub struct Stopped {
    inner: Rc<LocalInner>,
    slot: Option<usize>,
}

impl Future for Stopped {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.inner.stopped.get() {
            return Poll::Ready(());
        }
        let inner = self.inner.clone();
        let mut slots = inner.slots.borrow_mut();
        let slot = match self.slot {
            Some(slot) => slot,
            None => {
                let slot = match slots.free.pop() {
                    Some(slot) => slot,
                    None => {
                        slots.wakers.push(None);
                        slots.wakers.len() - 1
                    }
                };
                self.slot = Some(slot);
                slot
            }
        };
        match &mut slots.wakers[slot] {
            Some(w) if w.will_wake(cx.waker()) => {}
            entry => *entry = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            let mut slots = self.inner.slots.borrow_mut();
            slots.wakers[slot] = None;
            slots.free.push(slot);
        }
    }
}

/// Routes SIGINT and SIGTERM to `shutdown`: the first trips it, a second one exits at once with
/// status 130. Call before starting any thread, so every thread inherits the blocked mask and the
/// signals reach only the dedicated waiter thread.
pub fn trip_on_signals(shutdown: &Shutdown) -> io::Result<()> {
    // SAFETY: plain libc signal-set manipulation on stack-owned sets.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        set
    };
    let shutdown = shutdown.clone();
    std::thread::Builder::new()
        .name("ringlab-signals".into())
        .spawn(move || {
            let mut seen = 0;
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is a valid, initialised signal set; `sig` is a valid out-pointer.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                seen += 1;
                // Printing cannot fail this thread: a closed stderr (its reader gone) must not
                // keep the switch from tripping.
                if seen == 1 {
                    shutdown.trigger();
                    let _ = writeln!(
                        io::stderr(),
                        "ringlab: {} received, draining (send it again to stop at once)",
                        signal_name(sig)
                    );
                } else {
                    let _ = writeln!(io::stderr(), "ringlab: second signal, exiting now");
                    std::process::exit(130);
                }
            }
        })?;
    Ok(())
}

/// Trips `shutdown` when standard input reaches end-of-file: a supervisor (`sweep --place`, on
/// this host or over ssh) holds it open while it wants this process, so however the supervisor
/// ends — even killed, or its ssh connection lost — this process stops gracefully.
pub fn trip_on_stdin_eof(shutdown: &Shutdown) -> io::Result<()> {
    let shutdown = shutdown.clone();
    std::thread::Builder::new()
        .name("ringlab-stdin".into())
        .spawn(move || {
            let mut sink = [0u8; 256];
            let mut stdin = io::stdin().lock();
            // Whatever arrives is ignored; only the end (or a broken pipe) matters.
            while matches!(io::Read::read(&mut stdin, &mut sink), Ok(n) if n > 0) {}
            if !shutdown.is_triggered() {
                // Tripped before anything is printed: a supervisor that died took the other
                // ends of our output pipes with it, and that write fails.
                shutdown.trigger();
                let _ = writeln!(
                    io::stderr(),
                    "ringlab: standard input closed by the supervisor, draining"
                );
            }
        })?;
    Ok(())
}

fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// Blocks the calling thread until `fd` (from [`Shutdown::wait_fd`]) or `other` is readable, or
/// `timeout_ms` passes. Returns `(shutdown_ready, other_ready)`.
pub fn poll_two(fd: &OwnedFd, other: i32, timeout_ms: i32) -> io::Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: other,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok((false, false));
        }
        return Err(err);
    }
    Ok((fds[0].revents != 0, fds[1].revents != 0))
}
