//! A time-decayed rate estimate: ids per second, where idle time counts.
//!
//! # Algorithm
//!
//! An exponentially decayed counter with time constant `τ` (`tau_ms`):
//!
//! ```text
//! acc(t)  = Σ nᵢ · e^(−(t − tᵢ)/τ)                 (every event i of nᵢ ids at tᵢ ≤ t)
//! rate(t) = acc(t) / (τ · (1 − e^(−max(t − t₀, τ/8)/τ)))    ids per second, τ in seconds
//! ```
//!
//! For a constant rate `r` since `t₀`, `acc(t) = r·τ·(1 − e^(−(t−t₀)/τ))`, so
//! `rate(t) = r` exactly: the denominator removes the start-up bias (as in
//! Adam's bias correction), so a fresh estimator is right after its first few
//! samples instead of ramping up over `τ`. The `τ/8` floor keeps one sample at
//! the very start from reading as an enormous rate.
//!
//! Unlike an EWMA updated per sample, time passing with no events decays the
//! estimate: after an idle `d`, `rate` has fallen by `e^(−d/τ)` (1 % of its
//! value after `4.6 τ`). After a step from rate `a` to rate `b`, the estimate
//! is `b + (a − b)·e^(−d/τ)`: within 10 % of `b` after `τ·ln(10·|a−b|/b)`, which
//! is `2.3 τ` for a 1000× rise and `9.2 τ` for a 1000× fall.
//!
//! State is two `f64`s and two `u64`s; the update is O(1).

/// A time-decayed rate estimate in ids per second. See the module docs.
#[derive(Clone, Debug)]
pub struct Rate {
    tau_us: f64,
    origin_us: u64,
    at_us: u64,
    /// Decayed sum of ids recorded, as of `at_us`.
    acc: f64,
}

/// The longest time constant accepted, in milliseconds (one day). Bounds the
/// memory of the estimate; longer makes no sense for block sizing.
pub const RATE_TAU_MS_MAX: u64 = 24 * 60 * 60 * 1000;

impl Rate {
    /// A rate estimator starting at `now_us` with time constant `tau_ms`
    /// (clamped to `1..=RATE_TAU_MS_MAX`; configs validate it first).
    pub fn new(now_us: u64, tau_ms: u64) -> Rate {
        let tau_ms = tau_ms.clamp(1, RATE_TAU_MS_MAX);
        Rate {
            tau_us: tau_ms as f64 * 1000.0,
            origin_us: now_us,
            at_us: now_us,
            acc: 0.0,
        }
    }

    /// Records `ids` consumed (or granted) at `now_us`.
    pub fn record(&mut self, now_us: u64, ids: u64) {
        self.decay_to(now_us);
        self.acc += ids as f64;
        debug_assert!(self.acc.is_finite() && self.acc >= 0.0);
    }

    /// The estimated rate at `now_us`, in ids per second (finite, `>= 0`).
    pub fn per_s(&self, now_us: u64) -> f64 {
        let now_us = now_us.max(self.at_us);
        let decayed = self.acc * (-((now_us - self.at_us) as f64) / self.tau_us).exp();
        let elapsed_us = ((now_us - self.origin_us) as f64).max(self.tau_us / 8.0);
        let norm_s = self.tau_us / 1e6 * (1.0 - (-elapsed_us / self.tau_us).exp());
        debug_assert!(norm_s > 0.0);
        let rate = decayed / norm_s;
        debug_assert!(rate.is_finite() && rate >= 0.0);
        rate
    }

    fn decay_to(&mut self, now_us: u64) {
        if now_us > self.at_us {
            self.acc *= (-((now_us - self.at_us) as f64) / self.tau_us).exp();
            self.at_us = now_us;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance * b.abs().max(1e-9)
    }

    #[test]
    fn constant_rate_is_measured_without_startup_bias() {
        let mut r = Rate::new(0, 1000);
        // 1000 ids/s as 1 id per ms.
        for ms in 1..=300u64 {
            r.record(ms * 1000, 1);
            if ms >= 200 {
                assert!(
                    close(r.per_s(ms * 1000), 1000.0, 0.05),
                    "{}",
                    r.per_s(ms * 1000)
                );
            }
        }
        for ms in 301..=10_000u64 {
            r.record(ms * 1000, 1);
        }
        assert!(close(r.per_s(10_000_000), 1000.0, 0.01));
    }

    #[test]
    fn idle_time_decays_the_rate() {
        let mut r = Rate::new(0, 100);
        for ms in 1..=1000u64 {
            r.record(ms * 1000, 10);
        }
        let busy = r.per_s(1_000_000);
        assert!(close(busy, 10_000.0, 0.02));
        // One tau idle: e^-1 of the rate.
        assert!(close(r.per_s(1_100_000), busy * (-1f64).exp(), 0.01));
        // 10 tau idle: practically nothing.
        assert!(r.per_s(2_000_000) < busy * 1e-4);
    }

    #[test]
    fn time_going_backwards_is_ignored() {
        let mut r = Rate::new(1_000, 100);
        r.record(50_000, 100);
        let a = r.per_s(50_000);
        r.record(10_000, 0);
        assert_eq!(r.per_s(10_000), a);
        assert!(r.per_s(0).is_finite());
    }
}
