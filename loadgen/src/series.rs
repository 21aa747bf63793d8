//! Time series for the plots: per bucket of `bucket_ms`, how many events (grants, ids taken)
//! and the largest and total latency among them.

/// Most buckets kept; events beyond fall into the last one.
pub const BUCKETS_MAX: usize = 20_000;

/// Events per time bucket.
#[derive(Clone, Debug)]
pub struct Series {
    /// Bucket width in ms.
    pub bucket_ms: u64,
    /// Events per bucket.
    pub count: Vec<u64>,
    /// Largest latency per bucket, µs.
    pub max_us: Vec<u64>,
    /// Sum of latencies per bucket, µs.
    pub sum_us: Vec<u64>,
}

impl Series {
    /// An empty series of `bucket_ms` buckets (at least 1 ms).
    pub fn new(bucket_ms: u64) -> Series {
        Series {
            bucket_ms: bucket_ms.max(1),
            count: Vec::new(),
            max_us: Vec::new(),
            sum_us: Vec::new(),
        }
    }

    fn slot(&mut self, t_us: u64) -> usize {
        let i = ((t_us / 1_000 / self.bucket_ms) as usize).min(BUCKETS_MAX - 1);
        if self.count.len() <= i {
            self.count.resize(i + 1, 0);
            self.max_us.resize(i + 1, 0);
            self.sum_us.resize(i + 1, 0);
        }
        i
    }

    /// One event at `t_us` (since the start) with latency `lat_us`.
    pub fn record(&mut self, t_us: u64, lat_us: u64) {
        let i = self.slot(t_us);
        self.count[i] += 1;
        self.max_us[i] = self.max_us[i].max(lat_us);
        self.sum_us[i] = self.sum_us[i].saturating_add(lat_us);
    }

    /// Adds `other` (same bucket width) into this one.
    pub fn merge(&mut self, other: &Series) {
        debug_assert_eq!(self.bucket_ms, other.bucket_ms);
        if other.count.is_empty() {
            return;
        }
        self.slot((other.count.len() as u64 - 1) * other.bucket_ms * 1_000);
        for i in 0..other.count.len() {
            self.count[i] += other.count[i];
            self.max_us[i] = self.max_us[i].max(other.max_us[i]);
            self.sum_us[i] = self.sum_us[i].saturating_add(other.sum_us[i]);
        }
    }

    /// The largest latency in buckets overlapping `[from_us, to_us)`.
    pub fn max_between(&self, from_us: u64, to_us: u64) -> u64 {
        let b = self.bucket_ms * 1_000;
        let lo = (from_us / b) as usize;
        let hi = to_us.div_ceil(b) as usize;
        self.max_us
            .iter()
            .take(hi.min(self.max_us.len()))
            .skip(lo)
            .copied()
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_merges_and_finds_the_max_in_a_window() {
        let mut a = Series::new(100);
        a.record(50_000, 7);
        a.record(250_000, 30);
        let mut b = Series::new(100);
        b.record(260_000, 40);
        b.record(990_000, 5);
        a.merge(&b);
        assert_eq!(a.count, vec![1, 0, 2, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(a.max_between(200_000, 300_000), 40);
        assert_eq!(a.max_between(0, 100_000), 7);
        assert_eq!(a.max_between(300_000, 900_000), 0);
    }
}
