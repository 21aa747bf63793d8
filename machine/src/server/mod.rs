//! The server state machine: [`Server`].
//!
//! # Inputs, outputs and time
//! A driver owns one [`Server`] (behind a lock, when several threads feed it) and calls:
//! - [`Server::handle_datagram`] for every datagram received (bytes, source, `now_us`, and the
//!   replicated state as last applied): it returns the answer to send back, if any;
//! - [`Server::on_leader`] when consensus reports a new leader or term;
//! - [`Server::on_tick`] every [`TICK_MS`] (lease expiry, quorum checks, raises, the server
//!   list);
//! - the `on_*` result methods when a consensus call it was asked for ([`Action`]) finishes.
//!
//! Between calls the driver drains [`Server::poll_action`] (consensus calls to perform, each
//! answered by one `on_*` call) and [`Server::poll_transmit`] (datagrams to send that are no
//! immediate answer: `Welcome` after a registration commits, `LeaderChange` notices).
//! The machine never reads a clock, opens a socket or waits.
//!
//! # Files
//! | file | what it decides |
//! |---|---|
//! | `requests.rs` | each datagram: decode, cluster id, rate limits, redirects, Ping, Hello, admin requests |
//! | `grants.rs` | block requests: reply cache, replay window, grants from the allocator |
//! | `leadership.rs` | phases (follower, warming, leading, stopped), the allocator built from the ready read, the quorum check, the graceful hand-over |
//! | `raises.rs` | ceiling raises: proposing and applying their results |
//! | `leases.rs` | agents, their leases, registrations and removals, rate buckets |
//! | `status.rs` | sequence, status and node-table pages, membership and create answers, gauges |
//! | `stats.rs` | counters and gauges |
//!
//! # Safety of grants
//! A server grants only while it leads, from an allocator built from the ready state read in
//! its current term ([`Server::on_ready`]), and applies only raises it committed itself in
//! that term ([`Server::on_raise_done`]): raises go through this node's Raft, never
//! forwarded to another leader, so a deposed leader can never learn a ceiling some other
//! leader committed. A leader change drops the allocator before anything else; a raise that
//! commits for an allocator since replaced is ignored. See `unid-core`'s allocator docs for
//! the rest.
//!
//! # Amplification and abuse
//! - A datagram that fails to decode or authenticate gets no answer at all; it is counted
//!   ([`ServerStats::dropped_malformed`]).
//! - Every source address has a token bucket ([`Config::source_rate_per_s`]); over it, a
//!   registered agent gets one `Error{RateLimited}` no larger than its request, anyone else
//!   nothing. The bucket table is bounded ([`SOURCES_MAX`]); when full of active sources, new
//!   ones are dropped.
//! - An answer to a sender that is not a registered agent is never larger than the request
//!   (`Welcome` and `NotLeader` drop servers from their list and set `truncated` until they
//!   fit; a `NotLeader` that still does not fit is cut to the leader's endpoint alone, which
//!   fits the shortest `Hello`). **Exception**: admin answers (`SequenceInfo`,
//!   `SequenceListReply`, `StatusReply`, `NodeTable`) must carry more than they were asked
//!   with; they are limited to [`ADMIN_RATE_PER_S`] per source and [`ADMIN_GLOBAL_RATE_PER_S`]
//!   in all, which bounds what a spoofed flood can reflect. With a cluster secret, nothing
//!   unauthenticated is answered at all.
//!
//! # Membership changes
//! `AddServer` and `RemoveServer` (from `unid cluster`) are admin requests: rate limited like
//! the others and, with a cluster secret, only accepted authenticated. A follower answers
//! `NotLeader` (the client follows it; nothing is forwarded). The leader runs one change at a
//! time (a second one meanwhile gets `Error{NotReady}`): `AddServer` adds the server as a
//! learner, waits until it has caught up, makes it a voter and records its UDP address;
//! `RemoveServer` removes a voter (not the leader itself: hand leadership over first, e.g.
//! SIGTERM), after which the removed server stops by itself. Both are idempotent (adding a
//! voter with the same id, or removing a server that is not one, changes nothing) and answer
//! `Membership` with the voters once the change committed, or `Error`. The driver refuses an
//! add whose Raft address accepts no TCP connection before the membership is touched.
//!
//! # Leases and bounds
//! Agents are soft state: an agent not heard from (any datagram) for `lease_ms` is forgotten
//! and must `Hello` again (it gets `NotRegistered`). At most [`Config::agents_max`] agents; a
//! `Hello` beyond that gets `Error{RateLimited}`. When a server becomes leader it takes the
//! agents of the replicated node table with a fresh lease, so agents keep their ids across
//! failover.

