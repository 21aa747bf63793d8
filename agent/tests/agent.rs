//! The agent against fake servers (`unid_agent::testing`): ids from the ring
//! and the socket, failures of the cluster, redirects, restarts.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use unid_agent::testing::{FakeCluster, Mode};
use unid_agent::{AgentConfig, AgentHandle, Connection, PathLoss, PathState, SequenceState};

static DIRS: AtomicU32 = AtomicU32::new(0);

/// A fresh ring folder under /dev/shm, removed on drop.
struct RingDir(PathBuf);

impl RingDir {
    fn new() -> RingDir {
        let n = DIRS.fetch_add(1, Ordering::Relaxed);
        let p = PathBuf::from(format!(
            "/dev/shm/unid-agent-test-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        RingDir(p)
    }
}

impl Drop for RingDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(servers: Vec<SocketAddr>, dir: &RingDir, sequences: &[&str]) -> AgentConfig {
    let mut c = AgentConfig::new(servers);
    c.ring_dir = dir.0.clone();
    c.sequences = sequences.iter().map(|s| s.parse().unwrap()).collect();
    c.socket = Some("127.0.0.1:0".parse().unwrap());
    c.sizing.refill_period_ms = 50;
    c.sizing.rate_tau_ms = 50;
    c.requester.request_timeout_ms = 1000;
    c.requester.rto_max_ms = 100;
    c
}

fn wait_until(what: &str, timeout_ms: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn client(dir: &RingDir, agent: &AgentHandle, sequence: &str) -> unid::Unid {
    let options = unid::Options {
        ring_dir: dir.0.clone(),
        socket: agent.socket_addr().unwrap(),
        socket_fallback: true,
        wait: Duration::from_secs(3),
        backup_ring_dir: None,
        agent_uid: None,
    };
    unid::Unid::open_with(sequence, options).unwrap()
}

/// `NEXT` over the socket: the ids, or the `ERR` line.
fn socket_next(
    conn: &mut BufReader<TcpStream>,
    sequence: &str,
    n: u64,
) -> Result<Vec<u128>, String> {
    conn.get_mut()
        .write_all(format!("NEXT {sequence} {n}\n").as_bytes())
        .unwrap();
    let mut head = String::new();
    conn.read_line(&mut head).unwrap();
    let head = head.trim_end();
    if head.starts_with("ERR ") {
        return Err(head.to_owned());
    }
    let parts: Vec<&str> = head.split(' ').collect();
    assert_eq!(parts[0], "OK", "{head}");
    let k: usize = parts[1].parse().unwrap();
    assert!(k >= 1 && k as u64 <= n);
    (0..k)
        .map(|_| {
            let mut l = String::new();
            conn.read_line(&mut l).unwrap();
            Ok(l.trim_end().parse().unwrap())
        })
        .collect()
}

fn connect(agent: &AgentHandle) -> BufReader<TcpStream> {
    let s = TcpStream::connect(agent.socket_addr().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    BufReader::new(s)
}

fn assert_increasing(ids: &[u128], who: &str) {
    for w in ids.windows(2) {
        assert!(w[0] < w[1], "{who}: {} then {}", w[0], w[1]);
    }
}

/// Every id was granted by the cluster and appears once.
fn assert_unique_and_granted(all: &[&[u128]], cluster: &FakeCluster) {
    let mut seen = HashSet::new();
    for ids in all {
        for id in *ids {
            assert!(seen.insert(*id), "id {id} handed out twice");
        }
    }
    let granted = cluster.granted();
    for id in &seen {
        assert!(
            granted
                .iter()
                .any(|(_, f, c)| *id >= *f && *id < f + u128::from(*c)),
            "id {id} was never granted"
        );
    }
}

#[test]
fn ring_and_socket_hand_out_unique_increasing_ids() {
    let dir = RingDir::new();
    let cluster = FakeCluster::new(8, &["orders"]);
    let server = cluster.start_server(1).unwrap();
    server.set_duplicate(true);
    let agent = unid_agent::run(config(vec![server.addr()], &dir, &["orders"])).unwrap();
    wait_until("ring", 5000, || dir.0.join("orders").exists());
    let mut ring = client(&dir, &agent, "orders");
    assert!(ring.via_ring());
    let mut via_ring = Vec::new();
    for _ in 0..20_000 {
        via_ring.push(ring.next().unwrap().get());
    }
    let mut batch: Vec<u128> = ring.take(5000).unwrap().iter().map(|i| i.get()).collect();
    via_ring.append(&mut batch);
    let t = std::thread::spawn({
        let addr = agent.socket_addr().unwrap();
        move || {
            let s = TcpStream::connect(addr).unwrap();
            let mut conn = BufReader::new(s);
            let mut ids = Vec::new();
            while ids.len() < 20_000 {
                ids.extend(socket_next(&mut conn, "orders", 1000).unwrap());
            }
            ids
        }
    });
    for _ in 0..20_000 {
        via_ring.push(ring.next().unwrap().get());
    }
    let via_socket = t.join().unwrap();
    assert_increasing(&via_ring, "ring consumer");
    assert_increasing(&via_socket, "socket consumer");
    assert_unique_and_granted(&[&via_ring, &via_socket], &cluster);
    let m = agent.metrics();
    assert!(m.grants.load(Ordering::Relaxed) >= 2);
    assert_eq!(m.grants_rejected.load(Ordering::Relaxed), 0);
    let st = agent.status();
    assert_eq!(st.connection, Connection::Connected);
    assert!(st.node_id != 0);
    assert_eq!(st.sequences[0].state, SequenceState::Serving);
    // Metrics: on the line protocol and as HTTP for Prometheus.
    let mut conn = connect(&agent);
    conn.get_mut().write_all(b"METRICS\n").unwrap();
    let mut head = String::new();
    conn.read_line(&mut head).unwrap();
    let k: usize = head
        .trim_end()
        .strip_prefix("OK ")
        .unwrap()
        .parse()
        .unwrap();
    let lines: Vec<String> = (0..k)
        .map(|_| {
            let mut l = String::new();
            conn.read_line(&mut l).unwrap();
            l
        })
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("unid_agent_grants_total "))
    );
    let mut http = TcpStream::connect(agent.socket_addr().unwrap()).unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    std::io::Read::read_to_string(&mut http, &mut body).unwrap();
    assert!(body.starts_with("HTTP/1.0 200 OK\r\n"), "{body}");
    assert!(
        body.contains("unid_agent_ring_ids{sequence=\"orders\"}"),
        "{body}"
    );
}

#[test]
fn socket_rejects_bad_input_and_keeps_serving() {
    let dir = RingDir::new();
    let cluster = FakeCluster::new(4, &["a"]);
    let server = cluster.start_server(1).unwrap();
    let mut c = config(vec![server.addr()], &dir, &["a"]);
    c.socket_connections_max = 2;
    let agent = unid_agent::run(c).unwrap();
    let mut conn = connect(&agent);
    let mut ask = |line: &[u8]| {
        conn.get_mut().write_all(line).unwrap();
        let mut l = String::new();
        conn.read_line(&mut l).unwrap();
        l
    };
    assert_eq!(ask(b"PING\n"), "PONG\n");
    assert_eq!(ask(b"ping\r\n"), "PONG\n");
    for bad in [
        &b"HELLO\n"[..],
        b"\n",
        b"NEXT\n",
        b"NEXT a 0\n",
        b"NEXT a 10001\n",
        b"NEXT a -1\n",
        b"NEXT a 1 2\n",
        b"NEXT a x\n",
        b"\xff\xfe\n",
    ] {
        let l = ask(bad);
        assert!(l.starts_with("ERR BAD_REQUEST "), "{bad:?} -> {l}");
    }
    let l = ask(b"NEXT nope 1\n");
    assert!(l.starts_with("ERR UNKNOWN_SEQUENCE "), "{l}");
    let l = ask(b"NEXT a 3\n");
    assert!(l.starts_with("OK ") && l.ends_with(" 4\n"), "{l}");
    // Connection bound: a third connection is refused politely.
    let _second = connect(&agent);
    wait_until("two connections", 2000, || {
        let mut third = connect(&agent);
        let mut l = String::new();
        third.get_mut().write_all(b"PING\n").unwrap();
        let _ = third.read_line(&mut l);
        l.starts_with("ERR BUSY")
    });
    // A too-long line closes the connection with an error.
    let mut long = connect(&agent);
    drop(conn);
    let _ = long.get_mut().write_all(&[b'x'; 300]);
    let mut l = String::new();
    let _ = long.read_line(&mut l);
    assert!(
        l.starts_with("ERR BAD_REQUEST") || l.starts_with("ERR BUSY"),
        "{l}"
    );
    assert!(agent.is_running());
}

#[test]
fn keeps_serving_while_the_cluster_is_gone_and_recovers() {
    let dir = RingDir::new();
    let cluster = FakeCluster::new(8, &["s"]);
    let server = cluster.start_server(1).unwrap();
    let mut c = config(vec![server.addr()], &dir, &["s"]);
    c.sizing.block_ids_min = 1000;
    let agent = unid_agent::run(c).unwrap();
    let mut ids = client(&dir, &agent, "s");
    let mut got = vec![ids.next().unwrap().get()];
    wait_until("ring full", 5000, || {
        agent.status().sequences[0].ring_ids >= 1000
    });
    server.set_mode(Mode::Silent);
    // The cluster is gone: the ring still serves what it holds.
    for _ in 0..500 {
        got.push(ids.next().unwrap().get());
    }
    wait_until("unreachable", 10_000, || {
        agent.status().connection == Connection::Unreachable
    });
    for _ in 0..100 {
        got.push(ids.next().unwrap().get());
    }
    server.set_mode(Mode::Leader);
    wait_until("connected again", 10_000, || {
        agent.status().connection == Connection::Connected
    });
    for _ in 0..5000 {
        got.push(ids.next().unwrap().get());
    }
    assert_increasing(&got, "client");
    assert_unique_and_granted(&[&got], &cluster);
}

#[test]
fn follows_redirects_not_ready_and_leader_change() {
    let dir = RingDir::new();
    let cluster = FakeCluster::new(8, &["r"]);
    let leader = cluster.start_server(1).unwrap();
    let follower = cluster.start_server(2).unwrap();
    let spare = cluster.start_server(3).unwrap();
    follower.set_mode(Mode::Follower(Some(leader.addr())));
    leader.set_mode(Mode::NotReady);
    spare.set_mode(Mode::Silent);
    // The follower is asked first and names the leader; the leader is not
    // ready for a while.
    let agent = unid_agent::run(config(
        vec![follower.addr(), leader.addr(), spare.addr()],
        &dir,
        &["r"],
    ))
    .unwrap();
    wait_until("registered via redirect", 5000, || {
        agent.status().node_id != 0
    });
    assert_eq!(agent.status().leader, Some(leader.addr()));
    std::thread::sleep(Duration::from_millis(100));
    assert!(cluster.granted().is_empty());
    leader.set_mode(Mode::Leader);
    let mut ids = client(&dir, &agent, "r");
    let mut got: Vec<u128> = ids.take(100).unwrap().iter().map(|i| i.get()).collect();
    assert!(agent.metrics().redirects.load(Ordering::Relaxed) >= 1);
    // The leader hands over to `spare`: the agent moves at once.
    spare.set_mode(Mode::Leader);
    spare.set_epoch(2);
    leader.set_epoch(2);
    assert!(leader.send_leader_change(3, spare.addr()) >= 1);
    wait_until("switched", 2000, || {
        agent.status().leader == Some(spare.addr())
    });
    leader.set_mode(Mode::Silent);
    let before = spare.received();
    for _ in 0..3000 {
        got.push(ids.next().unwrap().get());
    }
    wait_until("spare asked", 5000, || spare.received() > before);
    assert!(agent.metrics().leader_changes.load(Ordering::Relaxed) >= 1);
    assert_increasing(&got, "client");
    assert_unique_and_granted(&[&got], &cluster);
}

#[test]
fn restart_never_repeats_ids_and_reregisters() {
    let dir = RingDir::new();
    let cluster = FakeCluster::new(8, &["x"]);
    let server = cluster.start_server(1).unwrap();
    let mut got = Vec::new();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let agent = unid_agent::run(config(vec![server.addr()], &dir, &["x"])).unwrap();
        let mut ids = client(&dir, &agent, "x");
        for _ in 0..2000 {
            got.push(ids.next().unwrap().get());
        }
        // The status snapshot trails the driver by up to 20 ms.
        wait_until("status", 1000, || agent.status().node_id != 0);
        nodes.push(agent.status().node_id);
        agent.stop();
        // The stopped agent's ring is closed: a handle drains what was
        // published, then reports it.
        let e = loop {
            match ids.next() {
                Ok(id) => got.push(id.get()),
                Err(e) => break e,
            }
        };
        assert!(matches!(e, unid::Error::AgentNotRunning { .. }), "{e}");
    }
    assert_increasing(&got, "client across restarts");
    assert_unique_and_granted(&[&got], &cluster);
    nodes.dedup();
    assert_eq!(nodes.len(), 3, "a new node id each start: {nodes:?}");
}

#[test]
fn forgotten_registration_and_unknown_or_exhausted_sequences() {
    let dir = RingDir::new();
    let cluster = FakeCluster::new(2, &["small"]);
    let server = cluster.start_server(1).unwrap();
    let mut c = config(vec![server.addr()], &dir, &["small", "missing"]);
    c.socket_wait_ms = 300;
    let agent = unid_agent::run(c).unwrap();
    let mut small = client(&dir, &agent, "small");
    let first = small.next().unwrap();
    assert_eq!(first.width(), unid::Width::W2);
    let n = agent.status().node_id;
    server.set_mode(Mode::ForgetRegistrations);
    std::thread::sleep(Duration::from_millis(50));
    server.set_mode(Mode::Leader);
    // Drain until the agent must ask again; it re-registers when told.
    let mut got = vec![first.get()];
    for _ in 0..3000 {
        got.push(small.next().unwrap().get());
    }
    assert_increasing(&got, "small");
    let _ = n;
    // The cluster does not know `missing`.
    wait_until("unknown", 5000, || {
        agent.status().sequences[1].state == SequenceState::UnknownSequence
    });
    let mut missing = client(&dir, &agent, "missing");
    let e = missing.next().unwrap_err();
    assert!(matches!(e, unid::Error::UnknownSequence { .. }), "{e}");
    // Exhausted: the W2 sequence runs dry.
    cluster.set_exhausted(true);
    let e = loop {
        match small.take(1000) {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(
            e,
            unid::Error::Exhausted { .. } | unid::Error::NotReady { .. }
        ),
        "{e}"
    );
}

#[test]
fn cluster_secret_is_used_for_every_datagram() {
    let dir = RingDir::new();
    let cluster = FakeCluster::new(8, &["k"]).with_secret(b"s3cret");
    let server = cluster.start_server(1).unwrap();
    let mut c = config(vec![server.addr()], &dir, &["k"]);
    c.key = Some(unid_proto::AuthKey::from_secret(b"s3cret"));
    let agent = unid_agent::run(c).unwrap();
    let mut ids = client(&dir, &agent, "k");
    ids.take(100).unwrap();
    // A wrong secret: nothing gets through.
    let dir2 = RingDir::new();
    let mut c = config(vec![server.addr()], &dir2, &["k"]);
    c.key = Some(unid_proto::AuthKey::from_secret(b"wrong"));
    let agent2 = unid_agent::run(c).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(agent2.status().node_id, 0);
}

#[test]
fn a_ring_that_cannot_be_created_is_reported_and_harms_nothing_else() {
    let dir = RingDir::new();
    let cluster = FakeCluster::new(8, &["one"]);
    let server = cluster.start_server(1).unwrap();
    let first = unid_agent::run(config(vec![server.addr()], &dir, &["one"])).unwrap();
    let mut ids = client(&dir, &first, "one");
    ids.next().unwrap();
    // A ring folder that cannot be created (a file is in the way). (A ring
    // served by another live agent process, `InUse`, is covered by the
    // `agent_processes` test in unid-cli.)
    let blocked = RingDir::new();
    std::fs::write(&blocked.0, b"not a folder").unwrap();
    let second = unid_agent::run(config(vec![server.addr()], &blocked, &["one"])).unwrap();
    wait_until("ring error", 5000, || {
        matches!(
            second.status().sequences[0].state,
            SequenceState::RingError(_)
        )
    });
    // The first agent is unaffected.
    ids.take(1000).unwrap();
    let _ = std::fs::remove_file(&blocked.0);
}

#[test]
fn learns_servers_from_welcome_without_registering_twice() {
    learns_servers(false);
}

#[test]
fn learns_servers_from_the_node_table_when_welcome_is_truncated() {
    learns_servers(true);
}

fn learns_servers(truncate: bool) {
    let dir = RingDir::new();
    let cluster = FakeCluster::new(8, &["w"]);
    let leader = cluster.start_server(1).unwrap();
    let other = cluster.start_server(2).unwrap();
    // Only the leader is configured; it lists both in Welcome, or (second
    // run) says the list is truncated and lists them in its node table.
    leader.set_servers(&[(1, leader.addr()), (2, other.addr())]);
    leader.set_truncate(truncate);
    let agent = unid_agent::run(config(vec![leader.addr()], &dir, &["w"])).unwrap();
    let mut ids = client(&dir, &agent, "w");
    ids.take(100).unwrap();
    assert_eq!(cluster.registrations(), 1);
    assert_eq!(agent.metrics().registrations.load(Ordering::Relaxed), 1);
    // The leader dies; the other server (learned, not configured) takes over.
    leader.kill();
    let before = other.received();
    let mut got = Vec::new();
    for _ in 0..5000 {
        got.push(ids.next().unwrap().get());
    }
    assert!(
        other.received() > before,
        "the learned server was never asked"
    );
    assert_increasing(&got, "client");
    assert_unique_and_granted(&[&got], &cluster);
}

#[test]
fn starting_without_a_cluster_says_so_and_recovers() {
    let dir = RingDir::new();
    let cluster = FakeCluster::new(8, &["late"]);
    let server = cluster.start_server(1).unwrap();
    server.set_mode(Mode::Silent);
    let mut c = config(vec![server.addr()], &dir, &["late"]);
    c.socket_wait_ms = 100;
    let agent = unid_agent::run(c).unwrap();
    wait_until("unreachable", 5000, || {
        agent.status().connection == Connection::Unreachable
    });
    assert_eq!(agent.status().node_id, 0);
    let mut conn = connect(&agent);
    let e = socket_next(&mut conn, "late", 5).unwrap_err();
    assert!(e.starts_with("ERR NOT_READY "), "{e}");
    server.set_mode(Mode::Leader);
    wait_until("connected", 10_000, || {
        agent.status().connection == Connection::Connected
    });
    wait_until("ids in the ring", 10_000, || {
        agent.status().sequences[0].ring_ids >= 5
    });
    let got = socket_next(&mut conn, "late", 5).unwrap();
    assert_eq!(got.len(), 5);
}

#[test]
fn a_dead_server_is_noticed_by_the_fast_signal_and_the_other_serves() {
    let dir = RingDir::new();
    let cluster = FakeCluster::new(8, &["f"]);
    let first = cluster.start_server(1).unwrap();
    let second = cluster.start_server(2).unwrap();
    let dead = first.addr();
    let mut c = config(vec![dead, second.addr()], &dir, &["f"]);
    // Long timers: only the fast signal can move the agent off the dead
    // server before the requests time out.
    c.requester.request_timeout_ms = 20_000;
    c.requester.rto_max_ms = 10_000;
    c.requester.rto_initial_ms = 5_000;
    let agent = unid_agent::run(c).unwrap();
    let mut ids = client(&dir, &agent, "f");
    let mut got = vec![ids.next().unwrap().get()];
    assert_eq!(agent.status().leader, Some(dead));
    let granted_before = cluster.granted().len();
    // The process goes: its port answers "port unreachable" (ECONNREFUSED
    // on the agent's connected socket).
    first.kill();
    wait_until("the dead server's path down", 5_000, || {
        let st = agent.status();
        st.servers
            .iter()
            .any(|p| p.addr == dead && p.state == PathState::Down(PathLoss::Refused))
    });
    wait_until("a grant from the other server", 5_000, || {
        got.push(ids.next().unwrap().get());
        cluster.granted().len() > granted_before + 1
    });
    let st = agent.status();
    assert_eq!(st.leader, Some(second.addr()));
    assert_eq!(st.connection, Connection::Connected);
    assert!(!st.network_down);
    assert!(agent.metrics().path_errors.load(Ordering::Relaxed) >= 1);
    assert_eq!(agent.metrics().path_losses.load(Ordering::Relaxed), 1);
    let text = agent.prometheus();
    assert!(text.contains("unid_agent_path_losses_total 1"), "{text}");
    assert_increasing(&got, "client");
    assert_unique_and_granted(&[&got], &cluster);
}

/// A server that is not the leader may be in a higher term than the leader (a partitioned
/// server's failed elections raise its term). Its redirects and node-table pages must not make
/// the agent drop the real, lower-term leader's answers (found by `sim/` in the core
/// requester; the driver had its own copy of the rule).
#[test]
fn a_higher_term_follower_does_not_hide_the_lower_term_leader() {
    let dir = RingDir::new();
    let cluster = FakeCluster::new(8, &["e"]);
    let follower = cluster.start_server(1).unwrap();
    let leader = cluster.start_server(2).unwrap();
    follower.set_mode(Mode::Follower(Some(leader.addr())));
    follower.set_epoch(100);
    leader.set_epoch(3);
    // The follower is asked first (and again after every rotation).
    let agent =
        unid_agent::run(config(vec![follower.addr(), leader.addr()], &dir, &["e"])).unwrap();
    wait_until("registered with the lower-term leader", 5000, || {
        agent.status().node_id != 0
    });
    assert!(agent.metrics().redirects.load(Ordering::Relaxed) >= 1);
    let mut ids = client(&dir, &agent, "e");
    let got: Vec<u128> = ids.take(500).unwrap().iter().map(|i| i.get()).collect();
    assert_eq!(got.len(), 500);
    assert_increasing(&got, "client");
    assert_unique_and_granted(&[&got], &cluster);
    // A stale leader below the leader's term is still ignored.
    assert!(agent.status().epoch >= 3, "{:?}", agent.status().epoch);
}

/// Issue 12 item 10: a drained sequence stays `EXHAUSTED` after a restart
/// (the new agent finds the old run's closed ring in the folder).
#[test]
fn exhausted_survives_an_agent_restart() {
    let dir = RingDir::new();
    let cluster = FakeCluster::new(2, &["tiny"]);
    let server = cluster.start_server(1).unwrap();
    let mut c = config(vec![server.addr()], &dir, &["tiny"]);
    c.socket_wait_ms = 300;
    let agent = unid_agent::run(c.clone()).unwrap();
    let mut ids = client(&dir, &agent, "tiny");
    ids.next().unwrap();
    cluster.set_exhausted(true);
    let e = loop {
        match ids.take(1000) {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(matches!(e, unid::Error::Exhausted { .. }), "{e}");
    agent.stop();
    let agent = unid_agent::run(c).unwrap();
    wait_until("exhausted", 5000, || {
        agent.status().sequences[0].state == SequenceState::Exhausted
    });
    let mut conn = connect(&agent);
    let e = socket_next(&mut conn, "tiny", 1).unwrap_err();
    assert!(e.starts_with("ERR EXHAUSTED"), "{e}");
    let mut ids = client(&dir, &agent, "tiny");
    let e = ids.next().unwrap_err();
    assert!(matches!(e, unid::Error::Exhausted { .. }), "{e}");
}

/// Issue 12 item 5: a `LeaderChange` from a known server's address (forged: no secret)
/// naming a server the agent does not know is ignored, counted, and the agent keeps taking
/// blocks from its cluster. Before: the agent switched to the fake leader and took its blocks
/// (ids another cluster also hands out).
#[test]
fn a_leader_change_naming_an_unknown_server_is_ignored() {
    let dir = RingDir::new();
    let cluster = FakeCluster::new(8, &["f"]);
    let leader = cluster.start_server(1).unwrap();
    let impostors = FakeCluster::new(8, &["f"]);
    let fake = impostors.start_server(9).unwrap();
    let agent = unid_agent::run(config(vec![leader.addr()], &dir, &["f"])).unwrap();
    wait_until("registered", 5000, || agent.status().node_id != 0);
    let mut ids = client(&dir, &agent, "f");
    let mut got: Vec<u128> = ids.take(100).unwrap().iter().map(|i| i.get()).collect();
    assert!(leader.send_leader_change(9, fake.addr()) >= 1);
    wait_until("rejected", 2000, || {
        agent
            .metrics()
            .leader_changes_rejected
            .load(Ordering::Relaxed)
            >= 1
    });
    for _ in 0..3000 {
        got.push(ids.next().unwrap().get());
    }
    assert_eq!(agent.status().leader, Some(leader.addr()));
    assert_eq!(fake.received(), 0, "the agent asked the fake leader");
    assert!(impostors.granted().is_empty());
    assert_eq!(agent.metrics().leader_changes.load(Ordering::Relaxed), 0);
    assert_increasing(&got, "client");
    assert_unique_and_granted(&[&got], &cluster);
}

/// Issue 12 item 5: a `LeaderChange` with `epoch = 2^64-1` from a known server's address
/// is ignored and does not make the real leader's answers stale. Before: every real answer
/// was dropped until the agent restarted (its log said only `cluster unreachable`).
#[test]
fn a_leader_change_with_an_absurd_epoch_does_not_stall_real_answers() {
    let dir = RingDir::new();
    let cluster = FakeCluster::new(8, &["g"]);
    let leader = cluster.start_server(1).unwrap();
    let other = cluster.start_server(2).unwrap();
    other.set_mode(Mode::Follower(Some(leader.addr())));
    leader.set_epoch(4);
    other.set_epoch(4);
    let agent = unid_agent::run(config(vec![leader.addr(), other.addr()], &dir, &["g"])).unwrap();
    wait_until("registered", 5000, || agent.status().node_id != 0);
    let mut ids = client(&dir, &agent, "g");
    let mut got: Vec<u128> = ids.take(100).unwrap().iter().map(|i| i.get()).collect();
    // Naming a known server and the leader itself: both too far ahead.
    assert!(leader.send_leader_change_at(2, other.addr(), u64::MAX) >= 1);
    assert!(leader.send_leader_change_at(1, leader.addr(), 6) >= 1);
    wait_until("rejected", 2000, || {
        agent
            .metrics()
            .leader_changes_rejected
            .load(Ordering::Relaxed)
            >= 2
    });
    let grants = agent.metrics().grants.load(Ordering::Relaxed);
    for _ in 0..3000 {
        got.push(ids.next().unwrap().get());
    }
    assert!(agent.metrics().grants.load(Ordering::Relaxed) > grants);
    assert_eq!(agent.status().epoch, 4);
    assert_eq!(agent.status().connection, Connection::Connected);
    // One step above what the leader answered, naming a known server: followed, and the
    // epoch filter is raised by that server's own answers, not by the message.
    other.set_mode(Mode::Leader);
    other.set_epoch(5);
    assert!(leader.send_leader_change_at(2, other.addr(), 5) >= 1);
    wait_until("switched", 2000, || {
        agent.status().leader == Some(other.addr())
    });
    leader.set_mode(Mode::Silent);
    for _ in 0..3000 {
        got.push(ids.next().unwrap().get());
    }
    wait_until("epoch raised by the new leader", 2000, || {
        agent.status().epoch == 5
    });
    assert_increasing(&got, "client");
    assert_unique_and_granted(&[&got], &cluster);
}
