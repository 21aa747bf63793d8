//! CI gates on same-run ratios (never absolute times) for the in-process paths, in ids per
//! second: the ring's single take (`Consumer::try_take`) and the `unid` client's `next()`
//! against `Uuid::now_v7()`, the client's `next()` against the ring's own take (what the client
//! adds on top of the ring), and the client's batch take (`take_range(64)`) against
//! `AtomicU64::fetch_add`.
//!
//! Every figure is measured by `unid_bench::closed_loop` (one thread, untimed closed loop) in
//! many short slices, the figures taking turns slice by slice. Other work on the machine only
//! ever slows a slice down (a preempted slice, a cold cache), so each figure's rate is the 90th
//! percentile of its slices: its undisturbed speed as long as a few slices in 31 ran
//! undisturbed, yet not its single luckiest slice. A slice in which the worker never ran (it was
//! not scheduled before the slice ended) is dropped.
//! The gates are on ratios of those rates. Exits 1 naming the figure when a gate fails.
//!
//! `cargo run --release -p unid-bench --bin bench_gates -- [--slices 31] [--ms 50]`
//! (`scripts/bench-gates.sh` runs it, and the grant gate beside it).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use anyhow::Context as _;
use clap::Parser;
use unid_bench::BenchRing;
use unid_bench::closed_loop::{self, Op, Outcome, Phases};
use unid_bench::ops::{FetchAdd, RingTryTake, UnidNext, UnidTakeRange, UuidV7, open_ring};
use unid_ring::monotonic_ms;

/// Same-run ratio gates for the ring.
#[derive(Parser, Debug)]
struct Args {
    /// Slices per figure (the figures take turns).
    #[arg(long, default_value_t = 31)]
    slices: usize,
    /// Untimed measuring time of one slice.
    #[arg(long, default_value_t = 50)]
    ms: u64,
    /// Gate: the ring's single take ids/s at least this many times `Uuid::now_v7()`'s.
    #[arg(long, default_value_t = 10.0)]
    min_next_vs_uuid: f64,
    /// Gate: the client's `next()` ids/s at least this many times `Uuid::now_v7()`'s.
    #[arg(long, default_value_t = 3.0)]
    min_client_next_vs_uuid: f64,
    /// Gate: the client's `next()` ids/s at least this fraction of the ring's own
    /// `try_take()`'s (the target is 0.8: `next()` costing at most 1.25x a take).
    #[arg(long, default_value_t = 0.8)]
    min_client_next_vs_ring: f64,
    /// Gate: ring `take_range(64)` ids/s at least this fraction of `fetch_add`'s.
    #[arg(long, default_value_t = 0.5)]
    min_batch_vs_fetch_add: f64,
}

/// One slice's rate; `None` if the worker never ran in it.
fn measure<O: Op>(op: O, ms: u64, ring: &mut BenchRing) -> anyhow::Result<Option<f64>> {
    ring.refill();
    let phases = Phases {
        start_ms: monotonic_ms() + 1,
        warmup_ms: 5,
        untimed_ms: ms,
        timed_ms: 0,
    };
    let o: Outcome = closed_loop::run(vec![op], phases, || {
        ring.refill();
    })?;
    Ok((o.ops_untimed > 0).then(|| o.ids_per_s()))
}

/// The `q` quantile of `v` (nearest rank), and its min and max.
fn quantile(v: &[f64], q: f64) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 * q) as usize).min(v.len() - 1);
    (v[i], v[0], v[v.len() - 1])
}

/// The rate a figure is judged by (see the module docs).
const QUANTILE: f64 = 0.9;

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    anyhow::ensure!(
        (1..=1001).contains(&a.slices),
        "--slices must be in 1..=1001"
    );
    anyhow::ensure!((10..=10_000).contains(&a.ms), "--ms must be in 10..=10000");
    let mut ring = BenchRing::new("gates", 1024);
    let counter = Arc::new(AtomicU64::new(0));
    // fetch_add, now_v7, ring try_take, client next, client take_range(64)
    let mut rates: [Vec<f64>; 5] = Default::default();
    let next_handle = |ring: &BenchRing| -> anyhow::Result<unid::Unid> {
        let unid = open_ring(ring.dir(), "gates").context("open the bench ring")?;
        anyhow::ensure!(unid.via_ring(), "the client did not map the ring");
        Ok(unid)
    };
    let (mut next, mut range) = (next_handle(&ring)?, next_handle(&ring)?);
    let started = std::time::Instant::now();
    for _ in 0..a.slices {
        rates[0].extend(measure(FetchAdd(counter.clone()), a.ms, &mut ring)?);
        rates[1].extend(measure(UuidV7, a.ms, &mut ring)?);
        rates[2].extend(measure(
            RingTryTake(ring.consumer("gates")),
            a.ms,
            &mut ring,
        )?);
        rates[3].extend(measure(UnidNext(next), a.ms, &mut ring)?);
        next = next_handle(&ring)?;
        rates[4].extend(measure(UnidTakeRange(range, 64), a.ms, &mut ring)?);
        range = next_handle(&ring)?;
    }
    drop((next, range));
    let names = [
        "fetch_add",
        "Uuid::now_v7()",
        "ring try_take()",
        "client next()",
        "client take_range(64)",
    ];
    let q: Vec<(f64, f64, f64)> = rates.iter().map(|r| quantile(r, QUANTILE)).collect();
    println!(
        "bench_gates: {} slices x {} ms per figure, 1 thread, in {:.1} s; p{:.0} of slices \
         [min - max], M ids/s:",
        a.slices,
        a.ms,
        started.elapsed().as_secs_f64(),
        QUANTILE * 100.0
    );
    for (name, (v, lo, hi)) in names.iter().zip(&q) {
        println!(
            "  {name:<22} {:>9.2} [{:.2} - {:.2}]",
            v / 1e6,
            lo / 1e6,
            hi / 1e6
        );
    }
    let mut failed = Vec::new();
    for (name, what, num, den, min) in [
        (
            "ring_next_vs_uuid_v7",
            "ring try_take() ids/s ÷ Uuid::now_v7()/s",
            2,
            1,
            a.min_next_vs_uuid,
        ),
        (
            "client_next_vs_uuid_v7",
            "client next() ids/s ÷ Uuid::now_v7()/s",
            3,
            1,
            a.min_client_next_vs_uuid,
        ),
        (
            "client_next_vs_ring_take",
            "client next() ids/s ÷ ring try_take() ids/s",
            3,
            2,
            a.min_client_next_vs_ring,
        ),
        (
            "ring_batch_vs_fetch_add",
            "client take_range(64) ids/s ÷ fetch_add ids/s",
            4,
            0,
            a.min_batch_vs_fetch_add,
        ),
    ] {
        let ratio = if q[den].0 > 0.0 {
            q[num].0 / q[den].0
        } else {
            0.0
        };
        let ok = ratio >= min;
        println!(
            "gate {name}: {what} = {ratio:.2}, must be >= {min}: {}",
            if ok { "ok" } else { "FAILED" }
        );
        if !ok {
            failed.push(format!("{name}: {what} = {ratio:.2} < {min}"));
        }
    }
    drop(ring); // removes its folder in /dev/shm (exit does not run destructors)
    if !failed.is_empty() {
        for f in &failed {
            eprintln!("GATE FAILED: {f}");
        }
        std::process::exit(1);
    }
    Ok(())
}
