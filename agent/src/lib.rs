//! The unid agent: one per application host. It registers with the cluster,
//! asks the leader for blocks of ids sized from the measured consumption rate,
//! keeps one shared-memory ring per sequence full (application processes take
//! ids from it with the `unid` client crate, no syscall), and serves ids on a
//! localhost TCP socket for any language (protocol in `agent/README.md`).
//!
//! ```no_run
//! use unid_agent::{AgentConfig, run};
//! # fn main() -> Result<(), unid_agent::Error> {
//! let mut config = AgentConfig::new(vec!["127.0.0.1:7400".parse().unwrap()]);
//! config.sequences = vec!["orders".parse().unwrap()];
//! let agent = run(config)?;            // returns once the threads are running
//! println!("{:?}", agent.status());    // connection state, node id, rings
//! agent.stop();                        // closes the rings (consumers drain them)
//! # Ok(()) }
//! ```
//!
//! # Structure
//!
//! The decisions are one sans-IO state machine, [`machine::Machine`]
//! (registration, leaders and epochs through `unid_core::Requester`, block
//! bookkeeping and refills through `unid_core::Sizer`, server paths,
//! pairing): datagrams, send errors, ring consumption and time go in,
//! encoded datagrams and ring writes come out. The agent's threads do the I/O
//! around it, and a simulator can drive the same machine.
//!
//! - the **driver** (`driver.rs`): the I/O loop: one connected UDP socket per
//!   server (`net.rs`: the kernel's ICMP reports are the fast failure
//!   signal), the ring producers (`rings.rs`), the pair link's sockets
//!   (`pair.rs`), the clock and the status snapshot, all fed into the
//!   machine;
//! - the **socket server** (`socket.rs`): an accept loop plus one thread per
//!   connection (at most `socket_connections_max`), taking ids from the same
//!   rings as an ordinary consumer, so an id is handed out once whichever way
//!   it leaves.
//!
//! # Guarantees
//!
//! - Ids enter a ring in increasing order and never twice: a grant that does
//!   not start at or above the end of the previous one is dropped and counted
//!   (`Metrics::grants_rejected`); the ring refuses it too.
//! - One block request per sequence is in flight at a time, so grants arrive
//!   in the order asked.
//! - A restart registers afresh (new incarnation, new node id, new request
//!   numbers) and asks for new blocks; the ids the previous run held are lost,
//!   never repeated.
//! - While the cluster is unreachable the rings keep serving what they hold;
//!   [`Status::connection`] says so and one log line marks each change.
//! - Paired with a backup agent ([`PairConfig`]), each side holds its own
//!   blocks (granted by the servers, so disjoint) and its own ring; the
//!   standby takes over when the active one dies (see `agent/README.md`).

#![forbid(unsafe_code)]

mod driver;
pub mod machine;
mod net;
pub mod pair;
mod rings;
mod socket;
pub mod testing;

pub use machine::{Incompatibility, PathLoss, PathState, ServerPath};
pub use pair::{PairConfig, PairRole, PairStatus, PeerLoss, PeerState};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub use unid_core::{RequesterConfig, SizingConfig};
use unid_proto::{AuthKey, ClusterId, NodeId, SequenceName, Width};

/// Default UDP port of a server.
pub const SERVER_PORT_DEFAULT: u16 = 7400;
/// Default address of the localhost socket.
pub const SOCKET_ADDR_DEFAULT: &str = "127.0.0.1:7411";
/// The most sequences one agent serves.
pub const SEQUENCES_MAX: usize = 64;
/// The most ids one `NEXT` on the localhost socket returns.
pub const SOCKET_IDS_MAX: u64 = 10_000;
/// The longest request line accepted on the localhost socket, in bytes.
pub const SOCKET_LINE_BYTES_MAX: usize = 256;
/// How long a block lasts at the measured rate by default, in ms. With two blocks ahead the
/// ring holds at least this much of consumption when a refill starts, enough to ride over a
/// leader failover (worst seen ~0.8 s): measured with `loadgen --nemesis all`, 1000 ms kept
/// every `next()` at a leader kill under 5 ms, where 100 ms gave 16–27 ms waits. The cost: an
/// agent restart loses up to about two periods of consumption (never repeats them).
pub const REFILL_PERIOD_MS_DEFAULT: u64 = 1_000;

