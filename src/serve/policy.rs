//! Which backend the balancer tries first, in both modes (a new connection in TCP mode, a request
//! in HTTP mode): smooth weighted round robin (the default), least outstanding, or the power of
//! two random choices. The balancer tries the candidates in the order given, skipping backends
//! out of rotation, so a policy only has to rank.
//!
//! Outstanding work is counted over all the balancer's executors (one atomic add and subtract
//! per connection or request): least-conn and p2c see the whole balancer's load on a backend, not
//! one core's share of it.
//!
//! Ties in load go to the backend that has answered fastest lately. Without that, a backend with
//! nothing in flight ties with the idle fast ones however slow it is, so below the rate where
//! the fast ones stay busy it is sent one request every time it finishes one: with a 20 ms
//! backend, 50 requests a second, 1.25% of 4000 — p99 at 20 ms whatever the policy (measured:
//! `results/20261129-194556-slow-backend-rates/`). Each backend keeps a peak-sensitive moving
//! average of how long its work took (a slower one is taken at once, a faster one moves the
//! average an eighth of the way), decaying towards zero over a second of no news, so a backend
//! that recovered is tried again (Finagle's and Linkerd's peak EWMA, used here only to break
//! ties).

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How fast a backend's response-time average forgets when nothing new is learned.
const DECAY: Duration = Duration::from_secs(1);

/// How many times faster a backend must have been lately to win a tie in load.
const CLEARLY_FASTER: f64 = 2.0;

/// How the first backend to try is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Each backend in turn, as often as its weight (nginx's smooth weighted round robin).
    #[default]
    RoundRobin,
    /// The backend with the fewest connections or requests in flight per unit of weight; ties
    /// to the one answering fastest lately.
    LeastConn,
    /// Two backends at random (weighted), the less loaded of the two (Mitzenmacher's power of
    /// two choices: nearly least-conn's balance without looking at every backend); ties to the
    /// one answering fastest lately.
    P2c,
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Policy::RoundRobin => "round-robin",
            Policy::LeastConn => "least-conn",
            Policy::P2c => "p2c",
        })
    }
}

/// Work in flight per backend, and how long it took lately, shared by a balancer's executors.
#[derive(Debug)]
pub struct Load {
    outstanding: Vec<AtomicU32>,
    /// Peak-sensitive moving average of each backend's work time, in ns, as of `updated`.
    average_ns: Vec<AtomicU64>,
    /// When `average_ns` was last set, in ns after `epoch`.
    updated_ns: Vec<AtomicU64>,
    epoch: Instant,
    /// Whether work is timed at all: round robin never reads the averages, so it skips the
    /// clock read and the shared stores per connection or request.
    timed: bool,
}

impl Load {
    /// Counters for `n` backends, all idle, for a balancer choosing by `policy`.
    pub fn for_policy(n: usize, policy: Policy) -> Arc<Load> {
        Load::with_timing(n, policy != Policy::RoundRobin)
    }

    /// Counters for `n` backends, all idle, timing the work.
    pub fn new(n: usize) -> Arc<Load> {
        Load::with_timing(n, true)
    }

    fn with_timing(n: usize, timed: bool) -> Arc<Load> {
        Arc::new(Load {
            outstanding: (0..n).map(|_| AtomicU32::new(0)).collect(),
            average_ns: (0..n).map(|_| AtomicU64::new(0)).collect(),
            updated_ns: (0..n).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
            timed,
        })
    }

    /// Counts one connection or request on backend `i` until the returned guard drops; the
    /// time until then feeds the backend's average.
    pub fn start(self: &Arc<Self>, i: usize) -> InFlight {
        self.outstanding[i].fetch_add(1, Ordering::Relaxed);
        InFlight {
            load: self.clone(),
            backend: i,
            started: self.timed.then(Instant::now),
        }
    }

