//! The unid server process: UDP shards (glommio) in front of a Raft node (tokio), around
//! the server state machine of `unid-machine`.
//!
//! [`run`] starts a [`ConsensusNode`] on a tokio runtime of its own thread, bootstraps the
//! cluster if asked, starts the shards, and returns a [`ServerHandle`].
//!
//! # Who owns what
//! - The **machine** ([`unid_machine::Server`]) decides everything: answers, grants, raises,
//!   registrations, leases, phases, the quorum check, the hand-over. Its docs say how grants
//!   stay safe, how amplification and abuse are bounded, and how membership changes and
//!   leases work. It sits behind one `std::sync::Mutex` (see [`crate::driver`]).
//! - The **shards** own the sockets: each datagram goes to the machine, its answer back out,
//!   batched per wake-up. Grants never wait on consensus.
//! - The **driver** ([`crate::driver::Driver`], a tokio task on the consensus thread) owns the
//!   [`ConsensusNode`]: it follows the leader watch, ticks the machine, performs the
//!   consensus calls the machine asks for and reports their results; what the machine sends
//!   on its own (`Welcome`, `LeaderChange`) goes to the shards through a [`ShardSender`]. The
//!   simulator (`unid-sim`) runs the same driver and machine over its own network.
//! - This file: configuration checks, the data dir's lock, starting and stopping, metrics.
//!
//! # Fail-stop
//! If Raft stops (a storage write failed, or any fatal error), the server stops granting at
//! once, logs one error line, stops its shards and [`ServerHandle::wait`] returns
//! [`ServerError::ConsensusStopped`].

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use unid_consensus::{ConsensusNode, NodeConfig, Timing};
use unid_core::AllocatorConfig;
use unid_machine::server::{Config as MachineConfig, Transmit};
use unid_proto::{AuthKey, NodeId, SERVERS_MAX};

pub use crate::driver::StopMode;
use crate::driver::{Driver, Ended, Outbox};
use crate::now_us;
use crate::plane::DataPlane;
use crate::shard::{Handler, ShardConfig, ShardInfo, ShardSender, Shards, StopHandle};
use crate::udp::SendBatch;

pub use unid_machine::server::{
    ADMIN_GLOBAL_RATE_PER_S, ADMIN_RATE_PER_S, CONTROL_QUEUE_MAX, HELLO_NAMES_MAX,
    NOT_READY_RETRY_MS, QUORUM_CHECK_TIMEOUT_MS, QUORUM_LOST_MS, RAISES_PER_TURN_MAX,
    REGISTER_RATE_PER_IP_PER_S, REGISTER_RATE_PER_S, REMOVALS_PENDING_MAX, REMOVALS_PER_TURN_MAX,
    SOURCES_MAX, ServerStats, ServerStatsSnapshot, TICK_MS,
};

/// The shortest cluster secret a server accepts, in bytes.
pub const SECRET_BYTES_MIN: usize = 16;
/// The default UDP port.
pub const DEFAULT_UDP_PORT: u16 = 7400;
/// The default Raft port.
pub const DEFAULT_RAFT_PORT: u16 = 7500;

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
    /// Which data plane runs the shards ([`crate::plane`]): [`DataPlane::Auto`] picks glommio
    /// when io_uring works, else plain threads.
    pub data_plane: DataPlane,
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
            data_plane: DataPlane::Auto,
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

/// Messages the driver sends to a shard.
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

/// What the shards, the driver and the handle share.
struct Shared {
    id: NodeId,
    machine: Arc<Mutex<unid_machine::Server>>,
    stats: Arc<ServerStats>,
    counters: Arc<unid_machine::server::Counters>,
    io: crate::metrics::IoCounters,
    /// Notifies the driver that the machine has actions.
    wake: Arc<Notify>,
    /// The data plane the shards run on (never `Auto`).
    plane: DataPlane,
}

