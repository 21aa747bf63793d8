//! systemd readiness (`Type=notify`): `unid server` and `unid agent` started with
//! `NOTIFY_SOCKET` pointing at a socket of this test send `READY=1` only once they answer,
//! `STOPPING=1` on SIGTERM, and keep running with a `NOTIFY_SOCKET` they cannot use.

mod server_support;

use std::net::{SocketAddr, TcpStream};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use server_support::{Agent, UNID, agent_command, free_port};
use unid_agent::testing::{FakeCluster, Mode};
use unid_proto::Message;

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The next notification within `timeout`, as text.
fn recv(sock: &UnixDatagram, timeout: Duration) -> Option<String> {
    sock.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).ok()?;
    Some(String::from_utf8(buf[..n].to_vec()).unwrap())
}

/// The value of `key` in a notification.
fn field<'a>(message: &'a str, key: &str) -> Option<&'a str> {
    message
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit status (at most 20 s).
    fn sigterm(&mut self) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn server(dir: &Path, udp: SocketAddr, notify_socket: &str) -> Proc {
    let log = dir.join("server.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(UNID)
        .args(["server", "--id", "1", "--init"])
        .args(["--listen", &udp.to_string()])
        .args(["--raft", &local(free_port()).to_string()])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("NOTIFY_SOCKET", notify_socket)
        .env("RUST_LOG", "info,openraft=warn")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("start unid server");
    Proc { child, log }
}

/// Whether the server at `udp` answers a datagram sent now.
fn answers(udp: SocketAddr) -> bool {
    Agent::new()
        .call(
            udp,
            &Message::StatusRequest {
                sequences_after: None,
            },
            Duration::from_secs(2),
        )
        .is_some()
}

#[test]
fn server_is_ready_once_its_port_answers_and_says_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    let udp = local(free_port());
    let mut p = server(dir.path(), udp, path.to_str().unwrap());
    let ready = recv(&sock, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("no READY=1 in 60 s; log:\n{}", p.log_text()));
    assert_eq!(field(&ready, "READY"), Some("1"), "{ready}");
    // Sent after the port was bound: it answers the first datagram sent after READY.
    assert!(answers(udp), "READY=1 before the UDP port answers");
    assert_eq!(
        field(&ready, "MAINPID"),
        Some(p.child.id().to_string().as_str())
    );
    let status = field(&ready, "STATUS").unwrap();
    assert!(status.contains(&udp.to_string()), "{status}");
    // Nothing else until the stop (no watchdog was asked for).
    assert_eq!(recv(&sock, Duration::from_millis(300)), None);
    let st = p.sigterm();
    assert!(st.success(), "{st}; log:\n{}", p.log_text());
    let stopping = recv(&sock, Duration::from_secs(1)).expect("STOPPING=1 after SIGTERM");
    assert_eq!(field(&stopping, "STOPPING"), Some("1"), "{stopping}");
}

#[test]
fn a_bad_notify_socket_is_logged_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let udp = local(free_port());
    let mut p = server(dir.path(), udp, "/nonexistent/unid-notify");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !p.log_text().contains("sd_notify") {
        assert!(
            Instant::now() < deadline,
            "no sd_notify error logged:\n{}",
            p.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = p.log_text();
    let line = log.lines().find(|l| l.contains("sd_notify")).unwrap();
    assert!(
        line.contains("ERROR") && line.contains("NOTIFY_SOCKET") && line.contains("/nonexistent"),
        "{line}"
    );
    assert!(answers(udp), "the server stopped serving");
    assert!(p.child.try_wait().unwrap().is_none(), "the server exited");
    assert!(p.sigterm().success());
}

fn agent(server: SocketAddr, ring_dir: &Path, socket: SocketAddr, notify: &str) -> Proc {
    let log = ring_dir.with_extension("log");
    let out = std::fs::File::create(&log).unwrap();
    let child = agent_command(server, "jobs", ring_dir, socket)
        .env("NOTIFY_SOCKET", notify)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("start unid agent");
    Proc { child, log }
}

/// A fresh ring folder under /dev/shm, removed on drop.
struct RingDir(PathBuf);

impl Drop for RingDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_file(self.0.with_extension("log"));
    }
}

