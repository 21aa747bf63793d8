//! [`ConsensusNode`]: one Raft server — storage, network, and the typed API
//! the engine uses.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use unid_proto::auth::AuthKey;
use unid_proto::types::{Id, NodeId, SequenceName, Width};

use crate::error::{Error, Result};
use crate::frame::{NetStats, NetStatsSnapshot};
use crate::network::{
    self, CallError, Handler, NetConfig, NetworkFactory, PeerClient, RpcRequest, RpcResponse,
    WriteFailure,
};
use crate::state::{AGENT_ID_FIRST, Command, Response, SequenceState};
use crate::store::{self, AppliedState, StateMachineStore};
use crate::types::Raft;

/// Raft timing. The defaults target a new leader within ~250 ms of a leader
/// dying on loopback (see the crate docs for the arithmetic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Leader heartbeat interval. openraft checks election timers every
    /// `1.5 * heartbeat_ms`.
    pub heartbeat_ms: u64,
    /// Lower bound of the randomized election timeout.
    pub election_min_ms: u64,
    /// Upper bound of the randomized election timeout; also openraft's leader
    /// lease: a voter that heard from a leader within this long refuses to
    /// vote for anyone else.
    pub election_max_ms: u64,
    /// Timeout for connecting to a peer.
    pub connect_timeout_ms: u64,
    /// How long a client write (or a linearizable read) may wait to commit.
    pub write_timeout_ms: u64,
    /// Timeout for one snapshot chunk to be sent and installed.
    pub install_snapshot_timeout_ms: u64,
    /// Wait before reconnecting to an unreachable peer.
    pub backoff_ms: u64,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            heartbeat_ms: 20,
            election_min_ms: 60,
            election_max_ms: 100,
            connect_timeout_ms: 100,
            write_timeout_ms: 2_000,
            install_snapshot_timeout_ms: 2_000,
            backoff_ms: 100,
        }
    }
}

/// How to start one server.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This server's node id: `1 ..` [`AGENT_ID_FIRST`].
    pub id: NodeId,
    /// Where the redb database lives (created if missing).
    pub data_dir: PathBuf,
    /// The address to listen on for peers. Port 0 picks a free port; the
    /// bound address is [`ConsensusNode::raft_addr`], and it is what peers
    /// must be told.
    pub raft_addr: SocketAddr,
    /// The initial voters (id → `ip:port`), used by
    /// [`ConsensusNode::initialize`]. Empty means "just this node".
    pub peers: BTreeMap<NodeId, String>,
    /// The cluster secret; when set every peer frame carries an
    /// authentication tag and frames without a valid one are dropped.
    pub secret: Option<Vec<u8>>,
    /// Raft timing.
    pub timing: Timing,
    /// Build a snapshot once this many entries were applied since the last.
    pub snapshot_logs: u64,
    /// How many entries before the snapshot to keep when purging the log.
    pub logs_to_keep: u64,
    /// Largest snapshot chunk sent in one frame.
    pub snapshot_chunk_bytes: u64,
}

impl NodeConfig {
    /// A config with default timing and snapshot settings.
    pub fn new(id: NodeId, data_dir: impl Into<PathBuf>, raft_addr: SocketAddr) -> NodeConfig {
        NodeConfig {
            id,
            data_dir: data_dir.into(),
            raft_addr,
            peers: BTreeMap::new(),
            secret: None,
            timing: Timing::default(),
            snapshot_logs: 10_000,
            logs_to_keep: 1_000,
            snapshot_chunk_bytes: 1 << 20,
        }
    }