    fn of(&self, i: usize) -> u32 {
        self.outstanding[i].load(Ordering::Relaxed)
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Backend `i`'s average work time now, in ns: the stored average, decayed by the time
    /// since it was stored.
    fn average(&self, i: usize, now_ns: u64) -> f64 {
        let average = self.average_ns[i].load(Ordering::Relaxed) as f64;
        if average == 0.0 {
            return 0.0;
        }
        let age = now_ns.saturating_sub(self.updated_ns[i].load(Ordering::Relaxed)) as f64;
        average * (-age / DECAY.as_nanos() as f64).exp()
    }

    /// Feeds one finished piece of work into backend `i`'s average. Two executors updating
    /// at once may lose one sample; it is a tie-breaker, so no lock is worth it.
    fn observe(&self, i: usize, took: Duration) {
        let now = self.now_ns();
        let previous = self.average(i, now);
        let sample = took.as_nanos() as f64;
        let next = if sample > previous {
            sample
        } else {
            previous + (sample - previous) / 8.0
        };
        self.average_ns[i].store(next.max(1.0) as u64, Ordering::Relaxed);
        self.updated_ns[i].store(now, Ordering::Relaxed);
    }
}

/// One connection or request in flight on a backend.
#[derive(Debug)]
pub struct InFlight {
    load: Arc<Load>,
    backend: usize,
    started: Option<Instant>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.load.outstanding[self.backend].fetch_sub(1, Ordering::Relaxed);
        if let Some(started) = self.started {
            self.load.observe(self.backend, started.elapsed());
        }
    }
}

/// One executor's chooser.
#[derive(Debug)]
pub struct Chooser {
    policy: Policy,
    weights: Vec<u32>,
    load: Arc<Load>,
    /// Smooth weighted round robin's current weights.
    current: RefCell<Vec<i64>>,
    /// For p2c's two picks.
    rng: crate::rng::Rng,
    /// Where ties and fallbacks start, moved on each choice.
    turn: Cell<usize>,
}

