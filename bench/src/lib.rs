//! Criterion suites live in `benches/`; this library holds shared helpers: the benchmark ring,
//! the closed-loop client machinery every system is measured with ([`closed_loop`]) and the
//! operations that need no server ([`ops`]).

pub mod closed_loop;
pub mod ops;

use std::path::PathBuf;
use unid_ring::{Consumer, Producer, ProducerOptions};

/// Ids per block the benchmark producer pushes: the ring's largest block (2^20).
pub const BENCH_BLOCK_IDS: u64 = unid_ring::layout::BLOCK_IDS_MAX;

/// A ring in `/dev/shm` for a benchmark, removed on drop.
pub struct BenchRing {
    /// The agent side.
    pub producer: Producer,
    /// Next id to push.
    pub next: u128,
    dir: PathBuf,
}

impl BenchRing {
    /// A width-8 ring of `capacity` slots named `name`, filled.
    pub fn new(name: &str, capacity: u64) -> BenchRing {
        let dir = PathBuf::from(format!("/dev/shm/unid-bench-{}", std::process::id()));
        let opts = ProducerOptions {
            capacity,
            ..ProducerOptions::new(8)
        };
        let producer = Producer::create(&dir, name, &opts).expect("create bench ring");
        let mut ring = BenchRing {
            producer,
            next: 1,
            dir,
        };
        ring.refill();
        ring
    }

    /// Directory of the ring file.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// A consumer of this ring.
    pub fn consumer(&self, name: &str) -> Consumer {
        Consumer::open(&self.dir, name).expect("open bench ring")
    }

    /// Heartbeats, then pushes full blocks until the ring is full; returns ids pushed.
    pub fn refill(&mut self) -> u64 {
        self.producer.heartbeat_now();
        let mut total = 0;
        loop {
            let got = self
                .producer
                .push(self.next, BENCH_BLOCK_IDS)
                .expect("push");
            if got == 0 {
                return total;
            }
            self.next += u128::from(got);
            total += got;
        }
    }
}

impl Drop for BenchRing {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
