//! The invariants, one per file, checked continuously: every observation
//! (a grant, a committed raise, a leader, a consumed range, a tick) is
//! checked the moment it happens, and the run stops at the first violation.
//!
//! | file | invariant |
//! |---|---|
//! | [`unique`] | no id is granted twice |
//! | [`ceilings`] | a leader grants only below a ceiling committed in its leadership, and above every ceiling committed by an earlier leader |
//! | [`increasing`] | each consumer's ids increase |
//! | [`width`] | every granted id is in its sequence's range (`start ..` the width's limit) |
//! | [`one_leader`] | at most one leader per term grants (openraft may elect two; see the file) |
//! | [`progress`] | with a majority up and connected, the cluster grants within a bound |
//! | [`recovery`] | a crashed server restarts from what its disk kept (torn commits included) |
//!
//! The observations come from the glue (grants, raises, leaders) and the
//! agents (consumption); see [`crate::server`] and [`crate::agent`].

pub mod ceilings;
pub mod increasing;
pub mod one_leader;
pub mod progress;
pub mod recovery;
pub mod unique;
pub mod width;

use std::sync::{Arc, Mutex, MutexGuard};

use unid_proto::{Id, NodeId, Width};

use crate::trace::{Event, Trace};

/// A violated invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which invariant (its file name).
    pub invariant: &'static str,
    /// Simulated time, in microseconds since the start of the run.
    pub at_us: u64,
    /// What was seen.
    pub detail: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} violated at {:.3} ms: {}",
            self.invariant,
            self.at_us as f64 / 1000.0,
            self.detail
        )
    }
}

/// Every invariant's state, and the trace.
#[derive(Debug)]
pub struct Checker {
    unique: unique::Unique,
    ceilings: ceilings::Ceilings,
    increasing: increasing::Increasing,
    width: width::InWidth,
    one_leader: one_leader::OneLeader,
    progress: progress::Progress,
    trace: Trace,
    violations: Vec<Violation>,
    grants: u64,
    granting_server_max: NodeId,
    ids_consumed: u128,
    /// Invariants not enforced (tests only: to show that one invariant alone
    /// catches a bug another would catch first).
    skipped: Vec<&'static str>,
}

/// Counters of what the checker saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// Blocks granted.
    pub grants: u64,
    /// Ids consumed.
    pub ids_consumed: u128,
    /// The highest id of a server that granted a block (above the initial servers' ids: a
    /// server added during the run led and granted).
    pub granting_server_max: NodeId,
    /// Terms with an elected leader.
    pub leaders: u64,
    /// Terms in which openraft elected two or more leaders (see
    /// [`one_leader`]).
    pub shared_terms: u64,
    /// The longest wait from the start of a calm period to its first
    /// grant, in microseconds.
    pub recovery_us_max: u64,
    /// Events in the trace.
    pub events: u64,
    /// The trace digest.
    pub digest: u64,
}

/// The checker, shared by every task of a run.
#[derive(Clone, Debug)]
pub struct Observer {
    inner: Arc<Mutex<Checker>>,
}