impl Shared {
    fn machine(&self) -> MutexGuard<'_, unid_machine::Server> {
        crate::driver::lock(&self.machine)
    }
}

// ----------------------------------------------------------------------- shards ---

struct ServerHandler {
    shared: Arc<Shared>,
    consensus: Arc<ConsensusNode>,
}

impl ServerHandler {
    fn push(&self, out: &mut SendBatch, to: SocketAddr, datagram: &[u8]) {
        if out.push(to, datagram).is_err() {
            // Cannot happen: the shard leaves room for one answer per call.
            self.shared
                .stats
                .dropped_unexpected
                .fetch_add(1, Ordering::Relaxed);
        } else {
            self.shared.io.datagrams_out.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Handler for ServerHandler {
    type Message = ShardMessage;

    fn on_datagram(&mut self, data: &[u8], from: SocketAddr, now_us: u64, out: &mut SendBatch) {
        let reply = {
            let mut m = self.shared.machine();
            let reply = self
                .consensus
                .with_state(|s| m.handle_datagram(now_us, from, data, &s.state));
            if m.has_actions() {
                self.shared.wake.notify_one();
            }
            reply
        };
        if let Some(reply) = reply {
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
        self.shared.io.send_failed(err.kind);
        if matches!(
            err.kind,
            K::Refused | K::HostUnreachable | K::NetUnreachable
        ) {
            let gone = self.shared.machine().on_unreachable(err.dest);
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

/// The driver's way to the shards.
struct ShardOutbox(ShardSender<ShardMessage>);

impl Outbox for ShardOutbox {
    async fn send(&self, t: Transmit) {
        let _ = self
            .0
            .send(ShardMessage::Send {
                to: t.to,
                datagram: t.datagram,
            })
            .await;
    }
}

// ---------------------------------------------------------------------- handle ---

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
        self.shared.machine().is_granting()
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
    let plane = choose_plane(config.id, config.data_plane)?;
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

    let machine = unid_machine::Server::new(
        MachineConfig {
            id: config.id,
            key: config.secret.as_deref().map(AuthKey::from_secret),
            lease_ms: config.lease_ms,
            agents_max: config.agents_max,
            replies_per_agent_max: config.replies_per_agent_max,
            source_rate_per_s: config.source_rate_per_s,
            allocator: config.allocator.clone(),
            // Set to the address the shards got once they are bound (port 0: any).
            udp_addr: advertised(config.udp_addr, raft_addr),
            peers: config.peers.iter().map(|p| (p.id, p.udp_addr)).collect(),
            // Wall-clock µs: a restarted server's seqs stay above its earlier ones, so that a
            // receiver can tell a replayed datagram of an earlier run (the agent's
            // `LeaderChange` check).
            first_seq: wall_clock_us(),
        },
        now_us(),
    )
    .map_err(|e| ServerError::Config(format!("reply cache: {e}")))?;
    let shared = Arc::new(Shared {
        id: config.id,
        stats: machine.stats().clone(),
        counters: machine.counters().clone(),
        machine: Arc::new(Mutex::new(machine)),
        io: crate::metrics::IoCounters::default(),
        wake: Arc::new(Notify::new()),
        plane,
    });
    let mut shard_config = ShardConfig::new(config.shards, config.udp_addr);
    shard_config.pin_cpus = config.pin_cpus;
    shard_config.data_plane = plane;
    shard_config.name = format!("unid-shard-{}", config.id);
    let handler_shared = shared.clone();
    let handler_consensus = consensus.clone();
    let shards = Shards::start(shard_config, move |_info: &ShardInfo| ServerHandler {
        shared: handler_shared.clone(),
        consensus: handler_consensus.clone(),
    })?;
    let udp_addr = shards.local_addr();
    shared
        .machine()
        .set_udp_addr(advertised(udp_addr, raft_addr));
    tracing::info!(id = config.id, %udp_addr, shards = shards.len(), "udp listening");

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
    let driver = Driver::new(
        shared.machine.clone(),
        consensus,
        ShardOutbox(sender),
        Arc::new(now_us),
        shared.wake.clone(),
        Duration::from_millis(config.timing.write_timeout_ms),
        Arc::new(random_cluster_id),
    );
    let stop = shards.stop_handle();
    let id = config.id;
    let thread = std::thread::Builder::new()
        .name(format!("unid-server-{}", config.id))
        .spawn(move || {
            let result = runtime.block_on(async move {
                let (ended, driver) = driver.run(stop_rx).await;
                finish(id, ended, driver, stop, shards).await
            });
            // Held until Raft and the shards are stopped.
            let _locked = &data_dir_lock;
            // Tasks still running hold no lock; dropping the runtime cancels them.
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

/// Gathers the server's figures (counters are atomics; gauges are read under the machine's
/// lock, then the consensus state's read lock, in that order) and formats them after the
/// locks are released. Holds the consensus node only while reading its state: the driver
/// must own it alone to stop it.
fn render_metrics(shared: &Shared, consensus: &std::sync::Weak<ConsensusNode>) -> String {
    let stats = shared.stats.snapshot();
    let gauges = {
        let m = shared.machine();
        // Once stopped, the node is not touched: the driver must own it alone to stop it.
        let consensus = if m.phase() == unid_machine::server::Phase::Stopped {
            None
        } else {
            consensus.upgrade()
        };
        match consensus {
            Some(c) => c.with_state(|s| m.gauges(Some(&s.state))),
            None => m.gauges(None),
        }
    };
    crate::metrics::render_server(&stats, &shared.counters, &shared.io, &gauges, shared.plane)
}

/// Resolves the data plane before anything starts, and logs which one and why (one line: WARN
/// when `auto` fell back to threads, INFO otherwise). A forced `io-uring` where io_uring does
/// not work is [`crate::Error::IoUringUnavailable`].
fn choose_plane(id: NodeId, wanted: DataPlane) -> Result<DataPlane, ServerError> {
    let chosen = crate::plane::choose(wanted)?;
    let plane = chosen.plane.name();
    if chosen.is_fallback() {
        tracing::warn!(
            id,
            plane,
            "data plane: threads (ppoll + recvmmsg/sendmmsg), because {}; \
             --data-plane threads silences this",
            chosen.reason
        );
    } else {
        tracing::info!(
            id,
            plane,
            wanted = wanted.name(),
            "data plane: {plane} ({})",
            chosen.reason
        );
    }
    Ok(chosen.plane)
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

/// Stops: notices (graceful, as leader), shards, then Raft (with handoff if graceful).
async fn finish(
    id: NodeId,
    ended: Ended,
    driver: Driver<ShardOutbox>,
    stop: StopHandle,
    shards: Shards<ShardMessage>,
) -> Result<(), ServerError> {
    let failed = ended == Ended::Failed;
    let graceful = ended == Ended::Stopped(StopMode::Graceful);
    let successor = if graceful {
        driver.consensus().handoff_successor()
    } else {
        None
    };
    let (notices, machine) = {
        let machine = driver.machine_handle();
        let mut m = crate::driver::lock(&machine);
        m.stop(graceful, successor);
        let notices: Vec<Transmit> = std::iter::from_fn(|| m.poll_transmit()).collect();
        drop(m);
        (notices, machine)
    };
    drop(machine);
    // Queued before the stop: a stopping shard delivers what its channel holds, then flushes.
    for t in notices {
        driver.outbox().send(t).await;
    }
    stop.stop();
    let joined = tokio::task::spawn_blocking(move || shards.join()).await;
    if let Ok(Err(e)) = joined {
        tracing::warn!(id, "a shard failed: {e}");
    }
    let consensus = match Arc::try_unwrap(driver.into_consensus()) {
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
    let res = if graceful {
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
