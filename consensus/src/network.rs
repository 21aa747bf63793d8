//! Raft RPCs over TCP: the client side ([`NetworkFactory`], one
//! [`PeerClient`] per target) and the server (`serve`) that dispatches to
//! the local [`Raft`].
//!
//! Each request and response is one [`crate::frame`] frame whose payload is a
//! postcard-encoded [`Envelope`] / [`RpcResponse`]. A client holds one
//! connection per target and sends one request at a time on it (openraft
//! calls a `RaftNetwork` sequentially); idle connections go back to a small
//! per-node [`ConnPool`]. Every connect and every request has a timeout; any
//! error closes the connection and the next call reconnects.
//!
//! The server checks that a request is addressed to its own node id, so an
//! address reused by another node is not mistaken for the old one.

use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use unid_proto::auth::AuthKey;
use unid_proto::types::NodeId;

use crate::frame::{self, FrameError, NetStats};
use crate::state::{Command, Response};
use crate::types::{Raft, TypeConfig};

/// The most peer connections one server accepts at once.
pub const CONNECTIONS_MAX: usize = 256;

/// A connection idle this long is closed by the server.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A request, addressed to one node.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// The node the sender means to reach.
    pub target: NodeId,
    /// The request.
    pub body: RpcRequest,
}

/// A request between servers.
#[derive(Debug, Serialize, Deserialize)]
pub enum RpcRequest {
    /// openraft AppendEntries.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// openraft RequestVote.
    Vote(VoteRequest<u64>),
    /// openraft InstallSnapshot (one chunk).
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// Leader handoff: the departing leader `from` asks the receiver to stand
    /// for election once the other voters' leader leases have expired.
    Elect {
        /// The departing leader.
        from: NodeId,
    },
    /// A client write forwarded by a follower to the leader.
    Write(Command),
    /// The leader `from` tells the receiver it was removed from the cluster
    /// (sent after the membership change committed; the removed server no
    /// longer receives the log, so it would not learn it otherwise).
    Removed {
        /// The leader that removed it.
        from: NodeId,
    },
}

/// Why a forwarded write failed, as carried on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteFailure {
    /// The receiver is not the leader either.
    NotLeader {
        /// The leader it knows of.
        leader: Option<(NodeId, String)>,
    },
    /// The write did not commit in time.
    Timeout,
    /// Any other failure, described.
    Other(String),
}

/// A response between servers.
#[derive(Debug, Serialize, Deserialize)]
pub enum RpcResponse {
    /// Answer to [`RpcRequest::AppendEntries`].
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    /// Answer to [`RpcRequest::Vote`].
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    /// Answer to [`RpcRequest::InstallSnapshot`].
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    /// Answer to [`RpcRequest::Elect`]: whether the receiver accepted.
    Elect(bool),
    /// Answer to [`RpcRequest::Write`].
    Write(Result<Response, WriteFailure>),
    /// Answer to [`RpcRequest::Removed`]: whether the receiver accepted it.
    Removed(bool),
    /// The request was addressed to another node id.
    WrongTarget {
        /// The receiver's real id.
        actual: NodeId,
    },
}

/// Shared settings of a node's network side.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// This node's id.
    pub id: NodeId,
    /// The cluster key, if a secret is configured.
    pub key: Option<AuthKey>,
    /// Frame counters.
    pub stats: Arc<NetStats>,
    /// Timeout for establishing a connection.
    pub connect_timeout: Duration,
    /// Backoff before retrying an unreachable peer.
    pub backoff: Duration,
    /// Idle connections for reuse.
    pub pool: Arc<ConnPool>,
    /// Fault injection: while set, this node neither sends nor answers any
    /// peer request, as if cut off by a network partition.
    pub isolated: Arc<std::sync::atomic::AtomicBool>,
    /// Which peers answer, for the log (see [`PeerHealth`]).
    pub health: Arc<PeerHealth>,
}

/// How often a peer that stays unreachable gets a summary line.
pub const PEER_SUMMARY_INTERVAL: Duration = Duration::from_secs(60);

