//! Timers kept by the executor's I/O driver. Every timer the lab arms goes through here rather
//! than through glommio's, so the driver's collecting task knows the next deadline: when nothing
//! else can run, it sleeps in its own wait (`io_uring_enter` or `epoll_wait`) exactly that long,
//! and glommio's loop never has to park (glommio's park submits a dozen ring operations around
//! its timers; the profile once showed that at a third of a busy backend's CPU). Arming, moving
//! and dropping a timer are heap operations, no system call.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::io::driver::Driver;

/// The timers of one executor.
#[derive(Default)]
pub struct Timers {
    /// (deadline, slot, generation); entries of dropped timers stay until they reach the top.
    heap: RefCell<BinaryHeap<Reverse<(Instant, usize, u64)>>>,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<usize>>,
}

#[derive(Default)]
struct Slot {
    generation: u64,
    live: bool,
    fired: bool,
    waker: Option<Waker>,
}

impl Timers {
    fn add(&self, at: Instant, waker: Waker) -> (usize, u64) {
        let mut slots = self.slots.borrow_mut();
        let key = self.free.borrow_mut().pop().unwrap_or_else(|| {
            slots.push(Slot::default());
            slots.len() - 1
        });
        let slot = &mut slots[key];
        slot.generation += 1;
        slot.live = true;
        slot.fired = false;
        slot.waker = Some(waker);
        self.heap
            .borrow_mut()
            .push(Reverse((at, key, slot.generation)));
        (key, slot.generation)
    }

    fn remove(&self, key: usize, generation: u64) {
        let mut slots = self.slots.borrow_mut();
        let slot = &mut slots[key];
        if slot.generation == generation && slot.live {
            slot.live = false;
            slot.waker = None;
            self.free.borrow_mut().push(key);
        }
    }

    /// Wakes every timer due at `now`; returns how many there were.
    pub(crate) fn fire_due(&self, now: Instant) -> usize {
        let mut fired = 0;
        let mut wake = Vec::new();
        {
            let mut heap = self.heap.borrow_mut();
            let mut slots = self.slots.borrow_mut();
            while let Some(&Reverse((at, key, generation))) = heap.peek() {
                if at > now {
                    break;
                }
                heap.pop();
                let slot = &mut slots[key];
                if slot.live && slot.generation == generation && !slot.fired {
                    slot.fired = true;
                    wake.extend(slot.waker.take());
                    fired += 1;
                }
            }
        }
        for waker in wake {
            waker.wake();
        }
        fired
    }

    /// The earliest deadline of a live timer.
    pub(crate) fn next(&self) -> Option<Instant> {
        let mut heap = self.heap.borrow_mut();
        let slots = self.slots.borrow();
        while let Some(&Reverse((at, key, generation))) = heap.peek() {
            let slot = &slots[key];
            if slot.live && slot.generation == generation && !slot.fired {
                return Some(at);
            }
            heap.pop();
        }
        None
    }
}

/// Resolves once `duration` has passed. Must be awaited on an executor with an I/O driver.
pub fn sleep(duration: Duration) -> Sleep {
    sleep_until(Instant::now() + duration)
}

/// Resolves at `at`.
pub fn sleep_until(at: Instant) -> Sleep {
    Sleep { at, armed: None }
}

/// The future of [`sleep`].
pub struct Sleep {
    at: Instant,
    armed: Option<(Rc<Driver>, usize, u64)>,
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let Some((driver, key, generation)) = &self.armed {
            let mut slots = driver.timers.slots.borrow_mut();
            let slot = &mut slots[*key];
            if slot.generation == *generation && slot.fired {
                return Poll::Ready(());
            }
            match &mut slot.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                other => *other = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        }
        if Instant::now() >= self.at {
            return Poll::Ready(());
        }
        let driver = Driver::current().expect("a timer needs the executor's I/O driver");
        let (key, generation) = driver.timers.add(self.at, cx.waker().clone());
        self.armed = Some((driver, key, generation));
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some((driver, key, generation)) = self.armed.take() {
            driver.timers.remove(key, generation);
        }
    }
}
