//! The simulated network: Raft RPCs between servers (an openraft
//! [`RaftNetworkFactory`] that calls the target's real [`Raft`] handle) and
//! datagrams between agents and servers, both through one seeded fault
//! model.
//!
//! Every message gets a delay drawn from `delay_us_min ..= delay_us_max`
//! (different delays reorder messages), may be dropped (requests and
//! responses separately), may be duplicated (the copy arrives later, so it
//! is also reordered), and is lost if a partition separates its ends or
//! its destination is down. Partitions assign every endpoint a group; only
//! endpoints of one group can talk. A crashed server sends nothing more,
//! though messages already in flight still arrive, as on a real network.
//!
//! A dropped RPC fails after its time-to-live (openraft's `hard_ttl`), as a
//! lost TCP request would time out; an RPC to a server that is down or cut
//! off fails at once with `Unreachable` (a refused connection).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
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
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use unid_consensus::types::{Raft, TypeConfig};
use unid_proto::NodeId;

/// An end of the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Endpoint {
    /// A server, by node id.
    Server(NodeId),
    /// An agent, by index.
    Agent(usize),
    /// The operator's `unid cluster` commands (membership changes).
    Operator,
}

/// A server's address for agents.
pub fn server_addr(id: NodeId) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, id as u8)), 7400)
}

/// The Raft port of a simulated server (its address is `10.0.0.<id>`).
pub const RAFT_PORT: u16 = 7500;

/// A server's Raft address: what its `NodeConfig` and an `add-server` name.
pub fn raft_addr(id: NodeId) -> SocketAddr {
    SocketAddr::new(server_addr(id).ip(), RAFT_PORT)
}

/// An agent's address.
pub fn agent_addr(index: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 1, index as u8)), 7411)
}

/// The port of an agent's pair link (heartbeats with its backup or primary agent).
pub const PAIR_PORT: u16 = 7412;

/// Where agent `index` receives its pair's heartbeats: its host's address, [`PAIR_PORT`].
pub fn pair_addr(index: usize) -> SocketAddr {
    SocketAddr::new(agent_addr(index).ip(), PAIR_PORT)
}

/// The operator's address (where `unid cluster` runs).
pub fn operator_addr() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 2, 1)), 7600)
}

/// The endpoint at `addr`, if it is a simulated one.
pub fn endpoint_of(addr: SocketAddr) -> Option<Endpoint> {
    match addr.ip() {
        IpAddr::V4(ip) if ip.octets()[..3] == [10, 0, 0] => {
            Some(Endpoint::Server(NodeId::from(ip.octets()[3])))
        }
        IpAddr::V4(ip) if ip.octets()[..3] == [10, 0, 1] => {
            Some(Endpoint::Agent(usize::from(ip.octets()[3])))
        }
        IpAddr::V4(ip) if ip.octets() == [10, 0, 2, 1] => Some(Endpoint::Operator),
        _ => None,
    }
}

/// One datagram: real encoded bytes (header, FlatBuffers payload, CRC32 and the cluster
/// MAC), as the engine's sockets carry them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    /// Source address.
    pub from: SocketAddr,
    /// Destination address.
    pub to: SocketAddr,
    /// The encoded datagram.
    pub bytes: Vec<u8>,
}

/// The cluster secret of every simulated run: every datagram carries its MAC.
pub const SECRET: &[u8] = b"unid simulated cluster secret";

/// The cluster key from [`SECRET`].
pub fn key() -> unid_proto::AuthKey {
    unid_proto::AuthKey::from_secret(SECRET)
}

/// The fault rates in force.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Faults {
    /// Probability that a message is dropped.
    pub drop: f64,
    /// Probability that a message is duplicated.
    pub duplicate: f64,
    /// Probability that one bit of a datagram is flipped (the CRC and MAC must catch it).
    pub corrupt: f64,
    /// Smallest delay, in microseconds.
    pub delay_us_min: u64,
    /// Largest delay, in microseconds.
    pub delay_us_max: u64,
}

impl Faults {
    /// A healthy network: no loss, small delays (they still reorder).
    pub const CALM: Faults = Faults {
        drop: 0.0,
        duplicate: 0.0,
        corrupt: 0.0,
        delay_us_min: 100,
        delay_us_max: 2_000,
    };
}