mod grants;
mod leadership;
mod leases;
mod raises;
mod requests;
mod stats;
mod status;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use unid_core::state::ClusterState;
use unid_core::{AllocatorConfig, LeaderAllocator, Raise, ReplyCache, ReplyCacheConfig};
use unid_proto::{
    AuthKey, Codec, DATAGRAM_BYTES_MAX, EncodeError, ErrorCode, Header, Id, List, Message, NodeId,
    NodeRole, RaftRole, ReplayWindow, SERVERS_MAX, SeqNo, Server as ServerEntry, Width,
};

pub use leases::{Bucket, RegisterError};
pub use stats::{
    COMMIT_BOUNDS_US, Counters, DropKind, Gauges, Histogram, METRICS_SEQUENCES_MAX, SequenceGauges,
    ServerStats, ServerStatsSnapshot,
};
pub use status::{CreateError, MembershipError, role_tag};

use leases::Agent;
use stats::bump;

/// Most source addresses with a rate bucket.
pub const SOURCES_MAX: usize = 16_384;
/// Admin requests per second one source may send.
pub const ADMIN_RATE_PER_S: u32 = 50;
/// Admin requests per second the server answers in all.
pub const ADMIN_GLOBAL_RATE_PER_S: u32 = 2_000;
/// New registrations per second from one source IP (burst: twice this); issue 12: a flood of
/// `Hello`s from new ports would otherwise fill the replicated node table.
pub const REGISTER_RATE_PER_IP_PER_S: u32 = 50;
/// New registrations per second the server takes in all (burst: twice this).
pub const REGISTER_RATE_PER_S: u32 = 500;
/// Most expired agents removed from the node table per turn.
pub const REMOVALS_PER_TURN_MAX: usize = 64;
/// Most forgotten agents waiting for their removal from the node table.
pub const REMOVALS_PENDING_MAX: usize = 65_536;
/// Most agent names whose last registered `Hello` is remembered (replay protection).
pub const HELLO_NAMES_MAX: usize = 1 << 16;
/// Most consensus calls queued for the driver (registrations, creates, membership changes)
/// before new ones are answered `NotReady`.
pub const CONTROL_QUEUE_MAX: usize = 1_024;
/// Most raises proposed per turn.
pub const RAISES_PER_TURN_MAX: usize = 256;
/// The driver's tick: how often [`Server::on_tick`] is called, in milliseconds.
pub const TICK_MS: u64 = 50;
/// What `NotReady` tells an agent to wait, in milliseconds.
pub const NOT_READY_RETRY_MS: u32 = 10;
/// How long a leader's check that a quorum still follows it may take, in milliseconds.
pub const QUORUM_CHECK_TIMEOUT_MS: u64 = 200;
/// A leader no quorum confirmed for this long (a partition cut it off, its followers are
/// down) answers `NotLeader` naming no leader instead of `NotReady`, so that agents try the
/// other servers, and takes no new registrations, in milliseconds.
pub const QUORUM_LOST_MS: u64 = 300;
/// How often the server list is rebuilt from the node table, in microseconds.
const SERVER_REFRESH_US: u64 = 1_000_000;

/// What the machine needs to know of its server.
#[derive(Clone, Debug)]
pub struct Config {
    /// This server's node id.
    pub id: NodeId,
    /// The cluster key (MAC on every datagram), if any.
    pub key: Option<AuthKey>,
    /// An agent silent this long is forgotten, in milliseconds.
    pub lease_ms: u32,
    /// Most registered agents held.
    pub agents_max: usize,
    /// Cached replies per agent (for retransmits).
    pub replies_per_agent_max: usize,
    /// Datagrams per second one source address may send (burst: twice this).
    pub source_rate_per_s: u32,
    /// Allocator tuning.
    pub allocator: AllocatorConfig,
    /// This server's UDP address as others reach it.
    pub udp_addr: SocketAddr,
    /// The configured peers: id and UDP address.
    pub peers: Vec<(NodeId, SocketAddr)>,
    /// The first seq this server stamps on a datagram. The engine passes the wall clock in
    /// µs, so that a restarted server's seqs stay above its earlier ones and a receiver can
    /// tell a replayed datagram of an earlier run.
    pub first_seq: SeqNo,
}

