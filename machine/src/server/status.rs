//! Pages and answers for operators: a sequence, the sequence list, the status page, the
//! node table, sequence creation and membership changes; the metrics' gauges.

use std::net::{IpAddr, SocketAddr};

use unid_core::state::{ClusterState, NodeKind};
use unid_proto::{
    EncodeError, ErrorCode, Health, Id, List, Message, NODE_TABLE_PAGE_MAX, Node, NodeId, NodeRole,
    RaftRole, SEQUENCE_LIST_MAX, SERVERS_MAX, STATUS_SEQUENCES_MAX, SeqNo, SequenceName,
    SequenceStatus, Server as ServerEntry, ServerStatus, Width,
};

use super::{Action, Asker, Gauges, METRICS_SEQUENCES_MAX, Phase, SequenceGauges, Server};

/// Why a sequence was not created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CreateError {
    /// It exists.
    Exists,
    /// The state machine refused it (bad name, width or start): the reason.
    Rejected(String),
    /// Not committed: why.
    Failed(String),
}

/// Why a membership change failed: the code and text of the `Error` answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembershipError {
    /// The error code.
    pub code: ErrorCode,
    /// What the operator reads.
    pub text: String,
}

impl Server {
    /// The committed (and, as leader, allocated) view of one sequence.
    fn sequence_view(&self, name: &str, stored_ceiling: Id) -> Option<(Id, Id)> {
        let alloc = self.allocator.as_ref()?;
        let v = alloc.sequence(&SequenceName::new(name).ok()?)?;
        Some((v.committed_ceiling.max(stored_ceiling), v.next))
    }

    pub(super) fn describe(
        &mut self,
        reply_to: SeqNo,
        name: &str,
        state: &ClusterState,
    ) -> Option<Vec<u8>> {
        let Some(s) = state.sequences.get(name) else {
            return self.error(reply_to, ErrorCode::UnknownSequence, Some(name), 0);
        };
        let (mut ceiling, mut next) = (s.ceiling, s.ceiling);
        if let Some((c, n)) = self.sequence_view(name, s.ceiling) {
            ceiling = c;
            next = n.min(ceiling);
        }
        let next = next.max(s.start);
        let msg = Message::SequenceInfo {
            name,
            width: s.width(),
            start: s.start,
            next,
            ceiling: ceiling.max(next),
        };
        self.encode(reply_to, &msg).ok()
    }

    pub(super) fn list(
        &mut self,
        reply_to: SeqNo,
        after: Option<&str>,
        state: &ClusterState,
    ) -> Option<Vec<u8>> {
        let mut it = state
            .sequences
            .keys()
            .filter(|n| after.is_none_or(|a| n.as_str() > a));
        let names: Vec<&str> = it
            .by_ref()
            .take(SEQUENCE_LIST_MAX)
            .map(String::as_str)
            .collect();
        let more = it.next().is_some();
        let mut n = names.len();
        loop {
            let msg = Message::SequenceListReply {
                names: List::new(&names[..n]),
                more: more || n < names.len(),
            };
            match self.encode(reply_to, &msg) {
                Ok(d) => return Some(d),
                Err(EncodeError::TooLarge { .. }) if n > 1 => n -= 1,
                Err(_) => return None,
            }
        }
    }

    pub(super) fn status(
        &mut self,
        reply_to: SeqNo,
        after: Option<&str>,
        state: &ClusterState,
    ) -> Option<Vec<u8>> {
        let me = self.config.id;
        let leader_id = self.leader.unwrap_or(0);
        let i_lead = leader_id == me;
        let raft = &self.raft;
        let servers: Vec<ServerStatus> = self
            .servers
            .iter()
            .take(SERVERS_MAX)
            .map(|(&id, &addr)| {
                let role = if id == leader_id {
                    RaftRole::Leader
                } else if id == me {
                    match raft.role {
                        Some(RaftRole::Candidate) => RaftRole::Candidate,
                        Some(RaftRole::Learner) => RaftRole::Learner,
                        _ => RaftRole::Follower,
                    }
                } else if raft.learners.contains(&id) {
                    RaftRole::Learner
                } else {
                    RaftRole::Follower
                };
                let health = if id == me || id == leader_id {
                    Health::Healthy
                } else if i_lead {
                    match (raft.replication.get(&id).copied().flatten(), raft.last_log) {
                        (Some(matched), Some(last)) if last.saturating_sub(matched) <= 100 => {
                            Health::Healthy
                        }
                        (Some(_), _) => Health::Degraded,
                        (None, _) => Health::Unreachable,
                    }
                } else {
                    // A follower cannot see the other followers.
                    Health::Degraded
                };
                ServerStatus {
                    id,
                    addr,
                    role,
                    term: raft.term,
                    health,
                }
            })
            .collect();
        let seqs: Vec<(&str, Width, Id, Id)> = state
            .sequences
            .iter()
            .filter(|(n, _)| after.is_none_or(|a| n.as_str() > a))
            .take(STATUS_SEQUENCES_MAX + 1)
            .map(|(n, s)| {
                let width = s.width();
                let next = self.sequence_view(n, s.ceiling).map_or(s.ceiling, |v| v.1);
                let ceiling = s.ceiling.max(next);
                (
                    n.as_str(),
                    width,
                    ceiling,
                    width.limit().saturating_sub(next),
                )
            })
            .collect();
        let term = raft.term;
        let mut n = seqs.len().min(STATUS_SEQUENCES_MAX);
        loop {
            let items: Vec<SequenceStatus<'_>> = seqs[..n]
                .iter()
                .map(|&(name, width, ceiling, remaining)| SequenceStatus {
                    name,
                    width,
                    ceiling,
                    remaining,
                })
                .collect();
            let msg = Message::StatusReply {
                leader_id,
                term,
                servers: List::new(&servers),
                sequences: List::new(&items),
                more: n < seqs.len(),
            };
            match self.encode(reply_to, &msg) {
                Ok(d) => return Some(d),
                Err(EncodeError::TooLarge { .. }) if n > 0 => n -= 1,
                Err(_) => return None,
            }
        }
    }

