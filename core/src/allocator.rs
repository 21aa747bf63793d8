//! The leader's allocator: grants blocks below a ceiling committed through
//! consensus, and asks for that ceiling to be raised ahead of demand.
//!
//! # State machine (per sequence)
//!
//! ```text
//!            next                committed_ceiling          proposed (outstanding raise)
//!   ... ─────┼────── grantable ───────┼──────── not yet usable ────┼───── ... width limit
//! ```
//!
//! - `committed_ceiling` (exclusive): every id below it is covered by a
//!   ceiling that consensus has committed. Only ids in `next ..
//!   committed_ceiling` are granted, in increasing order, each block at most
//!   `block_ids_max'` ids (see [`AllocatorConfig`]).
//! - At most one raise is outstanding per sequence. [`poll_raise`] proposes
//!   one when the headroom `committed_ceiling − next` falls below the
//!   low-water mark of half a window; the new ceiling is `next + window`
//!   (capped at the width's limit), where
//!
//!   ```text
//!   window = clamp(rate_ids_per_s × raise_lead_ms / 1000, window_ids_min', window_ids_max')
//!   ```
//!
//!   and `rate_ids_per_s` is the time-decayed grant rate ([`crate::rate`]).
//!   At the low-water mark the leader still has `raise_lead_ms / 2` of demand
//!   in hand, so with `raise_lead_ms` at least twice the consensus commit
//!   latency, grants never wait on consensus in steady state.
//! - [`on_raise_committed`] applies a committed ceiling with max semantics (a
//!   repeat or a lower value is a no-op). [`on_raise_failed`] drops the
//!   outstanding raise; a new one is proposed after `raise_retry_ms`.
//!
//! # Leader change
//!
//! A new leader is built with [`LeaderAllocator::new`] from the committed
//! ceilings and starts at them: `next = committed_ceiling`. It therefore has
//! no headroom and answers [`Error::NotReady`] until its first raise commits;
//! [`poll_raise`] asks for that raise at once.
//!
//! **Ids lost**: ids an old leader never granted between its `next` and the
//! committed ceiling are skipped, never reused. Because a raise is sized from
//! `next`, `committed_ceiling − next <= window_ids_max'` at all times, so one
//! leader change loses at most `window_ids_max'` ids per sequence (for 2-byte
//! sequences, at most 255 = 0.39 % of the space; see [`crate::sequence`]).
//!
//! **Safety contract with consensus** (what makes "no id granted twice"
//! hold across leaders):
//!
//! 1. Build the allocator only once every raise an older leader could still
//!    get committed has been applied. In Raft: after this leader's first entry
//!    of its term (openraft's blank entry) is applied; from then on entries
//!    of older terms cannot commit. `unid-consensus`'s
//!    `ConsensusNode::ready_ceilings` reads exactly these ceilings
//!    (`ensure_linearizable`, then the applied state).
//! 2. The replicated ceiling is applied with max semantics.
//! 3. Report to each allocator only the commits of raises it proposed. A
//!    ceiling above anything it proposed is refused with
//!    [`Error::CeilingNotProposed`] (it would be another leader's range).
//!
//! Old leaders that are partitioned away may keep granting below ceilings
//! they saw committed: those ranges are below the new leader's start.
//!
//! [`poll_raise`]: LeaderAllocator::poll_raise
//! [`on_raise_committed`]: LeaderAllocator::on_raise_committed
//! [`on_raise_failed`]: LeaderAllocator::on_raise_failed

use std::collections::BTreeMap;

use unid_proto::{Block, Id, SequenceName, Width};

use crate::Error;
use crate::rate::{RATE_TAU_MS_MAX, Rate};
use crate::sequence::{block_ids_cap, carve, ids_left, saturate_u64, window_ids_cap};

/// The longest `raise_lead_ms` and `raise_retry_ms` accepted (one minute).
pub const RAISE_MS_MAX: u64 = 60 * 1000;

/// The most sequences one allocator may be configured for.
pub const SEQUENCES_MAX_LIMIT: usize = 1 << 20;

