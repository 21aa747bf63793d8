//! Shared by the `server_*` tests: start `unid server` processes on 127.0.0.1 with free ports
//! and temporary data dirs, and a small UDP test agent built from `unid-proto`.
#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use unid_proto::{
    Codec, DATAGRAM_BYTES_MAX, ErrorCode, Header, Message, MessageType, NodeId, NodeRole, decode,
};

pub const UNID: &str = env!("CARGO_BIN_EXE_unid");

/// A port free for both TCP and UDP on 127.0.0.1 right now, below the kernel's ephemeral
/// range so that nothing else takes it before the server binds it (see `unid_engine::ports`).
pub fn free_port() -> u16 {
    unid_engine::ports::free_port().expect("a free port on 127.0.0.1")
}

/// `unid agent` for `sequence` from `server`, its rings in `ring_dir` and its localhost
/// socket at `socket`, stdin closed: the caller adds flags, output and environment, and
/// spawns it.
pub fn agent_command(
    server: SocketAddr,
    sequence: &str,
    ring_dir: &Path,
    socket: SocketAddr,
) -> Command {
    let mut cmd = Command::new(UNID);
    cmd.args([
        "agent",
        "--server",
        &server.to_string(),
        "--sequence",
        sequence,
    ])
    .arg("--ring-dir")
    .arg(ring_dir)
    .args(["--socket", &socket.to_string()])
    .stdin(Stdio::null());
    cmd
}

