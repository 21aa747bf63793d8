//! Logging to stderr: `RUST_LOG` filters, and openraft's repeats are held back.
//!
//! openraft logs every failed RPC to a peer that is down (a three-server cluster with one
//! follower killed wrote 1,213 WARN/ERROR lines in 20 s, `results/logs.md`). Each openraft
//! log statement (callsite) is let through once, then at most once per
//! [`REPEAT_WINDOW`]; the next one let through says how many were held back. The consensus
//! crate logs a peer going away, a summary per minute while it stays away, and its return.
//! `UNID_LOG_REPEATS=all` lets every line through (for debugging openraft).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::callsite::Identifier;
use tracing::subscriber::Interest;
use tracing::{Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::prelude::*;

/// How long an openraft log statement stays quiet after it was let through.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(60);

/// Most openraft callsites tracked (openraft has a few hundred log statements).
const CALLSITES_MAX: usize = 4_096;

/// Lets each openraft callsite through at most once per [`REPEAT_WINDOW`].
#[derive(Debug, Default)]
pub struct RepeatLimiter {
    seen: Mutex<HashMap<Identifier, (Instant, u64)>>,
}

impl RepeatLimiter {
    fn limited(meta: &Metadata<'_>) -> bool {
        meta.is_event() && meta.target().starts_with("openraft")
    }

    /// Whether an event of `meta` at `now` is let through; a let-through event after held
    /// ones reports how many to stderr first.
    pub fn allow(&self, meta: &Metadata<'_>, now: Instant) -> bool {
        if !Self::limited(meta) {
            return true;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let id = meta.callsite();
        match seen.get_mut(&id) {
            Some((at, held)) if now.duration_since(*at) < REPEAT_WINDOW => {
                *held += 1;
                false
            }
            Some((at, held)) => {
                if *held > 0 {
                    eprintln!(
                        "(held back {held} repeats of openraft's {:?} at {}:{} in the last {} s)",
                        meta.name(),
                        meta.file().unwrap_or("?"),
                        meta.line().unwrap_or(0),
                        now.duration_since(*at).as_secs()
                    );
                }
                *at = now;
                *held = 0;
                true
            }
            None => {
                if seen.len() < CALLSITES_MAX {
                    seen.insert(id, (now, 0));
                }
                true
            }
        }
    }
}

impl<S: Subscriber> Filter<S> for RepeatLimiter {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        self.allow(meta, Instant::now())
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if Self::limited(meta) {
            Interest::sometimes() // decided per event
        } else {
            Interest::always()
        }
    }
}

/// Sets up `tracing` output to stderr (`RUST_LOG` filters; default `default_filter`).
pub fn init(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let all = std::env::var("UNID_LOG_REPEATS").is_ok_and(|v| v == "all");
    let limiter = (!all).then(RepeatLimiter::default);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt.with_filter(limiter))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;
    use tracing::callsite::DefaultCallsite;
    use tracing::field::FieldSet;
    use tracing::metadata::Kind;

    static OPENRAFT_CS: DefaultCallsite = DefaultCallsite::new(&OPENRAFT);
    static OPENRAFT: Metadata<'static> = Metadata::new(
        "event openraft/src/replication/mod.rs:258",
        "openraft::replication",
        Level::WARN,
        Some("openraft/src/replication/mod.rs"),
        Some(258),
        None,
        FieldSet::new(&["message"], tracing::callsite::Identifier(&OPENRAFT_CS)),
        Kind::EVENT,
    );
    static OURS_CS: DefaultCallsite = DefaultCallsite::new(&OURS);
    static OURS: Metadata<'static> = Metadata::new(
        "event engine/src/server.rs:1",
        "unid_engine::server",
        Level::WARN,
        None,
        None,
        None,
        FieldSet::new(&["message"], tracing::callsite::Identifier(&OURS_CS)),
        Kind::EVENT,
    );

    #[test]
    fn openraft_repeats_pass_once_per_window_and_ours_always() {
        let l = RepeatLimiter::default();
        let t0 = Instant::now();
        assert!(l.allow(&OPENRAFT, t0));
        for i in 1..1000 {
            assert!(!l.allow(&OPENRAFT, t0 + Duration::from_millis(i)));
        }
        for i in 0..1000 {
            assert!(l.allow(&OURS, t0 + Duration::from_millis(i)));
        }
        assert!(l.allow(&OPENRAFT, t0 + REPEAT_WINDOW));
        assert!(!l.allow(&OPENRAFT, t0 + REPEAT_WINDOW + Duration::from_secs(1)));
    }
}
