//! `engine::server` in process: amplification bounds, fail-stop on a storage failure, and no
//! overlapping blocks among concurrent agents across leader crashes.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use unid_engine::client::{Answer, Client, ClientConfig};
use unid_engine::server::{Peer, ServerConfig, ServerError, ServerHandle, run};
use unid_proto::{Codec, ErrorCode, Header, Message, NodeRole, Width, decode};

fn free_port() -> u16 {
    unid_engine::ports::free_port().expect("a free port on 127.0.0.1")
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A one-server cluster's config: server 1 in `dir`, on free 127.0.0.1 ports, bootstrapping.
fn single(dir: std::path::PathBuf) -> ServerConfig {
    let mut c = ServerConfig::new(1, dir);
    c.udp_addr = local(free_port());
    c.raft_addr = local(free_port());
    c.init = true;
    c
}

/// Starts `n` servers in this process (the first bootstraps the cluster). Even ids run the
/// threads data plane, odd ones `auto` (io-uring here): clusters mix both planes, and
/// leadership moves between them in the crash tests.
fn cluster(root: &std::path::Path, n: u64) -> Vec<Option<ServerHandle>> {
    let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
    let peers: Vec<Peer> = (1..=n)
        .map(|id| {
            let (udp, raft) = ports[(id - 1) as usize];
            Peer {
                id,
                raft_addr: local(raft).to_string(),
                udp_addr: local(udp),
            }
        })
        .collect();
    (1..=n)
        .map(|id| {
            let (udp, raft) = ports[(id - 1) as usize];
            let mut c = ServerConfig::new(id, root.join(format!("s{id}")));
            c.udp_addr = local(udp);
            c.raft_addr = local(raft);
            c.peers = peers.iter().filter(|p| p.id != id).cloned().collect();
            c.init = id == 1;
            if id % 2 == 0 {
                c.data_plane = unid_engine::plane::DataPlane::Threads;
            }
            Some(run(c).expect("server starts"))
        })
        .collect()
}

fn client(servers: &[SocketAddr]) -> Client {
    Client::new(servers, ClientConfig::default()).unwrap()
}

fn create(c: &mut Client, name: &str, width: Width) {
    let msg = Message::SequenceCreate {
        name,
        width,
        start: 1,
    };
    let ok = c
        .call(0, &msg, |f, _| match f.message {
            Message::SequenceInfo { .. } => Some(Answer::Done(true)),
            Message::Error {
                code: ErrorCode::AlreadyExists,
                ..
            } => Some(Answer::Done(true)),
            Message::Error { .. } => Some(Answer::Retry),
            _ => None,
        })
        .unwrap();
    assert!(ok);
}

fn hello(c: &mut Client, name: &str) -> u64 {
    let msg = Message::Hello {
        role: NodeRole::Agent,
        incarnation: 7,
        name,
        listen: None,
        backup_of: None,
        versions: unid_proto::VERSIONS,
        software: unid_proto::SOFTWARE,
    };
    c.call(0, &msg, |f, _| match f.message {
        Message::Welcome { node_id, .. } => Some(Answer::Done(node_id)),
        Message::Error { .. } => Some(Answer::Retry),
        _ => None,
    })
    .unwrap()
}

enum Got {
    Block(u128, u64),
    Unregistered,
    Failed,
}

fn request(c: &mut Client, node: u64, sequence: &str, count: u64) -> Got {
    let msg = Message::BlockRequest { sequence, count };
    c.call(node, &msg, |f, _| match f.message {
        Message::BlockGrant { block, .. } => {
            Some(Answer::Done(Got::Block(block.first(), block.count())))
        }
        Message::Error {
            code: ErrorCode::NotRegistered,
            ..
        } => Some(Answer::Done(Got::Unregistered)),
        Message::Error {
            code: ErrorCode::NotReady,
            ..
        } => Some(Answer::Retry),
        Message::Error { .. } => Some(Answer::Done(Got::Failed)),
        _ => None,
    })
    .unwrap_or(Got::Failed)
}

#[test]
fn answers_to_unregistered_senders_are_never_larger_than_the_request() {
    let root = tempfile::tempdir().unwrap();
    let servers = cluster(root.path(), 1);
    let s = servers[0].as_ref().unwrap();
    let addr = s.udp_addr();
    let mut c = client(&[addr]);
    create(&mut c, "amp", Width::W8);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.is_granting() {
        assert!(Instant::now() < deadline, "never granting");
        std::thread::sleep(Duration::from_millis(10));
    }

    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut codec = Codec::new();
    let mut buf = [0u8; 1500];
    let mut ask = |sender: u64, seq: u64, msg: &Message<'_>| -> (usize, Option<Vec<u8>>) {
        let mut out = [0u8; 1200];
        let h = Header {
            sender,
            seq,
            reply_to: 0,
            epoch: 0,
        };
        let n = codec.encode(&h, msg, None, &mut out).unwrap();
        sock.send_to(&out[..n], addr).unwrap();
        match sock.recv_from(&mut buf) {
            Ok((m, _)) => (n, Some(buf[..m].to_vec())),
            Err(_) => (n, None),
        }
    };
    // The shortest Hello this encoder makes (no software string): the Welcome must still fit.
    let hello = Message::Hello {
        role: NodeRole::Agent,
        incarnation: 1,
        name: "a",
        listen: None,
        backup_of: None,
        versions: unid_proto::VERSIONS,
        software: "",
    };
    let (req, _) = ask(0, 1, &hello); // registration goes through Raft; answered later
    let mut welcome = None;
    for seq in 2..40 {
        let (_, r) = ask(0, seq, &hello);
        if let Some(d) = r {
            welcome = Some(d);
            break;
        }
    }
    // The Welcome fits in the Hello: servers are left out (`truncated`) as needed.
    let d = welcome.expect("a Welcome");
    assert!(d.len() <= req, "Welcome {} > Hello {req}", d.len());
    let Message::Welcome { truncated, .. } = decode(&d, None).unwrap().message else {
        panic!("not a Welcome");
    };
    assert!(
        truncated,
        "one server's address does not fit a one-letter Hello"
    );
    let (req, r) = ask(0, 100, &Message::Ping { sent_us: 1 });
    let d = r.expect("a Pong");
    assert!(d.len() <= req, "Pong {} > Ping {req}", d.len());
    let (req, r) = ask(
        999,
        101,
        &Message::BlockRequest {
            sequence: "amp",
            count: 1,
        },
    );
    let d = r.expect("NotRegistered");
    assert!(d.len() <= req);
    assert!(matches!(
        decode(&d, None).unwrap().message,
        Message::Error {
            code: ErrorCode::NotRegistered,
            ..
        }
    ));
    // Garbage is never answered and is counted.
    let before = s.stats().dropped_malformed;
    for bad in [&b"x"[..], &[0x55, 0x4e, 1, 5, 0, 0][..], &[0u8; 60][..]] {
        sock.send_to(bad, addr).unwrap();
    }
    assert!(sock.recv_from(&mut buf).is_err(), "garbage answered");
    assert_eq!(s.stats().dropped_malformed, before + 3);
}