/// Whether each peer answers this node's calls, so that a peer that goes away makes one
/// warning, one summary per [`PEER_SUMMARY_INTERVAL`] while it stays away, and one line when
/// it answers again, instead of a line per failed RPC (openraft logs every failed
/// replication; `unid server` keeps openraft's own warnings at debug by default).
#[derive(Debug, Default)]
pub struct PeerHealth {
    peers: std::sync::Mutex<std::collections::HashMap<NodeId, PeerState>>,
}

#[derive(Debug)]
struct PeerState {
    /// Since when calls to it fail (`None`: it answered last).
    down_since: Option<std::time::Instant>,
    /// Failed calls since it went down, and since the last summary.
    failures: u64,
    failures_since_summary: u64,
    summary_at: std::time::Instant,
}

impl PeerHealth {
    /// Records the outcome of one call to `target` at `addr` and logs a change.
    fn record(&self, target: NodeId, addr: &str, failure: Option<&CallError>) {
        let now = std::time::Instant::now();
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let p = peers.entry(target).or_insert(PeerState {
            down_since: None,
            failures: 0,
            failures_since_summary: 0,
            summary_at: now,
        });
        match (failure, p.down_since) {
            (None, None) => {}
            (None, Some(since)) => {
                tracing::info!(
                    peer = target,
                    addr,
                    down_s = since.elapsed().as_secs_f64().round(),
                    failed_calls = p.failures,
                    "raft peer answers again"
                );
                p.down_since = None;
                p.failures = 0;
            }
            (Some(e), None) => {
                tracing::warn!(peer = target, addr, error = %e, "raft peer unreachable (one line per minute while it stays away)");
                p.down_since = Some(now);
                p.failures = 1;
                p.failures_since_summary = 0;
                p.summary_at = now;
            }
            (Some(e), Some(since)) => {
                p.failures += 1;
                p.failures_since_summary += 1;
                if now.duration_since(p.summary_at) >= PEER_SUMMARY_INTERVAL {
                    tracing::warn!(
                        peer = target,
                        addr,
                        down_s = since.elapsed().as_secs_f64().round(),
                        failed_calls = p.failures_since_summary,
                        last_error = %e,
                        "raft peer still unreachable"
                    );
                    p.failures_since_summary = 0;
                    p.summary_at = now;
                }
            }
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(e) => write!(f, "connect: {e}"),
            CallError::Network(m) => f.write_str(m),
        }
    }
}

/// Why one call failed.
#[derive(Debug)]
pub(crate) enum CallError {
    /// Could not connect.
    Unreachable(std::io::Error),
    /// The connection failed, timed out, or the answer was malformed.
    Network(String),
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NetErr(String);

impl CallError {
    fn into_rpc<E: std::error::Error>(self) -> RPCError<u64, BasicNode, E> {
        match self {
            CallError::Unreachable(e) => RPCError::Unreachable(Unreachable::new(&e)),
            CallError::Network(m) => RPCError::Network(NetworkError::new(&NetErr(m))),
        }
    }
}

/// Builds a [`PeerClient`] per target; the openraft network factory.
#[derive(Clone, Debug)]
pub struct NetworkFactory {
    cfg: NetConfig,
}

impl NetworkFactory {
    /// A factory with these settings.
    pub fn new(cfg: NetConfig) -> NetworkFactory {
        NetworkFactory { cfg }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient {
        PeerClient::new(self.cfg.clone(), target, node.addr.clone())
    }
}

/// Idle connections kept per target for reuse.
pub const POOL_PER_TARGET_MAX: usize = 4;

/// Idle client connections, by target id, shared by a node's clients.
/// openraft makes a new client for every election and leadership check;
/// reusing connections keeps those calls to one round trip.
#[derive(Debug, Default)]
pub struct ConnPool {
    idle: std::sync::Mutex<std::collections::HashMap<NodeId, Vec<(String, TcpStream)>>>,
}

impl ConnPool {
    fn take(&self, target: NodeId, addr: &str) -> Option<TcpStream> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(&target)?;
        // Drop connections to an old address of this target.
        list.retain(|(a, _)| a == addr);
        list.pop().map(|(_, c)| c)
    }

    fn put(&self, target: NodeId, addr: String, conn: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(target).or_default();
        if list.len() < POOL_PER_TARGET_MAX {
            list.push((addr, conn));
        }
    }
}

/// A client connection to one peer.
#[derive(Debug)]
pub struct PeerClient {
    cfg: NetConfig,
    target: NodeId,
    addr: String,
    conn: Option<TcpStream>,
}

impl Drop for PeerClient {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            self.cfg.pool.put(self.target, self.addr.clone(), c);
        }
    }
}