/// Configuration of a [`LeaderAllocator`].
///
/// Per width, windows and blocks are further capped by
/// [`window_ids_cap`] and [`block_ids_cap`]: `window_ids_max' =
/// min(window_ids_max, window_ids_cap(width))`, `window_ids_min' =
/// min(window_ids_min, window_ids_max')`, `block_ids_max' = min(block_ids_max,
/// block_ids_cap(width))`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocatorConfig {
    /// How far ahead of demand the ceiling is raised, in milliseconds of the
    /// current grant rate (`1..=RAISE_MS_MAX`). Set it to at least twice the
    /// consensus commit latency.
    pub raise_lead_ms: u64,
    /// Time constant of the grant-rate estimate, in milliseconds
    /// (`1..=RATE_TAU_MS_MAX`).
    pub rate_tau_ms: u64,
    /// Smallest raise window, in ids (`>= 1`).
    pub window_ids_min: u64,
    /// Largest raise window, in ids (`>= window_ids_min`, `>= block_ids_max`).
    pub window_ids_max: u64,
    /// Largest block granted to one request, in ids (`>= 1`).
    pub block_ids_max: u64,
    /// Wait after a failed raise before proposing another, in milliseconds
    /// (`<= RAISE_MS_MAX`).
    pub raise_retry_ms: u64,
    /// Most sequences held (`1..=SEQUENCES_MAX_LIMIT`).
    pub sequences_max: usize,
}

impl AllocatorConfig {
    /// Defaults: 200 ms lead, 1 s rate constant, windows of 4 Ki ..= 64 Mi
    /// ids, blocks of at most 1 Mi ids, 10 ms retry, 4096 sequences.
    pub const DEFAULT: AllocatorConfig = AllocatorConfig {
        raise_lead_ms: 200,
        rate_tau_ms: 1000,
        window_ids_min: 4096,
        window_ids_max: 1 << 26,
        block_ids_max: 1 << 20,
        raise_retry_ms: 10,
        sequences_max: 4096,
    };

    /// Checks every bound.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field, reason| Err(Error::InvalidConfig { field, reason });
        if !(1..=RAISE_MS_MAX).contains(&self.raise_lead_ms) {
            return bad("raise_lead_ms", "must be in 1..=RAISE_MS_MAX");
        }
        if !(1..=RATE_TAU_MS_MAX).contains(&self.rate_tau_ms) {
            return bad("rate_tau_ms", "must be in 1..=RATE_TAU_MS_MAX");
        }
        if self.window_ids_min == 0 {
            return bad("window_ids_min", "must be at least 1");
        }
        if self.window_ids_max < self.window_ids_min {
            return bad("window_ids_max", "must be at least window_ids_min");
        }
        if self.block_ids_max == 0 {
            return bad("block_ids_max", "must be at least 1");
        }
        if self.window_ids_max < self.block_ids_max {
            return bad("window_ids_max", "must be at least block_ids_max");
        }
        if self.raise_retry_ms > RAISE_MS_MAX {
            return bad("raise_retry_ms", "must be at most RAISE_MS_MAX");
        }
        if !(1..=SEQUENCES_MAX_LIMIT).contains(&self.sequences_max) {
            return bad("sequences_max", "must be in 1..=SEQUENCES_MAX_LIMIT");
        }
        Ok(())
    }

    /// The largest window for `width`, in ids.
    pub fn window_ids_max_for(&self, width: Width) -> u64 {
        self.window_ids_max.min(window_ids_cap(width))
    }

    /// The smallest window for `width`, in ids.
    pub fn window_ids_min_for(&self, width: Width) -> u64 {
        self.window_ids_min.min(self.window_ids_max_for(width))
    }

    /// The largest block granted for `width`, in ids.
    pub fn block_ids_max_for(&self, width: Width) -> u64 {
        self.block_ids_max.min(block_ids_cap(width))
    }
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        AllocatorConfig::DEFAULT
    }
}

/// A sequence's committed ceiling, as read from the replicated state machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommittedCeiling {
    /// The sequence.
    pub sequence: SequenceName,
    /// Its width.
    pub width: Width,
    /// Its committed ceiling (exclusive; `<= width.limit()`). For a sequence
    /// never raised, its first id.
    pub ceiling: Id,
}

/// A request to raise a sequence's ceiling through consensus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Raise {
    /// The sequence.
    pub sequence: SequenceName,
    /// The proposed ceiling (exclusive). The replicated state applies it as
    /// `ceiling = max(ceiling, proposed)`.
    pub ceiling: Id,
}

/// Counters kept by a [`LeaderAllocator`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllocatorStats {
    /// Blocks granted.
    pub grants: u64,
    /// Ids granted, summed over blocks.
    pub ids_granted: u128,
    /// Grants shortened because they asked beyond the headroom or the limit.
    pub grants_partial: u64,
    /// Requests refused with [`Error::NotReady`].
    pub not_ready: u64,
    /// Requests refused with [`Error::AwaitingRaise`] (a stall: demand
    /// outran the raise lead).
    pub awaiting_raise: u64,
    /// Requests refused with [`Error::Exhausted`].
    pub exhausted: u64,
    /// Raises proposed.
    pub raises_proposed: u64,
    /// Commits applied that raised the ceiling.
    pub raises_committed: u64,
    /// Raises reported failed.
    pub raises_failed: u64,
    /// Commits refused ([`Error::CeilingNotProposed`], out of range).
    pub commits_refused: u64,
}

