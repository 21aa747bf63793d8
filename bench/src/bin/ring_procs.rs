//! Measurements criterion cannot make: two consumer *processes* taking single ids from one ring
//! against two threads doing `fetch_add` on one counter (and two consumer threads), and the
//! latency distribution of a single take while a producer thread keeps refilling the ring.
//!
//! `CARGO_TARGET_DIR=/work/target-ring cargo run --release -p unid-bench --bin ring_procs`
//! (optional arguments: runs, ids per consumer). Child mode (internal): `--child DIR NAME N START_MS`.

use std::hint::black_box;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use unid_bench::BenchRing;
use unid_ring::{Consumer, ProducerOptions, RingError, monotonic_ms};

fn take_spin(c: &Consumer) -> u128 {
    loop {
        match c.try_take() {
            Ok(id) => return id,
            Err(RingError::WouldBlock) => std::hint::spin_loop(),
            Err(e) => panic!("{e}"),
        }
    }
}

fn child(args: &[String]) {
    let (dir, name) = (Path::new(&args[0]), &args[1]);
    let n: u64 = args[2].parse().unwrap();
    let start_ms: u64 = args[3].parse().unwrap();
    let batch: u64 = args[4].parse().unwrap();
    let c = Consumer::open(dir, name).unwrap();
    while monotonic_ms() < start_ms {
        std::hint::spin_loop();
    }
    let t0 = Instant::now();
    let mut last = 0;
    let mut taken = 0;
    while taken < n {
        let r = if batch == 1 {
            let id = take_spin(&c);
            unid_ring::IdRange {
                first: id,
                count: 1,
            }
        } else {
            match c.try_take_range(batch) {
                Ok(r) => r,
                Err(RingError::WouldBlock) => continue,
                Err(e) => panic!("{e}"),
            }
        };
        assert!(r.first > last || last == 0, "ids increase per consumer");
        last = r.last();
        taken += r.count;
    }
    println!("{}", t0.elapsed().as_nanos());
}

/// Two threads, `n` ops each, started together; ops/s over the slower thread's time.
fn threads_rate(n: u64, op: &(dyn Fn() + Sync)) -> f64 {
    let barrier = Barrier::new(2);
    let el = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let t0 = Instant::now();
                    for _ in 0..n {
                        op();
                    }
                    t0.elapsed()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).max().unwrap()
    });
    2.0 * n as f64 / el.as_secs_f64()
}

