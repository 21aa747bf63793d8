//! Multi-node clusters in one process over real TCP on 127.0.0.1.
//!
//! The tests take a shared lock so that only one cluster runs at a time:
//! on two cores, several debug-build clusters at once starve each other's
//! heartbeats and cause spurious elections that slow everything down.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use unid_consensus::error::Error;
use unid_consensus::node::{ConsensusNode, NodeConfig, Role};
use unid_consensus::state::AGENT_ID_FIRST;
use unid_proto::types::{NodeId, SequenceName, Width};

static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SECRET: &[u8] = b"test cluster secret";

fn name(s: &str) -> SequenceName {
    SequenceName::new(s).unwrap()
}

struct Cluster {
    _root: tempfile::TempDir,
    dirs: BTreeMap<NodeId, PathBuf>,
    addrs: BTreeMap<NodeId, SocketAddr>,
    nodes: BTreeMap<NodeId, ConsensusNode>,
    tweak: fn(&mut NodeConfig),
}

impl Cluster {
    /// Starts `n` nodes (ids 1..=n) and initializes them as one cluster.
    async fn start(n: u64, tweak: fn(&mut NodeConfig)) -> Cluster {
        let root = tempfile::tempdir().unwrap();
        let mut c = Cluster {
            dirs: BTreeMap::new(),
            addrs: BTreeMap::new(),
            nodes: BTreeMap::new(),
            _root: root,
            tweak,
        };
        for id in 1..=n {
            c.start_node(id).await;
        }
        let members: BTreeMap<NodeId, String> =
            c.addrs.iter().map(|(id, a)| (*id, a.to_string())).collect();
        c.nodes[&1].initialize_with(members).await.unwrap();
        c
    }

    fn config(&self, id: NodeId) -> NodeConfig {
        let dir = self._root.path().join(format!("node{id}"));
        let addr = self
            .addrs
            .get(&id)
            .copied()
            .unwrap_or_else(|| "127.0.0.1:0".parse().unwrap());
        let mut cfg = NodeConfig::new(id, dir, addr);
        cfg.secret = Some(SECRET.to_vec());
        (self.tweak)(&mut cfg);
        cfg
    }

    async fn start_node(&mut self, id: NodeId) -> &ConsensusNode {
        let cfg = self.config(id);
        self.dirs.insert(id, cfg.data_dir.clone());
        let node = ConsensusNode::start(cfg).await.unwrap();
        self.addrs.insert(id, node.raft_addr());
        self.nodes.insert(id, node);
        &self.nodes[&id]
    }

    async fn stop(&mut self, id: NodeId) {
        let node = self.nodes.remove(&id).unwrap();
        node.stop_without_handoff().await.unwrap();
    }