#[test]
fn a_storage_failure_stops_granting_and_the_server() {
    let root = tempfile::tempdir().unwrap();
    let mut servers = cluster(root.path(), 1);
    let s = servers[0].take().unwrap();
    let mut c = client(&[s.udp_addr()]);
    create(&mut c, "disk", Width::W8);
    let node = hello(&mut c, "disk-agent");
    let mut end = 0;
    for _ in 0..5 {
        let Got::Block(first, count) = request(&mut c, node, "disk", 1000) else {
            panic!("no grant");
        };
        end = first + u128::from(count);
    }
    assert!(end > 0);
    s.inject_storage_fault();
    // Demand crosses the committed ceiling, so a raise must be written: it fails, Raft stops,
    // and the server stops granting and exits.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut c = Client::new(
        &[s.udp_addr()],
        ClientConfig {
            deadline_ms: 300,
            ..ClientConfig::default()
        },
    )
    .unwrap();
    while s.is_granting() {
        assert!(
            Instant::now() < deadline,
            "still granting after a storage failure"
        );
        let _ = request(&mut c, node, "disk", 1 << 20);
    }
    match s.wait() {
        Err(ServerError::ConsensusStopped) => {}
        other => panic!("expected ConsensusStopped, got {other:?}"),
    }
}