/// Everything that can go wrong starting an agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range; `field` names it.
    #[error("invalid agent config: {field} {reason}")]
    InvalidConfig {
        /// The field of [`AgentConfig`].
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A socket could not be opened.
    #[error("{op} {addr}: {source}")]
    Io {
        /// The operation (`bind udp`, `bind tcp`, ...).
        op: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("starting the {name} thread: {source}")]
    Thread {
        /// Which thread.
        name: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// How an agent runs. [`AgentConfig::new`] gives the defaults.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Servers to contact (any of them; followers redirect to the leader).
    /// 1 to 64, no repeats.
    pub servers: Vec<SocketAddr>,
    /// Sequences to serve: one ring each (1 to [`SEQUENCES_MAX`]).
    pub sequences: Vec<SequenceName>,
    /// This agent's name in `Hello` (sequence-name rules). Default `agent`.
    pub name: String,
    /// Folder of the ring files. Default `/dev/shm/unid`.
    pub ring_dir: PathBuf,
    /// Slots per ring (power of two, 2..=2^24). Default 1024.
    pub ring_capacity: u64,
    /// Ring file mode: `0o600` (default) or `0o660` (group may consume).
    pub ring_mode: u32,
    /// The localhost TCP socket; `None` serves none. Default 127.0.0.1:7411.
    /// Only the agent's user and root may use it (the peer's socket owner is
    /// looked up in `/proc/net/tcp`), unless `socket_tcp_any_user`.
    pub socket: Option<SocketAddr>,
    /// Let any local user take ids over the TCP socket (as before issue 12).
    /// Default false.
    pub socket_tcp_any_user: bool,
    /// Also serve the protocol on the Unix socket `ring_dir/.unid-socket`
    /// (mode 0600, 0660 with `ring_mode` 0660). Peers are checked with
    /// `SO_PEERCRED`: the agent's user, root, or (0660) its group. The
    /// client prefers it. Default true.
    pub unix_socket: bool,
    /// Most simultaneous socket connections (1..=4096). Default 64.
    pub socket_connections_max: usize,
    /// How long a `NEXT` on the socket waits for ids when the ring is empty,
    /// in milliseconds (1..=60,000). Default 2000.
    pub socket_wait_ms: u64,
    /// How long an idle socket connection stays open, in milliseconds
    /// (1..=3,600,000). Default 60,000.
    pub socket_idle_ms: u64,
    /// Block sizing: `refill_period_ms` is how long a block should last at
    /// the measured rate (default [`REFILL_PERIOD_MS_DEFAULT`]).
    pub sizing: SizingConfig,
    /// Keep this many blocks (of the current size) in each ring (1..=16).
    /// Default 2: a refill is asked for while a whole block is still there.
    pub blocks_ahead: u32,
    /// Retransmission, backoff, deadlines.
    pub requester: RequesterConfig,
    /// The cluster secret's key; every datagram is tagged and checked.
    pub key: Option<AuthKey>,
    /// How often the driver looks at the rings when no datagram arrives, in
    /// milliseconds (1..=100). Default 2.
    pub poll_interval_ms: u64,
    /// Primary/backup pairing with another agent (see `pair`). Default none.
    pub pair: Option<PairConfig>,
    /// The id of the cluster to serve (`unid status` shows it), if known:
    /// answers carrying another are dropped from the start. `None` (the
    /// default): the first non-zero id a server answers with is pinned.
    pub cluster: Option<ClusterId>,
}

impl AgentConfig {
    /// Defaults for these servers, serving the sequence `default`.
    pub fn new(servers: Vec<SocketAddr>) -> AgentConfig {
        AgentConfig {
            servers,
            sequences: vec![SequenceName::new("default").expect("valid name")],
            name: "agent".to_owned(),
            ring_dir: PathBuf::from(unid_ring::DEFAULT_DIR),
            ring_capacity: 1024,
            ring_mode: 0o600,
            socket: Some(SOCKET_ADDR_DEFAULT.parse().expect("valid address")),
            socket_tcp_any_user: false,
            unix_socket: true,
            socket_connections_max: 64,
            socket_wait_ms: 2000,
            socket_idle_ms: 60_000,
            sizing: SizingConfig {
                refill_period_ms: REFILL_PERIOD_MS_DEFAULT,
                ..SizingConfig::DEFAULT
            },
            blocks_ahead: 2,
            requester: RequesterConfig {
                servers_max: unid_core::requester::SERVERS_MAX_LIMIT,
                // A block request per sequence, a Hello and a Ping.
                requests_max: SEQUENCES_MAX + 2,
                ..RequesterConfig::DEFAULT
            },
            key: None,
            poll_interval_ms: 2,
            pair: None,
            cluster: None,
        }
    }

    /// What the agent's state machine needs of this configuration, for the agent
    /// started with `incarnation` (wall-clock µs at start; the first `Hello` carries it).
    pub fn machine_config(&self, incarnation: u64) -> machine::MachineConfig {
        machine::MachineConfig {
            servers: self.servers.clone(),
            sequences: self.sequences.clone(),
            name: self.name.clone(),
            incarnation,
            key: self.key.clone(),
            cluster: self.cluster,
            sizing: self.sizing.clone(),
            blocks_ahead: self.blocks_ahead,
            requester: self.requester.clone(),
            pair: self.pair.clone().map(|config| machine::PairSetup {
                listen: config.listen,
                config,
                ring_dir: self.ring_dir.clone(),
            }),
        }
    }

    /// Checks every bound (the state machine's first: servers, sequences, name,
    /// blocks_ahead, cluster, sizing, requester; then the rings', sockets' and pair's).
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field, reason: &str| {
            Err(Error::InvalidConfig {
                field,
                reason: reason.to_owned(),
            })
        };
        self.machine_config(1).validate()?;
        if !self.ring_capacity.is_power_of_two() || !(2..=1 << 24).contains(&self.ring_capacity) {
            return bad("ring_capacity", "must be a power of two in 2..=2^24");
        }
        if self.ring_mode != 0o600 && self.ring_mode != 0o660 {
            return bad("ring_mode", "must be 0o600 or 0o660");
        }
        if !(1..=4096).contains(&self.socket_connections_max) {
            return bad("socket_connections_max", "must be in 1..=4096");
        }
        if !(1..=60_000).contains(&self.socket_wait_ms) {
            return bad("socket_wait_ms", "must be in 1..=60000");
        }
        if !(1..=3_600_000).contains(&self.socket_idle_ms) {
            return bad("socket_idle_ms", "must be in 1..=3600000");
        }
        if !(1..=100).contains(&self.poll_interval_ms) {
            return bad("poll_interval_ms", "must be in 1..=100");
        }
        if self.pair.is_some() {
            let dir = self.ring_dir.as_os_str().len();
            if dir > pair::RING_DIR_BYTES_MAX || self.ring_dir.to_string_lossy().contains('\n') {
                return bad(
                    "ring_dir",
                    "must be at most 512 bytes and hold no newline for a paired agent",
                );
            }
        }
        Ok(())
    }
}

