//! End to end: three `unid server` processes, one `unid agent`, `unid next`
//! processes. Ids stay unique and increasing while the leader is stopped
//! (SIGTERM: LeaderChange) and while the next one is killed (SIGKILL).

mod server_support;

use std::collections::HashSet;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use server_support::*;

struct AgentProc {
    child: Child,
    log: PathBuf,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent(servers: &[SocketAddr], dir: &Path, socket: SocketAddr, log: PathBuf) -> AgentProc {
    let file = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(UNID);
    cmd.args(["agent", "--sequence", "e2e", "--refill-period-ms", "50"])
        .arg("--ring-dir")
        .arg(dir)
        .args(["--socket", &socket.to_string()])
        .env("RUST_LOG", "info,unid_agent=debug")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file);
    for s in servers {
        cmd.args(["--server", &s.to_string()]);
    }
    let child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "agent socket never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
    AgentProc { child, log }
}

fn next(dir: &Path, socket: SocketAddr, n: u64) -> Child {
    Command::new(UNID)
        .args(["next", "e2e", "-n", &n.to_string(), "--wait-ms", "15000"])
        .arg("--ring-dir")
        .arg(dir)
        .args(["--socket", &socket.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn collect(child: Child, agent: &AgentProc) -> Vec<u128> {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "unid next failed: {}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&agent.log).unwrap_or_default()
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

#[test]
fn agent_serves_unique_increasing_ids_through_leader_stop_and_kill() {
    let root = tempfile::tempdir().unwrap();
    let mut servers = servers(root.path(), 3);
    start_cluster(&mut servers);
    let addrs: Vec<_> = servers.iter().map(|s| s.udp).collect();
    let (leader, _) = wait_leader(&addrs, None, Duration::from_secs(20));
    create_sequence(&addrs, "e2e", 8);
    let ring_dir = root.path().join("rings");
    let socket = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let agent = start_agent(&addrs, &ring_dir, socket, root.path().join("agent.log"));

    let mut seen = HashSet::new();
    let mut floor = 0u128;
    let mut round = |label: &str, seen: &mut HashSet<u128>| {
        let a = next(&ring_dir, socket, 20_000);
        let b = next(&ring_dir, socket, 20_000);
        let (a, b) = (collect(a, &agent), collect(b, &agent));
        assert_eq!((a.len(), b.len()), (20_000, 20_000), "{label}");
        for id in a.iter().chain(&b) {
            assert!(seen.insert(*id), "{label}: id {id} repeated");
            assert!(
                *id > floor,
                "{label}: id {id} not above earlier runs ({floor})"
            );
        }
        floor = *a.iter().chain(&b).max().unwrap();
    };
    round("steady", &mut seen);

    // A second agent that knows only a follower: redirected to the leader,
    // it learns the others from Welcome; its ids never collide with the
    // first agent's.
    let follower = servers.iter().find(|s| s.id != leader).unwrap().udp;
    let ring_dir2 = root.path().join("rings2");
    let socket2 = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let agent2 = start_agent(
        &[follower],
        &ring_dir2,
        socket2,
        root.path().join("agent2.log"),
    );
    let other = collect(next(&ring_dir2, socket2, 20_000), &agent2);
    assert_eq!(other.len(), 20_000);
    for id in &other {
        assert!(seen.insert(*id), "id {id} served by both agents");
    }
    // Welcome cannot carry the server list (answers are no larger than the
    // Hello): the agent read the node table.
    let log2 = std::fs::read_to_string(&agent2.log).unwrap_or_default();
    assert!(log2.contains("node table read"), "{log2}");
    drop(agent2);

    // The leader stops cleanly: it tells the agent where to go.
    let li = (leader - 1) as usize;
    let st = servers[li].sigterm(Duration::from_secs(10));
    assert!(st.success());
    round("after SIGTERM of the leader", &mut seen);

    // The next leader is killed: the agent finds the survivor by itself.
    let rest: Vec<_> = servers
        .iter()
        .filter(|s| s.id != leader)
        .map(|s| s.udp)
        .collect();
    let (second, _) = wait_leader(&rest, Some(leader), Duration::from_secs(20));
    // Two of three gone would stop the cluster; restart the first one first.
    let peers: Vec<String> = servers.iter().map(Server::peer_arg).collect();
    servers[li].start(&peers, false);
    let killed = servers[(second - 1) as usize].udp;
    let mark = std::fs::read_to_string(&agent.log)
        .unwrap_or_default()
        .len();
    servers[(second - 1) as usize].kill9();
    // Until the agent has had a grant from a survivor (its stock may last a
    // few rounds), bounded.
    let survivor_granted = || {
        let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
        log[mark..]
            .lines()
            .any(|l| l.contains(" grant") && !l.contains(&killed.to_string()))
    };
    for i in 0.. {
        round(
            &format!("after SIGKILL of the next leader ({i})"),
            &mut seen,
        );
        if survivor_granted() {
            break;
        }
        assert!(i < 30, "no grant from a survivor after the kill");
    }
    let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
    assert!(
        log.contains("registered") && log.contains("leader change"),
        "{log}"
    );
}

/// Two application processes at once, one through the ring and one through
/// the localhost socket (`unid next` with no ring in its folder falls back to
/// the socket), against three real servers; then the agent is restarted,
/// gracefully and by SIGKILL. Every id is unique, each consumer's ids
/// increase, and a restarted agent's ids are above everything before.
#[test]
fn ring_and_socket_consumers_at_once_and_agent_restarts_never_repeat() {
    let root = tempfile::tempdir().unwrap();
    let mut servers = servers(root.path(), 3);
    start_cluster(&mut servers);
    let addrs: Vec<_> = servers.iter().map(|s| s.udp).collect();
    wait_leader(&addrs, None, Duration::from_secs(20));
    create_sequence(&addrs, "e2e", 8);
    let ring_dir = root.path().join("rings");
    // A folder with no ring in it: a consumer pointed here uses the socket.
    let no_ring_dir = root.path().join("no-rings");
    std::fs::create_dir_all(&no_ring_dir).unwrap();
    let socket = SocketAddr::from(([127, 0, 0, 1], free_port()));

    let mut seen = HashSet::new();
    let mut floor = 0u128;
    for (run, stop) in [(0, "SIGTERM"), (1, "SIGKILL"), (2, "end")] {
        let mut agent = start_agent(
            &addrs,
            &ring_dir,
            socket,
            root.path().join(format!("agent-{run}.log")),
        );
        let via_ring = next(&ring_dir, socket, 20_000);
        let via_socket = next(&no_ring_dir, socket, 5_000);
        let (a, b) = (collect(via_ring, &agent), collect(via_socket, &agent));
        assert_eq!((a.len(), b.len()), (20_000, 5_000), "run {run}");
        for id in a.iter().chain(&b) {
            assert!(seen.insert(*id), "run {run}: id {id} repeated");
            assert!(
                *id > floor,
                "run {run}: id {id} not above every id of earlier runs ({floor})"
            );
        }
        floor = *a.iter().chain(&b).max().unwrap();
        let pid = nix::unistd::Pid::from_raw(agent.child.id() as i32);
        match stop {
            "SIGTERM" => {
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
                let deadline = Instant::now() + Duration::from_secs(10);
                while agent.child.try_wait().unwrap().is_none() {
                    assert!(Instant::now() < deadline, "agent ignored SIGTERM");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            "SIGKILL" => {
                agent.child.kill().unwrap();
                agent.child.wait().unwrap();
            }
            _ => {}
        }
    }
    assert_eq!(seen.len(), 3 * 25_000);
}