#[test]
fn concurrent_agents_never_get_overlapping_blocks_across_leader_crashes() {
    let root = tempfile::tempdir().unwrap();
    let mut servers = cluster(root.path(), 3);
    let addrs: Vec<SocketAddr> = servers
        .iter()
        .map(|s| s.as_ref().unwrap().udp_addr())
        .collect();
    let mut admin = client(&addrs);
    create(&mut admin, "busy", Width::W4);

    let blocks: Arc<Mutex<Vec<(u128, u64)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..3)
        .map(|i| {
            let (blocks, stop, addrs) = (blocks.clone(), stop.clone(), addrs.clone());
            std::thread::spawn(move || {
                let mut c = Client::new(
                    &addrs,
                    ClientConfig {
                        deadline_ms: 2_000,
                        attempt_ms: 150,
                        ..ClientConfig::default()
                    },
                )
                .unwrap();
                let name = format!("agent-{i}");
                let mut node = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if node == 0 {
                        let msg = Message::Hello {
                            role: NodeRole::Agent,
                            incarnation: 1,
                            name: &name,
                            listen: None,
                            backup_of: None,
                            versions: unid_proto::VERSIONS,
                            software: unid_proto::SOFTWARE,
                        };
                        node = c
                            .call(0, &msg, |f, _| match f.message {
                                Message::Welcome { node_id, .. } => Some(Answer::Done(node_id)),
                                Message::Error { .. } => Some(Answer::Retry),
                                _ => None,
                            })
                            .unwrap_or(0);
                        continue;
                    }
                    match request(&mut c, node, "busy", 50 + i * 13) {
                        Got::Block(first, count) => blocks.lock().unwrap().push((first, count)),
                        Got::Unregistered => node = 0,
                        Got::Failed => {}
                    }
                }
            })
        })
        .collect();

    let leader_of = |servers: &Vec<Option<ServerHandle>>| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(i) = servers
                .iter()
                .position(|s| s.as_ref().is_some_and(|s| s.is_granting()))
            {
                return i;
            }
            assert!(Instant::now() < deadline, "no leader grants");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // The leader crashes (no handoff) while three agents ask for blocks.
    let count_before = |b: &Arc<Mutex<Vec<(u128, u64)>>>| b.lock().unwrap().len();
    let l = leader_of(&servers);
    let wait_grants = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while count_before(&blocks) < n {
            assert!(
                Instant::now() < deadline,
                "grants stalled at {}",
                count_before(&blocks)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_grants(50);
    let crashed = servers[l].take().unwrap();
    crashed.stopper().stop_abruptly();
    crashed.wait().unwrap();
    let seen = count_before(&blocks);
    let _ = leader_of(&servers);
    wait_grants(seen + 50);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let mut all = blocks.lock().unwrap().clone();
    assert!(all.len() >= 100, "{} blocks", all.len());
    all.sort();
    let mut by_first = BTreeMap::new();
    for w in all.windows(2) {
        assert!(
            w[0].0 + u128::from(w[0].1) <= w[1].0,
            "overlapping blocks {:?} and {:?}",
            w[0],
            w[1]
        );
    }
    for b in &all {
        assert!(by_first.insert(b.0, b.1).is_none());
    }
    for s in servers.into_iter().flatten() {
        s.shutdown().unwrap();
    }
}

#[test]
fn a_source_over_its_rate_is_limited() {
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut c = ServerConfig::new(1, root.path().join("s1"));
    c.udp_addr = local(port);
    c.raft_addr = local(free_port());
    c.init = true;
    c.source_rate_per_s = 5;
    let s = run(c).unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut codec = Codec::new();
    let mut out = [0u8; 1200];
    for seq in 1..=50 {
        let h = Header {
            sender: 0,
            seq,
            reply_to: 0,
            epoch: 0,
        };
        let n = codec
            .encode(&h, &Message::Ping { sent_us: seq }, None, &mut out)
            .unwrap();
        sock.send_to(&out[..n], s.udp_addr()).unwrap();
    }
    let mut buf = [0u8; 1500];
    let mut answers = 0;
    while sock.recv_from(&mut buf).is_ok() {
        answers += 1;
    }
    // A burst of twice the rate, and a token or so more while the pings went out.
    assert!((10..=12).contains(&answers), "{answers} answers");
    assert!(s.stats().dropped_rate >= 38);
    s.shutdown().unwrap();
}

#[test]
fn a_silent_agent_is_forgotten_and_pings_keep_it() {
    let root = tempfile::tempdir().unwrap();
    let mut c = single(root.path().join("s1"));
    c.lease_ms = 300;
    let s = run(c).unwrap();
    let mut client = client(&[s.udp_addr()]);
    create(&mut client, "lease", Width::W8);
    let kept = hello(&mut client, "kept-agent");
    let silent = {
        let mut other = Client::new(&[s.udp_addr()], ClientConfig::default()).unwrap();
        hello(&mut other, "silent-agent")
    };
    assert!(matches!(
        request(&mut client, kept, "lease", 5),
        Got::Block(..)
    ));
    let pong = |c: &mut Client| {
        c.call(kept, &Message::Ping { sent_us: 1 }, |f, _| {
            match f.message {
                Message::Pong { lease_ms, .. } => Some(Answer::Done(lease_ms)),
                _ => None,
            }
        })
        .unwrap()
    };
    assert_eq!(pong(&mut client), 300);
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(pong(&mut client), 300, "a ping renews the lease");
    }
    assert!(matches!(
        request(&mut client, kept, "lease", 5),
        Got::Block(..)
    ));
    assert!(
        matches!(request(&mut client, silent, "lease", 5), Got::Unregistered),
        "silent for 800 ms with a 300 ms lease"
    );
    s.shutdown().unwrap();
}