/// Two consumer processes taking `n` ids each in takes of up to `batch`; ids/s.
fn procs_rate(ring: &mut BenchRing, name: &str, n: u64, batch: u64) -> f64 {
    ring.refill();
    let exe = std::env::current_exe().unwrap();
    let start_ms = monotonic_ms() + 300;
    let children: Vec<_> = (0..2)
        .map(|_| {
            Command::new(&exe)
                .arg("--child")
                .arg(ring.dir())
                .args([
                    name.to_string(),
                    n.to_string(),
                    start_ms.to_string(),
                    batch.to_string(),
                ])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut el_ns = 0u128;
    let mut outs = Vec::new();
    for ch in children {
        outs.push(std::thread::spawn(move || ch.wait_with_output().unwrap()));
    }
    while outs.iter().any(|h| !h.is_finished()) {
        ring.refill();
        std::thread::sleep(Duration::from_millis(1));
    }
    for h in outs {
        let out = h.join().unwrap();
        assert!(out.status.success(), "child failed");
        el_ns = el_ns.max(
            String::from_utf8(out.stdout)
                .unwrap()
                .trim()
                .parse()
                .unwrap(),
        );
    }
    2.0 * n as f64 / (el_ns as f64 / 1e9)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn latency() {
    // A producer thread refills in blocks of 4096 ids (64 slots: 262,144 ids buffered), so a
    // consumer crosses a block boundary every 4096 takes while the producer rewrites freed slots.
    let dir = std::path::PathBuf::from(format!("/dev/shm/unid-bench-lat-{}", std::process::id()));
    let opts = ProducerOptions {
        capacity: 64,
        ..ProducerOptions::new(8)
    };
    let mut producer = unid_ring::Producer::create(&dir, "lat", &opts).unwrap();
    let consumer = Consumer::open(&dir, "lat").unwrap();
    let stop = AtomicBool::new(false);
    let pushes = AtomicU64::new(0);
    let samples_n = 2_000_000usize;
    let mut samples = Vec::with_capacity(samples_n);
    let mut timer = Vec::with_capacity(samples_n);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut next = 1u128;
            // Like an agent: top up whatever is free, then sleep 50 us (no busy polling of head).
            while !stop.load(Ordering::Relaxed) {
                loop {
                    let got = producer.push(next, 4096).unwrap();
                    if got == 0 {
                        break;
                    }
                    next += u128::from(got);
                    pushes.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        });
        // Let the producer fill the ring first.
        std::thread::sleep(Duration::from_millis(50));
        for _ in 0..samples_n {
            let t0 = Instant::now();
            black_box(take_spin(&consumer));
            samples.push(t0.elapsed().as_nanos() as u64);
            let t0 = Instant::now();
            timer.push(t0.elapsed().as_nanos() as u64);
        }
        stop.store(true, Ordering::Relaxed);
    });
    let _ = std::fs::remove_dir_all(&dir);
    samples.sort_unstable();
    timer.sort_unstable();
    let pct = |v: &[u64], p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    println!(
        "latency of one take while refilling ({samples_n} samples, {} refills): \
         p50 {} ns, p99 {} ns, p99.9 {} ns, p99.99 {} ns, max {} ns",
        pushes.load(Ordering::Relaxed),
        pct(&samples, 0.5),
        pct(&samples, 0.99),
        pct(&samples, 0.999),
        pct(&samples, 0.9999),
        samples[samples.len() - 1]
    );
    println!(
        "  timer alone (Instant::now pair): p50 {} ns, p99.9 {} ns",
        pct(&timer, 0.5),
        pct(&timer, 0.999)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        return child(&args[1..]);
    }
    let runs: usize = args.first().map_or(5, |a| a.parse().unwrap());
    let n: u64 = args.get(1).map_or(20_000_000, |a| a.parse().unwrap());
    let mut ring = BenchRing::new("procs", 1024);
    let consumer = ring.consumer("procs");
    let counter = AtomicU64::new(0);
    let cas_counter = AtomicU64::new(0);
    let (mut fa, mut cas, mut rt, mut rp) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut rp8 = Vec::new();
    for _ in 0..runs {
        fa.push(threads_rate(n, &|| {
            black_box(counter.fetch_add(1, Ordering::Relaxed));
        }));
        // What any CAS-claimed cursor costs: load + compare_exchange retry loop.
        cas.push(threads_rate(n, &|| {
            let mut cur = cas_counter.load(Ordering::Relaxed);
            while let Err(now) =
                cas_counter.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                cur = now;
            }
        }));
        ring.refill();
        assert!(
            ring.producer.ids_available() >= 2 * n,
            "ring holds a whole run"
        );
        rt.push(threads_rate(n, &|| {
            black_box(take_spin(&consumer));
        }));
        rp.push(procs_rate(&mut ring, "procs", n, 1));
        rp8.push(procs_rate(&mut ring, "procs", 4 * n, 8));
    }
    let (fa, cas, rt, rp, rp8) = (median(fa), median(cas), median(rt), median(rp), median(rp8));
    println!("{runs} runs x 2 x {n} ops, medians:");
    let line = |what: &str, rate: f64| {
        println!(
            "  {what:<34}: {:8.1} M/s ({:.2} of 2-thread fetch_add)",
            rate / 1e6,
            rate / fa
        )
    };
    line("2 threads fetch_add one counter", fa);
    line("2 threads CAS loop one counter", cas);
    line("2 threads ring take (1 id)", rt);
    line("2 processes ring take (1 id)", rp);
    line("2 processes ring take_range(8) ids", rp8);
    latency();
}
