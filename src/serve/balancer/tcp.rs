//! The balancer's TCP mode (the default, `--mode tcp`): each accepted connection is paired with
//! the next backend that accepts a connect, and bytes are relayed both ways, half-closes
//! included, until both sides are done. It never looks at the bytes, so any TCP protocol passes.
//! An abort on one side is passed on as an abort (a reset), never as a clean end.

use std::cell::{Cell, RefCell};
use std::future::{Future, poll_fn};
use std::io;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use super::{Shared, connect_next, refuse_self_loop, reset_on_close, unanswered};
use crate::io::conn::{self, Conn};
use crate::io::deadline::{self, Deadline};

/// Serves one client: connects it to a backend, relays, and with `retry_unanswered` replays its
/// first bytes to the next backend when one goes away without answering. Each backend is tried
/// at most once per client, so a client never waits on more than one round of the backends.
pub(super) async fn proxy(client: Conn, shared: Rc<Shared>) {
    if !shared.loop_guard.is_empty() && refuse_self_loop(&client, &shared) {
        return;
    }
    // The policy ranks the backends once per client; each is tried at most once.
    let mut order = Vec::with_capacity(shared.config.backends.len());
    shared.chooser.order(&mut order);
    let mut pos = 0;
    let replay = shared
        .config
        .retry_unanswered
        .map(|cap| RefCell::new(Replay::new(cap)));
    loop {
        // The client's first bytes are read while the backend connect is in flight (on io_uring
        // the read and the connect go out in one submission, a round saved). The relay takes the
        // read over as it stands: it never waits for the client to speak before relaying, so a
        // protocol whose server speaks first passes too.
        let buf = shared.buffers.take();
        let conn = &client;
        let mut reading = std::pin::pin!(async move {
            let mut buf = buf;
            let read = conn.read(&mut buf).await;
            (read, buf)
        });
        let mut read_early = None;
        let connected = {
            let mut connecting = std::pin::pin!(connect_next(&shared, &order, &mut pos));
            poll_fn(|cx| {
                if read_early.is_none() {
                    if let Poll::Ready(done) = reading.as_mut().poll(cx) {
                        read_early = Some(done);
                    }
                }
                connecting.as_mut().poll(cx)
            })
            .await
        };
        let Some((idx, server)) = connected else {
            // Dropping the client closes it at once: no backend means no hang.
            shared.unserved.set(shared.unserved.get() + 1);
            return;
        };
        // Counted on the backend while the pair lasts (least-conn and p2c read it).
        let _in_flight = shared.common.load.start(idx);
        let first = match read_early {
            Some((read, buf)) => First::Read(read, buf),
            None => First::Reading(reading),
        };
        if let Some(replay) = &replay {
            // A copy, so no borrow is held across the write (this is the rare replay path).
            let (mut bytes, client_done) = {
                let r = replay.borrow();
                (r.bytes.clone(), r.client_done)
            };
            if !bytes.is_empty() && server.write_all(&mut bytes).await.is_err() {
                unanswered(&shared, idx);
                continue;
            }
            if client_done {
                let _ = server.shutdown_write();
            }
        }
        shared.counters.borrow_mut()[idx].connections += 1;
        let end = relay(&client, server, &shared, replay.as_ref(), first).await;
        let mut counters = shared.counters.borrow_mut();
        counters[idx].bytes_up += end.up;
        counters[idx].bytes_down += end.down;
        match end.aborted {
            Some(Abort::Backend) => counters[idx].backend_resets += 1,
            Some(Abort::Client) => counters[idx].client_resets += 1,
            Some(Abort::Expired) | None => {}
        }
        drop(counters);
        if !end.unanswered {
            return;
        }
        unanswered(&shared, idx);
        let can_replay = replay.as_ref().is_some_and(|r| !r.borrow().overflowed);
        if !can_replay || pos >= order.len() {
            return;
        }
        shared.retried.set(shared.retried.get() + 1);
    }
}