    pub(super) fn node_table(
        &mut self,
        reply_to: SeqNo,
        page: u16,
        state: &ClusterState,
    ) -> Option<Vec<u8>> {
        let mut nodes: Vec<Node> = self
            .servers
            .iter()
            .map(|(&id, &addr)| Node {
                id,
                addr,
                role: NodeRole::Server,
            })
            .collect();
        for r in state.nodes.values() {
            if r.kind != NodeKind::Agent {
                continue;
            }
            if let Ok(ip) = r.addr.parse::<IpAddr>()
                && r.port != 0
            {
                nodes.push(Node {
                    id: r.id,
                    addr: SocketAddr::new(ip, r.port),
                    role: NodeRole::Agent,
                });
            }
        }
        // The version changes when the table does: an FNV-1a hash of every entry.
        let version = nodes.iter().fold(0xcbf2_9ce4_8422_2325, |h, n| {
            let mut h = (h ^ n.id).wrapping_mul(0x0100_0000_01b3);
            for b in n.addr.to_string().bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            h
        });
        let page_count = nodes.len().div_ceil(NODE_TABLE_PAGE_MAX).max(1);
        let page_count = u16::try_from(page_count).unwrap_or(u16::MAX);
        if page >= page_count {
            return self.error(reply_to, ErrorCode::BadRequest, None, 0);
        }
        let from = usize::from(page) * NODE_TABLE_PAGE_MAX;
        let to = (from + NODE_TABLE_PAGE_MAX).min(nodes.len());
        let msg = Message::NodeTable {
            version,
            page,
            page_count,
            nodes: List::new(&nodes[from..to]),
        };
        self.encode(reply_to, &msg).ok()
    }

    /// The result of an [`Action::CreateSequence`]: the sequence's ceiling once created.
    pub fn on_sequence_created(
        &mut self,
        asker: Asker,
        name: &str,
        width: Width,
        start: Id,
        result: Result<Id, CreateError>,
    ) {
        let reply_to = asker.reply_to;
        let datagram = match result {
            Ok(ceiling) => {
                tracing::info!(sequence = name, width = width.bytes(), start = %start, "sequence created");
                let msg = Message::SequenceInfo {
                    name,
                    width,
                    start,
                    next: start,
                    ceiling: ceiling.max(start),
                };
                self.encode(reply_to, &msg)
            }
            Err(CreateError::Exists) => self.error_text(
                reply_to,
                ErrorCode::AlreadyExists,
                Some(name),
                0,
                "sequence already exists",
            ),
            Err(CreateError::Rejected(why)) => {
                self.error_text(reply_to, ErrorCode::BadRequest, Some(name), 0, &why)
            }
            Err(CreateError::Failed(why)) => self.error_text(
                reply_to,
                ErrorCode::NotReady,
                Some(name),
                0,
                &format!("not committed: {why}"),
            ),
        };
        if let Ok(d) = datagram {
            self.send(asker.from, d);
        }
    }

