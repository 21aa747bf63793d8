//! Agent-side block sizing: how many ids to ask the leader for.
//!
//! # Formula
//!
//! ```text
//! rate_ids_per_s = time-decayed rate of ids consumed, time constant rate_tau_ms   (see crate::rate)
//! want           = ceil(rate_ids_per_s × refill_period_ms / 1000)
//! block_ids      = min( clamp(want, block_ids_min', block_ids_max'),  ids the width has left )
//!   where block_ids_max' = min(block_ids_max, limit / 1024)      (sequence::block_ids_cap)
//!         block_ids_min' = min(block_ids_min, block_ids_max')
//! ```
//!
//! So a block lasts about one `refill_period_ms` at the current rate: the
//! agent asks about once per period whatever the load, and a restarted agent
//! loses at most one period's worth of ids per block it held (and never more
//! than `limit / 1024` of a width).
//!
//! # Convergence
//!
//! The rate is an exponentially decayed counter ([`Rate`]), so idle time
//! decays it (an idle agent drifts back to `block_ids_min`) and bursts count
//! in proportion to their size. With the default `rate_tau_ms ==
//! refill_period_ms`, after the consumption rate changes by 1000× the block
//! size is within 10 % of its new target after **3 periods** for a rise and
//! **10 periods** for a fall (`ln 10 ≈ 2.3` and `ln 10⁴ ≈ 9.2` time
//! constants; see [`crate::rate`]). The tests check both.

use unid_proto::{Id, Width};

use crate::Error;
use crate::rate::{RATE_TAU_MS_MAX, Rate};
use crate::sequence::{block_ids_cap, ids_left, saturate_u64};

/// The longest refill period accepted, in milliseconds (one hour).
pub const REFILL_PERIOD_MS_MAX: u64 = 60 * 60 * 1000;

/// Configuration of a [`Sizer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SizingConfig {
    /// How long a block should last at the measured rate, in milliseconds
    /// (`1..=REFILL_PERIOD_MS_MAX`).
    pub refill_period_ms: u64,
    /// Time constant of the rate estimate, in milliseconds
    /// (`1..=RATE_TAU_MS_MAX`). Shorter reacts faster, longer is smoother.
    pub rate_tau_ms: u64,
    /// Smallest block asked for, in ids (`>= 1`).
    pub block_ids_min: u64,
    /// Largest block asked for, in ids (`>= block_ids_min`). Further capped
    /// per width by [`block_ids_cap`].
    pub block_ids_max: u64,
}

impl SizingConfig {
    /// Defaults: blocks last 100 ms, rate over 100 ms, 16 ..= 1,048,576 ids.
    pub const DEFAULT: SizingConfig = SizingConfig {
        refill_period_ms: 100,
        rate_tau_ms: 100,
        block_ids_min: 16,
        block_ids_max: 1 << 20,
    };

    /// Checks every bound.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field, reason| Err(Error::InvalidConfig { field, reason });
        if !(1..=REFILL_PERIOD_MS_MAX).contains(&self.refill_period_ms) {
            return bad("refill_period_ms", "must be in 1..=REFILL_PERIOD_MS_MAX");
        }
        if !(1..=RATE_TAU_MS_MAX).contains(&self.rate_tau_ms) {
            return bad("rate_tau_ms", "must be in 1..=RATE_TAU_MS_MAX");
        }
        if self.block_ids_min == 0 {
            return bad("block_ids_min", "must be at least 1");
        }
        if self.block_ids_max < self.block_ids_min {
            return bad("block_ids_max", "must be at least block_ids_min");
        }
        Ok(())
    }
}

impl Default for SizingConfig {
    fn default() -> Self {
        SizingConfig::DEFAULT
    }
}

/// Sizes the blocks an agent asks for from its measured consumption rate.
/// See the module docs for the formula.
#[derive(Clone, Debug)]
pub struct Sizer {
    config: SizingConfig,
    rate: Rate,
}

impl Sizer {
    /// A sizer with no consumption measured yet (it asks for
    /// `block_ids_min` until it has measured some).
    pub fn new(config: SizingConfig, now_us: u64) -> Result<Sizer, Error> {
        config.validate()?;
        let rate = Rate::new(now_us, config.rate_tau_ms);
        Ok(Sizer { config, rate })
    }