impl Chooser {
    /// A chooser over backends with these weights (each at least 1).
    pub fn new(policy: Policy, weights: Vec<u32>, load: Arc<Load>, seed: u64) -> Chooser {
        let n = weights.len();
        Chooser {
            policy,
            weights: weights.into_iter().map(|w| w.max(1)).collect(),
            load,
            current: RefCell::new(vec![0; n]),
            rng: crate::rng::Rng::new(seed | 1),
            turn: Cell::new(0),
        }
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Fills `order` with every backend, the one to try first at the front and the others after
    /// it in rotation order (the fallbacks when it is out of rotation or refuses).
    pub fn order(&self, order: &mut Vec<usize>) {
        let n = self.weights.len();
        order.clear();
        if n == 0 {
            return;
        }
        let first = match self.policy {
            Policy::RoundRobin => self.smooth_round_robin(),
            Policy::LeastConn => self.least_loaded(),
            Policy::P2c => self.two_choices(),
        };
        order.extend((0..n).map(|k| (first + k) % n));
    }

    fn smooth_round_robin(&self) -> usize {
        let mut current = self.current.borrow_mut();
        let total: i64 = self.weights.iter().map(|&w| i64::from(w)).sum();
        let mut best = 0;
        for (i, c) in current.iter_mut().enumerate() {
            *c += i64::from(self.weights[i]);
        }
        for i in 1..current.len() {
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        best
    }

    /// Compares backends `a` and `b` by load per unit of weight, then by how fast they have
    /// answered lately: whether `a` is the better choice.
    fn lighter(&self, a: usize, b: usize) -> bool {
        let (la, lb) = (u64::from(self.load.of(a)), u64::from(self.load.of(b)));
        let (wa, wb) = (
            la * u64::from(self.weights[b]),
            lb * u64::from(self.weights[a]),
        );
        if wa != wb {
            return wa < wb;
        }
        // Only a clearly faster backend wins a tie: among alike ones, ties keep going round,
        // so equal backends share the load instead of the one a hair faster taking it all.
        let now = self.load.now_ns();
        self.load.average(a, now) * CLEARLY_FASTER < self.load.average(b, now)
    }

    fn least_loaded(&self) -> usize {
        let n = self.weights.len();
        // Ties go round: the scan starts one further each time.
        let start = self.turn.get() % n;
        self.turn.set(start + 1);
        let mut best = start;
        for k in 1..n {
            let i = (start + k) % n;
            if self.lighter(i, best) {
                best = i;
            }
        }
        best
    }

    fn two_choices(&self) -> usize {
        let n = self.weights.len();
        if n == 1 {
            return 0;
        }
        let a = self.weighted_pick(None);
        let b = self.weighted_pick(Some(a));
        if self.lighter(b, a) { b } else { a }
    }

    /// A backend drawn with probability proportional to its weight, other than `not`.
    fn weighted_pick(&self, not: Option<usize>) -> usize {
        let total: u64 = self
            .weights
            .iter()
            .enumerate()
            .filter(|&(i, _)| Some(i) != not)
            .map(|(_, &w)| u64::from(w))
            .sum();
        let mut r = self.next_random() % total.max(1);
        for (i, &w) in self.weights.iter().enumerate() {
            if Some(i) == not {
                continue;
            }
            if r < u64::from(w) {
                return i;
            }
            r -= u64::from(w);
        }
        self.weights.len() - 1
    }

    fn next_random(&self) -> u64 {
        self.rng.next_u64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn firsts(chooser: &Chooser, k: usize) -> Vec<usize> {
        let mut order = Vec::new();
        (0..k)
            .map(|_| {
                chooser.order(&mut order);
                order[0]
            })
            .collect()
    }

    #[test]
    fn round_robin_rotates_and_honours_weights() {
        let load = Load::new(4);
        let plain = Chooser::new(Policy::RoundRobin, vec![1; 4], load.clone(), 1);
        assert_eq!(firsts(&plain, 5), [0, 1, 2, 3, 0]);
        let weighted = Chooser::new(Policy::RoundRobin, vec![3, 1], Load::new(2), 1);
        let picks = firsts(&weighted, 8);
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 6, "{picks:?}");
        // Smooth: the heavy backend's turns are spread out, not three in a row each cycle.
        assert_eq!(&picks[..4], &[0, 0, 1, 0]);
    }

    #[test]
    fn least_conn_and_p2c_avoid_the_loaded_backend() {
        let load = Load::new(4);
        let busy: Vec<InFlight> = (0..10).map(|_| load.start(2)).collect();
        let least = Chooser::new(Policy::LeastConn, vec![1; 4], load.clone(), 1);
        assert!(!firsts(&least, 40).contains(&2));
        let p2c = Chooser::new(Policy::P2c, vec![1; 4], load.clone(), 7);
        // p2c picks the busy one only when both draws hit it, which they cannot (distinct).
        assert!(!firsts(&p2c, 200).contains(&2));
        drop(busy);
        // Free again, it is chosen once the others are busier.
        let others: Vec<InFlight> = [0, 1, 3].iter().map(|&i| load.start(i)).collect();
        assert_eq!(firsts(&least, 8), [2; 8]);
        drop(others);
    }

    #[test]
    fn ties_go_to_the_backend_answering_fastest_and_a_slow_one_is_forgiven_in_time() {
        let load = Load::new(4);
        for i in 0..3 {
            load.observe(i, Duration::from_micros(100));
        }
        load.observe(3, Duration::from_millis(20));
        // All idle: least-conn and p2c never pick the slow one while a fast one ties with it.
        let least = Chooser::new(Policy::LeastConn, vec![1; 4], load.clone(), 1);
        let picks = firsts(&least, 30);
        assert!(!picks.contains(&3), "{picks:?}");
        // The fast ones still take turns among themselves.
        assert!((0..3).all(|i| picks.contains(&i)), "{picks:?}");
        let p2c = Chooser::new(Policy::P2c, vec![1; 4], load.clone(), 7);
        assert!(!firsts(&p2c, 200).contains(&3));
        // Load still comes first: with the fast ones busy, the slow one is used.
        let busy: Vec<InFlight> = (0..3).map(|i| load.start(i)).collect();
        assert_eq!(firsts(&least, 4), [3; 4]);
        drop(busy);
        // A peak is taken at once; a faster sample moves the average an eighth of the way.
        let now = load.now_ns();
        assert!((load.average(3, now) - 20e6).abs() < 0.01 * 20e6);
        load.observe(3, Duration::from_millis(4));
        assert!((load.average(3, load.now_ns()) - 18e6).abs() < 0.01 * 18e6);
        // Seconds without news decay it below the fast ones' average: tried again.
        let later = load.now_ns() + 10 * DECAY.as_nanos() as u64;
        assert!(load.average(3, later) < load.average(0, load.now_ns()));
    }

    #[test]
    fn the_order_lists_every_backend_once_first_choice_first() {
        let chooser = Chooser::new(Policy::P2c, vec![1, 2, 3], Load::new(3), 3);
        let mut order = Vec::new();
        for _ in 0..20 {
            chooser.order(&mut order);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, [0, 1, 2]);
        }
    }
}
