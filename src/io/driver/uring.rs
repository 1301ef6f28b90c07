//! The io_uring driver (`--io uring`, the default): a ring owned by the executor, set up the way
//! current kernels want it, with every socket operation (accept, connect, recv, send, close) an
//! operation on that ring.
//!
//! - **Set-up.** `SINGLE_ISSUER | DEFER_TASKRUN` (kernel 6.1): completions that happen on the
//!   other CPU are queued as work for this thread and run when it enters the ring, instead of
//!   interrupting it (glommio's rings, set up without either, cost a reschedule IPI per proxied
//!   connection). Else `COOP_TASKRUN` (5.19), else plain. `TASKRUN_FLAG` rides along, so a round
//!   with nothing queued and no work pending needs no system call at all.
//! - **Batching.** Operations are queued as tasks run; the collecting task ([`super`]) makes one
//!   `io_uring_enter` per round that submits them all and reaps what completed, and when nothing
//!   else can run, that same call also sleeps (`GETEVENTS` with a timeout: the next timer).
//! - **Ownership.** The kernel writes into a read's buffer and reads a send's until the
//!   completion arrives, whatever happens to the future that asked. So an operation owns its
//!   buffer (and a connect its address) while in flight: the caller hands a `Vec` in and gets it
//!   back. A future dropped before its completion leaves an orphan that keeps what the kernel
//!   uses until the final completion; a cancelled read's bytes, if any arrived, are kept for the
//!   connection's next read, so cancelling a read never loses data.
//! - **Shutdown** stays a plain `shutdown(2)`: the ring's `SHUTDOWN` is always punted to an io-wq
//!   worker thread (a prototype measured that at a quarter of an L4 proxy's CPU).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use crate::io::driver::{Driver, Kind};

/// Submission queue entries; in-flight operations are not limited by it, only what one round
/// queues (a full queue is submitted early).
const ENTRIES: u32 = 1024;

/// Completion queue entries: room for a burst of completions between two rounds.
const CQ_ENTRIES: u32 = 8192;

/// `user_data` of operations whose completion nobody waits for (close, cancel).
const IGNORE: u64 = u64::MAX;

/// The ring of one executor and its operations in flight.
pub struct Ring {
    ring: RefCell<IoUring>,
    setup: &'static str,
    /// `NO_IOWAIT` where the kernel has it: a sleep waiting for sockets is not disk I/O.
    no_iowait: io_uring::EnterFlags,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<usize>>,
}

/// One operation in flight (or just completed, until its future takes the result).
struct Slot {
    generation: u32,
    state: State,
    /// What the kernel uses while the operation is in flight: a buffer, an address.
    keep: Keep,
}

enum State {
    Free,
    /// Submitted; the task waiting, if it has polled.
    Waiting(Option<Waker>),
    /// Completed with this result; the future has not taken it yet.
    Done(i32),
    /// A multishot operation: its completions in order, and whether the last one came.
    Multi {
        results: VecDeque<i32>,
        ended: bool,
        waker: Option<Waker>,
    },
    /// Its future was dropped: kept until the kernel's final completion (then a task waiting
    /// for it to end, a later read on the same connection, is woken).
    Orphaned(Option<Waker>),
}

/// What a slot keeps alive for the kernel, with the socket it works on (which counts its
/// orphans, so that closing it cancels them).
pub(crate) enum Keep {
    Nothing,
    /// A read's buffer; if the read is cancelled after bytes arrived, the socket's next read
    /// gets them.
    Read(Vec<u8>, Rc<Socket>),
    /// A send's buffer.
    Send(Vec<u8>, Rc<Socket>),
    /// A peek's one byte lives in the socket, which this keeps alive.
    Peek(Rc<Socket>),
    /// The last bytes of a connection handed over to be sent and closed.
    Last {
        _buf: Vec<u8>,
    },
    /// A connect's address (only the kernel reads it).
    Connect {
        _addr: Box<(libc::sockaddr_storage, libc::socklen_t)>,
        socket: Rc<Socket>,
    },
    /// A multishot accept's: connections accepted after it was abandoned are closed.
    Accepts,
}