impl PeerClient {
    /// A client for `target` at `addr`; connects lazily (or reuses an idle
    /// pooled connection).
    pub fn new(cfg: NetConfig, target: NodeId, addr: String) -> PeerClient {
        PeerClient {
            cfg,
            target,
            addr,
            conn: None,
        }
    }

    async fn connect(&self) -> Result<TcpStream, CallError> {
        let c = tokio::time::timeout(self.cfg.connect_timeout, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| {
                CallError::Unreachable(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect to {} timed out", self.addr),
                ))
            })?
            .map_err(CallError::Unreachable)?;
        let _ = c.set_nodelay(true);
        Ok(c)
    }

    /// Sends one request and waits at most `timeout` for the answer.
    ///
    /// Raft RPCs that fail on a reused connection (the peer may have closed
    /// it meanwhile) are retried once on a fresh one: Raft RPCs may be
    /// repeated safely. Forwarded writes are never retried here.
    pub(crate) async fn call(
        &mut self,
        body: RpcRequest,
        timeout: Duration,
    ) -> Result<RpcResponse, CallError> {
        let res = self.call_once(body, timeout).await;
        self.cfg
            .health
            .record(self.target, &self.addr, res.as_ref().err());
        res
    }

    async fn call_once(
        &mut self,
        body: RpcRequest,
        timeout: Duration,
    ) -> Result<RpcResponse, CallError> {
        if self.cfg.isolated.load(std::sync::atomic::Ordering::Relaxed) {
            self.conn = None;
            return Err(CallError::Unreachable(std::io::Error::new(
                std::io::ErrorKind::NetworkUnreachable,
                "isolated (fault injection)",
            )));
        }
        let retryable = !matches!(body, RpcRequest::Write(_));
        let env = Envelope {
            target: self.target,
            body,
        };
        let payload = postcard::to_stdvec(&env).map_err(|e| CallError::Network(e.to_string()))?;
        if payload.len() > frame::FRAME_PAYLOAD_BYTES_MAX {
            return Err(CallError::Network(format!(
                "request of {} bytes exceeds the frame limit",
                payload.len()
            )));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut reused = false;
        // A request that must not be repeated never rides a pooled
        // connection, which may have gone stale.
        if self.conn.is_none() && retryable {
            self.conn = self.cfg.pool.take(self.target, &self.addr);
            reused = self.conn.is_some();
        }
        loop {
            if self.conn.is_none() {
                self.conn = Some(self.connect().await?);
            }
            match self.exchange(&payload, deadline).await {
                Err(CallError::Network(_)) if reused && retryable => {
                    // Stale pooled connection: one retry on a fresh one.
                    reused = false;
                    continue;
                }
                other => return other,
            }
        }
    }

    async fn exchange(
        &mut self,
        payload: &[u8],
        deadline: tokio::time::Instant,
    ) -> Result<RpcResponse, CallError> {
        let Some(mut conn) = self.conn.take() else {
            return Err(CallError::Network("no connection".into()));
        };
        let key = self.cfg.key.as_ref();
        let stats = self.cfg.stats.clone();
        let res = tokio::time::timeout_at(deadline, async {
            frame::write_frame(&mut conn, payload, key).await?;
            frame::read_frame(&mut conn, key, &stats).await
        })
        .await;
        // On any failure below, `conn` is dropped (closed), never reused.
        let bytes = match res {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                return Err(CallError::Network(format!(
                    "{} ({}): {e}",
                    self.addr, self.target
                )));
            }
            Err(_) => {
                return Err(CallError::Network(format!(
                    "{} ({}): no answer in time",
                    self.addr, self.target
                )));
            }
        };
        match postcard::from_bytes::<RpcResponse>(&bytes) {
            Ok(RpcResponse::WrongTarget { actual }) => Err(CallError::Network(format!(
                "{} is node {actual}, not {}",
                self.addr, self.target
            ))),
            Ok(r) => {
                self.conn = Some(conn);
                Ok(r)
            }
            Err(e) => {
                self.cfg
                    .stats
                    .frames_undecodable
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Err(CallError::Network(format!("undecodable answer: {e}")))
            }
        }
    }
}