fn ring_dir(tag: &str) -> RingDir {
    let d = PathBuf::from(format!(
        "/dev/shm/unid-sd-notify-test-{tag}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    RingDir(d)
}

/// An abstract socket `@name` of this test.
fn abstract_socket(tag: &str) -> (UnixDatagram, String) {
    let name = format!("unid-sd-notify-test-{tag}-{}", std::process::id());
    let sock =
        UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    (sock, format!("@{name}"))
}

#[test]
fn agent_is_ready_once_its_ring_and_socket_are_up_and_says_stopping_on_sigterm() {
    let dir = ring_dir("ready");
    let cluster = FakeCluster::new(8, &["jobs"]);
    let fake = cluster.start_server(1).unwrap();
    let (sock, name) = abstract_socket("ready");
    let socket = local(free_port());
    let mut p = agent(fake.addr(), &dir.0, socket, &name);
    let ready = recv(&sock, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no READY=1; log:\n{}", p.log_text()));
    assert_eq!(field(&ready, "READY"), Some("1"), "{ready}");
    assert!(
        dir.0.join("jobs").exists(),
        "READY=1 before the ring exists"
    );
    assert!(
        TcpStream::connect(socket).is_ok(),
        "READY=1 before the socket"
    );
    assert_eq!(
        field(&ready, "MAINPID"),
        Some(p.child.id().to_string().as_str())
    );
    let status = field(&ready, "STATUS").unwrap();
    assert!(status.starts_with("1 of 1 rings serving"), "{status}");
    let st = p.sigterm();
    assert!(st.success(), "{st}; log:\n{}", p.log_text());
    // STATUS= updates may come first; STOPPING=1 is the last.
    let mut last = None;
    while let Some(m) = recv(&sock, Duration::from_millis(500)) {
        last = Some(m);
    }
    let last = last.expect("STOPPING=1 after SIGTERM");
    assert_eq!(field(&last, "STOPPING"), Some("1"), "{last}");
}

#[test]
fn agent_without_a_cluster_is_ready_after_the_wait_and_says_why() {
    let dir = ring_dir("silent");
    let cluster = FakeCluster::new(8, &["jobs"]);
    let fake = cluster.start_server(1).unwrap();
    fake.set_mode(Mode::Silent);
    let (sock, name) = abstract_socket("silent");
    let started = Instant::now();
    let p = agent(fake.addr(), &dir.0, local(free_port()), &name);
    let ready = recv(&sock, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no READY=1; log:\n{}", p.log_text()));
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "READY=1 after {:?}, before the wait for the rings ended",
        started.elapsed()
    );
    let status = field(&ready, "STATUS").unwrap();
    assert!(
        status.starts_with("0 of 1 rings serving; registering")
            || status.starts_with("0 of 1 rings serving; cluster unreachable"),
        "{status}"
    );
    assert!(!dir.0.join("jobs").exists());
}

#[test]
fn a_bad_notify_socket_is_logged_and_the_agent_keeps_serving() {
    let dir = ring_dir("bad");
    let cluster = FakeCluster::new(8, &["jobs"]);
    let fake = cluster.start_server(1).unwrap();
    let socket = local(free_port());
    let mut p = agent(fake.addr(), &dir.0, socket, "relative/notify");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !p.log_text().contains("sd_notify") {
        assert!(
            Instant::now() < deadline,
            "nothing logged:\n{}",
            p.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = p.log_text();
    let line = log.lines().find(|l| l.contains("sd_notify")).unwrap();
    assert!(
        line.contains("ERROR") && line.contains("relative/notify"),
        "{line}"
    );
    assert!(TcpStream::connect(socket).is_ok());
    assert!(p.child.try_wait().unwrap().is_none(), "the agent exited");
    assert!(p.sigterm().success());
}