impl Observer {
    /// A checker with nothing seen; `progress_bound_us` is the progress
    /// invariant's bound.
    pub fn new(verbose: bool, progress_bound_us: u64, skipped: Vec<&'static str>) -> Observer {
        Observer {
            inner: Arc::new(Mutex::new(Checker {
                unique: unique::Unique::default(),
                ceilings: ceilings::Ceilings::default(),
                increasing: increasing::Increasing::default(),
                width: width::InWidth::default(),
                one_leader: one_leader::OneLeader::default(),
                progress: progress::Progress::new(progress_bound_us),
                trace: Trace::new(verbose),
                violations: Vec::new(),
                grants: 0,
                granting_server_max: 0,
                ids_consumed: 0,
                skipped,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Checker> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(c: &mut Checker, at_us: u64, invariant: &'static str, r: Result<(), String>) {
        if let Err(detail) = r {
            if c.skipped.contains(&invariant) {
                return;
            }
            if c.violations.is_empty() {
                c.trace.record(
                    at_us,
                    &Event::Fault(format!("VIOLATION {invariant}: {detail}")),
                );
            }
            c.violations.push(Violation {
                invariant,
                at_us,
                detail,
            });
        }
    }

    /// Records a fault or repair of the schedule.
    pub fn fault(&self, now_us: u64, what: String) {
        self.lock().trace.record(now_us, &Event::Fault(what));
    }

    /// A sequence exists with this width and start (its first ceiling).
    pub fn sequence(&self, name: &str, width: Width, start: Id) {
        let mut c = self.lock();
        c.width.sequence(name, width, start);
    }

    /// `server` believes it leads `term`.
    pub fn leader(&self, now_us: u64, server: NodeId, term: u64) {
        let mut c = self.lock();
        c.trace.record(now_us, &Event::Leader { server, term });
        c.one_leader.elected(server, term);
    }

    /// `server`, leading `term`, read these ceilings with `ready_state` and
    /// installed its allocator.
    pub fn ready(&self, now_us: u64, server: NodeId, term: u64, ceilings: &[(String, Id)]) {
        let mut c = self.lock();
        c.trace.record(now_us, &Event::Ready { server, term });
        let r = c.one_leader.ready(server, term);
        Self::fail(&mut c, now_us, "one_leader", r);
        for (name, ceiling) in ceilings {
            c.ceilings.known(name, (term, server), *ceiling);
        }
    }

    /// `server`, leading `term`, committed `ceiling` for `sequence`.
    pub fn committed(&self, now_us: u64, server: NodeId, term: u64, sequence: &str, ceiling: Id) {
        let mut c = self.lock();
        c.trace.record(
            now_us,
            &Event::Committed {
                server,
                term,
                sequence: sequence.to_owned(),
                ceiling,
            },
        );
        let r = c.ceilings.committed(sequence, (term, server), ceiling);
        Self::fail(&mut c, now_us, "ceilings", r);
    }

    /// `server`, leading `term`, granted `first .. first + count`.
    pub fn granted(
        &self,
        now_us: u64,
        server: NodeId,
        term: u64,
        sequence: &str,
        first: Id,
        count: u64,
    ) {
        let mut c = self.lock();
        c.trace.record(
            now_us,
            &Event::Granted {
                server,
                term,
                sequence: sequence.to_owned(),
                first,
                count,
            },
        );
        c.grants += 1;
        c.granting_server_max = c.granting_server_max.max(server);
        let r = c.width.granted(sequence, first, count);
        Self::fail(&mut c, now_us, "width", r);
        let r = c.unique.granted(sequence, server, term, first, count);
        Self::fail(&mut c, now_us, "unique", r);
        let r = c.ceilings.granted(sequence, (term, server), first, count);
        Self::fail(&mut c, now_us, "ceilings", r);
        c.progress.granted(now_us);
    }

    /// Consumer `consumer` took `first .. first + count` of `sequence`.
    pub fn consumed(&self, now_us: u64, consumer: usize, sequence: &str, first: Id, count: u64) {
        let mut c = self.lock();
        c.trace.record(
            now_us,
            &Event::Consumed {
                consumer,
                first,
                count,
            },
        );
        c.ids_consumed += u128::from(count);
        let r = c.increasing.consumed(consumer, sequence, first, count);
        Self::fail(&mut c, now_us, "increasing", r);
    }

    /// A calm period starts (or ends, with `calm == false`): a majority of
    /// servers up and connected, no faults.
    pub fn calm(&self, now_us: u64, calm: bool) {
        let mut c = self.lock();
        c.progress.calm(now_us, calm);
    }

    /// Checks the time-based invariants at `now_us`.
    pub fn tick(&self, now_us: u64) {
        let mut c = self.lock();
        let r = c.progress.check(now_us);
        Self::fail(&mut c, now_us, "progress", r);
    }

    /// Server `server` could not restart from its disk: a durability bug
    /// (see [`recovery`]).
    pub fn restart_failed(&self, now_us: u64, server: NodeId, error: String) {
        let mut c = self.lock();
        let r = recovery::restarted(server, Err(error));
        Self::fail(&mut c, now_us, "recovery", r);
    }

    /// Whether anything was violated.
    pub fn failed(&self) -> bool {
        !self.lock().violations.is_empty()
    }

    /// Every violation so far.
    pub fn violations(&self) -> Vec<Violation> {
        self.lock().violations.clone()
    }

    /// Counters and the trace digest.
    pub fn seen(&self) -> Seen {
        let c = self.lock();
        Seen {
            grants: c.grants,
            granting_server_max: c.granting_server_max,
            ids_consumed: c.ids_consumed,
            leaders: c.one_leader.terms(),
            shared_terms: c.one_leader.shared_terms(),
            recovery_us_max: c.progress.recovery_us_max(),
            events: c.trace.events(),
            digest: c.trace.digest(),
        }
    }
}