    /// An `AddServer` or `RemoveServer` from an operator, to the leader: refused, answered
    /// at once (nothing to change), or passed to the driver (see the module docs).
    pub(super) fn membership_request(
        &mut self,
        asker: Asker,
        msg: Message<'_>,
        state: &ClusterState,
    ) -> Option<Vec<u8>> {
        let reply_to = asker.reply_to;
        let refuse = |this: &mut Self, code, retry_after_ms, text: &str| {
            this.error_text(reply_to, code, None, retry_after_ms, text)
                .ok()
        };
        if self.membership_busy {
            return refuse(
                self,
                ErrorCode::NotReady,
                200,
                "a membership change is running",
            );
        }
        let voters = &self.raft.voters;
        let action = match msg {
            Message::AddServer { id, raft, listen } => {
                let elsewhere = self
                    .raft
                    .members
                    .get(&id)
                    .is_some_and(|a| *a != raft.to_string());
                if elsewhere {
                    return refuse(self, ErrorCode::BadRequest, 0, "server id already in use");
                }
                // Already a voter at that address: a retry whose first answer was lost, maybe
                // reaching the added server itself, now leading. Answered, not refused.
                if voters.contains(&id) {
                    return self.membership_answer(reply_to, state);
                }
                if id == self.config.id {
                    return refuse(self, ErrorCode::BadRequest, 0, "server id already in use");
                }
                tracing::info!(id, %raft, %listen, "adding server (learner, then voter)");
                Action::AddServer {
                    asker,
                    id,
                    raft,
                    listen,
                }
            }
            Message::RemoveServer { id } => {
                if id == self.config.id {
                    return refuse(
                        self,
                        ErrorCode::BadRequest,
                        0,
                        "cannot remove the leader: stop it (SIGTERM hands leadership over) or ask again after",
                    );
                }
                if !voters.contains(&id) {
                    return self.membership_answer(reply_to, state);
                }
                if voters.len() <= 1 {
                    return refuse(
                        self,
                        ErrorCode::BadRequest,
                        0,
                        "cannot remove the last voter",
                    );
                }
                tracing::info!(id, "removing server");
                Action::RemoveServer { asker, id }
            }
            _ => return None,
        };
        self.membership_busy = true;
        self.actions.push_back(action);
        None
    }

    /// The result of an [`Action::AddServer`] or [`Action::RemoveServer`] (the driver set the
    /// Raft view after it): the voters, or the error.
    pub fn on_membership_done(
        &mut self,
        asker: Asker,
        result: Result<(), MembershipError>,
        state: &ClusterState,
    ) {
        self.membership_busy = false;
        let d = match result {
            Ok(()) => self.membership_answer(asker.reply_to, state),
            Err(e) => {
                tracing::warn!("membership change failed: {}", e.text);
                self.error_text(asker.reply_to, e.code, None, 200, &e.text)
                    .ok()
            }
        };
        if let Some(d) = d {
            self.send(asker.from, d);
        }
    }

    /// `Membership` with the voters and their UDP addresses.
    fn membership_answer(&mut self, reply_to: SeqNo, state: &ClusterState) -> Option<Vec<u8>> {
        self.refresh_servers(state);
        let voters: Vec<NodeId> = self.raft.voters.iter().copied().collect();
        let list: Vec<ServerEntry> = voters
            .iter()
            .filter_map(|id| {
                self.servers
                    .get(id)
                    .map(|&addr| ServerEntry { id: *id, addr })
            })
            .collect();
        tracing::info!(voters = ?voters, "membership changed");
        let n = list.len().min(SERVERS_MAX);
        let msg = Message::Membership {
            voters: List::new(&list[..n]),
            truncated: n < voters.len(),
        };
        self.encode(reply_to, &msg).ok()
    }

    /// The figures of the metrics endpoint that need the machine's state.
    pub fn gauges(&self, state: Option<&ClusterState>) -> Gauges {
        let leads = self.leader == Some(self.config.id)
            && matches!(self.phase, Phase::Leading | Phase::Warming);
        let mut g = Gauges {
            term: self.term,
            is_leader: leads,
            granting: self.is_granting(),
            agents: self.agents.len(),
            sequences: Vec::new(),
            sequences_omitted: 0,
        };
        let Some(state) = state.filter(|_| self.phase != Phase::Stopped) else {
            return g;
        };
        g.sequences_omitted = state.sequences.len().saturating_sub(METRICS_SEQUENCES_MAX);
        for (n, s) in state.sequences.iter().take(METRICS_SEQUENCES_MAX) {
            let width = s.width();
            let (ceiling, next) = self
                .sequence_view(n, s.ceiling)
                .unwrap_or((s.ceiling, s.ceiling));
            let (grants, ids) = self.granted.get(n).copied().unwrap_or((0, 0));
            g.sequences.push(SequenceGauges {
                name: n.clone(),
                grants,
                ids,
                ceiling,
                ids_left: width.limit().saturating_sub(next.max(s.start)),
            });
        }
        g
    }
}

/// The role names of the node table (`RegisterAgent`'s role tag).
pub fn role_tag(role: NodeRole) -> &'static str {
    match role {
        NodeRole::Server => "server",
        NodeRole::Agent => "agent",
        NodeRole::Client => "client",
        NodeRole::Admin => "admin",
    }
}
