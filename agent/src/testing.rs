//! A fake server for tests: speaks the wire protocol on 127.0.0.1 and grants
//! blocks from a counter shared by every fake server of one [`FakeCluster`].
//! Knobs make it drop, duplicate, redirect, answer `NotReady`, forget
//! registrations, send `LeaderChange`, or die. It is not a real server: no
//! consensus, no persistence.
//!
//! ```
//! use unid_agent::testing::{FakeCluster, Mode};
//! let cluster = FakeCluster::new(8, &["orders"]);
//! let server = cluster.start_server(1).unwrap();
//! server.set_mode(Mode::NotReady);
//! assert_eq!(cluster.granted().len(), 0);
//! ```

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use unid_proto::{
    AuthKey, Block, Codec, DATAGRAM_BYTES_MAX, ErrorCode, Header, List, Message, NodeId, Server,
    Width, decode,
};

/// How a fake server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// As a leader: welcomes, grants, pongs.
    Leader,
    /// As a follower: `NotLeader` naming this address (or none).
    Follower(Option<SocketAddr>),
    /// `Error NotReady` to every block request (welcomes and pongs still).
    NotReady,
    /// Answers nothing (reads and drops every datagram).
    Silent,
    /// `Error NotRegistered` to everything but `Hello`.
    ForgetRegistrations,
}

#[derive(Debug)]
struct ClusterState {
    width: Width,
    sequences: Vec<String>,
    next_id: u128,
    next_node: NodeId,
    granted: Vec<(String, u128, u64)>,
    /// Block size cap: grants at most this many ids.
    grant_ids_max: u64,
    exhausted: bool,
}

/// The state shared by fake servers: the id counter, node ids, what was
/// granted.
#[derive(Clone, Debug)]
pub struct FakeCluster {
    state: Arc<Mutex<ClusterState>>,
    key: Option<AuthKey>,
}

impl FakeCluster {
    /// A cluster whose `sequences` all have `width` bytes and start at id 1.
    pub fn new(width: u8, sequences: &[&str]) -> FakeCluster {
        FakeCluster {
            state: Arc::new(Mutex::new(ClusterState {
                width: Width::from_bytes(width).expect("width is 2, 4, 8 or 16"),
                sequences: sequences.iter().map(|s| (*s).to_owned()).collect(),
                next_id: 1,
                next_node: 100,
                granted: Vec::new(),
                grant_ids_max: u64::MAX,
                exhausted: false,
            })),
            key: None,
        }
    }

    /// Every datagram is tagged and checked with this secret.
    pub fn with_secret(mut self, secret: &[u8]) -> FakeCluster {
        self.key = Some(AuthKey::from_secret(secret));
        self
    }

    /// Grants at most `max` ids per block from now on.
    pub fn set_grant_ids_max(&self, max: u64) {
        self.lock().grant_ids_max = max.max(1);
    }

    /// Answers `Exhausted` to every block request from now on.
    pub fn set_exhausted(&self, exhausted: bool) {
        self.lock().exhausted = exhausted;
    }

    /// Every block granted so far: (sequence, first, count).
    pub fn granted(&self) -> Vec<(String, u128, u64)> {
        self.lock().granted.clone()
    }

    /// How many `Hello`s were welcomed (node ids handed out).
    pub fn registrations(&self) -> u64 {
        self.lock().next_node - 100
    }