impl Keep {
    fn socket(&self) -> Option<&Rc<Socket>> {
        match self {
            Keep::Read(_, s)
            | Keep::Send(_, s)
            | Keep::Peek(s)
            | Keep::Connect { socket: s, .. } => Some(s),
            Keep::Nothing | Keep::Accepts | Keep::Last { .. } => None,
        }
    }
}

impl Ring {
    /// A ring with the best set-up this kernel accepts.
    pub fn new() -> io::Result<Ring> {
        type Configure = fn(&mut io_uring::Builder);
        let attempts: [(&'static str, Configure); 3] = [
            ("SINGLE_ISSUER|DEFER_TASKRUN|TASKRUN_FLAG", |b| {
                b.setup_single_issuer()
                    .setup_defer_taskrun()
                    .setup_taskrun_flag();
            }),
            ("COOP_TASKRUN|TASKRUN_FLAG", |b| {
                b.setup_coop_taskrun().setup_taskrun_flag();
            }),
            ("plain", |_| {}),
        ];
        let mut last = None;
        for (setup, configure) in attempts {
            let mut builder = IoUring::builder();
            builder.setup_cqsize(CQ_ENTRIES).setup_submit_all();
            configure(&mut builder);
            match builder.build(ENTRIES) {
                Ok(ring) => {
                    if !ring.params().is_feature_ext_arg() || !ring.params().is_feature_nodrop() {
                        return Err(io::Error::new(
                            io::ErrorKind::Unsupported,
                            "this kernel's io_uring lacks EXT_ARG or NODROP (Linux 5.11+ has \
                             them)",
                        ));
                    }
                    let no_iowait = if ring.params().is_feature_no_iowait() {
                        io_uring::EnterFlags::NO_IOWAIT
                    } else {
                        io_uring::EnterFlags::empty()
                    };
                    return Ok(Ring {
                        ring: RefCell::new(ring),
                        setup,
                        no_iowait,
                        slots: RefCell::new(Vec::new()),
                        free: RefCell::new(Vec::new()),
                    });
                }
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no io_uring set-up worked")))
    }

    /// The set-up flags the kernel accepted.
    pub fn setup(&self) -> &'static str {
        self.setup
    }

    /// Queues `entry` for the next round's `io_uring_enter` (submitting early if the queue is
    /// full).
    fn push(&self, entry: squeue::Entry) {
        let mut ring = self.ring.borrow_mut();
        loop {
            // SAFETY: whatever the entry points at is kept alive by its slot (or is a descriptor
            // or nothing), until its completion.
            if unsafe { ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // Full: submit what is queued now (the completions wait for the next round).
            if let Err(err) = ring.submit() {
                eprintln!("ringlab: io_uring submit failed: {err}");
                return;
            }
        }
    }

    /// Starts an operation: a slot for it, `entry` (its `user_data` set to the slot) queued.
    fn start(&self, entry: squeue::Entry, keep: Keep, state: State) -> (usize, u32) {
        let mut slots = self.slots.borrow_mut();
        let key = self.free.borrow_mut().pop().unwrap_or_else(|| {
            slots.push(Slot {
                generation: 0,
                state: State::Free,
                keep: Keep::Nothing,
            });
            slots.len() - 1
        });
        let slot = &mut slots[key];
        slot.generation = slot.generation.wrapping_add(1);
        slot.state = state;
        slot.keep = keep;
        let generation = slot.generation;
        drop(slots);
        self.push(entry.user_data(key as u64));
        (key, generation)
    }

    fn release(&self, key: usize) -> Keep {
        let mut slots = self.slots.borrow_mut();
        let slot = &mut slots[key];
        slot.state = State::Free;
        let keep = std::mem::replace(&mut slot.keep, Keep::Nothing);
        self.free.borrow_mut().push(key);
        keep
    }

    /// Queues an operation whose completion nobody waits for. It posts a completion only if it
    /// fails (`CQE_SKIP_SUCCESS`), so a close never ends a sleep for nothing.
    fn fire_and_forget(&self, entry: squeue::Entry) {
        self.push(entry.user_data(IGNORE).flags(squeue::Flags::SKIP_SUCCESS));
    }

    /// One round: submits what was queued and reaps what completed, waiting up to `timeout`
    /// for a first completion when there is none yet. With nothing queued, no work pending and
    /// no wait wanted, it makes no system call.
    pub(crate) fn turn(
        &self,
        timeout: Option<Duration>,
        wake: &mut Vec<Waker>,
    ) -> io::Result<usize> {
        {
            let mut ring = self.ring.borrow_mut();
            let mut sq = ring.submission();
            sq.sync();
            let queued = sq.len() as u32;
            let pending = sq.taskrun() || sq.cq_overflow();
            drop(sq);
            let ready = !ring.completion().is_empty();
            let wait = timeout.is_none_or(|t| !t.is_zero()) && !ready;
            if queued > 0 || pending || wait {
                let getevents = io_uring::EnterFlags::GETEVENTS;
                // SAFETY: the arguments describe this ring's queues; the timespec outlives the
                // call, and `SubmitArgs` is laid out as the kernel's getevents argument (the
                // crate's own `submit_with_args` passes it the same way).
                let entered = unsafe {
                    match timeout.filter(|_| wait) {
                        Some(t) => {
                            let ts = types::Timespec::from(t);
                            let args = types::SubmitArgs::new().timespec(&ts);
                            let flags = getevents | io_uring::EnterFlags::EXT_ARG | self.no_iowait;
                            ring.submitter().enter(queued, 1, flags.bits(), Some(&args))
                        }
                        None => ring.submitter().enter::<libc::sigset_t>(
                            queued,
                            u32::from(wait),
                            getevents.bits(),
                            None,
                        ),
                    }
                };
                match entered {
                    Ok(_) => {}
                    // The timeout passed, a signal came, or completions must be reaped before
                    // more can be posted: all fine, reap.
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                        ) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(self.reap(wake))
    }

    /// Submits what is queued and waits (up to a second) for operations nobody waits for any
    /// more (closes, the sends chained to them) to finish: the executor is exiting, and what a
    /// task handed over must still happen.
    pub(crate) fn settle(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        let mut wake = Vec::new();
        while std::time::Instant::now() < deadline {
            let unfinished = self.slots.borrow().iter().any(|slot| {
                matches!(slot.state, State::Orphaned(_)) && !matches!(slot.keep, Keep::Accepts)
            });
            let queued = !self.ring.borrow_mut().submission().is_empty();
            if !unfinished && !queued {
                return;
            }
            if self
                .turn(Some(Duration::from_millis(10)), &mut wake)
                .is_err()
            {
                return;
            }
            // Nobody is left to run the tasks these wake.
            wake.clear();
        }
    }

    /// Hands every completion to its slot; returns how many there were.
    fn reap(&self, wake: &mut Vec<Waker>) -> usize {
        let mut done = Vec::new();
        {
            let mut ring = self.ring.borrow_mut();
            for cqe in ring.completion() {
                done.push((cqe.user_data(), cqe.result(), cqe.flags()));
            }
        }
        for &(user_data, result, flags) in &done {
            if user_data != IGNORE {
                self.complete(user_data as usize, result, flags, wake);
            }
        }
        done.len()
    }

    fn complete(&self, key: usize, result: i32, flags: u32, wake: &mut Vec<Waker>) {
        let more = cqueue::more(flags);
        let mut slots = self.slots.borrow_mut();
        let Some(slot) = slots.get_mut(key) else {
            return;
        };
        match &mut slot.state {
            State::Waiting(waker) => {
                wake.extend(waker.take());
                slot.state = State::Done(result);
            }
            State::Multi {
                results,
                ended,
                waker,
            } => {
                results.push_back(result);
                *ended = !more;
                wake.extend(waker.take());
            }
            State::Orphaned(waker) => {
                if matches!(slot.keep, Keep::Accepts) && result >= 0 {
                    // A connection accepted for a loop that is gone: nobody will serve it.
                    // SAFETY: the kernel just gave us this descriptor.
                    unsafe { libc::close(result) };
                }
                if more {
                    return;
                }
                wake.extend(waker.take());
                let keep = std::mem::replace(&mut slot.keep, Keep::Nothing);
                slot.state = State::Free;
                self.free.borrow_mut().push(key);
                drop(slots);
                match keep {
                    Keep::Read(buf, socket) => socket.orphan_ended(Some(buf), result),
                    other => {
                        if let Some(socket) = other.socket() {
                            socket.orphan_ended(None, result);
                        }
                    }
                }
            }
            State::Done(_) | State::Free => {}
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel may still hold buffers of operations in flight until it has torn the
        // ring down; leaking them is safer than freeing memory it could still write.
        for slot in self.slots.get_mut().drain(..) {
            if !matches!(slot.state, State::Free | State::Done(_)) {
                std::mem::forget(slot.keep);
            }
        }
    }
}

/// The ring of a driver known to be a uring one.
fn ring_of(driver: &Driver) -> &Ring {
    match driver.kind() {
        Kind::Uring(ring) => ring,
        Kind::Epoll(_) => unreachable!("uring operations are made on uring drivers only"),
    }
}

/// An operation in flight; resolves to its result and what it kept.
pub(crate) struct Op {
    driver: Rc<Driver>,
    key: usize,
    generation: u32,
    finished: bool,
}

impl Op {
    fn start(driver: &Rc<Driver>, entry: squeue::Entry, keep: Keep) -> Op {
        let (key, generation) = ring_of(driver).start(entry, keep, State::Waiting(None));
        Op {
            driver: driver.clone(),
            key,
            generation,
            finished: false,
        }
    }
}

impl Future for Op {
    type Output = (i32, Keep);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(i32, Keep)> {
        let ring = ring_of(&self.driver);
        let mut slots = ring.slots.borrow_mut();
        let slot = &mut slots[self.key];
        debug_assert_eq!(slot.generation, self.generation);
        match &mut slot.state {
            State::Done(result) => {
                let result = *result;
                drop(slots);
                let keep = ring.release(self.key);
                self.finished = true;
                Poll::Ready((result, keep))
            }
            State::Waiting(waker) => {
                match waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    other => *other = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            _ => unreachable!("a single-shot operation's slot"),
        }
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let ring = ring_of(&self.driver);
        let mut slots = ring.slots.borrow_mut();
        let slot = &mut slots[self.key];
        if let State::Done(result) = slot.state {
            // Completed but never taken: a cancelled read's bytes still go to its connection.
            drop(slots);
            if let Keep::Read(buf, socket) = ring.release(self.key) {
                socket.orphans.set(socket.orphans.get() + 1);
                socket.orphan_ended(Some(buf), result);
            }
            return;
        }
        slot.state = State::Orphaned(None);
        if let Some(socket) = slot.keep.socket() {
            socket.orphans.set(socket.orphans.get() + 1);
            if matches!(slot.keep, Keep::Read(..)) {
                socket.orphan_read.set(Some((self.key, self.generation)));
            }
        }
        drop(slots);
        if self.driver.collecting() {
            ring.fire_and_forget(opcode::AsyncCancel::new(self.key as u64).build());
        }
    }
}

/// A connected stream socket on the uring driver.
pub(crate) struct Socket {
    fd: RawFd,
    driver: Rc<Driver>,
    /// Orphaned operations still in flight on this socket (cancelled by descriptor at close).
    orphans: Cell<u32>,
    /// The orphaned read still in flight, if any: the next read waits for it to end.
    orphan_read: Cell<Option<(usize, u32)>>,
    /// Bytes a cancelled read received, for the next read: (buffer, start, end).
    leftover: RefCell<Option<(Vec<u8>, usize, usize)>>,
    /// A read found end-of-file.
    at_eof: Cell<bool>,
    /// An error a peek (see [`Socket::read_probing`]) met, for the next read: the kernel reports
    /// a socket's error once, so a probe that dropped it would turn a reset into a clean end.
    error: Cell<Option<i32>>,
    /// Its close is queued already ([`Socket::send_and_close`]).
    closed: Cell<bool>,
    /// Where a peek's one byte goes (see [`Socket::read_probing`]); only the kernel writes it.
    peek: std::cell::UnsafeCell<[u8; 1]>,
}

impl Socket {
    pub(crate) fn new(fd: RawFd, driver: Rc<Driver>) -> Rc<Socket> {
        Rc::new(Socket {
            fd,
            driver,
            orphans: Cell::new(0),
            orphan_read: Cell::new(None),
            leftover: RefCell::new(None),
            at_eof: Cell::new(false),
            error: Cell::new(None),
            closed: Cell::new(false),
            peek: std::cell::UnsafeCell::new([0]),
        })
    }

    /// The socket's descriptor.
    pub(crate) fn fd(&self) -> RawFd {
        self.fd
    }

    /// The final completion of an orphaned operation; a read's bytes, if any, wait for the
    /// next read.
    fn orphan_ended(&self, read: Option<Vec<u8>>, result: i32) {
        self.orphans.set(self.orphans.get().saturating_sub(1));
        let Some(buf) = read else {
            return;
        };
        self.orphan_read.set(None);
        if result > 0 {
            let start = buf.len();
            *self.leftover.borrow_mut() = Some((buf, start, start + result as usize));
        } else if result == 0 {
            self.at_eof.set(true);
        }
    }

    /// Waits until no orphaned read of this socket is in flight.
    async fn orphan_gone(&self) {
        std::future::poll_fn(|cx| {
            let Some((key, generation)) = self.orphan_read.get() else {
                return Poll::Ready(());
            };
            let ring = ring_of(&self.driver);
            let mut slots = ring.slots.borrow_mut();
            let slot = &mut slots[key];
            match &mut slot.state {
                State::Orphaned(waker) if slot.generation == generation => {
                    *waker = Some(cx.waker().clone());
                    Poll::Pending
                }
                _ => {
                    self.orphan_read.set(None);
                    Poll::Ready(())
                }
            }
        })
        .await
    }

    /// Takes bytes a cancelled read left, appending them to `buf`'s spare room.
    fn take_leftover(&self, buf: &mut Vec<u8>) -> Option<usize> {
        let mut leftover = self.leftover.borrow_mut();
        let (data, start, end) = leftover.as_mut()?;
        let n = (*end - *start).min(buf.capacity() - buf.len());
        buf.extend_from_slice(&data[*start..*start + n]);
        *start += n;
        if start == end {
            *leftover = None;
        }
        Some(n)
    }

    /// Reads into the spare room of `buf` (appending); `Ok(0)` is end-of-file.
    pub(crate) async fn read(self: &Rc<Self>, buf: &mut Vec<u8>) -> io::Result<usize> {
        if buf.capacity() == buf.len() {
            return Ok(0);
        }
        self.orphan_gone().await;
        if let Some(n) = self.take_leftover(buf) {
            return Ok(n);
        }
        if let Some(errno) = self.error.take() {
            return Err(io::Error::from_raw_os_error(errno));
        }
        if self.at_eof.get() {
            return Ok(0);
        }
        self.recv(buf, 0).await
    }

    /// Reads like [`Socket::read`], and says whether the peer's end-of-file is queued right
    /// behind what was read. The read is linked to a one-byte `MSG_PEEK | MSG_DONTWAIT` receive
    /// that runs as soon as the read completes, so both answers arrive in the same round (a
    /// second, separate probe would cost the relay a round per answer). A peek consumes
    /// nothing, but the kernel reports a socket's error once: one the peek meets is kept for the
    /// next read, so it can never turn a reset into a clean end.
    pub(crate) async fn read_probing(
        self: &Rc<Self>,
        buf: &mut Vec<u8>,
    ) -> io::Result<(usize, bool)> {
        if buf.capacity() == buf.len() {
            return Ok((0, false));
        }
        self.orphan_gone().await;
        if let Some(n) = self.take_leftover(buf) {
            return Ok((n, false));
        }
        if let Some(errno) = self.error.take() {
            return Err(io::Error::from_raw_os_error(errno));
        }
        if self.at_eof.get() {
            return Ok((0, true));
        }
        let mut owned = std::mem::take(buf);
        let (len, room) = (owned.len(), owned.capacity() - owned.len());
        // SAFETY: as in `recv`: the slot keeps `owned` alive and unmoved until the completion.
        let ptr = unsafe { owned.as_mut_ptr().add(len) };
        let read = opcode::Recv::new(types::Fd(self.fd), ptr, room.min(u32::MAX as usize) as u32)
            .build()
            .flags(squeue::Flags::IO_LINK);
        let read = Op::start(&self.driver, read, Keep::Read(owned, self.clone()));
        // Queued right behind the read, so the link joins these two.
        let peek = opcode::Recv::new(types::Fd(self.fd), self.peek.get().cast::<u8>(), 1)
            .flags(libc::MSG_PEEK | libc::MSG_DONTWAIT)
            .build();
        let peek = Op::start(&self.driver, peek, Keep::Peek(self.clone()));
        let (result, keep) = read.await;
        let Keep::Read(mut owned, _) = keep else {
            unreachable!("a read keeps its buffer");
        };
        if result >= 0 {
            // SAFETY: the kernel wrote `result` bytes into the spare capacity.
            unsafe { owned.set_len(len + result as usize) };
        }
        *buf = owned;
        let (peeked, _) = peek.await;
        if result < 0 {
            return Err(io::Error::from_raw_os_error(-result));
        }
        if result == 0 {
            self.at_eof.set(true);
            return Ok((0, true));
        }
        let eof_next = match peeked {
            0 => {
                self.at_eof.set(true);
                true
            }
            e if e < 0 && e != -libc::EAGAIN && e != -libc::ECANCELED => {
                self.error.set(Some(-e));
                false
            }
            _ => false,
        };
        Ok((result as usize, eof_next))
    }

    async fn recv(self: &Rc<Self>, buf: &mut Vec<u8>, flags: i32) -> io::Result<usize> {
        let mut owned = std::mem::take(buf);
        let (len, room) = (owned.len(), owned.capacity() - owned.len());
        // SAFETY: the pointer is into `owned`'s spare capacity, which the slot keeps alive
        // (and unmoved: a Vec's heap block does not move with the Vec) until the completion.
        let ptr = unsafe { owned.as_mut_ptr().add(len) };
        let entry = opcode::Recv::new(types::Fd(self.fd), ptr, room.min(u32::MAX as usize) as u32)
            .flags(flags)
            .build();
        let (result, keep) = Op::start(&self.driver, entry, Keep::Read(owned, self.clone())).await;
        let Keep::Read(mut owned, _) = keep else {
            unreachable!("a read keeps its buffer");
        };
        if result >= 0 {
            // SAFETY: the kernel wrote `result` bytes into the spare capacity.
            unsafe { owned.set_len(len + result as usize) };
        }
        *buf = owned;
        if result == 0 {
            self.at_eof.set(true);
        }
        if result < 0 {
            return Err(io::Error::from_raw_os_error(-result));
        }
        Ok(result as usize)
    }

    /// Sends all of `buf` with `flags` (plus `MSG_NOSIGNAL`); `buf` comes back unchanged.
    pub(crate) async fn send_all(self: &Rc<Self>, buf: &mut Vec<u8>, flags: i32) -> io::Result<()> {
        let mut owned = std::mem::take(buf);
        let mut sent = 0;
        let outcome = loop {
            if sent == owned.len() {
                break Ok(());
            }
            // SAFETY: the slot keeps `owned` alive and unmoved until the completion.
            let ptr = unsafe { owned.as_ptr().add(sent) };
            let len = (owned.len() - sent).min(u32::MAX as usize) as u32;
            let entry = opcode::Send::new(types::Fd(self.fd), ptr, len)
                .flags(flags | libc::MSG_NOSIGNAL)
                .build();
            let (result, keep) =
                Op::start(&self.driver, entry, Keep::Send(owned, self.clone())).await;
            let Keep::Send(back, _) = keep else {
                unreachable!("a send keeps its buffer");
            };
            owned = back;
            match result {
                0 => break Err(io::ErrorKind::WriteZero.into()),
                n if n > 0 => sent += n as usize,
                e => break Err(io::Error::from_raw_os_error(-e)),
            }
        };
        *buf = owned;
        outcome
    }

    /// Closes the socket through the ring (after cancelling operations it still has in flight:
    /// a pending operation holds the socket open, so close alone would leave it forever).
    pub(crate) fn close(&self) {
        if self.closed.replace(true) {
            return;
        }
        if !self.driver.collecting() {
            // SAFETY: the descriptor is ours and closed once.
            unsafe { libc::close(self.fd) };
            return;
        }
        let ring = ring_of(&self.driver);
        if self.orphans.get() > 0 {
            let cancel =
                opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(self.fd)).all())
                    .build()
                    .flags(squeue::Flags::IO_HARDLINK);
            ring.fire_and_forget(cancel);
        }
        ring.fire_and_forget(opcode::Close::new(types::Fd(self.fd)).build());
    }
}

impl Socket {
    /// Sends `buf` and closes the socket, as one chain queued at once: `send(MSG_MORE |
    /// MSG_WAITALL)` hard-linked to `close`. The close merges the FIN into the send's corked
    /// last segment (one packet for data and end-of-file, as `shutdown` after `MSG_MORE` does),
    /// and the task that answered is done without waiting a round for the send's completion
    /// or making a `shutdown(2)`. What the send did is not reported: for a closing response
    /// nothing would be done differently. The buffer is freed when the close completes (a chain
    /// runs in order, so the send is over by then).
    pub(crate) fn send_and_close(&self, buf: Vec<u8>) {
        if !self.driver.collecting() || self.orphans.get() > 0 || self.closed.get() {
            // Not the common case: no ring to chain on, or operations to cancel first.
            self.close();
            return;
        }
        self.closed.set(true);
        let ring = ring_of(&self.driver);
        let send = opcode::Send::new(types::Fd(self.fd), buf.as_ptr(), buf.len() as u32)
            .flags(libc::MSG_MORE | libc::MSG_WAITALL | libc::MSG_NOSIGNAL)
            .build()
            .user_data(IGNORE)
            .flags(squeue::Flags::IO_HARDLINK | squeue::Flags::SKIP_SUCCESS);
        ring.push(send);
        let close = opcode::Close::new(types::Fd(self.fd)).build();
        ring.start(close, Keep::Last { _buf: buf }, State::Orphaned(None));
    }

    /// Connects this (new) socket to `addr` through the ring: `Ok(())` once connected.
    pub(crate) async fn connect(self: &Rc<Self>, addr: &socket2::SockAddr) -> io::Result<()> {
        // SAFETY: an all-zero sockaddr_storage is a valid (unspecified) address.
        let zeroed = unsafe { std::mem::zeroed::<libc::sockaddr_storage>() };
        let mut storage = Box::new((zeroed, addr.len()));
        // SAFETY: `addr` holds `addr.len()` bytes of a valid socket address, which fit in the
        // storage.
        unsafe {
            std::ptr::copy_nonoverlapping(
                addr.as_ptr().cast::<u8>(),
                (&mut storage.0 as *mut libc::sockaddr_storage).cast::<u8>(),
                addr.len() as usize,
            );
        }
        let ptr = (&storage.0 as *const libc::sockaddr_storage).cast::<libc::sockaddr>();
        let entry = opcode::Connect::new(types::Fd(self.fd), ptr, storage.1).build();
        let keep = Keep::Connect {
            _addr: storage,
            socket: self.clone(),
        };
        let (result, _) = Op::start(&self.driver, entry, keep).await;
        if result < 0 {
            return Err(io::Error::from_raw_os_error(-result));
        }
        Ok(())
    }
}

/// A multishot accept on one listener: the kernel accepts on its own and queues each new
/// connection's descriptor for the loop to take. Dropping a wait for the next connection loses
/// nothing (the descriptors stay queued here).
pub(crate) struct Accepts {
    driver: Rc<Driver>,
    listener: RawFd,
    /// The multishot operation, while armed (or cancelled but not yet ended).
    op: Option<(usize, u32)>,
    /// Cancel was asked: do not re-arm.
    paused: bool,
}

impl Accepts {
    pub(crate) fn new(driver: Rc<Driver>, listener: &impl AsRawFd) -> Accepts {
        Accepts {
            driver,
            listener: listener.as_raw_fd(),
            op: None,
            paused: false,
        }
    }

    fn arm(&mut self) {
        let entry = opcode::AcceptMulti::new(types::Fd(self.listener))
            .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
            .build();
        let state = State::Multi {
            results: VecDeque::new(),
            ended: false,
            waker: None,
        };
        self.op = Some(ring_of(&self.driver).start(entry, Keep::Accepts, state));
    }

    /// The next accepted descriptor (or the error the kernel reported), arming the multishot
    /// accept if it is not.
    pub(crate) async fn next(&mut self) -> io::Result<RawFd> {
        self.paused = false;
        std::future::poll_fn(|cx| {
            if self.op.is_none() {
                self.arm();
            }
            let (key, _) = self.op.expect("armed");
            let ring = ring_of(&self.driver);
            let mut slots = ring.slots.borrow_mut();
            let State::Multi {
                results,
                ended,
                waker,
            } = &mut slots[key].state
            else {
                unreachable!("a multishot accept's slot");
            };
            if let Some(result) = results.pop_front() {
                return Poll::Ready(if result >= 0 {
                    Ok(result)
                } else {
                    Err(io::Error::from_raw_os_error(-result))
                });
            }
            if *ended {
                drop(slots);
                ring.release(key);
                self.op = None;
                // Re-armed on the next poll (an error ended it: the caller backs off first).
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            *waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Stops accepting until the next [`Accepts::next`] (at the connection cap): the kernel's
    /// backlog holds new clients meanwhile. Connections accepted before the cancel takes effect
    /// stay queued here.
    pub(crate) fn pause(&mut self) {
        if let Some((key, _)) = self.op {
            if !self.paused {
                self.paused = true;
                ring_of(&self.driver).fire_and_forget(opcode::AsyncCancel::new(key as u64).build());
            }
        }
    }

    /// Stops for good and returns the descriptors the kernel accepted for us before the cancel
    /// took effect: connected clients, owed an answer.
    pub(crate) async fn stop(&mut self) -> Vec<RawFd> {
        self.pause();
        let mut accepted = Vec::new();
        let Some((key, _)) = self.op else {
            return accepted;
        };
        std::future::poll_fn(|cx| {
            let ring = ring_of(&self.driver);
            let mut slots = ring.slots.borrow_mut();
            let State::Multi {
                results,
                ended,
                waker,
            } = &mut slots[key].state
            else {
                unreachable!("a multishot accept's slot");
            };
            accepted.extend(results.drain(..).filter(|&fd| fd >= 0));
            if *ended {
                return Poll::Ready(());
            }
            *waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        ring_of(&self.driver).release(key);
        self.op = None;
        accepted
    }
}

impl Drop for Accepts {
    fn drop(&mut self) {
        let Some((key, _)) = self.op.take() else {
            return;
        };
        let ring = ring_of(&self.driver);
        let mut slots = ring.slots.borrow_mut();
        let slot = &mut slots[key];
        let State::Multi { results, ended, .. } = &mut slot.state else {
            return;
        };
        for fd in results.drain(..).filter(|&fd| fd >= 0) {
            // SAFETY: accepted for us and never handed out.
            unsafe { libc::close(fd) };
        }
        if *ended {
            drop(slots);
            ring.release(key);
        } else {
            slot.state = State::Orphaned(None);
            drop(slots);
            if self.driver.collecting() {
                ring.fire_and_forget(opcode::AsyncCancel::new(key as u64).build());
            }
        }
    }
}
