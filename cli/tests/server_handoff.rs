//! Three `unid server` processes: SIGTERM to the leader sends a LeaderChange notice to the
//! agents it serves, and the next leader grants above everything granted before.

mod server_support;

use std::time::{Duration, Instant};

use server_support::*;

#[test]
fn sigterm_on_the_leader_sends_leader_change_and_a_new_leader_grants() {
    let root = tempfile::tempdir().unwrap();
    let mut servers = servers(root.path(), 3);
    start_cluster(&mut servers);
    let addrs: Vec<_> = servers.iter().map(|s| s.udp).collect();
    let (leader, _) = wait_leader(&addrs, None, Duration::from_secs(20));
    create_sequence(&addrs, "orders", 4);
    let li = (leader - 1) as usize;
    let mut agent = Agent::new();
    agent.register(servers[li].udp, Duration::from_secs(10));
    let mut end = 0u128;
    for _ in 0..20 {
        let b = agent.grant(servers[li].udp, "orders", 100, Duration::from_secs(10));
        assert!(b.0 >= end);
        end = b.0 + b.1 as u128;
    }

    let stopped = Instant::now();
    let st = servers[li].sigterm(Duration::from_secs(10));
    assert!(st.success(), "{st:?}\n{}", servers[li].log_text());
    let mut notice = None;
    while let Some((_, r, _)) = agent.recv(Duration::from_secs(2)) {
        if let Reply::LeaderChange { leader_id, leader } = r {
            notice = Some((leader_id, leader));
            break;
        }
    }
    let (next_id, next_addr) = notice.expect("a LeaderChange notice");
    assert_ne!(next_id, leader);
    assert_eq!(next_addr, servers[(next_id - 1) as usize].udp);

    let b = agent.grant(next_addr, "orders", 100, Duration::from_secs(10));
    assert!(b.0 >= end, "{b:?} below {end}");
    eprintln!(
        "first grant from the next leader {:?} after SIGTERM",
        stopped.elapsed()
    );
    let survivors: Vec<_> = servers
        .iter()
        .filter(|s| s.id != leader)
        .map(|s| s.udp)
        .collect();
    let (agreed, _) = wait_leader(&survivors, Some(leader), Duration::from_secs(10));
    assert_eq!(
        agreed, next_id,
        "the notice named the server that took over"
    );
}
