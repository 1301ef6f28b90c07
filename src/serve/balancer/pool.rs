//! Idle keep-alive connections to the backends, one pool per executor (no locks): taken most
//! recently used first (a connection just used is the least likely to have been closed by its
//! backend since), bounded per backend, and closed once past their idle time — the balancer's
//! own `--pool-idle-timeout`, or sooner when the backend's `Keep-Alive: timeout` says so.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::Shared;
use crate::io::conn::Conn;
use crate::io::shutdown::LocalStop;
use crate::io::time;

/// One executor's idle backend connections.
pub(super) struct Pool {
    idle: RefCell<Vec<VecDeque<Idle>>>,
    size: usize,
}

struct Idle {
    conn: Conn,
    /// When it stops being worth reusing.
    until: Instant,
}

impl Pool {
    /// An empty pool for `backends` backends, keeping at most `size` idle connections each.
    pub(super) fn new(backends: usize, size: usize) -> Pool {
        Pool {
            idle: RefCell::new((0..backends).map(|_| VecDeque::new()).collect()),
            size,
        }
    }

    /// The most recently used live idle connection to backend `i`, if any.
    pub(super) fn take(&self, i: usize) -> Option<Conn> {
        let now = Instant::now();
        let mut idle = self.idle.borrow_mut();
        while let Some(entry) = idle[i].pop_back() {
            if entry.until > now {
                return Some(entry.conn);
            }
            // Past its time: closed here (dropping it), and all older ones are too.
            idle[i].clear();
        }
        None
    }

    /// Keeps `conn` to backend `i` for reuse until `until`; the oldest goes when the pool is
    /// full.
    pub(super) fn put(&self, i: usize, conn: Conn, until: Instant) {
        if self.size == 0 {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        if idle[i].len() >= self.size {
            idle[i].pop_front();
        }
        idle[i].push_back(Idle { conn, until });
    }

    /// Closes every idle connection (the balancer is stopping).
    pub(super) fn clear(&self) {
        let all: Vec<VecDeque<Idle>> = self
            .idle
            .borrow_mut()
            .iter_mut()
            .map(std::mem::take)
            .collect();
        drop(all);
    }

    /// Closes the idle connections past their time.
    fn prune(&self, now: Instant) {
        let mut idle = self.idle.borrow_mut();
        for list in idle.iter_mut() {
            // Oldest first: entries are in the order they were put back.
            while list.front().is_some_and(|e| e.until <= now) {
                list.pop_front();
            }
        }
    }
}

/// Closes expired idle connections once a second until `stop`, so a backend does not keep
/// sockets open for connections nobody will use.
pub(super) async fn prune(shared: Rc<Shared>, stop: LocalStop) {
    while !stop.is_stopped() {
        let stopped = async {
            stop.stopped().await;
        };
        futures_lite::future::or(time::sleep(Duration::from_secs(1)), stopped).await;
        shared.pool.prune(Instant::now());
    }
}
