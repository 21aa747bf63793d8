//! Ring consumers: threads taking ids one `next()` at a time through the `unid` client crate
//! from a real agent's ring (its socket as the client's fallback), at a paced rate. Each
//! records every id (as runs of consecutive ids), the wait of every `next()` (from the first
//! call for that id to the id, errors and retries included) in an HDR histogram and per time
//! bucket, and the errors by kind.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use unid_loadgen::checker::Run;

use crate::agent::Shared;
use crate::series::Series;

/// Highest wait the histograms hold, in nanoseconds (larger values are clamped).
pub const WAIT_NS_MAX: u64 = 120_000_000_000;
/// Most runs of consecutive ids one consumer records; it stops taking beyond (a run is
/// usually a whole block, so this is far more than a 10-minute run needs).
pub const RUNS_MAX: usize = 4_000_000;
/// Waits at least this long are also kept one by one, with when they began (µs).
pub const LONG_WAIT_US: u64 = 1_000;
/// Most long waits kept per consumer.
pub const LONG_WAITS_MAX: usize = 1_000_000;
/// Most ids taken in one go when behind the pace.
const BURST_IDS_MAX: u64 = 2_000;
/// Pause after an error before the next `next()` (the wait goes on).
const ERROR_PAUSE: Duration = Duration::from_millis(2);

/// What one consumer is told.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    /// Its index.
    pub index: u32,
    /// The real agent it takes from.
    pub agent: usize,
    /// The sequence.
    pub sequence: String,
    /// The agent's ring dir and socket.
    pub ring_dir: std::path::PathBuf,
    /// The agent's socket (the client's fallback).
    pub socket: std::net::SocketAddr,
    /// The uid the agent runs as, when not loadgen's: the client trusts its rings, folder
    /// and socket only when owned by its own user, root or this uid.
    pub agent_uid: Option<u32>,
    /// Ids per second (0: as fast as it can).
    pub rate_per_s: f64,
    /// Width of a time bucket of the series, in ms.
    pub bucket_ms: u64,
}

/// What one consumer recorded.
pub struct ConsumerResult {
    /// The config it ran with.
    pub cfg: ConsumerConfig,
    /// Every id it received, as runs in the order received.
    pub runs: Vec<Run>,
    /// Waits of every `next()` but the first (ns).
    pub wait_ns: Histogram<u64>,
    /// Ids taken, and waits, per time bucket.
    pub series: Series,
    /// How long the first id took after the start (the agent registering and filling).
    pub first_id_us: Option<u64>,
    /// Errors by kind (`AgentNotRunning`, `NotReady`, …).
    pub errors: std::collections::BTreeMap<String, u64>,
    /// `next()` panicked (the client asserts that its ids increase): described.
    pub panics: Vec<String>,
    /// It stopped early because it reached [`RUNS_MAX`].
    pub full: bool,
    /// A `next()` still waiting when the issuing ended: since how long (µs).
    pub waiting_at_end_us: Option<u64>,
    /// Waits of at least [`LONG_WAIT_US`]: (began, µs since the start; wait, µs).
    pub long_waits: Vec<(u64, u64)>,
}

fn error_kind(e: &unid::Error) -> String {
    let s = format!("{e:?}");
    s.split([' ', '{', '(']).next().unwrap_or("?").to_owned()
}

fn open(cfg: &ConsumerConfig) -> Result<unid::Unid, unid::Error> {
    let o = unid::Options {
        ring_dir: cfg.ring_dir.clone(),
        socket: cfg.socket,
        socket_fallback: true,
        wait: Duration::from_secs(1),
        backup_ring_dir: None,
        agent_uid: cfg.agent_uid,
    };
    unid::Unid::open_with(&cfg.sequence, o)
}