#[test]
fn a_server_removed_from_the_cluster_stops() {
    let root = tempfile::tempdir().unwrap();
    let mut servers = cluster(root.path(), 3);
    let deadline = Instant::now() + Duration::from_secs(15);
    let leader = loop {
        if let Some(i) = servers
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.is_granting()))
        {
            break i;
        }
        assert!(Instant::now() < deadline, "no leader");
        std::thread::sleep(Duration::from_millis(10));
    };
    let victim = (leader + 1) % 3;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    {
        let node = servers[leader]
            .as_ref()
            .unwrap()
            .consensus_for_tests()
            .unwrap();
        rt.block_on(node.remove_server(victim as u64 + 1)).unwrap();
    }
    let removed = servers[victim].take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(removed.wait()).unwrap());
    let res = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the removed server stops by itself");
    assert!(res.is_ok(), "{res:?}");
    // The other two still grant.
    let addrs: Vec<SocketAddr> = servers.iter().flatten().map(|s| s.udp_addr()).collect();
    let mut c = client(&addrs);
    create(&mut c, "after", Width::W8);
    let node = hello(&mut c, "after-agent");
    assert!(matches!(request(&mut c, node, "after", 10), Got::Block(..)));
    for s in servers.into_iter().flatten() {
        s.shutdown().unwrap();
    }
}

#[test]
fn a_retransmitted_hello_gets_the_same_node_id() {
    let root = tempfile::tempdir().unwrap();
    let servers = cluster(root.path(), 1);
    let s = servers[0].as_ref().unwrap();
    let mut c = client(&[s.udp_addr()]);
    let first = hello(&mut c, "same-agent");
    assert_eq!(
        hello(&mut c, "same-agent"),
        first,
        "same source, same incarnation"
    );
    let msg = Message::Hello {
        role: NodeRole::Agent,
        incarnation: 8,
        name: "same-agent",
        listen: None,
        backup_of: None,
        versions: unid_proto::VERSIONS,
        software: unid_proto::SOFTWARE,
    };
    let restarted = c
        .call(0, &msg, |f, _| match f.message {
            Message::Welcome { node_id, .. } => Some(Answer::Done(node_id)),
            _ => Some(Answer::Retry),
        })
        .unwrap();
    assert!(restarted > first, "a new incarnation gets a new id");
    assert_eq!(s.stats().registrations, 2);
}