/// What a client sent before its backend answered, kept for a replay.
struct Replay {
    bytes: Vec<u8>,
    cap: usize,
    /// More than `cap` bytes came before an answer: no replay is possible.
    overflowed: bool,
    /// The backend answered: the bytes are no longer needed.
    answered: bool,
    /// The client half-closed before the answer; a replay must half-close too.
    client_done: bool,
}

impl Replay {
    fn new(cap: usize) -> Replay {
        Replay {
            bytes: Vec::new(),
            cap,
            overflowed: false,
            answered: false,
            client_done: false,
        }
    }

    fn keep(&mut self, data: &[u8]) {
        if self.answered || self.overflowed {
            return;
        }
        if self.bytes.len() + data.len() > self.cap {
            self.overflowed = true;
            self.bytes = Vec::new();
        } else {
            self.bytes.extend_from_slice(data);
        }
    }

    fn may_retry(&self) -> bool {
        !self.answered && !self.overflowed
    }
}

/// How a relay ended.
struct RelayEnd {
    up: u64,
    down: u64,
    /// The backend closed or reset before sending a byte, and a replay is possible.
    unanswered: bool,
    /// Who aborted the pair, if anyone did; the other side was reset in turn.
    aborted: Option<Abort>,
}

/// Who ended a pair abnormally. An L4 proxy must pass an abort on as an abort: a reset from the
/// backend that reached the client as a clean close would make a cut-off response look complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Abort {
    /// The backend reset (or failed) before finishing its side.
    Backend,
    /// The client reset, or stopped taking the backend's bytes.
    Client,
    /// No bytes moved for the idle (or half-closed) timeout, or the drain deadline passed.
    Expired,
}

/// The client's first read, started while the backend connect was in flight: done, or still
/// going (then the relay goes on waiting for it, never for the client before relaying).
enum First<'a> {
    Read(io::Result<usize>, Vec<u8>),
    Reading(std::pin::Pin<&'a mut dyn Future<Output = (io::Result<usize>, Vec<u8>)>>),
}

/// What one direction's pump reports when it stops.
enum Flow {
    /// The sending side finished cleanly (its FIN was passed on).
    Done,
    /// The pair must end now, with a reset towards the side that did not abort.
    Aborted(Abort),
    /// The backend went away before answering and a replay is possible.
    Unanswered,
}

/// The state both pumps of a pair share.
struct Pair<'a> {
    client: &'a Conn,
    server: &'a Conn,
    deadline: Deadline,
    /// One direction has finished cleanly.
    one_ended: Cell<bool>,
    /// The deadline was shortened to `fin_timeout`.
    shortened: Cell<bool>,
    /// The shorter limit for a pair one side of which has finished.
    fin_timeout: Duration,
    /// Bytes relayed client → backend and backend → client, kept here rather than returned by
    /// the pumps so that a pump dropped by the other's abort still counts what it moved.
    up: Cell<u64>,
    down: Cell<u64>,
}

impl Pair<'_> {
    /// Records that a direction finished cleanly. Returns whether it was the first: the caller
    /// then half-closes the other socket; after the second, the close sends that FIN anyway.
    /// From here on the pair gets `fin_timeout`, as HAProxy's `timeout client-fin`/`server-fin`
    /// do: a peer that has finished and a peer that never will must not hold two descriptors
    /// for the whole idle timeout.
    fn finish_one(&self) -> bool {
        self.half_closed();
        !self.one_ended.replace(true)
    }

    /// Shortens the pair's limit to `fin_timeout` (once: later calls keep it).
    fn half_closed(&self) {
        if !self.shortened.replace(true) {
            self.deadline.rearm(self.fin_timeout);
        }
    }
}

