//! The unid server process: UDP shards (glommio) in front of a Raft node (tokio).
//!
//! [`run`] starts a [`ConsensusNode`] on a tokio runtime of its own thread, bootstraps the
//! cluster if asked, starts the shards, and returns a [`ServerHandle`].
//!
//! # Who owns what
//! - The **shards** own the sockets and answer every datagram: decode, rate limit, leases,
//!   reply cache, grants. Grants never wait on consensus.
//! - The **control task** (tokio, on the consensus thread) owns the [`ConsensusNode`]: it
//!   follows [`ConsensusNode::leader_watch`], builds the allocator when this server becomes
//!   leader (from [`ConsensusNode::ready_ceilings`] only), commits ceiling raises, registers
//!   agents and creates sequences, and checks that Raft is still running.
//! - The request state they share (`Core`: allocator, agent leases, reply cache, rate
//!   buckets) sits behind one `std::sync::Mutex`. Every critical section is a pure in-memory
//!   computation of a few microseconds (a grant, a cache lookup, encoding one reply); none
//!   does I/O, awaits or sleeps, and the lock order is always `Core` first, then the
//!   consensus state's read lock. With one or two shards on two cores this is simpler than
//!   routing every grant through a channel, and measured contention is not the bottleneck
//!   (the kernel's UDP path is, see the crate docs). The shards send raises to the control
//!   task through the `Core` queue plus a [`tokio::sync::Notify`], and the control task sends
//!   datagrams back (Welcome, LeaderChange) through [`ShardSender`]s.
//!
//! # Safety of grants
//! A server grants only while it leads, from an allocator built from `ready_ceilings` read in
//! its current term, and applies only raises it committed itself: raises go through
//! `Raft::client_write` on this node, never forwarded to another leader, so a deposed leader
//! can never learn a ceiling some other leader committed. A leader change (seen on the
//! leader watch) drops the allocator before anything else; a raise that commits for an
//! allocator since replaced is ignored. See `unid-core`'s allocator docs for the rest.
//!
//! # Amplification and abuse
//! - A datagram that fails to decode or authenticate gets no answer at all; it is counted
//!   ([`ServerStats::dropped_malformed`]).
//! - Every source address has a token bucket ([`ServerConfig::source_rate_per_s`]); over it,
//!   a registered agent gets one `Error{RateLimited}` no larger than its request, anyone else
//!   nothing. The bucket table is bounded ([`SOURCES_MAX`]); when full of active sources, new
//!   ones are dropped.
//! - An answer to a sender that is not a registered agent is never larger than the request
//!   (`Welcome` and `NotLeader` drop servers from their list and set `truncated` until they
//!   fit; a `NotLeader` that still does not fit is cut to the leader's endpoint alone, which
//!   fits the shortest `Hello`). **Exception**: admin answers (`SequenceInfo`, `SequenceListReply`,
//!   `StatusReply`, `NodeTable`) must carry more than they were asked with; they are limited
//!   to [`ADMIN_RATE_PER_S`] per source and [`ADMIN_GLOBAL_RATE_PER_S`] in all, which bounds
//!   what a spoofed flood can reflect. With a cluster secret, nothing unauthenticated is
//!   answered at all.
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
//! `Membership` with the voters once the change committed, or `Error`. An add whose Raft
//! address accepts no TCP connection is refused (`BadRequest`) before the membership is
//! touched: a learner that never answers stalls later changes. One that accepts but never
//! catches up fails after 5 Raft write timeouts and stays a learner, which `RemoveServer` does
//! not remove (known gap).
//!
//! # Leases and bounds
//! Agents are soft state: an agent not heard from (any datagram) for `lease_ms` is forgotten
//! and must `Hello` again (it gets `NotRegistered`). At most [`ServerConfig::agents_max`]
//! agents; a `Hello` beyond that gets `Error{RateLimited}`. When a server becomes leader it
//! takes the agents of the replicated node table with a fresh lease, so agents keep their
//! ids across failover.
//!
//! # Fail-stop
//! If Raft stops (a storage write failed, or any fatal error), the server stops granting at
//! once, logs one error line, stops its shards and [`ServerHandle::wait`] returns
//! [`ServerError::ConsensusStopped`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use unid_consensus::{Command, ConsensusNode, NodeConfig, NodeKind, Response, Role, Timing};
use unid_core::{
    AllocatorConfig, CommittedCeiling, LeaderAllocator, Lookup, Raise, ReplyCache, ReplyCacheConfig,
};
use unid_proto::{
    AuthKey, Codec, DATAGRAM_BYTES_MAX, EncodeError, ErrorCode, Header, Health, Id, List, Message,
    NODE_TABLE_PAGE_MAX, Node, NodeId, NodeRole, RaftRole, ReplayWindow, SEQUENCE_LIST_MAX,
    SERVERS_MAX, STATUS_SEQUENCES_MAX, SeqNo, SequenceName, SequenceStatus, Server, ServerStatus,
    Width, decode,
};

use crate::now_us;
use crate::shard::{Handler, ShardConfig, ShardInfo, ShardSender, Shards, StopHandle};
use crate::udp::SendBatch;

/// The shortest cluster secret a server accepts, in bytes.
pub const SECRET_BYTES_MIN: usize = 16;
/// Default UDP (data plane) port.
pub const DEFAULT_UDP_PORT: u16 = 7400;
/// Default Raft (TCP) port.
pub const DEFAULT_RAFT_PORT: u16 = 7500;
/// Most source addresses with a rate bucket.
pub const SOURCES_MAX: usize = 16_384;
/// Admin answers per second one source may get.
pub const ADMIN_RATE_PER_S: u32 = 50;
/// Admin answers per second the server gives in all.
pub const ADMIN_GLOBAL_RATE_PER_S: u32 = 2_000;
/// New registrations (a `Hello` not seen before) per second one source IP may make (burst:
/// twice this). Retransmitted `Hello`s are not counted.
pub const REGISTER_RATE_PER_IP_PER_S: u32 = 50;
/// New registrations per second the server makes in all (burst: twice this): each is a Raft
/// write, and a flood of them must not starve the ceiling raises.
pub const REGISTER_RATE_PER_S: u32 = 500;
/// Most expired agents removed from the node table per control-loop turn (each a Raft write).
pub const REMOVALS_PER_TURN_MAX: usize = 64;
/// Most expired agents waiting for removal from the node table.
pub const REMOVALS_PENDING_MAX: usize = 65_536;
/// Most agent names whose newest registered `Hello` is remembered for replay protection;
/// beyond it the memory starts again (a replay of each name's newest `Hello` could then
/// register once more).
pub const HELLO_NAMES_MAX: usize = 1 << 16;
/// Most control requests (registrations, creates) queued for the consensus thread.
pub const CONTROL_QUEUE_MAX: usize = 1_024;
/// Most raises proposed per control-loop turn.
pub const RAISES_PER_TURN_MAX: usize = 256;
/// How often the control task checks Raft, expires leases and refreshes the server list.
pub const TICK_MS: u64 = 50;
/// `retry_after_ms` of a `NotReady` answer.
pub const NOT_READY_RETRY_MS: u32 = 10;
/// How long a leader's check that a quorum still follows it may take.
pub const QUORUM_CHECK_TIMEOUT_MS: u64 = 200;
/// A leader whose leadership no quorum confirmed for this long answers what it cannot serve
/// (`NotReady`: warming up, or out of committed ceiling) with a `NotLeader` naming no leader,
/// so that agents ask the other servers instead of retrying it (a leader cut off from its
/// peers but not from its agents would otherwise hold them for the whole partition).
pub const QUORUM_LOST_MS: u64 = 300;

/// Errors of the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is invalid; the message names the field.
    #[error("invalid server configuration: {0}")]
    Config(String),
    /// Starting or running Raft failed.
    #[error("consensus: {0}")]
    Consensus(#[from] unid_consensus::Error),
    /// Starting the UDP shards failed.
    #[error("engine: {0}")]
    Engine(#[from] crate::Error),
    /// Raft stopped while the server ran (e.g. a storage write failed): the server stopped
    /// granting and exited (fail-stop).
    #[error("consensus stopped while serving (storage failure?); the server stopped")]
    ConsensusStopped,
    /// A thread could not be started or died.
    #[error("thread: {0}")]
    Thread(String),
    /// Another process (another server) holds the data directory's lock: two servers on one
    /// Raft database would each believe they are the same node.
    #[error(
        "data dir {dir} is in use by another unid server ({holder}); stop it or pick another --data-dir"
    )]
    DataDirInUse {
        /// The data directory.
        dir: PathBuf,
        /// What the lock file says about its holder (its pid), or that it is unknown.
        holder: String,
    },
    /// The data directory or its lock file could not be created or locked.
    #[error("data dir {dir}: {source}")]
    DataDir {
        /// The data directory.
        dir: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

/// The lock file in a server's data directory, held (`flock`) while the server runs.
pub const DATA_DIR_LOCK_FILE: &str = "LOCK";

/// Locks `dir` for this process: creates it and its [`DATA_DIR_LOCK_FILE`], takes an exclusive
/// `flock` (released when the returned file is closed, also when the process dies) and writes this
/// process's id into it. A directory locked by another process is [`ServerError::DataDirInUse`].
pub fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, ServerError> {
    use std::io::{Read as _, Seek as _, Write as _};
    let io = |source| ServerError::DataDir {
        dir: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(DATA_DIR_LOCK_FILE))
        .map_err(io)?;
    // `File::try_lock` is newer than this workspace's MSRV (1.85): flock(2) directly.
    use std::os::fd::AsRawFd as _;
    // SAFETY: flock on a file descriptor this function owns (`file` lives across the call);
    // it touches no memory.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    let locked = if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    };
    match locked {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim() {
                "" => "holder unknown".to_owned(),
                pid => format!("pid {pid}"),
            };
            return Err(ServerError::DataDirInUse {
                dir: dir.to_owned(),
                holder,
            });
        }
        Err(e) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(file)
}

/// Checks that nothing holds the UDP address `addr` (port 0: nothing to check) by binding a
/// socket without `SO_REUSEPORT` and closing it, so that a server whose address is taken stops
/// before Raft starts. The shards bind it for good later ([`Shards::start`] refuses it too).
fn probe_udp(addr: SocketAddr) -> Result<(), ServerError> {
    if addr.port() == 0 {
        return Ok(());
    }
    match std::net::UdpSocket::bind(addr) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            Err(crate::Error::AddrInUse { addr }.into())
        }
        Err(source) => Err(crate::Error::Io {
            op: "bind",
            addr,
            source,
        }
        .into()),
    }
}

/// One other server of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its node id.
    pub id: NodeId,
    /// Its Raft address (`ip:port`).
    pub raft_addr: String,
    /// Its UDP data-plane address (told to agents in redirects).
    pub udp_addr: SocketAddr,
}

/// How to run one server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// This server's node id (`1 .. 2^32`).
    pub id: NodeId,
    /// UDP data-plane address (port 0: any; see [`ServerHandle::udp_addr`]).
    pub udp_addr: SocketAddr,
    /// Raft TCP address (port 0: any; see [`ServerHandle::raft_addr`]).
    pub raft_addr: SocketAddr,
    /// Where the Raft database lives.
    pub data_dir: PathBuf,
    /// The other servers. With `init`, they and this server are the first voters.
    pub peers: Vec<Peer>,
    /// Bootstrap the cluster (once; a no-op with a log line if it already was).
    pub init: bool,
    /// The cluster secret (MAC on every datagram and peer frame), if any.
    pub secret: Option<Vec<u8>>,
    /// UDP shards (glommio executors).
    pub shards: usize,
    /// Pin shards to CPUs.
    pub pin_cpus: bool,
    /// Raft timing.
    pub timing: Timing,
    /// Allocator tuning.
    pub allocator: AllocatorConfig,
    /// An agent silent this long is forgotten, in milliseconds.
    pub lease_ms: u32,
    /// Most registered agents held.
    pub agents_max: usize,
    /// Cached replies per agent (for retransmits).
    pub replies_per_agent_max: usize,
    /// Datagrams per second one source address may send (burst: twice this).
    pub source_rate_per_s: u32,
    /// Serve Prometheus metrics over HTTP here (`GET /metrics`; port 0: any; see
    /// [`ServerHandle::metrics_addr`]).
    pub metrics_addr: Option<SocketAddr>,
    /// Listen beyond loopback (UDP or Raft) without a cluster secret. Off by default: then
    /// anyone who reaches the ports could ask for blocks, register agents and, over Raft,
    /// join the cluster.
    pub insecure_without_secret: bool,
}

