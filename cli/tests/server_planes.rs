//! `unid server --data-plane`: a server on the threads plane serves ids through a real
//! `unid agent`; under a seccomp filter refusing io_uring (as Docker's default profile does),
//! `auto` falls back to threads with one warning saying why, and a forced `io-uring` exits
//! non-zero with a one-line error instead of glommio's panic.

mod server_support;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use server_support::*;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A one-server cluster's `unid server` command with `plane`, logging to `log`.
fn server_cmd(dir: &Path, udp: SocketAddr, raft: SocketAddr, plane: &str, log: &Path) -> Command {
    let log = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(UNID);
    cmd.args(["server", "--id", "1", "--init", "--data-plane", plane])
        .args(["--listen", &udp.to_string(), "--raft", &raft.to_string()])
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "info,openraft=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    cmd
}

/// Creates a sequence, starts `unid agent` and takes 2000 ids through `unid next`.
fn ids_through_an_agent(root: &Path, udp: SocketAddr) {
    wait_leader(&[udp], None, Duration::from_secs(20));
    create_sequence(&[udp], "planes", 8);
    let socket = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let ring_dir = root.join("rings");
    let _agent = Proc(
        agent_command(udp, "planes", &ring_dir, socket)
            .args(["--refill-period-ms", "50"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_agent_socket(socket);
    let out = Command::new(UNID)
        .args(["next", "planes", "-n", "2000", "--wait-ms", "15000"])
        .arg("--ring-dir")
        .arg(&ring_dir)
        .args(["--socket", &socket.to_string()])
        .output()
        .unwrap();
    assert_eq!(increasing_ids(out).len(), 2000);
}

fn data_plane_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("data plane:")).collect()
}

#[test]
fn threads_plane_serves_ids_through_an_agent() {
    let root = tempfile::tempdir().unwrap();
    let (udp, raft) = (
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log = root.path().join("server.log");
    let mut cmd = server_cmd(&root.path().join("data"), udp, raft, "threads", &log);
    cmd.args(["--metrics", &metrics.to_string()]);
    let _server = Proc(cmd.spawn().unwrap());
    ids_through_an_agent(root.path(), udp);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = data_plane_lines(&text);
    assert_eq!(lines.len(), 1, "one data plane line:\n{text}");
    assert!(
        lines[0].contains("INFO") && lines[0].contains("data plane: threads (forced"),
        "{}",
        lines[0]
    );
    let mut s = TcpStream::connect(metrics).unwrap();
    use std::io::{Read as _, Write as _};
    write!(s, "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(
        body.contains("unid_server_data_plane{plane=\"threads\"} 1\n"),
        "{body}"
    );
}

#[test]
fn without_io_uring_auto_falls_back_and_forced_io_uring_fails_clearly() {
    let root = tempfile::tempdir().unwrap();
    // `auto` under the filter: threads, one WARN line naming the refused call, and it serves.
    let (udp, raft) = (
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let log = root.path().join("auto.log");
    let mut cmd = server_cmd(&root.path().join("auto"), udp, raft, "auto", &log);
    unid_engine::plane::deny_io_uring_in_child(&mut cmd);
    let server = Proc(cmd.spawn().unwrap());
    ids_through_an_agent(root.path(), udp);
    drop(server);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = data_plane_lines(&text);
    assert_eq!(lines.len(), 1, "one data plane line:\n{text}");
    for want in [
        "WARN",
        "data plane: threads",
        "io_uring is unavailable: io_uring_setup",
        "os error 1",
    ] {
        assert!(lines[0].contains(want), "{want:?} not in {}", lines[0]);
    }
    assert!(!text.contains("panicked"), "{text}");

    // `io-uring` forced under the filter: exits non-zero at once with one clear line.
    let (udp, raft) = (
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let log = root.path().join("forced.log");
    let mut cmd = server_cmd(&root.path().join("forced"), udp, raft, "io-uring", &log);
    unid_engine::plane::deny_io_uring_in_child(&mut cmd);
    let mut child = Proc(cmd.spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "forced io-uring kept running");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "{status}");
    let text = std::fs::read_to_string(&log).unwrap();
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "one error line:\n{text}");
    assert!(
        errors[0].starts_with("unid: error:") && errors[0].contains("io_uring is unavailable"),
        "{}",
        errors[0]
    );
    for never in ["panicked", "backtrace", "raft started"] {
        assert!(!text.contains(never), "{never:?} in:\n{text}");
    }
}