/// Relays both directions until both have ended, until one side aborts (the other is then reset),
/// until the pair expires, or until the backend goes away unanswered while a replay is possible
/// (then the client is left open for the next backend).
async fn relay(
    client: &Conn,
    server: Conn,
    shared: &Shared,
    replay: Option<&RefCell<Replay>>,
    first: First<'_>,
) -> RelayEnd {
    let pair = Pair {
        client,
        server: &server,
        // Nothing is shut down when it passes: the relay wakes and resets both sides.
        deadline: shared.deadlines.arm(
            [client.fd(), server.fd()],
            deadline::WAKE_ONLY,
            shared.config.idle_timeout,
        ),
        one_ended: Cell::new(false),
        shortened: Cell::new(false),
        up: Cell::new(0),
        down: Cell::new(0),
        fin_timeout: shared.config.fin_timeout.min(shared.config.idle_timeout),
    };
    // The client's buffer comes with its first read.
    let mut up_buf = Vec::new();
    let mut down_buf = shared.buffers.take();
    let end = {
        let up = pump_up(&pair, &mut up_buf, replay, first);
        let down = pump_down(&pair, &mut down_buf, replay);
        settle(up, down, pair.deadline.expired()).await
    };
    let (up, down) = (pair.up.get(), pair.down.get());
    let end = RelayEnd {
        up,
        down: if end.unanswered { 0 } else { down },
        ..end
    };
    shared.buffers.give(up_buf);
    shared.buffers.give(down_buf);
    match end.aborted {
        // The client aborted: the backend is reset, not told the client finished.
        Some(Abort::Client) => reset_on_close(&server),
        Some(Abort::Backend) => reset_on_close(client),
        Some(Abort::Expired) => {
            reset_on_close(client);
            reset_on_close(&server);
        }
        None => {}
    }
    end
}

/// Waits for both pumps. An abort or an expired deadline ends the pair at once (dropping the
/// other pump mid-wait); an unanswered backend ends it at once too (dropping the client pump,
/// which never loses bytes: it keeps them for the replay before writing).
async fn settle(
    up: impl Future<Output = Flow>,
    down: impl Future<Output = Flow>,
    expired: impl Future<Output = ()>,
) -> RelayEnd {
    let mut up = std::pin::pin!(up);
    let mut down = std::pin::pin!(down);
    let mut expired = std::pin::pin!(expired);
    let (mut up_done, mut down_done) = (false, false);
    poll_fn(|cx| {
        let up_state = poll_pump(up.as_mut(), &mut up_done, cx);
        let down_state = poll_pump(down.as_mut(), &mut down_done, cx);
        let (aborted, unanswered) = match (up_state, down_state) {
            (Some(Flow::Aborted(who)), _) | (_, Some(Flow::Aborted(who))) => (Some(who), false),
            // Leave the client open for the replay; stop reading from it here.
            (_, Some(Flow::Unanswered)) => (None, true),
            _ => match (up_done, down_done) {
                (true, true) => (None, false),
                _ if expired.as_mut().poll(cx).is_ready() => (Some(Abort::Expired), false),
                _ => return Poll::Pending,
            },
        };
        // The byte counts are filled in by the caller, from the pair.
        Poll::Ready(RelayEnd {
            up: 0,
            down: 0,
            unanswered,
            aborted,
        })
    })
    .await
}

/// Polls one pump unless it already finished cleanly (`done`). Returns an abort or an
/// unanswered end, which end the pair.
fn poll_pump(
    pump: std::pin::Pin<&mut impl Future<Output = Flow>>,
    done: &mut bool,
    cx: &mut std::task::Context<'_>,
) -> Option<Flow> {
    if *done {
        return None;
    }
    match pump.poll(cx) {
        Poll::Pending => None,
        Poll::Ready(Flow::Done) => {
            *done = true;
            None
        }
        Poll::Ready(end) => {
            *done = true;
            Some(end)
        }
    }
}

