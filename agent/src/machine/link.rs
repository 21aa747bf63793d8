//! Requests and their answers: the requester (`unid_core::Requester`: seqs, retransmission,
//! backoff, redirects and the epoch rule), the servers it knows, what each request in
//! flight is for, `LeaderChange` and its replay windows, and reading the node table.

use std::net::SocketAddr;

use unid_core::{Event, Requester};
use unid_proto::{ErrorCode, NodeId, ReplayWindow, SeqNo, Width};

use super::{Machine, MachineConfig};
use crate::Error;

/// The most node-table pages read in one fetch.
const TABLE_PAGES_MAX: u16 = 16;
/// After a request failed (every attempt sent, refused or unanswered), wait this long
/// before sending it again, in microseconds: a path with no route fails at once, and must
/// not be retried in a busy loop.
pub(super) const RETRY_AFTER_FAIL_US: u64 = 100_000;

/// What a request is for.
#[derive(Clone, Debug)]
pub(super) enum Req {
    Hello,
    Ping,
    Block { index: usize, count: u64 },
    NodeTable { page: u16 },
}

/// A final answer from a server.
#[derive(Clone, Debug)]
pub(super) enum Answer {
    Welcome {
        node_id: NodeId,
        lease_ms: u32,
    },
    Grant {
        sequence: String,
        width: Width,
        first: u128,
        count: u64,
    },
    Pong {
        lease_ms: u32,
    },
    Error {
        code: ErrorCode,
    },
    NodeTable {
        version: u64,
        page: u16,
        page_count: u16,
        servers: Vec<SocketAddr>,
        /// Every node of the page is a server (servers come first, so more may follow on
        /// the next page).
        only_servers: bool,
    },
}

/// Reading the node table page by page, after a server list came truncated.
#[derive(Default)]
pub(super) struct TableFetch {
    pub(super) wanted: bool,
    pub(super) inflight: bool,
    version: Option<u64>,
    pub(super) next_page: u16,
    collected: Vec<SocketAddr>,
}

/// The requester plus what it does not do: learning servers, what each request is for,
/// and the replay windows of `LeaderChange`.
pub(super) struct Link {
    pub(super) requester: Requester<Req, Answer>,
    pub(super) servers: Vec<SocketAddr>,
    /// Outstanding requests, what they are for and when first sent.
    inflight: Vec<(SeqNo, Req, u64)>,
    servers_max: usize,
    /// Per server, the header seqs of its datagrams this agent acted on (servers number
    /// their datagrams from wall-clock µs at start, so a restart continues above): a
    /// `LeaderChange` whose seq is not fresh in that window is a replay. The window, not a
    /// plain "above the highest", because a server's shards send in an order slightly
    /// different from their seqs. At most `4 × servers_max` entries.
    server_seqs: Vec<(SocketAddr, ReplayWindow)>,
}

impl Link {
    pub(super) fn new(config: &MachineConfig, now_us: u64) -> Result<Link, Error> {
        let requester = Requester::new(
            config.requester.clone(),
            &config.servers,
            config.incarnation,
            now_us,
        )
        .map_err(|e| Error::InvalidConfig {
            field: "requester",
            reason: e.to_string(),
        })?;
        Ok(Link {
            requester,
            servers: config.servers.clone(),
            inflight: Vec::new(),
            servers_max: config.requester.servers_max,
            server_seqs: Vec::new(),
        })
    }

    pub(super) fn send(&mut self, now_us: u64, req: Req) -> Option<SeqNo> {
        match self.requester.send(now_us, req.clone()) {
            Ok(seq) => {
                self.inflight.push((seq, req, now_us));
                Some(seq)
            }
            Err(e) => {
                // Bounded by `requests_max` (validated to cover every sequence); retried
                // on the next tick.
                tracing::debug!("cannot queue a request: {e}");
                None
            }
        }
    }

    /// Whether `seq` from `server` is fresh (not acted on, not older than the window), and
    /// the highest seq acted on from it (0: none).
    fn server_seq_fresh(&self, server: SocketAddr, seq: SeqNo) -> (bool, SeqNo) {
        self.server_seqs
            .iter()
            .find(|(a, _)| *a == server)
            .map_or((seq != 0, 0), |(_, w)| (w.check(seq), w.highest()))
    }

    pub(super) fn saw_server_seq(&mut self, server: SocketAddr, seq: SeqNo) {
        let cap = 4 * self.servers_max;
        match self.server_seqs.iter_mut().find(|(a, _)| *a == server) {
            Some((_, w)) => {
                w.mark(seq);
            }
            None => {
                if self.server_seqs.len() >= cap {
                    self.server_seqs.remove(0);
                }
                let mut w = ReplayWindow::new();
                w.mark(seq);
                self.server_seqs.push((server, w));
            }
        }
    }