fn unexpected<E: std::error::Error>(r: &RpcResponse) -> RPCError<u64, BasicNode, E> {
    CallError::Network(format!("unexpected answer {r:?}")).into_rpc()
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self
            .call(RpcRequest::AppendEntries(rpc), option.hard_ttl())
            .await
            .map_err(CallError::into_rpc)?
        {
            RpcResponse::AppendEntries(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        match self
            .call(RpcRequest::InstallSnapshot(rpc), option.hard_ttl())
            .await
            .map_err(CallError::into_rpc)?
        {
            RpcResponse::InstallSnapshot(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self
            .call(RpcRequest::Vote(rpc), option.hard_ttl())
            .await
            .map_err(CallError::into_rpc)?
        {
            RpcResponse::Vote(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(unexpected(&other)),
        }
    }

    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(self.cfg.backoff))
    }
}

/// What the server does with requests that are not plain Raft RPCs.
pub(crate) trait Handler: Clone + Send + Sync + 'static {
    /// Handles a leader-handoff request.
    fn elect(&self, from: NodeId) -> bool;
    /// Handles a removal notice.
    fn removed(&self, from: NodeId) -> bool;
    /// Handles a forwarded write.
    fn write(
        &self,
        cmd: Command,
    ) -> impl std::future::Future<Output = Result<Response, WriteFailure>> + Send;
}

/// Accepts peer connections on `listener` and answers them from `raft` until
/// the returned task is aborted (aborting it closes every connection too).
pub(crate) fn serve<H: Handler>(
    listener: TcpListener,
    raft: Raft,
    cfg: NetConfig,
    handler: H,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(CONNECTIONS_MAX));
        let mut conns = JoinSet::new();
        loop {
            // Reap finished connection tasks so the set stays bounded.
            while conns.try_join_next().is_some() {}
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let raft = raft.clone();
            let cfg = cfg.clone();
            let handler = handler.clone();
            conns.spawn(async move {
                let _permit = permit;
                serve_conn(stream, raft, cfg, handler).await;
            });
        }
    })
}

async fn serve_conn<H: Handler>(mut stream: TcpStream, raft: Raft, cfg: NetConfig, handler: H) {
    let key = cfg.key.as_ref();
    loop {
        let payload = match tokio::time::timeout(
            IDLE_TIMEOUT,
            frame::read_frame(&mut stream, key, &cfg.stats),
        )
        .await
        {
            Ok(Ok(p)) => p,
            Ok(Err(FrameError::Closed)) | Err(_) => return,
            Ok(Err(e)) => {
                tracing::warn!(node = cfg.id, "dropping peer connection: {e}");
                return;
            }
        };
        let env: Envelope = match postcard::from_bytes(&payload) {
            Ok(env) => env,
            Err(e) => {
                cfg.stats
                    .frames_undecodable
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                cfg.stats
                    .connections_closed_bad
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(node = cfg.id, "undecodable peer request: {e}");
                return;
            }
        };
        if cfg.isolated.load(std::sync::atomic::Ordering::Relaxed) {
            // Partitioned: the request is lost, and so is the connection.
            return;
        }
        let resp = if env.target != cfg.id {
            RpcResponse::WrongTarget { actual: cfg.id }
        } else {
            match env.body {
                RpcRequest::AppendEntries(r) => {
                    RpcResponse::AppendEntries(raft.append_entries(r).await)
                }
                RpcRequest::Vote(r) => RpcResponse::Vote(raft.vote(r).await),
                RpcRequest::InstallSnapshot(r) => {
                    RpcResponse::InstallSnapshot(raft.install_snapshot(r).await)
                }
                RpcRequest::Elect { from } => RpcResponse::Elect(handler.elect(from)),
                RpcRequest::Write(cmd) => RpcResponse::Write(handler.write(cmd).await),
                RpcRequest::Removed { from } => RpcResponse::Removed(handler.removed(from)),
            }
        };
        let bytes = match postcard::to_stdvec(&resp) {
            Ok(b) if b.len() <= frame::FRAME_PAYLOAD_BYTES_MAX => b,
            _ => return,
        };
        if frame::write_frame(&mut stream, &bytes, key).await.is_err() {
            return;
        }
    }
}