    /// The next id the cluster would grant.
    pub fn next_id(&self) -> u128 {
        self.lock().next_id
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClusterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a fake server with node id `id` on 127.0.0.1 (port chosen by
    /// the OS), in [`Mode::Leader`].
    pub fn start_server(&self, id: NodeId) -> std::io::Result<FakeServer> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.set_read_timeout(Some(Duration::from_millis(10)))?;
        let addr = socket.local_addr()?;
        let knobs = Arc::new(Mutex::new(Knobs {
            mode: Mode::Leader,
            epoch: 1,
            drop_every: 0,
            duplicate: false,
            received: 0,
            peers: Vec::new(),
            servers: Vec::new(),
            truncate: false,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let cluster = self.clone();
        let (k, s) = (Arc::clone(&knobs), Arc::clone(&stop));
        let sock = socket.try_clone()?;
        let thread = std::thread::Builder::new()
            .name(format!("fake-server-{id}"))
            .spawn(move || serve(cluster, id, sock, k, s))?;
        Ok(FakeServer {
            id,
            addr,
            socket,
            knobs,
            stop,
            thread: Some(thread),
            key: self.key.clone(),
        })
    }
}

#[derive(Debug)]
struct Knobs {
    mode: Mode,
    epoch: u64,
    drop_every: u64,
    duplicate: bool,
    received: u64,
    /// Addresses that sent us datagrams (agents).
    peers: Vec<SocketAddr>,
    /// Servers listed in Welcome / NotLeader / LeaderChange.
    servers: Vec<Server>,
    /// List no servers in Welcome / NotLeader (`truncated` set instead):
    /// the agent must read the node table.
    truncate: bool,
}

/// A running fake server. Dropping it stops it ("dies").
#[derive(Debug)]
pub struct FakeServer {
    id: NodeId,
    addr: SocketAddr,
    socket: UdpSocket,
    knobs: Arc<Mutex<Knobs>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    key: Option<AuthKey>,
}

impl FakeServer {
    /// Its UDP address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn knobs(&self) -> std::sync::MutexGuard<'_, Knobs> {
        self.knobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes how it answers.
    pub fn set_mode(&self, mode: Mode) {
        self.knobs().mode = mode;
    }

    /// Sets the epoch (term) it puts in every reply.
    pub fn set_epoch(&self, epoch: u64) {
        self.knobs().epoch = epoch;
    }

    /// Drops every `n`th datagram received (0: none).
    pub fn set_drop_every(&self, n: u64) {
        self.knobs().drop_every = n;
    }

    /// Sends every reply twice.
    pub fn set_duplicate(&self, duplicate: bool) {
        self.knobs().duplicate = duplicate;
    }

    /// The servers it lists in `Welcome`, `NotLeader` and `LeaderChange`.
    pub fn set_servers(&self, servers: &[(NodeId, SocketAddr)]) {
        self.knobs().servers = servers
            .iter()
            .map(|&(id, addr)| Server { id, addr })
            .collect();
    }

    /// Lists no servers in `Welcome` and `NotLeader` but sets `truncated`,
    /// so the agent has to read them from the node table.
    pub fn set_truncate(&self, truncate: bool) {
        self.knobs().truncate = truncate;
    }

    /// Datagrams received so far.
    pub fn received(&self) -> u64 {
        self.knobs().received
    }

    /// Sends `LeaderChange` naming `leader` to every address that sent it
    /// something; returns how many.
    pub fn send_leader_change(&self, leader_id: NodeId, leader: SocketAddr) -> usize {
        let epoch = self.knobs().epoch;
        self.send_leader_change_at(leader_id, leader, epoch)
    }

    /// As [`send_leader_change`](Self::send_leader_change), with `epoch` in
    /// the header instead of the server's own (a forged one, say).
    pub fn send_leader_change_at(
        &self,
        leader_id: NodeId,
        leader: SocketAddr,
        epoch: u64,
    ) -> usize {
        let (peers, servers) = {
            let k = self.knobs();
            (k.peers.clone(), k.servers.clone())
        };
        let header = Header {
            sender: self.id,
            seq: 1,
            reply_to: 0,
            epoch,
        };
        let message = Message::LeaderChange {
            leader_id,
            leader,
            servers: List::new(&servers),
            truncated: false,
        };
        let mut buf = [0u8; DATAGRAM_BYTES_MAX];
        let len = Codec::new()
            .encode(&header, &message, self.key.as_ref(), &mut buf)
            .expect("valid LeaderChange");
        for p in &peers {
            let _ = self.socket.send_to(&buf[..len], p);
        }
        peers.len()
    }

    /// Stops answering and closes its socket, like a crashed server.
    pub fn kill(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve(
    cluster: FakeCluster,
    id: NodeId,
    socket: UdpSocket,
    knobs: Arc<Mutex<Knobs>>,
    stop: Arc<AtomicBool>,
) {
    let mut codec = Codec::new();
    let mut buf = [0u8; DATAGRAM_BYTES_MAX + 64];
    let mut out = [0u8; DATAGRAM_BYTES_MAX];
    // Reply cache: (node, seq) -> datagram, so retransmits get the same reply.
    let mut cache: HashMap<(NodeId, u64), Vec<u8>> = HashMap::new();
    let mut registered: Vec<NodeId> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let Ok((len, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let Ok(frame) = decode(&buf[..len], cluster.key.as_ref()) else {
            continue;
        };
        let (mode, epoch, duplicate, servers, truncate) = {
            let mut k = knobs.lock().unwrap_or_else(|p| p.into_inner());
            k.received += 1;
            if !k.peers.contains(&from) {
                k.peers.push(from);
            }
            if k.drop_every != 0 && k.received % k.drop_every == 0 {
                continue;
            }
            (k.mode, k.epoch, k.duplicate, k.servers.clone(), k.truncate)
        };
        let h = frame.header;
        let key = (h.sender, h.seq);
        let send = |bytes: &[u8]| {
            let _ = socket.send_to(bytes, from);
            if duplicate {
                let _ = socket.send_to(bytes, from);
            }
        };
        if mode == Mode::Silent {
            continue;
        }
        if let Some(cached) = cache.get(&key)
            && h.sender != 0
        {
            send(cached);
            continue;
        }
        let header = Header {
            sender: id,
            seq: h.seq,
            reply_to: h.seq,
            epoch,
        };
        let table: Vec<unid_proto::Node> = servers
            .iter()
            .map(|s| unid_proto::Node {
                id: s.id,
                addr: s.addr,
                role: unid_proto::NodeRole::Server,
            })
            .collect();
        let truncated = truncate && !servers.is_empty();
        let servers = if truncate {
            List::empty()
        } else {
            List::new(&servers)
        };
        let grant_name: String;
        let message = match (mode, frame.message) {
            (Mode::Follower(leader), _) => Message::NotLeader {
                leader_id: 0,
                leader,
                servers,
                truncated,
            },
            (_, Message::NodeTableRequest { page: 0 }) => Message::NodeTable {
                version: 1,
                page: 0,
                page_count: 1,
                nodes: List::new(&table),
            },
            (_, Message::Hello { .. }) => {
                let mut c = cluster.lock();
                c.next_node += 1;
                registered.push(c.next_node);
                Message::Welcome {
                    node_id: c.next_node,
                    lease_ms: 3000,
                    servers,
                    truncated,
                }
            }
            (Mode::ForgetRegistrations, _) => Message::Error {
                code: ErrorCode::NotRegistered,
                sequence: None,
                retry_after_ms: 0,
                text: "",
            },
            (_, Message::Ping { sent_us }) => Message::Pong {
                echo_us: sent_us,
                lease_ms: if registered.contains(&h.sender) {
                    3000
                } else {
                    0
                },
            },
            (Mode::NotReady, Message::BlockRequest { .. }) => Message::Error {
                code: ErrorCode::NotReady,
                sequence: None,
                retry_after_ms: 0,
                text: "",
            },
            (_, Message::BlockRequest { sequence, count }) => {
                let mut c = cluster.lock();
                if !registered.contains(&h.sender) {
                    Message::Error {
                        code: ErrorCode::NotRegistered,
                        sequence: None,
                        retry_after_ms: 0,
                        text: "",
                    }
                } else if !c.sequences.iter().any(|s| s == sequence) {
                    Message::Error {
                        code: ErrorCode::UnknownSequence,
                        sequence: None,
                        retry_after_ms: 0,
                        text: "",
                    }
                } else {
                    let width = c.width;
                    let left = width.limit() - c.next_id;
                    let count = count
                        .min(c.grant_ids_max)
                        .min(left.min(u64::MAX as u128) as u64);
                    match (c.exhausted, Block::new(c.next_id, count, width)) {
                        (false, Some(block)) => {
                            c.next_id = block.end();
                            c.granted
                                .push((sequence.to_owned(), block.first(), block.count()));
                            grant_name = sequence.to_owned();
                            Message::BlockGrant {
                                sequence: &grant_name,
                                width,
                                block,
                            }
                        }
                        _ => Message::Error {
                            code: ErrorCode::Exhausted,
                            sequence: None,
                            retry_after_ms: 0,
                            text: "",
                        },
                    }
                }
            }
            _ => continue,
        };
        if let Ok(len) = codec.encode(&header, &message, cluster.key.as_ref(), &mut out) {
            // Grants are cached (a retransmit gets the same block); errors
            // are not (a retransmit may succeed later).
            if h.sender != 0 && matches!(message, Message::BlockGrant { .. }) {
                cache.insert(key, out[..len].to_vec());
            }
            send(&out[..len]);
        }
        if cache.len() > 100_000 {
            cache.clear();
        }
    }
}