/// Network counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Messages sent (RPC requests, responses, datagrams).
    pub sent: u64,
    /// Dropped by the fault model.
    pub dropped: u64,
    /// Duplicated.
    pub duplicated: u64,
    /// Lost to a partition or a server that is down.
    pub cut: u64,
    /// Datagrams with a bit flipped.
    pub corrupted: u64,
}

struct Hub {
    rng: SmallRng,
    faults: Faults,
    groups: BTreeMap<Endpoint, u32>,
    /// Running servers: id → (incarnation, Raft).
    rafts: BTreeMap<NodeId, (u64, Raft)>,
    /// Running endpoints' datagram inboxes: address → (incarnation, sender).
    inboxes: BTreeMap<SocketAddr, (u64, mpsc::UnboundedSender<Datagram>)>,
    /// Current incarnation of every endpoint that is up.
    up: BTreeMap<Endpoint, u64>,
    stats: NetStats,
}

impl Hub {
    /// The partition group of `e` (all start in group 0).
    fn group(&self, e: Endpoint) -> u32 {
        self.groups.get(&e).copied().unwrap_or(0)
    }
}

/// The simulated network, shared by every task of a run.
#[derive(Clone)]
pub struct Net {
    hub: Arc<Mutex<Hub>>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Net")
    }
}

/// What happens to one message.
#[derive(Clone, Copy, Debug)]
struct Fate {
    /// Partitioned, or the destination is down.
    cut: bool,
    drop: bool,
    delay: Duration,
    /// A copy arrives after this extra delay.
    duplicate: Option<Duration>,
}