/// Whether the agent can reach the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connection {
    /// Not registered yet (sending `Hello`).
    Registering,
    /// Registered; the leader answers.
    Connected,
    /// Requests go unanswered: serving only what the rings hold.
    Unreachable,
    /// Stopped.
    Stopped,
}

/// What a sequence's ring is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SequenceState {
    /// No block received yet (no ring yet).
    Waiting,
    /// The ring exists and is being kept full.
    Serving,
    /// The cluster does not know this sequence (asked again every few
    /// seconds: it may be created later).
    UnknownSequence,
    /// The sequence has no ids left. Final.
    Exhausted,
    /// The ring could not be created or written; the text says why.
    RingError(String),
}

/// One sequence's line in [`Status`].
#[derive(Clone, Debug, PartialEq)]
pub struct SequenceStatus {
    /// Its name.
    pub name: SequenceName,
    /// Its width, once the first grant told it.
    pub width: Option<Width>,
    /// What it is doing.
    pub state: SequenceState,
    /// Ids in the ring, not yet taken.
    pub ring_ids: u64,
    /// Ids received but not yet in the ring (ring slots full).
    pub held_ids: u64,
    /// Measured consumption, ids per second.
    pub rate_ids_per_s: f64,
    /// Size of the last block asked for.
    pub block_ids: u64,
    /// Ids pushed into the ring since start.
    pub ids_pushed: u128,
}

