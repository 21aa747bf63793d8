//! Phases: following, warming up as a new leader (the ready read), leading with an allocator,
//! stopped; the quorum check of a leader; the graceful hand-over.

use std::net::{IpAddr, SocketAddr};

use unid_core::state::{ClusterState, NodeKind, SETTING_CLUSTER_ID};
use unid_core::{CommittedCeiling, LeaderAllocator};
use unid_proto::{List, Message, NodeId, SERVERS_MAX, SequenceName};

use super::leases::Agent;
use super::stats::bump;
use super::{Action, HELLO_NAMES_MAX, Leadership, Phase, QUORUM_LOST_MS, Server};

/// Ready reads failed this many times in a row: one warning.
const READY_TRIES_WARN: u32 = 20;

impl Server {
    /// Drops the allocator (nothing is granted until a new one is installed).
    pub(super) fn drop_allocator(&mut self, why: &str) {
        if self.allocator.take().is_some() {
            tracing::info!(term = self.term, "stopped granting: {why}");
        }
    }

    /// Follows a change of leader or term seen by consensus, at `now_us`. Returns `true` if
    /// this server, once a member, was removed from the cluster: it must stop serving (the
    /// machine is stopped already).
    pub fn on_leader(&mut self, now_us: u64, info: Leadership) -> bool {
        let id = self.config.id;
        if self.phase == Phase::Stopped {
            return false;
        }
        let was = (self.leader, self.term, self.phase);
        self.term = info.term;
        self.leader = if info.member { info.leader } else { None };
        if self.leader.is_some() && self.leader != was.0 {
            bump(&self.counters.leader_changes);
        }
        let leads = info.member && info.leader == Some(id);
        if info.member {
            self.was_member = true;
        } else if self.was_member {
            tracing::warn!(id, "this server was removed from the cluster: stopping");
            self.drop_allocator("removed from the cluster");
            self.phase = Phase::Stopped;
            return true;
        }
        if leads {
            if was.2 == Phase::Follower || was.1 != info.term {
                bump(&self.counters.leaderships);
                self.drop_allocator("new term");
                // Elected by a quorum just now.
                self.quorum_ok_us = now_us;
                if let Some(p) = &self.probe {
                    p.leader(now_us, id, info.term);
                }
                tracing::info!(
                    id,
                    term = info.term,
                    "became leader; reading committed ceilings"
                );
                self.warm_up(info.term);
            }
        } else {
            if was.2 != Phase::Follower {
                self.drop_allocator("lost leadership");
                self.phase = Phase::Follower;
            }
            if (was.0, was.1) != (self.leader, self.term) {
                tracing::info!(id, term = info.term, leader = ?self.leader, "following");
            }
        }
        false
    }

    /// Warms up as leader of `term`: nothing is granted until the ready read it asks for
    /// builds an allocator ([`Server::on_ready`]).
    pub(super) fn warm_up(&mut self, term: u64) {
        self.phase = Phase::Warming;
        self.ready_tries = 0;
        self.actions.push_back(Action::ReadReady { term });
    }

    fn warming_in(&self, term: u64) -> bool {
        self.phase == Phase::Warming && self.term == term
    }

    /// A ready read for `term` failed: asks again while this server still warms up in it
    /// (the driver waits a little before reporting a failure).
    pub fn on_ready_failed(&mut self, term: u64, error: &str) {
        if !self.warming_in(term) {
            return;
        }
        self.ready_tries += 1;
        tracing::debug!(
            id = self.config.id,
            term,
            attempt = self.ready_tries,
            "ready read failed: {error}"
        );
        if self.ready_tries == READY_TRIES_WARN {
            tracing::warn!(
                id = self.config.id,
                term,
                "leadership not confirmed after {READY_TRIES_WARN} tries; still trying"
            );
        }
        self.actions.push_back(Action::ReadReady { term });
    }

