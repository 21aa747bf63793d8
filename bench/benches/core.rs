//! The id logic of `unid-core`, against references measured in the same group:
//!
//! - `grant`: `LeaderAllocator::grant` of a 4096-id block (with `poll_raise_for` after each
//!   grant, and the raise it asks for committed at once, as a leader whose Raft never lags),
//!   against `AtomicU64::fetch_add` of 4096 (the in-process counter everyone compares with).
//! - `sizing`: the agent's `Sizer` (`record_consumed` then `block_ids`, what an agent does per
//!   refill), against `fetch_add` and one `f64::exp` (the decayed rate estimate pays two).
//!
//! `nice -n 10 cargo bench -p unid-bench --bench core`
#![allow(missing_docs)] // `criterion_group!` generates an undocumented pub fn

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use unid_core::{AllocatorConfig, CommittedCeiling, Error, LeaderAllocator, Sizer, SizingConfig};
use unid_proto::{SequenceName, Width};

const BLOCK_IDS: u64 = 4096;

/// An allocator for one width-8 sequence whose first raise has committed (ready to grant).
fn ready_allocator(name: &SequenceName) -> LeaderAllocator {
    let mut a = LeaderAllocator::new(
        AllocatorConfig::DEFAULT,
        0,
        [CommittedCeiling {
            sequence: name.clone(),
            width: Width::W8,
            ceiling: 1,
        }],
    )
    .expect("valid allocator");
    let raise = a.poll_raise(0).expect("a new leader asks for a raise");
    a.on_raise_committed(&raise.sequence, raise.ceiling)
        .expect("commit");
    a
}

fn grant(c: &mut Criterion) {
    let mut g = c.benchmark_group("grant");
    g.throughput(Throughput::Elements(1)); // one block
    let counter = AtomicU64::new(0);
    g.bench_function("ref_fetch_add", |b| {
        b.iter(|| counter.fetch_add(black_box(BLOCK_IDS), Ordering::Relaxed))
    });
    let name = SequenceName::new("orders").expect("valid name");
    let mut a = ready_allocator(&name);
    let mut now_us = 1u64;
    g.bench_function("allocator_grant", |b| {
        b.iter(|| {
            now_us += 1;
            let block = match a.grant(now_us, &name, BLOCK_IDS) {
                Ok(block) => block,
                Err(Error::AwaitingRaise) => {
                    // Demand outran the headroom: raise, commit at once, retry.
                    if let Some(r) = a.poll_raise_for(now_us, &name) {
                        a.on_raise_committed(&r.sequence, r.ceiling)
                            .expect("commit");
                    }
                    a.grant(now_us, &name, BLOCK_IDS)
                        .expect("granted after commit")
                }
                Err(e) => panic!("{e}"),
            };
            if let Some(r) = a.poll_raise_for(now_us, &name) {
                a.on_raise_committed(&r.sequence, r.ceiling)
                    .expect("commit");
            }
            block
        })
    });
    g.finish();
}

fn sizing(c: &mut Criterion) {
    let mut g = c.benchmark_group("sizing");
    g.throughput(Throughput::Elements(1)); // one block sized
    let counter = AtomicU64::new(0);
    g.bench_function("ref_fetch_add", |b| {
        b.iter(|| counter.fetch_add(1, Ordering::Relaxed))
    });
    let mut x = 0.5f64;
    g.bench_function("ref_f64_exp", |b| {
        b.iter(|| {
            x = -black_box(x).abs() * 0.5;
            black_box(x.exp())
        })
    });
    let mut sizer = Sizer::new(SizingConfig::DEFAULT, 0).expect("valid sizer");
    let mut now_us = 0u64;
    let mut floor = 1u128;
    g.bench_function("sizer_block_ids", |b| {
        b.iter(|| {
            now_us += 100;
            sizer.record_consumed(now_us, black_box(1000));
            let ids = sizer
                .block_ids(now_us, Width::W8, floor)
                .expect("not exhausted");
            floor += u128::from(ids);
            ids
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! { name = benches; config = config(); targets = grant, sizing }
criterion_main!(benches);