/// Client → backend. Bytes are kept for a replay before they are written, so a backend dying
/// mid-write loses nothing. On the client's end it half-closes the backend (unless the other
/// direction already ended: the close that follows sends that FIN, for one syscall less).
///
/// A backend that stops reading (it answered and closed, say a 431 for a head too large, and its
/// close with our bytes unread came back as a reset) has not aborted its answer: that is still on
/// its way down. So the client's further bytes are read and dropped until the client finishes
/// (bounded by the pair's half-closed timeout), the way a server's lingering close does; closing
/// at once would reset the client and could destroy the answer before the client reads it.
async fn pump_up(
    pair: &Pair<'_>,
    buf: &mut Vec<u8>,
    replay: Option<&RefCell<Replay>>,
    first: First<'_>,
) -> Flow {
    let (from, to) = (pair.client, pair.server);
    let mut discarding = false;
    let mut first = Some(first);
    loop {
        let read = match first.take() {
            Some(First::Read(read, early)) => {
                *buf = early;
                read
            }
            Some(First::Reading(reading)) => {
                let (read, early) = reading.await;
                *buf = early;
                read
            }
            None => {
                buf.clear();
                from.read(buf).await
            }
        };
        match read {
            Ok(0) => {
                if let Some(r) = replay {
                    r.borrow_mut().client_done = true;
                }
                if pair.finish_one() && !discarding {
                    let _ = to.shutdown_write();
                }
                return Flow::Done;
            }
            Ok(_) => {}
            Err(_) => return Flow::Aborted(Abort::Client),
        }
        if discarding {
            continue;
        }
        pair.deadline.extend();
        let retrying = replay.is_some_and(|r| {
            let mut r = r.borrow_mut();
            r.keep(buf);
            r.may_retry()
        });
        if to.write_all(buf).await.is_err() {
            if retrying {
                // Only the backend's side: the client stays open for the replay, and the
                // backend pump sees the end and reports it unanswered.
                let _ = conn::shutdown(to.fd(), libc::SHUT_RDWR);
                return Flow::Done;
            }
            // The backend's receiving side is gone; its answer may still be coming down. The
            // half-closed timeout now bounds the lingering, and reading no longer extends it.
            discarding = true;
            pair.half_closed();
            continue;
        }
        pair.up.set(pair.up.get() + buf.len() as u64);
    }
}

/// Backend → client. A backend that ends before its first byte while a replay is possible is
/// reported unanswered instead of passing the end on to the client; a backend that resets is
/// an abort, passed on to the client as a reset.
async fn pump_down(pair: &Pair<'_>, buf: &mut Vec<u8>, replay: Option<&RefCell<Replay>>) -> Flow {
    let (from, to) = (pair.server, pair.client);
    loop {
        buf.clear();
        // Whether the backend's FIN is queued behind the answer comes with the read: passing
        // both on together puts them in one segment to the client.
        let read = from.read_probing(buf).await;
        let end = matches!(read, Ok((n, true)) if n > 0);
        let read = read.map(|(n, _)| n);
        // Unanswered means the backend went away first: a backend that closes after the client
        // has finished sending (a connect-and-close probe, a half-closed request it refused)
        // ended a complete exchange, and is not replayed.
        if pair.down.get() == 0
            && matches!(read, Ok(0) | Err(_))
            && replay.is_some_and(|r| {
                let r = r.borrow();
                r.may_retry() && !r.client_done
            })
        {
            return Flow::Unanswered;
        }
        match read {
            Ok(0) => {
                if pair.finish_one() {
                    let _ = to.shutdown_write();
                }
                return Flow::Done;
            }
            Ok(_) => {}
            Err(_) => return Flow::Aborted(Abort::Backend),
        }
        if pair.down.get() == 0 {
            if let Some(r) = replay {
                let mut r = r.borrow_mut();
                r.answered = true;
                r.bytes = Vec::new();
            }
        }
        pair.deadline.extend();
        let written = if end && pair.finish_one() {
            to.write_all_and_finish(buf).await
        } else {
            to.write_all(buf).await
        };
        if written.is_err() {
            // The client is gone mid-answer: the backend learns it by a reset, as it would
            // have directly.
            return Flow::Aborted(Abort::Client);
        }
        pair.down.set(pair.down.get() + buf.len() as u64);
        if end {
            return Flow::Done;
        }
    }
}