/// A snapshot of the agent's state.
#[derive(Clone, Debug, PartialEq)]
pub struct Status {
    /// Reaching the cluster or not.
    pub connection: Connection,
    /// The node id the leader assigned (0 while registering).
    pub node_id: NodeId,
    /// Where requests go now.
    pub leader: Option<SocketAddr>,
    /// The highest epoch (Raft term) seen.
    pub epoch: u64,
    /// The incarnation sent in `Hello` (wall-clock µs at start).
    pub incarnation: u64,
    /// The cluster id this agent serves (0 until a server told it).
    pub cluster: ClusterId,
    /// One line per configured sequence.
    pub sequences: Vec<SequenceStatus>,
    /// The primary/backup pair, if this agent is paired.
    pub pair: Option<PairStatus>,
    /// Each server's path (errors the kernel reported, answers since).
    pub servers: Vec<ServerPath>,
    /// No route to any server (this host's network is gone): serving from
    /// the rings only until it returns.
    pub network_down: bool,
    /// The last server that could not serve this agent's protocol versions (and what to
    /// upgrade), until a server welcomes it.
    pub incompatible: Option<Incompatibility>,
}

/// Counters, readable at any time with [`AgentHandle::metrics`].
#[derive(Debug, Default)]
pub struct Metrics {
    /// Block grants accepted.
    pub grants: AtomicU64,
    /// Ids in accepted grants (saturating).
    pub ids_granted: AtomicU64,
    /// Grants dropped: not increasing, wrong width, or for an unexpected sequence.
    pub grants_rejected: AtomicU64,
    /// Block requests sent (first transmissions).
    pub block_requests: AtomicU64,
    /// Retransmissions of any request.
    pub retransmits: AtomicU64,
    /// Redirects followed (`NotLeader` naming a leader).
    pub redirects: AtomicU64,
    /// `LeaderChange` messages acted on.
    pub leader_changes: AtomicU64,
    /// `LeaderChange` messages ignored: naming a server this agent does not
    /// know, or with an implausible epoch (logged with the reason).
    pub leader_changes_rejected: AtomicU64,
    /// Datagrams dropped because they carry another cluster's id than the
    /// one this agent pinned (logged).
    pub other_cluster_dropped: AtomicU64,
    /// Refusals for lack of a common protocol version.
    pub version_refusals: AtomicU64,
    /// Datagrams dropped as replays: a `LeaderChange` whose seq was acted on
    /// already or is older than the window of its server's datagrams.
    pub replays_dropped: AtomicU64,
    /// Datagrams the OS refused to send.
    pub send_errors: AtomicU64,
    /// Datagrams dropped: undecodable, bad tag, unknown source, stale epoch.
    pub datagrams_dropped: AtomicU64,
    /// Requests given up after every attempt.
    pub requests_failed: AtomicU64,
    /// Registrations (`Welcome` received).
    pub registrations: AtomicU64,
    /// Last refill latency (block request sent → grant in the ring), µs.
    pub refill_latency_us_last: AtomicU64,
    /// Largest refill latency seen, µs.
    pub refill_latency_us_max: AtomicU64,
    /// Times a ring was found empty by the driver while it had been serving.
    pub ring_empty_events: AtomicU64,
    /// Ids handed out on the localhost socket.
    pub socket_ids: AtomicU64,
    /// Socket connections refused because `socket_connections_max` were open.
    pub socket_refused: AtomicU64,
    /// Socket connections refused because the peer may not take ids (see
    /// [`AgentConfig::socket_tcp_any_user`]).
    pub socket_denied: AtomicU64,
    /// Socket requests answered with `ERR`.
    pub socket_errors: AtomicU64,
    /// Path errors the kernel reported on a server's socket (ICMP refused,
    /// host or network unreachable).
    pub path_errors: AtomicU64,
    /// Server paths that went down (once per change).
    pub path_losses: AtomicU64,
    /// Times every server became unroutable (network lost).
    pub network_losses: AtomicU64,
    /// Heartbeats sent to the pair peer.
    pub peer_beats_sent: AtomicU64,
    /// Heartbeats received from the pair peer.
    pub peer_beats_received: AtomicU64,
    /// Pair datagrams dropped (malformed, bad tag, not the configured peer).
    pub peer_beats_dropped: AtomicU64,
    /// Sends to the peer refused or unreachable (ICMP or no route).
    pub peer_send_errors: AtomicU64,
    /// Peer losses noticed by the fast signal (send error).
    pub peer_losses_fast: AtomicU64,
    /// Peer losses noticed by the slow signal (missed heartbeats).
    pub peer_losses_slow: AtomicU64,
    /// Times this agent became active after standing by.
    pub takeovers: AtomicU64,
}

