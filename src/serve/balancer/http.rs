//! The balancer's HTTP mode (`--mode http`): each request head is parsed ([`crate::serve::h1`]),
//! sent to the backend the policy picks over an idle pooled HTTP/1.1 connection (or a new one),
//! and the response head parsed and passed on with the balancer's own `Connection` field; bodies
//! are relayed by their framing (`Content-Length` or chunked, streamed, never buffered whole), and
//! the backend connection goes back to the pool when its response is complete and reusable.
//!
//! Pool rules: only a `GET` or `HEAD` without a body is sent on a pooled connection, because only
//! those can be sent again when the pooled connection turns out to have been closed by its
//! backend before a response byte came (the retry goes on a fresh connection); other requests
//! always get a fresh connection. A broken response is a 502 (the backend counted as failing), a
//! backend that does not begin its response within `--response-timeout` a 504, and with no
//! backend reachable the client gets a 503. An abort of a body in flight is passed on as an abort
//! (a reset), as in the TCP mode.

use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::future;

use super::{Shared, connect_to, refuse_self_loop, reset_on_close};
use crate::io::conn::Conn;
use crate::io::deadline::{self, Deadline};
use crate::io::time;
use crate::serve::h1::{self, ChunkScanner, ClientConnection, Framing};

/// Serves one client connection: its requests in order, until it or the balancer closes it.
pub(super) async fn serve_client(client: Conn, shared: Rc<Shared>) {
    if !shared.loop_guard.is_empty() && refuse_self_loop(&client, &shared) {
        return;
    }
    let config = &shared.config;
    let mut s = Session {
        shared: &shared,
        input: Vec::with_capacity(config.max_head.max(16 * 1024)),
        head: Vec::with_capacity(2048),
        reply: Vec::with_capacity(16 * 1024),
        out: Vec::with_capacity(2048),
        order: Vec::with_capacity(config.backends.len()),
        // Nothing is shut down when it passes: the session sees it and answers (408) or closes.
        deadline: shared
            .deadlines
            .arm([client.fd(), -1], deadline::WAKE_ONLY, config.head_timeout),
        sent_continue: false,
    };
    let mut first = true;
    let end = loop {
        match s.exchange(&client, first).await {
            Next::KeepAlive => first = false,
            other => break other,
        }
    };
    // The deadline names the client's descriptor, which closing frees: it goes first.
    let Session {
        deadline, mut out, ..
    } = s;
    drop(deadline);
    match end {
        Next::Finish => {
            // The last response, its FIN in the same segment, and the close: one chain on io_uring.
            let _ = client.write_all_and_close(&mut out).await;
        }
        Next::Abort => reset_on_close(&client),
        Next::Close | Next::KeepAlive => {}
    }
}

/// What happens to the client connection after a request.
enum Next {
    /// It stays open for the next request.
    KeepAlive,
    /// `out` holds the last response: send it, with the FIN, and close.
    Finish,
    /// Close (everything owed was sent).
    Close,
    /// Reset: a response was cut off, and the client must not read a clean end.
    Abort,
}

/// One client connection's buffers and state.
struct Session<'a> {
    shared: &'a Shared,
    /// Bytes from the client not yet used (a pipelined request's may follow the current one).
    input: Vec<u8>,
    /// The request head rewritten for the backend, and request body bytes on their way.
    head: Vec<u8>,
    /// Bytes from the backend.
    reply: Vec<u8>,
    /// The response head rewritten for the client, and response body bytes on their way.
    out: Vec<u8>,
    /// The policy's ranking of the backends for the current request.
    order: Vec<usize>,
    /// The client's head timeout (and idle timeout while a body streams).
    deadline: Deadline,
    /// A `100 Continue` went to the client for the current request.
    sent_continue: bool,
}

/// How sending a request to a backend went.
enum Sent {
    /// The response head came (rewritten in `out`); `closing`: the client is closed after it.
    Answered(h1::Response, bool),
    /// The backend closed or reset before a response byte (a pooled connection it had closed).
    Unanswered,
    /// The backend's answer is unusable, or it went away mid-request: 502.
    Broken,
    /// No response began in time: 504.
    TimedOut,
    /// The client went away while its body was being sent.
    ClientGone,
    /// The client's request body was malformed (a bad chunk): 400.
    BadBody,
}

