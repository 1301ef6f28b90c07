//! The open-loop schedule behind `ringlab bench --rate`: when each request is meant to be sent,
//! independent of when earlier ones were answered. Latency is then measured from that intended
//! time, so a server stall is charged to every request it held up (coordinated omission
//! corrected, as wrk2 and HdrHistogram's authors define it).

use std::cell::Cell;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// How intended send times are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Arrival {
    /// Evenly, 1/rate apart (wrk2's schedule).
    Fixed,
    /// Exponential gaps with mean 1/rate: a Poisson process, as independent users arrive.
    Poisson,
}

impl std::fmt::Display for Arrival {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Arrival::Fixed => "fixed intervals",
            Arrival::Poisson => "Poisson arrivals",
        })
    }
}

/// One executor's share of the schedule. Executors pace independently (no shared counter on
/// the send path); their rates add up to the offered rate and their fixed schedules are
/// staggered so the sends interleave.
pub struct Pacer {
    start: Instant,
    /// Seconds between slots on average.
    gap: f64,
    /// Seconds after `start` of the first slot.
    phase: f64,
    arrival: Arrival,
    /// Slots handed out so far.
    taken: Cell<u64>,
    /// Seconds after `start` of the next Poisson slot.
    poisson_at: Cell<f64>,
    rng: Rng,
    /// How late a timer wake-up arrives here, tracked as a running median: the pacer arms its
    /// timer that much early and yields the last microseconds away, so sends land on time.
    wake_late: Cell<Duration>,
    /// Time spent yielding away the last microseconds before slots: CPU the pacer burns on
    /// precision, not on requests, so it is left out of the client's busy share.
    spun: Cell<Duration>,
}

/// The most the pacer wakes early, so a burst of slow wake-ups cannot make it spin for long.
const MAX_EARLY: Duration = Duration::from_micros(200);

/// How far one wake-up moves the running median.
const EARLY_STEP: Duration = Duration::from_micros(1);

impl Pacer {
    /// A schedule of `rate` requests per second from `start + phase`.
    pub fn new(start: Instant, rate: f64, phase: Duration, arrival: Arrival, seed: u64) -> Pacer {
        let rng = Rng::new(seed);
        let gap = 1.0 / rate;
        let first = match arrival {
            Arrival::Fixed => phase.as_secs_f64(),
            Arrival::Poisson => rng.exponential(gap),
        };
        Pacer {
            start,
            gap,
            phase: phase.as_secs_f64(),
            arrival,
            taken: Cell::new(0),
            poisson_at: Cell::new(first),
            rng,
            wake_late: Cell::new(Duration::ZERO),
            spun: Cell::new(Duration::ZERO),
        }
    }

    /// When to arm the timer for a slot at `intended`.
    pub fn wake_at(&self, intended: Instant) -> Instant {
        intended
            .checked_sub(self.wake_late.get())
            .unwrap_or(intended)
    }

    /// Adds time spent yielding before a slot.
    pub fn spun(&self, d: Duration) {
        self.spun.set(self.spun.get() + d);
    }

    /// All the time spent yielding before slots.
    pub fn total_spun(&self) -> Duration {
        self.spun.get()
    }

    /// Feeds back how late a timer armed for `armed` woke: the estimate steps towards the
    /// median of these (up when later, down when earlier), which one slow wake cannot move far.
    pub fn woke(&self, armed: Instant, now: Instant) {
        let late = now.saturating_duration_since(armed);
        let est = self.wake_late.get();
        let next = if late > est {
            (est + EARLY_STEP).min(MAX_EARLY)
        } else {
            est.saturating_sub(EARLY_STEP)
        };
        self.wake_late.set(next);
    }

    /// The next slot's intended send time.
    pub fn next_slot(&self) -> Instant {
        let k = self.taken.get();
        self.taken.set(k + 1);
        // Fixed slots are computed from their index, so rounding never accumulates.
        let offset = match self.arrival {
            Arrival::Fixed => self.phase + k as f64 * self.gap,
            Arrival::Poisson => {
                let at = self.poisson_at.get();
                self.poisson_at.set(at + self.rng.exponential(self.gap));
                at
            }
        };
        self.start + Duration::from_secs_f64(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_slots_are_evenly_spaced_from_the_phase() {
        let start = Instant::now();
        let p = Pacer::new(start, 1000.0, Duration::from_micros(250), Arrival::Fixed, 1);
        let slots: Vec<Duration> = (0..2000).map(|_| p.next_slot() - start).collect();
        assert_eq!(slots[0], Duration::from_micros(250));
        assert!((slots[1000].as_secs_f64() - 1.00025).abs() < 1e-9);
        assert!(slots.windows(2).all(|w| w[1] > w[0]));
    }

    #[test]
    fn the_early_wake_tracks_the_median_lateness() {
        let start = Instant::now();
        let p = Pacer::new(start, 1000.0, Duration::ZERO, Arrival::Fixed, 1);
        // Wake-ups 20 µs late, one in five 500 µs late: the median is 20 µs.
        for i in 0..2000 {
            let late = if i % 5 == 0 { 500 } else { 20 };
            p.woke(start, start + Duration::from_micros(late));
        }
        let early = start + Duration::from_millis(1) - p.wake_at(start + Duration::from_millis(1));
        assert!(
            (Duration::from_micros(19)..=Duration::from_micros(22)).contains(&early),
            "{early:?}"
        );
    }

    #[test]
    fn poisson_slots_keep_the_rate_on_average() {
        let start = Instant::now();
        let p = Pacer::new(start, 10_000.0, Duration::ZERO, Arrival::Poisson, 3);
        let last = (0..100_000).map(|_| p.next_slot()).last().unwrap();
        let secs = (last - start).as_secs_f64();
        assert!(
            (secs - 10.0).abs() < 0.15,
            "100k slots at 10k/s took {secs} s"
        );
    }
}
