//! Five `unid server` processes: two leaders killed one after the other (the last three still
//! elect and grant above everything), and a leader cut off in a minority (three followers
//! frozen with SIGSTOP) that grants nothing above the ceiling committed before.

mod server_support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use server_support::*;
use unid_proto::{ErrorCode, Message};

fn signal(server: &Server, sig: &str) {
    let pid = server.child.as_ref().expect("running").id().to_string();
    let st = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap();
    assert!(st.success());
}

fn udp_of(servers: &[Server], id: u64) -> SocketAddr {
    servers.iter().find(|s| s.id == id).unwrap().udp
}

/// `n` grants of 1000 from the leader (`*leader`, redirects followed), each above the last
/// and above `floor`; returns the end.
fn grants(agent: &mut Agent, leader: &mut SocketAddr, seq: &str, n: usize, floor: u128) -> u128 {
    let mut end = floor;
    for _ in 0..n {
        let (first, count) = grant_following(agent, leader, seq, 1000, Duration::from_secs(10));
        assert!(first >= end, "block {first}+{count} not above {end}");
        end = first + count as u128;
    }
    end
}

/// The committed ceiling `unid sequence describe` reports, asking `at` only.
fn ceiling(at: SocketAddr, seq: &str) -> u128 {
    let (ok, out, err) = unid(&[
        "sequence",
        "describe",
        seq,
        "--server",
        &at.to_string(),
        "--timeout-ms",
        "2000",
    ]);
    assert!(ok, "describe failed: {err}");
    out.lines()
        .find_map(|l| l.strip_prefix("ceiling:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ceiling in {out}"))
}

#[test]
fn five_servers_survive_two_leader_kills() {
    let root = tempfile::tempdir().unwrap();
    let mut servers = servers(root.path(), 5);
    start_cluster(&mut servers);
    let mut alive: Vec<u64> = (1..=5).collect();
    let addrs = |alive: &[u64], servers: &[Server]| -> Vec<SocketAddr> {
        alive.iter().map(|id| udp_of(servers, *id)).collect()
    };
    let (mut leader, _) = wait_leader(&addrs(&alive, &servers), None, Duration::from_secs(20));
    create_sequence(&addrs(&alive, &servers), "five", 8);
    let mut agent = Agent::new();
    let mut lu = udp_of(&servers, leader);
    let mut end = grants(&mut agent, &mut lu, "five", 20, 0);
    leader = servers.iter().find(|s| s.udp == lu).unwrap().id;

    for round in 1..=2 {
        let killed = Instant::now();
        servers[(leader - 1) as usize].kill9();
        alive.retain(|id| *id != leader);
        let (next, _) = wait_leader(
            &addrs(&alive, &servers),
            Some(leader),
            Duration::from_secs(20),
        );
        let mut nl = udp_of(&servers, next);
        end = grants(&mut agent, &mut nl, "five", 1, end);
        eprintln!(
            "kill {round}: leader {leader} → {next}, first grant after {:?}",
            killed.elapsed()
        );
        end = grants(&mut agent, &mut nl, "five", 19, end);
        leader = servers.iter().find(|s| s.udp == nl).unwrap().id;
    }
    assert_eq!(alive.len(), 3);
}

#[test]
fn a_leader_in_a_minority_grants_nothing_above_its_committed_ceiling() {
    let root = tempfile::tempdir().unwrap();
    let mut servers = servers(root.path(), 5);
    start_cluster(&mut servers);
    let all: Vec<SocketAddr> = servers.iter().map(|s| s.udp).collect();
    let (leader, _) = wait_leader(&all, None, Duration::from_secs(20));
    create_sequence(&all, "minority", 8);
    let mut lu = udp_of(&servers, leader);
    let mut agent = Agent::new();
    let end = grants(&mut agent, &mut lu, "minority", 20, 0);
    let leader = servers.iter().find(|s| s.udp == lu).unwrap().id;
    let before = ceiling(lu, "minority");

    // Freeze three followers: the leader and one follower are a minority.
    let frozen: Vec<usize> = (0..5)
        .filter(|i| servers[*i].id != leader)
        .take(3)
        .collect();
    for &i in &frozen {
        signal(&servers[i], "-STOP");
    }
    // Acknowledgements sent before the freeze may still commit a raise: read the ceiling once
    // they have arrived. Nothing can commit after that (2 of 5 servers answer).
    std::thread::sleep(Duration::from_millis(300));
    let committed = ceiling(lu, "minority");
    assert!(committed >= before);

    // Ask until it stops granting: every grant stays below the committed ceiling.
    let mut in_minority = Vec::new();
    let mut stopped_with = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let r = agent.call(
            lu,
            &Message::BlockRequest {
                sequence: "minority",
                count: 1000,
            },
            Duration::from_millis(300),
        );
        match r {
            Some(Reply::Grant { first, count }) => in_minority.push((first, count)),
            Some(Reply::Error(ErrorCode::RateLimited)) | None => {}
            Some(other) => {
                stopped_with = Some(other);
                break;
            }
        }
    }
    let stopped_with = stopped_with.expect("the cut-off leader kept granting for 10 s");
    eprintln!(
        "in the minority: {} grants below the committed ceiling {committed} (before the freeze: {before}), then {stopped_with:?}",
        in_minority.len()
    );
    assert!(
        matches!(
            stopped_with,
            Reply::Error(ErrorCode::NotReady) | Reply::NotLeader { .. }
        ),
        "{stopped_with:?}"
    );
    // And it stays so: another second of requests gets nothing above the ceiling either.
    for _ in 0..10 {
        let r = agent.call(
            lu,
            &Message::BlockRequest {
                sequence: "minority",
                count: 1000,
            },
            Duration::from_millis(100),
        );
        if let Some(Reply::Grant { first, count }) = r {
            in_minority.push((first, count));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for (first, count) in &in_minority {
        assert!(*first >= end, "minority grant {first} below earlier grants");
        assert!(
            first + *count as u128 <= committed,
            "minority grant {first}+{count} above the committed ceiling {committed}"
        );
    }
    assert_eq!(
        ceiling(lu, "minority"),
        committed,
        "a ceiling committed in the minority"
    );
    let end = in_minority
        .iter()
        .map(|(f, c)| f + *c as u128)
        .max()
        .unwrap_or(end)
        .max(end);

    // Thaw: the cluster recovers and grants above everything.
    for &i in &frozen {
        signal(&servers[i], "-CONT");
    }
    let (now, _) = wait_leader(&all, None, Duration::from_secs(20));
    let mut nl = udp_of(&servers, now);
    let after = grants(&mut agent, &mut nl, "minority", 10, end);
    assert!(after > end);
}