/// Runs one consumer until the issuing ends.
pub fn run(cfg: ConsumerConfig, shared: Arc<Shared>) -> ConsumerResult {
    let mut out = ConsumerResult {
        runs: Vec::new(),
        wait_ns: Histogram::new_with_bounds(1, WAIT_NS_MAX, 3).expect("valid histogram bounds"),
        series: Series::new(cfg.bucket_ms),
        first_id_us: None,
        errors: Default::default(),
        panics: Vec::new(),
        full: false,
        waiting_at_end_us: None,
        long_waits: Vec::new(),
        cfg,
    };
    let start = shared.start;
    let mut handle: Option<unid::Unid> = None;
    let mut taken: u64 = 0;
    let began = Instant::now();
    // The wait for the current id started here (None: not waiting).
    let mut asked: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if shared.abort.load(Ordering::Relaxed) || now >= shared.stop_issuing_at {
            break;
        }
        if out.runs.len() >= RUNS_MAX {
            out.full = true;
            break;
        }
        let due = if out.cfg.rate_per_s > 0.0 {
            (now.duration_since(began).as_secs_f64() * out.cfg.rate_per_s) as u64
        } else {
            taken + BURST_IDS_MAX
        };
        if asked.is_none() && taken >= due {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let burst_end = taken.max(due.saturating_sub(BURST_IDS_MAX)) + BURST_IDS_MAX;
        while (taken < due.min(burst_end) || asked.is_some())
            && Instant::now() < shared.stop_issuing_at
        {
            let at = *asked.get_or_insert_with(Instant::now);
            let h = match handle.as_mut() {
                Some(h) => h,
                None => match open(&out.cfg) {
                    Ok(h) => handle.insert(h),
                    Err(e) => {
                        *out.errors.entry(error_kind(&e)).or_default() += 1;
                        std::thread::sleep(ERROR_PAUSE);
                        continue;
                    }
                },
            };
            match std::panic::catch_unwind(AssertUnwindSafe(|| h.next())) {
                Ok(Ok(id)) => {
                    let got = Instant::now();
                    let v = id.get();
                    let t_us = got.saturating_duration_since(start).as_micros() as u64;
                    match out.runs.last_mut() {
                        Some(r) if r.first.checked_add(u128::from(r.count)) == Some(v) => {
                            r.count += 1
                        }
                        _ => out.runs.push(Run {
                            consumer: out.cfg.index,
                            first: v,
                            count: 1,
                            t_us,
                        }),
                    }
                    let wait_ns = got.duration_since(at).as_nanos() as u64;
                    if out.first_id_us.is_none() {
                        out.first_id_us = Some(t_us);
                    } else {
                        let _ = out.wait_ns.record(wait_ns.clamp(1, WAIT_NS_MAX));
                        // Charged to when the wait began (the fault window it fell in).
                        let began_us = at.saturating_duration_since(start).as_micros() as u64;
                        out.series.record(began_us, wait_ns / 1_000);
                        if wait_ns / 1_000 >= LONG_WAIT_US && out.long_waits.len() < LONG_WAITS_MAX
                        {
                            out.long_waits.push((began_us, wait_ns / 1_000));
                        }
                    }
                    shared.consumed.fetch_add(1, Ordering::Relaxed);
                    taken += 1;
                    asked = None;
                }
                Ok(Err(e)) => {
                    *out.errors.entry(error_kind(&e)).or_default() += 1;
                    if matches!(
                        e,
                        unid::Error::AgentNotRunning { .. } | unid::Error::Ring(_)
                    ) {
                        handle = None;
                    }
                    std::thread::sleep(ERROR_PAUSE);
                }
                Err(p) => {
                    let what = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    if out.panics.len() < 8 {
                        out.panics.push(format!(
                            "consumer {} (agent {}): next() panicked at {:.3} s: {what}",
                            out.cfg.index,
                            out.cfg.agent,
                            start.elapsed().as_secs_f64()
                        ));
                    }
                    handle = None;
                }
            }
        }
    }
    out.waiting_at_end_us = asked.map(|a| a.elapsed().as_micros() as u64);
    out
}