impl ServerConfig {
    /// Defaults for server `id` with its data in `data_dir`, on the default ports of
    /// 127.0.0.1 (listening beyond loopback needs a secret or
    /// [`Self::insecure_without_secret`]).
    pub fn new(id: NodeId, data_dir: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            id,
            udp_addr: SocketAddr::from(([127, 0, 0, 1], DEFAULT_UDP_PORT)),
            raft_addr: SocketAddr::from(([127, 0, 0, 1], DEFAULT_RAFT_PORT)),
            data_dir: data_dir.into(),
            peers: Vec::new(),
            init: false,
            secret: None,
            shards: 1,
            pin_cpus: false,
            timing: Timing::default(),
            allocator: AllocatorConfig::DEFAULT,
            lease_ms: 10_000,
            agents_max: 16_384,
            replies_per_agent_max: 64,
            source_rate_per_s: 20_000,
            metrics_addr: None,
            insecure_without_secret: false,
        }
    }

    fn validate(&self) -> Result<(), ServerError> {
        let bad = |m: &str| Err(ServerError::Config(m.to_owned()));
        if self.id == 0 || self.id >= 1 << 32 {
            return bad("id must be in 1 .. 2^32");
        }
        if self.lease_ms == 0 || self.lease_ms > 3_600_000 {
            return bad("lease_ms must be in 1 ..= 3600000");
        }
        if self.agents_max == 0 || self.agents_max > 1 << 20 {
            return bad("agents_max must be in 1 ..= 2^20");
        }
        if self.source_rate_per_s == 0 {
            return bad("source_rate_per_s must be at least 1");
        }
        if self.shards == 0 || self.shards > crate::shard::SHARDS_MAX {
            return Err(ServerError::Config(format!(
                "shards must be in 1 ..= {} (got {})",
                crate::shard::SHARDS_MAX,
                self.shards
            )));
        }
        if self
            .secret
            .as_ref()
            .is_some_and(|s| s.len() < SECRET_BYTES_MIN)
        {
            return Err(ServerError::Config(format!(
                "the secret must have at least {SECRET_BYTES_MIN} bytes"
            )));
        }
        let beyond_loopback = |a: SocketAddr| !a.ip().to_canonical().is_loopback();
        if self.secret.is_none()
            && !self.insecure_without_secret
            && (beyond_loopback(self.udp_addr) || beyond_loopback(self.raft_addr))
        {
            return Err(ServerError::Config(format!(
                "listening beyond loopback (UDP {}, Raft {}) needs a cluster secret \
                 (--secret-file), or --insecure-without-secret to accept anyone who reaches the ports",
                self.udp_addr, self.raft_addr
            )));
        }
        if self.peers.len() >= SERVERS_MAX * 4 {
            return bad("too many peers");
        }
        let mut ids = HashSet::new();
        ids.insert(self.id);
        for p in &self.peers {
            if !ids.insert(p.id) {
                return Err(ServerError::Config(format!("peer id {} given twice", p.id)));
            }
        }
        self.allocator
            .validate()
            .map_err(|e| ServerError::Config(format!("allocator: {e}")))?;
        Ok(())
    }
}

/// Counters, readable while the server runs ([`ServerHandle::stats`]).
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Datagrams handed to the server logic.
    pub datagrams_in: AtomicU64,
    /// Dropped: failed to decode or authenticate.
    pub dropped_malformed: AtomicU64,
    /// Dropped: over the source's rate.
    pub dropped_rate: AtomicU64,
    /// Dropped: the answer would have been larger than an unregistered sender's request.
    pub dropped_amplification: AtomicU64,
    /// Dropped: a message type a server does not take, or a request for nothing.
    pub dropped_unexpected: AtomicU64,
    /// Refused (`Unauthorized`): a change (sequence create, server add or remove) from a
    /// source that is neither loopback nor authenticated by the cluster secret.
    pub refused_admin: AtomicU64,
    /// Refused (`RateLimited`): a new registration over its source IP's or the server's
    /// registration rate ([`REGISTER_RATE_PER_IP_PER_S`], [`REGISTER_RATE_PER_S`]).
    pub refused_registration_rate: AtomicU64,
    /// Refused (`RateLimited`): a registration the replicated node table had no room for.
    pub refused_registration_full: AtomicU64,
    /// Agents whose lease ended removed from the replicated node table (through Raft).
    pub agents_removed: AtomicU64,
    /// Replays refused: a `BlockRequest` whose seq was already handled (and is no longer
    /// cached) or is older than the agent's replay window (answered `Error{Replayed}`), or
    /// a `Hello` not newer than the last one registered under its name (answered
    /// `Error{BadRequest}`); see [`ReplayWindow`].
    pub dropped_replay: AtomicU64,
    /// Dropped: carrying another cluster's id.
    pub dropped_cluster: AtomicU64,
    /// Blocks granted.
    pub grants: AtomicU64,
    /// Retransmits answered from the reply cache.
    pub replies_cached: AtomicU64,
    /// `NotLeader` answers.
    pub not_leader: AtomicU64,
    /// Agents registered by this server.
    pub registrations: AtomicU64,
    /// Ceiling raises committed by this server.
    pub raises_committed: AtomicU64,
    /// Ceiling raises that failed.
    pub raises_failed: AtomicU64,
}

/// A snapshot of [`ServerStats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerStatsSnapshot {
    /// See [`ServerStats::datagrams_in`].
    pub datagrams_in: u64,
    /// See [`ServerStats::dropped_malformed`].
    pub dropped_malformed: u64,
    /// See [`ServerStats::dropped_rate`].
    pub dropped_rate: u64,
    /// See [`ServerStats::dropped_amplification`].
    pub dropped_amplification: u64,
    /// See [`ServerStats::dropped_unexpected`].
    pub dropped_unexpected: u64,
    /// See [`ServerStats::refused_admin`].
    pub refused_admin: u64,
    /// See [`ServerStats::refused_registration_rate`].
    pub refused_registration_rate: u64,
    /// See [`ServerStats::refused_registration_full`].
    pub refused_registration_full: u64,
    /// See [`ServerStats::agents_removed`].
    pub agents_removed: u64,
    /// See [`ServerStats::dropped_replay`].
    pub dropped_replay: u64,
    /// See [`ServerStats::dropped_cluster`].
    pub dropped_cluster: u64,
    /// See [`ServerStats::grants`].
    pub grants: u64,
    /// See [`ServerStats::replies_cached`].
    pub replies_cached: u64,
    /// See [`ServerStats::not_leader`].
    pub not_leader: u64,
    /// See [`ServerStats::registrations`].
    pub registrations: u64,
    /// See [`ServerStats::raises_committed`].
    pub raises_committed: u64,
    /// See [`ServerStats::raises_failed`].
    pub raises_failed: u64,
}

impl ServerStats {
    /// The current values.
    pub fn snapshot(&self) -> ServerStatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServerStatsSnapshot {
            datagrams_in: g(&self.datagrams_in),
            dropped_malformed: g(&self.dropped_malformed),
            dropped_rate: g(&self.dropped_rate),
            dropped_amplification: g(&self.dropped_amplification),
            dropped_unexpected: g(&self.dropped_unexpected),
            refused_admin: g(&self.refused_admin),
            refused_registration_rate: g(&self.refused_registration_rate),
            refused_registration_full: g(&self.refused_registration_full),
            agents_removed: g(&self.agents_removed),
            dropped_replay: g(&self.dropped_replay),
            dropped_cluster: g(&self.dropped_cluster),
            grants: g(&self.grants),
            replies_cached: g(&self.replies_cached),
            not_leader: g(&self.not_leader),
            registrations: g(&self.registrations),
            raises_committed: g(&self.raises_committed),
            raises_failed: g(&self.raises_failed),
        }
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

// ------------------------------------------------------------------ shared state ---

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Not the leader (or not known to be).
    Follower,
    /// Elected in `Core::term`; reading the ready ceilings.
    Warming,
    /// Leading with an allocator.
    Leading,
    /// Stopping or stopped: answers nothing new.
    Stopped,
}

struct Agent {
    addr: SocketAddr,
    last_seen_us: u64,
}

struct Bucket {
    tokens: f64,
    at_us: u64,
}

impl Bucket {
    fn take(&mut self, now_us: u64, rate_per_s: f64, burst: f64) -> bool {
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
}

/// The request state the shards and the control task share (see the module docs).
struct Core {
    phase: Phase,
    term: u64,
    leader: Option<NodeId>,
    allocator: Option<LeaderAllocator>,
    /// Raises the shards asked for, for the control task to commit.
    pending_raises: Vec<Raise>,
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
    /// Agents forgotten here (lease ended, or unreachable) still to be removed from the
    /// replicated node table; removed by the leader, [`REMOVALS_PER_TURN_MAX`] per turn.
    to_remove: Vec<NodeId>,
    /// When the last "node table full" error was logged (they are logged every 10 s at most).
    full_logged_us: u64,
    /// Every server: id → UDP address.
    servers: BTreeMap<NodeId, SocketAddr>,
    /// Blocks and ids granted by this server, by sequence (for the metrics; only sequences
    /// the allocator knows, so bounded by the sequences that exist).
    granted: HashMap<String, (u64, Id)>,
}

impl Core {
    fn leader_addr(&self) -> Option<(NodeId, SocketAddr)> {
        let id = self.leader?;
        self.servers.get(&id).map(|a| (id, *a))
    }

    fn server_list(&self) -> Vec<Server> {
        self.servers
            .iter()
            .map(|(&id, &addr)| Server { id, addr })
            .collect()
    }

    fn drop_allocator(&mut self, why: &str) {
        if self.allocator.take().is_some() {
            tracing::info!(term = self.term, "stopped granting: {why}");
        }
        self.pending_raises.clear();
    }

    /// The fast failure signal: a send to `dest` came back refused or unreachable, so an
    /// agent registered from that address is gone (its socket is closed, or its host or
    /// network is). Its lease ends now rather than after `lease_ms` of silence. Only soft
    /// state is dropped: an agent that is in fact alive gets `NotRegistered` on its next
    /// request and registers again, under a new node id. Returns the agents forgotten.
    fn forget_unreachable(&mut self, dest: SocketAddr) -> Vec<NodeId> {
        let gone: Vec<NodeId> = self
            .agents
            .iter()
            .filter(|(_, a)| a.addr == dest)
            .map(|(&id, _)| id)
            .collect();
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

    /// Whether a new registration from `ip` is within the per-IP and total rates.
    fn registration_allowed(&mut self, ip: std::net::IpAddr, now_us: u64) -> bool {
        let (rate, total) = (
            f64::from(REGISTER_RATE_PER_IP_PER_S),
            f64::from(REGISTER_RATE_PER_S),
        );
        let source_ok = if let Some(b) = self.register_sources.get_mut(&ip) {
            b.take(now_us, rate, 2.0 * rate)
        } else if self.register_sources.len() < SOURCES_MAX {
            self.register_sources.insert(
                ip,
                Bucket {
                    tokens: 2.0 * rate - 1.0,
                    at_us: now_us,
                },
            );
            true
        } else {
            false
        };
        source_ok && self.register_global.take(now_us, total, 2.0 * total)
    }

    fn expire(&mut self, now_us: u64, lease_us: u64) {
        let before = self.agents.len();
        let expired: Vec<NodeId> = self
            .agents
            .iter()
            .filter(|(_, a)| a.last_seen_us.saturating_add(lease_us) <= now_us)
            .map(|(&id, _)| id)
            .collect();
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
        self.sources
            .retain(|_, b| now_us.saturating_sub(b.at_us) < 10_000_000);
        self.admin_sources
            .retain(|_, b| now_us.saturating_sub(b.at_us) < 10_000_000);
        self.register_sources
            .retain(|_, b| now_us.saturating_sub(b.at_us) < 10_000_000);
    }
}

enum Control {
    Register {
        from: SocketAddr,
        reply_to: SeqNo,
        cap: usize,
        incarnation: u64,
        name: String,
        role: NodeRole,
    },
    Create {
        from: SocketAddr,
        reply_to: SeqNo,
        name: String,
        width: Width,
        start: Id,
    },
    Membership {
        from: SocketAddr,
        reply_to: SeqNo,
        op: MembershipOp,
    },
}

/// A membership change an operator asked for.
#[derive(Debug)]
enum MembershipOp {
    Add {
        id: NodeId,
        raft: SocketAddr,
        listen: SocketAddr,
    },
    Remove {
        id: NodeId,
    },
}

/// Whether something accepts TCP connections at `raft` within 3 s (checked before a server is
/// added, so that a typo or a server not started is refused up front; a server just started
/// gets the time to bind).
async fn raft_reachable(raft: SocketAddr) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let attempt =
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(raft));
        if matches!(attempt.await, Ok(Ok(_))) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Messages the control task sends to a shard.
#[derive(Debug)]
pub enum ShardMessage {
    /// Send this datagram.
    Send {
        /// Where.
        to: SocketAddr,
        /// The encoded datagram.
        datagram: Vec<u8>,
    },
}

struct Shared {
    id: NodeId,
    key: Option<AuthKey>,
    lease_ms: u32,
    agents_max: usize,
    source_rate_per_s: u32,
    allocator_config: AllocatorConfig,
    core: Mutex<Core>,
    raise_notify: Notify,
    control_tx: mpsc::Sender<Control>,
    seq: AtomicU64,
    /// The cluster id (the replicated setting `cluster_id`; 0 until this server knows it),
    /// stamped on every datagram sent; a datagram carrying another non-zero id is dropped.
    cluster: AtomicU64,
    stats: ServerStats,
    counters: crate::metrics::ServerCounters,
    consensus_stopped: AtomicBool,
    /// `now_us` when a quorum last confirmed this server's leadership (or it became leader).
    quorum_ok_us: AtomicU64,
    /// A leadership check is running.
    quorum_checking: AtomicBool,
}

impl Shared {
    /// Whether no quorum confirmed this leader's leadership for [`QUORUM_LOST_MS`].
    fn quorum_lost(&self, now_us: u64) -> bool {
        now_us.saturating_sub(self.quorum_ok_us.load(Ordering::Acquire)) > QUORUM_LOST_MS * 1000
    }