/// Who leads, as consensus sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leadership {
    /// The leader's id, if known.
    pub leader: Option<NodeId>,
    /// The current term.
    pub term: u64,
    /// Whether this node is in the cluster's membership (voter or learner).
    pub member: bool,
}

/// What the machine knows of its Raft node beyond the applied state (refreshed by the driver
/// every tick and after membership changes): for status pages and membership decisions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaftView {
    /// The node's term.
    pub term: u64,
    /// The node's own role.
    pub role: Option<RaftRole>,
    /// The voters.
    pub voters: BTreeSet<NodeId>,
    /// The learners.
    pub learners: BTreeSet<NodeId>,
    /// Every member's Raft address.
    pub members: BTreeMap<NodeId, String>,
    /// As leader: each follower's matched log index (`None`: nothing matched yet).
    pub replication: BTreeMap<NodeId, Option<u64>>,
    /// The index of the last log entry.
    pub last_log: Option<u64>,
}

/// A datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Where.
    pub to: SocketAddr,
    /// The encoded datagram.
    pub datagram: Vec<u8>,
}

/// Who asked for a consensus call, so that its result is answered to them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Asker {
    /// The source of the request.
    pub from: SocketAddr,
    /// The request's seq.
    pub reply_to: SeqNo,
    /// The largest answer it may get (amplification bound).
    pub cap: usize,
}

/// A consensus call the driver performs, then reports with the named `on_*` method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Read the state with a leadership confirmation (`ready_state`) for `term`; report with
    /// [`Server::on_ready`] or [`Server::on_ready_failed`].
    ReadReady {
        /// The term the read is for.
        term: u64,
    },
    /// Commit a ceiling raise through this node's Raft (never forwarded); report with
    /// [`Server::on_raise_done`].
    Raise {
        /// The term it was proposed in.
        term: u64,
        /// The raise.
        raise: Raise,
    },
    /// Register an agent (`RegisterAgent`); report with [`Server::on_registered`].
    Register {
        /// Who asked.
        asker: Asker,
        /// The agent's incarnation.
        incarnation: u64,
        /// Its name.
        name: String,
        /// Its role.
        role: NodeRole,
    },
    /// Create a sequence; report with [`Server::on_sequence_created`].
    CreateSequence {
        /// Who asked.
        asker: Asker,
        /// The name.
        name: String,
        /// The width.
        width: Width,
        /// The first id.
        start: Id,
    },
    /// Add a server (learner, then voter) and record its UDP address; report with
    /// [`Server::on_membership_done`].
    AddServer {
        /// Who asked.
        asker: Asker,
        /// The server's id.
        id: NodeId,
        /// Its Raft address.
        raft: SocketAddr,
        /// Its UDP address.
        listen: SocketAddr,
    },
    /// Remove a voter; report with [`Server::on_membership_done`].
    RemoveServer {
        /// Who asked.
        asker: Asker,
        /// The server's id.
        id: NodeId,
    },
    /// Remove forgotten agents from the node table, in order, stopping at the first failure;
    /// report with [`Server::on_nodes_removed`].
    RemoveNodes {
        /// The agents.
        ids: Vec<NodeId>,
    },
    /// Confirm with a quorum (within [`QUORUM_CHECK_TIMEOUT_MS`]) that this node still leads;
    /// report with [`Server::on_quorum_checked`].
    ConfirmLeadership {
        /// The term checked.
        term: u64,
    },
    /// Record these servers' UDP addresses in the node table (`UpsertServer`, errors
    /// ignored); report with [`Server::on_servers_recorded`].
    RecordServers {
        /// Id and UDP address.
        servers: Vec<(NodeId, SocketAddr)>,
    },
    /// Commit a random cluster id (the first committed one is kept); report with
    /// [`Server::on_cluster_id`].
    CreateClusterId,
}

/// The machine's phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not the leader (or not known to be).
    Follower,
    /// Elected in the current term; reading the ready ceilings.
    Warming,
    /// Leading with an allocator.
    Leading,
    /// Stopping or stopped: answers nothing new.
    Stopped,
}

/// Observes what the machine decides, for the simulator's invariant checker. Every method
/// does nothing by default; the engine runs with none.
pub trait Probe: Send + Sync {
    /// This server believes it leads `term`.
    fn leader(&self, _now_us: u64, _server: NodeId, _term: u64) {}
    /// This server, leading `term`, installed an allocator from these ceilings.
    fn ready(&self, _now_us: u64, _server: NodeId, _term: u64, _ceilings: &[(String, Id)]) {}
    /// This server, leading `term`, applied a committed raise.
    fn committed(&self, _now_us: u64, _server: NodeId, _term: u64, _sequence: &str, _ceiling: Id) {}
    /// This server, leading `term`, granted `first .. first + count`.
    fn granted(
        &self,
        _now_us: u64,
        _server: NodeId,
        _term: u64,
        _sequence: &str,
        _first: Id,
        _count: u64,
    ) {
    }
}