impl Metrics {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counters and `status`'s gauges in the Prometheus text format
    /// (served by the socket's `METRICS` and `GET /metrics`).
    pub fn prometheus(&self, status: &Status) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let counters: [(&str, &AtomicU64, &str); 32] = [
            ("grants_total", &self.grants, "block grants accepted"),
            (
                "ids_granted_total",
                &self.ids_granted,
                "ids in accepted grants",
            ),
            (
                "grants_rejected_total",
                &self.grants_rejected,
                "grants dropped (not increasing, wrong width or sequence)",
            ),
            (
                "block_requests_total",
                &self.block_requests,
                "block requests sent",
            ),
            ("retransmits_total", &self.retransmits, "retransmissions"),
            ("redirects_total", &self.redirects, "redirects followed"),
            (
                "leader_changes_total",
                &self.leader_changes,
                "LeaderChange messages acted on",
            ),
            (
                "leader_changes_rejected_total",
                &self.leader_changes_rejected,
                "LeaderChange messages ignored (unknown leader or implausible epoch)",
            ),
            (
                "other_cluster_dropped_total",
                &self.other_cluster_dropped,
                "datagrams dropped for carrying another cluster's id",
            ),
            (
                "version_refusals_total",
                &self.version_refusals,
                "servers' refusals for lack of a common protocol version (VersionMismatch)",
            ),
            (
                "replays_dropped_total",
                &self.replays_dropped,
                "replayed datagrams dropped (LeaderChange seen before or too old)",
            ),
            (
                "send_errors_total",
                &self.send_errors,
                "datagrams the OS refused to send",
            ),
            (
                "datagrams_dropped_total",
                &self.datagrams_dropped,
                "datagrams dropped",
            ),
            (
                "requests_failed_total",
                &self.requests_failed,
                "requests given up",
            ),
            ("registrations_total", &self.registrations, "registrations"),
            (
                "refill_latency_us_last",
                &self.refill_latency_us_last,
                "last refill latency in microseconds",
            ),
            (
                "refill_latency_us_max",
                &self.refill_latency_us_max,
                "largest refill latency in microseconds",
            ),
            (
                "ring_empty_total",
                &self.ring_empty_events,
                "rings found empty",
            ),
            (
                "socket_ids_total",
                &self.socket_ids,
                "ids handed out on the socket",
            ),
            (
                "socket_refused_total",
                &self.socket_refused,
                "socket connections refused",
            ),
            (
                "socket_denied_total",
                &self.socket_denied,
                "socket connections denied (peer may not take ids)",
            ),
            (
                "socket_errors_total",
                &self.socket_errors,
                "socket requests answered with ERR",
            ),
            (
                "path_errors_total",
                &self.path_errors,
                "path errors reported by the kernel on server sockets",
            ),
            (
                "path_losses_total",
                &self.path_losses,
                "server paths that went down",
            ),
            (
                "network_losses_total",
                &self.network_losses,
                "times no server was routable",
            ),
            (
                "peer_heartbeats_sent_total",
                &self.peer_beats_sent,
                "heartbeats sent to the pair peer",
            ),
            (
                "peer_heartbeats_received_total",
                &self.peer_beats_received,
                "heartbeats received from the pair peer",
            ),
            (
                "peer_datagrams_dropped_total",
                &self.peer_beats_dropped,
                "pair datagrams dropped",
            ),
            (
                "peer_send_errors_total",
                &self.peer_send_errors,
                "sends to the peer refused or unreachable",
            ),
            (
                "peer_lost_fast_total",
                &self.peer_losses_fast,
                "peer losses noticed by a send error",
            ),
            (
                "peer_lost_slow_total",
                &self.peer_losses_slow,
                "peer losses noticed by missed heartbeats",
            ),
            ("takeovers_total", &self.takeovers, "takeovers"),
        ];
        for (name, value, help) in counters {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(out, "# HELP unid_agent_{name} {help}");
            let _ = writeln!(out, "# TYPE unid_agent_{name} {kind}");
            let _ = writeln!(out, "unid_agent_{name} {}", value.load(Ordering::Relaxed));
        }
        let connected = u8::from(status.connection == Connection::Connected);
        let _ = writeln!(out, "# TYPE unid_agent_connected gauge");
        let _ = writeln!(out, "unid_agent_connected {connected}");
        let _ = writeln!(out, "# TYPE unid_agent_version_incompatible gauge");
        let _ = writeln!(
            out,
            "unid_agent_version_incompatible {}",
            u8::from(status.incompatible.is_some())
        );
        let _ = writeln!(out, "# TYPE unid_agent_network_up gauge");
        let _ = writeln!(
            out,
            "unid_agent_network_up {}",
            u8::from(!status.network_down)
        );
        if let Some(p) = &status.pair {
            let _ = writeln!(out, "# TYPE unid_agent_pair_active gauge");
            let _ = writeln!(out, "unid_agent_pair_active {}", u8::from(p.active));
            let _ = writeln!(out, "# TYPE unid_agent_pair_peer_alive gauge");
            let alive = u8::from(p.peer_state == PeerState::Alive);
            let _ = writeln!(out, "unid_agent_pair_peer_alive {alive}");
        }
        let _ = writeln!(out, "# TYPE unid_agent_ring_ids gauge");
        for s in &status.sequences {
            let _ = writeln!(
                out,
                "unid_agent_ring_ids{{sequence=\"{}\"}} {}",
                s.name, s.ring_ids
            );
        }
        let _ = writeln!(out, "# TYPE unid_agent_rate_ids_per_second gauge");
        for s in &status.sequences {
            let _ = writeln!(
                out,
                "unid_agent_rate_ids_per_second{{sequence=\"{}\"}} {:.1}",
                s.name, s.rate_ids_per_s
            );
        }
        out
    }
}