    fn core(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock is a bug that already stopped a shard; keep serving
        // the state as it is rather than cascading.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_seq(&self) -> SeqNo {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Encodes a reply to `reply_to` into a new buffer.
    fn encode(
        &self,
        codec: &mut Codec,
        term: u64,
        reply_to: SeqNo,
        msg: &Message<'_>,
    ) -> Result<Vec<u8>, EncodeError> {
        if let Message::Error { code, .. } = msg {
            self.counters.error_sent(*code);
        }
        let mut buf = [0u8; DATAGRAM_BYTES_MAX];
        let header = Header {
            sender: self.id,
            seq: self.next_seq(),
            reply_to,
            epoch: term,
        };
        codec.set_cluster(self.cluster.load(Ordering::Relaxed));
        let n = codec.encode(&header, msg, self.key.as_ref(), &mut buf)?;
        Ok(buf[..n].to_vec())
    }
}

/// Encodes a message with a server list, dropping servers from the end until it is at most
/// `cap` bytes (and at most [`SERVERS_MAX`] servers). `None` if even an empty list is too big.
fn encode_with_servers(
    shared: &Shared,
    codec: &mut Codec,
    term: u64,
    reply_to: SeqNo,
    servers: &[Server],
    cap: usize,
    make: impl Fn(List<'_, Server>, bool) -> Message<'_>,
) -> Option<Vec<u8>> {
    let mut n = servers.len().min(SERVERS_MAX);
    loop {
        let truncated = n < servers.len();
        let msg = make(List::new(&servers[..n]), truncated);
        match shared.encode(codec, term, reply_to, &msg) {
            Ok(d) if d.len() <= cap => return Some(d),
            Ok(_) | Err(EncodeError::TooLarge { .. }) if n > 0 => n -= 1,
            _ => return None,
        }
    }
}

// ----------------------------------------------------------------------- shards ---

struct ServerHandler {
    shared: Arc<Shared>,
    consensus: Arc<ConsensusNode>,
    codec: Codec,
}

impl ServerHandler {
    fn push(&self, out: &mut SendBatch, to: SocketAddr, datagram: &[u8]) {
        if out.push(to, datagram).is_err() {
            // Cannot happen: the shard leaves room for one answer per call.
            bump(&self.shared.stats.dropped_unexpected);
        } else {
            bump(&self.shared.counters.datagrams_out);
        }
    }

    /// Whether `sender` is a registered agent here, or in the replicated node table.
    fn registered(&self, core: &Core, sender: NodeId) -> bool {
        sender != 0
            && (core.agents.contains_key(&sender)
                || self
                    .consensus
                    .with_state(|s| s.state.nodes.contains_key(&sender)))
    }

    fn not_leader(&mut self, core: &Core, reply_to: SeqNo, cap: usize) -> Option<Vec<u8>> {
        self.redirect(core, core.leader_addr(), reply_to, cap)
    }

    /// What this server answers what it cannot serve: `NotReady`, or, when no quorum
    /// confirmed its leadership lately, a `NotLeader` naming no leader (see
    /// [`QUORUM_LOST_MS`]).
    fn not_ready_or_away(
        &mut self,
        core: &Core,
        reply_to: SeqNo,
        sequence: Option<&str>,
        cap: usize,
        now_us: u64,
    ) -> Option<Vec<u8>> {
        if self.shared.quorum_lost(now_us) {
            return self.redirect(core, None, reply_to, cap);
        }
        let d = self.error(
            core.term,
            reply_to,
            ErrorCode::NotReady,
            sequence,
            NOT_READY_RETRY_MS,
        )?;
        self.capped(d, cap)
    }

    /// `NotLeader` naming `leader` (or none) and the servers that fit in `cap`.
    fn redirect(
        &mut self,
        core: &Core,
        leader: Option<(NodeId, SocketAddr)>,
        reply_to: SeqNo,
        cap: usize,
    ) -> Option<Vec<u8>> {
        bump(&self.shared.stats.not_leader);
        let servers = core.server_list();
        encode_with_servers(
            &self.shared,
            &mut self.codec,
            core.term,
            reply_to,
            &servers,
            cap,
            |servers, truncated| Message::NotLeader {
                leader_id: leader.map_or(0, |l| l.0),
                leader: leader.map(|l| l.1),
                servers,
                truncated,
            },
        )
        .or_else(|| {
            // The smallest redirect: just the leader's endpoint (FlatBuffers leaves out
            // zero and false fields), so that it fits even the shortest Hello.
            let msg = Message::NotLeader {
                leader_id: 0,
                leader: Some(leader?.1),
                servers: List::empty(),
                truncated: false,
            };
            let d = self
                .shared
                .encode(&mut self.codec, core.term, reply_to, &msg)
                .ok()?;
            self.capped(d, cap)
        })
    }

    fn error(
        &mut self,
        term: u64,
        reply_to: SeqNo,
        code: ErrorCode,
        sequence: Option<&str>,
        retry_after_ms: u32,
    ) -> Option<Vec<u8>> {
        self.shared
            .encode(
                &mut self.codec,
                term,
                reply_to,
                &Message::Error {
                    code,
                    sequence,
                    retry_after_ms,
                    text: "",
                },
            )
            .ok()
    }

    fn handle(&mut self, data: &[u8], from: SocketAddr, now_us: u64) -> Option<Vec<u8>> {
        let shared = self.shared.clone();
        let stats = &shared.stats;
        bump(&stats.datagrams_in);
        let frame = match decode(data, shared.key.as_ref()) {
            Ok(f) => f,
            Err(e) => {
                bump(&stats.dropped_malformed);
                shared.counters.decode_failed(&e);
                tracing::debug!(%from, "dropped datagram: {e}");
                return None;
            }
        };
        let req = data.len();
        let h = frame.header;
        let ours = shared.cluster.load(Ordering::Relaxed);
        if frame.cluster != 0 && ours != 0 && frame.cluster != ours {
            // From a node of another cluster (two clusters on one address, an agent pointed
            // at the wrong one): never served (issue 12).
            let n = stats.dropped_cluster.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(%from, cluster = format_args!("{:016x}", frame.cluster), ours = format_args!("{ours:016x}"), dropped = n, "dropped a datagram of another cluster");
            }
            return None;
        }
        let mut core = shared.core();
        if core.phase == Phase::Stopped {
            return None;
        }
        let term = core.term;
        let rate = f64::from(shared.source_rate_per_s);
        let allowed = if let Some(b) = core.sources.get_mut(&from) {
            b.take(now_us, rate, rate * 2.0)
        } else if core.sources.len() < SOURCES_MAX {
            let mut b = Bucket {
                tokens: rate * 2.0,
                at_us: now_us,
            };
            let ok = b.take(now_us, rate, rate * 2.0);
            core.sources.insert(from, b);
            ok
        } else {
            false
        };
        if !allowed {
            bump(&stats.dropped_rate);
            if core.agents.contains_key(&h.sender) {
                let d = self.error(term, h.seq, ErrorCode::RateLimited, None, 100)?;
                return (d.len() <= req).then_some(d);
            }
            return None;
        }
        let leading = core.phase == Phase::Leading;
        match frame.message {
            Message::Ping { sent_us } => {
                let cap = if self.registered(&core, h.sender) {
                    DATAGRAM_BYTES_MAX
                } else {
                    req
                };
                let warming = core.phase == Phase::Warming;
                if !leading && !warming {
                    return self.not_leader(&core, h.seq, cap);
                }
                let lease_ms = match core.agents.get_mut(&h.sender) {
                    Some(a) => {
                        a.last_seen_us = now_us;
                        a.addr = from;
                        shared.lease_ms
                    }
                    // A new leader takes the node table's agents once ready: keep them.
                    None if warming && cap == DATAGRAM_BYTES_MAX => shared.lease_ms,
                    None => 0,
                };
                let d = self
                    .shared
                    .encode(
                        &mut self.codec,
                        term,
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
                ..
            } => {
                if core.phase == Phase::Warming {
                    return self.not_ready_or_away(&core, h.seq, None, req, now_us);
                }
                if !leading {
                    return self.not_leader(&core, h.seq, req);
                }
                let key = (from, incarnation);
                if let Some(&node_id) = core.hellos.get(&key) {
                    if let Some(a) = core.agents.get_mut(&node_id) {
                        a.last_seen_us = now_us;
                    }
                    let servers = core.server_list();
                    return encode_with_servers(
                        &shared,
                        &mut self.codec,
                        term,
                        h.seq,
                        &servers,
                        req,
                        |servers, truncated| Message::Welcome {
                            node_id,
                            lease_ms: shared.lease_ms,
                            servers,
                            truncated,
                        },
                    )
                    .or_else(|| {
                        bump(&stats.dropped_amplification);
                        None
                    });
                }
                if core.hellos_pending.contains(&key) {
                    return None; // Being registered; the answer follows.
                }
                // Not a retransmission from the agent's own socket (those were answered
                // above): a `Hello` must be newer than the last one registered under its name
                // (the agent takes a new incarnation, or at least a new seq, for each), or it
                // is a replay, from a new source port, of a captured one (issue 12).
                if core
                    .hello_seen
                    .get(name)
                    .is_some_and(|&seen| (incarnation, h.seq) <= seen)
                {
                    bump(&stats.dropped_replay);
                    tracing::debug!(%from, name, incarnation, seq = h.seq, "dropped a replayed Hello");
                    let d = self.error(term, h.seq, ErrorCode::BadRequest, None, 0)?;
                    return self.capped(d, req);
                }
                if shared.quorum_lost(now_us) {
                    // Registering needs a quorum: send the agent elsewhere.
                    return self.redirect(&core, None, h.seq, req);
                }
                if core.agents.len() + core.hellos_pending.len() >= shared.agents_max {
                    let d = self.error(term, h.seq, ErrorCode::RateLimited, None, 1_000)?;
                    return self.capped(d, req);
                }
                if !core.registration_allowed(from.ip(), now_us) {
                    bump(&stats.refused_registration_rate);
                    let d = self.error(term, h.seq, ErrorCode::RateLimited, None, 200)?;
                    return self.capped(d, req);
                }
                let request = Control::Register {
                    from,
                    reply_to: h.seq,
                    cap: req,
                    incarnation,
                    name: name.to_owned(),
                    role,
                };
                match shared.control_tx.try_send(request) {
                    Ok(()) => {
                        core.hellos_pending.insert(key);
                        None
                    }
                    Err(_) => {
                        let d =
                            self.error(term, h.seq, ErrorCode::NotReady, None, NOT_READY_RETRY_MS)?;
                        self.capped(d, req)
                    }
                }
            }
            Message::BlockRequest { sequence, count } => {
                self.block_request(&mut core, from, h, sequence, count, req, now_us)
            }
            Message::SequenceCreate { name, width, start } => {
                if !self.admin_allowed(&mut core, from, now_us) {
                    return None;
                }
                if !self.change_allowed(from) {
                    let d = self.error(term, h.seq, ErrorCode::Unauthorized, None, 0)?;
                    return self.capped(d, req);
                }
                let request = Control::Create {
                    from,
                    reply_to: h.seq,
                    name: name.to_owned(),
                    width,
                    start,
                };
                if shared.control_tx.try_send(request).is_err() {
                    return self.error(term, h.seq, ErrorCode::NotReady, None, 100);
                }
                None
            }
            Message::SequenceDescribe { name } => {
                if !self.admin_allowed(&mut core, from, now_us) {
                    return None;
                }
                self.describe(&core, h.seq, name)
            }
            Message::SequenceList { after } => {
                if !self.admin_allowed(&mut core, from, now_us) {
                    return None;
                }
                self.list(term, h.seq, after)
            }
            Message::StatusRequest { sequences_after } => {
                if !self.admin_allowed(&mut core, from, now_us) {
                    return None;
                }
                self.status(&core, h.seq, sequences_after)
            }
            Message::NodeTableRequest { page } => {
                if !self.admin_allowed(&mut core, from, now_us) {
                    return None;
                }
                self.node_table(&core, h.seq, page)
            }
            Message::AddServer { .. } | Message::RemoveServer { .. } => {
                // decode() already refused unauthenticated datagrams when there is a key.
                if shared.key.is_some() && !frame.authenticated {
                    return None;
                }
                if !self.admin_allowed(&mut core, from, now_us) {
                    return None;
                }
                if !self.change_allowed(from) {
                    let d = self.error(term, h.seq, ErrorCode::Unauthorized, None, 0)?;
                    return self.capped(d, req);
                }
                if !leading {
                    return self.not_leader(&core, h.seq, req);
                }
                let op = match frame.message {
                    Message::AddServer { id, raft, listen } => {
                        MembershipOp::Add { id, raft, listen }
                    }
                    Message::RemoveServer { id } => MembershipOp::Remove { id },
                    _ => return None,
                };
                let request = Control::Membership {
                    from,
                    reply_to: h.seq,
                    op,
                };
                if shared.control_tx.try_send(request).is_err() {
                    return self.error(term, h.seq, ErrorCode::NotReady, None, 100);
                }
                None
            }
            _ => {
                bump(&stats.dropped_unexpected);
                None
            }
        }
    }

    fn capped(&self, d: Vec<u8>, cap: usize) -> Option<Vec<u8>> {
        if d.len() <= cap {
            Some(d)
        } else {
            bump(&self.shared.stats.dropped_amplification);
            None
        }
    }

    /// Whether `from` may change the cluster (create a sequence, add or remove a server):
    /// with a cluster secret every datagram that got here is authenticated; without one, only
    /// a loopback source may (the kernel drops loopback-sourced packets arriving from a
    /// network). Counts a refusal.
    fn change_allowed(&self, from: SocketAddr) -> bool {
        let ok = self.shared.key.is_some() || from.ip().to_canonical().is_loopback();
        if !ok {
            bump(&self.shared.stats.refused_admin);
        }
        ok
    }

    fn admin_allowed(&self, core: &mut Core, from: SocketAddr, now_us: u64) -> bool {
        let rate = f64::from(ADMIN_RATE_PER_S);
        let global = f64::from(ADMIN_GLOBAL_RATE_PER_S);
        let ok = core.admin_global.take(now_us, global, global)
            && if let Some(b) = core.admin_sources.get_mut(&from) {
                b.take(now_us, rate, rate)
            } else if core.admin_sources.len() < SOURCES_MAX {
                core.admin_sources.insert(
                    from,
                    Bucket {
                        tokens: rate - 1.0,
                        at_us: now_us,
                    },
                );
                true
            } else {
                false
            };
        if !ok {
            bump(&self.shared.stats.dropped_rate);
        }
        ok
    }

    #[allow(clippy::too_many_arguments)]
    fn block_request(
        &mut self,
        core: &mut Core,
        from: SocketAddr,
        h: Header,
        sequence: &str,
        count: u64,
        req: usize,
        now_us: u64,
    ) -> Option<Vec<u8>> {
        let shared = self.shared.clone();
        let term = core.term;
        let cap = if self.registered(core, h.sender) {
            DATAGRAM_BYTES_MAX
        } else {
            req
        };
        if core.phase != Phase::Leading && core.phase != Phase::Warming {
            return self.not_leader(core, h.seq, cap);
        }
        if core.phase == Phase::Warming {
            // Agents of earlier leaders are taken from the node table once ready.
            return self.not_ready_or_away(core, h.seq, None, cap, now_us);
        }
        let Some(agent) = core.agents.get_mut(&h.sender) else {
            let d = self.error(term, h.seq, ErrorCode::NotRegistered, None, 0)?;
            return self.capped(d, req);
        };
        agent.last_seen_us = now_us;
        agent.addr = from;
        match core.replies.lookup(now_us, h.sender, h.seq) {
            Lookup::Hit(d) => {
                bump(&shared.stats.replies_cached);
                return Some(d.clone());
            }
            Lookup::Invalid => return None,
            Lookup::Miss | Lookup::Forgotten => {}
        }
        // A seq that already got a lasting answer (no longer cached) or is older than the
        // window is a replay, or a retransmission whose answer was lost and then evicted:
        // answering it anew would grant a block per replay (issue 12). `Replayed` tells a
        // real agent to ask again under a new seq, and gives a replayer nothing.
        if core.windows.get(&h.sender).is_some_and(|w| !w.check(h.seq)) {
            bump(&shared.stats.dropped_replay);
            tracing::debug!(%from, sender = h.sender, seq = h.seq, "replayed BlockRequest: no block");
            let d = self.error(term, h.seq, ErrorCode::Replayed, Some(sequence), 0)?;
            return self.capped(d, req);
        }
        let not_ready = |this: &mut Self, core: &Core| {
            this.not_ready_or_away(core, h.seq, Some(sequence), cap, now_us)
        };
        let Ok(name) = SequenceName::new(sequence) else {
            return self.error(term, h.seq, ErrorCode::BadRequest, None, 0);
        };
        let Some(alloc) = core.allocator.as_mut() else {
            return not_ready(self, core);
        };
        let mut result = alloc.grant(now_us, &name, count);
        if result == Err(unid_core::Error::UnknownSequence) {
            // Created in this term after the allocator was built (see `add_sequence`): a
            // sequence applied after this leader's ready read can only come from this term.
            let found = self
                .consensus
                .with_state(|s| s.state.sequences.get(sequence).cloned());
            if let Some(s) = found {
                let c = CommittedCeiling {
                    sequence: name.clone(),
                    width: s.width(),
                    ceiling: s.ceiling,
                };
                if let Err(e) = alloc.add_sequence(now_us, c) {
                    tracing::warn!(sequence, "cannot add sequence to the allocator: {e}");
                }
                result = alloc.grant(now_us, &name, count);
            }
        }
        let width = alloc.sequence(&name).map(|v| v.width);
        if let Some(raise) = alloc.poll_raise_for(now_us, &name) {
            core.pending_raises.push(raise);
            shared.raise_notify.notify_one();
        }
        let (msg_result, cache) = match result {
            Ok(block) => {
                bump(&shared.stats.grants);
                match core.granted.get_mut(sequence) {
                    Some(g) => *g = (g.0 + 1, g.1.saturating_add(Id::from(block.count()))),
                    None => {
                        core.granted
                            .insert(sequence.to_owned(), (1, Id::from(block.count())));
                    }
                }
                let width = width.expect("granted from a known sequence");
                let d = shared.encode(
                    &mut self.codec,
                    term,
                    h.seq,
                    &Message::BlockGrant {
                        sequence,
                        width,
                        block,
                    },
                );
                (d, true)
            }
            Err(unid_core::Error::UnknownSequence) => (
                shared.encode(
                    &mut self.codec,
                    term,
                    h.seq,
                    &Message::Error {
                        code: ErrorCode::UnknownSequence,
                        sequence: Some(sequence),
                        retry_after_ms: 0,
                        text: "",
                    },
                ),
                true,
            ),
            Err(unid_core::Error::Exhausted) => (
                shared.encode(
                    &mut self.codec,
                    term,
                    h.seq,
                    &Message::Error {
                        code: ErrorCode::Exhausted,
                        sequence: Some(sequence),
                        retry_after_ms: 0,
                        text: "",
                    },
                ),
                true,
            ),
            Err(unid_core::Error::EmptyRequest) => {
                return self.error(term, h.seq, ErrorCode::BadRequest, Some(sequence), 0);
            }
            // NotReady, AwaitingRaise: transient, not cached (a retransmit tries again).
            Err(_) => return not_ready(self, core),
        };
        let d = msg_result.ok()?;
        if cache {
            core.replies.insert(now_us, h.sender, h.seq, d.clone());
            core.windows.entry(h.sender).or_default().mark(h.seq);
        }
        Some(d)
    }

    fn describe(&mut self, core: &Core, reply_to: SeqNo, name: &str) -> Option<Vec<u8>> {
        let term = core.term;
        let Some(s) = self
            .consensus
            .with_state(|st| st.state.sequences.get(name).cloned())
        else {
            return self.error(term, reply_to, ErrorCode::UnknownSequence, Some(name), 0);
        };
        let mut ceiling = s.ceiling;
        let mut next = s.ceiling;
        if let (Some(alloc), Ok(n)) = (core.allocator.as_ref(), SequenceName::new(name))
            && let Some(v) = alloc.sequence(&n)
        {
            ceiling = ceiling.max(v.committed_ceiling);
            next = v.next.min(ceiling);
        }
        let next = next.max(s.start);
        self.shared
            .encode(
                &mut self.codec,
                term,
                reply_to,
                &Message::SequenceInfo {
                    name,
                    width: s.width(),
                    start: s.start,
                    next,
                    ceiling: ceiling.max(next),
                },
            )
            .ok()
    }

    fn list(&mut self, term: u64, reply_to: SeqNo, after: Option<&str>) -> Option<Vec<u8>> {
        let (names, more) = self.consensus.with_state(|st| {
            let mut it = st
                .state
                .sequences
                .keys()
                .filter(|n| after.is_none_or(|a| n.as_str() > a));
            let names: Vec<String> = it.by_ref().take(SEQUENCE_LIST_MAX).cloned().collect();
            (names, it.next().is_some())
        });
        let mut n = names.len();
        loop {
            let refs: Vec<&str> = names[..n].iter().map(String::as_str).collect();
            let msg = Message::SequenceListReply {
                names: List::new(&refs),
                more: more || n < names.len(),
            };
            match self.shared.encode(&mut self.codec, term, reply_to, &msg) {
                Ok(d) => return Some(d),
                Err(EncodeError::TooLarge { .. }) if n > 1 => n -= 1,
                Err(_) => return None,
            }
        }
    }

    fn status(&mut self, core: &Core, reply_to: SeqNo, after: Option<&str>) -> Option<Vec<u8>> {
        let m = self.consensus.metrics();
        let leader_id = core.leader.unwrap_or(0);
        let (replication, last_log) = {
            let rm = self.consensus.raft().metrics();
            let rm = rm.borrow();
            let repl: BTreeMap<NodeId, Option<u64>> = rm
                .replication
                .as_ref()
                .map(|r| {
                    r.iter()
                        .map(|(id, l)| (*id, l.as_ref().map(|l| l.index)))
                        .collect()
                })
                .unwrap_or_default();
            (repl, rm.last_log_index)
        };
        let i_lead = leader_id == self.shared.id;
        let servers: Vec<ServerStatus> = core
            .servers
            .iter()
            .take(SERVERS_MAX)
            .map(|(&id, &addr)| {
                let role = if id == leader_id {
                    RaftRole::Leader
                } else if id == self.shared.id {
                    match m.role {
                        Role::Candidate => RaftRole::Candidate,
                        Role::Learner => RaftRole::Learner,
                        _ => RaftRole::Follower,
                    }
                } else if m.learners.contains(&id) {
                    RaftRole::Learner
                } else {
                    RaftRole::Follower
                };
                let health = if id == self.shared.id || id == leader_id {
                    Health::Healthy
                } else if i_lead {
                    match (replication.get(&id).copied().flatten(), last_log) {
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
                    term: m.term,
                    health,
                }
            })
            .collect();
        let seqs: Vec<(String, Width, Id, Id)> = self.consensus.with_state(|st| {
            st.state
                .sequences
                .iter()
                .filter(|(n, _)| after.is_none_or(|a| n.as_str() > a))
                .take(STATUS_SEQUENCES_MAX + 1)
                .map(|(n, s)| {
                    let width = s.width();
                    let mut next = s.ceiling;
                    if let (Some(alloc), Ok(name)) = (core.allocator.as_ref(), SequenceName::new(n))
                        && let Some(v) = alloc.sequence(&name)
                    {
                        next = v.next;
                    }
                    let ceiling = s.ceiling.max(next);
                    (
                        n.clone(),
                        width,
                        ceiling,
                        width.limit().saturating_sub(next),
                    )
                })
                .collect()
        });
        let mut n = seqs.len().min(STATUS_SEQUENCES_MAX);
        loop {
            let items: Vec<SequenceStatus<'_>> = seqs[..n]
                .iter()
                .map(|(name, width, ceiling, remaining)| SequenceStatus {
                    name,
                    width: *width,
                    ceiling: *ceiling,
                    remaining: *remaining,
                })
                .collect();
            let msg = Message::StatusReply {
                leader_id,
                term: m.term,
                servers: List::new(&servers),
                sequences: List::new(&items),
                more: n < seqs.len(),
            };
            match self
                .shared
                .encode(&mut self.codec, core.term, reply_to, &msg)
            {
                Ok(d) => return Some(d),
                Err(EncodeError::TooLarge { .. }) if n > 0 => n -= 1,
                Err(_) => return None,
            }
        }
    }

    fn node_table(&mut self, core: &Core, reply_to: SeqNo, page: u16) -> Option<Vec<u8>> {
        let mut nodes: Vec<Node> = core
            .servers
            .iter()
            .map(|(&id, &addr)| Node {
                id,
                addr,
                role: NodeRole::Server,
            })
            .collect();
        self.consensus.with_state(|st| {
            for r in st.state.nodes.values() {
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
        });
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
            return self.error(core.term, reply_to, ErrorCode::BadRequest, None, 0);
        }
        let from = usize::from(page) * NODE_TABLE_PAGE_MAX;
        let to = (from + NODE_TABLE_PAGE_MAX).min(nodes.len());
        self.shared
            .encode(
                &mut self.codec,
                core.term,
                reply_to,
                &Message::NodeTable {
                    version,
                    page,
                    page_count,
                    nodes: List::new(&nodes[from..to]),
                },
            )
            .ok()
    }
}

impl Handler for ServerHandler {
    type Message = ShardMessage;

    fn on_datagram(&mut self, data: &[u8], from: SocketAddr, now_us: u64, out: &mut SendBatch) {
        if let Some(reply) = self.handle(data, from, now_us) {
            self.push(out, from, &reply);
        }
    }

    fn on_message(&mut self, msg: ShardMessage, _now_us: u64, out: &mut SendBatch) {
        match msg {
            ShardMessage::Send { to, datagram } => self.push(out, to, &datagram),
        }
    }

    fn on_peer_error(&mut self, err: crate::udp::PeerError, _now_us: u64) {
        use crate::udp::PeerErrorKind as K;
        self.shared.counters.send_failed(err.kind);
        if matches!(
            err.kind,
            K::Refused | K::HostUnreachable | K::NetUnreachable
        ) {
            let gone = self.shared.core().forget_unreachable(err.dest);
            // One line per agent forgotten (a state change), none per failed datagram.
            for id in gone {
                tracing::info!(
                    node_id = id,
                    addr = %err.dest,
                    kind = ?err.kind,
                    "agent unreachable: its lease ends now"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------- handle ---

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopMode {
    Run,
    Graceful,
    Abrupt,
}

/// Stops a running server from any thread (e.g. a signal handler thread). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Stopper {
    tx: Arc<watch::Sender<StopMode>>,
}

impl Stopper {
    /// Graceful stop: as leader, tell agents and servers where to go (`LeaderChange`), then
    /// hand leadership off and stop. Returns at once; see [`ServerHandle::wait`].
    pub fn stop(&self) {
        self.tx.send_if_modified(|m| {
            let change = *m == StopMode::Run;
            if change {
                *m = StopMode::Graceful;
            }
            change
        });
    }

    /// Stop without notices or handoff (peers see a crash, but the database closes cleanly).
    pub fn stop_abruptly(&self) {
        self.tx.send_if_modified(|m| {
            let change = *m != StopMode::Abrupt;
            *m = StopMode::Abrupt;
            change
        });
    }
}

/// A running server.
pub struct ServerHandle {
    udp_addr: SocketAddr,
    raft_addr: SocketAddr,
    stopper: Stopper,
    shared: Arc<Shared>,
    /// Weak, so that the control task alone owns the node and can shut it down.
    consensus: std::sync::Weak<ConsensusNode>,
    thread: std::thread::JoinHandle<Result<(), ServerError>>,
    /// The `GET /metrics` endpoint, if configured; stops when the handle is dropped.
    metrics: Option<crate::metrics::MetricsServer>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("id", &self.shared.id)
            .field("udp_addr", &self.udp_addr)
            .field("raft_addr", &self.raft_addr)
            .finish()
    }
}

impl ServerHandle {
    /// The UDP address the shards are bound to.
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    /// The Raft address the consensus node is bound to.
    pub fn raft_addr(&self) -> SocketAddr {
        self.raft_addr
    }

    /// The address of the metrics endpoint, if [`ServerConfig::metrics_addr`] was set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|m| m.local_addr())
    }

    /// The metrics in the Prometheus text format, as `GET /metrics` serves them.
    pub fn metrics_text(&self) -> String {
        render_metrics(&self.shared, &self.consensus)
    }

    /// A [`Stopper`] for other threads.
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// The counters.
    pub fn stats(&self) -> ServerStatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Fault injection for tests: every later write to this server's Raft database fails, as
    /// with a failing disk (see [`ConsensusNode::set_storage_fault`]). The server then fails
    /// stop.
    #[doc(hidden)]
    pub fn inject_storage_fault(&self) {
        if let Some(c) = self.consensus.upgrade() {
            c.set_storage_fault(true);
        }
    }

    /// For tests: the Raft node, to drive what the server does not expose (membership
    /// changes). Drop it before stopping the server, which must own it alone to shut it down.
    #[doc(hidden)]
    pub fn consensus_for_tests(&self) -> Option<Arc<ConsensusNode>> {
        self.consensus.upgrade()
    }

    /// Whether this server currently grants (leads, with a ready allocator).
    pub fn is_granting(&self) -> bool {
        let core = self.shared.core();
        core.phase == Phase::Leading && core.allocator.is_some()
    }

    /// Waits until the server stopped (after a [`Stopper`] call, or by itself on a fatal
    /// error such as [`ServerError::ConsensusStopped`]).
    pub fn wait(self) -> Result<(), ServerError> {
        self.thread
            .join()
            .map_err(|_| ServerError::Thread("server thread panicked".into()))?
    }

    /// Graceful stop, then [`wait`](Self::wait).
    pub fn shutdown(self) -> Result<(), ServerError> {
        self.stopper.stop();
        self.wait()
    }
}

/// Starts a server. Returns once Raft and the shards run (and, with `init`, the cluster was
/// bootstrapped or found already bootstrapped).
pub fn run(config: ServerConfig) -> Result<ServerHandle, ServerError> {
    // Everything that can be refused is checked before Raft starts (issue 12 item 12): the
    // configuration, the data dir's lock, the UDP and metrics addresses.
    config.validate()?;
    let data_dir_lock = lock_data_dir(&config.data_dir)?;
    probe_udp(config.udp_addr)?;
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(crate::metrics::MetricsServer::bind(addr)?),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("unid-consensus")
        .enable_all()
        .build()
        .map_err(|e| ServerError::Thread(format!("tokio runtime: {e}")))?;
    let mut node_config = NodeConfig::new(config.id, &config.data_dir, config.raft_addr);
    node_config.secret = config.secret.clone();
    node_config.timing = config.timing;
    let consensus = Arc::new(runtime.block_on(ConsensusNode::start(node_config))?);
    let raft_addr = consensus.raft_addr();
    tracing::info!(id = config.id, %raft_addr, data_dir = %config.data_dir.display(), "raft started");

    let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE_MAX);
    let replies = ReplyCache::new(ReplyCacheConfig {
        agents_max: config.agents_max,
        replies_per_agent_max: config.replies_per_agent_max,
        lease_ms: u64::from(config.lease_ms),
    })
    .map_err(|e| ServerError::Config(format!("reply cache: {e}")))?;
    let shared = Arc::new(Shared {
        id: config.id,
        key: config.secret.as_deref().map(AuthKey::from_secret),
        lease_ms: config.lease_ms,
        agents_max: config.agents_max,
        source_rate_per_s: config.source_rate_per_s,
        allocator_config: config.allocator.clone(),
        core: Mutex::new(Core {
            phase: Phase::Follower,
            term: 0,
            leader: None,
            allocator: None,
            pending_raises: Vec::new(),
            agents: HashMap::new(),
            hellos: HashMap::new(),
            hellos_pending: HashSet::new(),
            hello_seen: HashMap::new(),
            windows: HashMap::new(),
            replies,
            sources: HashMap::new(),
            admin_sources: HashMap::new(),
            admin_global: Bucket {
                tokens: f64::from(ADMIN_GLOBAL_RATE_PER_S),
                at_us: now_us(),
            },
            register_sources: HashMap::new(),
            register_global: Bucket {
                tokens: 2.0 * f64::from(REGISTER_RATE_PER_S),
                at_us: now_us(),
            },
            to_remove: Vec::new(),
            full_logged_us: 0,
            servers: BTreeMap::new(),
            granted: HashMap::new(),
        }),
        raise_notify: Notify::new(),
        control_tx,
        // Wall-clock µs: a restarted server's seqs stay above its earlier ones, so that a
        // receiver can tell a replayed datagram of an earlier run (the agent's `LeaderChange`
        // check).
        seq: AtomicU64::new(wall_clock_us().max(1)),
        cluster: AtomicU64::new(0),
        stats: ServerStats::default(),
        counters: crate::metrics::ServerCounters::default(),
        consensus_stopped: AtomicBool::new(false),
        quorum_ok_us: AtomicU64::new(0),
        quorum_checking: AtomicBool::new(false),
    });

    let mut shard_config = ShardConfig::new(config.shards, config.udp_addr);
    shard_config.pin_cpus = config.pin_cpus;
    shard_config.name = format!("unid-shard-{}", config.id);
    let handler_shared = shared.clone();
    let handler_consensus = consensus.clone();
    let shards = Shards::start(shard_config, move |_info: &ShardInfo| ServerHandler {
        shared: handler_shared.clone(),
        consensus: handler_consensus.clone(),
        codec: Codec::new(),
    })?;
    let udp_addr = shards.local_addr();
    tracing::info!(id = config.id, %udp_addr, shards = shards.len(), "udp listening");

    {
        let mut core = shared.core();
        core.servers
            .insert(config.id, advertised(udp_addr, raft_addr));
        for p in &config.peers {
            core.servers.insert(p.id, p.udp_addr);
        }
    }

    if config.init {
        let mut members = BTreeMap::new();
        members.insert(config.id, advertised(raft_addr, raft_addr).to_string());
        for p in &config.peers {
            members.insert(p.id, p.raft_addr.clone());
        }
        match runtime.block_on(consensus.initialize_with(members)) {
            Ok(()) => tracing::info!(
                id = config.id,
                voters = config.peers.len() + 1,
                "cluster initialized"
            ),
            Err(unid_consensus::Error::AlreadyInitialized) => {
                tracing::info!(
                    id = config.id,
                    "--init: cluster already initialized, nothing to do"
                )
            }
            Err(e) => return Err(e.into()),
        }
    }

    let metrics = match metrics_listener {
        Some(listener) => {
            let (shared, weak) = (shared.clone(), Arc::downgrade(&consensus));
            let render: crate::metrics::Render = Arc::new(move || render_metrics(&shared, &weak));
            let m = crate::metrics::MetricsServer::start_on(listener, render)?;
            tracing::info!(id = config.id, addr = %m.local_addr(), "metrics on GET /metrics");
            Some(m)
        }
        None => None,
    };

    let (stop_tx, stop_rx) = watch::channel(StopMode::Run);
    let stopper = Stopper {
        tx: Arc::new(stop_tx),
    };
    let sender = shards.sender(0).expect("one shard at least");
    let weak = Arc::downgrade(&consensus);
    let control = Controller {
        shared: shared.clone(),
        consensus,
        sender,
        stop: shards.stop_handle(),
        peers: config.peers.clone(),
        udp_addr: advertised(udp_addr, raft_addr),
        write_timeout: Duration::from_millis(config.timing.write_timeout_ms),
        was_member: AtomicBool::new(false),
        membership_busy: tokio::sync::Mutex::new(()),
        removing: AtomicBool::new(false),
    };
    let thread = std::thread::Builder::new()
        .name(format!("unid-server-{}", config.id))
        .spawn(move || {
            let result = runtime.block_on(control.run(control_rx, stop_rx, shards));
            // Held until Raft and the shards are stopped.
            let _locked = &data_dir_lock;
            // Raise and registration tasks still running hold no lock; dropping the runtime
            // cancels them.
            runtime.shutdown_timeout(Duration::from_millis(500));
            result
        })
        .map_err(|e| ServerError::Thread(e.to_string()))?;
    Ok(ServerHandle {
        udp_addr,
        raft_addr,
        stopper,
        shared,
        consensus: weak,
        thread,
        metrics,
    })
}

/// Gathers the server's figures (counters are atomics; gauges are read under the `Core` lock,
/// then the consensus state's read lock, in that order) and formats them after the locks
/// are released. Holds the consensus node only while reading its state: the control task must
/// own it alone to stop it.
fn render_metrics(shared: &Shared, consensus: &std::sync::Weak<ConsensusNode>) -> String {
    use crate::metrics::{METRICS_SEQUENCES_MAX, SequenceGauges, ServerGauges};
    let stats = shared.stats.snapshot();
    let mut omitted = 0;
    let gauges = {
        let core = shared.core();
        let leads =
            core.leader == Some(shared.id) && matches!(core.phase, Phase::Leading | Phase::Warming);
        let mut g = ServerGauges {
            term: core.term,
            is_leader: leads,
            granting: core.phase == Phase::Leading && core.allocator.is_some(),
            agents: core.agents.len(),
            sequences: Vec::new(),
        };
        let consensus = if core.phase == Phase::Stopped {
            None
        } else {
            consensus.upgrade()
        };
        if let Some(consensus) = consensus {
            consensus.with_state(|st| {
                omitted = st
                    .state
                    .sequences
                    .len()
                    .saturating_sub(METRICS_SEQUENCES_MAX);
                for (n, s) in st.state.sequences.iter().take(METRICS_SEQUENCES_MAX) {
                    let width = s.width();
                    let (mut ceiling, mut next) = (s.ceiling, s.ceiling);
                    if let (Some(alloc), Ok(name)) = (core.allocator.as_ref(), SequenceName::new(n))
                        && let Some(v) = alloc.sequence(&name)
                    {
                        ceiling = ceiling.max(v.committed_ceiling);
                        next = v.next;
                    }
                    let (grants, ids) = core.granted.get(n).copied().unwrap_or((0, 0));
                    g.sequences.push(SequenceGauges {
                        name: n.clone(),
                        grants,
                        ids,
                        ceiling,
                        ids_left: width.limit().saturating_sub(next.max(s.start)),
                    });
                }
            });
        }
        g
    };
    crate::metrics::render_server(&stats, &shared.counters, &gauges, omitted)
}

/// The address to tell others: a wildcard bind address is replaced by the Raft address's IP
/// (or loopback).
/// A random non-zero cluster id: from the kernel's random source, or (should it be
/// unreadable) a hash of the time, the process id and an address of this process.
fn random_cluster_id() -> u64 {
    use std::io::Read as _;
    let mut b = [0u8; 8];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    let mut id = u64::from_le_bytes(b);
    if read.is_err() || id == 0 {
        let seed = format!("{} {} {:p}", wall_clock_us(), std::process::id(), &b);
        let tag = AuthKey::from_secret(b"unid cluster id").tag(seed.as_bytes());
        id = u64::from_le_bytes(tag[..8].try_into().expect("8 bytes")) | 1;
    }
    id
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
fn wall_clock_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn advertised(addr: SocketAddr, hint: SocketAddr) -> SocketAddr {
    if !addr.ip().is_unspecified() {
        return addr;
    }
    let ip = if hint.ip().is_unspecified() {
        IpAddr::from([127, 0, 0, 1])
    } else {
        hint.ip()
    };
    SocketAddr::new(ip, addr.port())
}

// --------------------------------------------------------------------- control ---

type Tasks = tokio::task::JoinSet<()>;

struct Controller {
    shared: Arc<Shared>,
    consensus: Arc<ConsensusNode>,
    sender: ShardSender<ShardMessage>,
    stop: StopHandle,
    peers: Vec<Peer>,
    udp_addr: SocketAddr,
    write_timeout: Duration,
    /// This server has been a member of the cluster (so losing membership means removal).
    was_member: AtomicBool,
    /// Held while a membership change an operator asked for runs (one at a time).
    membership_busy: tokio::sync::Mutex<()>,
    /// A task removing expired agents from the node table runs.
    removing: AtomicBool,
}

impl Controller {
    async fn run(
        self,
        mut requests: mpsc::Receiver<Control>,
        mut stop_rx: watch::Receiver<StopMode>,
        shards: Shards<ShardMessage>,
    ) -> Result<(), ServerError> {
        let this = Arc::new(self);
        let mut leader_rx = this.consensus.leader_watch();
        let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut server_refresh_us = 0u64;
        let mut failed = false;
        // Every task the loop starts; aborted at the end so that nothing holds the node.
        let mut tasks = tokio::task::JoinSet::new();
        let mut removed = this.on_leader(*leader_rx.borrow_and_update(), &mut tasks);
        while !removed {
            tokio::select! {
                changed = leader_rx.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep(Duration::from_millis(TICK_MS)).await;
                        continue;
                    }
                    let info = *leader_rx.borrow_and_update();
                    removed = this.on_leader(info, &mut tasks);
                }
                Some(req) = requests.recv() => {
                    let t = this.clone();
                    tasks.spawn(async move { t.handle_request(req).await });
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = this.shared.raise_notify.notified() => this.propose_raises(&mut tasks),
                _ = tick.tick() => {
                    if !this.consensus.is_running() {
                        tracing::error!(id = this.shared.id, "consensus stopped (storage failure or fatal Raft error): no more grants, shutting down");
                        this.shared.consensus_stopped.store(true, Ordering::Release);
                        let mut core = this.shared.core();
                        core.drop_allocator("consensus stopped");
                        core.phase = Phase::Stopped;
                        failed = true;
                        break;
                    }
                    let now = now_us();
                    this.shared.core().expire(now, u64::from(this.shared.lease_ms) * 1000);
                    this.remove_expired(&mut tasks);
                    this.check_quorum(&mut tasks);
                    this.propose_raises(&mut tasks);
                    if now >= server_refresh_us {
                        server_refresh_us = now + 1_000_000;
                        this.refresh_servers();
                        if this.own_entry_stale() {
                            let t = this.clone();
                            tasks.spawn(async move { t.publish_own_entry().await });
                        }
                    }
                }
                _ = stop_rx.changed() => {
                    if *stop_rx.borrow() != StopMode::Run {
                        break;
                    }
                }
            }
        }
        let mode = *stop_rx.borrow();
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        let Ok(this) = Arc::try_unwrap(this) else {
            return Err(ServerError::Thread(
                "control state still shared at stop".into(),
            ));
        };
        this.finish(mode, failed, shards).await
    }

    /// Follows a leader-watch change. Returns `true` if this server, once a member, was
    /// removed from the cluster: it must stop serving.
    fn on_leader(self: &Arc<Self>, info: unid_consensus::LeaderInfo, tasks: &mut Tasks) -> bool {
        let id = self.shared.id;
        let mut core = self.shared.core();
        if core.phase == Phase::Stopped {
            return false;
        }
        let was = (core.leader, core.term, core.phase);
        core.term = info.term;
        core.leader = if info.member { info.leader } else { None };
        if core.leader.is_some() && core.leader != was.0 {
            bump(&self.shared.counters.leader_changes);
        }
        let leads = info.member && info.leader == Some(id);
        if info.member {
            self.was_member.store(true, Ordering::Relaxed);
        } else if self.was_member.load(Ordering::Relaxed) {
            tracing::warn!(id, "this server was removed from the cluster: stopping");
            core.drop_allocator("removed from the cluster");
            core.phase = Phase::Stopped;
            return true;
        }
        if leads {
            if was.2 == Phase::Follower || was.1 != info.term {
                bump(&self.shared.counters.leaderships);
                core.drop_allocator("new term");
                core.phase = Phase::Warming;
                // Elected by a quorum just now.
                self.shared.quorum_ok_us.store(now_us(), Ordering::Release);
                tracing::info!(
                    id,
                    term = info.term,
                    "became leader; reading committed ceilings"
                );
                let this = self.clone();
                tasks.spawn(async move { this.become_leader(info.term).await });
            }
        } else {
            if was.2 != Phase::Follower {
                core.drop_allocator("lost leadership");
                core.phase = Phase::Follower;
            }
            if (was.0, was.1) != (core.leader, core.term) {
                tracing::info!(id, term = info.term, leader = ?core.leader, "following");
            }
        }
        false
    }

    /// While this server leads, confirms with a quorum (one check at a time) that it still
    /// does, and records when it last did ([`QUORUM_LOST_MS`]). One log line per change.
    fn check_quorum(self: &Arc<Self>, tasks: &mut Tasks) {
        let (leads, term) = {
            let core = self.shared.core();
            (
                matches!(core.phase, Phase::Leading | Phase::Warming),
                core.term,
            )
        };
        if !leads || self.shared.quorum_checking.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tasks.spawn(async move {
            let timeout = Duration::from_millis(QUORUM_CHECK_TIMEOUT_MS);
            let lost_before = this.shared.quorum_lost(now_us());
            let confirmed = this.consensus.confirm_leadership(timeout).await;
            let now = now_us();
            if confirmed {
                this.shared.quorum_ok_us.store(now, Ordering::Release);
                if lost_before {
                    tracing::info!(id = this.shared.id, term, "a quorum follows this leader again");
                }
            } else if !lost_before && this.shared.quorum_lost(now) {
                bump(&this.shared.counters.quorum_lost);
                tracing::warn!(
                    id = this.shared.id,
                    term,
                    "no quorum confirmed this leader for {QUORUM_LOST_MS} ms: sending agents to the other servers"
                );
            }
            this.shared.quorum_checking.store(false, Ordering::Release);
        });
    }

    /// The first leader of a new cluster (or of one from before cluster ids) picks its random
    /// id and commits it; the state machine keeps the first one committed.
    async fn create_cluster_id(&self) {
        let proposed = random_cluster_id();
        let cmd = Command::SetSetting {
            key: unid_consensus::SETTING_CLUSTER_ID.to_owned(),
            value: proposed,
        };
        match self.consensus.write(cmd).await {
            Ok(_) => {
                let cluster = self
                    .consensus
                    .with_state(|s| s.state.setting(unid_consensus::SETTING_CLUSTER_ID, 0));
                self.shared.cluster.store(cluster, Ordering::Relaxed);
                tracing::info!(cluster = format_args!("{cluster:016x}"), "cluster id set");
            }
            // Tried again when this server (or another) next becomes leader.
            Err(e) => tracing::warn!("cannot commit the cluster id: {e}"),
        }
    }

    /// Reads the ready ceilings and installs the allocator. Retries (each try bounded by the
    /// write timeout) for as long as this server still warms up in `term`: the leader watch
    /// ends the loop when the term ends.
    async fn become_leader(self: Arc<Self>, term: u64) {
        let id = self.shared.id;
        for attempt in 0u64.. {
            if attempt == 20 {
                tracing::warn!(
                    id,
                    term,
                    "leadership not confirmed after 20 tries; still trying"
                );
            }
            let still = {
                let core = self.shared.core();
                core.phase == Phase::Warming && core.term == term
            };
            if !still {
                return;
            }
            match self.consensus.ready_state().await {
                Ok(applied) => {
                    let now = now_us();
                    let ceilings = applied.state.sequences.iter().filter_map(|(name, s)| {
                        Some(CommittedCeiling {
                            sequence: SequenceName::new(name).ok()?,
                            width: s.width(),
                            ceiling: s.ceiling,
                        })
                    });
                    let alloc = match LeaderAllocator::new(
                        self.shared.allocator_config.clone(),
                        now,
                        ceilings,
                    ) {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::error!(id, term, "cannot build the allocator: {e}");
                            return;
                        }
                    };
                    let sequences = applied.state.sequences.len();
                    let Some(agents) = self.install(term, alloc, &applied.state, now) else {
                        return;
                    };
                    tracing::info!(
                        id,
                        term,
                        sequences,
                        agents,
                        "leading: allocator ready, raising ceilings"
                    );
                    self.shared.raise_notify.notify_one();
                    self.publish_servers().await;
                    if applied.state.setting(unid_consensus::SETTING_CLUSTER_ID, 0) == 0 {
                        self.create_cluster_id().await;
                    }
                    return;
                }
                Err(e) => {
                    tracing::debug!(id, term, attempt, "ready read failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Installs a new leader's allocator if this server still warms up in `term`; takes the
    /// agents of the node table. Returns how many agents it took.
    fn install(
        &self,
        term: u64,
        alloc: LeaderAllocator,
        state: &unid_consensus::ClusterState,
        now: u64,
    ) -> Option<usize> {
        let mut core = self.shared.core();
        if core.phase != Phase::Warming || core.term != term {
            return None;
        }
        core.allocator = Some(alloc);
        core.phase = Phase::Leading;
        // Agents registered by earlier leaders keep their ids, with a fresh lease.
        let mut agents = 0;
        for r in state.nodes.values() {
            if r.kind != NodeKind::Agent || core.agents.len() >= self.shared.agents_max {
                continue;
            }
            if core.hello_seen.len() < HELLO_NAMES_MAX {
                // A replayed `Hello` of an older incarnation is refused by this leader too.
                let seen = core.hello_seen.entry(r.name.clone()).or_insert((0, 0));
                *seen = (*seen).max((r.incarnation, 0));
            }
            if let Ok(ip) = r.addr.parse::<IpAddr>() {
                core.agents.entry(r.id).or_insert(Agent {
                    addr: SocketAddr::new(ip, r.port),
                    last_seen_us: now,
                });
                agents += 1;
            }
        }
        Some(agents)
    }

    /// Records every server's UDP address in the replicated node table (initial members are
    /// not in it), so that every server can name the leader's UDP address.
    async fn publish_servers(&self) {
        let mut want: Vec<(NodeId, SocketAddr)> = vec![(self.shared.id, self.udp_addr)];
        want.extend(self.peers.iter().map(|p| (p.id, p.udp_addr)));
        let voters = self.consensus.metrics().voters;
        for (id, addr) in want {
            if !voters.contains(&id) {
                continue;
            }
            let have = self.consensus.with_state(|s| {
                s.state
                    .nodes
                    .get(&id)
                    .map(|r| r.kind == NodeKind::Server && r.addr == addr.to_string())
                    .unwrap_or(false)
            });
            if have {
                continue;
            }
            let cmd = Command::UpsertServer {
                id,
                addr: addr.to_string(),
            };
            if let Err(e) = self.consensus.write(cmd).await {
                tracing::debug!(id, "recording server address failed: {e}");
            }
        }
        self.refresh_servers();
    }

    /// Whether the node table lacks this server's UDP address while a leader is known (a
    /// server added at runtime is recorded with its Raft address).
    fn own_entry_stale(&self) -> bool {
        let known = {
            let core = self.shared.core();
            core.leader.is_some() && core.phase != Phase::Stopped
        };
        let id = self.shared.id;
        let want = self.udp_addr.to_string();
        known
            && self.consensus.metrics().voters.contains(&id)
            && self
                .consensus
                .with_state(|s| s.state.nodes.get(&id).is_none_or(|r| r.addr != want))
    }

    /// Records this server's UDP address in the node table (forwarded to the leader).
    async fn publish_own_entry(self: Arc<Self>) {
        let cmd = Command::UpsertServer {
            id: self.shared.id,
            addr: self.udp_addr.to_string(),
        };
        match self.consensus.write(cmd).await {
            Ok(_) => {
                tracing::info!(id = self.shared.id, udp = %self.udp_addr, "recorded this server's UDP address")
            }
            Err(e) => tracing::debug!(
                id = self.shared.id,
                "recording this server's UDP address: {e}"
            ),
        }
    }

    /// Server list: the node table's servers, then the configured peers, then this server.
    fn refresh_servers(&self) {
        let mut servers: BTreeMap<NodeId, SocketAddr> = BTreeMap::new();
        let voters = self.consensus.metrics().voters;
        self.consensus.with_state(|s| {
            let cluster = s.state.setting(unid_consensus::SETTING_CLUSTER_ID, 0);
            self.shared.cluster.store(cluster, Ordering::Relaxed);
            for r in s.state.nodes.values() {
                if r.kind == NodeKind::Server
                    && let Ok(a) = r.addr.parse::<SocketAddr>()
                {
                    servers.insert(r.id, a);
                }
            }
        });
        for p in &self.peers {
            servers.insert(p.id, p.udp_addr);
        }
        servers.insert(self.shared.id, self.udp_addr);
        // Drop servers removed from the membership (keep all while membership is unknown).
        if !voters.is_empty() {
            servers.retain(|id, _| voters.contains(id) || *id == self.shared.id);
        }
        self.shared.core().servers = servers;
    }

    /// Removes agents this leader forgot from the replicated node table, so that short-lived
    /// agents do not fill it (each removal is a Raft write; [`REMOVALS_PER_TURN_MAX`] per
    /// turn, one task at a time). A removed agent that is in fact alive gets `NotRegistered`
    /// and registers again under a new node id; node ids are never reused.
    fn remove_expired(self: &Arc<Self>, tasks: &mut Tasks) {
        if self.removing.swap(true, Ordering::AcqRel) {
            return;
        }
        let batch: Vec<NodeId> = {
            let mut core = self.shared.core();
            if core.phase != Phase::Leading {
                core.to_remove.clear();
                Vec::new()
            } else {
                let n = core.to_remove.len().min(REMOVALS_PER_TURN_MAX);
                core.to_remove.drain(..n).collect()
            }
        };
        if batch.is_empty() {
            self.removing.store(false, Ordering::Release);
            return;
        }
        let this = self.clone();
        tasks.spawn(async move {
            for id in batch {
                match this.consensus.remove_node(id).await {
                    Ok(true) => bump(&this.shared.stats.agents_removed),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::debug!(id, "removing an expired agent failed: {e}");
                        break;
                    }
                }
            }
            this.removing.store(false, Ordering::Release);
        });
    }

    fn propose_raises(self: &Arc<Self>, tasks: &mut Tasks) {
        let now = now_us();
        let (raises, term) = {
            let mut core = self.shared.core();
            let term = core.term;
            if core.phase != Phase::Leading {
                core.pending_raises.clear();
                return;
            }
            let mut raises = std::mem::take(&mut core.pending_raises);
            if let Some(alloc) = core.allocator.as_mut() {
                while raises.len() < RAISES_PER_TURN_MAX {
                    match alloc.poll_raise(now) {
                        Some(r) => raises.push(r),
                        None => break,
                    }
                }
            }
            (raises, term)
        };
        for raise in raises {
            let this = self.clone();
            tasks.spawn(async move { this.commit_raise(term, raise).await });
        }
    }

    /// Commits one raise through this node's Raft (never forwarded: see the module docs) and
    /// reports it to the allocator that proposed it.
    async fn commit_raise(self: Arc<Self>, term: u64, raise: Raise) {
        let cmd = Command::RaiseCeiling {
            name: raise.sequence.as_str().to_owned(),
            ceiling: raise.ceiling,
        };
        let started_us = now_us();
        let res =
            tokio::time::timeout(self.write_timeout, self.consensus.raft().client_write(cmd)).await;
        let took_us = now_us().saturating_sub(started_us);
        let outcome: Result<Id, String> = match res {
            Err(_) => Err(format!("timed out after {:?}", self.write_timeout)),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(r)) => match r.data {
                Response::Ceiling { ceiling } => Ok(ceiling),
                other => Err(format!("unexpected answer {other:?}")),
            },
        };
        let mut core = self.shared.core();
        if core.phase != Phase::Leading || core.term != term {
            return; // That allocator is gone.
        }
        let now = now_us();
        let Some(alloc) = core.allocator.as_mut() else {
            return;
        };
        match outcome {
            Ok(ceiling) => {
                bump(&self.shared.stats.raises_committed);
                self.shared.counters.raise_latency.observe_us(took_us);
                if let Err(e) = alloc.on_raise_committed(&raise.sequence, ceiling) {
                    tracing::warn!(sequence = %raise.sequence.as_str(), "raise refused ({e}); dropping the allocator");
                    core.drop_allocator("a ceiling this leader did not propose");
                    core.phase = Phase::Follower;
                }
            }
            Err(e) => {
                bump(&self.shared.stats.raises_failed);
                tracing::warn!(sequence = %raise.sequence.as_str(), ceiling = %raise.ceiling, "raise failed: {e}");
                let _ = alloc.on_raise_failed(now, &raise.sequence, raise.ceiling);
            }
        }
    }

    async fn handle_request(self: Arc<Self>, req: Control) {
        match req {
            Control::Register {
                from,
                reply_to,
                cap,
                incarnation,
                name,
                role,
            } => {
                let role_tag = match role {
                    NodeRole::Server => "server",
                    NodeRole::Agent => "agent",
                    NodeRole::Client => "client",
                    NodeRole::Admin => "admin",
                };
                let res = self
                    .consensus
                    .register_agent(
                        &name,
                        incarnation,
                        &from.ip().to_string(),
                        from.port(),
                        role_tag,
                    )
                    .await;
                let datagram = {
                    let mut core = self.shared.core();
                    core.hellos_pending.remove(&(from, incarnation));
                    let term = core.term;
                    let mut codec = Codec::new();
                    match res {
                        Ok(node_id) if core.phase == Phase::Leading => {
                            bump(&self.shared.stats.registrations);
                            tracing::info!(node_id, %from, name, incarnation, "agent registered");
                            core.agents.insert(
                                node_id,
                                Agent {
                                    addr: from,
                                    last_seen_us: now_us(),
                                },
                            );
                            core.hellos.insert((from, incarnation), node_id);
                            // Remembered once registered (not when asked: a registration
                            // that fails must not turn the agent's retransmissions into
                            // "replays").
                            if core.hello_seen.len() >= HELLO_NAMES_MAX
                                && !core.hello_seen.contains_key(&name)
                            {
                                tracing::warn!(
                                    "{HELLO_NAMES_MAX} agent names remembered: replay memory starts again"
                                );
                                core.hello_seen.clear();
                            }
                            let seen = core.hello_seen.entry(name.clone()).or_insert((0, 0));
                            *seen = (*seen).max((incarnation, reply_to));
                            let servers = core.server_list();
                            let lease_ms = self.shared.lease_ms;
                            encode_with_servers(
                                &self.shared,
                                &mut codec,
                                term,
                                reply_to,
                                &servers,
                                cap,
                                |servers, truncated| Message::Welcome {
                                    node_id,
                                    lease_ms,
                                    servers,
                                    truncated,
                                },
                            )
                        }
                        Ok(_) => None, // Lost leadership meanwhile: the agent retries.
                        Err(e) => {
                            let full = matches!(
                                e,
                                unid_consensus::Error::Rejected(
                                    unid_consensus::Rejection::TableFull
                                )
                            );
                            let now = now_us();
                            if full {
                                bump(&self.shared.stats.refused_registration_full);
                                if now.saturating_sub(core.full_logged_us) >= 10_000_000 {
                                    core.full_logged_us = now;
                                    tracing::error!(
                                        %from,
                                        name,
                                        refused = self
                                            .shared
                                            .stats
                                            .refused_registration_full
                                            .load(Ordering::Relaxed),
                                        "node table full ({} entries): new agents are refused until \
                                         expired ones are removed (leases end after {} ms)",
                                        unid_consensus::state::NODES_MAX,
                                        self.shared.lease_ms
                                    );
                                }
                            } else {
                                tracing::debug!(%from, "registration failed: {e}");
                            }
                            let (code, retry_after_ms) = if full {
                                (ErrorCode::RateLimited, 1_000)
                            } else {
                                (ErrorCode::NotReady, 100)
                            };
                            self.shared
                                .encode(
                                    &mut codec,
                                    term,
                                    reply_to,
                                    &Message::Error {
                                        code,
                                        sequence: None,
                                        retry_after_ms,
                                        text: "",
                                    },
                                )
                                .ok()
                                .filter(|d| d.len() <= cap)
                        }
                    }
                };
                if let Some(datagram) = datagram {
                    let _ = self
                        .sender
                        .send(ShardMessage::Send { to: from, datagram })
                        .await;
                }
            }
            Control::Create {
                from,
                reply_to,
                name,
                width,
                start,
            } => {
                let res = match SequenceName::new(&name) {
                    Ok(n) => self.consensus.create_sequence(&n, width, start).await,
                    Err(_) => Err(unid_consensus::Error::Rejected(
                        unid_consensus::Rejection::BadName,
                    )),
                };
                let term = self.shared.core().term;
                let mut codec = Codec::new();
                let msg_err = |code, text: &str| -> Result<Vec<u8>, EncodeError> {
                    let mut c = Codec::new();
                    self.shared.encode(
                        &mut c,
                        term,
                        reply_to,
                        &Message::Error {
                            code,
                            sequence: Some(&name),
                            retry_after_ms: 0,
                            text: &text[..text.len().min(100)],
                        },
                    )
                };
                let datagram = match res {
                    Ok(ceiling) => {
                        tracing::info!(sequence = name, width = width.bytes(), start = %start, "sequence created");
                        self.shared.encode(
                            &mut codec,
                            term,
                            reply_to,
                            &Message::SequenceInfo {
                                name: &name,
                                width,
                                start,
                                next: start,
                                ceiling: ceiling.max(start),
                            },
                        )
                    }
                    Err(unid_consensus::Error::Rejected(
                        unid_consensus::Rejection::SequenceExists,
                    )) => msg_err(ErrorCode::AlreadyExists, "sequence already exists"),
                    Err(unid_consensus::Error::Rejected(r)) => {
                        msg_err(ErrorCode::BadRequest, &r.to_string())
                    }
                    Err(e) => msg_err(ErrorCode::NotReady, &format!("not committed: {e}")),
                };
                if let Ok(datagram) = datagram {
                    let _ = self
                        .sender
                        .send(ShardMessage::Send { to: from, datagram })
                        .await;
                }
            }
            Control::Membership { from, reply_to, op } => {
                let datagram = self.change_membership(reply_to, op).await;
                if let Ok(datagram) = datagram {
                    let _ = self
                        .sender
                        .send(ShardMessage::Send { to: from, datagram })
                        .await;
                }
            }
        }
    }

    /// Runs one membership change an operator asked for and encodes the answer (see the
    /// module docs, "Membership changes").
    async fn change_membership(
        &self,
        reply_to: SeqNo,
        op: MembershipOp,
    ) -> Result<Vec<u8>, EncodeError> {
        let term = self.shared.core().term;
        let error = |code: ErrorCode, retry_after_ms: u32, text: &str| {
            let mut c = Codec::new();
            let mut n = text.len().min(100);
            while !text.is_char_boundary(n) {
                n -= 1;
            }
            let text = &text[..n];
            self.shared.encode(
                &mut c,
                term,
                reply_to,
                &Message::Error {
                    code,
                    sequence: None,
                    retry_after_ms,
                    text,
                },
            )
        };
        let Ok(_busy) = self.membership_busy.try_lock() else {
            return error(ErrorCode::NotReady, 200, "a membership change is running");
        };
        let voters = self.consensus.metrics().voters;
        let res = match op {
            MembershipOp::Add { id, raft, listen } => {
                if id == self.shared.id || self.id_taken_elsewhere(id, raft) {
                    return error(ErrorCode::BadRequest, 0, "server id already in use");
                }
                if voters.contains(&id) {
                    Ok(())
                } else if !raft_reachable(raft).await {
                    // A learner that never answers stalls later membership changes (and, seen
                    // on a 1-server cluster, every write): refuse before touching the membership.
                    return error(
                        ErrorCode::BadRequest,
                        0,
                        "the new server's Raft address does not accept connections: start it first",
                    );
                } else {
                    tracing::info!(id, %raft, %listen, "adding server (learner, then voter)");
                    match self.consensus.add_server(id, &raft.to_string()).await {
                        Ok(()) => self
                            .consensus
                            .write(Command::UpsertServer {
                                id,
                                addr: listen.to_string(),
                            })
                            .await
                            .map(|_| ()),
                        Err(e) => Err(e),
                    }
                }
            }
            MembershipOp::Remove { id } => {
                if id == self.shared.id {
                    return error(
                        ErrorCode::BadRequest,
                        0,
                        "cannot remove the leader: stop it (SIGTERM hands leadership over) or ask again after",
                    );
                }
                if !voters.contains(&id) {
                    Ok(())
                } else if voters.len() <= 1 {
                    return error(ErrorCode::BadRequest, 0, "cannot remove the last voter");
                } else {
                    tracing::info!(id, "removing server");
                    self.consensus.remove_server(id).await
                }
            }
        };
        if let Err(e) = res {
            tracing::warn!("membership change failed: {e}");
            let code = match e {
                unid_consensus::Error::Config(_) | unid_consensus::Error::Rejected(_) => {
                    ErrorCode::BadRequest
                }
                _ => ErrorCode::NotReady,
            };
            return error(code, 200, &format!("membership change: {e}"));
        }
        self.refresh_servers();
        let voters = self.consensus.metrics().voters;
        let list: Vec<Server> = {
            let core = self.shared.core();
            voters
                .iter()
                .filter_map(|id| core.servers.get(id).map(|&addr| Server { id: *id, addr }))
                .collect()
        };
        tracing::info!(voters = ?voters, "membership changed");
        let n = list.len().min(SERVERS_MAX);
        let mut codec = Codec::new();
        self.shared.encode(
            &mut codec,
            term,
            reply_to,
            &Message::Membership {
                voters: List::new(&list[..n]),
                truncated: n < voters.len(),
            },
        )
    }

    /// Whether `id` is already a voter or learner at another Raft address.
    fn id_taken_elsewhere(&self, id: NodeId, raft: SocketAddr) -> bool {
        let m = self.consensus.raft().metrics();
        let m = m.borrow();
        m.membership_config
            .membership()
            .get_node(&id)
            .is_some_and(|n| n.addr != raft.to_string())
    }

    /// Stops: notices (graceful, as leader), shards, then Raft (with handoff if graceful).
    async fn finish(
        self,
        mode: StopMode,
        failed: bool,
        shards: Shards<ShardMessage>,
    ) -> Result<(), ServerError> {
        let id = self.shared.id;
        let was_leader = {
            let mut core = self.shared.core();
            let leading = core.phase == Phase::Leading || core.phase == Phase::Warming;
            core.drop_allocator("stopping");
            core.phase = Phase::Stopped;
            leading
        };
        if mode == StopMode::Graceful && was_leader && !failed {
            self.send_leader_change().await;
        }
        self.stop.stop();
        let joined = tokio::task::spawn_blocking(move || shards.join()).await;
        if let Ok(Err(e)) = joined {
            tracing::warn!(id, "a shard failed: {e}");
        }
        let Controller { consensus, .. } = self;
        let consensus = match Arc::try_unwrap(consensus) {
            Ok(c) => c,
            Err(_) => {
                tracing::warn!(id, "consensus still referenced; stopping it by drop");
                return if failed {
                    Err(ServerError::ConsensusStopped)
                } else {
                    Ok(())
                };
            }
        };
        let res = if mode == StopMode::Graceful && !failed {
            consensus.shutdown().await
        } else {
            consensus.stop_without_handoff().await
        };
        if let Err(e) = res {
            tracing::debug!(id, "raft stop: {e}");
        }
        tracing::info!(id, "stopped");
        if failed {
            Err(ServerError::ConsensusStopped)
        } else {
            Ok(())
        }
    }

    /// Tells every agent heard from within its lease, and every other server, which server
    /// will lead next.
    async fn send_leader_change(&self) {
        let Some(next) = self.consensus.handoff_successor() else {
            tracing::info!(
                id = self.shared.id,
                "stopping as leader with no successor to name"
            );
            return;
        };
        let (datagrams, successor) = {
            let core = self.shared.core();
            let Some(&next_addr) = core.servers.get(&next) else {
                return;
            };
            let servers = core.server_list();
            let n = servers.len().min(SERVERS_MAX);
            let msg = Message::LeaderChange {
                leader_id: next,
                leader: next_addr,
                servers: List::new(&servers[..n]),
                truncated: n < servers.len(),
            };
            let mut to: Vec<SocketAddr> = core.agents.values().map(|a| a.addr).collect();
            to.extend(core.hellos.keys().map(|(a, _)| *a));
            to.extend(
                core.servers
                    .iter()
                    .filter(|(id, _)| **id != self.shared.id)
                    .map(|(_, a)| *a),
            );
            to.sort();
            to.dedup();
            let mut codec = Codec::new();
            let datagrams: Vec<(SocketAddr, Vec<u8>)> = to
                .into_iter()
                .filter_map(|a| Some((a, self.shared.encode(&mut codec, core.term, 0, &msg).ok()?)))
                .collect();
            (datagrams, (next, next_addr))
        };
        tracing::info!(
            id = self.shared.id,
            successor = successor.0,
            addr = %successor.1,
            notices = datagrams.len(),
            "stepping down: sending LeaderChange"
        );
        for (to, datagram) in datagrams {
            let _ = self.sender.send(ShardMessage::Send { to, datagram }).await;
        }
        // Let the shard flush them before it is told to stop.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty_core() -> Core {
        Core {
            phase: Phase::Leading,
            term: 1,
            leader: Some(1),
            allocator: None,
            pending_raises: Vec::new(),
            agents: HashMap::new(),
            hellos: HashMap::new(),
            hellos_pending: HashSet::new(),
            hello_seen: HashMap::new(),
            windows: HashMap::new(),
            replies: ReplyCache::new(ReplyCacheConfig::DEFAULT).unwrap(),
            sources: HashMap::new(),
            admin_sources: HashMap::new(),
            admin_global: Bucket {
                tokens: 0.0,
                at_us: 0,
            },
            register_sources: HashMap::new(),
            register_global: Bucket {
                tokens: 0.0,
                at_us: 0,
            },
            to_remove: Vec::new(),
            full_logged_us: 0,
            servers: BTreeMap::new(),
            granted: HashMap::new(),
        }
    }

    #[test]
    fn an_unreachable_agent_is_forgotten_at_once_and_only_it() {
        let mut core = empty_core();
        let dead: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        let alive: SocketAddr = "127.0.0.1:40002".parse().unwrap();
        for (id, addr, incarnation) in [(7, dead, 1), (8, alive, 2)] {
            core.agents.insert(
                id,
                Agent {
                    addr,
                    last_seen_us: 1_000,
                },
            );
            core.hellos.insert((addr, incarnation), id);
        }
        assert_eq!(core.forget_unreachable(dead), vec![7]);
        assert!(!core.agents.contains_key(&7));
        assert!(core.agents.contains_key(&8));
        assert_eq!(core.hellos.len(), 1);
        assert_eq!(core.hellos.get(&(alive, 2)), Some(&8));
        // A second error for the same address changes nothing (and logs nothing).
        assert!(core.forget_unreachable(dead).is_empty());
        let unknown: SocketAddr = "127.0.0.1:40003".parse().unwrap();
        assert!(core.forget_unreachable(unknown).is_empty());
        assert_eq!(core.agents.len(), 1);
    }

    fn len(msg: &Message<'_>) -> usize {
        let mut buf = [0u8; DATAGRAM_BYTES_MAX];
        let h = Header {
            sender: 1 << 32,
            seq: u64::MAX,
            reply_to: u64::MAX,
            epoch: u64::MAX,
        };
        Codec::new().encode(&h, msg, None, &mut buf).unwrap()
    }

    fn hello(name: &str) -> usize {
        len(&Message::Hello {
            role: NodeRole::Agent,
            incarnation: 1,
            name,
            listen: None,
            backup_of: None,
        })
    }

    /// What the no-amplification rule lets through to unregistered senders (the numbers the
    /// agent's authors need).
    #[test]
    fn small_answers_fit_the_smallest_requests() {
        let leader: SocketAddr = "255.255.255.255:65535".parse().unwrap();
        let one = [Server {
            id: 1,
            addr: leader,
        }];
        // A Pong to an unregistered sender (lease 0) fits its Ping; NotRegistered any
        // BlockRequest; a Welcome without servers any Hello.
        for t in [0, 1, u64::MAX] {
            let pong = len(&Message::Pong {
                echo_us: t,
                lease_ms: 0,
            });
            assert!(pong <= len(&Message::Ping { sent_us: t }));
        }
        let not_registered = len(&Message::Error {
            code: ErrorCode::NotRegistered,
            sequence: None,
            retry_after_ms: 0,
            text: "",
        });
        assert!(
            not_registered
                <= len(&Message::BlockRequest {
                    sequence: "a",
                    count: 1
                })
        );
        let welcome = |servers: &[Server]| {
            len(&Message::Welcome {
                node_id: u64::MAX,
                lease_ms: u32::MAX,
                servers: List::new(servers),
                truncated: true,
            })
        };
        assert!(welcome(&[]) <= hello("a"));
        // A NotLeader naming an IPv4 leader needs a Hello with a name of about 9 to 12 bytes or
        // more (FlatBuffers pads); a Welcome carrying one IPv4 server, about 40.
        let not_leader = len(&Message::NotLeader {
            leader_id: u64::MAX,
            leader: Some(leader),
            servers: List::empty(),
            truncated: true,
        });
        let fits = (1..=64)
            .find(|n| not_leader <= hello(&"x".repeat(*n)))
            .unwrap();
        assert!(fits <= 12, "a NotLeader needs a Hello name of {fits} bytes");
        assert!(not_leader <= hello("a-short-host"));
        // The smallest redirect (endpoint only) fits the smallest Hello, IPv4 or IPv6.
        for addr in ["255.255.255.255:65535", "[ffff::ffff]:65535"] {
            let minimal = len(&Message::NotLeader {
                leader_id: 0,
                leader: Some(addr.parse().unwrap()),
                servers: List::empty(),
                truncated: false,
            });
            assert!(minimal <= hello("a"), "{addr}: {minimal} > {}", hello("a"));
        }
        assert!(welcome(&one) <= hello(&"x".repeat(40)));
    }

    #[test]
    fn buckets_refill_at_their_rate_up_to_the_burst() {
        let mut b = Bucket {
            tokens: 2.0,
            at_us: 0,
        };
        assert!(b.take(0, 10.0, 2.0));
        assert!(b.take(0, 10.0, 2.0));
        assert!(!b.take(0, 10.0, 2.0));
        assert!(!b.take(50_000, 10.0, 2.0), "half a token after 50 ms");
        assert!(b.take(100_000, 10.0, 2.0));
        assert!(b.take(10_000_000, 10.0, 2.0));
        assert!(b.take(10_000_000, 10.0, 2.0));
        assert!(!b.take(10_000_000, 10.0, 2.0), "never more than the burst");
    }
}
