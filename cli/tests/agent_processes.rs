//! `unid agent` and `unid next` as processes, against a fake server
//! (`unid_agent::testing`): two `unid next` processes at once, restarts
//! (SIGTERM and SIGKILL) never repeat an id.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod server_support;

use server_support::{UNID, agent_command, increasing_ids as ids, wait_agent_socket};
use unid_agent::testing::FakeCluster;

struct Agent(Child);

impl Agent {
    fn start(server: SocketAddr, dir: &Path, socket: SocketAddr) -> Agent {
        Agent::start_logging(server, dir, socket, Stdio::null())
    }

    fn start_logging(server: SocketAddr, dir: &Path, socket: SocketAddr, log: Stdio) -> Agent {
        let child = agent_command(server, "jobs", dir, socket)
            .args(["--refill-period-ms", "50"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start unid agent");
        wait_agent_socket(socket);
        Agent(child)
    }

    fn signal(&mut self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let status = self.0.wait().unwrap();
        if sig == "-TERM" {
            assert!(status.success(), "agent exit after SIGTERM: {status}");
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> SocketAddr {
    let port = unid_engine::ports::free_port().expect("a free port on 127.0.0.1");
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn next(dir: &Path, socket: SocketAddr, n: u64) -> Child {
    Command::new(UNID)
        .args(["next", "jobs", "-n", &n.to_string()])
        .arg("--ring-dir")
        .arg(dir)
        .args(["--socket", &socket.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start unid next")
}

/// A fresh ring folder under /dev/shm, removed on drop.
struct RingDir(PathBuf);

impl std::ops::Deref for RingDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for RingDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ring_dir(tag: &str) -> RingDir {
    let d = PathBuf::from(format!(
        "/dev/shm/unid-cli-test-{tag}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    RingDir(d)
}

#[test]
fn two_next_processes_and_restarts_never_repeat() {
    let dir = ring_dir("procs");
    let cluster = FakeCluster::new(8, &["jobs"]);
    let server = cluster.start_server(1).unwrap();
    let socket = free_port();
    let mut seen = HashSet::new();
    let mut last_max = 0u128;
    for round in 0..3 {
        let mut agent = Agent::start(server.addr(), &dir, socket);
        let a = next(&dir, socket, 30_000);
        let b = next(&dir, socket, 30_000);
        let (a, b) = (
            ids(a.wait_with_output().unwrap()),
            ids(b.wait_with_output().unwrap()),
        );
        assert_eq!((a.len(), b.len()), (30_000, 30_000));
        for id in a.iter().chain(&b) {
            assert!(seen.insert(*id), "id {id} repeated (round {round})");
            assert!(
                *id > last_max,
                "id {id} not above the previous run's {last_max}"
            );
        }
        last_max = *a.iter().chain(&b).max().unwrap();
        // Restart by SIGTERM (clean) then by SIGKILL (the ring is left behind).
        agent.signal(if round == 0 { "-TERM" } else { "-KILL" });
    }
    // With no agent: what the killed agent had published is still handed
    // out (once), then a clear error.
    let out = loop {
        let out = next(&dir, socket, 10_000).wait_with_output().unwrap();
        if !out.status.success() {
            break out;
        }
        for id in ids(out) {
            assert!(seen.insert(id), "id {id} repeated after the agent died");
        }
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agent"), "{err}");
    let granted = cluster.granted();
    for id in &seen {
        assert!(
            granted
                .iter()
                .any(|(_, f, c)| *id >= *f && *id < f + u128::from(*c))
        );
    }
}

#[test]
fn a_second_agent_for_the_same_ring_is_refused() {
    let dir = ring_dir("twice");
    let cluster = FakeCluster::new(8, &["jobs"]);
    let server = cluster.start_server(1).unwrap();
    let socket = free_port();
    let _first = Agent::start(server.addr(), &dir, socket);
    let first_ids = ids(next(&dir, socket, 1000).wait_with_output().unwrap());
    let log_path = dir.with_extension("second.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let _second = Agent::start_logging(server.addr(), &dir, free_port(), log.into());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("another agent") {
            break;
        }
        assert!(Instant::now() < deadline, "second agent log:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first agent's ring still serves, above what it served before.
    let more = ids(next(&dir, socket, 1000).wait_with_output().unwrap());
    assert!(more[0] > *first_ids.last().unwrap());
    let _ = std::fs::remove_file(&log_path);
}

#[test]
fn next_uses_the_socket_when_there_is_no_ring() {
    let dir = ring_dir("socket");
    let cluster = FakeCluster::new(4, &["jobs"]);
    let server = cluster.start_server(1).unwrap();
    let socket = free_port();
    let agent_dir = ring_dir("socket-agent");
    let _agent = Agent::start(server.addr(), &agent_dir, socket);
    // The client looks in another folder: no ring there, so the socket.
    let got = ids(next(&dir, socket, 2_500).wait_with_output().unwrap());
    assert_eq!(got.len(), 2_500);
    assert!(got.iter().all(|id| *id < u128::from(u32::MAX)));
    let out = Command::new(UNID)
        .args(["next", "nope", "--ring-dir"])
        .arg(&*dir)
        .args(["--socket", &socket.to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown sequence"), "{err}");
}