/// What the allocator holds for one sequence (for the engine's status and
/// for tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SequenceView {
    /// The width.
    pub width: Width,
    /// The next id to grant.
    pub next: Id,
    /// Ids below this are committed (exclusive).
    pub committed_ceiling: Id,
    /// The outstanding raise's ceiling, if any.
    pub raise: Option<Id>,
    /// Whether a raise of this leader has committed (grants allowed).
    pub ready: bool,
}

#[derive(Clone, Debug)]
struct SequenceState {
    width: Width,
    /// The ceiling this leader started from.
    initial_ceiling: Id,
    committed_ceiling: Id,
    next: Id,
    /// The outstanding raise, if any.
    raise: Option<Id>,
    /// Highest ceiling this leader ever proposed (or started from).
    proposed_max: Id,
    /// No raise is proposed before this time (after a failure).
    retry_at_us: u64,
    rate: Rate,
}

impl SequenceState {
    fn ready(&self) -> bool {
        self.committed_ceiling > self.initial_ceiling
    }

    fn check(&self) {
        let limit = self.width.limit();
        debug_assert!(self.initial_ceiling <= self.next);
        debug_assert!(self.next <= self.committed_ceiling);
        debug_assert!(self.committed_ceiling <= self.proposed_max);
        debug_assert!(self.proposed_max <= limit);
        debug_assert!(
            self.raise
                .is_none_or(|r| r > self.committed_ceiling && r <= limit)
        );
    }
}

/// The leader's allocator for every sequence. See the module docs.
#[derive(Clone, Debug)]
pub struct LeaderAllocator {
    config: AllocatorConfig,
    sequences: BTreeMap<SequenceName, SequenceState>,
    now_us: u64,
    stats: AllocatorStats,
}

impl LeaderAllocator {
    /// A new leader's allocator, built from the committed ceilings (see the
    /// safety contract in the module docs). Every sequence starts with `next =
    /// ceiling` and is not ready until its first raise commits.
    pub fn new(
        config: AllocatorConfig,
        now_us: u64,
        ceilings: impl IntoIterator<Item = CommittedCeiling>,
    ) -> Result<LeaderAllocator, Error> {
        config.validate()?;
        let mut allocator = LeaderAllocator {
            config,
            sequences: BTreeMap::new(),
            now_us,
            stats: AllocatorStats::default(),
        };
        for c in ceilings {
            allocator.add_sequence(now_us, c)?;
        }
        Ok(allocator)
    }