    fn raft_config(&self) -> Result<openraft::Config> {
        let t = &self.timing;
        for (field, v) in [
            ("heartbeat_ms", t.heartbeat_ms),
            ("connect_timeout_ms", t.connect_timeout_ms),
            ("write_timeout_ms", t.write_timeout_ms),
            ("install_snapshot_timeout_ms", t.install_snapshot_timeout_ms),
            ("backoff_ms", t.backoff_ms),
            ("snapshot_logs", self.snapshot_logs),
            ("snapshot_chunk_bytes", self.snapshot_chunk_bytes),
        ] {
            if v == 0 {
                return Err(Error::Config(format!("{field} must be at least 1")));
            }
        }
        if self.snapshot_chunk_bytes > (crate::frame::FRAME_PAYLOAD_BYTES_MAX / 2) as u64 {
            return Err(Error::Config(format!(
                "snapshot_chunk_bytes {} exceeds half the frame limit",
                self.snapshot_chunk_bytes
            )));
        }
        let c = openraft::Config {
            cluster_name: "unid".into(),
            heartbeat_interval: t.heartbeat_ms,
            election_timeout_min: t.election_min_ms,
            election_timeout_max: t.election_max_ms,
            install_snapshot_timeout: t.install_snapshot_timeout_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_logs),
            max_in_snapshot_log_to_keep: self.logs_to_keep,
            snapshot_max_chunk_size: self.snapshot_chunk_bytes,
            ..openraft::Config::default()
        };
        c.validate().map_err(|e| Error::Config(e.to_string()))
    }
}

/// The role of a node, from openraft's server state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Leads the cluster.
    Leader,
    /// Follows a leader.
    Follower,
    /// Standing for election.
    Candidate,
    /// Receives the log but does not vote.
    Learner,
    /// Stopped.
    Shutdown,
}

/// Who leads, as seen by one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaderInfo {
    /// The leader's id, if known.
    pub leader: Option<NodeId>,
    /// The current term (the leader's epoch).
    pub term: u64,
    /// Whether this node is in the cluster's membership (voter or learner).
    /// `false` after it was removed: a removed server must stop serving.
    pub member: bool,
}

/// A summary of one node's Raft metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeMetrics {
    /// This node.
    pub id: NodeId,
    /// The leader, if known.
    pub leader: Option<NodeId>,
    /// The current term.
    pub term: u64,
    /// This node's role.
    pub role: Role,
    /// Index of the last log entry.
    pub last_log_index: Option<u64>,
    /// Index of the last applied entry.
    pub last_applied_index: Option<u64>,
    /// Index covered by the last snapshot.
    pub snapshot_index: Option<u64>,
    /// Index up to which the log was purged.
    pub purged_index: Option<u64>,
    /// The voters.
    pub voters: BTreeSet<NodeId>,
    /// The learners.
    pub learners: BTreeSet<NodeId>,
}

/// A running Raft server.
pub struct ConsensusNode {
    id: NodeId,
    raft: Raft,
    sm: StateMachineStore,
    addr: SocketAddr,
    net: NetConfig,
    timing: Timing,
    peers: BTreeMap<NodeId, String>,
    leader_rx: watch::Receiver<LeaderInfo>,
    server_task: JoinHandle<()>,
    watch_task: JoinHandle<()>,
    /// Whether the TCP peer listener runs (forwarding, handoff, removal
    /// notices); `false` with [`ConsensusNode::start_with_network`].
    peer_extras: bool,
}

impl std::fmt::Debug for ConsensusNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsensusNode")
            .field("id", &self.id)
            .field("addr", &self.addr)
            .finish()
    }
}

/// How long `start` retries opening a database still held by a node of the
/// same process that is shutting down.
const OPEN_RETRY: Duration = Duration::from_secs(5);

