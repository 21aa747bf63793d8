//! The driver thread: one UDP socket, the request state machine, the sizers
//! and the ring producers.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::SmallRng;
use unid_core::{Disposition, Event, Reply, Requester, Response, Sizer};
use unid_proto::{
    AuthKey, ClusterId, Codec, DATAGRAM_BYTES_MAX, ErrorCode, Header, Message, NodeId, NodeRole,
    ReplayWindow, SeqNo, SequenceName, Width, decode,
};
use unid_ring::{Producer, ProducerOptions, RingError};

use crate::net::{Net, PathLoss, PathState, Recv};
use crate::pair::{Beat, Pair, PairEvents};
use crate::{AgentConfig, Connection, Error, Metrics, SequenceState, Shared};

/// How long to wait before asking again for a sequence the cluster does not
/// know, or after a ring error, in microseconds.
const RETRY_SLOW_US: u64 = 2_000_000;
/// How often the status snapshot is refreshed, in microseconds.
const STATUS_EVERY_US: u64 = 20_000;
/// Ping interval when the server gave no lease, in milliseconds.
const LEASE_MS_DEFAULT: u64 = 3000;
/// The most node-table pages read in one fetch.
const TABLE_PAGES_MAX: u16 = 16;
/// After a request failed (every attempt sent, refused or unanswered), wait
/// this long before sending it again, in microseconds: a path with no route
/// fails at once, and must not be retried in a busy loop.
const RETRY_AFTER_FAIL_US: u64 = 100_000;
/// Datagrams read from each non-leader socket per loop, at most.
const RECV_PER_SOCKET_MAX: usize = 16;
/// After a takeover, blocks are sized at least from the peer's last reported
/// rate for this long (until this side has measured its own), in microseconds.
const TAKEOVER_HINT_US: u64 = 2_000_000;

/// What a request is for.
#[derive(Clone, Debug)]
enum Req {
    Hello,
    Ping,
    Block { index: usize, count: u64 },
    NodeTable { page: u16 },
}

/// A final answer from a server.
#[derive(Clone, Debug)]
enum Answer {
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
        /// Every node of the page is a server (servers come first, so more
        /// may follow on the next page).
        only_servers: bool,
    },
}

/// Reading the node table page by page, after a server list came truncated.
#[derive(Default)]
struct TableFetch {
    wanted: bool,
    inflight: bool,
    version: Option<u64>,
    next_page: u16,
    collected: Vec<SocketAddr>,
}

/// The requester plus what it does not do: learning servers, `LeaderChange`,
/// and an epoch filter that survives rebuilding the requester.
struct Link {
    requester: Requester<Req, Answer>,
    servers: Vec<SocketAddr>,
    /// Highest seq handed out so far (new requesters continue above it).
    last_seq: SeqNo,
    highest_epoch: u64,
    /// Outstanding requests and what they are for.
    inflight: Vec<(SeqNo, Req, u64)>,
    config: unid_core::RequesterConfig,
    /// Per server, the header seqs of its datagrams this agent acted on (servers number
    /// their datagrams from wall-clock µs at start, so a restart continues above): a
    /// `LeaderChange` whose seq is not fresh in that window is a replay. The window, not a
    /// plain "above the highest", because a server's shards send in an order slightly
    /// different from their seqs. At most `4 × servers_max` entries.
    server_seqs: Vec<(SocketAddr, ReplayWindow)>,
}