/// The socket's `PAIR` answer: `key value` lines describing this agent, its
/// pair and its paths to the servers (see `agent/README.md`).
pub fn pair_text(status: &Status) -> String {
    use std::fmt::Write as _;
    let mut t = String::new();
    let _ = writeln!(t, "node_id {}", status.node_id);
    let _ = writeln!(t, "incarnation {}", status.incarnation);
    let _ = writeln!(
        t,
        "connection {}",
        format!("{:?}", status.connection).to_lowercase()
    );
    let _ = writeln!(
        t,
        "network {}",
        if status.network_down { "down" } else { "up" }
    );
    if let Some(l) = status.leader {
        let _ = writeln!(t, "leader {l}");
    }
    for p in &status.servers {
        let state = match p.state {
            PathState::Unknown => "unknown".to_owned(),
            PathState::Up => "up".to_owned(),
            PathState::Down(loss) => format!("down-{}", format!("{loss:?}").to_lowercase()),
        };
        let _ = writeln!(t, "server {} {state}", p.addr);
    }
    match &status.pair {
        None => t.push_str("role none\n"),
        Some(p) => {
            let _ = writeln!(t, "role {}", p.role.as_str());
            let _ = writeln!(t, "active {}", u8::from(p.active));
            let _ = writeln!(t, "listen {}", p.listen);
            if let Some(a) = p.peer {
                let _ = writeln!(t, "peer {a}");
            }
            let state = match p.peer_state {
                PeerState::Unknown => "unknown".to_owned(),
                PeerState::Alive => "alive".to_owned(),
                PeerState::Dead(why) => format!("dead-{}", format!("{why:?}").to_lowercase()),
            };
            let _ = writeln!(t, "peer_state {state}");
            let _ = writeln!(t, "peer_active {}", u8::from(p.peer_active));
            let _ = writeln!(t, "peer_node_id {}", p.peer_node_id);
            let _ = writeln!(t, "peer_incarnation {}", p.peer_incarnation);
            if let Some(s) = p.peer_socket {
                let _ = writeln!(t, "peer_socket {s}");
            }
            if let Some(ms) = p.peer_heard_ms_ago {
                let _ = writeln!(t, "peer_heard_ms_ago {ms}");
            }
            let _ = writeln!(t, "takeovers {}", p.takeovers);
        }
    }
    t
}