    fn take(&mut self, seq: SeqNo) -> Option<(Req, u64)> {
        let at = self.inflight.iter().position(|(s, _, _)| *s == seq)?;
        let (_, req, sent) = self.inflight.swap_remove(at);
        Some((req, sent))
    }

    /// Continues the requester with `leader` first and every known server, re-sending
    /// what was outstanding under new seqs (the old seqs' answers are then dropped as
    /// unknown: at most ids lost, never repeated). The highest epoch carries over (the
    /// requester's `continue_with`).
    ///
    /// Returns false if nothing changed; requests that could not be re-sent are put in
    /// `dropped`.
    fn switch(
        &mut self,
        now_us: u64,
        leader: SocketAddr,
        learned: &[SocketAddr],
        dropped: &mut Vec<Req>,
    ) -> bool {
        let mut servers = vec![leader];
        for a in self.servers.iter().chain(learned) {
            if !servers.contains(a) && servers.len() < self.servers_max {
                servers.push(*a);
            }
        }
        let requester = match self.requester.continue_with(&servers, now_us) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("cannot switch to leader {leader}: {e}");
                return false;
            }
        };
        self.requester = requester;
        self.servers = servers;
        let pending = std::mem::take(&mut self.inflight);
        for (_, req, sent) in pending {
            match self.send(now_us, req.clone()) {
                Some(seq) => {
                    // Keep the original send time for the refill latency.
                    if let Some(entry) = self.inflight.iter_mut().find(|e| e.0 == seq) {
                        entry.2 = sent;
                    }
                }
                None => dropped.push(req),
            }
        }
        true
    }
}

impl Machine {
    /// [`Link::switch`], clearing the in-flight marks of what could not be re-sent.
    pub(super) fn switch(&mut self, now: u64, leader: SocketAddr, learned: &[SocketAddr]) -> bool {
        let mut dropped = Vec::new();
        let switched = self.link.switch(now, leader, learned, &mut dropped);
        dropped.iter().for_each(|r| self.forget(r));
        switched
    }

    /// Adds servers a server told us about (bounded), keeping the current leader.
    pub(super) fn learn(&mut self, now: u64, from: SocketAddr, learned: &[SocketAddr]) {
        if learned.iter().any(|a| !self.link.servers.contains(a)) {
            self.switch(now, from, learned);
        }
    }