    /// Adds a sequence created while this leader leads (its creation was
    /// committed in this term), from its committed ceiling. Like a sequence
    /// at construction, it is not ready until its first raise commits.
    pub fn add_sequence(&mut self, now_us: u64, c: CommittedCeiling) -> Result<(), Error> {
        let now_us = self.tick(now_us);
        if c.ceiling > c.width.limit() {
            return Err(Error::CeilingOutOfRange {
                ceiling: c.ceiling,
                limit: c.width.limit(),
            });
        }
        if self.sequences.contains_key(&c.sequence) {
            return Err(Error::DuplicateSequence);
        }
        if self.sequences.len() >= self.config.sequences_max {
            return Err(Error::TooManySequences {
                max: self.config.sequences_max,
            });
        }
        let state = SequenceState {
            width: c.width,
            initial_ceiling: c.ceiling,
            committed_ceiling: c.ceiling,
            next: c.ceiling,
            raise: None,
            proposed_max: c.ceiling,
            retry_at_us: now_us,
            rate: Rate::new(now_us, self.config.rate_tau_ms),
        };
        state.check();
        self.sequences.insert(c.sequence, state);
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &AllocatorConfig {
        &self.config
    }

    /// The counters.
    pub fn stats(&self) -> &AllocatorStats {
        &self.stats
    }

    /// Whether a raise of some sequence is outstanding (proposed, neither committed nor
    /// failed yet).
    pub fn raise_outstanding(&self) -> bool {
        self.sequences.values().any(|s| s.raise.is_some())
    }

    /// What the allocator holds for `sequence`.
    pub fn sequence(&self, sequence: &SequenceName) -> Option<SequenceView> {
        self.sequences.get(sequence).map(|s| SequenceView {
            width: s.width,
            next: s.next,
            committed_ceiling: s.committed_ceiling,
            raise: s.raise,
            ready: s.ready(),
        })
    }

    /// Grants a block of up to `want_ids` ids of `sequence` at `now_us`.
    ///
    /// The block is the next ids in order, all below the committed ceiling,
    /// at most `block_ids_max'` long; shorter if the headroom or the width
    /// has less left. Errors, in the order checked:
    /// [`Error::UnknownSequence`], [`Error::EmptyRequest`],
    /// [`Error::Exhausted`] (final), [`Error::NotReady`],
    /// [`Error::AwaitingRaise`] (the last two: retry shortly).
    ///
    /// Call [`poll_raise_for`](Self::poll_raise_for) (or
    /// [`poll_raise`](Self::poll_raise)) after grants: a grant may have
    /// crossed the low-water mark.
    pub fn grant(
        &mut self,
        now_us: u64,
        sequence: &SequenceName,
        want_ids: u64,
    ) -> Result<Block, Error> {
        let now_us = self.tick(now_us);
        let block_max = {
            let s = self.sequences.get(sequence).ok_or(Error::UnknownSequence)?;
            self.config.block_ids_max_for(s.width)
        };
        let s = self.sequences.get_mut(sequence).expect("checked above");
        if want_ids == 0 {
            return Err(Error::EmptyRequest);
        }
        if s.next >= s.width.limit() {
            self.stats.exhausted += 1;
            return Err(Error::Exhausted);
        }
        if !s.ready() {
            self.stats.not_ready += 1;
            return Err(Error::NotReady);
        }
        let want = want_ids.min(block_max);
        let block = match carve(s.width, s.next, want, s.committed_ceiling) {
            Ok(block) => block,
            Err(error) => {
                debug_assert_eq!(error, Error::AwaitingRaise);
                self.stats.awaiting_raise += 1;
                return Err(error);
            }
        };
        // The block is the next ids, below the committed ceiling.
        assert_eq!(block.first(), s.next);
        assert!(block.end() <= s.committed_ceiling);
        assert!(block.count() <= block_max);
        s.next = block.end();
        s.rate.record(now_us, block.count());
        s.check();
        if block.count() < want_ids {
            self.stats.grants_partial += 1;
        }
        self.stats.grants += 1;
        self.stats.ids_granted += block.count() as u128;
        Ok(block)
    }

    /// The raise window for `sequence` at `now_us`, in ids: the grant rate ×
    /// `raise_lead_ms`, clamped to `[window_ids_min', window_ids_max']`.
    pub fn window_ids(&self, now_us: u64, sequence: &SequenceName) -> Option<u64> {
        let s = self.sequences.get(sequence)?;
        Some(self.window_of(s, now_us.max(self.now_us)))
    }

    fn window_of(&self, s: &SequenceState, now_us: u64) -> u64 {
        let max = self.config.window_ids_max_for(s.width);
        let min = self.config.window_ids_min_for(s.width);
        let want = (s.rate.per_s(now_us) * self.config.raise_lead_ms as f64 / 1000.0).ceil();
        // `as` saturates: NaN to 0, huge to u64::MAX.
        let window = (want as u64).clamp(min, max);
        debug_assert!(window >= 1);
        window
    }

    /// The next raise to propose, if any sequence needs one: a sequence not
    /// yet ready, or whose headroom is below half a window, with no raise
    /// outstanding, not exhausted, and past its retry time. Call until `None`;
    /// each returned raise is outstanding until reported committed or failed.
    /// Scans every sequence (O(`sequences_max`)); after a grant,
    /// [`poll_raise_for`](Self::poll_raise_for) checks just that sequence.
    pub fn poll_raise(&mut self, now_us: u64) -> Option<Raise> {
        let now_us = self.tick(now_us);
        let (name, target) = self
            .sequences
            .iter()
            .find_map(|(name, s)| self.raise_needed(s, now_us).map(|t| (name, t)))?;
        let name = name.clone();
        Some(self.propose(name, target))
    }

    /// Like [`poll_raise`](Self::poll_raise) for one sequence only
    /// (O(log `sequences_max`)). `None` also for an unknown sequence.
    pub fn poll_raise_for(&mut self, now_us: u64, sequence: &SequenceName) -> Option<Raise> {
        let now_us = self.tick(now_us);
        let s = self.sequences.get(sequence)?;
        let target = self.raise_needed(s, now_us)?;
        Some(self.propose(sequence.clone(), target))
    }

    /// The ceiling to propose for `s` at `now_us`, if it needs a raise.
    fn raise_needed(&self, s: &SequenceState, now_us: u64) -> Option<Id> {
        if s.raise.is_some() || now_us < s.retry_at_us {
            return None;
        }
        let limit = s.width.limit();
        if s.committed_ceiling >= limit {
            return None; // Nothing left to raise to.
        }
        let window = self.window_of(s, now_us);
        let headroom = s.committed_ceiling - s.next;
        let low_water = window.div_ceil(2) as u128;
        if s.ready() && headroom >= low_water {
            return None;
        }
        // Sized from `next`, so `ceiling - next <= window` always holds: the
        // bound on ids lost at a leader change.
        let target = s.next + (window as u128).min(ids_left(s.width, s.next));
        assert!(target > s.committed_ceiling);
        assert!(target <= limit);
        Some(target)
    }

    fn propose(&mut self, name: SequenceName, target: Id) -> Raise {
        let s = self.sequences.get_mut(&name).expect("caller found it");
        debug_assert!(s.raise.is_none());
        s.raise = Some(target);
        s.proposed_max = s.proposed_max.max(target);
        s.check();
        self.stats.raises_proposed += 1;
        Raise {
            sequence: name,
            ceiling: target,
        }
    }

    /// Applies a committed ceiling for `sequence` (max semantics: a repeat or
    /// lower value changes nothing). Pass what consensus answered for this
    /// leader's raise: the replicated ceiling after applying it. Clears the
    /// outstanding raise if this covers it.
    ///
    /// Refuses, without applying, a ceiling above the width's limit or above
    /// anything this leader proposed ([`Error::CeilingNotProposed`]): some
    /// other leader raised the ceiling, so this one is deposed and should be
    /// dropped; its outstanding raise stays outstanding.
    pub fn on_raise_committed(
        &mut self,
        sequence: &SequenceName,
        ceiling: Id,
    ) -> Result<(), Error> {
        let s = self
            .sequences
            .get_mut(sequence)
            .ok_or(Error::UnknownSequence)?;
        if ceiling > s.width.limit() {
            self.stats.commits_refused += 1;
            return Err(Error::CeilingOutOfRange {
                ceiling,
                limit: s.width.limit(),
            });
        }
        if ceiling > s.proposed_max {
            self.stats.commits_refused += 1;
            return Err(Error::CeilingNotProposed {
                ceiling,
                proposed_max: s.proposed_max,
            });
        }
        if ceiling > s.committed_ceiling {
            s.committed_ceiling = ceiling;
            self.stats.raises_committed += 1;
        }
        if s.raise.is_some_and(|r| r <= s.committed_ceiling) {
            s.raise = None;
        }
        s.check();
        Ok(())
    }

    /// Reports that the raise to `ceiling` for `sequence` failed (e.g. lost
    /// leadership, consensus error). If it is the outstanding raise, it is
    /// dropped and another is proposed after `raise_retry_ms`; otherwise
    /// (stale report) nothing changes. A raise reported failed that later
    /// commits after all may still be reported committed.
    pub fn on_raise_failed(
        &mut self,
        now_us: u64,
        sequence: &SequenceName,
        ceiling: Id,
    ) -> Result<(), Error> {
        let now_us = self.tick(now_us);
        let retry_ms = self.config.raise_retry_ms;
        let s = self
            .sequences
            .get_mut(sequence)
            .ok_or(Error::UnknownSequence)?;
        if s.raise == Some(ceiling) {
            s.raise = None;
            s.retry_at_us = now_us.saturating_add(retry_ms.saturating_mul(1000));
            self.stats.raises_failed += 1;
        }
        s.check();
        Ok(())
    }

    /// When to call [`poll_raise`](Self::poll_raise) again if no grant or
    /// report happens first: the earliest pending retry time after a failed
    /// raise, or `None` if no retry is pending.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.sequences
            .values()
            .filter(|s| s.raise.is_none() && s.retry_at_us > self.now_us)
            .map(|s| s.retry_at_us)
            .min()
    }

    fn tick(&mut self, now_us: u64) -> u64 {
        self.now_us = self.now_us.max(now_us);
        self.now_us
    }

    /// The ids left below the width's limit for `sequence` from its `next`.
    pub fn ids_left(&self, sequence: &SequenceName) -> Option<u128> {
        self.sequences
            .get(sequence)
            .map(|s| ids_left(s.width, s.next))
    }

    /// The headroom (committed ceiling − next) for `sequence`, saturated.
    pub fn headroom_ids(&self, sequence: &SequenceName) -> Option<u64> {
        self.sequences
            .get(sequence)
            .map(|s| saturate_u64(s.committed_ceiling - s.next))
    }
}

#[cfg(test)]
mod tests;
