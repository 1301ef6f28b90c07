//! Backend health for the balancer: passive (a run of failed connects takes a backend out of
//! rotation for a cool-down, after which one connection tries it again) and optionally active (a
//! periodic TCP connect probe). Shared by all balancer executors, so a backend that one core saw
//! fail is skipped by all, and each state change is logged once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How failures turn into a backend being skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Consecutive failed connects that take a backend out of rotation.
    pub fail_threshold: u32,
    /// How long a backend stays out before one connection tries it again.
    pub cooldown: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            fail_threshold: 3,
            cooldown: Duration::from_secs(2),
        }
    }
}

/// The shared health table.
#[derive(Debug)]
pub struct Health {
    policy: HealthPolicy,
    epoch: Instant,
    backends: Vec<BackendHealth>,
    log: bool,
}

#[derive(Debug)]
struct BackendHealth {
    addr: SocketAddr,
    consecutive_failures: AtomicU32,
    /// Milliseconds after `epoch` until which the backend is skipped; 0 when in rotation.
    down_until_ms: AtomicU64,
    down: AtomicBool,
    transitions: AtomicU64,
}

impl Health {
    /// A table for `backends`, all in rotation. `log` prints state changes to stderr.
    pub fn new(backends: &[SocketAddr], policy: HealthPolicy, log: bool) -> Health {
        Health {
            policy,
            epoch: Instant::now(),
            backends: backends
                .iter()
                .map(|&addr| BackendHealth {
                    addr,
                    consecutive_failures: AtomicU32::new(0),
                    down_until_ms: AtomicU64::new(0),
                    down: AtomicBool::new(false),
                    transitions: AtomicU64::new(0),
                })
                .collect(),
            log,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether a connection may be sent to backend `i` now: in rotation, or out but past its
    /// cool-down (then this connection is its trial).
    pub fn usable(&self, i: usize) -> bool {
        let b = &self.backends[i];
        !b.down.load(Ordering::Relaxed) || self.now_ms() >= b.down_until_ms.load(Ordering::Relaxed)
    }

    /// Whether every backend is out of rotation and still cooling down.
    pub fn all_down(&self) -> bool {
        (0..self.backends.len()).all(|i| !self.usable(i))
    }

    /// Records a successful connect (or probe).
    pub fn success(&self, i: usize) {
        let b = &self.backends[i];
        b.consecutive_failures.store(0, Ordering::Relaxed);
        if b.down.swap(false, Ordering::AcqRel) {
            b.down_until_ms.store(0, Ordering::Relaxed);
            b.transitions.fetch_add(1, Ordering::Relaxed);
            if self.log {
                eprintln!("ringlab lb: backend {} is up again", b.addr);
            }
        }
    }

    /// Records a failed connect (or probe); `why` is logged on the change to down.
    pub fn failure(&self, i: usize, why: &dyn std::fmt::Display) {
        let b = &self.backends[i];
        let failures = b.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < self.policy.fail_threshold {
            return;
        }
        // Out of rotation (again, if this was the trial after a cool-down).
        let until = self.now_ms() + self.policy.cooldown.as_millis() as u64;
        b.down_until_ms.store(until, Ordering::Relaxed);
        if !b.down.swap(true, Ordering::AcqRel) {
            b.transitions.fetch_add(1, Ordering::Relaxed);
            if self.log {
                eprintln!(
                    "ringlab lb: backend {} is down after {failures} failed connects ({why}); \
                     retrying every {:?}",
                    b.addr, self.policy.cooldown
                );
            }
        }
    }

    /// Whether backend `i` is out of rotation.
    pub fn is_down(&self, i: usize) -> bool {
        self.backends[i].down.load(Ordering::Relaxed)
    }

    /// State changes of backend `i` so far (down and up again count one each).
    pub fn transitions(&self, i: usize) -> u64 {
        self.backends[i].transitions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], 9000 + p)))
            .collect()
    }

    #[test]
    fn a_run_of_failures_takes_a_backend_out_and_a_success_brings_it_back() {
        let policy = HealthPolicy {
            fail_threshold: 2,
            cooldown: Duration::from_millis(50),
        };
        let h = Health::new(&addrs(2), policy, false);
        h.failure(0, &"refused");
        assert!(h.usable(0) && !h.is_down(0));
        h.failure(0, &"refused");
        assert!(h.is_down(0) && !h.usable(0));
        assert!(h.usable(1) && !h.all_down());
        std::thread::sleep(Duration::from_millis(60));
        // Past the cool-down: usable for one trial, still reported down until it succeeds.
        assert!(h.usable(0) && h.is_down(0));
        h.success(0);
        assert!(!h.is_down(0));
        assert_eq!(h.transitions(0), 2);
    }

    #[test]
    fn a_failed_trial_restarts_the_cooldown() {
        let policy = HealthPolicy {
            fail_threshold: 1,
            cooldown: Duration::from_millis(40),
        };
        let h = Health::new(&addrs(1), policy, false);
        h.failure(0, &"refused");
        assert!(h.all_down());
        std::thread::sleep(Duration::from_millis(50));
        assert!(h.usable(0));
        h.failure(0, &"refused");
        assert!(!h.usable(0));
        assert_eq!(h.transitions(0), 1);
    }
}