/// The server state machine (see the module docs).
pub struct Server {
    config: Config,
    stats: Arc<ServerStats>,
    counters: Arc<Counters>,
    probe: Option<Arc<dyn Probe>>,
    codec: Codec,
    seq: SeqNo,
    /// The cluster id (the replicated setting `cluster_id`; 0 until this server knows it),
    /// stamped on every datagram sent; a datagram carrying another non-zero id is dropped.
    cluster: u64,
    phase: Phase,
    term: u64,
    leader: Option<NodeId>,
    /// This server has been a member of the cluster (so losing membership means removal).
    was_member: bool,
    allocator: Option<LeaderAllocator>,
    agents: HashMap<NodeId, Agent>,
    /// Hellos answered: (source, incarnation) → node id, for retransmitted Hellos.
    hellos: HashMap<(SocketAddr, u64), NodeId>,
    /// Hellos being registered through consensus.
    hellos_pending: HashSet<(SocketAddr, u64)>,
    /// Replay protection (issue 12): the newest `(incarnation, seq)` of a `Hello` registered
    /// under each agent name (at most [`HELLO_NAMES_MAX`]; seeded from the node table with
    /// seq 0 when this server starts leading). A `Hello` not above it is a replay.
    hello_seen: HashMap<String, (u64, SeqNo)>,
    /// Replay protection: the seqs of each registered agent's `BlockRequest`s that got a
    /// lasting answer (see [`ReplayWindow`]); dropped with the agent's lease.
    windows: HashMap<NodeId, ReplayWindow>,
    replies: ReplyCache<Vec<u8>>,
    sources: HashMap<SocketAddr, Bucket>,
    admin_sources: HashMap<SocketAddr, Bucket>,
    admin_global: Bucket,
    /// New-registration buckets by source IP, and for the whole server.
    register_sources: HashMap<std::net::IpAddr, Bucket>,
    register_global: Bucket,
    /// Agents forgotten here still to be removed from the replicated node table.
    to_remove: Vec<NodeId>,
    /// A [`Action::RemoveNodes`] is running.
    removing: bool,
    /// When the last "node table full" error was logged (every 10 s at most).
    full_logged_us: u64,
    /// Every server: id → UDP address.
    servers: BTreeMap<NodeId, SocketAddr>,
    /// When the server list is next rebuilt.
    servers_refresh_us: u64,
    /// Blocks and ids granted by this server, by sequence (for the metrics).
    granted: HashMap<String, (u64, Id)>,
    /// `now_us` when a quorum last confirmed this server's leadership (or it became leader).
    quorum_ok_us: u64,
    /// A leadership check runs; whether the quorum was lost when it started.
    quorum_checking: Option<bool>,
    /// A membership change an operator asked for runs (one at a time).
    membership_busy: bool,
    /// Ready reads that failed in the current warm-up.
    ready_tries: u32,
    raft: RaftView,
    actions: VecDeque<Action>,
    transmits: VecDeque<Transmit>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("id", &self.config.id)
            .field("phase", &self.phase)
            .field("term", &self.term)
            .field("leader", &self.leader)
            .finish()
    }
}

impl Server {
    /// A server that follows nobody yet, at `now_us`.
    pub fn new(config: Config, now_us: u64) -> Result<Server, unid_core::Error> {
        let replies = ReplyCache::new(ReplyCacheConfig {
            agents_max: config.agents_max,
            replies_per_agent_max: config.replies_per_agent_max,
            lease_ms: u64::from(config.lease_ms),
        })?;
        let mut servers = BTreeMap::new();
        servers.insert(config.id, config.udp_addr);
        for &(id, addr) in &config.peers {
            servers.insert(id, addr);
        }
        Ok(Server {
            seq: config.first_seq.max(1),
            stats: Arc::default(),
            counters: Arc::default(),
            probe: None,
            codec: Codec::new(),
            cluster: 0,
            phase: Phase::Follower,
            term: 0,
            leader: None,
            was_member: false,
            allocator: None,
            agents: HashMap::new(),
            hellos: HashMap::new(),
            hellos_pending: HashSet::new(),
            hello_seen: HashMap::new(),
            windows: HashMap::new(),
            replies,
            sources: HashMap::new(),
            admin_sources: HashMap::new(),
            admin_global: Bucket::full(f64::from(ADMIN_GLOBAL_RATE_PER_S), now_us),
            register_sources: HashMap::new(),
            register_global: Bucket::full(2.0 * f64::from(REGISTER_RATE_PER_S), now_us),
            to_remove: Vec::new(),
            removing: false,
            full_logged_us: 0,
            servers,
            servers_refresh_us: 0,
            granted: HashMap::new(),
            quorum_ok_us: 0,
            quorum_checking: None,
            membership_busy: false,
            ready_tries: 0,
            raft: RaftView::default(),
            actions: VecDeque::new(),
            transmits: VecDeque::new(),
            config,
        })
    }

