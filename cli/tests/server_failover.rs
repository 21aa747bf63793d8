//! Three `unid server` processes: a follower redirects, the leader is killed with SIGKILL and
//! the new leader grants only above everything granted before, the killed server restarts
//! from its data dir and rejoins.

mod server_support;

use std::time::Duration;

use server_support::*;
use unid_proto::{Message, NodeRole};

#[test]
fn three_servers_redirect_fail_over_after_kill9_and_rejoin() {
    let root = tempfile::tempdir().unwrap();
    let mut servers = servers(root.path(), 3);
    start_cluster(&mut servers);
    let addrs: Vec<_> = servers.iter().map(|s| s.udp).collect();
    let (leader, _) = wait_leader(&addrs, None, Duration::from_secs(20));
    create_sequence(&addrs, "orders", 8);
    let li = (leader - 1) as usize;
    let follower = servers.iter().find(|s| s.id != leader).unwrap().udp;

    // A follower answers a Hello with NotLeader naming the leader's UDP address.
    let mut agent = Agent::new();
    let hello = Message::Hello {
        role: NodeRole::Agent,
        incarnation: agent.incarnation,
        name: "test-agent-with-a-long-enough-name",
        listen: None,
        backup_of: None,
        versions: unid_proto::VERSIONS,
        software: unid_proto::SOFTWARE,
    };
    let r = agent.call(follower, &hello, Duration::from_secs(2));
    assert_eq!(
        r,
        Some(Reply::NotLeader {
            leader: Some(servers[li].udp)
        })
    );

    // Even the shortest Hello gets a redirect it can use (cut to the leader's endpoint so it
    // is no larger than the Hello).
    let short = Message::Hello {
        role: NodeRole::Agent,
        incarnation: agent.incarnation,
        name: "a",
        listen: None,
        backup_of: None,
        versions: unid_proto::VERSIONS,
        software: unid_proto::SOFTWARE,
    };
    let r = Agent::new().call(follower, &short, Duration::from_secs(2));
    assert_eq!(
        r,
        Some(Reply::NotLeader {
            leader: Some(servers[li].udp)
        })
    );

    agent.register(servers[li].udp, Duration::from_secs(10));
    let mut blocks = Vec::new();
    for _ in 0..30 {
        blocks.push(agent.grant(servers[li].udp, "orders", 1000, Duration::from_secs(10)));
    }
    for w in blocks.windows(2) {
        assert!(w[0].0 + w[0].1 as u128 <= w[1].0, "{w:?}");
    }
    let granted_end = blocks.iter().map(|b| b.0 + b.1 as u128).max().unwrap();

    // kill -9 the leader: the survivors elect a new one, whose grants are all above.
    let killed = std::time::Instant::now();
    servers[li].kill9();
    let survivors: Vec<_> = servers
        .iter()
        .filter(|s| s.id != leader)
        .map(|s| s.udp)
        .collect();
    let (new_leader, _) = wait_leader(&survivors, Some(leader), Duration::from_secs(20));
    let nl = servers[(new_leader - 1) as usize].udp;
    // The agent keeps its id: the new leader knows it from the replicated node table.
    let mut after = vec![agent.grant(nl, "orders", 1000, Duration::from_secs(10))];
    eprintln!(
        "first grant from the new leader {:?} after kill -9",
        killed.elapsed()
    );
    for _ in 0..9 {
        after.push(agent.grant(nl, "orders", 1000, Duration::from_secs(10)));
    }
    for b in &after {
        assert!(
            b.0 >= granted_end,
            "new leader granted {b:?} below {granted_end}"
        );
    }

    // The killed server restarts from its data dir and rejoins as a follower.
    let peers: Vec<String> = servers.iter().map(Server::peer_arg).collect();
    servers[li].start(&peers, false);
    let (agreed, _) = wait_leader(&addrs, None, Duration::from_secs(20));
    assert_ne!(agreed, 0);
    let r = agent.call(
        servers[li].udp,
        &Message::BlockRequest {
            sequence: "orders",
            count: 1,
        },
        Duration::from_secs(2),
    );
    if agreed != leader {
        assert!(
            matches!(r, Some(Reply::NotLeader { leader: Some(_) })),
            "{r:?}"
        );
    }
    let lu = servers[(agreed - 1) as usize].udp;
    let last = agent.grant(lu, "orders", 10, Duration::from_secs(10));
    let after_end = after.iter().map(|b| b.0 + b.1 as u128).max().unwrap();
    assert!(last.0 >= after_end, "{last:?} below {after_end}");

    // `unid status` through a follower reports the leader and every server.
    let (ok, out, err) = unid(&["status", "--server", &servers[li].udp.to_string()]);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("leader: {agreed}")), "{out}");
    assert!(out.matches("127.0.0.1:").count() >= 3, "{out}");
}

fn signal(server: &Server, sig: &str) {
    let pid = server.child.as_ref().expect("running").id().to_string();
    let st = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap();
    assert!(st.success());
}

/// A leader frozen (SIGSTOP) long enough to be deposed, then thawed: whatever it still grants
/// before it learns of the new term is below what the new leader grants from. No block of
/// anyone overlaps another.
#[test]
fn a_frozen_and_thawed_old_leader_never_overlaps_the_new_one() {
    let root = tempfile::tempdir().unwrap();
    let mut servers = servers(root.path(), 3);
    start_cluster(&mut servers);
    let addrs: Vec<_> = servers.iter().map(|s| s.udp).collect();
    let (leader, _) = wait_leader(&addrs, None, Duration::from_secs(20));
    create_sequence(&addrs, "frozen", 8);
    let li = (leader - 1) as usize;
    let mut agent = Agent::new();
    agent.register(servers[li].udp, Duration::from_secs(10));
    let mut blocks = Vec::new();
    for _ in 0..20 {
        blocks.push(agent.grant(servers[li].udp, "frozen", 500, Duration::from_secs(10)));
    }

    signal(&servers[li], "-STOP");
    let survivors: Vec<_> = servers
        .iter()
        .filter(|s| s.id != leader)
        .map(|s| s.udp)
        .collect();
    let (new_leader, _) = wait_leader(&survivors, Some(leader), Duration::from_secs(20));
    let nl = servers[(new_leader - 1) as usize].udp;
    for _ in 0..20 {
        blocks.push(agent.grant(nl, "frozen", 500, Duration::from_secs(10)));
    }

    // Thaw the old leader and ask it at once, before and while it learns it was deposed.
    signal(&servers[li], "-CONT");
    let old = servers[li].udp;
    let mut from_old = 0;
    for _ in 0..30 {
        let r = agent.call(
            old,
            &Message::BlockRequest {
                sequence: "frozen",
                count: 500,
            },
            Duration::from_millis(200),
        );
        if let Some(Reply::Grant { first, count }) = r {
            blocks.push((first, count));
            from_old += 1;
        }
        blocks.push(agent.grant(nl, "frozen", 500, Duration::from_secs(10)));
    }
    eprintln!("the thawed old leader granted {from_old} blocks");
    blocks.sort();
    for w in blocks.windows(2) {
        assert!(
            w[0].0 + w[0].1 as u128 <= w[1].0,
            "overlapping blocks {:?} and {:?}",
            w[0],
            w[1]
        );
    }
}
