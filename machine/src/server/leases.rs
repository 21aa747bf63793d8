//! Agents, their leases, registrations and removals from the node table, and the token
//! buckets that bound what one source may ask.

use std::net::{IpAddr, SocketAddr};

use unid_proto::{ErrorCode, Message, NodeId, SeqNo};

use super::stats::bump;
use super::{
    Action, Asker, HELLO_NAMES_MAX, Phase, REGISTER_RATE_PER_IP_PER_S, REGISTER_RATE_PER_S,
    REMOVALS_PENDING_MAX, REMOVALS_PER_TURN_MAX, SOURCES_MAX, Server,
};

/// An agent holding a lease here.
pub(super) struct Agent {
    pub(super) addr: SocketAddr,
    pub(super) last_seen_us: u64,
}

/// A token bucket.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    tokens: f64,
    at_us: u64,
}

impl Bucket {
    /// A bucket holding `tokens` at `now_us`.
    pub fn full(tokens: f64, now_us: u64) -> Bucket {
        Bucket {
            tokens,
            at_us: now_us,
        }
    }

    /// Takes a token if there is one, refilled at `rate_per_s` up to `burst` since last time.
    pub fn take(&mut self, now_us: u64, rate_per_s: f64, burst: f64) -> bool {
        let dt = now_us.saturating_sub(self.at_us) as f64 / 1e6;
        self.tokens = (self.tokens + dt * rate_per_s).min(burst);
        self.at_us = now_us.max(self.at_us);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Idle for 10 s: forgotten.
    fn stale(&self, now_us: u64) -> bool {
        now_us.saturating_sub(self.at_us) >= 10_000_000
    }
}

/// Why a registration did not commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegisterError {
    /// The replicated node table is full.
    TableFull,
    /// Anything else (not committed: no leader, timeout, ...).
    Failed(String),
}

impl Server {
    /// Whether a datagram from `from` is within its source's rate.
    pub(super) fn source_allowed(&mut self, from: SocketAddr, now_us: u64) -> bool {
        let rate = f64::from(self.config.source_rate_per_s);
        if let Some(b) = self.sources.get_mut(&from) {
            b.take(now_us, rate, rate * 2.0)
        } else if self.sources.len() < SOURCES_MAX {
            let mut b = Bucket::full(rate * 2.0, now_us);
            let ok = b.take(now_us, rate, rate * 2.0);
            self.sources.insert(from, b);
            ok
        } else {
            false
        }
    }

    /// Whether a new registration from `ip` is within the per-IP and total rates.
    pub(super) fn registration_allowed(&mut self, ip: IpAddr, now_us: u64) -> bool {
        let (rate, total) = (
            f64::from(REGISTER_RATE_PER_IP_PER_S),
            f64::from(REGISTER_RATE_PER_S),
        );
        let source_ok = if let Some(b) = self.register_sources.get_mut(&ip) {
            b.take(now_us, rate, 2.0 * rate)
        } else if self.register_sources.len() < SOURCES_MAX {
            self.register_sources
                .insert(ip, Bucket::full(2.0 * rate - 1.0, now_us));
            true
        } else {
            false
        };
        source_ok && self.register_global.take(now_us, total, 2.0 * total)
    }

    /// Ends the leases of agents silent for `lease_ms`; forgets idle rate buckets and
    /// expired cached replies.
    pub(super) fn expire(&mut self, now_us: u64) {
        let lease_us = u64::from(self.config.lease_ms) * 1000;
        let before = self.agents.len();
        let mut expired: Vec<NodeId> = self
            .agents
            .iter()
            .filter(|(_, a)| a.last_seen_us.saturating_add(lease_us) <= now_us)
            .map(|(&id, _)| id)
            .collect();
        // In id order, not the hash map's (random per process): removals are Raft writes,
        // and the simulator's histories must not depend on a hasher's seed.
        expired.sort_unstable();
        for id in &expired {
            self.agents.remove(id);
        }
        self.queue_removal(&expired);
        if self.agents.len() != before {
            let agents = &self.agents;
            self.hellos.retain(|_, id| agents.contains_key(id));
            self.windows.retain(|id, _| agents.contains_key(id));
            tracing::debug!(expired = before - self.agents.len(), "agent leases expired");
        }
        self.replies.expire(now_us);
        self.sources.retain(|_, b| !b.stale(now_us));
        self.admin_sources.retain(|_, b| !b.stale(now_us));
        self.register_sources.retain(|_, b| !b.stale(now_us));
    }

    /// The fast failure signal: a send to `dest` came back refused or unreachable, so an
    /// agent registered from that address is gone (its socket is closed, or its host or
    /// network is). Its lease ends now rather than after `lease_ms` of silence. Only soft
    /// state is dropped: an agent that is in fact alive gets `NotRegistered` on its next
    /// request and registers again, under a new node id. Returns the agents forgotten.
    pub fn on_unreachable(&mut self, dest: SocketAddr) -> Vec<NodeId> {
        let mut gone: Vec<NodeId> = self
            .agents
            .iter()
            .filter(|(_, a)| a.addr == dest)
            .map(|(&id, _)| id)
            .collect();
        gone.sort_unstable();
        for id in &gone {
            self.agents.remove(id);
        }
        self.queue_removal(&gone);
        if !gone.is_empty() {
            let agents = &self.agents;
            self.hellos.retain(|_, id| agents.contains_key(id));
        }
        gone
    }