    /// Sets this server's UDP address as others reach it (once the sockets are bound).
    pub fn set_udp_addr(&mut self, addr: SocketAddr) {
        self.servers.remove(&self.config.id);
        self.config.udp_addr = addr;
        self.servers.insert(self.config.id, addr);
    }

    /// Observe the machine's decisions with `probe` (the simulator's checker).
    pub fn set_probe(&mut self, probe: Arc<dyn Probe>) {
        self.probe = Some(probe);
    }

    /// This server's id.
    pub fn id(&self) -> NodeId {
        self.config.id
    }

    /// The counters, shared: readable without the machine's lock.
    pub fn stats(&self) -> &Arc<ServerStats> {
        &self.stats
    }

    /// The other counters, shared: readable without the machine's lock.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// The phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether this server leads with an allocator: it grants.
    pub fn is_granting(&self) -> bool {
        self.phase == Phase::Leading && self.allocator.is_some()
    }

    /// Whether this server leads with a ceiling raise outstanding (proposed to consensus,
    /// no result yet). The simulator crashes servers at such moments.
    pub fn raise_outstanding(&self) -> bool {
        self.phase == Phase::Leading
            && self
                .allocator
                .as_ref()
                .is_some_and(LeaderAllocator::raise_outstanding)
    }

    /// The cluster id this server stamps (0: not known yet).
    pub fn cluster(&self) -> u64 {
        self.cluster
    }

    /// The next consensus call to perform.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Whether consensus calls wait in [`Server::poll_action`].
    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    /// The next datagram to send that answers no datagram just handled.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Updates what the machine knows of its Raft node.
    pub fn set_raft_view(&mut self, view: RaftView) {
        self.raft = view;
    }

    fn next_seq(&mut self) -> SeqNo {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(1);
        s
    }

    /// Encodes a message answering `reply_to` (0: none) in the current term.
    fn encode(&mut self, reply_to: SeqNo, msg: &Message<'_>) -> Result<Vec<u8>, EncodeError> {
        if let Message::Error { code, .. } = msg {
            self.counters.error_sent(*code);
        }
        let mut buf = [0u8; DATAGRAM_BYTES_MAX];
        let header = Header {
            sender: self.config.id,
            seq: self.next_seq(),
            reply_to,
            epoch: self.term,
        };
        self.codec.set_cluster(self.cluster);
        let n = self
            .codec
            .encode(&header, msg, self.config.key.as_ref(), &mut buf)?;
        Ok(buf[..n].to_vec())
    }

    /// An `Error` answer.
    fn error(
        &mut self,
        reply_to: SeqNo,
        code: ErrorCode,
        sequence: Option<&str>,
        retry_after_ms: u32,
    ) -> Option<Vec<u8>> {
        self.error_text(reply_to, code, sequence, retry_after_ms, "")
            .ok()
    }

    /// An `Error` answer with a text (cut to 100 bytes at a character boundary).
    fn error_text(
        &mut self,
        reply_to: SeqNo,
        code: ErrorCode,
        sequence: Option<&str>,
        retry_after_ms: u32,
        text: &str,
    ) -> Result<Vec<u8>, EncodeError> {
        let mut n = text.len().min(100);
        while !text.is_char_boundary(n) {
            n -= 1;
        }
        self.encode(
            reply_to,
            &Message::Error {
                code,
                sequence,
                retry_after_ms,
                text: &text[..n],
            },
        )
    }

    /// `d` if it is at most `cap` bytes; otherwise nothing, counted.
    fn capped(&self, d: Vec<u8>, cap: usize) -> Option<Vec<u8>> {
        if d.len() <= cap {
            Some(d)
        } else {
            bump(&self.stats.dropped_amplification);
            None
        }
    }