    /// Waits until every running node agrees on one leader that is running.
    async fn leader(&self, within: Duration) -> NodeId {
        let deadline = Instant::now() + within;
        loop {
            let leaders: BTreeSet<Option<NodeId>> =
                self.nodes.values().map(|n| n.metrics().leader).collect();
            if leaders.len() == 1
                && let Some(Some(l)) = leaders.into_iter().next()
                && let Some(node) = self.nodes.get(&l)
                && node.metrics().role == Role::Leader
            {
                return l;
            }
            assert!(Instant::now() < deadline, "no leader within {within:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits for a leader among the running nodes, whatever stopped nodes
    /// think; returns it and how long it took.
    async fn any_leader(&self, within: Duration) -> (NodeId, Duration) {
        let t0 = Instant::now();
        loop {
            for (id, n) in &self.nodes {
                if n.metrics().role == Role::Leader {
                    return (*id, t0.elapsed());
                }
            }
            assert!(t0.elapsed() < within, "no leader within {within:?}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn shutdown(self) {
        for (_, n) in self.nodes {
            n.stop_without_handoff().await.unwrap();
        }
    }
}

fn defaults(_: &mut NodeConfig) {}

const ELECTION_WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_raise_and_fail_over() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut c = Cluster::start(3, defaults).await;
    let l = c.leader(ELECTION_WAIT).await;
    let leader = &c.nodes[&l];
    let f = *c.nodes.keys().find(|id| **id != l).unwrap();
    let follower = &c.nodes[&f];

    // --init is one-time.
    assert!(matches!(
        leader.initialize().await,
        Err(Error::AlreadyInitialized)
    ));
    assert!(matches!(
        follower.initialize().await,
        Err(Error::AlreadyInitialized)
    ));

    let orders = name("orders");
    assert_eq!(
        leader.create_sequence(&orders, Width::W8, 1).await.unwrap(),
        1
    );
    // Through the follower (forwarded to the leader): already exists.
    assert!(matches!(
        follower.create_sequence(&orders, Width::W8, 1).await,
        Err(Error::Rejected(
            unid_consensus::state::Rejection::SequenceExists
        ))
    ));
    let mut committed_max = 0;
    for (via, want, expect) in [
        (l, 1000, 1000),
        (f, 500, 1000),
        (f, 2000, 2000),
        (l, 1999, 2000),
    ] {
        let got = c.nodes[&via].raise_ceiling(&orders, want).await.unwrap();
        assert_eq!(got, expect);
        assert!(got >= committed_max, "a committed ceiling went down");
        committed_max = got;
    }
    // Beyond the width's limit: refused, not clamped.
    assert!(matches!(
        leader.raise_ceiling(&orders, u64::MAX as u128 + 1).await,
        Err(Error::Rejected(_))
    ));
    // A follower may not serve ceilings for granting.
    assert!(matches!(
        follower.ready_ceilings().await,
        Err(Error::NotLeader { .. })
    ));
    assert_eq!(
        leader.ready_ceilings().await.unwrap()["orders"].ceiling,
        2000
    );

    // Agents get fresh ids above the server range.
    let a1 = follower
        .register_agent("host-a", 1, "127.0.0.1", 7000, "app")
        .await
        .unwrap();
    let a2 = leader
        .register_agent("host-a", 2, "127.0.0.1", 7000, "app")
        .await
        .unwrap();
    assert!(a1 >= AGENT_ID_FIRST && a2 > a1);
    leader.set_setting("lease_ms", 3000).await.unwrap();

    // Leader watch reports the leader and its term.
    let info = *follower.leader_watch().borrow();
    assert_eq!(info.leader, Some(l));
    assert!(info.member);

    // Graceful shutdown of the leader: handoff to the most up-to-date voter.
    let old_term = leader.metrics().term;
    let t0 = Instant::now();
    c.nodes.remove(&l).unwrap().shutdown().await.unwrap();
    let (l2, _) = c.any_leader(ELECTION_WAIT).await;
    let handoff = t0.elapsed();
    eprintln!("graceful handoff: new leader {l2} after {handoff:?}");
    let new_leader = &c.nodes[&l2];
    assert!(new_leader.metrics().term > old_term);
    let ceilings = new_leader.ready_ceilings().await.unwrap();
    assert!(ceilings["orders"].ceiling >= committed_max);
    let st = new_leader.ready_state().await.unwrap();
    assert_eq!(st.state.setting("lease_ms", 0), 3000);
    assert!(st.state.nodes.contains_key(&a2) && !st.state.nodes.contains_key(&a1));
    // Agent ids are never reused, even by a new leader.
    let a3 = new_leader
        .register_agent("host-b", 1, "127.0.0.1", 7001, "app")
        .await
        .unwrap();
    assert!(a3 > a2);

    // Bring the old leader back, then crash the current one (no handoff).
    c.start_node(l).await;
    let got = c.nodes[&l2].raise_ceiling(&orders, 3000).await.unwrap();
    committed_max = committed_max.max(got);
    c.leader(ELECTION_WAIT).await;
    let crashed = c.leader(ELECTION_WAIT).await;
    let term = c.nodes[&crashed].metrics().term;
    let t0 = Instant::now();
    c.stop(crashed).await;
    let (l3, _) = c.any_leader(ELECTION_WAIT).await;
    let failover = t0.elapsed();
    eprintln!("crash failover: new leader {l3} after {failover:?}");
    assert!(c.nodes[&l3].metrics().term > term);
    let ceilings = c.nodes[&l3]
        .ready_ceilings()
        .await
        .expect("ready ceilings after crash");
    assert!(ceilings["orders"].ceiling >= committed_max);
    c.shutdown().await;
}

fn small_snapshots(cfg: &mut NodeConfig) {
    cfg.snapshot_logs = 20;
    cfg.logs_to_keep = 0;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_catches_up_through_snapshot() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut c = Cluster::start(3, small_snapshots).await;
    let l = c.leader(ELECTION_WAIT).await;
    let seq = name("s");
    c.nodes[&l]
        .create_sequence(&seq, Width::W4, 0)
        .await
        .unwrap();
    c.nodes[&l].raise_ceiling(&seq, 10).await.unwrap();
    let f = *c.nodes.keys().find(|id| **id != l).unwrap();
    // Let the follower apply the raise, then stop it.
    let deadline = Instant::now() + ELECTION_WAIT;
    while c.nodes[&f]
        .state()
        .state
        .sequences
        .get("s")
        .map(|s| s.ceiling)
        != Some(10)
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before = c.nodes[&f].state().state.sequences["s"].ceiling;
    // Kill it: dropped, no shutdown call.
    drop(c.nodes.remove(&f));

    // Enough writes for several snapshots and purges on the live nodes.
    let mut last = 0;
    for i in 1..=120u128 {
        let got = c.nodes[&l].raise_ceiling(&seq, 10 + i * 7).await.unwrap();
        assert!(got > last);
        last = got;
    }
    let lm = c.nodes[&l].metrics();
    assert!(
        lm.snapshot_index.is_some(),
        "leader built no snapshot: {lm:?}"
    );
    assert!(
        lm.purged_index.unwrap_or(0) > 10,
        "leader purged no log: {lm:?}"
    );

    // Restart from the data dir: the local state is at least what it was.
    let node = c.start_node(f).await;
    assert!(node.state().state.sequences["s"].ceiling >= before);
    let deadline = Instant::now() + ELECTION_WAIT;
    loop {
        let s = c.nodes[&f].state();
        if s.state.sequences["s"].ceiling == last {
            break;
        }
        assert!(
            s.state.sequences["s"].ceiling >= before,
            "ceiling went down"
        );
        assert!(Instant::now() < deadline, "restarted node did not catch up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let fm = c.nodes[&f].metrics();
    // The log it missed was purged on the leader, so it must have installed
    // a snapshot.
    assert!(fm.snapshot_index.is_some(), "no snapshot installed: {fm:?}");
    assert_eq!(c.nodes[&f].state().state, c.nodes[&l].state().state);

    // And after a restart of every node, nothing went down.
    let ids: Vec<NodeId> = c.nodes.keys().copied().collect();
    for id in &ids {
        c.stop(*id).await;
    }
    for id in &ids {
        let n = c.start_node(*id).await;
        assert!(n.state().state.sequences["s"].ceiling >= before);
        assert!(matches!(
            n.initialize().await,
            Err(Error::AlreadyInitialized)
        ));
    }
    let l = c.leader(ELECTION_WAIT).await;
    assert_eq!(
        c.nodes[&l].ready_ceilings().await.unwrap()["s"].ceiling,
        last
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_and_remove_a_server() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut c = Cluster::start(3, defaults).await;
    let l = c.leader(ELECTION_WAIT).await;
    let seq = name("m");
    c.nodes[&l]
        .create_sequence(&seq, Width::W2, 0)
        .await
        .unwrap();
    c.nodes[&l].raise_ceiling(&seq, 100).await.unwrap();

    let addr4 = c.start_node(4).await.raft_addr().to_string();
    c.nodes[&l].add_server(4, &addr4).await.unwrap();
    let m = c.nodes[&l].metrics();
    assert_eq!(m.voters, BTreeSet::from([1, 2, 3, 4]));
    let deadline = Instant::now() + ELECTION_WAIT;
    loop {
        let st = c.nodes[&4].state().state;
        if st.sequences.get("m").map(|s| s.ceiling) == Some(100) && st.nodes.contains_key(&4) {
            break;
        }
        assert!(Instant::now() < deadline, "new server did not catch up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Remove it again; it learns it is out and must stop serving.
    let mut watch = c.nodes[&4].leader_watch();
    c.nodes[&l].remove_server(4).await.unwrap();
    assert_eq!(c.nodes[&l].metrics().voters, BTreeSet::from([1, 2, 3]));
    tokio::time::timeout(ELECTION_WAIT, watch.wait_for(|i| !i.member))
        .await
        .expect("removed server never saw its removal")
        .unwrap();
    c.stop(4).await;
    // The three left still commit.
    assert_eq!(c.nodes[&l].raise_ceiling(&seq, 200).await.unwrap(), 200);
    assert!(!c.nodes[&l].state().state.nodes.contains_key(&4));
    c.shutdown().await;
}

fn short_writes(cfg: &mut NodeConfig) {
    cfg.timing.write_timeout_ms = 500;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_cannot_commit() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut c = Cluster::start(3, short_writes).await;
    let l = c.leader(ELECTION_WAIT).await;
    let seq = name("q");
    c.nodes[&l]
        .create_sequence(&seq, Width::W8, 0)
        .await
        .unwrap();
    assert_eq!(c.nodes[&l].raise_ceiling(&seq, 50).await.unwrap(), 50);

    // The leader alone: its raise cannot commit.
    let followers: Vec<NodeId> = c.nodes.keys().copied().filter(|id| *id != l).collect();
    for f in &followers {
        c.stop(*f).await;
    }
    let r = c.nodes[&l].raise_ceiling(&seq, 1_000).await;
    assert!(
        matches!(r, Err(Error::Timeout(_))),
        "minority leader committed: {r:?}"
    );
    assert_eq!(c.nodes[&l].state().state.sequences["q"].ceiling, 50);
    assert!(
        c.nodes[&l].ready_ceilings().await.is_err(),
        "a lone leader served ceilings"
    );

    // Bring one follower back, stop the old leader: the follower alone can
    // neither commit nor become leader.
    let f = followers[0];
    c.start_node(f).await;
    c.stop(l).await;
    let r = c.nodes[&f].raise_ceiling(&seq, 2_000).await;
    assert!(r.is_err(), "a lone follower committed: {r:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_ne!(c.nodes[&f].metrics().role, Role::Leader);
    assert!(c.nodes[&f].state().state.sequences["q"].ceiling < 2_000);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_are_dropped_counted_and_close_the_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use unid_consensus::frame;
    use unid_proto::auth::AuthKey;

    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let c = Cluster::start(1, defaults).await;
    let node = &c.nodes[&1];
    let addr = node.raft_addr();
    let key = AuthKey::from_secret(SECRET);

    async fn send_and_expect_close(addr: SocketAddr, bytes: &[u8]) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("server kept the connection open")
            .unwrap_or(0);
        assert_eq!(n, 0, "server answered a bad frame");
    }

    // Bad CRC.
    let mut f = frame::encode(b"payload", Some(&key));
    f[5] ^= 0x40;
    send_and_expect_close(addr, &f).await;
    // Good CRC, tag made with another secret.
    let f = frame::encode(b"payload", Some(&AuthKey::from_secret(b"wrong")));
    send_and_expect_close(addr, &f).await;
    // No tag at all (a peer without the secret): the CRC fits but the
    // frame is 16 bytes short, so the server waits; close our side.
    // Oversized length prefix.
    let mut f = frame::encode(b"x", Some(&key));
    f[..4].copy_from_slice(&(u32::MAX).to_le_bytes());
    send_and_expect_close(addr, &f).await;
    // Checks pass but the payload is garbage.
    let f = frame::encode(&[0xff; 7], Some(&key));
    send_and_expect_close(addr, &f).await;

    let s = node.net_stats();
    assert_eq!(s.frames_bad_crc, 1, "{s:?}");
    assert_eq!(s.frames_bad_tag, 1, "{s:?}");
    assert_eq!(s.frames_too_large, 1, "{s:?}");
    assert_eq!(s.frames_undecodable, 1, "{s:?}");
    assert_eq!(s.connections_closed_bad, 4, "{s:?}");
    // The node still works.
    let l = c.leader(ELECTION_WAIT).await;
    assert_eq!(l, 1);
    c.nodes[&1]
        .create_sequence(&name("ok"), Width::W2, 0)
        .await
        .unwrap();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_old_leader_cannot_raise_and_new_leader_starts_above() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let c = Cluster::start(3, short_writes).await;
    let l1 = c.leader(ELECTION_WAIT).await;
    let seq = name("p");
    c.nodes[&l1]
        .create_sequence(&seq, Width::W16, 0)
        .await
        .unwrap();
    let committed_by_l1 = c.nodes[&l1].raise_ceiling(&seq, 1_000).await.unwrap();

    // Cut the leader off. The other two elect a new leader while the old one
    // still believes it leads.
    c.nodes[&l1].set_isolated(true);
    let deadline = Instant::now() + ELECTION_WAIT;
    let l2 = loop {
        let found = c
            .nodes
            .iter()
            .find(|(id, n)| **id != l1 && n.metrics().role == Role::Leader);
        if let Some((id, _)) = found {
            break *id;
        }
        assert!(Instant::now() < deadline, "majority elected no leader");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let old = &c.nodes[&l1];
    let new = &c.nodes[&l2];
    // Two nodes think they lead; only one can commit or serve ceilings.
    let r = old.raise_ceiling(&seq, 1_000_000).await;
    // A timeout in openraft 0.9 (a leader without quorum does not step
    // down); any error would do, success would be a bug.
    assert!(r.is_err(), "isolated leader committed: {r:?}");
    assert!(
        old.ready_ceilings().await.is_err(),
        "isolated leader served ceilings"
    );
    let ready = new.ready_ceilings().await.unwrap()["p"].ceiling;
    assert!(
        ready >= committed_by_l1,
        "new leader reads {ready} < {committed_by_l1}"
    );
    assert_eq!(new.raise_ceiling(&seq, 2_000).await.unwrap(), 2_000);

    // Heal: the old leader steps down and drops its uncommitted raise.
    old.set_isolated(false);
    let deadline = Instant::now() + ELECTION_WAIT;
    loop {
        let st = old.state().state;
        if st.sequences["p"].ceiling == 2_000 && old.metrics().role != Role::Leader {
            break;
        }
        assert!(
            st.sequences["p"].ceiling <= 2_000,
            "uncommitted raise was applied"
        );
        assert!(Instant::now() < deadline, "old leader did not rejoin");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let l = c.leader(ELECTION_WAIT).await;
    assert_eq!(
        c.nodes[&l].ready_ceilings().await.unwrap()["p"].ceiling,
        2_000
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_disk_stops_the_node_and_nothing_unpersisted_is_acknowledged() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut c = Cluster::start(3, short_writes).await;
    let l = c.leader(ELECTION_WAIT).await;
    let seq = name("d");
    c.nodes[&l]
        .create_sequence(&seq, Width::W8, 0)
        .await
        .unwrap();
    assert_eq!(c.nodes[&l].raise_ceiling(&seq, 10).await.unwrap(), 10);

    // The leader's disk fails: its next append fails, Raft stops, and the
    // raise is not acknowledged.
    c.nodes[&l].set_storage_fault(true);
    let r = c.nodes[&l].raise_ceiling(&seq, 20).await;
    assert!(
        r.is_err(),
        "raise acknowledged by a leader whose disk failed: {r:?}"
    );
    let deadline = Instant::now() + ELECTION_WAIT;
    while c.nodes[&l].is_running() {
        assert!(
            Instant::now() < deadline,
            "node kept running after a storage error"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(c.nodes[&l].state().state.sequences["d"].ceiling, 10);

    // The other two carry on, with every committed ceiling.
    let dead = c.nodes.remove(&l).unwrap();
    let (l2, _) = c.any_leader(ELECTION_WAIT).await;
    assert!(c.nodes[&l2].ready_ceilings().await.unwrap()["d"].ceiling >= 10);
    assert_eq!(c.nodes[&l2].raise_ceiling(&seq, 30).await.unwrap(), 30);
    drop(dead);
    c.shutdown().await;
}