impl ConsensusNode {
    /// Opens the node's storage, binds its peer listener and starts Raft.
    /// Does not form a cluster: call [`initialize`](Self::initialize) once on
    /// one node of a new cluster, or add this node from the leader.
    pub async fn start(config: NodeConfig) -> Result<ConsensusNode> {
        if config.id == 0 || config.id >= AGENT_ID_FIRST {
            return Err(Error::Config(format!(
                "server id {} not in 1..{AGENT_ID_FIRST}",
                config.id
            )));
        }
        let raft_config = Arc::new(config.raft_config()?);
        let open_deadline = Instant::now() + OPEN_RETRY;
        let (log, sm) = loop {
            match store::open(&config.data_dir) {
                Ok(s) => break s,
                Err(e)
                    if Instant::now() < open_deadline && e.to_string().contains("already open") =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let listener = TcpListener::bind(config.raft_addr)
            .await
            .map_err(|source| Error::Io {
                addr: config.raft_addr.to_string(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Io {
            addr: config.raft_addr.to_string(),
            source,
        })?;
        let net = net_config(&config);
        let factory = NetworkFactory::new(net.clone());
        Self::start_inner(
            config,
            raft_config,
            log,
            sm,
            factory,
            Some(listener),
            addr,
            net,
        )
        .await
    }

    /// Starts Raft on storage and a network the caller provides, with no TCP
    /// peer listener: for a deterministic simulation (an in-memory
    /// [`openraft::network::RaftNetworkFactory`], a store opened with
    /// [`store::open_with_backend`] on a simulated disk). `config.data_dir`
    /// is not used; `config.raft_addr` is reported as
    /// [`raft_addr`](Self::raft_addr) but nothing is bound.
    ///
    /// Without the peer listener there are no peer extras: [`write`](Self::write)
    /// on a follower answers [`Error::NotLeader`] instead of forwarding, and
    /// the leader handoff and removal notice are not sent. The Raft RPCs, the
    /// state machine, [`ready_state`](Self::ready_state) and the leader watch
    /// are the same code as with [`start`](Self::start).
    pub async fn start_with_network<N>(
        config: NodeConfig,
        log: store::LogStore,
        sm: StateMachineStore,
        network: N,
    ) -> Result<ConsensusNode>
    where
        N: openraft::network::RaftNetworkFactory<crate::types::TypeConfig>,
    {
        if config.id == 0 || config.id >= AGENT_ID_FIRST {
            return Err(Error::Config(format!(
                "server id {} not in 1..{AGENT_ID_FIRST}",
                config.id
            )));
        }
        let raft_config = Arc::new(config.raft_config()?);
        let net = net_config(&config);
        let addr = config.raft_addr;
        Self::start_inner(config, raft_config, log, sm, network, None, addr, net).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn start_inner<N>(
        config: NodeConfig,
        raft_config: Arc<openraft::Config>,
        log: store::LogStore,
        sm: StateMachineStore,
        network: N,
        listener: Option<TcpListener>,
        addr: SocketAddr,
        net: NetConfig,
    ) -> Result<ConsensusNode>
    where
        N: openraft::network::RaftNetworkFactory<crate::types::TypeConfig>,
    {
        let t = config.timing;
        let raft = Raft::new(config.id, raft_config, network, log, sm.clone())
            .await
            .map_err(|e| Error::Stopped(e.to_string()))?;
        let removed = Arc::new(AtomicBool::new(false));
        let (leader_tx, leader_rx) = watch::channel(LeaderInfo {
            leader: None,
            term: 0,
            member: false,
        });
        let leader_tx = Arc::new(leader_tx);
        let handler = NodeHandler {
            id: config.id,
            raft: raft.clone(),
            timing: t,
            removed: removed.clone(),
            leader_tx: leader_tx.clone(),
        };
        let peer_extras = listener.is_some();
        let server_task = match listener {
            Some(listener) => network::serve(listener, raft.clone(), net.clone(), handler),
            None => tokio::spawn(async {}),
        };
        let watch_task = tokio::spawn(watch_leader(config.id, raft.metrics(), leader_tx, removed));
        Ok(ConsensusNode {
            id: config.id,
            raft,
            sm,
            addr,
            net,
            timing: t,
            peers: config.peers,
            leader_rx,
            server_task,
            watch_task,
            peer_extras,
        })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The address this node's peer listener is bound to.
    pub fn raft_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The underlying openraft handle, for what this API does not cover.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Bootstraps a new cluster with `NodeConfig::peers` as voters (or just
    /// this node if empty). Call it on one node, once, ever.
    ///
    /// Errors with [`Error::AlreadyInitialized`] if this node already has
    /// any log or vote (it is or was part of a cluster): re-running `--init`
    /// never re-forms a cluster.
    pub async fn initialize(&self) -> Result<()> {
        let mut members = self.peers.clone();
        if members.is_empty() {
            members.insert(self.id, self.addr.to_string());
        }
        self.initialize_with(members).await
    }

    /// Like [`initialize`](Self::initialize) with explicit voters.
    pub async fn initialize_with(&self, members: BTreeMap<NodeId, String>) -> Result<()> {
        if self.raft.is_initialized().await.map_err(stopped)? {
            return Err(Error::AlreadyInitialized);
        }
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .into_iter()
            .map(|(id, addr)| (id, BasicNode::new(addr)))
            .collect();
        match self.raft.initialize(nodes).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                Err(Error::AlreadyInitialized)
            }
            Err(RaftError::APIError(e)) => Err(Error::Config(e.to_string())),
            Err(RaftError::Fatal(f)) => Err(Error::Stopped(f.to_string())),
        }
    }

    fn membership_timeout(&self) -> Duration {
        Duration::from_millis(self.timing.write_timeout_ms.saturating_mul(5))
    }

    /// Adds a server as a learner and waits until it has caught up with the
    /// log (or a snapshot). Leader only.
    pub async fn add_learner(&self, id: NodeId, addr: &str) -> Result<()> {
        if id == 0 || id >= AGENT_ID_FIRST {
            return Err(Error::Config(format!(
                "server id {id} not in 1..{AGENT_ID_FIRST}"
            )));
        }
        let fut = self.raft.add_learner(id, BasicNode::new(addr), true);
        let d = self.membership_timeout();
        match tokio::time::timeout(d, fut).await {
            Err(_) => Err(Error::Timeout(d)),
            Ok(r) => r.map(|_| ()).map_err(write_error),
        }
    }

    /// Makes `voters` the set of voting servers (joint consensus underneath).
    /// Every new voter must be a learner already. Servers that are dropped
    /// are removed entirely (not kept as learners). Leader only.
    pub async fn change_membership(&self, voters: BTreeSet<NodeId>) -> Result<()> {
        let fut = self
            .raft
            .change_membership(ChangeMembers::ReplaceAllVoters(voters), false);
        let d = self.membership_timeout();
        match tokio::time::timeout(d, fut).await {
            Err(_) => Err(Error::Timeout(d)),
            Ok(r) => r.map(|_| ()).map_err(write_error),
        }
    }

    /// Adds a server as a voter: learner, catch up, promote, and record it in
    /// the node table. Leader only.
    pub async fn add_server(&self, id: NodeId, addr: &str) -> Result<()> {
        self.add_learner(id, addr).await?;
        let mut voters = self.metrics().voters;
        voters.insert(id);
        self.change_membership(voters).await?;
        self.write(Command::UpsertServer {
            id,
            addr: addr.to_owned(),
        })
        .await?;
        Ok(())
    }

    /// Removes a server from the voters and the node table. The removed
    /// server sees [`LeaderInfo::member`] turn `false` once it learns of it,
    /// and must stop serving. Leader only.
    pub async fn remove_server(&self, id: NodeId) -> Result<()> {
        let addr = {
            let m = self.raft.metrics();
            let m = m.borrow();
            m.membership_config
                .membership()
                .get_node(&id)
                .map(|n| n.addr.clone())
        };
        let mut voters = self.metrics().voters;
        voters.remove(&id);
        self.change_membership(voters).await?;
        self.write(Command::RemoveNode { id }).await?;
        // The removed server stops receiving the log before it sees the
        // entry that removes it; tell it directly (best effort: if it is down
        // now it finds out from the operator, or stays harmless — its vote
        // requests lose to every up-to-date log).
        if let Some(addr) = addr.filter(|_| self.peer_extras) {
            let mut c = PeerClient::new(self.net.clone(), id, addr);
            let d = Duration::from_millis(self.timing.connect_timeout_ms * 2);
            if let Err(e) = c.call(RpcRequest::Removed { from: self.id }, d).await {
                tracing::warn!(
                    node = self.id,
                    removed = id,
                    "removal notice not delivered: {e:?}"
                );
            }
        }
        Ok(())
    }

    /// Replicates one command and returns the state machine's answer once it
    /// is committed and applied. On a follower the command is forwarded to
    /// the leader (one hop). Fails with [`Error::Timeout`] if it does not
    /// commit within `Timing::write_timeout_ms` (e.g. no quorum).
    ///
    /// An error does not prove the command was not applied (it may commit
    /// after the timeout, or the answer may be lost). `RaiseCeiling` is safe
    /// to repeat (max semantics); a repeated `CreateSequence` answers
    /// `SequenceExists`; a repeated `RegisterAgent` wastes an id.
    pub async fn write(&self, cmd: Command) -> Result<Response> {
        let d = Duration::from_millis(self.timing.write_timeout_ms);
        match write_local(&self.raft, cmd.clone(), d).await {
            Err(Error::NotLeader {
                leader: Some((leader, addr)),
            }) if self.peer_extras => self.forward(leader, addr, cmd, d).await,
            other => other,
        }
    }

    async fn forward(
        &self,
        leader: NodeId,
        addr: String,
        cmd: Command,
        d: Duration,
    ) -> Result<Response> {
        let mut client = PeerClient::new(self.net.clone(), leader, addr.clone());
        match client.call(RpcRequest::Write(cmd), d).await {
            Ok(RpcResponse::Write(Ok(r))) => Ok(r),
            Ok(RpcResponse::Write(Err(WriteFailure::NotLeader { leader }))) => {
                Err(Error::NotLeader { leader })
            }
            Ok(RpcResponse::Write(Err(WriteFailure::Timeout))) => Err(Error::Timeout(d)),
            Ok(RpcResponse::Write(Err(WriteFailure::Other(m)))) => {
                Err(Error::Forward { leader, reason: m })
            }
            Ok(other) => Err(Error::Forward {
                leader,
                reason: format!("unexpected answer {other:?}"),
            }),
            Err(CallError::Unreachable(e)) => Err(Error::Forward {
                leader,
                reason: format!("{addr} unreachable: {e}"),
            }),
            Err(CallError::Network(m)) => Err(Error::Forward { leader, reason: m }),
        }
    }

    /// Creates a sequence; returns its initial ceiling (= `start`).
    pub async fn create_sequence(
        &self,
        name: &SequenceName,
        width: Width,
        start: Id,
    ) -> Result<Id> {
        match self
            .write(Command::CreateSequence {
                name: name.as_str().to_owned(),
                width: width.bytes(),
                start,
            })
            .await?
        {
            Response::Created { ceiling } => Ok(ceiling),
            other => Err(unexpected(other)),
        }
    }

    /// Raises a sequence's ceiling to at least `ceiling` and returns the
    /// committed ceiling, which is `>= ceiling` (max semantics). Once this
    /// returns, every future leader sees a ceiling at least this high.
    ///
    /// **Not for a granting leader.** Like every [`ConsensusNode::write`],
    /// this forwards to the current leader when this node is not (or no
    /// longer) leader, so a success does not prove the ceiling was committed
    /// in *this* node's term. A leader that grants ids under the ceiling it
    /// raised must commit the raise on its own node only (the engine uses
    /// `raft().client_write`, which fails with `ForwardToLeader` once the node
    /// is deposed): a deposed leader that accepted a ceiling committed under
    /// a newer leader's term could grant ids that leader grants too. This
    /// method is for tools and tests.
    pub async fn raise_ceiling(&self, name: &SequenceName, ceiling: Id) -> Result<Id> {
        match self
            .write(Command::RaiseCeiling {
                name: name.as_str().to_owned(),
                ceiling,
            })
            .await?
        {
            Response::Ceiling { ceiling } => Ok(ceiling),
            other => Err(unexpected(other)),
        }
    }

    /// Registers an agent and returns its fresh node id (never reused).
    pub async fn register_agent(
        &self,
        name: &str,
        incarnation: u64,
        addr: &str,
        port: u16,
        role: &str,
    ) -> Result<NodeId> {
        match self
            .write(Command::RegisterAgent {
                name: name.to_owned(),
                incarnation,
                addr: addr.to_owned(),
                port,
                role: role.to_owned(),
            })
            .await?
        {
            Response::Registered { id } => Ok(id),
            other => Err(unexpected(other)),
        }
    }

    /// Removes a node (e.g. an expired agent) from the node table; returns
    /// whether it was there.
    pub async fn remove_node(&self, id: NodeId) -> Result<bool> {
        match self.write(Command::RemoveNode { id }).await? {
            Response::Removed { existed } => Ok(existed),
            other => Err(unexpected(other)),
        }
    }

    /// Sets a cluster setting.
    pub async fn set_setting(&self, key: &str, value: u64) -> Result<()> {
        match self
            .write(Command::SetSetting {
                key: key.to_owned(),
                value,
            })
            .await?
        {
            Response::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The state this node has applied. Possibly stale (a follower lags; a
    /// deposed leader does not know it yet): never grant ids from it — use
    /// [`ready_ceilings`](Self::ready_ceilings).
    pub fn state(&self) -> AppliedState {
        self.sm.applied()
    }

    /// Reads the local applied state through `f` without copying it all
    /// (same caveats as [`state`](Self::state)).
    pub fn with_state<T>(&self, f: impl FnOnce(&AppliedState) -> T) -> T {
        self.sm.with_applied(f)
    }

    /// The applied state, read linearizably: confirms with a quorum that this
    /// node is still the leader, and waits until it has applied everything
    /// committed up to and including the first entry of its own term. See
    /// the crate docs for why ids granted below these ceilings are unique.
    /// Fails with [`Error::NotLeader`] on a follower.
    pub async fn ready_state(&self) -> Result<AppliedState> {
        let d = Duration::from_millis(self.timing.write_timeout_ms);
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let res = tokio::time::timeout_at(deadline, self.raft.ensure_linearizable()).await;
            match res {
                Err(_) => return Err(Error::Timeout(d)),
                Ok(Ok(_)) => return Ok(self.sm.applied()),
                Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                    return Err(Error::NotLeader {
                        leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
                    });
                }
                Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)))) => {
                    // openraft gives each confirming heartbeat one heartbeat
                    // interval; a slow peer fails it. Try again until the
                    // deadline: only a quorum's answer is good enough.
                    tracing::debug!(node = self.id, "leadership not confirmed yet: {q}");
                    tokio::time::sleep(Duration::from_millis(self.timing.heartbeat_ms)).await;
                }
                Ok(Err(RaftError::Fatal(f))) => return Err(Error::Stopped(f.to_string())),
            }
        }
    }

    /// Whether a quorum confirms, within `timeout`, that this node still leads: one round of
    /// heartbeats ([`openraft::Raft::ensure_linearizable`]). `false` on a follower, without a
    /// quorum, or after `timeout`. openraft 0.9 has no check-quorum: a leader cut off from its
    /// peers goes on believing it leads, so the engine asks this to notice.
    pub async fn confirm_leadership(&self, timeout: Duration) -> bool {
        matches!(
            tokio::time::timeout(timeout, self.raft.ensure_linearizable()).await,
            Ok(Ok(_))
        )
    }

    /// Every sequence with its committed ceiling, read as
    /// [`ready_state`](Self::ready_state) reads them: the only ceilings a
    /// leader may grant under.
    pub async fn ready_ceilings(&self) -> Result<BTreeMap<String, SequenceState>> {
        Ok(self.ready_state().await?.state.sequences)
    }

    /// A summary of this node's Raft metrics.
    pub fn metrics(&self) -> NodeMetrics {
        let m = self.raft.metrics().borrow().clone();
        let mem = m.membership_config.membership();
        NodeMetrics {
            id: self.id,
            leader: m.current_leader,
            term: m.current_term,
            role: match m.state {
                ServerState::Leader => Role::Leader,
                ServerState::Follower => Role::Follower,
                ServerState::Candidate => Role::Candidate,
                ServerState::Learner => Role::Learner,
                ServerState::Shutdown => Role::Shutdown,
            },
            last_log_index: m.last_log_index,
            last_applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            voters: mem.voter_ids().collect(),
            learners: mem.learner_ids().collect(),
        }
    }

    /// Whether this node currently believes it is the leader. A belief only:
    /// grant ids only under [`ready_ceilings`](Self::ready_ceilings).
    pub fn is_leader(&self) -> bool {
        self.leader_rx.borrow().leader == Some(self.id)
    }

    /// A watch of (leader, term, membership) that changes on every leader
    /// change, term change or removal of this node.
    pub fn leader_watch(&self) -> watch::Receiver<LeaderInfo> {
        self.leader_rx.clone()
    }

    /// Fault injection for tests: while `true`, this node sends no peer
    /// request and answers none (each is dropped with its connection), as if
    /// a network partition cut it off. Its Raft keeps running.
    pub fn set_isolated(&self, isolated: bool) {
        self.net.isolated.store(isolated, Ordering::Relaxed);
    }

    /// Fault injection for tests: while `true`, every write to this node's
    /// database fails, as with a failing disk. openraft stops the node at
    /// the first failed write; nothing unpersisted is acknowledged.
    pub fn set_storage_fault(&self, on: bool) {
        self.sm.inject_write_fault(on);
    }

    /// Whether Raft is still running (it stops for good on a storage error).
    pub fn is_running(&self) -> bool {
        self.raft.metrics().borrow().running_state.is_ok()
    }

    /// Frame counters of this node's peer connections.
    pub fn net_stats(&self) -> NetStatsSnapshot {
        self.net.stats.snapshot()
    }

    /// Stops the node. If it is the leader it first picks the most
    /// up-to-date voter and, after stopping, asks it to stand for election
    /// as soon as the other voters' leases allow (see the crate docs,
    /// "Leader handoff"). Closes the database once Raft has stopped.
    pub async fn shutdown(self) -> Result<()> {
        self.stop(true).await
    }

    /// Stops the node without a leader handoff: to its peers this looks like
    /// a crash (they elect a new leader when their election timers fire).
    /// The database is closed cleanly.
    pub async fn stop_without_handoff(self) -> Result<()> {
        self.stop(false).await
    }

    async fn stop(mut self, handoff: bool) -> Result<()> {
        let successor = if handoff && self.peer_extras {
            self.successor()
        } else {
            None
        };
        let res = self
            .raft
            .shutdown()
            .await
            .map_err(|e| Error::Stopped(e.to_string()));
        self.server_task.abort();
        self.watch_task.abort();
        let _ = (&mut self.server_task).await;
        let _ = (&mut self.watch_task).await;
        if let Some((id, addr)) = successor {
            let mut c = PeerClient::new(self.net.clone(), id, addr);
            let d = Duration::from_millis(
                self.timing.connect_timeout_ms.max(self.timing.heartbeat_ms) * 2,
            );
            match c.call(RpcRequest::Elect { from: self.id }, d).await {
                Ok(RpcResponse::Elect(true)) => {
                    tracing::info!(node = self.id, successor = id, "handed leadership off");
                }
                other => {
                    tracing::warn!(node = self.id, successor = id, "handoff refused: {other:?}")
                }
            }
        }
        res
    }

    /// The server [`shutdown`](Self::shutdown) would hand leadership to if
    /// called now: on the leader, the voter with the highest matched log id;
    /// `None` on a follower or a single-voter cluster. Lets the engine tell
    /// agents where to go before it stops.
    pub fn handoff_successor(&self) -> Option<NodeId> {
        self.successor().map(|(id, _)| id)
    }

    /// The voter (other than this leader) with the highest matched log id.
    fn successor(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader != Some(self.id) {
            return None;
        }
        let mem = m.membership_config.membership();
        let repl = m.replication.as_ref()?;
        let best = mem
            .voter_ids()
            .filter(|id| *id != self.id)
            .max_by_key(|id| repl.get(id).cloned().flatten())?;
        let node = mem.get_node(&best)?;
        Some((best, node.addr.clone()))
    }
}

impl Drop for ConsensusNode {
    /// A node dropped without [`shutdown`](ConsensusNode::shutdown) stops
    /// too (no handoff): its peer server and watcher are aborted at once and
    /// Raft is told to stop on the current tokio runtime, if there is one.
    /// The database closes when Raft's tasks have ended.
    fn drop(&mut self) {
        self.server_task.abort();
        self.watch_task.abort();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let raft = self.raft.clone();
            rt.spawn(async move {
                let _ = raft.shutdown().await;
            });
        }
    }
}

fn net_config(config: &NodeConfig) -> NetConfig {
    let t = config.timing;
    NetConfig {
        id: config.id,
        key: config.secret.as_deref().map(AuthKey::from_secret),
        stats: Arc::new(NetStats::default()),
        connect_timeout: Duration::from_millis(t.connect_timeout_ms),
        backoff: Duration::from_millis(t.backoff_ms),
        pool: Arc::new(network::ConnPool::default()),
        isolated: Arc::new(AtomicBool::new(false)),
        health: Arc::new(network::PeerHealth::default()),
    }
}

fn stopped(f: openraft::error::Fatal<u64>) -> Error {
    Error::Stopped(f.to_string())
}

fn unexpected(r: Response) -> Error {
    match r {
        Response::Rejected(rej) => Error::Rejected(rej),
        other => Error::Raft(format!("unexpected state machine answer {other:?}")),
    }
}

fn write_error(e: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> Error {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Error::NotLeader {
            leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            Error::Raft(c.to_string())
        }
        RaftError::Fatal(f) => Error::Stopped(f.to_string()),
    }
}

async fn write_local(raft: &Raft, cmd: Command, d: Duration) -> Result<Response> {
    match tokio::time::timeout(d, raft.client_write(cmd)).await {
        Err(_) => Err(Error::Timeout(d)),
        Ok(Ok(r)) => Ok(r.data),
        Ok(Err(e)) => Err(write_error(e)),
    }
}

fn publish(tx: &watch::Sender<LeaderInfo>, info: LeaderInfo) {
    tx.send_if_modified(|cur| {
        let changed = *cur != info;
        *cur = info;
        changed
    });
}

async fn watch_leader(
    id: NodeId,
    mut metrics: watch::Receiver<openraft::RaftMetrics<u64, BasicNode>>,
    tx: Arc<watch::Sender<LeaderInfo>>,
    removed: Arc<AtomicBool>,
) {
    loop {
        let info = {
            let m = metrics.borrow_and_update();
            let mem = m.membership_config.membership();
            LeaderInfo {
                leader: m.current_leader,
                term: m.current_term,
                member: mem.get_node(&id).is_some() && !removed.load(Ordering::Acquire),
            }
        };
        publish(&tx, info);
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Answers the non-Raft peer requests.
#[derive(Clone)]
struct NodeHandler {
    id: NodeId,
    raft: Raft,
    timing: Timing,
    removed: Arc<AtomicBool>,
    leader_tx: Arc<watch::Sender<LeaderInfo>>,
}

impl Handler for NodeHandler {
    fn elect(&self, from: NodeId) -> bool {
        let is_voter = {
            let m = self.raft.metrics();
            let m = m.borrow();
            m.membership_config
                .membership()
                .voter_ids()
                .any(|v| v == self.id)
        };
        if !is_voter {
            return false;
        }
        // The other voters heard from `from` at most a moment ago, and each
        // refuses any vote until its lease (election_max_ms) has run out.
        // Stand for election just after that, before any randomized timer.
        let wait =
            Duration::from_millis(self.timing.election_max_ms + self.timing.heartbeat_ms / 2);
        let raft = self.raft.clone();
        let me = self.id;
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let leader = raft.metrics().borrow().current_leader;
            if leader.is_none() || leader == Some(from) {
                tracing::info!(node = me, from, "leader handoff: standing for election");
                let _ = raft.trigger().elect().await;
            }
        });
        true
    }

    fn removed(&self, from: NodeId) -> bool {
        let leader = self.raft.metrics().borrow().current_leader;
        if leader != Some(from) {
            tracing::warn!(
                node = self.id,
                from,
                ?leader,
                "removal notice from a non-leader ignored"
            );
            return false;
        }
        tracing::info!(
            node = self.id,
            from,
            "removed from the cluster: no more elections"
        );
        self.removed.store(true, Ordering::Release);
        // Never stand for election again: this server is out.
        self.raft.runtime_config().elect(false);
        let mut info = *self.leader_tx.borrow();
        info.member = false;
        publish(&self.leader_tx, info);
        true
    }

    async fn write(&self, cmd: Command) -> std::result::Result<Response, WriteFailure> {
        let d = Duration::from_millis(self.timing.write_timeout_ms);
        match write_local(&self.raft, cmd, d).await {
            Ok(r) => Ok(r),
            Err(Error::NotLeader { leader }) => Err(WriteFailure::NotLeader { leader }),
            Err(Error::Timeout(_)) => Err(WriteFailure::Timeout),
            Err(e) => Err(WriteFailure::Other(e.to_string())),
        }
    }
}