    /// A `LeaderChange` ("go to this server now") from `from`, a known server. It is not an
    /// answer to anything, so nothing but these checks stands between a forged one and the
    /// agent (issue 12): it is followed only if it names a server this agent already knows
    /// (from its configuration or a server's answer, never from the message itself) and its
    /// epoch is at most one above the highest epoch a leader answered with. Following it only
    /// moves the leader guess: the epoch filter is raised by the named server's own answers
    /// (it confirms, or redirects), never by the `LeaderChange`, so an absurd epoch cannot
    /// make the real leader's answers stale. A rejected one is logged and counted.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_leader_change(
        &mut self,
        now: u64,
        from: SocketAddr,
        seq: SeqNo,
        epoch: u64,
        leader: SocketAddr,
        listed: &[SocketAddr],
        truncated: bool,
    ) {
        let highest = self.link.requester.highest_epoch();
        let (fresh, last_seq) = self.link.server_seq_fresh(from, seq);
        if !fresh {
            // Replayed (with a secret the seq cannot be forged: the tag covers it).
            self.counters.replays_dropped += 1;
            let n = self.counters.replays_dropped;
            if n.is_power_of_two() {
                tracing::warn!(%from, %leader, seq, last_seq, replays = n, "ignored a replayed LeaderChange: its seq was acted on already, or is older than the window of that server's datagrams");
            }
            return;
        }
        let reject = if !self.link.servers.contains(&leader) {
            Some("it names a server this agent does not know")
        } else if epoch > highest.saturating_add(1) {
            Some("its epoch is more than one above the highest a leader answered with")
        } else {
            None
        };
        if truncated || listed.iter().any(|a| !self.link.servers.contains(a)) {
            // Servers this agent does not know yet: read them from the node table (asked of
            // the current leader guess, a known server), not from the message.
            self.table.wanted = true;
        }
        if let Some(why) = reject {
            self.counters.leader_changes_rejected += 1;
            let n = self.counters.leader_changes_rejected;
            // Logged at 1, 2, 4, 8, ... so a flood cannot fill the log.
            if n.is_power_of_two() {
                tracing::warn!(%from, %leader, epoch, highest_epoch = highest, rejected = n, "ignored a LeaderChange: {why}");
            }
            return;
        }
        self.link.saw_server_seq(from, seq);
        if leader != self.link.requester.leader() {
            tracing::info!(%from, %leader, epoch, "leader change: switching now");
            if self.switch(now, leader, &[]) {
                self.counters.leader_changes += 1;
            }
        }
    }

    /// Takes the requester's outcomes: answers to their request's owner, failures
    /// counted and retried later.
    pub(super) fn drain_events(&mut self, now: u64) {
        while let Some(event) = self.link.requester.poll_event() {
            match event {
                Event::Completed {
                    seq, payload, from, ..
                } => {
                    let Some((req, sent_us)) = self.link.take(seq) else {
                        continue;
                    };
                    if let Answer::Grant { first, count, .. } = &payload {
                        tracing::debug!(%from, first = %first, count, "grant");
                    }
                    self.on_answer(now, req, sent_us, payload);
                }
                Event::Failed { seq, error } => {
                    self.counters.requests_failed += 1;
                    let Some((req, _)) = self.link.take(seq) else {
                        continue;
                    };
                    tracing::debug!("request {seq} ({req:?}) failed: {error}");
                    self.forget(&req);
                    match req {
                        Req::Block { index, .. } => {
                            let s = &mut self.seqs[index];
                            s.retry_at_us = s.retry_at_us.max(now + RETRY_AFTER_FAIL_US);
                        }
                        Req::Hello => {
                            // Not sooner than a version refusal asked.
                            self.reg.hello_retry_at_us =
                                self.reg.hello_retry_at_us.max(now + RETRY_AFTER_FAIL_US)
                        }
                        _ => {}
                    }
                    // Logged once per change; a never-registered agent shows Unreachable
                    // with node id 0.
                    self.set_connection(crate::Connection::Unreachable);
                }
            }
        }
    }

    /// A request ended without an answer: clear its in-flight mark.
    fn forget(&mut self, req: &Req) {
        match req {
            Req::Hello => self.reg.hello_inflight = false,
            Req::Ping => self.reg.ping_inflight = false,
            Req::Block { index, .. } => self.seqs[*index].inflight = None,
            Req::NodeTable { .. } => self.table.inflight = false,
        }
    }

    fn on_answer(&mut self, now: u64, req: Req, sent_us: u64, answer: Answer) {
        self.forget(&req);
        match (req, answer) {
            (Req::Hello, Answer::Welcome { node_id, lease_ms }) => {
                self.on_welcome(now, node_id, lease_ms)
            }
            (Req::Ping, Answer::Pong { lease_ms }) => {
                if lease_ms == 0 {
                    self.unregistered("pong says not registered");
                }
            }
            (
                _,
                Answer::Error {
                    code: ErrorCode::NotRegistered,
                },
            ) => self.unregistered("server says not registered"),
            (
                Req::Block { index, count },
                Answer::Grant {
                    sequence,
                    width,
                    first,
                    count: granted,
                },
            ) => self.on_grant(now, index, count, sent_us, &sequence, width, first, granted),
            (
                Req::NodeTable { .. },
                Answer::NodeTable {
                    version,
                    page,
                    page_count,
                    servers,
                    only_servers,
                },
            ) => self.on_table_page(now, version, page, page_count, servers, only_servers),
            (Req::NodeTable { .. }, Answer::Error { code }) => {
                tracing::debug!("node table refused: {code:?}");
                self.table = TableFetch::default();
            }
            (Req::Block { index, .. }, Answer::Error { code }) => {
                self.on_block_refused(now, index, code)
            }
            (req, answer) => {
                tracing::debug!("unexpected answer {answer:?} to {req:?}");
            }
        }
    }

    fn on_table_page(
        &mut self,
        now: u64,
        version: u64,
        page: u16,
        page_count: u16,
        servers: Vec<SocketAddr>,
        only_servers: bool,
    ) {
        let t = &mut self.table;
        if t.version.is_some_and(|v| v != version) {
            // The table changed between pages: start again (bounded: once per change, and
            // a fetch reads at most TABLE_PAGES_MAX pages).
            t.collected.clear();
            t.next_page = 0;
            t.version = Some(version);
            return;
        }
        t.version = Some(version);
        for a in servers {
            if !t.collected.contains(&a) {
                t.collected.push(a);
            }
        }
        if only_servers && page + 1 < page_count && page + 1 < TABLE_PAGES_MAX {
            t.next_page = page + 1;
            return;
        }
        let learned = std::mem::take(&mut t.collected);
        self.table = TableFetch::default();
        tracing::debug!(servers = ?learned, "node table read");
        let leader = self.link.requester.leader();
        self.learn(now, leader, &learned);
    }
}
