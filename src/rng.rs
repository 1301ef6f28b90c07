//! A tiny xorshift64 generator for the randomness that shapes load — exponential service times,
//! Poisson arrivals, p2c's two picks — where speed and a fixed seed matter and secrecy does not.

use std::cell::Cell;

/// xorshift64 (Marsaglia 2003): one state word, three shifts per number; never seeded with 0.
#[derive(Debug, Clone)]
pub struct Rng(Cell<u64>);

impl Rng {
    /// A generator from `seed` (a zero seed is replaced, since zero is xorshift's fixed point).
    pub fn new(seed: u64) -> Rng {
        Rng(Cell::new(if seed == 0 {
            0x2545_f491_4f6c_dd1d
        } else {
            seed
        }))
    }

    /// The next 64 random bits.
    pub fn next_u64(&self) -> u64 {
        let mut x = self.0.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0.set(x);
        x
    }

    /// A uniform number in (0, 1]: never 0, so `-ln(u)` is always finite.
    pub fn unit(&self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// An exponentially distributed number with this mean (inverse-transform sampling).
    pub fn exponential(&self, mean: f64) -> f64 {
        -self.unit().ln() * mean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_samples_have_the_asked_mean() {
        let rng = Rng::new(7);
        let n = 200_000;
        let mean = (0..n).map(|_| rng.exponential(2.0)).sum::<f64>() / n as f64;
        assert!((mean - 2.0).abs() < 0.03, "mean {mean}");
        assert!((0..1000).all(|_| rng.unit() > 0.0 && rng.unit() <= 1.0));
    }
}
