//! Block requests: the agent's lease, the reply cache, the replay window, and the grant from
//! the allocator (below the committed ceiling only: see `unid-core`'s allocator).

use std::net::SocketAddr;

use unid_core::state::ClusterState;
use unid_core::{CommittedCeiling, Lookup};
use unid_proto::{DATAGRAM_BYTES_MAX, ErrorCode, Header, Id, Message, SequenceName};

use super::stats::bump;
use super::{Action, Phase, Server};

impl Server {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn block_request(
        &mut self,
        now_us: u64,
        from: SocketAddr,
        h: Header,
        sequence: &str,
        count: u64,
        req: usize,
        state: &ClusterState,
    ) -> Option<Vec<u8>> {
        let cap = if self.registered(h.sender, state) {
            DATAGRAM_BYTES_MAX
        } else {
            req
        };
        if self.phase != Phase::Leading && self.phase != Phase::Warming {
            return self.not_leader(h.seq, cap);
        }
        if self.phase == Phase::Warming {
            // Agents of earlier leaders are taken from the node table once ready.
            return self.not_ready_or_away(h.seq, None, cap, now_us);
        }
        let Some(agent) = self.agents.get_mut(&h.sender) else {
            let d = self.error(h.seq, ErrorCode::NotRegistered, None, 0)?;
            return self.capped(d, req);
        };
        agent.last_seen_us = now_us;
        agent.addr = from;
        match self.replies.lookup(now_us, h.sender, h.seq) {
            Lookup::Hit(d) => {
                bump(&self.stats.replies_cached);
                return Some(d.clone());
            }
            Lookup::Invalid => return None,
            Lookup::Miss | Lookup::Forgotten => {}
        }
        // A seq that already got a lasting answer (no longer cached) or is older than the
        // window is a replay, or a retransmission whose answer was lost and then evicted:
        // answering it anew would grant a block per replay (issue 12). `Replayed` tells a
        // real agent to ask again under a new seq, and gives a replayer nothing.
        if self.windows.get(&h.sender).is_some_and(|w| !w.check(h.seq)) {
            bump(&self.stats.dropped_replay);
            tracing::debug!(%from, sender = h.sender, seq = h.seq, "replayed BlockRequest: no block");
            let d = self.error(h.seq, ErrorCode::Replayed, Some(sequence), 0)?;
            return self.capped(d, req);
        }
        let Ok(name) = SequenceName::new(sequence) else {
            return self.error(h.seq, ErrorCode::BadRequest, None, 0);
        };
        let (id, term) = (self.config.id, self.term);
        let Some(alloc) = self.allocator.as_mut() else {
            return self.not_ready_or_away(h.seq, Some(sequence), cap, now_us);
        };
        let mut result = alloc.grant(now_us, &name, count);
        if result == Err(unid_core::Error::UnknownSequence) {
            // Created in this term after the allocator was built: a sequence applied after
            // this leader's ready read can only come from this term.
            if let Some(s) = state.sequences.get(sequence) {
                let c = CommittedCeiling {
                    sequence: name.clone(),
                    width: s.width(),
                    ceiling: s.ceiling,
                };
                match alloc.add_sequence(now_us, c) {
                    Ok(()) => {
                        if let Some(p) = &self.probe {
                            p.ready(now_us, id, term, &[(sequence.to_owned(), s.ceiling)]);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(sequence, "cannot add sequence to the allocator: {e}")
                    }
                }
                result = alloc.grant(now_us, &name, count);
            }
        }
        let width = alloc.sequence(&name).map(|v| v.width);
        if let Some(raise) = alloc.poll_raise_for(now_us, &name) {
            // Proposed at once (the driver is woken by `has_actions`).
            self.actions.push_back(Action::Raise { term, raise });
        }
        let encoded = match result {
            Ok(block) => {
                bump(&self.stats.grants);
                if let Some(p) = &self.probe {
                    p.granted(now_us, id, term, sequence, block.first(), block.count());
                }
                match self.granted.get_mut(sequence) {
                    Some(g) => *g = (g.0 + 1, g.1.saturating_add(Id::from(block.count()))),
                    None => {
                        self.granted
                            .insert(sequence.to_owned(), (1, Id::from(block.count())));
                    }
                }
                let width = width.expect("granted from a known sequence");
                self.encode(
                    h.seq,
                    &Message::BlockGrant {
                        sequence,
                        width,
                        block,
                    },
                )
            }
            Err(unid_core::Error::UnknownSequence) => {
                self.error_text(h.seq, ErrorCode::UnknownSequence, Some(sequence), 0, "")
            }
            Err(unid_core::Error::Exhausted) => {
                self.error_text(h.seq, ErrorCode::Exhausted, Some(sequence), 0, "")
            }
            Err(unid_core::Error::EmptyRequest) => {
                return self.error(h.seq, ErrorCode::BadRequest, Some(sequence), 0);
            }
            // NotReady, AwaitingRaise: transient, not cached (a retransmit tries again).
            Err(_) => return self.not_ready_or_away(h.seq, Some(sequence), cap, now_us),
        };
        let d = encoded.ok()?;
        self.replies.insert(now_us, h.sender, h.seq, d.clone());
        self.windows.entry(h.sender).or_default().mark(h.seq);
        Some(d)
    }
}
