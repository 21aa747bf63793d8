//! CI gates on same-run ratios (never absolute times) for the in-process paths, in ids per
//! second: the ring's single take (`Consumer::try_take`) and the `unid` client's `next()`
//! against `Uuid::now_v7()`, and the client's batch take (`take_range(64)`) against
//! `AtomicU64::fetch_add`. Every figure is measured by
//! `unid_bench::closed_loop` (one thread, untimed closed loop), interleaved round by round so
//! that load from other work hits all of them alike; each gate is on the median over rounds
//! of the ratio within a round. Exits 1 naming the figure when a gate fails.
//!
//! `cargo run --release -p unid-bench --bin bench_gates -- [--rounds 7] [--ms 250]`
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
    /// Rounds (each measures every figure once).
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Untimed measuring time per figure per round.
    #[arg(long, default_value_t = 250)]
    ms: u64,
    /// Gate: the ring's single take ids/s at least this many times `Uuid::now_v7()`'s.
    #[arg(long, default_value_t = 10.0)]
    min_next_vs_uuid: f64,
    /// Gate: the client's `next()` ids/s at least this many times `Uuid::now_v7()`'s.
    #[arg(long, default_value_t = 3.0)]
    min_client_next_vs_uuid: f64,
    /// Gate: ring `take_range(64)` ids/s at least this fraction of `fetch_add`'s.
    #[arg(long, default_value_t = 0.5)]
    min_batch_vs_fetch_add: f64,
}

fn measure<O: Op>(op: O, ms: u64, ring: &mut BenchRing) -> anyhow::Result<f64> {
    ring.refill();
    let phases = Phases {
        start_ms: monotonic_ms() + 1,
        warmup_ms: 30,
        untimed_ms: ms,
        timed_ms: 0,
    };
    let o: Outcome = closed_loop::run(vec![op], phases, || {
        ring.refill();
    })?;
    Ok(o.ids_per_s())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    anyhow::ensure!((1..=101).contains(&a.rounds), "--rounds must be in 1..=101");
    anyhow::ensure!((10..=10_000).contains(&a.ms), "--ms must be in 10..=10000");
    let mut ring = BenchRing::new("gates", 1024);
    let counter = Arc::new(AtomicU64::new(0));
    let (mut fa, mut uu, mut nx, mut tr, mut raw) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut r_raw, mut r_next, mut r_batch) = (vec![], vec![], vec![]);
    for _ in 0..a.rounds {
        let f = measure(FetchAdd(counter.clone()), a.ms, &mut ring)?;
        let u = measure(UuidV7, a.ms, &mut ring)?;
        let unid = open_ring(ring.dir(), "gates").context("open the bench ring")?;
        anyhow::ensure!(unid.via_ring(), "the client did not map the ring");
        let n = measure(UnidNext(unid), a.ms, &mut ring)?;
        let unid = open_ring(ring.dir(), "gates").context("open the bench ring")?;
        let t = measure(UnidTakeRange(unid, 64), a.ms, &mut ring)?;
        let w = measure(RingTryTake(ring.consumer("gates")), a.ms, &mut ring)?;
        r_raw.push(w / u);
        raw.push(w);
        r_next.push(n / u);
        r_batch.push(t / f);
        fa.push(f);
        uu.push(u);
        nx.push(n);
        tr.push(t);
    }
    println!(
        "bench_gates: {} rounds x {} ms per figure, 1 thread; medians: fetch_add {:.1} M ids/s, \
         Uuid::now_v7 {:.2} M/s, ring try_take() {:.1} M ids/s, client next() {:.1} M ids/s, client take_range(64) \
         {:.1} M ids/s",
        a.rounds,
        a.ms,
        median(fa) / 1e6,
        median(uu) / 1e6,
        median(raw) / 1e6,
        median(nx) / 1e6,
        median(tr) / 1e6
    );
    let show = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut failed = Vec::new();
    for (name, what, min, rounds) in [
        (
            "ring_next_vs_uuid_v7",
            "ring try_take() ids/s ÷ Uuid::now_v7()/s",
            a.min_next_vs_uuid,
            &r_raw,
        ),
        (
            "client_next_vs_uuid_v7",
            "client next() ids/s ÷ Uuid::now_v7()/s",
            a.min_client_next_vs_uuid,
            &r_next,
        ),
        (
            "ring_batch_vs_fetch_add",
            "client take_range(64) ids/s ÷ fetch_add ids/s",
            a.min_batch_vs_fetch_add,
            &r_batch,
        ),
    ] {
        let ratio = median(rounds.clone());
        let ok = ratio >= min;
        println!(
            "gate {name}: {what} = {ratio:.2} (median; rounds: {}), must be >= {min}: {}",
            show(rounds),
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
