//! Servers added and removed at runtime with `unid cluster add-server|remove-server`, with
//! real `unid server` processes: a fourth server joins (learner, then voter) and grants keep
//! coming; a removed follower stops by itself and the others keep granting.

mod server_support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use server_support::*;

/// The (id, role) lines of `unid status`'s server table.
fn status_servers(at: &[SocketAddr]) -> Vec<(u64, String)> {
    let mut args = vec!["status".to_owned()];
    for a in at {
        args.push("--server".to_owned());
        args.push(a.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, _) = unid(&args);
    if !ok {
        return Vec::new();
    }
    out.lines()
        .skip_while(|l| !l.starts_with("servers:"))
        .skip(2)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let id = f.next()?.parse().ok()?;
            let _udp = f.next()?;
            Some((id, f.next()?.to_lowercase()))
        })
        .collect()
}

/// Waits until `unid status` lists exactly the voters `ids` (as leader or follower).
fn wait_voters(at: &[SocketAddr], ids: &[u64], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut last = Vec::new();
    while Instant::now() < deadline {
        last = status_servers(at);
        let mut voters: Vec<u64> = last
            .iter()
            .filter(|(_, role)| role.contains("leader") || role.contains("follower"))
            .map(|(id, _)| *id)
            .collect();
        voters.sort_unstable();
        if voters == ids {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("status never listed voters {ids:?}; last: {last:?}");
}

fn cluster_cmd(args: &[&str], at: &[SocketAddr]) -> String {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    for a in at {
        all.push("--server".to_owned());
        all.push(a.to_string());
    }
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let (ok, out, err) = unid(&all);
    assert!(ok, "unid {all:?} failed: {err}");
    out
}

/// `n` grants of 1000 from the leader (redirects followed), each above the last and above
/// `floor`.
fn grants(agent: &mut Agent, leader: SocketAddr, n: usize, floor: u128) -> u128 {
    let mut end = floor;
    let mut target = leader;
    for _ in 0..n {
        let (first, count) =
            grant_following(agent, &mut target, "orders", 1000, Duration::from_secs(10));
        assert!(first >= end, "block {first}+{count} not above {end}");
        end = first + count as u128;
    }
    end
}

#[test]
fn a_server_added_at_runtime_votes_and_a_removed_one_stops() {
    let root = tempfile::tempdir().unwrap();
    let mut servers = servers(root.path(), 4);
    start_cluster(&mut servers[..3]);
    let first3: Vec<SocketAddr> = servers[..3].iter().map(|s| s.udp).collect();
    let (leader, _) = wait_leader(&first3, None, Duration::from_secs(20));
    create_sequence(&first3, "orders", 8);
    let lu = servers[(leader - 1) as usize].udp;
    let mut agent = Agent::new();
    let end = grants(&mut agent, lu, 10, 0);

    // A fourth server, not initialized, with a peer list that includes itself.
    let peers: Vec<String> = servers.iter().map(Server::peer_arg).collect();
    servers[3].start(&peers, false);
    let new = servers[3].peer_arg();
    // Asked through a follower first: it redirects to the leader.
    let follower = servers[..3].iter().find(|s| s.id != leader).unwrap().udp;
    let out = cluster_cmd(&["cluster", "add-server", &new], &[follower, lu]);
    eprintln!("add-server:\n{out}");
    assert!(out.contains("voters:"), "{out}");
    assert!(out.contains(&format!("  4 {}", servers[3].udp)), "{out}");
    // Adding it again changes nothing.
    cluster_cmd(&["cluster", "add-server", &new], &first3);

    let all: Vec<SocketAddr> = servers.iter().map(|s| s.udp).collect();
    wait_voters(&all, &[1, 2, 3, 4], Duration::from_secs(15));
    eprintln!("status: {:?}", status_servers(&[servers[3].udp]));
    // The new server knows the leader (answers status naming it).
    let (leader, _) = wait_leader(&all, None, Duration::from_secs(10));
    let lu = servers[(leader - 1) as usize].udp;
    let end = grants(&mut agent, lu, 10, end);

    // Remove a follower (one of the original three): it stops by itself.
    let gone = servers[..3].iter().find(|s| s.id != leader).unwrap().id;
    let gi = (gone - 1) as usize;
    let out = cluster_cmd(&["cluster", "remove-server", &gone.to_string()], &[lu]);
    assert!(!out.contains(&format!("  {gone} ")), "{out}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(st) = servers[gi].child.as_mut().unwrap().try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "removed server {gone} still running:\n{}",
            servers[gi].log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    servers[gi].child = None;
    eprintln!("removed server {gone} exited: {status}");
    let rest: Vec<SocketAddr> = servers
        .iter()
        .filter(|s| s.id != gone)
        .map(|s| s.udp)
        .collect();
    let mut want: Vec<u64> = vec![1, 2, 3, 4];
    want.retain(|id| *id != gone);
    wait_voters(&rest, &want, Duration::from_secs(15));
    grants(&mut agent, lu, 10, end);
}

/// With a cluster secret, membership requests without it get no answer; with it, the leader
/// answers, and refuses what it must not do (remove itself, reuse a member's id elsewhere).
#[test]
fn membership_changes_need_the_secret_and_refuse_bad_requests() {
    let root = tempfile::tempdir().unwrap();
    let secret = root.path().join("secret");
    std::fs::write(&secret, "membership secret\n").unwrap();
    // Servers and tools refuse a secret file others may read.
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut servers = servers(root.path(), 1);
    let s = &mut servers[0];
    let log = std::fs::File::create(&s.log).unwrap();
    s.child = Some(
        std::process::Command::new(UNID)
            .args(["server", "--id", "1", "--init"])
            .args(["--listen", &s.udp.to_string()])
            .args(["--raft", &s.raft.to_string()])
            .arg("--data-dir")
            .arg(&s.dir)
            .arg("--secret-file")
            .arg(&secret)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let addr = s.udp.to_string();
    let secret = secret.to_str().unwrap();
    let with = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend([
            "--server",
            &addr,
            "--secret-file",
            secret,
            "--timeout-ms",
            "3000",
        ]);
        unid(&all)
    };
    // Removing a server that is not a member changes nothing (once the server leads).
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        let (ok, out, err) = with(&["cluster", "remove-server", "7"]);
        if ok {
            break out;
        }
        assert!(Instant::now() < deadline, "{err}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(out.contains(&format!("  1 {addr}")), "{out}");
    // Without the secret: no answer at all.
    let (ok, _, err) = unid(&[
        "cluster",
        "remove-server",
        "7",
        "--server",
        &addr,
        "--timeout-ms",
        "700",
    ]);
    assert!(!ok && err.contains("no answer"), "{err}");
    // The leader does not remove itself.
    let (ok, _, err) = with(&["cluster", "remove-server", "1"]);
    assert!(!ok && err.contains("BadRequest"), "{err}");
    // A member's id at another Raft address is refused.
    let (ok, _, err) = with(&["cluster", "add-server", "1=127.0.0.1:9=127.0.0.1:9"]);
    assert!(!ok && err.contains("BadRequest"), "{err}");
    // A server whose Raft address accepts no connection (not started, typo) is refused
    // before the membership changes, and the cluster keeps committing.
    let (ok, _, err) = with(&["cluster", "add-server", "5=127.0.0.1:9=127.0.0.1:9"]);
    assert!(!ok && err.contains("BadRequest"), "{err}");
    let (ok, out, err) = with(&["sequence", "create", "after-refused-add"]);
    assert!(ok, "{out} {err}");
    // A malformed argument never reaches the wire.
    let (ok, _, err) = with(&["cluster", "add-server", "2=127.0.0.1:9"]);
    assert!(!ok && err.contains("ID=RAFT_ADDR=UDP_ADDR"), "{err}");
}