impl Session<'_> {
    /// Reads one request, has a backend answer it, and passes the answer on.
    async fn exchange(&mut self, client: &Conn, first: bool) -> Next {
        let shared = self.shared;
        self.deadline.extend();
        let req = match self.read_request(client, first).await {
            Ok(req) => req,
            Err(next) => return next,
        };
        shared.http.borrow_mut().requests += 1;
        if req.upgrade {
            return self.refuse(UPGRADE);
        }
        // The head is in `head`, rewritten: what stays in `input` is the body and what follows.
        self.input.drain(..req.head_len);
        self.sent_continue = false;
        if req.expect_continue && req.framing != Framing::Empty && self.input.is_empty() {
            // The client waits for this before sending its body (RFC 9110 §10.1.1).
            self.out.clear();
            self.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            if client.write_all(&mut self.out).await.is_err() {
                return Next::Close;
            }
            self.sent_continue = true;
        }
        // A GET or HEAD without a body can go on a pooled connection: it can be sent again.
        let reusable_request = req.retryable && req.framing == Framing::Empty;
        shared.chooser.order(&mut self.order);
        let all_down = shared.common.health.all_down();
        let mode = if !req.keep_alive || shared.stop.is_stopped() {
            ClientConnection::Close
        } else if req.http10 {
            ClientConnection::KeepHttp10
        } else {
            ClientConnection::Keep
        };
        let mut pos = 0;
        while pos < self.order.len() {
            let idx = self.order[pos];
            pos += 1;
            if !all_down && !shared.common.health.usable(idx) {
                continue;
            }
            let pooled = if reusable_request {
                shared.pool.take(idx)
            } else {
                None
            };
            let was_pooled = pooled.is_some();
            let backend = match pooled {
                Some(conn) => conn,
                None => match connect_to(shared, idx).await {
                    Some(conn) => conn,
                    None => continue,
                },
            };
            let _in_flight = shared.common.load.start(idx);
            shared.counters.borrow_mut()[idx].requests += 1;
            let mut backend = backend;
            let sending = std::time::Instant::now();
            let mut sent = self.send(client, &backend, &req, mode).await;
            if matches!(sent, Sent::Unanswered) && was_pooled {
                // The pooled connection had been closed by its backend: the request (a GET or
                // HEAD without a body, safe to repeat) goes again on a fresh connection.
                shared.http.borrow_mut().retried += 1;
                let Some(fresh) = connect_to(shared, idx).await else {
                    continue;
                };
                backend = fresh;
                sent = self.send(client, &backend, &req, mode).await;
            }
            {
                let mut http = shared.http.borrow_mut();
                if was_pooled {
                    http.pooled += 1;
                } else {
                    http.connected += 1;
                }
            }
            return match sent {
                Sent::Answered(resp, closing) => {
                    shared.response_latency.borrow_mut()[idx].record(sending.elapsed());
                    self.relay(client, backend, idx, resp, closing).await
                }
                Sent::ClientGone => {
                    reset_on_close(&backend);
                    Next::Close
                }
                Sent::BadBody => {
                    reset_on_close(&backend);
                    self.refuse(BAD_REQUEST)
                }
                Sent::Unanswered | Sent::Broken => {
                    reset_on_close(&backend);
                    self.backend_failed(idx);
                    shared.http.borrow_mut().bad_gateway += 1;
                    self.refuse(BAD_GATEWAY)
                }
                Sent::TimedOut => {
                    reset_on_close(&backend);
                    self.backend_failed(idx);
                    shared.http.borrow_mut().gateway_timeout += 1;
                    self.refuse(GATEWAY_TIMEOUT)
                }
            };
        }
        shared.unserved.set(shared.unserved.get() + 1);
        shared.http.borrow_mut().bad_gateway += 1;
        self.refuse(UNAVAILABLE)
    }

    /// Reads until `input` holds a complete request head (its rewritten form is then in `head`).
    /// A refused head is answered (400, 431, 417) and ends the connection; so does a head that
    /// does not complete within the head timeout (408 if part of it had come).
    async fn read_request(&mut self, client: &Conn, first: bool) -> Result<h1::Request, Next> {
        let shared = self.shared;
        let config = &shared.config;
        let host = config.backends[0].to_string();
        loop {
            match h1::parse_request(&self.input, config.max_head, &host, &mut self.head) {
                Ok(Some(req)) => return Ok(req),
                Ok(None) => {}
                Err(err) => {
                    shared.http.borrow_mut().requests += 1;
                    return Err(self.refuse(match err {
                        h1::RequestError::BadRequest => BAD_REQUEST,
                        h1::RequestError::TooLarge => TOO_LARGE,
                        h1::RequestError::ExpectationFailed => EXPECTATION_FAILED,
                    }));
                }
            }
            if self.input.len() == self.input.capacity() {
                self.input.reserve(4096);
            }
            let between_requests = self.input.is_empty() && !first;
            let (input, deadline) = (&mut self.input, &self.deadline);
            let read = async { Some(client.read(input).await) };
            let expired = async {
                deadline.expired().await;
                None
            };
            let stopping = async {
                if between_requests {
                    // A stopping balancer closes kept-alive clients between requests.
                    shared.stop.stopped().await;
                } else {
                    std::future::pending::<()>().await;
                }
                None
            };
            match future::or(read, future::or(expired, stopping)).await {
                Some(Ok(n)) if n > 0 => {}
                Some(_) => return Err(Next::Close),
                None if self.deadline.fired() && !self.input.is_empty() => {
                    return Err(self.refuse(REQUEST_TIMEOUT));
                }
                None => return Err(Next::Close),
            }
        }
    }

    /// Sends the request (its head is in `head`, its body comes from `input` and the client) to
    /// `backend`, then reads the response head.
    async fn send(
        &mut self,
        client: &Conn,
        backend: &Conn,
        req: &h1::Request,
        mode: ClientConnection,
    ) -> Sent {
        // The head and what of the body is already here, in one send.
        let mut body = Body::new(req.framing);
        let head_len = self.head.len();
        let Ok(n) = body.take(&self.input) else {
            return Sent::BadBody;
        };
        self.head.extend_from_slice(&self.input[..n]);
        let written = backend.write_all(&mut self.head).await;
        // The head stays (it may be sent again); the body bytes leave.
        self.head.truncate(head_len);
        if written.is_err() {
            return Sent::Unanswered;
        }
        self.input.drain(..n);
        // The rest of the body, as the client sends it; what follows it is the next request.
        while !body.done() {
            let (input, deadline) = (&mut self.input, &self.deadline);
            let read = async { Some(client.read(input).await) };
            let expired = async {
                deadline.expired().await;
                None
            };
            match future::or(read, expired).await {
                Some(Ok(n)) if n > 0 => {}
                _ => return Sent::ClientGone,
            }
            self.deadline.extend();
            let Ok(n) = body.take(&self.input) else {
                return Sent::BadBody;
            };
            self.out.clear();
            self.out.extend_from_slice(&self.input[..n]);
            self.input.drain(..n);
            if backend.write_all(&mut self.out).await.is_err() {
                return Sent::Broken;
            }
        }
        self.await_response(client, backend, req, mode).await
    }

    /// Reads the response head from `backend` within the response timeout, passing interim
    /// (1xx) responses on to an HTTP/1.1 client.
    async fn await_response(
        &mut self,
        client: &Conn,
        backend: &Conn,
        req: &h1::Request,
        mut mode: ClientConnection,
    ) -> Sent {
        let shared = self.shared;
        let config = &shared.config;
        self.reply.clear();
        let (reply, out, sent_continue) = (&mut self.reply, &mut self.out, self.sent_continue);
        let reading = async {
            loop {
                match h1::parse_response(reply, config.max_head, req.is_head, mode, out) {
                    // The balancer strips Upgrade: a switch of protocols is not an answer.
                    Ok(Some(resp)) if resp.status == 101 => return Sent::Broken,
                    Ok(Some(resp)) if (100..200).contains(&resp.status) => {
                        let len = resp.head_len;
                        let ours = resp.status == 100 && sent_continue;
                        if !req.http10 && !ours {
                            out.clear();
                            out.extend_from_slice(&reply[..len]);
                            if client.write_all(out).await.is_err() {
                                return Sent::ClientGone;
                            }
                        }
                        reply.drain(..len);
                    }
                    Ok(Some(resp))
                        if resp.framing == Framing::UntilClose
                            && mode != ClientConnection::Close =>
                    {
                        // A body that ends with the backend's close cannot be framed for a
                        // kept-alive client: the client is closed after it.
                        mode = ClientConnection::Close;
                    }
                    Ok(Some(resp)) => {
                        return Sent::Answered(resp, mode == ClientConnection::Close);
                    }
                    Ok(None) => {
                        if reply.len() == reply.capacity() {
                            reply.reserve(4096);
                        }
                        let had = reply.len();
                        match backend.read(reply).await {
                            Ok(0) | Err(_) if had == 0 => return Sent::Unanswered,
                            Ok(0) | Err(_) => return Sent::Broken,
                            Ok(_) => {}
                        }
                    }
                    Err(h1::ResponseError::Bad) => return Sent::Broken,
                }
            }
        };
        let timeout = async {
            time::sleep(config.response_timeout).await;
            Sent::TimedOut
        };
        future::or(reading, timeout).await
    }

    /// Passes the response on, its rewritten head (in `out`) and its body, then pools or closes
    /// the backend connection.
    async fn relay(
        &mut self,
        client: &Conn,
        backend: Conn,
        idx: usize,
        resp: h1::Response,
        closing: bool,
    ) -> Next {
        let mut body = Body::new(resp.framing);
        let start = resp.head_len;
        let Ok(n) = body.take(&self.reply[start..]) else {
            reset_on_close(&backend);
            self.backend_failed(idx);
            self.shared.http.borrow_mut().bad_gateway += 1;
            return self.refuse(BAD_GATEWAY);
        };
        self.out.extend_from_slice(&self.reply[start..start + n]);
        // Bytes past the response: the backend broke its framing; its connection is not reused.
        let mut trailing = self.reply.len() > start + n;
        if body.done() && closing {
            self.pool_or_close(backend, idx, &resp, trailing);
            // The whole response is here: sent with the FIN and the close as one.
            return Next::Finish;
        }
        if client.write_all(&mut self.out).await.is_err() {
            reset_on_close(&backend);
            return Next::Abort;
        }
        while !body.done() {
            self.reply.clear();
            match backend.read(&mut self.reply).await {
                Ok(0) if resp.framing == Framing::UntilClose => break,
                Ok(0) | Err(_) => {
                    // Cut off mid-body: the client must not read a clean end.
                    self.backend_failed(idx);
                    return Next::Abort;
                }
                Ok(_) => {}
            }
            let Ok(n) = body.take(&self.reply) else {
                reset_on_close(&backend);
                self.backend_failed(idx);
                return Next::Abort;
            };
            trailing |= self.reply.len() > n;
            self.reply.truncate(n);
            if client.write_all(&mut self.reply).await.is_err() {
                reset_on_close(&backend);
                return Next::Abort;
            }
        }
        if resp.framing != Framing::UntilClose {
            self.pool_or_close(backend, idx, &resp, trailing);
        }
        if closing {
            let _ = client.shutdown_write();
            Next::Close
        } else {
            Next::KeepAlive
        }
    }

    /// Gives a backend connection whose response is complete back to the pool, or closes it.
    fn pool_or_close(&self, backend: Conn, idx: usize, resp: &h1::Response, trailing: bool) {
        let shared = self.shared;
        if !resp.reusable || trailing || shared.stop.is_stopped() {
            return;
        }
        // A second short of the backend's own idle limit, so it is not caught closing.
        let mut keep = shared.config.pool_idle_timeout;
        if let Some(theirs) = resp.idle_timeout {
            keep = keep.min(theirs.saturating_sub(Duration::from_secs(1)));
        }
        if keep.is_zero() {
            return;
        }
        shared.pool.put(idx, backend, Instant::now() + keep);
    }

    fn backend_failed(&self, idx: usize) {
        self.shared.common.health.failure(
            idx,
            &std::io::Error::other("a broken or late HTTP response"),
        );
    }

    /// Puts one of the balancer's own responses in `out`, to be sent with a close.
    fn refuse(&mut self, response: &[u8]) -> Next {
        if response.starts_with(b"HTTP/1.1 4") || response.starts_with(b"HTTP/1.1 501") {
            self.shared.http.borrow_mut().refused += 1;
        }
        self.out.clear();
        self.out.extend_from_slice(response);
        Next::Finish
    }
}

