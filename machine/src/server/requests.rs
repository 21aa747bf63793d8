//! Each datagram: decode and authenticate, the cluster id, the source's rate, then the
//! answer by message type (block requests are in `grants.rs`, pages in `status.rs`).

use std::net::SocketAddr;

use unid_core::state::ClusterState;
use unid_proto::{
    DATAGRAM_BYTES_MAX, DecodeError, ErrorCode, List, Message, NodeId, SOFTWARE, SeqNo, VERSION,
    VERSIONS, Versions, decode,
};

use super::stats::bump;
use super::{
    ADMIN_GLOBAL_RATE_PER_S, ADMIN_RATE_PER_S, Action, Asker, Bucket, CONTROL_QUEUE_MAX,
    NOT_READY_RETRY_MS, Phase, QUORUM_LOST_MS, SOURCES_MAX, Server,
};

impl Server {
    /// Handles one datagram from `from` received at `now_us`, with the replicated state as
    /// last applied. Returns the answer to send back to `from`, if any. Consensus calls it
    /// needs wait in [`Server::poll_action`].
    pub fn handle_datagram(
        &mut self,
        now_us: u64,
        from: SocketAddr,
        data: &[u8],
        state: &ClusterState,
    ) -> Option<Vec<u8>> {
        bump(&self.stats.datagrams_in);
        let frame = match decode(data, self.config.key.as_ref()) {
            Ok(f) => f,
            Err(DecodeError::UnsupportedVersion { version }) => {
                return self.other_version(now_us, from, version, data.len());
            }
            Err(e) => {
                bump(&self.stats.dropped_malformed);
                self.counters.decode_failed(&e);
                tracing::debug!(%from, "dropped datagram: {e}");
                return None;
            }
        };
        let req = data.len();
        let h = frame.header;
        let ours = self.cluster;
        if frame.cluster != 0 && ours != 0 && frame.cluster != ours {
            // From a node of another cluster (two clusters on one address, an agent pointed
            // at the wrong one): never served (issue 12).
            let n = self
                .stats
                .dropped_cluster
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            if n.is_power_of_two() {
                tracing::warn!(%from, cluster = format_args!("{:016x}", frame.cluster), ours = format_args!("{ours:016x}"), dropped = n, "dropped a datagram of another cluster");
            }
            return None;
        }
        if self.phase == Phase::Stopped {
            return None;
        }
        if !self.source_allowed(from, now_us) {
            bump(&self.stats.dropped_rate);
            if self.agents.contains_key(&h.sender) {
                let d = self.error(h.seq, ErrorCode::RateLimited, None, 100)?;
                return (d.len() <= req).then_some(d);
            }
            return None;
        }
        let leading = self.phase == Phase::Leading;
        match frame.message {
            Message::Ping { sent_us } => {
                let cap = if self.registered(h.sender, state) {
                    DATAGRAM_BYTES_MAX
                } else {
                    req
                };
                let warming = self.phase == Phase::Warming;
                if !leading && !warming {
                    return self.not_leader(h.seq, cap);
                }
                let lease_ms = match self.agents.get_mut(&h.sender) {
                    Some(a) => {
                        a.last_seen_us = now_us;
                        a.addr = from;
                        self.config.lease_ms
                    }
                    // A new leader takes the node table's agents once ready: keep them.
                    None if warming && cap == DATAGRAM_BYTES_MAX => self.config.lease_ms,
                    None => 0,
                };
                let d = self
                    .encode(
                        h.seq,
                        &Message::Pong {
                            echo_us: sent_us,
                            lease_ms,
                        },
                    )
                    .ok()?;
                self.capped(d, cap)
            }
            Message::Hello {
                role,
                incarnation,
                name,
                versions,
                software,
                ..
            } => {
                if !versions.contains(VERSION) {
                    // Any server answers this, leader or not: the agent must learn it cannot
                    // be served here whoever leads.
                    let n = self
                        .stats
                        .refused_version
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                        + 1;
                    if n.is_power_of_two() {
                        tracing::warn!(%from, name, software, offered = %versions, speaks = %VERSIONS, refused = n, "refused a Hello: no protocol version in common");
                    }
                    return self.version_mismatch(h.seq, versions, req);
                }
                if self.phase == Phase::Warming {
                    return self.not_ready_or_away(h.seq, None, req, now_us);
                }
                if !leading {
                    return self.not_leader(h.seq, req);
                }
                let key = (from, incarnation);
                if let Some(&node_id) = self.hellos.get(&key) {
                    if let Some(a) = self.agents.get_mut(&node_id) {
                        a.last_seen_us = now_us;
                    }
                    let lease_ms = self.config.lease_ms;
                    return self
                        .encode_with_servers(h.seq, req, |servers, truncated| Message::Welcome {
                            node_id,
                            lease_ms,
                            servers,
                            truncated,
                        })
                        .or_else(|| {
                            bump(&self.stats.dropped_amplification);
                            None
                        });
                }
                if self.hellos_pending.contains(&key) {
                    return None; // Being registered; the answer follows.
                }
                // Not a retransmission from the agent's own socket (those were answered
                // above): a `Hello` must be newer than the last one registered under its name
                // (the agent takes a new incarnation, or at least a new seq, for each), or it
                // is a replay, from a new source port, of a captured one (issue 12).
                if self
                    .hello_seen
                    .get(name)
                    .is_some_and(|&seen| (incarnation, h.seq) <= seen)
                {
                    bump(&self.stats.dropped_replay);
                    tracing::debug!(%from, name, incarnation, seq = h.seq, "dropped a replayed Hello");
                    let d = self.error(h.seq, ErrorCode::BadRequest, None, 0)?;
                    return self.capped(d, req);
                }
                if self.quorum_lost(now_us) {
                    // Registering needs a quorum: send the agent elsewhere.
                    return self.redirect(None, h.seq, req);
                }
                if self.agents.len() + self.hellos_pending.len() >= self.config.agents_max {
                    let d = self.error(h.seq, ErrorCode::RateLimited, None, 1_000)?;
                    return self.capped(d, req);
                }
                if !self.registration_allowed(from.ip(), now_us) {
                    bump(&self.stats.refused_registration_rate);
                    let d = self.error(h.seq, ErrorCode::RateLimited, None, 200)?;
                    return self.capped(d, req);
                }
                if self.actions.len() >= CONTROL_QUEUE_MAX {
                    let d = self.error(h.seq, ErrorCode::NotReady, None, NOT_READY_RETRY_MS)?;
                    return self.capped(d, req);
                }
                self.hellos_pending.insert(key);
                self.actions.push_back(Action::Register {
                    asker: Asker {
                        from,
                        reply_to: h.seq,
                        cap: req,
                    },
                    incarnation,
                    name: name.to_owned(),
                    role,
                });
                None
            }
            Message::BlockRequest { sequence, count } => {
                self.block_request(now_us, from, h, sequence, count, req, state)
            }
            Message::SequenceCreate { name, width, start } => {
                if !self.admin_allowed(from, now_us) {
                    return None;
                }
                if !self.change_allowed(from) {
                    let d = self.error(h.seq, ErrorCode::Unauthorized, None, 0)?;
                    return self.capped(d, req);
                }
                if self.actions.len() >= CONTROL_QUEUE_MAX {
                    return self.error(h.seq, ErrorCode::NotReady, None, 100);
                }
                self.actions.push_back(Action::CreateSequence {
                    asker: Asker {
                        from,
                        reply_to: h.seq,
                        cap: DATAGRAM_BYTES_MAX,
                    },
                    name: name.to_owned(),
                    width,
                    start,
                });
                None
            }
            Message::SequenceDescribe { name } => {
                if !self.admin_allowed(from, now_us) {
                    return None;
                }
                self.describe(h.seq, name, state)
            }
            Message::SequenceList { after } => {
                if !self.admin_allowed(from, now_us) {
                    return None;
                }
                self.list(h.seq, after, state)
            }
            Message::StatusRequest { sequences_after } => {
                if !self.admin_allowed(from, now_us) {
                    return None;
                }
                self.status(h.seq, sequences_after, state)
            }
            Message::NodeTableRequest { page } => {
                if !self.admin_allowed(from, now_us) {
                    return None;
                }
                self.node_table(h.seq, page, state)
            }
            Message::AddServer { .. } | Message::RemoveServer { .. } => {
                // decode() already refused unauthenticated datagrams when there is a key.
                if self.config.key.is_some() && !frame.authenticated {
                    return None;
                }
                if !self.admin_allowed(from, now_us) {
                    return None;
                }
                if !self.change_allowed(from) {
                    let d = self.error(h.seq, ErrorCode::Unauthorized, None, 0)?;
                    return self.capped(d, req);
                }
                if !leading {
                    return self.not_leader(h.seq, req);
                }
                let asker = Asker {
                    from,
                    reply_to: h.seq,
                    cap: DATAGRAM_BYTES_MAX,
                };
                self.membership_request(asker, frame.message, state)
            }
            _ => {
                bump(&self.stats.dropped_unexpected);
                None
            }
        }
    }

