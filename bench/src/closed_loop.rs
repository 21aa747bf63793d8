//! The one client machinery every system is measured with (`peers`, `bench_gates`): `threads`
//! workers in a closed loop (each issues its next operation as soon as the last one returns),
//! in three phases that start at the same CLOCK_MONOTONIC instants in every process taking
//! part:
//!
//! 1. **warm-up** (discarded): connections open, caches fill, the ring is topped up;
//! 2. **untimed**: only operations and ids are counted, so that cheap in-process operations are
//!    not slowed by the timer (two `Instant::now()` cost 20–40 ns here); the ids/s figure;
//! 3. **timed**: every operation is timed with `Instant::now()` and recorded in an HDR
//!    histogram (1 ns ..= 60 s, 3 significant digits); the p50/p99 figures.
//!
//! A worker reads the phase from one atomic after each operation, so a slow operation (a
//! database round trip) runs past a boundary by at most its own latency; each worker measures
//! its own phase time, and rates are over the longest of them.

use std::fmt::Display;
use std::hint::black_box;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use unid_ring::monotonic_ms;

/// Largest latency the histograms hold, in nanoseconds (larger values are clamped).
pub const LATENCY_NS_MAX: u64 = 60_000_000_000;

/// Most worker threads in one process.
pub const THREADS_MAX: usize = 256;

/// One operation of a system under test: returns how many ids it obtained.
pub trait Op: Send {
    /// What a failed operation says.
    type Error: Display;
    /// Performs one operation.
    fn op(&mut self) -> Result<u64, Self::Error>;
}

/// When the phases start and how long they last. All processes of one measurement get the
/// same `start_ms`.
#[derive(Copy, Clone, Debug)]
pub struct Phases {
    /// Start of the warm-up, in [`monotonic_ms`] (CLOCK_MONOTONIC, shared by processes).
    pub start_ms: u64,
    /// Warm-up length.
    pub warmup_ms: u64,
    /// Untimed phase length.
    pub untimed_ms: u64,
    /// Timed phase length (0: no latency figures).
    pub timed_ms: u64,
}

/// What one process's workers did, summed.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Ids obtained in the untimed phase.
    pub ids_untimed: u64,
    /// Operations in the untimed phase.
    pub ops_untimed: u64,
    /// The longest worker's untimed phase, in ns.
    pub untimed_ns: u64,
    /// Ids obtained in the timed phase.
    pub ids_timed: u64,
    /// Operations in the timed phase.
    pub ops_timed: u64,
    /// The longest worker's timed phase, in ns.
    pub timed_ns: u64,
    /// Latency of each timed operation, in ns.
    pub latency_ns: Histogram<u64>,
}

impl Outcome {
    /// An empty outcome (to merge others into).
    pub fn empty() -> Outcome {
        Outcome {
            ids_untimed: 0,
            ops_untimed: 0,
            untimed_ns: 0,
            ids_timed: 0,
            ops_timed: 0,
            timed_ns: 0,
            latency_ns: new_histogram(),
        }
    }

    /// Ids per second in the untimed phase.
    pub fn ids_per_s(&self) -> f64 {
        self.ids_untimed as f64 / (self.untimed_ns.max(1) as f64 / 1e9)
    }

    /// Operations per second in the untimed phase.
    pub fn ops_per_s(&self) -> f64 {
        self.ops_untimed as f64 / (self.untimed_ns.max(1) as f64 / 1e9)
    }

    /// Ids per second in the timed phase (lower than [`ids_per_s`](Self::ids_per_s) by the
    /// timer's cost for cheap operations).
    pub fn ids_per_s_timed(&self) -> f64 {
        self.ids_timed as f64 / (self.timed_ns.max(1) as f64 / 1e9)
    }

    /// Adds another process's outcome that ran over the same phases: counts add, phase
    /// times take the longest, histograms merge. (Rates of processes that ran at once add.)
    pub fn merge(&mut self, o: &Outcome) {
        self.ids_untimed += o.ids_untimed;
        self.ops_untimed += o.ops_untimed;
        self.untimed_ns = self.untimed_ns.max(o.untimed_ns);
        self.ids_timed += o.ids_timed;
        self.ops_timed += o.ops_timed;
        self.timed_ns = self.timed_ns.max(o.timed_ns);
        // Same bounds on both sides: cannot fail.
        let _ = self.latency_ns.add(&o.latency_ns);
    }
}