/// Where a message body ends, as its bytes go by.
struct Body {
    framing: Framing,
    left: u64,
    chunks: ChunkScanner,
    done: bool,
}

impl Body {
    fn new(framing: Framing) -> Body {
        Body {
            framing,
            left: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            chunks: ChunkScanner::new(),
            done: matches!(framing, Framing::Empty | Framing::Length(0)),
        }
    }

    /// How many of `data`'s bytes belong to the body (all, or fewer where it ends).
    fn take(&mut self, data: &[u8]) -> Result<usize, ()> {
        if self.done {
            return Ok(0);
        }
        match self.framing {
            Framing::Empty => Ok(0),
            Framing::Length(_) => {
                let n = (data.len() as u64).min(self.left);
                self.left -= n;
                self.done = self.left == 0;
                Ok(n as usize)
            }
            Framing::Chunked => {
                let n = self.chunks.scan(data).map_err(|_| ())?;
                self.done = self.chunks.done();
                Ok(n)
            }
            Framing::UntilClose => Ok(data.len()),
        }
    }

    fn done(&self) -> bool {
        self.done
    }
}

/// The balancer's own responses; each closes the connection.
const BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 12\r\nConnection: close\r\n\r\nbad request\n";
const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 16\r\nConnection: close\r\n\r\nrequest timeout\n";
const EXPECTATION_FAILED: &[u8] = b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 19\r\nConnection: close\r\n\r\nexpectation failed\n";
const TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 23\r\nConnection: close\r\n\r\nrequest head too large\n";
const UPGRADE: &[u8] = b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 57\r\nConnection: close\r\n\r\nUpgrade is not spoken in --mode http; use --mode tcp for it\n";
const BAD_GATEWAY: &[u8] =
    b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 12\r\nConnection: close\r\n\r\nbad gateway\n";
const UNAVAILABLE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 20\r\nConnection: close\r\n\r\nno backend answered\n";
const GATEWAY_TIMEOUT: &[u8] = b"HTTP/1.1 504 Gateway Timeout\r\nContent-Length: 16\r\nConnection: close\r\n\r\ngateway timeout\n";
