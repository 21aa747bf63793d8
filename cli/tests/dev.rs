//! Drives `unid dev` the way the README tells a newcomer to: start it, take
//! ids with `unid next -n 5` from another process, press Ctrl-C, and check
//! that everything stopped and the temporary folder is gone.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const UNID: &str = env!("CARGO_BIN_EXE_unid");
/// Start-up of a cluster and an agent in a debug build, with room for a busy
/// CI machine.
const READY_TIMEOUT_S: u64 = 90;
const STOP_TIMEOUT_S: u64 = 20;

fn ids_of(stdout: &[u8]) -> Vec<u128> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| l.trim().parse::<u128>().expect("an id in decimal"))
        .collect()
}

#[test]
fn dev_serves_ids_and_cleans_up_on_ctrl_c() {
    dev_session(&[], "/dev/shm/unid", "127.0.0.1:7411");
}

/// With another base port, ring folder and socket: the start-up check and the printed hints
/// must use them (they once asked the default agent).
#[test]
fn dev_with_other_ports_and_ring_dir_prints_hints_that_work() {
    // The server's UDP port; its Raft port is 100 above and must be free too.
    let port = (0..100)
        .map(|_| unid_engine::ports::free_port().expect("a free port"))
        .find(|p| *p < 65_000 && std::net::TcpListener::bind(("127.0.0.1", p + 100)).is_ok())
        .expect("a free pair of ports 100 apart");
    let socket_port = unid_engine::ports::free_port().expect("a free port");
    let ring_dir = format!("/dev/shm/unid-dev-test-{}", std::process::id());
    let socket = format!("127.0.0.1:{socket_port}");
    let args = [
        "--base-port".to_owned(),
        port.to_string(),
        "--ring-dir".to_owned(),
        ring_dir.clone(),
        "--socket".to_owned(),
        socket.clone(),
    ];
    dev_session(&args, &ring_dir, &socket);
    let _ = std::fs::remove_dir_all(&ring_dir);
}

/// Starts `unid dev ARGS`, takes ids twice with the `unid next` command it prints, presses
/// Ctrl-C, and checks that everything stopped (the `default` ring under `ring_dir` and the
/// agent's `socket` too).
fn dev_session(dev_args: &[String], ring_dir: &str, socket: &str) {
    let mut dev = Command::new(UNID)
        .arg("dev")
        .args(dev_args)
        // Its own process group, like a shell job, so that Ctrl-C below can
        // go to the whole group as a terminal sends it.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start unid dev");
    let stdout = dev.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            println!("[dev] {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    // Wait for "ready", remembering the folder it promises to remove and the
    // first ids it showed.
    let mut work_dir = None;
    let mut first_ids: Vec<u128> = Vec::new();
    let mut next_args: Vec<String> = Vec::new();
    loop {
        let line = match rx.recv_timeout(Duration::from_secs(READY_TIMEOUT_S)) {
            Ok(line) => line,
            Err(e) => {
                let _ = dev.kill();
                panic!("unid dev never said it was ready ({e})");
            }
        };
        if let Some(rest) = line.split("data and logs in ").nth(1) {
            work_dir = Some(std::path::PathBuf::from(rest.trim_end_matches(").")));
        }
        if let Some(rest) = line.split("the first ids of sequence `default`: ").nth(1) {
            first_ids = rest
                .split_whitespace()
                .map(|s| s.parse().expect("decimal id"))
                .collect();
        }
        // The hint: `<unid> next -n 5 [--ring-dir D --socket S]   # ...`.
        if let Some(rest) = line.split(" next -n 5").nth(1) {
            next_args = ["next", "-n", "5"].map(String::from).to_vec();
            next_args.extend(
                rest.split('#')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .map(String::from),
            );
        }
        if line.contains("ready. Ctrl-C stops everything") {
            break;
        }
    }
    let work_dir = work_dir.expect("unid dev names its data folder");
    assert!(
        work_dir.is_dir(),
        "{} exists while running",
        work_dir.display()
    );
    assert_eq!(first_ids.len(), 5, "unid dev shows five ids");
    assert!(!next_args.is_empty(), "unid dev prints a `next -n 5` hint");

    // A second terminal: `unid next -n 5`, twice.
    let mut seen = first_ids.clone();
    for _ in 0..2 {
        let out = Command::new(UNID)
            .args(&next_args)
            .env_remove("UNID_RING_DIR")
            .env_remove("UNID_SOCKET")
            .output()
            .expect("run unid next");
        assert!(
            out.status.success(),
            "unid next failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ids = ids_of(&out.stdout);
        assert_eq!(ids.len(), 5, "five ids, one per line");
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "increasing: {ids:?}");
        seen.extend(ids);
    }
    // One consumer, one after the other: every id is new and above the last.
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "ids increase across calls: {seen:?}"
    );

    // Ctrl-C: a terminal sends SIGINT to every process of the foreground
    // group.
    let group = nix::unistd::Pid::from_raw(dev.id() as i32);
    nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let deadline = std::time::Instant::now() + Duration::from_secs(STOP_TIMEOUT_S);
    let status = loop {
        if let Some(status) = dev.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = dev.kill();
            panic!("unid dev did not stop within {STOP_TIMEOUT_S} s of Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    reader.join().expect("reader thread");
    assert!(
        status.success(),
        "unid dev exits cleanly on Ctrl-C: {status}"
    );
    assert!(
        !work_dir.exists(),
        "{} is removed after Ctrl-C",
        work_dir.display()
    );
    assert!(
        !std::path::Path::new(ring_dir).join("default").exists(),
        "the ring file of `default` is removed after Ctrl-C"
    );
    // Nothing is left listening on the agent's socket.
    assert!(
        std::net::TcpStream::connect_timeout(&socket.parse().unwrap(), Duration::from_millis(200))
            .is_err(),
        "the agent stopped"
    );
}