    /// The ready read for `term` succeeded with `state` (every entry committed before this
    /// term is applied in it): installs the allocator from its ceilings, takes the node
    /// table's agents, and starts raising ceilings.
    pub fn on_ready(&mut self, now_us: u64, term: u64, state: &ClusterState) {
        let id = self.config.id;
        if !self.warming_in(term) {
            return;
        }
        let ceilings: Vec<CommittedCeiling> = state
            .sequences
            .iter()
            .filter_map(|(name, s)| {
                Some(CommittedCeiling {
                    sequence: SequenceName::new(name).ok()?,
                    width: s.width(),
                    ceiling: s.ceiling,
                })
            })
            .collect();
        let seen: Vec<(String, u128)> = ceilings
            .iter()
            .map(|c| (c.sequence.as_str().to_owned(), c.ceiling))
            .collect();
        let alloc = match LeaderAllocator::new(self.config.allocator.clone(), now_us, ceilings) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(id, term, "cannot build the allocator: {e}");
                return;
            }
        };
        if let Some(p) = &self.probe {
            p.ready(now_us, id, term, &seen);
        }
        self.allocator = Some(alloc);
        self.phase = Phase::Leading;
        // Agents registered by earlier leaders keep their ids, with a fresh lease.
        let mut agents = 0;
        for r in state.nodes.values() {
            if r.kind != NodeKind::Agent || self.agents.len() >= self.config.agents_max {
                continue;
            }
            if self.hello_seen.len() < HELLO_NAMES_MAX {
                // A replayed `Hello` of an older incarnation is refused by this leader too.
                let seen = self.hello_seen.entry(r.name.clone()).or_insert((0, 0));
                *seen = (*seen).max((r.incarnation, 0));
            }
            if let Ok(ip) = r.addr.parse::<IpAddr>() {
                self.agents.entry(r.id).or_insert(Agent {
                    addr: SocketAddr::new(ip, r.port),
                    last_seen_us: now_us,
                });
                agents += 1;
            }
        }
        tracing::info!(
            id,
            term,
            sequences = state.sequences.len(),
            agents,
            "leading: allocator ready, raising ceilings"
        );
        self.propose_raises(now_us);
        // Every voter's UDP address in the node table (initial members are not in it), so
        // that every server can name the leader's UDP address.
        let mut want: Vec<(NodeId, SocketAddr)> = vec![(id, self.config.udp_addr)];
        want.extend(self.config.peers.iter().copied());
        want.retain(|(sid, addr)| {
            self.raft.voters.contains(sid)
                && !state
                    .nodes
                    .get(sid)
                    .is_some_and(|r| r.kind == NodeKind::Server && r.addr == addr.to_string())
        });
        self.actions
            .push_back(Action::RecordServers { servers: want });
        if state.setting(SETTING_CLUSTER_ID, 0) == 0 {
            // The first leader of a new cluster (or of one from before cluster ids).
            self.actions.push_back(Action::CreateClusterId);
        }
    }

    /// While this server leads, asks consensus to confirm (one check at a time) that a
    /// quorum still follows.
    pub(super) fn check_quorum(&mut self, now_us: u64) {
        let leads = matches!(self.phase, Phase::Leading | Phase::Warming);
        if !leads || self.quorum_checking.is_some() {
            return;
        }
        self.quorum_checking = Some(self.quorum_lost(now_us));
        self.actions
            .push_back(Action::ConfirmLeadership { term: self.term });
    }

    /// The result of an [`Action::ConfirmLeadership`] for `term`, at `now_us`. One log line
    /// per change between confirmed and lost.
    pub fn on_quorum_checked(&mut self, now_us: u64, term: u64, confirmed: bool) {
        let lost_before = self.quorum_checking.take().unwrap_or(false);
        if confirmed {
            self.quorum_ok_us = now_us;
            if lost_before {
                tracing::info!(
                    id = self.config.id,
                    term,
                    "a quorum follows this leader again"
                );
            }
        } else if !lost_before && self.quorum_lost(now_us) {
            bump(&self.counters.quorum_lost);
            tracing::warn!(
                id = self.config.id,
                term,
                "no quorum confirmed this leader for {QUORUM_LOST_MS} ms: sending agents to the other servers"
            );
        }
    }

    /// Consensus stopped (a storage write failed, or a fatal Raft error): no more grants.
    pub fn on_consensus_stopped(&mut self) {
        tracing::error!(
            id = self.config.id,
            "consensus stopped (storage failure or fatal Raft error): no more grants, shutting down"
        );
        self.drop_allocator("consensus stopped");
        self.phase = Phase::Stopped;
    }

    /// Stops answering. On a `graceful` stop a leader tells every agent heard from within
    /// its lease, and every other server, which server will lead next (`successor`, the one
    /// Raft hands leadership to): `LeaderChange`, in [`Server::poll_transmit`]. Returns
    /// whether this server led.
    pub fn stop(&mut self, graceful: bool, successor: Option<NodeId>) -> bool {
        let was_leader = matches!(self.phase, Phase::Leading | Phase::Warming);
        self.drop_allocator("stopping");
        self.phase = Phase::Stopped;
        if !was_leader || !graceful {
            return was_leader;
        }
        let Some(next) = successor else {
            tracing::info!(
                id = self.config.id,
                "stopping as leader with no successor to name"
            );
            return true;
        };
        let Some(&next_addr) = self.servers.get(&next) else {
            return true;
        };
        let servers = self.server_list();
        let n = servers.len().min(SERVERS_MAX);
        let msg = Message::LeaderChange {
            leader_id: next,
            leader: next_addr,
            servers: List::new(&servers[..n]),
            truncated: n < servers.len(),
        };
        let mut to: Vec<SocketAddr> = self.agents.values().map(|a| a.addr).collect();
        to.extend(self.hellos.keys().map(|(a, _)| *a));
        to.extend(
            self.servers
                .iter()
                .filter(|(id, _)| **id != self.config.id)
                .map(|(_, a)| *a),
        );
        to.sort();
        to.dedup();
        let mut notices = 0;
        for addr in to {
            if let Ok(d) = self.encode(0, &msg) {
                self.send(addr, d);
                notices += 1;
            }
        }
        tracing::info!(
            id = self.config.id,
            successor = next,
            addr = %next_addr,
            notices,
            "stepping down: sending LeaderChange"
        );
        true
    }
}