    /// Queues agents this server forgot for removal from the node table (a leader's job; a
    /// follower holds no agents). Beyond [`REMOVALS_PENDING_MAX`] the rest wait for the next
    /// leader, which takes the table's agents with fresh leases and expires them again.
    fn queue_removal(&mut self, ids: &[NodeId]) {
        if self.phase != Phase::Leading {
            return;
        }
        let room = REMOVALS_PENDING_MAX.saturating_sub(self.to_remove.len());
        self.to_remove.extend(ids.iter().take(room));
    }

    /// Asks to remove agents this leader forgot from the replicated node table, so that
    /// short-lived agents do not fill it ([`REMOVALS_PER_TURN_MAX`] per turn, one call at a
    /// time). A removed agent that is in fact alive gets `NotRegistered` and registers again
    /// under a new node id; node ids are never reused.
    pub(super) fn remove_expired(&mut self) {
        if self.removing {
            return;
        }
        if self.phase != Phase::Leading {
            self.to_remove.clear();
            return;
        }
        let n = self.to_remove.len().min(REMOVALS_PER_TURN_MAX);
        if n == 0 {
            return;
        }
        let ids: Vec<NodeId> = self.to_remove.drain(..n).collect();
        self.removing = true;
        self.actions.push_back(Action::RemoveNodes { ids });
    }

    /// The result of an [`Action::RemoveNodes`]: `removed` agents were in the table and are
    /// gone.
    pub fn on_nodes_removed(&mut self, removed: u64) {
        self.removing = false;
        self.stats
            .agents_removed
            .fetch_add(removed, std::sync::atomic::Ordering::Relaxed);
    }

    /// The result of an [`Action::Register`]: welcomes the agent (if this server still
    /// leads) or tells it to retry.
    pub fn on_registered(
        &mut self,
        now_us: u64,
        asker: Asker,
        incarnation: u64,
        name: &str,
        result: Result<NodeId, RegisterError>,
    ) {
        let Asker {
            from,
            reply_to,
            cap,
        } = asker;
        self.hellos_pending.remove(&(from, incarnation));
        let datagram = match result {
            Ok(node_id) if self.phase == Phase::Leading => {
                bump(&self.stats.registrations);
                tracing::info!(node_id, %from, name, incarnation, "agent registered");
                self.agents.insert(
                    node_id,
                    Agent {
                        addr: from,
                        last_seen_us: now_us,
                    },
                );
                self.hellos.insert((from, incarnation), node_id);
                // Remembered once registered (not when asked: a registration that fails must
                // not turn the agent's retransmissions into "replays").
                self.remember_hello(name, (incarnation, reply_to));
                let lease_ms = self.config.lease_ms;
                self.encode_with_servers(reply_to, cap, |servers, truncated| Message::Welcome {
                    node_id,
                    lease_ms,
                    servers,
                    truncated,
                })
            }
            Ok(_) => None, // Lost leadership meanwhile: the agent retries.
            Err(e) => {
                let full = e == RegisterError::TableFull;
                if full {
                    bump(&self.stats.refused_registration_full);
                    if now_us.saturating_sub(self.full_logged_us) >= 10_000_000 {
                        self.full_logged_us = now_us;
                        tracing::error!(
                            %from,
                            name,
                            refused = self
                                .stats
                                .refused_registration_full
                                .load(std::sync::atomic::Ordering::Relaxed),
                            "node table full ({} entries): new agents are refused until \
                             expired ones are removed (leases end after {} ms)",
                            unid_core::state::NODES_MAX,
                            self.config.lease_ms
                        );
                    }
                } else if let RegisterError::Failed(e) = &e {
                    tracing::debug!(%from, "registration failed: {e}");
                }
                let (code, retry_after_ms) = if full {
                    (ErrorCode::RateLimited, 1_000)
                } else {
                    (ErrorCode::NotReady, 100)
                };
                self.error(reply_to, code, None, retry_after_ms)
                    .filter(|d| d.len() <= cap)
            }
        };
        if let Some(d) = datagram {
            self.send(from, d);
        }
    }

    /// Records the newest registered `Hello` of `name` (replay protection).
    pub(super) fn remember_hello(&mut self, name: &str, seen: (u64, SeqNo)) {
        if self.hello_seen.len() >= HELLO_NAMES_MAX && !self.hello_seen.contains_key(name) {
            tracing::warn!("{HELLO_NAMES_MAX} agent names remembered: replay memory starts again");
            self.hello_seen.clear();
        }
        let entry = self.hello_seen.entry(name.to_owned()).or_insert((0, 0));
        *entry = (*entry).max(seen);
    }
}