impl Net {
    /// A network with no endpoints, drawing its faults from `seed`.
    pub fn new(seed: u64) -> Net {
        Net {
            hub: Arc::new(Mutex::new(Hub {
                rng: SmallRng::seed_from_u64(seed ^ 0x6e65_7477_6f72_6b00),
                faults: Faults::CALM,
                groups: BTreeMap::new(),
                rafts: BTreeMap::new(),
                inboxes: BTreeMap::new(),
                up: BTreeMap::new(),
                stats: NetStats::default(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Hub> {
        self.hub.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the fault rates.
    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// Puts `endpoint` in partition group `group` (all start in group 0).
    pub fn set_group(&self, endpoint: Endpoint, group: u32) {
        self.lock().groups.insert(endpoint, group);
    }

    /// Heals every partition.
    pub fn heal(&self) {
        self.lock().groups.clear();
    }

    /// The counters.
    pub fn stats(&self) -> NetStats {
        self.lock().stats
    }

    /// Brings a server up: its Raft answers RPCs and its inbox gets
    /// datagrams, for incarnation `incarnation`.
    pub fn server_up(
        &self,
        id: NodeId,
        incarnation: u64,
        raft: Raft,
        inbox: mpsc::UnboundedSender<Datagram>,
    ) {
        let mut h = self.lock();
        h.rafts.insert(id, (incarnation, raft));
        h.inboxes.insert(server_addr(id), (incarnation, inbox));
        h.up.insert(Endpoint::Server(id), incarnation);
    }

    /// Brings an agent up: its inbox gets the datagrams to its address and to its pair
    /// link ([`pair_addr`]: the agent tells them apart by `to`).
    pub fn agent_up(&self, index: usize, incarnation: u64, inbox: mpsc::UnboundedSender<Datagram>) {
        let mut h = self.lock();
        h.inboxes
            .insert(pair_addr(index), (incarnation, inbox.clone()));
        h.inboxes.insert(agent_addr(index), (incarnation, inbox));
        h.up.insert(Endpoint::Agent(index), incarnation);
    }

    /// Brings the operator up (incarnation `incarnation`: one per command).
    pub fn operator_up(&self, incarnation: u64, inbox: mpsc::UnboundedSender<Datagram>) {
        let mut h = self.lock();
        h.inboxes.insert(operator_addr(), (incarnation, inbox));
        h.up.insert(Endpoint::Operator, incarnation);
    }

    /// Whether `to` is up and on `from`'s side of every partition: what a TCP connection
    /// from `from` to `to` would find out.
    pub fn reachable(&self, from: Endpoint, to: Endpoint) -> bool {
        let h = self.lock();
        h.up.contains_key(&from) && h.up.contains_key(&to) && h.group(from) == h.group(to)
    }

    /// Whether a datagram from `from` to `to` would be refused: `to` is down and no
    /// partition hides it (the ICMP port unreachable a real send to a dead process gets,
    /// which a connected UDP socket reports as `ECONNREFUSED`).
    pub fn refused(&self, from: Endpoint, to: Endpoint) -> bool {
        let h = self.lock();
        !h.up.contains_key(&to) && h.group(from) == h.group(to)
    }

    /// Takes an endpoint down (a crash): it sends and receives nothing more.
    pub fn down(&self, endpoint: Endpoint) {
        let mut h = self.lock();
        h.up.remove(&endpoint);
        match endpoint {
            Endpoint::Server(id) => {
                h.rafts.remove(&id);
                h.inboxes.remove(&server_addr(id));
            }
            Endpoint::Agent(i) => {
                h.inboxes.remove(&agent_addr(i));
                h.inboxes.remove(&pair_addr(i));
            }
            Endpoint::Operator => {
                h.inboxes.remove(&operator_addr());
            }
        }
    }

    /// Draws the fate of one message from `from` (incarnation `inc`) to `to`.
    fn fate(&self, from: Endpoint, inc: u64, to: Endpoint) -> Fate {
        let mut h = self.lock();
        h.stats.sent += 1;
        let f = h.faults;
        let cut = h.up.get(&from) != Some(&inc)
            || !h.up.contains_key(&to)
            || h.group(from) != h.group(to);
        let drop = f.drop > 0.0 && h.rng.random_bool(f.drop);
        let delay_us = h
            .rng
            .random_range(f.delay_us_min..=f.delay_us_max.max(f.delay_us_min));
        let duplicate = if f.duplicate > 0.0 && h.rng.random_bool(f.duplicate) {
            Some(
                h.rng
                    .random_range(f.delay_us_min..=f.delay_us_max.max(f.delay_us_min) * 4),
            )
        } else {
            None
        };
        if cut {
            h.stats.cut += 1;
        } else if drop {
            h.stats.dropped += 1;
        } else if duplicate.is_some() {
            h.stats.duplicated += 1;
        }
        Fate {
            cut,
            drop,
            delay: Duration::from_micros(delay_us),
            duplicate: duplicate.map(Duration::from_micros),
        }
    }

    fn raft(&self, id: NodeId) -> Option<Raft> {
        self.lock().rafts.get(&id).map(|(_, r)| r.clone())
    }

    /// Sends a datagram from `from` (incarnation `inc`); it arrives after
    /// its delay unless the fault model loses it.
    pub fn send(&self, from: Endpoint, inc: u64, mut d: Datagram) {
        let Some(to) = endpoint_of(d.to) else {
            return;
        };
        let fate = self.fate(from, inc, to);
        if !d.bytes.is_empty() {
            let mut h = self.lock();
            let p = h.faults.corrupt;
            if p > 0.0 && h.rng.random_bool(p) {
                let bit = h.rng.random_range(0..d.bytes.len() * 8);
                d.bytes[bit / 8] ^= 1 << (bit % 8);
                h.stats.corrupted += 1;
            }
        }
        if std::env::var_os("UNID_SIM_DEBUG_NET").is_some() {
            let what = match unid_proto::decode(&d.bytes, Some(&key())) {
                Ok(f) => format!(
                    "seq {} reply_to {} epoch {} {:?}",
                    f.header.seq, f.header.reply_to, f.header.epoch, f.message
                ),
                Err(e) => format!("undecodable ({e})"),
            };
            eprintln!(
                "{:?} datagram {} -> {} {what}: {}",
                tokio::time::Instant::now(),
                d.from,
                d.to,
                if fate.cut {
                    "cut"
                } else if fate.drop {
                    "dropped"
                } else {
                    "sent"
                }
            );
        }
        if fate.cut || fate.drop {
            return;
        }
        if let Some(extra) = fate.duplicate {
            self.deliver_after(fate.delay + extra, d.clone());
        }
        self.deliver_after(fate.delay, d);
    }

    fn deliver_after(&self, delay: Duration, d: Datagram) {
        let net = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let h = net.lock();
            // Checked again on arrival: the destination may have crashed, or
            // a partition may have started, while it was in flight.
            let same_side = endpoint_of(d.from)
                .zip(endpoint_of(d.to))
                .is_some_and(|(a, b)| h.group(a) == h.group(b));
            if let Some((_, tx)) = h.inboxes.get(&d.to)
                && same_side
            {
                let _ = tx.send(d);
            }
        });
    }

    /// The openraft network of server `id`, incarnation `incarnation`.
    pub fn raft_network(&self, id: NodeId, incarnation: u64) -> SimRaftNetwork {
        SimRaftNetwork {
            net: self.clone(),
            from: id,
            incarnation,
        }
    }

    /// One RPC from `from` to `target`: the request leg, the call on the
    /// target's Raft, the response leg, each with its own fate, all within
    /// `ttl`.
    async fn rpc<Req, Resp, E, F, Fut>(
        &self,
        from: NodeId,
        inc: u64,
        target: NodeId,
        req: Req,
        ttl: Duration,
        call: F,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        Req: Clone + Send + 'static,
        Resp: Send + 'static,
        E: std::error::Error + Send + 'static,
        F: Fn(Raft, Req) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = Result<Resp, RaftError<u64, E>>> + Send,
    {
        let (a, b) = (Endpoint::Server(from), Endpoint::Server(target));
        let go = self.fate(a, inc, b);
        if go.cut {
            tokio::time::sleep(go.delay).await;
            return Err(RPCError::Unreachable(Unreachable::new(&SimNetError(
                "unreachable (down or partitioned)",
            ))));
        }
        let net = self.clone();
        let attempt = async move {
            if let Some(extra) = go.duplicate {
                let (net, req, call) = (net.clone(), req.clone(), call.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(go.delay + extra).await;
                    if let Some(raft) = net.raft(target) {
                        let _ = call(raft, req).await;
                    }
                });
            }
            tokio::time::sleep(go.delay).await;
            if go.drop {
                std::future::pending::<()>().await;
            }
            let Some(raft) = net.raft(target) else {
                return Err(RPCError::Unreachable(Unreachable::new(&SimNetError(
                    "target went down",
                ))));
            };
            let resp = call(raft, req).await;
            // The answer goes back from the target's current incarnation.
            let back_inc = net.lock().up.get(&b).copied().unwrap_or(u64::MAX);
            let back = net.fate(b, back_inc, a);
            if back.cut || back.drop {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(back.delay).await;
            resp.map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))
        };
        match tokio::time::timeout(ttl, attempt).await {
            Ok(r) => r,
            Err(_) => Err(RPCError::Network(NetworkError::new(&SimNetError(
                "timed out (message lost)",
            )))),
        }
    }
}

/// A simulated network failure.
#[derive(Debug, thiserror::Error)]
#[error("simulated network: {0}")]
struct SimNetError(&'static str);

/// The openraft network factory of one server incarnation.
#[derive(Clone, Debug)]
pub struct SimRaftNetwork {
    net: Net,
    from: NodeId,
    incarnation: u64,
}

/// The client side of RPCs from one server to one target.
#[derive(Debug)]
pub struct SimRaftClient {
    net: Net,
    from: NodeId,
    incarnation: u64,
    target: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for SimRaftNetwork {
    type Network = SimRaftClient;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> SimRaftClient {
        SimRaftClient {
            net: self.net.clone(),
            from: self.from,
            incarnation: self.incarnation,
            target,
        }
    }
}

impl RaftNetwork<TypeConfig> for SimRaftClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.net
            .rpc(
                self.from,
                self.incarnation,
                self.target,
                rpc,
                option.hard_ttl(),
                |raft: Raft, r| async move { raft.append_entries(r).await },
            )
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.net
            .rpc(
                self.from,
                self.incarnation,
                self.target,
                rpc,
                option.hard_ttl(),
                |raft: Raft, r| async move { raft.install_snapshot(r).await },
            )
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        let debug = std::env::var_os("UNID_SIM_DEBUG_VOTES").is_some();
        let (from, target, req) = (self.from, self.target, rpc.clone());
        let r = self
            .net
            .rpc(
                self.from,
                self.incarnation,
                self.target,
                rpc,
                option.hard_ttl(),
                |raft: Raft, r| async move { raft.vote(r).await },
            )
            .await;
        if debug {
            eprintln!(
                "{:?} vote {from} -> {target}: {req:?} => {:?}",
                tokio::time::Instant::now(),
                r.as_ref().map_err(|e| e.to_string())
            );
        }
        r
    }

    fn backoff(&self) -> openraft::network::Backoff {
        // As the TCP network: a fixed wait before retrying an unreachable peer.
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(100)))
    }
}
