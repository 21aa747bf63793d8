//! Ceiling raises: proposed by the allocator, committed by the driver through this node's
//! Raft, and applied only to the allocator of the term that proposed them.

use unid_core::Raise;
use unid_proto::Id;

use super::stats::bump;
use super::{Action, Phase, RAISES_PER_TURN_MAX, Server};

impl Server {
    /// Asks for the raises the allocator wants now (at most [`RAISES_PER_TURN_MAX`]).
    pub fn propose_raises(&mut self, now_us: u64) {
        if self.phase != Phase::Leading {
            return;
        }
        let term = self.term;
        let Some(alloc) = self.allocator.as_mut() else {
            return;
        };
        for _ in 0..RAISES_PER_TURN_MAX {
            match alloc.poll_raise(now_us) {
                Some(raise) => self.actions.push_back(Action::Raise { term, raise }),
                None => break,
            }
        }
    }

    /// The result of an [`Action::Raise`] proposed in `term`: the committed ceiling and the
    /// term of the log entry that committed it, or why it failed; `took_us` from proposal to
    /// result. Applied only to the allocator of that term: a raise committed for an
    /// allocator since replaced is ignored.
    pub fn on_raise_done(
        &mut self,
        now_us: u64,
        term: u64,
        raise: &Raise,
        outcome: Result<(Id, u64), String>,
        took_us: u64,
    ) {
        let id = self.config.id;
        if let (Some(p), Ok((ceiling, entry_term))) = (&self.probe, &outcome) {
            // Committed by this node as leader of the entry's term (which is `term` unless
            // leadership moved meanwhile), whatever the machine does with it next.
            p.committed(now_us, id, *entry_term, raise.sequence.as_str(), *ceiling);
        }
        if self.phase != Phase::Leading || self.term != term {
            return; // That allocator is gone.
        }
        let Some(alloc) = self.allocator.as_mut() else {
            return;
        };
        match outcome {
            Ok((ceiling, _)) => {
                bump(&self.stats.raises_committed);
                self.counters.raise_latency.observe_us(took_us);
                match alloc.on_raise_committed(&raise.sequence, ceiling) {
                    Ok(()) => {}
                    Err(e) => {
                        // The committed ceiling is above anything this allocator proposed:
                        // entries it never read raised it. Either another leader did (then
                        // this one is deposed, and the new ready read fails until consensus
                        // reports the new leader), or this node's own earlier incarnation in
                        // this same term did: openraft restores a leader after a restart,
                        // and its ready read need not cover the entries of its own term the
                        // crash left unapplied. In both cases nothing this allocator knows
                        // may be granted from: it is dropped before any grant above the
                        // ceiling it read, and the server warms up again in this term, so
                        // that a ready read (which now covers this raise) builds the next
                        // allocator from the higher ceiling. Going back to following
                        // instead left a restored leader that Raft keeps as leader but that
                        // never grants again.
                        tracing::warn!(sequence = %raise.sequence.as_str(), term, "raise refused ({e}); dropping the allocator and reading the committed ceilings again");
                        self.drop_allocator("a ceiling this leader did not propose");
                        bump(&self.stats.rewarms);
                        self.warm_up(term);
                    }
                }
            }
            Err(e) => {
                bump(&self.stats.raises_failed);
                tracing::warn!(sequence = %raise.sequence.as_str(), ceiling = %raise.ceiling, "raise failed: {e}");
                let _ = alloc.on_raise_failed(now_us, &raise.sequence, raise.ceiling);
            }
        }
    }
}