    fn server_list(&self) -> Vec<ServerEntry> {
        self.servers
            .iter()
            .map(|(&id, &addr)| ServerEntry { id, addr })
            .collect()
    }

    fn leader_addr(&self) -> Option<(NodeId, SocketAddr)> {
        let id = self.leader?;
        self.servers.get(&id).map(|a| (id, *a))
    }

    /// Encodes a message with a server list, dropping servers from the end until it is at
    /// most `cap` bytes (and at most [`SERVERS_MAX`] servers). `None` if even an empty list
    /// is too big.
    fn encode_with_servers(
        &mut self,
        reply_to: SeqNo,
        cap: usize,
        make: impl Fn(List<'_, ServerEntry>, bool) -> Message<'_>,
    ) -> Option<Vec<u8>> {
        let servers = self.server_list();
        let mut n = servers.len().min(SERVERS_MAX);
        loop {
            let truncated = n < servers.len();
            let msg = make(List::new(&servers[..n]), truncated);
            match self.encode(reply_to, &msg) {
                Ok(d) if d.len() <= cap => return Some(d),
                Ok(_) | Err(EncodeError::TooLarge { .. }) if n > 0 => n -= 1,
                _ => return None,
            }
        }
    }

    /// Queues a datagram for [`Server::poll_transmit`].
    fn send(&mut self, to: SocketAddr, datagram: Vec<u8>) {
        self.transmits.push_back(Transmit { to, datagram });
    }

    /// The regular turn, every [`TICK_MS`]: leases, removals, the quorum check, raises, and
    /// (every second) the server list and this server's own node-table entry.
    pub fn on_tick(&mut self, now_us: u64, state: &ClusterState) {
        if self.phase == Phase::Stopped {
            return;
        }
        self.expire(now_us);
        self.remove_expired();
        self.check_quorum(now_us);
        self.propose_raises(now_us);
        if now_us >= self.servers_refresh_us {
            self.servers_refresh_us = now_us + SERVER_REFRESH_US;
            self.refresh_servers(state);
            if self.own_entry_stale(state) {
                let me = (self.config.id, self.config.udp_addr);
                self.actions
                    .push_back(Action::RecordServers { servers: vec![me] });
            }
        }
    }

    /// Server list: the node table's servers, then the configured peers, then this server;
    /// servers removed from the membership are dropped. Also takes the cluster id.
    fn refresh_servers(&mut self, state: &ClusterState) {
        use unid_core::state::{NodeKind, SETTING_CLUSTER_ID};
        let mut servers: BTreeMap<NodeId, SocketAddr> = BTreeMap::new();
        self.cluster = state.setting(SETTING_CLUSTER_ID, 0);
        for r in state.nodes.values() {
            if r.kind == NodeKind::Server
                && let Ok(a) = r.addr.parse::<SocketAddr>()
            {
                servers.insert(r.id, a);
            }
        }
        for &(id, addr) in &self.config.peers {
            servers.insert(id, addr);
        }
        servers.insert(self.config.id, self.config.udp_addr);
        let voters = &self.raft.voters;
        if !voters.is_empty() {
            servers.retain(|id, _| voters.contains(id) || *id == self.config.id);
        }
        self.servers = servers;
    }

    /// Whether the node table lacks this server's UDP address while a leader is known (a
    /// server added at runtime is recorded with its Raft address).
    fn own_entry_stale(&self, state: &ClusterState) -> bool {
        let want = self.config.udp_addr.to_string();
        self.leader.is_some()
            && self.phase != Phase::Stopped
            && self.raft.voters.contains(&self.config.id)
            && state
                .nodes
                .get(&self.config.id)
                .is_none_or(|r| r.addr != want)
    }

    /// The result of an [`Action::RecordServers`]: rebuilds the server list.
    pub fn on_servers_recorded(&mut self, state: &ClusterState) {
        self.refresh_servers(state);
    }

    /// The result of an [`Action::CreateClusterId`] (committed or not: the state tells).
    pub fn on_cluster_id(&mut self, state: &ClusterState) {
        let cluster = state.setting(unid_core::state::SETTING_CLUSTER_ID, 0);
        if cluster != 0 && cluster != self.cluster {
            tracing::info!(cluster = format_args!("{cluster:016x}"), "cluster id set");
        }
        self.cluster = cluster;
    }
}

#[cfg(test)]
mod tests;