/// Waits (10 s at most) until an agent's localhost socket accepts connections.
pub fn wait_agent_socket(socket: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "agent socket never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The ids a `unid next` process printed, one a line; panics unless it succeeded and
/// they increase.
pub fn increasing_ids(out: Output) -> Vec<u128> {
    assert!(
        out.status.success(),
        "unid next failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Vec<u128> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    for w in ids.windows(2) {
        assert!(w[0] < w[1], "not increasing: {} then {}", w[0], w[1]);
    }
    ids
}

/// One server process.
pub struct Server {
    pub id: u64,
    pub udp: SocketAddr,
    pub raft: SocketAddr,
    pub dir: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
}

impl Server {
    pub fn peer_arg(&self) -> String {
        format!("{}={}={}", self.id, self.raft, self.udp)
    }

    /// Starts (or restarts) the process; `peers` includes this server.
    pub fn start(&mut self, peers: &[String], init: bool) {
        assert!(self.child.is_none(), "server {} already running", self.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(UNID);
        cmd.args(["server", "--id", &self.id.to_string()])
            .args(["--listen", &self.udp.to_string()])
            .args(["--raft", &self.raft.to_string()])
            .arg("--data-dir")
            .arg(&self.dir)
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for p in peers {
            cmd.args(["--peer", p]);
        }
        if init {
            cmd.arg("--init");
        }
        self.child = Some(cmd.spawn().expect("start unid server"));
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait (at most `timeout`) for a clean exit.
    pub fn sigterm(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let ok = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!(
                    "server {} did not stop within {timeout:?} after SIGTERM",
                    self.id
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `n` servers (not started) under `root`, with distinct free ports.
pub fn servers(root: &Path, n: u64) -> Vec<Server> {
    (1..=n)
        .map(|id| Server {
            id,
            udp: SocketAddr::from(([127, 0, 0, 1], free_port())),
            raft: SocketAddr::from(([127, 0, 0, 1], free_port())),
            dir: root.join(format!("server-{id}")),
            log: root.join(format!("server-{id}.log")),
            child: None,
        })
        .collect()
}

/// Starts every server, the first with `--init`.
pub fn start_cluster(servers: &mut [Server]) {
    let peers: Vec<String> = servers.iter().map(Server::peer_arg).collect();
    for (i, s) in servers.iter_mut().enumerate() {
        s.start(&peers, i == 0);
    }
}

/// Runs `unid ARGS` and returns (success, stdout, stderr).
pub fn unid(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(UNID)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What the tests look at in an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Welcome {
        node_id: NodeId,
    },
    Grant {
        first: u128,
        count: u64,
    },
    NotLeader {
        leader: Option<SocketAddr>,
    },
    Error(ErrorCode),
    LeaderChange {
        leader_id: NodeId,
        leader: SocketAddr,
    },
    Status {
        leader_id: NodeId,
        term: u64,
    },
    Pong {
        lease_ms: u32,
    },
    Other(MessageType),
}

fn owned(m: &Message<'_>) -> Reply {
    match *m {
        Message::Welcome { node_id, .. } => Reply::Welcome { node_id },
        Message::BlockGrant { block, .. } => Reply::Grant {
            first: block.first(),
            count: block.count(),
        },
        Message::NotLeader { leader, .. } => Reply::NotLeader { leader },
        Message::Error { code, .. } => Reply::Error(code),
        Message::LeaderChange {
            leader_id, leader, ..
        } => Reply::LeaderChange { leader_id, leader },
        Message::StatusReply {
            leader_id, term, ..
        } => Reply::Status { leader_id, term },
        Message::Pong { lease_ms, .. } => Reply::Pong { lease_ms },
        ref other => Reply::Other(other.message_type()),
    }
}

/// A test agent: one UDP socket, raw requests, one answer per request.
pub struct Agent {
    pub sock: UdpSocket,
    pub seq: u64,
    /// This agent's incarnation (a real agent takes a new one per start): servers refuse a
    /// `Hello` not newer than the last registered under its name as a replay.
    pub incarnation: u64,
    pub node_id: NodeId,
    codec: Codec,
}

impl Agent {
    pub fn new() -> Agent {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        Agent {
            sock,
            seq: 0,
            incarnation,
            node_id: 0,
            codec: Codec::new(),
        }
    }

    pub fn encode(&mut self, seq: u64, msg: &Message<'_>) -> Vec<u8> {
        let mut buf = [0u8; DATAGRAM_BYTES_MAX];
        let header = Header {
            sender: self.node_id,
            seq,
            reply_to: 0,
            epoch: 0,
        };
        let n = self.codec.encode(&header, msg, None, &mut buf).unwrap();
        buf[..n].to_vec()
    }

    /// The next datagram within `timeout`, decoded (raw bytes too).
    pub fn recv(&self, timeout: Duration) -> Option<(Header, Reply, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 2048];
        loop {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            self.sock.set_read_timeout(Some(deadline - now)).unwrap();
            let Ok((n, _)) = self.sock.recv_from(&mut buf) else {
                // Timeout, or an ICMP error from a dead server: keep waiting until the deadline.
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            if let Ok(f) = decode(&buf[..n], None) {
                return Some((f.header, owned(&f.message), buf[..n].to_vec()));
            }
        }
    }

    /// Sends raw bytes.
    pub fn send_raw(&self, to: SocketAddr, data: &[u8]) {
        let _ = self.sock.send_to(data, to);
    }

    /// Sends `msg` with a fresh seq and waits for the answer to it.
    pub fn call(&mut self, to: SocketAddr, msg: &Message<'_>, timeout: Duration) -> Option<Reply> {
        self.seq += 1;
        let seq = self.seq;
        let d = self.encode(seq, msg);
        self.send_raw(to, &d);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let (h, r, _) = self.recv(deadline - Instant::now())?;
            if h.reply_to == seq {
                return Some(r);
            }
        }
        None
    }

    /// Hello until welcomed by `to` (which must lead); panics after `timeout`.
    pub fn register(&mut self, to: SocketAddr, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        self.node_id = 0;
        while Instant::now() < deadline {
            let hello = Message::Hello {
                role: NodeRole::Agent,
                incarnation: self.incarnation,
                name: "test-agent-with-a-long-enough-name",
                listen: None,
                backup_of: None,
                versions: unid_proto::VERSIONS,
                software: unid_proto::SOFTWARE,
            };
            if let Some(Reply::Welcome { node_id }) =
                self.call(to, &hello, Duration::from_millis(500))
            {
                self.node_id = node_id;
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no Welcome from {to}");
    }

    /// Asks `to` for a block until granted (NotReady is retried); panics after `timeout`.
    pub fn grant(
        &mut self,
        to: SocketAddr,
        sequence: &str,
        count: u64,
        timeout: Duration,
    ) -> (u128, u64) {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            let r = self.call(
                to,
                &Message::BlockRequest { sequence, count },
                Duration::from_millis(500),
            );
            match r {
                Some(Reply::Grant { first, count }) => return (first, count),
                Some(Reply::Error(ErrorCode::NotRegistered)) => {
                    self.register(to, deadline - Instant::now())
                }
                other => last = other,
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no grant from {to}: last answer {last:?}");
    }
}

/// The leader's id as server `at` reports it (None: no answer or no leader).
pub fn leader_of(at: SocketAddr) -> Option<(NodeId, u64)> {
    let mut a = Agent::new();
    match a.call(
        at,
        &Message::StatusRequest {
            sequences_after: None,
        },
        Duration::from_millis(300),
    )? {
        Reply::Status { leader_id, term } if leader_id != 0 => Some((leader_id, term)),
        _ => None,
    }
}

/// Waits until every server in `at` reports the same leader, other than `not`; returns it.
pub fn wait_leader(at: &[SocketAddr], not: Option<NodeId>, timeout: Duration) -> (NodeId, u64) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let seen: Vec<Option<(NodeId, u64)>> = at.iter().map(|a| leader_of(*a)).collect();
        if let Some(Some(first)) = seen.first()
            && Some(first.0) != not
            && seen.iter().all(|s| s.map(|x| x.0) == Some(first.0))
        {
            return *first;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no agreed leader among {at:?} within {timeout:?}");
}

/// Creates a sequence through the CLI (retrying while the cluster forms).
pub fn create_sequence(servers: &[SocketAddr], name: &str, width: u8) {
    let mut args = vec![
        "sequence".to_owned(),
        "create".to_owned(),
        name.to_owned(),
        "--width".to_owned(),
        width.to_string(),
    ];
    for s in servers {
        args.push("--server".to_owned());
        args.push(s.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut tried = false;
    loop {
        let (ok, out, err) = unid(&args);
        if ok {
            assert!(out.contains("created sequence"), "{out}");
            return;
        }
        // An earlier attempt that timed out on a loaded machine may have created it.
        if tried && err.contains("already exists") {
            return;
        }
        tried = true;
        assert!(Instant::now() < deadline, "sequence create failed: {err}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Asks `*target` for a block until granted, following `NotLeader` redirects (updating
/// `*target`), registering where the agent is not known and retrying `NotReady`; panics after
/// `timeout`. For tests where a busy machine may move leadership meanwhile.
pub fn grant_following(
    agent: &mut Agent,
    target: &mut SocketAddr,
    sequence: &str,
    count: u64,
    timeout: Duration,
) -> (u128, u64) {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        let r = agent.call(
            *target,
            &Message::BlockRequest { sequence, count },
            Duration::from_millis(500),
        );
        match r {
            Some(Reply::Grant { first, count }) => return (first, count),
            Some(Reply::NotLeader {
                leader: Some(leader),
            }) if leader != *target => *target = leader,
            Some(Reply::Error(ErrorCode::NotRegistered)) => {
                let hello = Message::Hello {
                    role: NodeRole::Agent,
                    incarnation: agent.incarnation,
                    name: "test-agent-with-a-long-enough-name",
                    listen: None,
                    backup_of: None,
                    versions: unid_proto::VERSIONS,
                    software: unid_proto::SOFTWARE,
                };
                agent.node_id = 0;
                match agent.call(*target, &hello, Duration::from_millis(500)) {
                    Some(Reply::Welcome { node_id }) => agent.node_id = node_id,
                    Some(Reply::NotLeader {
                        leader: Some(leader),
                    }) => *target = leader,
                    other => last = other,
                }
            }
            other => last = other,
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no grant from {target}: last answer {last:?}");
}