/// A latency histogram with the bounds every measurement uses.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3).expect("valid histogram bounds")
}

/// Why a measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// No workers, or more than [`THREADS_MAX`].
    #[error("threads must be in 1..={THREADS_MAX}, not {threads}")]
    Threads {
        /// As given.
        threads: usize,
    },
    /// An operation failed; the measurement is void.
    #[error("worker {worker}: operation failed: {message}")]
    Op {
        /// The worker's index.
        worker: usize,
        /// What the operation said.
        message: String,
    },
    /// A worker thread panicked.
    #[error("worker {worker} panicked")]
    Panicked {
        /// The worker's index.
        worker: usize,
    },
}

const WAIT: u8 = 0;
const WARMUP: u8 = 1;
const UNTIMED: u8 = 2;
const TIMED: u8 = 3;
const STOP: u8 = 4;

struct Counts {
    ids_untimed: u64,
    ops_untimed: u64,
    untimed_ns: u64,
    ids_timed: u64,
    ops_timed: u64,
    timed_ns: u64,
    latency_ns: Histogram<u64>,
}

fn worker<O: Op>(op: &mut O, phase: &AtomicU8) -> Result<Counts, String> {
    let mut c = Counts {
        ids_untimed: 0,
        ops_untimed: 0,
        untimed_ns: 0,
        ids_timed: 0,
        ops_timed: 0,
        timed_ns: 0,
        latency_ns: new_histogram(),
    };
    let err = |e: O::Error| e.to_string();
    while phase.load(Ordering::Acquire) == WAIT {
        std::thread::sleep(Duration::from_micros(100));
    }
    while phase.load(Ordering::Relaxed) == WARMUP {
        black_box(op.op().map_err(err)?);
    }
    let t0 = Instant::now();
    while phase.load(Ordering::Relaxed) == UNTIMED {
        c.ids_untimed += black_box(op.op().map_err(err)?);
        c.ops_untimed += 1;
    }
    c.untimed_ns = t0.elapsed().as_nanos() as u64;
    let t0 = Instant::now();
    while phase.load(Ordering::Relaxed) == TIMED {
        let t = Instant::now();
        c.ids_timed += black_box(op.op().map_err(err)?);
        let ns = t.elapsed().as_nanos() as u64;
        let _ = c.latency_ns.record(ns.clamp(1, LATENCY_NS_MAX));
        c.ops_timed += 1;
    }
    c.timed_ns = t0.elapsed().as_nanos() as u64;
    Ok(c)
}

/// Sleeps until [`monotonic_ms`] reaches `at_ms`.
fn sleep_until_ms(at_ms: u64) {
    loop {
        let now = monotonic_ms();
        if now >= at_ms {
            return;
        }
        std::thread::sleep(Duration::from_millis((at_ms - now).min(50)));
    }
}

/// Runs one worker thread per element of `ops` through `phases`; returns what they did.
/// `during` is called on this thread about every millisecond while the workers run (a
/// producer refilling a ring, say).
pub fn run<O: Op>(
    ops: Vec<O>,
    phases: Phases,
    mut during: impl FnMut(),
) -> Result<Outcome, LoopError> {
    if ops.is_empty() || ops.len() > THREADS_MAX {
        return Err(LoopError::Threads { threads: ops.len() });
    }
    let phase = AtomicU8::new(WAIT);
    let bounds = [
        (phases.start_ms, WARMUP),
        (phases.start_ms + phases.warmup_ms, UNTIMED),
        (
            phases.start_ms + phases.warmup_ms + phases.untimed_ms,
            TIMED,
        ),
        (
            phases.start_ms + phases.warmup_ms + phases.untimed_ms + phases.timed_ms,
            STOP,
        ),
    ];
    let results: Vec<Result<Result<Counts, String>, ()>> = std::thread::scope(|s| {
        let handles: Vec<_> = ops
            .into_iter()
            .map(|mut op| {
                let phase = &phase;
                s.spawn(move || worker(&mut op, phase))
            })
            .collect();
        for (at_ms, next) in bounds {
            loop {
                let now = monotonic_ms();
                if now >= at_ms || handles.iter().all(|h| h.is_finished()) {
                    break;
                }
                during();
                sleep_until_ms(now + 1);
            }
            phase.store(next, Ordering::Release);
        }
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| ()))
            .collect()
    });
    let mut out = Outcome::empty();
    for (worker, r) in results.into_iter().enumerate() {
        let c = match r {
            Err(()) => return Err(LoopError::Panicked { worker }),
            Ok(Err(message)) => return Err(LoopError::Op { worker, message }),
            Ok(Ok(c)) => c,
        };
        out.merge(&Outcome {
            ids_untimed: c.ids_untimed,
            ops_untimed: c.ops_untimed,
            untimed_ns: c.untimed_ns,
            ids_timed: c.ids_timed,
            ops_timed: c.ops_timed,
            timed_ns: c.timed_ns,
            latency_ns: c.latency_ns,
        });
    }
    Ok(out)
}