    /// A datagram whose header has a protocol version this server does not speak: counted,
    /// logged (rate-limited) and, when its source's rate allows and the answer is no larger,
    /// answered `VersionMismatch` (framed as version 2, `reply_to` 0: the rest of its header
    /// is not ours to read).
    fn other_version(
        &mut self,
        now_us: u64,
        from: SocketAddr,
        version: u8,
        len: usize,
    ) -> Option<Vec<u8>> {
        let n = self
            .stats
            .dropped_version
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if n.is_power_of_two() {
            tracing::warn!(%from, version, speaks = %VERSIONS, dropped = n, "datagram of a protocol version this server does not speak");
        }
        if self.phase == Phase::Stopped || !self.source_allowed(from, now_us) {
            return None;
        }
        self.version_mismatch(0, Versions::only(version), len)
    }

    /// `VersionMismatch` naming this server's versions and what the sender offered.
    fn version_mismatch(
        &mut self,
        reply_to: SeqNo,
        offered: Versions,
        cap: usize,
    ) -> Option<Vec<u8>> {
        let msg = Message::VersionMismatch {
            versions: VERSIONS,
            offered,
            software: SOFTWARE,
        };
        let d = self.encode(reply_to, &msg).ok()?;
        self.capped(d, cap)
    }

    /// Whether `sender` is a registered agent here, or in the replicated node table.
    pub(super) fn registered(&self, sender: NodeId, state: &ClusterState) -> bool {
        sender != 0 && (self.agents.contains_key(&sender) || state.nodes.contains_key(&sender))
    }