impl Link {
    fn send(&mut self, now_us: u64, req: Req) -> Option<SeqNo> {
        match self.requester.send(now_us, req.clone()) {
            Ok(seq) => {
                self.last_seq = self.last_seq.max(seq);
                self.inflight.push((seq, req, now_us));
                Some(seq)
            }
            Err(e) => {
                // Bounded by `requests_max` (validated to cover every
                // sequence); retried on the next tick.
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

    fn saw_server_seq(&mut self, server: SocketAddr, seq: SeqNo) {
        let cap = 4 * self.config.servers_max;
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

    /// Rebuilds the requester with `leader` first and every known server,
    /// re-sending what was outstanding under new seqs (the old seqs' answers
    /// are then dropped as unknown: at most ids lost, never repeated).
    ///
    /// Returns false if nothing changed; requests that could not be re-sent
    /// are put in `dropped`.
    fn switch(
        &mut self,
        now_us: u64,
        leader: SocketAddr,
        learned: &[SocketAddr],
        dropped: &mut Vec<Req>,
    ) -> bool {
        let mut servers = vec![leader];
        for a in self.servers.iter().chain(learned) {
            if !servers.contains(a) && servers.len() < self.config.servers_max {
                servers.push(*a);
            }
        }
        let first_seq = self.last_seq.saturating_add(1).max(1);
        let requester = match Requester::new(self.config.clone(), &servers, first_seq, now_us) {
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

/// One sequence's ring and refill state.
struct Seq {
    name: SequenceName,
    width: Option<Width>,
    producer: Option<Producer>,
    /// Granted ids not yet in the ring, in increasing order.
    held: VecDeque<(u128, u64)>,
    /// Every id accepted so far is below this.
    next_min: u128,
    /// Ids pushed into the ring since start.
    pushed: u128,
    /// `pushed - ids_available` at the last look.
    consumed_seen: u128,
    sizer: Sizer,
    inflight: Option<SeqNo>,
    block_ids: u64,
    state: SequenceState,
    retry_at_us: u64,
    /// After a takeover: ask for a block now, whatever the ring holds (the
    /// ring's blocks may lie below ids the peer's consumers already took).
    force_refill: bool,
    /// After a takeover: the peer's rate (ids/s), a floor for block sizes
    /// until `hint_until_us`.
    rate_hint: f64,
    hint_until_us: u64,
}

impl Seq {
    fn held_ids(&self) -> u64 {
        self.held
            .iter()
            .fold(0u64, |a, (_, c)| a.saturating_add(*c))
    }

    fn ring_ids(&self) -> u64 {
        self.producer.as_ref().map_or(0, |p| p.ids_available())
    }
}

pub(crate) struct Driver {
    config: AgentConfig,
    shared: Arc<Shared>,
    net: Net,
    /// Every server path down for lack of a route.
    no_route: bool,
    hello_retry_at_us: u64,
    codec: Codec,
    key: Option<AuthKey>,
    start: Instant,
    rng: SmallRng,
    link: Link,
    incarnation: u64,
    /// The incarnation the current `Hello` carries: `incarnation` for the first, then
    /// above every earlier one (wall-clock µs, at least one more). Servers refuse a `Hello`
    /// not newer than the last one registered under this name (replay protection), so a
    /// registration after another agent of the same name must carry a newer one.
    hello_incarnation: u64,
    /// The cluster id this agent serves: configured, or pinned from the first answer that
    /// carried one (0 until then). Sent on every request; an answer carrying another
    /// non-zero id is dropped (issue 12: two clusters on one address).
    cluster: ClusterId,
    node_id: NodeId,
    lease_ms: u64,
    hello_inflight: bool,
    ping_inflight: bool,
    next_ping_us: u64,
    connection: Connection,
    seqs: Vec<Seq>,
    status_at_us: u64,
    table: TableFetch,
    pair: Option<Pair>,
}

impl Driver {
    pub(crate) fn new(
        config: AgentConfig,
        incarnation: u64,
        shared: Arc<Shared>,
    ) -> Result<Driver, Error> {
        let mut net = Net::new();
        for a in &config.servers {
            net.ensure(*a, &config.servers)
                .map_err(|source| Error::Io {
                    op: "open udp socket to server",
                    addr: *a,
                    source,
                })?;
        }
        let requester = Requester::new(config.requester.clone(), &config.servers, incarnation, 0)
            .map_err(|e| Error::InvalidConfig {
            field: "requester",
            reason: e.to_string(),
        })?;
        let seqs = config
            .sequences
            .iter()
            .map(|name| {
                Ok(Seq {
                    name: name.clone(),
                    width: None,
                    producer: None,
                    held: VecDeque::new(),
                    next_min: 0,
                    pushed: 0,
                    consumed_seen: 0,
                    sizer: Sizer::new(config.sizing.clone(), 0).map_err(|e| {
                        Error::InvalidConfig {
                            field: "sizing",
                            reason: e.to_string(),
                        }
                    })?,
                    inflight: None,
                    block_ids: 0,
                    state: SequenceState::Waiting,
                    retry_at_us: 0,
                    force_refill: false,
                    rate_hint: 0.0,
                    hint_until_us: 0,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let pair = match &config.pair {
            Some(p) => Some(
                Pair::bind(p.clone(), config.key.clone(), 0).map_err(|source| Error::Io {
                    op: "bind pair udp",
                    addr: p.listen,
                    source,
                })?,
            ),
            None => None,
        };
        let cluster = config.cluster.unwrap_or(0);
        Ok(Driver {
            pair,
            link: Link {
                requester,
                servers: config.servers.clone(),
                last_seq: incarnation.saturating_sub(1),
                highest_epoch: 0,
                inflight: Vec::new(),
                config: config.requester.clone(),
                server_seqs: Vec::new(),
            },
            key: config.key.clone(),
            rng: SmallRng::seed_from_u64(incarnation),
            config,
            shared,
            net,
            no_route: false,
            hello_retry_at_us: 0,
            codec: {
                let mut c = Codec::new();
                c.set_cluster(cluster);
                c
            },
            start: Instant::now(),
            incarnation,
            hello_incarnation: 0,
            cluster,
            node_id: 0,
            lease_ms: LEASE_MS_DEFAULT,
            hello_inflight: false,
            ping_inflight: false,
            next_ping_us: 0,
            connection: Connection::Registering,
            seqs,
            status_at_us: 0,
            table: TableFetch::default(),
        })
    }

    /// For `Hello`: a standby backup names the primary it stands in for
    /// (once it has heard the primary's node id).
    fn backup_of(&self) -> Option<NodeId> {
        let pair = self.pair.as_ref()?;
        let id = pair.peer().map_or(0, |p| p.node_id);
        (pair.role() == crate::PairRole::Backup && !pair.is_active() && id != 0).then_some(id)
    }

    pub(crate) fn pair_addr(&self) -> Option<SocketAddr> {
        self.pair.as_ref().map(Pair::local_addr)
    }

    fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    pub(crate) fn run(mut self) {
        tracing::info!(
            servers = ?self.config.servers,
            sequences = ?self.config.sequences.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            incarnation = self.incarnation,
            "agent starting: registering with the cluster"
        );
        let tick_us = self.config.poll_interval_ms * 1000;
        let mut buf = vec![0u8; DATAGRAM_BYTES_MAX + 64];
        while !self.shared.stop.load(Ordering::Acquire) {
            let now = self.now_us();
            self.tick(now);
            let wait_us = match self.link.requester.poll_timeout() {
                Some(t) => t.saturating_sub(self.now_us()).min(tick_us),
                None => tick_us,
            }
            .max(100);
            let leader = self.link.requester.leader();
            let mut got = Vec::new();
            self.net.recv(
                leader,
                Duration::from_micros(wait_us),
                &mut buf,
                RECV_PER_SOCKET_MAX,
                |r, bytes| got.push((r, bytes.to_vec())),
            );
            for (r, bytes) in got {
                let now = self.now_us();
                match r {
                    Recv::Datagram { from, .. } => {
                        self.on_datagram(now, from, &bytes);
                    }
                    Recv::PathError { from, loss } => self.on_path_error(now, from, loss),
                }
            }
        }
        self.set_connection(Connection::Stopped);
        for s in &mut self.seqs {
            s.producer = None; // Drop: marks the ring closed.
        }
        self.publish_status(self.now_us());
        tracing::info!("agent stopped; rings closed");
    }

    /// Everything timed: requester timers, registration, pings, refills.
    fn tick(&mut self, now: u64) {
        if self.link.requester.poll_timeout().is_some_and(|t| t <= now) {
            self.link.requester.handle_timeout(now, &mut self.rng);
        }
        self.drain_events(now);
        if self.node_id == 0 && !self.hello_inflight && now >= self.hello_retry_at_us {
            let previous = self.hello_incarnation;
            self.hello_incarnation = if previous == 0 {
                self.incarnation
            } else {
                wall_clock_us().max(previous.saturating_add(1))
            };
            self.hello_inflight = self.link.send(now, Req::Hello).is_some();
            if !self.hello_inflight {
                self.hello_incarnation = previous;
            }
        }
        if self.node_id != 0 && self.table.wanted && !self.table.inflight {
            let page = self.table.next_page;
            self.table.inflight = self.link.send(now, Req::NodeTable { page }).is_some();
        }
        if self.node_id != 0 && !self.ping_inflight && now >= self.next_ping_us {
            self.ping_inflight = self.link.send(now, Req::Ping).is_some();
            self.next_ping_us = now + self.lease_ms * 1000 / 3;
        }
        for index in 0..self.seqs.len() {
            self.refill(now, index);
        }
        self.tick_pair(now);
        self.transmit(now);
        if now >= self.status_at_us {
            self.publish_status(now);
            self.status_at_us = now + STATUS_EVERY_US;
        }
    }

    fn refill(&mut self, now: u64, index: usize) {
        let registered = self.node_id != 0;
        let blocks_ahead = u64::from(self.config.blocks_ahead);
        let s = &mut self.seqs[index];
        if let Some(p) = &s.producer {
            p.heartbeat_now();
            let available = p.ids_available();
            let consumed = s.pushed - u128::from(available);
            let delta = consumed - s.consumed_seen;
            if delta > 0 {
                s.sizer
                    .record_consumed(now, delta.min(u64::MAX as u128) as u64);
                s.consumed_seen = consumed;
                if available == 0 && s.held.is_empty() {
                    Metrics::add(&self.shared.metrics.ring_empty_events, 1);
                }
            }
        }
        // Move held ids into the ring as slots allow.
        if let Some(p) = &mut s.producer {
            while let Some(&(first, count)) = s.held.front() {
                match p.push(first, count) {
                    Ok(n) if n == count => {
                        s.held.pop_front();
                        s.pushed += u128::from(n);
                    }
                    Ok(n) => {
                        if n > 0 {
                            s.held[0] = (first + u128::from(n), count - n);
                            s.pushed += u128::from(n);
                        }
                        break;
                    }
                    Err(e) => {
                        // Never retried: dropping the block loses ids, never repeats them.
                        tracing::error!(sequence = %s.name, "ring refused block {first}+{count}: {e}");
                        s.held.pop_front();
                        Metrics::add(&self.shared.metrics.grants_rejected, 1);
                    }
                }
            }
        }
        if !registered || s.inflight.is_some() || now < s.retry_at_us {
            return;
        }
        if matches!(s.state, SequenceState::Exhausted) {
            return;
        }
        let width = s.width.unwrap_or(Width::W8);
        let block = match s.sizer.block_ids(now, width, s.next_min) {
            Ok(b) if now < s.hint_until_us => {
                // Sized at least for the rate the peer served (capped like
                // any block; the server may grant fewer).
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
        let have = s.ring_ids().saturating_add(s.held_ids());
        if have >= block.saturating_mul(blocks_ahead) && !s.force_refill {
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
            Metrics::add(&self.shared.metrics.block_requests, 1);
        }
    }

    fn transmit(&mut self, now: u64) {
        let mut out = [0u8; DATAGRAM_BYTES_MAX];
        while let Some(t) = self.link.requester.poll_transmit(now) {
            if t.attempt > 1 {
                Metrics::add(&self.shared.metrics.retransmits, 1);
            }
            let header = Header {
                sender: if matches!(t.request, Req::Hello) {
                    0
                } else {
                    self.node_id
                },
                seq: t.seq,
                reply_to: 0,
                epoch: self.link.highest_epoch,
            };
            let name;
            let message = match &t.request {
                Req::Hello => Message::Hello {
                    role: NodeRole::Agent,
                    incarnation: self.hello_incarnation,
                    name: &self.config.name,
                    listen: None,
                    // A standby backup names the primary it stands in for
                    // (once it has heard its node id).
                    backup_of: self.backup_of(),
                },
                Req::Ping => Message::Ping { sent_us: now },
                Req::NodeTable { page } => Message::NodeTableRequest { page: *page },
                Req::Block { index, count } => {
                    name = self.seqs[*index].name.clone();
                    Message::BlockRequest {
                        sequence: name.as_str(),
                        count: *count,
                    }
                }
            };
            let len = match self
                .codec
                .encode(&header, &message, self.key.as_ref(), &mut out)
            {
                Ok(len) => len,
                Err(e) => {
                    tracing::error!("cannot encode {:?}: {e}", t.request);
                    continue;
                }
            };
            if let Err(e) = self
                .net
                .send(t.destination, &out[..len], &self.link.servers)
            {
                Metrics::add(&self.shared.metrics.send_errors, 1);
                tracing::debug!("send to {}: {e}", t.destination);
                if let Some(loss) = crate::net::classify(&e) {
                    self.path_down(t.destination, loss);
                }
                self.link.requester.handle_send_error(now, t.destination);
            }
        }
    }

    /// The kernel reported an error for `from` (ICMP on its connected
    /// socket): the fast signal that it or the path is gone.
    fn on_path_error(&mut self, now: u64, from: SocketAddr, loss: PathLoss) {
        Metrics::add(&self.shared.metrics.path_errors, 1);
        self.path_down(from, loss);
        self.link.requester.handle_send_error(now, from);
        self.transmit(now);
    }

    fn path_down(&mut self, addr: SocketAddr, loss: PathLoss) {
        if self.net.set_state(addr, PathState::Down(loss)).is_some() {
            Metrics::add(&self.shared.metrics.path_losses, 1);
            tracing::warn!(server = %addr, "server path down: {loss:?} (fast signal)");
        }
        if !self.no_route && self.net.no_route(&self.link.servers) {
            self.no_route = true;
            Metrics::add(&self.shared.metrics.network_losses, 1);
            tracing::warn!(
                "network lost: no route to any server (interface down?); serving from the rings only"
            );
        }
    }

    fn path_up(&mut self, addr: SocketAddr) {
        if let Some(was) = self.net.set_state(addr, PathState::Up)
            && was != PathState::Unknown
        {
            tracing::info!(server = %addr, "server path up again");
        }
        if self.no_route {
            self.no_route = false;
            tracing::info!("network back: a server answers");
        }
    }

    fn on_datagram(&mut self, now: u64, from: SocketAddr, bytes: &[u8]) {
        self.path_up(from);
        let shared = Arc::clone(&self.shared);
        let metrics = &shared.metrics;
        let frame = match decode(bytes, self.key.as_ref()) {
            Ok(f) => f,
            Err(e) => {
                Metrics::add(&metrics.datagrams_dropped, 1);
                tracing::debug!("dropped datagram from {from}: {e}");
                return;
            }
        };
        if frame.cluster != 0 && self.cluster != 0 && frame.cluster != self.cluster {
            let n = metrics
                .other_cluster_dropped
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            if n.is_power_of_two() {
                tracing::warn!(%from, cluster = format_args!("{:016x}", frame.cluster), ours = format_args!("{:016x}", self.cluster), dropped = n, "dropped an answer from another cluster (two clusters on one address, or a server list that mixes them?)");
            }
            return;
        }
        let epoch = frame.header.epoch;
        if epoch < self.link.highest_epoch || !self.link.servers.contains(&from) {
            Metrics::add(&metrics.datagrams_dropped, 1);
            return;
        }
        // Only a leader's answers raise the highest epoch. Any server redirects, serves
        // node-table pages and rate-limits, and a server that is not the leader may be in a
        // higher term than every leader (a partitioned server's failed elections raise its
        // term): if its answers counted, every answer of the real, lower-term leader would be
        // dropped for as long as no leader reaches that term (found by `sim/`, seeds 464 and
        // 947, in `unid-core`'s requester; the same rule holds here).
        let from_leader = !matches!(
            frame.message,
            Message::NotLeader { .. }
                | Message::NodeTable { .. }
                | Message::Error {
                    code: ErrorCode::RateLimited,
                    ..
                }
        );
        let mut learn_after: Vec<SocketAddr> = Vec::new();
        let reply = match frame.message {
            Message::LeaderChange {
                leader,
                servers,
                truncated,
                ..
            } => {
                let learned: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
                let seq = frame.header.seq;
                self.on_leader_change(now, from, seq, epoch, leader, &learned, truncated);
                return;
            }
            Message::Welcome {
                node_id,
                lease_ms,
                servers,
                truncated,
            } => {
                self.table.wanted |= truncated;
                // Learned after the Welcome is taken: rebuilding the
                // requester first would orphan the Hello it answers.
                learn_after = servers.iter().map(|s| s.addr).collect();
                Reply::Done(Answer::Welcome { node_id, lease_ms })
            }
            Message::BlockGrant {
                sequence,
                width,
                block,
            } => Reply::Done(Answer::Grant {
                sequence: sequence.to_owned(),
                width,
                first: block.first(),
                count: block.count(),
            }),
            Message::Pong { lease_ms, .. } => Reply::Done(Answer::Pong { lease_ms }),
            Message::NodeTable {
                version,
                page,
                page_count,
                nodes,
            } => Reply::Done(Answer::NodeTable {
                version,
                page,
                page_count,
                servers: nodes
                    .iter()
                    .filter(|n| n.role == NodeRole::Server)
                    .map(|n| n.addr)
                    .collect(),
                only_servers: nodes.iter().all(|n| n.role == NodeRole::Server),
            }),
            Message::Error {
                code: ErrorCode::NotReady | ErrorCode::RateLimited,
                ..
            } => Reply::TryLater,
            Message::Error { code, .. } => Reply::Done(Answer::Error { code }),
            Message::NotLeader {
                leader,
                servers,
                truncated,
                ..
            } => {
                self.table.wanted |= truncated;
                let learned: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
                if let Some(l) = leader
                    && !self.link.servers.contains(&l)
                {
                    // A leader we did not know: switch to it directly.
                    tracing::info!(leader = %l, "redirected to a server not configured");
                    let mut dropped = Vec::new();
                    if self.link.switch(now, l, &learned, &mut dropped) {
                        Metrics::add(&metrics.redirects, 1);
                    }
                    dropped.iter().for_each(|r| self.forget(r));
                    self.transmit(now);
                    return;
                }
                Reply::Redirect { leader }
            }
            _ => {
                Metrics::add(&metrics.datagrams_dropped, 1);
                return;
            }
        };
        let response = Response {
            reply_to: frame.header.reply_to,
            // A non-leader's answer is not stale (the filter above passed it) and must raise
            // nothing in the requester.
            epoch: if from_leader {
                epoch
            } else {
                epoch.min(self.link.requester.highest_epoch())
            },
            reply,
        };
        match self.link.requester.handle_response(now, from, response) {
            // Only a leader's answer to a request of ours raises the highest epoch: a datagram
            // answering nothing (spoofed, replayed) with `epoch = 2^64-1` would otherwise make
            // every real answer stale until a restart (issue 12).
            Disposition::Accepted | Disposition::TryLater => {
                self.pin_cluster(from, frame.cluster);
                self.link.saw_server_seq(from, frame.header.seq);
                if from_leader {
                    self.link.highest_epoch = self.link.highest_epoch.max(epoch);
                }
            }
            Disposition::Redirected => {
                self.pin_cluster(from, frame.cluster);
                self.link.saw_server_seq(from, frame.header.seq);
                Metrics::add(&metrics.redirects, 1);
            }
            Disposition::StaleEpoch | Disposition::UnknownSource => {
                Metrics::add(&metrics.datagrams_dropped, 1)
            }
            _ => {}
        }
        if self.connection == Connection::Unreachable && self.node_id != 0 {
            self.set_connection(Connection::Connected);
        }
        self.drain_events(now);
        if !learn_after.is_empty() {
            self.learn(now, from, &learn_after);
        }
        self.transmit(now);
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
    fn on_leader_change(
        &mut self,
        now: u64,
        from: SocketAddr,
        seq: SeqNo,
        epoch: u64,
        leader: SocketAddr,
        listed: &[SocketAddr],
        truncated: bool,
    ) {
        let metrics = &self.shared.metrics;
        let highest = self.link.highest_epoch;
        let (fresh, last_seq) = self.link.server_seq_fresh(from, seq);
        if !fresh {
            // Replayed (with a secret the seq cannot be forged: the tag covers it).
            let n = metrics.replays_dropped.fetch_add(1, Ordering::Relaxed) + 1;
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
            let n = metrics
                .leader_changes_rejected
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            // Logged at 1, 2, 4, 8, ... so a flood cannot fill the log.
            if n.is_power_of_two() {
                tracing::warn!(%from, %leader, epoch, highest_epoch = highest, rejected = n, "ignored a LeaderChange: {why}");
            }
            self.transmit(now);
            return;
        }
        self.link.saw_server_seq(from, seq);
        if leader != self.link.requester.leader() {
            tracing::info!(%from, %leader, epoch, "leader change: switching now");
            let mut dropped = Vec::new();
            if self.link.switch(now, leader, &[], &mut dropped) {
                Metrics::add(&metrics.leader_changes, 1);
            }
            dropped.iter().for_each(|r| self.forget(r));
        }
        self.transmit(now);
    }

    /// Pins the cluster id of the first answer to a request of ours that carries one.
    fn pin_cluster(&mut self, from: SocketAddr, cluster: ClusterId) {
        if self.cluster == 0 && cluster != 0 {
            self.cluster = cluster;
            self.codec.set_cluster(cluster);
            tracing::info!(server = %from, cluster = format_args!("{cluster:016x}"), "serving cluster (answers of any other are dropped)");
        }
    }

    /// Adds servers a server told us about (bounded), keeping the current leader.
    fn learn(&mut self, now: u64, from: SocketAddr, learned: &[SocketAddr]) {
        if learned.iter().any(|a| !self.link.servers.contains(a)) {
            let mut dropped = Vec::new();
            self.link.switch(now, from, learned, &mut dropped);
            dropped.iter().for_each(|r| self.forget(r));
        }
    }

    fn drain_events(&mut self, now: u64) {
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
                    Metrics::add(&self.shared.metrics.requests_failed, 1);
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
                        Req::Hello => self.hello_retry_at_us = now + RETRY_AFTER_FAIL_US,
                        _ => {}
                    }
                    // Logged once per change; a never-registered agent
                    // shows Unreachable with node id 0.
                    self.set_connection(Connection::Unreachable);
                }
            }
        }
    }

    /// A request ended without an answer: clear its in-flight mark.
    fn forget(&mut self, req: &Req) {
        match req {
            Req::Hello => self.hello_inflight = false,
            Req::Ping => self.ping_inflight = false,
            Req::Block { index, .. } => self.seqs[*index].inflight = None,
            Req::NodeTable { .. } => self.table.inflight = false,
        }
    }

    fn on_answer(&mut self, now: u64, req: Req, sent_us: u64, answer: Answer) {
        self.forget(&req);
        match (req, answer) {
            (Req::Hello, Answer::Welcome { node_id, lease_ms }) => {
                self.node_id = node_id;
                self.lease_ms = if lease_ms == 0 {
                    LEASE_MS_DEFAULT
                } else {
                    u64::from(lease_ms)
                };
                self.next_ping_us = now + self.lease_ms * 1000 / 3;
                Metrics::add(&self.shared.metrics.registrations, 1);
                tracing::info!(node_id, leader = %self.link.requester.leader(), "registered");
                self.set_connection(Connection::Connected);
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
                let s = &mut self.seqs[index];
                let state = match code {
                    // That seq was answered already and the answer was lost (and left the
                    // server's cache): ask again, at once, under a new seq.
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
            // The table changed between pages: start again (bounded: once
            // per change, and a fetch reads at most TABLE_PAGES_MAX pages).
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

    fn unregistered(&mut self, why: &str) {
        if self.node_id != 0 {
            tracing::info!(node_id = self.node_id, "{why}: registering again");
        }
        self.node_id = 0;
        self.set_connection(Connection::Registering);
    }

    #[allow(clippy::too_many_arguments)]
    fn on_grant(
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
        let shared = Arc::clone(&self.shared);
        let metrics = &shared.metrics;
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
            Metrics::add(&metrics.grants_rejected, 1);
            tracing::error!(sequence = %s.name, "dropped a grant {why}: {first}+{count} (ids below {} already held)", s.next_min);
            return;
        }
        // Checked by the codec (`Block::new`): the block fits its width.
        let end = first + u128::from(count);
        assert!(end > s.next_min && first >= s.next_min);
        s.next_min = end;
        Metrics::add(&metrics.grants, 1);
        metrics.ids_granted.fetch_add(count, Ordering::Relaxed);
        if s.width.is_none() {
            s.width = Some(width);
        }
        if s.producer.is_none() {
            let mut opts = ProducerOptions::new(width.bytes());
            opts.capacity = self.config.ring_capacity;
            opts.mode = self.config.ring_mode;
            match Producer::create(&self.config.ring_dir, s.name.as_str(), &opts) {
                Ok(p) => {
                    tracing::info!(sequence = %s.name, path = %p.path().display(), width = width.bytes(), "ring created");
                    s.producer = Some(p);
                }
                Err(e) => {
                    let text = match &e {
                        RingError::InUse { pid, .. } => {
                            format!("another agent (pid {pid}) serves this ring")
                        }
                        other => other.to_string(),
                    };
                    if s.state != SequenceState::RingError(text.clone()) {
                        tracing::error!(sequence = %s.name, "cannot create ring: {text}");
                    }
                    s.state = SequenceState::RingError(text);
                    s.retry_at_us = now + RETRY_SLOW_US;
                    // The block is dropped: lost, never repeated.
                    return;
                }
            }
        }
        if s.state != SequenceState::Serving {
            tracing::info!(sequence = %s.name, "serving");
            s.state = SequenceState::Serving;
        }
        s.held.push_back((first, count));
        let latency = now.saturating_sub(sent_us);
        metrics
            .refill_latency_us_last
            .store(latency, Ordering::Relaxed);
        metrics
            .refill_latency_us_max
            .fetch_max(latency, Ordering::Relaxed);
        // Push at once (and maybe ask for the next block).
        self.refill(now, index);
    }

    fn set_connection(&mut self, c: Connection) {
        if self.connection != c {
            match c {
                Connection::Unreachable => tracing::warn!(
                    "cluster unreachable: serving from the rings only until it answers"
                ),
                Connection::Connected => {
                    tracing::info!(leader = %self.link.requester.leader(), "cluster reachable")
                }
                Connection::Registering => tracing::info!("registering"),
                Connection::Stopped => tracing::info!("stopping"),
            }
            self.connection = c;
        }
    }

    /// Heartbeats with the peer agent; on a takeover, fresh blocks at the
    /// peer's rate; the pair file when something changed.
    fn tick_pair(&mut self, now: u64) {
        let Some(pair) = &mut self.pair else {
            return;
        };
        let mut me = Beat {
            role: pair.role(),
            incarnation: self.incarnation,
            node_id: self.node_id,
            active: pair.is_active(),
            active_since_us: 0, // Set by the link.
            connection: format!("{:?}", self.connection).to_lowercase(),
            listen: pair.local_addr(),
            socket: self.shared.socket_addr(),
            sequences: self
                .seqs
                .iter()
                .map(|s| {
                    (
                        s.name.as_str().to_owned(),
                        s.sizer.rate_ids_per_s(now),
                        s.next_min,
                    )
                })
                .collect(),
            ring_dir: self.config.ring_dir.clone(),
        };
        let PairEvents {
            took_over,
            file_dirty,
        } = pair.tick(now, &mut me);
        let counters = pair.counters;
        if took_over {
            let peer_rates: Vec<(String, f64)> = pair
                .peer()
                .map(|p| {
                    p.sequences
                        .iter()
                        .map(|(n, r, _)| (n.clone(), *r))
                        .collect()
                })
                .unwrap_or_default();
            for s in &mut self.seqs {
                s.force_refill = true;
                s.rate_hint = peer_rates
                    .iter()
                    .find(|(n, _)| n == s.name.as_str())
                    .map_or(0.0, |(_, r)| *r);
                s.hint_until_us = now + TAKEOVER_HINT_US;
            }
        }
        if file_dirty {
            if let Some(peer) = pair.peer()
                && peer.ring_dir == self.config.ring_dir
            {
                tracing::error!(ring_dir = %peer.ring_dir.display(), "pair: the peer uses the same ring folder; give each agent its own --ring-dir");
            }
            let text = pair.file_text(&me);
            if let Err(e) = crate::pair::write_pair_file(&self.config.ring_dir, &text) {
                tracing::warn!(dir = %self.config.ring_dir.display(), "pair: cannot write the pair file: {e}");
            }
        }
        let m = &self.shared.metrics;
        m.peer_beats_sent
            .store(counters.beats_sent, Ordering::Relaxed);
        m.peer_beats_received
            .store(counters.beats_received, Ordering::Relaxed);
        m.peer_beats_dropped
            .store(counters.beats_dropped, Ordering::Relaxed);
        m.peer_send_errors
            .store(counters.send_errors, Ordering::Relaxed);
        m.peer_losses_fast
            .store(counters.losses_fast, Ordering::Relaxed);
        m.peer_losses_slow
            .store(counters.losses_slow, Ordering::Relaxed);
        m.takeovers.store(counters.takeovers, Ordering::Relaxed);
        if took_over {
            // Ask now, not at the next tick.
            for index in 0..self.seqs.len() {
                self.refill(now, index);
            }
        }
    }

    fn publish_status(&self, now: u64) {
        let mut st = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
        st.connection = self.connection;
        st.node_id = self.node_id;
        st.leader = Some(self.link.requester.leader());
        st.epoch = self.link.highest_epoch;
        st.cluster = self.cluster;
        st.pair = self.pair.as_ref().map(|p| p.status(now));
        st.servers = self.net.paths();
        st.network_down = self.no_route;
        for (line, s) in st.sequences.iter_mut().zip(&self.seqs) {
            line.width = s.width;
            line.state = s.state.clone();
            line.ring_ids = s.ring_ids();
            line.held_ids = s.held_ids();
            line.rate_ids_per_s = s.sizer.rate_ids_per_s(now);
            line.block_ids = s.block_ids;
            line.ids_pushed = s.pushed;
        }
    }
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
fn wall_clock_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
