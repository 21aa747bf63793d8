//! The Rust references for the C benchmark (scripts/bench-clients.sh): the `unid` client's
//! `next()` and `Uuid::now_v7()`, ids per second in slices, the same loop as
//! `capi/bench/bench_next.c`.
//!
//! ```sh
//! cargo run --release --example bench_rust -- SEQUENCE RING_DIR SOCKET SLICES MS
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

fn slice(ms: f64, mut f: impl FnMut()) -> f64 {
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(ms / 1000.0);
    let mut calls = 0u64;
    loop {
        for _ in 0..1000 {
            f();
        }
        calls += 1000;
        let t = Instant::now();
        if t >= end {
            return calls as f64 / (t - t0).as_secs_f64();
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let [sequence, ring_dir, socket, slices, ms] = a.as_slice() else {
        return Err("usage: bench_rust SEQUENCE RING_DIR SOCKET SLICES MS".into());
    };
    let options = unid_client::Options {
        ring_dir: ring_dir.into(),
        socket: socket.parse()?,
        ..unid_client::Options::default()
    };
    let mut h = unid_client::Unid::open_with(sequence, options)?;
    if !h.via_ring() {
        return Err("the client did not map the ring".into());
    }
    let (slices, ms): (u32, f64) = (slices.parse()?, ms.parse()?);
    for _ in 0..slices {
        let r = slice(ms, || {
            black_box(h.next().expect("next"));
        });
        println!("Rust next()\t{r:.0}");
        let r = slice(ms, || {
            black_box(uuid::Uuid::now_v7());
        });
        println!("Uuid::now_v7()\t{r:.0}");
    }
    Ok(())
}