    /// The configuration.
    pub fn config(&self) -> &SizingConfig {
        &self.config
    }

    /// Records `ids` consumed by applications at `now_us` (e.g. what the ring
    /// reports as taken since the last call).
    pub fn record_consumed(&mut self, now_us: u64, ids: u64) {
        self.rate.record(now_us, ids);
    }

    /// The measured consumption rate at `now_us`, in ids per second.
    pub fn rate_ids_per_s(&self, now_us: u64) -> f64 {
        self.rate.per_s(now_us)
    }

    /// How many ids to ask for at `now_us` for a sequence of `width` whose
    /// ids below `floor` are all spent or held (the end of the last block
    /// received, or 0). [`Error::Exhausted`] if the width has nothing left.
    pub fn block_ids(&self, now_us: u64, width: Width, floor: Id) -> Result<u64, Error> {
        let left = ids_left(width, floor);
        if left == 0 {
            return Err(Error::Exhausted);
        }
        let max = self.config.block_ids_max.min(block_ids_cap(width));
        let min = self.config.block_ids_min.min(max);
        let want = (self.rate.per_s(now_us) * self.config.refill_period_ms as f64 / 1000.0).ceil();
        // `as` saturates: NaN to 0, huge to u64::MAX.
        let want = want as u64;
        let ids = saturate_u64(left).min(want.clamp(min, max));
        assert!(ids >= 1);
        assert!(ids <= max && (ids as u128) <= left);
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1000;

    fn sizer(refill_ms: u64) -> Sizer {
        let config = SizingConfig {
            refill_period_ms: refill_ms,
            rate_tau_ms: refill_ms,
            block_ids_min: 16,
            block_ids_max: 1 << 24,
        };
        Sizer::new(config, 0).unwrap()
    }

    /// Consumes at `rate_per_s` from `from_us` to `to_us`, in 1 ms samples.
    fn consume(s: &mut Sizer, from_us: u64, to_us: u64, rate_per_s: u64) {
        let mut t = from_us;
        while t < to_us {
            t += MS;
            s.record_consumed(t, rate_per_s / 1000);
        }
    }

    fn within(actual: u64, target: u64, tolerance: f64) -> bool {
        (actual as f64 - target as f64).abs() <= tolerance * target as f64
    }

    #[test]
    fn config_is_validated() {
        assert!(SizingConfig::DEFAULT.validate().is_ok());
        let mut c = SizingConfig::DEFAULT;
        c.block_ids_min = 0;
        assert!(matches!(
            Sizer::new(c, 0),
            Err(Error::InvalidConfig {
                field: "block_ids_min",
                ..
            })
        ));
        let mut c = SizingConfig::DEFAULT;
        c.block_ids_max = c.block_ids_min - 1;
        assert!(c.validate().is_err());
        let mut c = SizingConfig::DEFAULT;
        c.refill_period_ms = 0;
        assert!(c.validate().is_err());
        let mut c = SizingConfig::DEFAULT;
        c.rate_tau_ms = RATE_TAU_MS_MAX + 1;
        assert!(c.validate().is_err());
    }

    #[test]
    fn steady_rate_gives_one_period_of_ids() {
        let mut s = sizer(100);
        consume(&mut s, 0, 1000 * MS, 100_000);
        // 100k ids/s × 100 ms = 10k ids.
        let b = s.block_ids(1000 * MS, Width::W8, 0).unwrap();
        assert!(within(b, 10_000, 0.02), "{b}");
    }

    #[test]
    fn fresh_sizer_asks_for_the_minimum_and_clamps_to_max() {
        let s = sizer(100);
        assert_eq!(s.block_ids(0, Width::W8, 0), Ok(16));
        let mut s = sizer(100);
        consume(&mut s, 0, 1000 * MS, 1_000_000_000);
        assert_eq!(s.block_ids(1000 * MS, Width::W8, 0), Ok(1 << 24));
    }

    #[test]
    fn burst_counts_in_proportion_and_then_decays() {
        let mut s = sizer(100);
        consume(&mut s, 0, 1000 * MS, 10_000); // 1,000 per period.
        let before = s.block_ids(1000 * MS, Width::W8, 0).unwrap();
        assert!(within(before, 1000, 0.05), "{before}");
        // A burst of 100k ids at once raises the size...
        s.record_consumed(1000 * MS, 100_000);
        let after = s.block_ids(1000 * MS, Width::W8, 0).unwrap();
        assert!(after > 50 * before, "{after}");
        // ...bounded by the burst: rate <= 100k ids / tau plus the steady rate.
        assert!(after <= 101_000 + before, "{after}");
        // 10 periods of the old steady rate later it has faded to near that.
        consume(&mut s, 1000 * MS, 2000 * MS, 10_000);
        let later = s.block_ids(2000 * MS, Width::W8, 0).unwrap();
        assert!(within(later, 1000, 0.1), "{later}");
    }

    #[test]
    fn idle_period_decays_to_the_minimum() {
        let mut s = sizer(100);
        consume(&mut s, 0, 1000 * MS, 1_000_000);
        assert!(s.block_ids(1000 * MS, Width::W8, 0).unwrap() > 90_000);
        // One idle period: e^-1 of the rate.
        let one = s.block_ids(1100 * MS, Width::W8, 0).unwrap();
        assert!(within(one, 36_788, 0.03), "{one}");
        // 20 idle periods: back at the minimum.
        assert_eq!(s.block_ids(3000 * MS, Width::W8, 0), Ok(16));
    }

    #[test]
    fn converges_after_a_1000x_rise_within_3_periods() {
        let mut s = sizer(100);
        consume(&mut s, 0, 1000 * MS, 10_000); // 1,000 ids per period.
        consume(&mut s, 1000 * MS, 1300 * MS, 10_000_000); // 1,000,000 per period.
        let b = s.block_ids(1300 * MS, Width::W8, 0).unwrap();
        assert!(within(b, 1_000_000, 0.1), "{b}");
        // ...and not already at 2 periods would be too strict to promise; at 1
        // period it is still visibly converging.
        let mut s2 = sizer(100);
        consume(&mut s2, 0, 1000 * MS, 10_000);
        consume(&mut s2, 1000 * MS, 1100 * MS, 10_000_000);
        let b1 = s2.block_ids(1100 * MS, Width::W8, 0).unwrap();
        assert!(b1 < 700_000, "{b1}");
    }

    #[test]
    fn converges_after_a_1000x_fall_within_10_periods() {
        let mut s = sizer(100);
        consume(&mut s, 0, 1000 * MS, 10_000_000); // 1,000,000 per period.
        consume(&mut s, 1000 * MS, 2000 * MS, 10_000); // 1,000 per period.
        let b = s.block_ids(2000 * MS, Width::W8, 0).unwrap();
        assert!(within(b, 1000, 0.1), "{b}");
        let mut s2 = sizer(100);
        consume(&mut s2, 0, 1000 * MS, 10_000_000);
        consume(&mut s2, 1000 * MS, 1500 * MS, 10_000);
        let b5 = s2.block_ids(1500 * MS, Width::W8, 0).unwrap();
        assert!(b5 > 2000, "after 5 periods still converging: {b5}");
    }

    #[test]
    fn never_more_than_the_width_has_left() {
        let mut s = sizer(100);
        consume(&mut s, 0, 1000 * MS, 1_000_000_000);
        let limit = Width::W4.limit();
        assert_eq!(s.block_ids(1000 * MS, Width::W4, limit - 7), Ok(7));
        assert_eq!(
            s.block_ids(1000 * MS, Width::W4, limit),
            Err(Error::Exhausted)
        );
        assert_eq!(
            s.block_ids(1000 * MS, Width::W4, limit + 5),
            Err(Error::Exhausted)
        );
        // Small width: capped at limit / 1024 whatever the rate.
        assert_eq!(s.block_ids(1000 * MS, Width::W2, 0), Ok(63));
        assert_eq!(
            s.block_ids(1000 * MS, Width::W2, Width::W2.limit() - 3),
            Ok(3)
        );
    }
}