/// Issue 12 items 1 and 12: what cannot work is refused before Raft starts (no database is
/// created, the Raft port stays free), with an error naming what is wrong; a data dir in use
/// by a running server is refused, naming its holder.
#[test]
fn bad_configs_and_taken_resources_are_refused_before_raft_starts() {
    let root = tempfile::tempdir().unwrap();
    let base = |name: &str| single(root.path().join(name));
    let refused_early = |c: ServerConfig, wants: &str| {
        let (dir, raft) = (c.data_dir.clone(), c.raft_addr);
        let err = run(c).expect_err(wants).to_string();
        assert!(err.contains(wants), "{err} (wanted {wants:?})");
        assert!(
            !dir.join(unid_consensus::store::DB_FILE).exists(),
            "Raft started before refusing: {err}"
        );
        assert!(
            std::net::TcpListener::bind(raft).is_ok(),
            "Raft port still taken after refusing: {err}"
        );
    };
    let mut c = base("shards");
    c.shards = 0;
    refused_early(c, "shards");
    let mut c = base("secret");
    c.secret = Some(b"short".to_vec());
    refused_early(c, "at least 16 bytes");
    let metrics = std::net::TcpListener::bind(local(0)).unwrap();
    let mut c = base("metrics");
    c.metrics_addr = Some(metrics.local_addr().unwrap());
    refused_early(c, "bind metrics");
    let udp = UdpSocket::bind(local(0)).unwrap();
    let mut c = base("udp");
    c.udp_addr = udp.local_addr().unwrap();
    refused_early(c, &udp.local_addr().unwrap().to_string());

    // A running server's data dir: refused, naming the directory and the holder.
    let running = run(base("running")).expect("server starts");
    let mut c = base("running");
    c.init = false;
    let err = run(c)
        .expect_err("a second server on one data dir")
        .to_string();
    assert!(
        err.contains("in use by another unid server")
            && err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    running.shutdown().unwrap();
    // Released once the server stops.
    let again = run(base("running")).expect("the data dir is free again");
    again.shutdown().unwrap();
}

/// This host's address on a network (not loopback), if it has one: the source address of
/// the route to a documentation address (`connect` on UDP sends nothing).
fn network_ip() -> Option<std::net::IpAddr> {
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("198.51.100.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// Issue 12 item 9: without a secret, a server refuses to listen beyond loopback unless told
/// it is insecure, and even then takes changes (here a sequence create) only from loopback:
/// a datagram from the host's network address gets `Unauthorized` and creates nothing.
#[test]
fn changes_without_the_secret_come_only_from_loopback() {
    let root = tempfile::tempdir().unwrap();
    let mut c = ServerConfig::new(1, root.path().join("s1"));
    c.udp_addr = SocketAddr::from(([0, 0, 0, 0], free_port()));
    c.raft_addr = local(free_port());
    c.init = true;
    let err = run(c.clone()).expect_err("a wildcard listen without a secret");
    assert!(err.to_string().contains("needs a cluster secret"), "{err}");
    let Some(ip) = network_ip() else {
        eprintln!("SKIPPED the network half: this host has no non-loopback address");
        return;
    };
    c.insecure_without_secret = true;
    let s = run(c).expect("server starts");
    let port = s.udp_addr().port();
    let mut codec = Codec::new();
    let ask = |codec: &mut Codec, from: std::net::IpAddr, seq: u64, name: &str| {
        let sock = UdpSocket::bind(SocketAddr::new(from, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut out = [0u8; 1200];
        let h = Header {
            sender: 0,
            seq,
            reply_to: 0,
            epoch: 0,
        };
        let msg = Message::SequenceCreate {
            name,
            width: Width::W8,
            start: 1,
        };
        let n = codec.encode(&h, &msg, None, &mut out).unwrap();
        let mut buf = [0u8; 1500];
        for _ in 0..30 {
            sock.send_to(&out[..n], SocketAddr::new(from, port))
                .unwrap();
            if let Ok((m, _)) = sock.recv_from(&mut buf) {
                match decode(&buf[..m], None).unwrap().message {
                    Message::Error {
                        code: ErrorCode::NotReady,
                        ..
                    }
                    | Message::NotLeader { .. } => continue,
                    Message::Error { code, .. } => return Err(code),
                    Message::SequenceInfo { .. } => return Ok(()),
                    other => panic!("unexpected answer {other:?}"),
                }
            }
        }
        panic!("no answer from {from}");
    };
    assert_eq!(
        ask(&mut codec, ip, 1, "from_network"),
        Err(ErrorCode::Unauthorized)
    );
    assert_eq!(s.stats().refused_admin, 1);
    assert_eq!(
        ask(&mut codec, "127.0.0.1".parse().unwrap(), 2, "from_loopback"),
        Ok(())
    );
    // Nothing was created from the network.
    let mut cl = client(&[local(port)]);
    let describe = |cl: &mut Client, name: &str| {
        cl.call(0, &Message::SequenceDescribe { name }, |f, _| {
            match f.message {
                Message::SequenceInfo { .. } => Some(Answer::Done(true)),
                Message::Error {
                    code: ErrorCode::UnknownSequence,
                    ..
                } => Some(Answer::Done(false)),
                _ => Some(Answer::Retry),
            }
        })
        .unwrap()
    };
    assert!(describe(&mut cl, "from_loopback"));
    assert!(!describe(&mut cl, "from_network"));
    s.shutdown().unwrap();
}

/// Issue 12 item 8: agents whose lease ended are removed from the replicated node table
/// (through Raft), not kept for ever; and a flood of new registrations from one source IP is
/// held to its rate (`RateLimited`, counted) while retransmits of a registered Hello still
/// get their Welcome.
#[test]
fn expired_agents_leave_the_node_table_and_registration_floods_are_limited() {
    let root = tempfile::tempdir().unwrap();
    let mut c = single(root.path().join("s1"));
    c.lease_ms = 300;
    let s = run(c).unwrap();
    let mut admin = client(&[s.udp_addr()]);
    create(&mut admin, "lease", Width::W8);
    let agents_in_table = |s: &ServerHandle| {
        let node = s.consensus_for_tests().expect("running");
        node.state()
            .state
            .nodes
            .keys()
            .filter(|&&id| id >= unid_consensus::state::AGENT_ID_FIRST)
            .count()
    };
    let ids: Vec<u64> = (0..5)
        .map(|i| {
            let mut c = Client::new(&[s.udp_addr()], ClientConfig::default()).unwrap();
            hello(&mut c, &format!("short-lived-{i}"))
        })
        .collect();
    assert_eq!(agents_in_table(&s), 5, "{ids:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while agents_in_table(&s) > 0 {
        assert!(
            Instant::now() < deadline,
            "expired agents still in the node table: {}",
            agents_in_table(&s)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The removing task counts each removal after its commit is applied: wait for the count.
    while s.stats().agents_removed < 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(s.stats().agents_removed, 5);

    // A flood of new Hellos from one IP (fresh source ports and incarnations, as a spoofer
    // sends them): at most the burst and the rate's worth are registered.
    let addr = s.udp_addr();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(2)))
        .unwrap();
    let mut codec = Codec::new();
    let mut out = [0u8; 1200];
    let started = Instant::now();
    const FLOOD: u64 = 400;
    for i in 0..FLOOD {
        let h = Header {
            sender: 0,
            seq: i + 1,
            reply_to: 0,
            epoch: 0,
        };
        let name = format!("flood-{i}");
        let msg = Message::Hello {
            role: NodeRole::Agent,
            incarnation: 1_000 + i,
            name: &name,
            listen: None,
            backup_of: None,
            versions: unid_proto::VERSIONS,
            software: unid_proto::SOFTWARE,
        };
        let n = codec.encode(&h, &msg, None, &mut out).unwrap();
        sock.send_to(&out[..n], addr).unwrap();
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let stats = s.stats();
    let allowed = 2 * unid_engine::server::REGISTER_RATE_PER_IP_PER_S as u64
        + (elapsed_s.ceil() as u64) * unid_engine::server::REGISTER_RATE_PER_IP_PER_S as u64;
    assert!(
        stats.registrations <= 5 + allowed,
        "{} registrations from one IP in {elapsed_s:.2} s",
        stats.registrations
    );
    assert!(
        stats.refused_registration_rate >= FLOOD - allowed,
        "{stats:?}"
    );
    assert!(
        s.metrics_text()
            .contains("unid_server_registrations_refused_total{reason=\"rate\"}"),
        "no metric"
    );
    s.shutdown().unwrap();
}

/// Issue 12 item 7: with a cluster secret, authenticated datagrams captured and sent again
/// from other source ports are dropped and counted: a replayed `Hello` registers nobody, a
/// replayed `BlockRequest` whose reply has left the reply cache gets no new block, and the
/// real sender goes on being served. Before: every replay of an old `BlockRequest` got a new
/// block and every replayed `Hello` from a new port a new registration.
#[test]
fn replayed_authenticated_datagrams_are_dropped_and_counted() {
    let secret = b"replay test secret".to_vec();
    let key = unid_proto::AuthKey::from_secret(&secret);
    let root = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(1, root.path().join("s1"));
    config.udp_addr = local(18310);
    config.raft_addr = local(18311);
    config.init = true;
    config.secret = Some(secret.clone());
    let s = run(config).expect("server starts");
    let addr = s.udp_addr();
    let mut admin = Client::new(
        &[addr],
        ClientConfig {
            secret: Some(secret),
            ..ClientConfig::default()
        },
    )
    .unwrap();
    create(&mut admin, "replayed", Width::W8);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.is_granting() {
        assert!(Instant::now() < deadline, "never granting");
        std::thread::sleep(Duration::from_millis(10));
    }

    let agent = UdpSocket::bind("127.0.0.1:0").unwrap();
    agent
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut codec = Codec::new();
    let datagram = |codec: &mut Codec, sender: u64, seq: u64, msg: &Message<'_>| {
        let mut out = [0u8; 1200];
        let h = Header {
            sender,
            seq,
            reply_to: 0,
            epoch: 0,
        };
        let n = codec.encode(&h, msg, Some(&key), &mut out).unwrap();
        out[..n].to_vec()
    };
    // Sends `d` from `sock` until an answer other than `NotReady` comes (a retransmission:
    // the same bytes), and returns it decoded.
    let exchange = |sock: &UdpSocket, d: &[u8]| -> Message<'static> {
        let mut buf = [0u8; 1500];
        for _ in 0..50 {
            sock.send_to(d, addr).unwrap();
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                let bytes: &'static [u8] = Box::leak(buf[..n].to_vec().into_boxed_slice());
                let m = decode(bytes, Some(&key)).unwrap().message;
                if !matches!(
                    m,
                    Message::Error {
                        code: ErrorCode::NotReady,
                        ..
                    }
                ) {
                    return m;
                }
            }
        }
        panic!("no answer");
    };
    let first_seq = 1_000_000;
    let hello = datagram(
        &mut codec,
        0,
        first_seq,
        &Message::Hello {
            role: NodeRole::Agent,
            incarnation: 42,
            name: "replay-agent",
            listen: None,
            backup_of: None,
            versions: unid_proto::VERSIONS,
            software: unid_proto::SOFTWARE,
        },
    );
    let Message::Welcome { node_id, .. } = exchange(&agent, &hello) else {
        panic!("no Welcome");
    };
    assert_eq!(s.stats().registrations, 1);
    // 70 block requests: more than the reply cache keeps per agent (64).
    let requests: Vec<Vec<u8>> = (1..=70)
        .map(|i| {
            let msg = Message::BlockRequest {
                sequence: "replayed",
                count: 10,
            };
            datagram(&mut codec, node_id, first_seq + i, &msg)
        })
        .collect();
    for r in &requests {
        assert!(matches!(exchange(&agent, r), Message::BlockGrant { .. }));
    }
    let grants = s.stats().grants;
    assert_eq!(grants, 70);

    // The attacker: captured datagrams, sent from other source ports.
    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    attacker
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let before = s.stats().dropped_replay;
    let mut buf = [0u8; 1500];
    for r in &requests[..6] {
        attacker.send_to(r, addr).unwrap();
        // Answered `Replayed` (the real agent would ask again under a new seq): no block.
        let (n, _) = attacker.recv_from(&mut buf).expect("an answer to a replay");
        assert!(
            matches!(
                decode(&buf[..n], Some(&key)).unwrap().message,
                Message::Error {
                    code: ErrorCode::Replayed,
                    ..
                }
            ),
            "a replay got something else than Replayed"
        );
    }
    for _ in 0..5 {
        let other = UdpSocket::bind("127.0.0.1:0").unwrap();
        other.send_to(&hello, addr).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        s.stats().grants,
        grants,
        "a replayed BlockRequest got a block"
    );
    assert_eq!(
        s.stats().registrations,
        1,
        "a replayed Hello registered again"
    );
    assert!(s.stats().dropped_replay >= before + 11, "{:?}", s.stats());
    // The real agent is served on.
    let next = datagram(
        &mut codec,
        node_id,
        first_seq + 71,
        &Message::BlockRequest {
            sequence: "replayed",
            count: 10,
        },
    );
    assert!(matches!(
        exchange(&agent, &next),
        Message::BlockGrant { .. }
    ));
    assert_eq!(s.stats().grants, grants + 1);
    s.shutdown().unwrap();
}

/// Issue 12 item 1 (defence in depth): a cluster gets a random id when it is created, kept
/// across restarts and carried in every answer; a datagram carrying another cluster's id is
/// dropped and counted, one carrying 0 (first contact) or the right id is served. Before:
/// nothing told two clusters' datagrams apart.
#[test]
fn the_cluster_id_is_carried_kept_and_checked() {
    let root = tempfile::tempdir().unwrap();
    let start = |init: bool| {
        let mut config = ServerConfig::new(1, root.path().join("s1"));
        config.udp_addr = local(18320);
        config.raft_addr = local(18321);
        config.init = init;
        run(config).expect("server starts")
    };
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // A Ping stamped with `cluster`: the answer's cluster id, if answered.
    let ping = |cluster: u64, seq: u64| -> Option<u64> {
        let mut codec = Codec::new();
        codec.set_cluster(cluster);
        let mut out = [0u8; 1200];
        let h = Header {
            sender: 0,
            seq,
            reply_to: 0,
            epoch: 0,
        };
        let n = codec
            .encode(&h, &Message::Ping { sent_us: 1 }, None, &mut out)
            .unwrap();
        sock.send_to(&out[..n], local(18320)).unwrap();
        let mut buf = [0u8; 1500];
        let (m, _) = sock.recv_from(&mut buf).ok()?;
        Some(decode(&buf[..m], None).unwrap().cluster)
    };
    let until_known = |seq: &mut u64| -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            *seq += 1;
            if let Some(c) = ping(0, *seq)
                && c != 0
            {
                return c;
            }
            assert!(Instant::now() < deadline, "no cluster id in the answers");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let s = start(true);
    let mut seq = 0;
    let cluster = until_known(&mut seq);
    seq += 1;
    assert_eq!(ping(cluster, seq), Some(cluster));
    let before = s.stats().dropped_cluster;
    seq += 1;
    assert_eq!(
        ping(cluster ^ 0x5a5a, seq),
        None,
        "another cluster's datagram served"
    );
    assert_eq!(s.stats().dropped_cluster, before + 1);
    s.shutdown().unwrap();
    let s = start(false);
    assert_eq!(
        until_known(&mut seq),
        cluster,
        "the cluster id changed on restart"
    );
    s.shutdown().unwrap();
}