/// Writes an outcome as text (one line of counts, then `value count` lines of the histogram)
/// for a parent process to [`parse`].
pub fn to_text(o: &Outcome) -> String {
    use std::fmt::Write as _;
    let mut s = format!(
        "{} {} {} {} {} {}\n",
        o.ids_untimed, o.ops_untimed, o.untimed_ns, o.ids_timed, o.ops_timed, o.timed_ns
    );
    for v in o.latency_ns.iter_recorded() {
        let _ = writeln!(s, "{} {}", v.value_iterated_to(), v.count_at_value());
    }
    s
}

/// Reads what [`to_text`] wrote; `None` if it is not that.
pub fn parse(text: &str) -> Option<Outcome> {
    let mut lines = text.lines();
    let head: Vec<u64> = lines
        .next()?
        .split_whitespace()
        .map(|w| w.parse().ok())
        .collect::<Option<_>>()?;
    let [
        ids_untimed,
        ops_untimed,
        untimed_ns,
        ids_timed,
        ops_timed,
        timed_ns,
    ] = head[..]
    else {
        return None;
    };
    let mut latency_ns = new_histogram();
    for l in lines {
        let mut w = l.split_whitespace().map(|w| w.parse::<u64>().ok());
        let (Some(Some(v)), Some(Some(n))) = (w.next(), w.next()) else {
            return None;
        };
        latency_ns.record_n(v.clamp(1, LATENCY_NS_MAX), n).ok()?;
    }
    Some(Outcome {
        ids_untimed,
        ops_untimed,
        untimed_ns,
        ids_timed,
        ops_timed,
        timed_ns,
        latency_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Count(u64);
    impl Op for Count {
        type Error = String;
        fn op(&mut self) -> Result<u64, String> {
            self.0 += 1;
            Ok(3)
        }
    }

    #[test]
    fn runs_phases_and_round_trips_as_text() {
        let phases = Phases {
            start_ms: monotonic_ms() + 5,
            warmup_ms: 10,
            untimed_ms: 30,
            timed_ms: 30,
        };
        let o = run(vec![Count(0), Count(0)], phases, || {}).unwrap();
        assert!(o.ops_untimed > 0 && o.ops_timed > 0);
        assert_eq!(o.ids_untimed, 3 * o.ops_untimed);
        assert_eq!(o.latency_ns.len(), o.ops_timed);
        assert!(o.untimed_ns >= 25_000_000, "{}", o.untimed_ns);
        let back = parse(&to_text(&o)).unwrap();
        assert_eq!(back.ops_timed, o.ops_timed);
        assert_eq!(back.latency_ns.len(), o.latency_ns.len());
        assert_eq!(
            back.latency_ns.value_at_quantile(0.99),
            o.latency_ns.value_at_quantile(0.99)
        );
    }

    #[test]
    fn a_failed_operation_voids_the_run() {
        struct Fails;
        impl Op for Fails {
            type Error = &'static str;
            fn op(&mut self) -> Result<u64, &'static str> {
                Err("refused")
            }
        }
        let phases = Phases {
            start_ms: monotonic_ms(),
            warmup_ms: 5,
            untimed_ms: 5,
            timed_ms: 5,
        };
        let e = run(vec![Fails], phases, || {}).unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
    }
}
