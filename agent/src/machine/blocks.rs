//! One sequence's blocks: the checks a grant must pass before its ids may enter the ring
//! (its sequence and width, above every id accepted before, no larger than asked), the
//! refill decision (one request in flight, sized from the measured rate, `blocks_ahead`
//! blocks kept), block errors, and the ring accounting that feeds both: ids handed out
//! in `Write`s minus those the ring refused minus those consumers took.

use unid_core::Sizer;
use unid_proto::{ErrorCode, SeqNo, SequenceName, Width};

use super::link::Req;
use super::{Machine, Output, SequenceView};
use crate::SequenceState;

/// How long to wait before asking again for a sequence the cluster does not know, or
/// after a ring error, in microseconds.
const RETRY_SLOW_US: u64 = 2_000_000;
/// After a takeover, blocks are sized at least from the peer's last reported rate for
/// this long (until this side has measured its own), in microseconds.
const TAKEOVER_HINT_US: u64 = 2_000_000;

/// One sequence's refill state.
pub(super) struct Seq {
    pub(super) name: SequenceName,
    width: Option<Width>,
    /// Every id accepted so far is below this.
    next_min: u128,
    sizer: Sizer,
    pub(super) inflight: Option<SeqNo>,
    block_ids: u64,
    pub(super) state: SequenceState,
    pub(super) retry_at_us: u64,
    /// The I/O side opened the ring (after an `OpenRing`).
    ring_open: bool,
    /// A grant waiting for its ring to open: first, count, when its request was sent.
    opening: Option<(u128, u64, u64)>,
    /// Ids handed out in `Write`s.
    written: u128,
    /// Of those, ids the ring refused.
    refused: u128,
    /// Of those, ids consumers took (as last reported).
    taken: u128,
    /// After a takeover: ask for a block now, whatever the ring holds (the ring's blocks
    /// may lie below ids the peer's consumers already took).
    force_refill: bool,
    /// After a takeover: the peer's rate (ids/s), a floor for block sizes until
    /// `hint_until_us`.
    rate_hint: f64,
    hint_until_us: u64,
}

impl Seq {
    pub(super) fn new(name: SequenceName, sizer: Sizer) -> Seq {
        Seq {
            name,
            width: None,
            next_min: 0,
            sizer,
            inflight: None,
            block_ids: 0,
            state: SequenceState::Waiting,
            retry_at_us: 0,
            ring_open: false,
            opening: None,
            written: 0,
            refused: 0,
            taken: 0,
            force_refill: false,
            rate_hint: 0.0,
            hint_until_us: 0,
        }
    }

    /// Ids written and not taken: in the ring, or held by the I/O side until slots free.
    fn ahead(&self) -> u64 {
        let ahead = self.written.saturating_sub(self.refused + self.taken);
        ahead.min(u128::from(u64::MAX)) as u64
    }

    pub(super) fn view(&self, now_us: u64) -> SequenceView {
        SequenceView {
            name: self.name.clone(),
            width: self.width,
            state: self.state.clone(),
            next_min: self.next_min,
            rate_ids_per_s: self.sizer.rate_ids_per_s(now_us),
            block_ids: self.block_ids,
            ids_ahead: self.ahead(),
        }
    }
}

impl Machine {
    /// Reports that consumers have taken `taken_total` ids from ring `index` since it
    /// opened (cumulative: ids written to it minus ids still in it; ids the I/O side still
    /// holds for lack of slots are not taken). Feeds the rate measurement; the refill
    /// decision runs in the next [`handle_timeout`](Self::handle_timeout).
    pub fn handle_ring_taken(&mut self, now_us: u64, index: usize, taken_total: u128) {
        let s = &mut self.seqs[index];
        if taken_total <= s.taken {
            return;
        }
        let delta = taken_total - s.taken;
        s.sizer
            .record_consumed(now_us, delta.min(u128::from(u64::MAX)) as u64);
        s.taken = taken_total;
        if s.ahead() == 0 {
            self.counters.ring_empty_events += 1;
        }
    }

    /// The answer to [`Output::OpenRing`]: `Ok` if ring `index` exists now, or why not
    /// (the sequence shows `RingError`, the waiting grant is dropped and a block is asked
    /// for again after a while).
    pub fn handle_ring_opened(&mut self, now_us: u64, index: usize, result: Result<(), String>) {
        let s = &mut self.seqs[index];
        let Some((first, count, sent_us)) = s.opening.take() else {
            return;
        };
        match result {
            Ok(()) => {
                s.ring_open = true;
                self.grant_ready(now_us, index, first, count, sent_us);
            }
            Err(text) => {
                if s.state != SequenceState::RingError(text.clone()) {
                    tracing::error!(sequence = %s.name, "cannot create ring: {text}");
                }
                s.state = SequenceState::RingError(text);
                s.retry_at_us = now_us + RETRY_SLOW_US;
                // The block is dropped: lost, never repeated.
            }
        }
    }

    /// Ring `index` refused `count` ids of a [`Output::Write`] (never retried: dropping
    /// them loses ids, never repeats them).
    pub fn handle_ring_refused(&mut self, index: usize, count: u64) {
        self.seqs[index].refused += u128::from(count);
        self.counters.grants_rejected += 1;
    }

    /// This agent just became active after standing by (pairing): ask every sequence for
    /// a block now, sized at least from the rate the peer reported (`peer_rates`, by
    /// sequence name) for a while.
    pub fn take_over(&mut self, now_us: u64, peer_rates: &[(String, f64)]) {
        for s in &mut self.seqs {
            s.force_refill = true;
            s.rate_hint = peer_rates
                .iter()
                .find(|(n, _)| n == s.name.as_str())
                .map_or(0.0, |(_, r)| *r);
            s.hint_until_us = now_us + TAKEOVER_HINT_US;
        }
        // Ask now, not at the next tick.
        for index in 0..self.seqs.len() {
            self.refill(now_us, index);
        }
    }