    /// Whether no quorum confirmed this leader's leadership for [`QUORUM_LOST_MS`].
    pub(super) fn quorum_lost(&self, now_us: u64) -> bool {
        now_us.saturating_sub(self.quorum_ok_us) > QUORUM_LOST_MS * 1000
    }

    pub(super) fn not_leader(&mut self, reply_to: SeqNo, cap: usize) -> Option<Vec<u8>> {
        self.redirect(self.leader_addr(), reply_to, cap)
    }

    /// What this server answers what it cannot serve: `NotReady`, or, when no quorum
    /// confirmed its leadership lately, a `NotLeader` naming no leader (see
    /// [`QUORUM_LOST_MS`]).
    pub(super) fn not_ready_or_away(
        &mut self,
        reply_to: SeqNo,
        sequence: Option<&str>,
        cap: usize,
        now_us: u64,
    ) -> Option<Vec<u8>> {
        if self.quorum_lost(now_us) {
            return self.redirect(None, reply_to, cap);
        }
        let d = self.error(reply_to, ErrorCode::NotReady, sequence, NOT_READY_RETRY_MS)?;
        self.capped(d, cap)
    }

    /// `NotLeader` naming `leader` (or none) and the servers that fit in `cap`.
    pub(super) fn redirect(
        &mut self,
        leader: Option<(NodeId, SocketAddr)>,
        reply_to: SeqNo,
        cap: usize,
    ) -> Option<Vec<u8>> {
        bump(&self.stats.not_leader);
        self.encode_with_servers(reply_to, cap, |servers, truncated| Message::NotLeader {
            leader_id: leader.map_or(0, |l| l.0),
            leader: leader.map(|l| l.1),
            servers,
            truncated,
        })
        .or_else(|| {
            // The smallest redirect: just the leader's endpoint (FlatBuffers leaves out
            // zero and false fields), so that it fits even the shortest Hello.
            let msg = Message::NotLeader {
                leader_id: 0,
                leader: Some(leader?.1),
                servers: List::empty(),
                truncated: false,
            };
            let d = self.encode(reply_to, &msg).ok()?;
            self.capped(d, cap)
        })
    }

    /// Whether `from` may change the cluster (create a sequence, add or remove a server):
    /// with a cluster secret every datagram that got here is authenticated; without one, only
    /// a loopback source may (the kernel drops loopback-sourced packets arriving from a
    /// network). Counts a refusal.
    fn change_allowed(&self, from: SocketAddr) -> bool {
        let ok = self.config.key.is_some() || from.ip().to_canonical().is_loopback();
        if !ok {
            bump(&self.stats.refused_admin);
        }
        ok
    }

    fn admin_allowed(&mut self, from: SocketAddr, now_us: u64) -> bool {
        let rate = f64::from(ADMIN_RATE_PER_S);
        let global = f64::from(ADMIN_GLOBAL_RATE_PER_S);
        let ok = self.admin_global.take(now_us, global, global)
            && if let Some(b) = self.admin_sources.get_mut(&from) {
                b.take(now_us, rate, rate)
            } else if self.admin_sources.len() < SOURCES_MAX {
                self.admin_sources
                    .insert(from, Bucket::full(rate - 1.0, now_us));
                true
            } else {
                false
            };
        if !ok {
            bump(&self.stats.dropped_rate);
        }
        ok
    }
}
