//! The shared-memory ring against its references, all in one run:
//! `AtomicU64::fetch_add` on one counter (1 and 2 threads) and `uuid::Uuid::now_v7()`.
//!
//! `CARGO_TARGET_DIR=/work/target-ring cargo bench -p unid-bench --bench ring`
//! Results and ratios: `results/ring.md`.
#![allow(missing_docs)] // `criterion_group!` generates an undocumented pub fn

use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use std::sync::Barrier;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use unid_bench::BenchRing;
use unid_ring::RingError;

const CAPACITY: u64 = 1024; // 1024 blocks of 2^20 ids: 2^30 ids buffered

fn single(c: &mut Criterion) {
    let mut g = c.benchmark_group("single");
    g.throughput(Throughput::Elements(1));
    let counter = AtomicU64::new(0);
    g.bench_function("fetch_add", |b| {
        b.iter(|| counter.fetch_add(1, Ordering::Relaxed))
    });
    g.bench_function("uuid_now_v7", |b| b.iter(uuid::Uuid::now_v7));
    let mut ring = BenchRing::new("single", CAPACITY);
    let consumer = ring.consumer("single");
    g.bench_function("ring_take", |b| {
        b.iter(|| match consumer.try_take() {
            Ok(id) => id,
            // The bench heartbeats only when it refills: a stale heartbeat reads as AgentDead.
            Err(RingError::WouldBlock | RingError::AgentDead { .. }) => {
                ring.refill();
                consumer.try_take().expect("refilled")
            }
            Err(e) => panic!("{e}"),
        })
    });
    g.finish();

    let mut g = c.benchmark_group("batch");
    for max in [8u64, 64] {
        g.throughput(Throughput::Elements(max));
        g.bench_with_input(BenchmarkId::new("ring_take_range", max), &max, |b, &max| {
            b.iter(|| match consumer.try_take_range(max) {
                Ok(r) => r,
                Err(RingError::WouldBlock | RingError::AgentDead { .. }) => {
                    ring.refill();
                    consumer.try_take_range(max).expect("refilled")
                }
                Err(e) => panic!("{e}"),
            })
        });
    }
    g.finish();
}

/// Two threads each doing `iters` operations, started together; the main thread refills the
/// ring (if any) while they run. Returns the wall time of the slower thread.
fn two_threads(iters: u64, op: &(dyn Fn() + Sync), mut refill: impl FnMut()) -> Duration {
    let barrier = Barrier::new(3);
    let done = AtomicU64::new(0);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        op();
                    }
                    let el = t0.elapsed();
                    done.fetch_add(1, Ordering::Release);
                    el
                })
            })
            .collect();
        barrier.wait();
        while done.load(Ordering::Acquire) < 2 {
            refill();
            std::thread::sleep(Duration::from_millis(1));
        }
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .max()
            .unwrap()
    })
}

fn contended(c: &mut Criterion) {
    let mut g = c.benchmark_group("two_threads");
    g.throughput(Throughput::Elements(2)); // one iteration = one op in each thread
    let counter = AtomicU64::new(0);
    g.bench_function("fetch_add", |b| {
        b.iter_custom(|iters| {
            two_threads(
                iters,
                &|| {
                    black_box(counter.fetch_add(1, Ordering::Relaxed));
                },
                || {},
            )
        })
    });
    // Reference for what any CAS-claimed cursor costs: load + compare_exchange retry loop.
    let cas_counter = AtomicU64::new(0);
    g.bench_function("cas_loop", |b| {
        b.iter_custom(|iters| {
            two_threads(
                iters,
                &|| {
                    let mut cur = cas_counter.load(Ordering::Relaxed);
                    while let Err(now) = cas_counter.compare_exchange_weak(
                        cur,
                        cur + 1,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    ) {
                        cur = now;
                    }
                },
                || {},
            )
        })
    });
    let mut ring = BenchRing::new("two", CAPACITY);
    let consumer = ring.consumer("two");
    g.bench_function("ring_take", |b| {
        b.iter_custom(|iters| {
            ring.refill();
            let take = || loop {
                match consumer.try_take() {
                    Ok(id) => {
                        black_box(id);
                        return;
                    }
                    Err(RingError::WouldBlock) => std::hint::spin_loop(),
                    Err(e) => panic!("{e}"),
                }
            };
            let mut refill_ids = 0u64;
            let el = two_threads(iters, &take, || refill_ids += ring.refill());
            black_box(refill_ids);
            el
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

criterion_group! { name = benches; config = config(); targets = single, contended }
criterion_main!(benches);
