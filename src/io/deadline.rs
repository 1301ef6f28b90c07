//! Coarse per-executor deadlines: one ticking timer per executor shuts down the sockets whose
//! deadline passed, instead of a timer armed per read.
//!
//! A timer per read would be a heap push and pop per request (and with glommio's timers, a
//! `TIMEOUT` and an `ASYNC_CANCEL` on its ring: the profile once showed one of each per request).
//! Here arming or moving a deadline is a `Cell` store; the cost is a wake-up per tick, and the
//! precision is one tick.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use crate::io::conn;
use crate::io::shutdown::LocalStop;
use crate::io::time;

/// For [`Deadlines::arm`]: shut nothing down when the deadline passes, only wake the owner
/// waiting in [`Deadline::expired`] (`SHUT_RD` is 0, so 0 cannot mean this).
pub const WAKE_ONLY: libc::c_int = -1;

/// The deadlines of one executor.
pub struct Deadlines {
    tick: Duration,
    /// Ticks since the ticker started.
    now: Cell<u64>,
    slots: RefCell<Vec<Option<Rc<Entry>>>>,
    free: RefCell<Vec<usize>>,
    fired: Cell<u64>,
}

struct Entry {
    fds: [RawFd; 2],
    /// `SHUT_RD`/`SHUT_RDWR` for the sockets when the deadline passes, or [`WAKE_ONLY`].
    how: libc::c_int,
    /// The armed duration, in ticks, for [`Deadline::extend`].
    ticks: Cell<u64>,
    /// Tick at or after which the entry fires; `u64::MAX` when disarmed.
    due: Cell<u64>,
    fired: Cell<bool>,
    /// The task waiting in [`Deadline::expired`].
    waker: RefCell<Option<Waker>>,
}

impl Entry {
    fn fire(&self) {
        for fd in self.fds {
            if fd >= 0 && self.how != WAKE_ONLY {
                let _ = conn::shutdown(fd, self.how);
            }
        }
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }
}

/// A registration; dropping it forgets the deadline. Drop it before closing the sockets, so the
/// ticker never shuts down a descriptor number that was reused.
pub struct Deadline {
    owner: Rc<Deadlines>,
    slot: usize,
    entry: Rc<Entry>,
}

impl Deadlines {
    /// Deadlines checked every `tick`.
    pub fn new(tick: Duration) -> Rc<Deadlines> {
        Rc::new(Deadlines {
            tick: tick.max(Duration::from_millis(1)),
            now: Cell::new(0),
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            fired: Cell::new(0),
        })
    }

    /// The tick suited to a timeout: a quarter of it, between 10 ms and 1 s.
    pub fn tick_for(timeout: Duration) -> Duration {
        (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    /// Registers `fds` (one socket, or a relayed pair) to be shut down with `how` (`SHUT_RD`,
    /// `SHUT_RDWR`, or [`WAKE_ONLY`]) once `after` has passed. Unused slots of `fds` are -1.
    pub fn arm(self: &Rc<Self>, fds: [RawFd; 2], how: libc::c_int, after: Duration) -> Deadline {
        let ticks = self.ticks(after);
        let entry = Rc::new(Entry {
            fds,
            how,
            ticks: Cell::new(ticks),
            due: Cell::new(self.now.get() + ticks),
            fired: Cell::new(false),
            waker: RefCell::new(None),
        });
        let mut slots = self.slots.borrow_mut();
        let slot = match self.free.borrow_mut().pop() {
            Some(slot) => {
                slots[slot] = Some(entry.clone());
                slot
            }
            None => {
                slots.push(Some(entry.clone()));
                slots.len() - 1
            }
        };
        Deadline {
            owner: self.clone(),
            slot,
            entry,
        }
    }

    /// Fires every deadline now (a drain deadline that passed): their owners end at once.
    pub fn expire_all(&self) {
        let all: Vec<Rc<Entry>> = self.slots.borrow().iter().flatten().cloned().collect();
        for e in all {
            if !e.fired.replace(true) {
                self.fired.set(self.fired.get() + 1);
                e.fire();
            }
        }
    }

    /// How many deadlines have fired.
    pub fn fired(&self) -> u64 {
        self.fired.get()
    }

    fn ticks(&self, after: Duration) -> u64 {
        // +1: the current tick is already partly over, so never fire early.
        after.as_nanos().div_ceil(self.tick.as_nanos()) as u64 + 1
    }

    /// Ticks until `stop` fires and no deadline is registered.
    pub async fn run(self: Rc<Self>, stop: LocalStop) {
        loop {
            if stop.is_stopped() && self.slots.borrow().iter().all(Option::is_none) {
                return;
            }
            time::sleep(self.tick).await;
            let now = self.now.get() + 1;
            self.now.set(now);
            let due: Vec<Rc<Entry>> = self
                .slots
                .borrow()
                .iter()
                .flatten()
                .filter(|e| !e.fired.get() && e.due.get() <= now)
                .cloned()
                .collect();
            for e in due {
                e.fired.set(true);
                self.fired.set(self.fired.get() + 1);
                e.fire();
            }
        }
    }
}

impl Deadline {
    /// Moves the deadline to its armed duration from now (activity on a relayed pair, the next
    /// request on a kept-alive connection). A store, no arithmetic beyond an add.
    pub fn extend(&self) {
        self.entry
            .due
            .set(self.owner.now.get() + self.entry.ticks.get());
    }

    /// Changes the armed duration to `after` and moves the deadline to `after` from now (a
    /// relayed pair one side of which has finished gets a shorter leash).
    pub fn rearm(&self, after: Duration) {
        self.entry.ticks.set(self.owner.ticks(after));
        self.extend();
    }

    /// Resolves once the deadline has passed (or [`Deadline::fire_now`] was called).
    pub async fn expired(&self) {
        poll_fn(|cx| {
            if self.entry.fired.get() {
                return Poll::Ready(());
            }
            let mut waker = self.entry.waker.borrow_mut();
            match &mut *waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                other => *other = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    /// Moves the deadline to `after` from now, without changing the armed duration.
    pub fn extend_by(&self, after: Duration) {
        self.entry
            .due
            .set(self.owner.now.get() + self.owner.ticks(after));
    }

    /// Shuts the sockets down now, as if the deadline had passed (a relay whose other half
    /// failed).
    pub fn fire_now(&self) {
        if !self.entry.fired.replace(true) {
            self.entry.fire();
        }
    }

    /// Whether the deadline passed (and the sockets were shut down).
    pub fn fired(&self) -> bool {
        self.entry.fired.get()
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.owner.slots.borrow_mut()[self.slot] = None;
        self.owner.free.borrow_mut().push(self.slot);
    }
}