    /// Asks for a block for sequence `index` if it is due.
    pub(super) fn refill(&mut self, now: u64, index: usize) {
        let registered = self.reg.node_id != 0;
        let blocks_ahead = u64::from(self.config.blocks_ahead);
        let s = &mut self.seqs[index];
        if !registered || s.inflight.is_some() || s.opening.is_some() || now < s.retry_at_us {
            return;
        }
        if matches!(s.state, SequenceState::Exhausted) {
            return;
        }
        let width = s.width.unwrap_or(Width::W8);
        let block = match s.sizer.block_ids(now, width, s.next_min) {
            Ok(b) if now < s.hint_until_us => {
                // Sized at least for the rate the peer served (capped like any block; the
                // server may grant fewer).
                let sizing = &self.config.sizing;
                let hint = (s.rate_hint * sizing.refill_period_ms as f64 / 1000.0).ceil() as u64;
                b.max(hint.min(sizing.block_ids_max))
            }
            Ok(b) => b,
            Err(_) => {
                if s.state != SequenceState::Exhausted {
                    tracing::warn!(sequence = %s.name, "sequence exhausted: no ids left in its width");
                }
                s.state = SequenceState::Exhausted;
                return;
            }
        };
        if s.ahead() >= block.saturating_mul(blocks_ahead) && !s.force_refill {
            return;
        }
        s.block_ids = block;
        if let Some(seq) = self.link.send(
            now,
            Req::Block {
                index,
                count: block,
            },
        ) {
            self.seqs[index].inflight = Some(seq);
            self.seqs[index].force_refill = false;
            self.counters.block_requests += 1;
        }
    }

    /// A grant for sequence `index` (asked `asked` ids at `sent_us`): checked, then
    /// written (once its ring is open).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_grant(
        &mut self,
        now: u64,
        index: usize,
        asked: u64,
        sent_us: u64,
        sequence: &str,
        width: Width,
        first: u128,
        count: u64,
    ) {
        let s = &mut self.seqs[index];
        let reject = if sequence != s.name.as_str() {
            Some("for another sequence")
        } else if s.width.is_some_and(|w| w != width) {
            Some("with another width")
        } else if first < s.next_min {
            Some("not above the previous block")
        } else if count > asked {
            Some("larger than asked")
        } else {
            None
        };
        if let Some(why) = reject {
            self.counters.grants_rejected += 1;
            tracing::error!(sequence = %s.name, "dropped a grant {why}: {first}+{count} (ids below {} already held)", s.next_min);
            return;
        }
        // Checked by the codec (`Block::new`): the block fits its width.
        let end = first + u128::from(count);
        assert!(end > s.next_min && first >= s.next_min);
        s.next_min = end;
        self.counters.grants += 1;
        self.counters.ids_granted += count;
        if s.width.is_none() {
            s.width = Some(width);
        }
        if !s.ring_open {
            debug_assert!(s.opening.is_none(), "one request in flight per sequence");
            s.opening = Some((first, count, sent_us));
            self.outputs.push_back(Output::OpenRing { index, width });
            return;
        }
        self.grant_ready(now, index, first, count, sent_us);
    }

    /// A checked grant whose ring is open: into the ring, and maybe the next request.
    fn grant_ready(&mut self, now: u64, index: usize, first: u128, count: u64, sent_us: u64) {
        let s = &mut self.seqs[index];
        if s.state != SequenceState::Serving {
            tracing::info!(sequence = %s.name, "serving");
            s.state = SequenceState::Serving;
        }
        s.written += u128::from(count);
        self.outputs.push_back(Output::Write {
            index,
            first,
            count,
        });
        let latency = now.saturating_sub(sent_us);
        self.counters.refill_latency_us_last = latency;
        self.counters.refill_latency_us_max = self.counters.refill_latency_us_max.max(latency);
        // Maybe ask for the next block at once.
        self.refill(now, index);
    }

    /// A block request for sequence `index` answered with an error.
    pub(super) fn on_block_refused(&mut self, now: u64, index: usize, code: ErrorCode) {
        let s = &mut self.seqs[index];
        let state = match code {
            // That seq was answered already and the answer was lost (and left the server's
            // cache): ask again, at once, under a new seq.
            ErrorCode::Replayed => {
                tracing::debug!(sequence = %s.name, "block request answered Replayed: asking again");
                return;
            }
            ErrorCode::UnknownSequence => SequenceState::UnknownSequence,
            ErrorCode::Exhausted => SequenceState::Exhausted,
            other => {
                tracing::warn!(sequence = %s.name, "block request refused: {other:?}");
                s.retry_at_us = now + RETRY_SLOW_US;
                return;
            }
        };
        if s.state != state {
            tracing::warn!(sequence = %s.name, "cluster says {state:?}");
        }
        s.state = state;
        s.retry_at_us = now + RETRY_SLOW_US;
    }

    /// Per sequence: name, measured rate (ids/s), end of the last block accepted (for the
    /// pair heartbeat).
    pub fn pair_sequences(&self, now_us: u64) -> Vec<(String, f64, u128)> {
        self.seqs
            .iter()
            .map(|s| {
                (
                    s.name.as_str().to_owned(),
                    s.sizer.rate_ids_per_s(now_us),
                    s.next_min,
                )
            })
            .collect()
    }
}