/// State shared by the agent's threads and its handle.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) stop: AtomicBool,
    pub(crate) status: Mutex<Status>,
    pub(crate) metrics: Metrics,
    /// The localhost socket's address, once bound.
    pub(crate) socket: std::sync::OnceLock<SocketAddr>,
}

impl Shared {
    pub(crate) fn socket_addr(&self) -> Option<SocketAddr> {
        self.socket.get().copied()
    }

    pub(crate) fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A running agent. Dropping it stops it (like [`AgentHandle::stop`]).
#[derive(Debug)]
pub struct AgentHandle {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    socket: Option<SocketAddr>,
    pair: Option<SocketAddr>,
}

impl AgentHandle {
    /// A snapshot of the state.
    pub fn status(&self) -> Status {
        self.shared.status()
    }

    /// The counters.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// [`Metrics::prometheus`] with the current status.
    pub fn prometheus(&self) -> String {
        self.shared.metrics.prometheus(&self.shared.status())
    }

    /// The address the localhost socket listens on (the real port when the
    /// configured one was 0).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.socket
    }

    /// The address the pair link listens on (the real port when the
    /// configured one was 0), if paired.
    pub fn pair_addr(&self) -> Option<SocketAddr> {
        self.pair
    }

    /// Whether the agent's threads are all still running.
    pub fn is_running(&self) -> bool {
        self.threads.iter().all(|t| !t.is_finished())
    }

    /// Stops the threads and closes the rings (consumers drain what is in
    /// them, then see `Closed`). Waits for the threads to exit.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Starts an agent: binds its UDP socket and its localhost socket, then runs
/// the driver and the socket server on their own threads. Returns at once;
/// registration and the first blocks follow in the background.
pub fn run(config: AgentConfig) -> Result<AgentHandle, Error> {
    config.validate()?;
    let incarnation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1)
        .max(1);
    let status = Status {
        connection: Connection::Registering,
        node_id: 0,
        leader: config.servers.first().copied(),
        epoch: 0,
        incarnation,
        cluster: config.cluster.unwrap_or(0),
        sequences: config
            .sequences
            .iter()
            .map(|name| SequenceStatus {
                name: name.clone(),
                width: None,
                state: SequenceState::Waiting,
                ring_ids: 0,
                held_ids: 0,
                rate_ids_per_s: 0.0,
                block_ids: 0,
                ids_pushed: 0,
            })
            .collect(),
        pair: None,
        servers: Vec::new(),
        network_down: false,
        incompatible: None,
    };
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        status: Mutex::new(status),
        metrics: Metrics::default(),
        socket: std::sync::OnceLock::new(),
    });
    let driver = driver::Driver::new(config.clone(), incarnation, Arc::clone(&shared))?;
    let listener = socket::Server::bind(&config, Arc::clone(&shared))?;
    if let Some(a) = listener.as_ref().and_then(|l| l.local_addr()) {
        let _ = shared.socket.set(a);
    }
    let mut handle = AgentHandle {
        shared,
        threads: Vec::new(),
        socket: listener.as_ref().and_then(|l| l.local_addr()),
        pair: driver.pair_addr(),
    };
    let t = std::thread::Builder::new()
        .name("unid-agent-driver".to_owned())
        .spawn(move || driver.run())
        .map_err(|source| Error::Thread {
            name: "driver",
            source,
        })?;
    handle.threads.push(t);
    if let Some(listener) = listener {
        let t = std::thread::Builder::new()
            .name("unid-agent-socket".to_owned())
            .spawn(move || listener.run())
            .map_err(|source| Error::Thread {
                name: "socket",
                source,
            })?;
        handle.threads.push(t);
    }
    Ok(handle)
}
