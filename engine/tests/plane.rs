//! Choosing the data plane where io_uring is refused: this test binary re-runs itself under a
//! seccomp filter that fails the io_uring syscalls with EPERM (as Docker's default profile
//! does), and there `Auto` must pick the threads plane and serve, and a forced `IoUring` must
//! be a clear error, not glommio's panic.

use std::net::{SocketAddr, UdpSocket as StdSocket};
use std::time::Duration;

use unid_engine::plane::{self, DataPlane};
use unid_engine::shard::{Handler, ShardConfig, Shards};
use unid_engine::udp::SendBatch;

struct Echo;

impl Handler for Echo {
    type Message = ();

    fn on_datagram(&mut self, data: &[u8], from: SocketAddr, _now_us: u64, out: &mut SendBatch) {
        out.push(from, data)
            .expect("the shard leaves room for one reply");
    }
}

fn config(plane: DataPlane) -> ShardConfig {
    let mut config = ShardConfig::new(2, "127.0.0.1:0".parse().unwrap());
    config.data_plane = plane;
    config
}

fn echo_once(shards: &Shards<()>) {
    let socket = StdSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    socket.send_to(b"ping", shards.local_addr()).unwrap();
    let mut buf = [0u8; 8];
    // No retry on EINTR: the io_uring probe must not leave task work on this thread
    // (`probe_io_uring` runs on a thread of its own; this test failed in CI before it did).
    let (n, _) = socket.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ping");
}

const CHILD_ENV: &str = "UNID_ENGINE_NO_IO_URING_CHILD";

/// Run by `without_io_uring_auto_picks_threads` under the filter; does nothing otherwise.
#[test]
fn no_io_uring_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let reason = plane::probe_io_uring().expect_err("the filter refuses io_uring");
    eprintln!("child: probe says {reason}");
    assert!(reason.contains("io_uring_setup"), "{reason}");
    assert!(reason.contains("os error 1"), "EPERM expected: {reason}");

    let shards = Shards::start(config(DataPlane::Auto), |_| Echo).unwrap();
    let chosen = shards.data_plane().clone();
    assert_eq!(chosen.plane, DataPlane::Threads);
    assert!(chosen.is_fallback());
    assert!(chosen.reason.contains(&reason), "{}", chosen.reason);
    echo_once(&shards);
    shards.shutdown().unwrap();

    let err = Shards::start(config(DataPlane::IoUring), |_| Echo).unwrap_err();
    assert!(
        matches!(&err, unid_engine::Error::IoUringUnavailable { reason: r } if *r == reason),
        "{err:?}"
    );
    assert!(err.to_string().contains("io_uring is unavailable"), "{err}");
    println!("NO-IO-URING-CHILD-OK");
}

#[test]
fn without_io_uring_auto_picks_threads() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "no_io_uring_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, "1");
    plane::deny_io_uring_in_child(&mut cmd);
    let output = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("child stdout:\n{stdout}\nchild stderr:\n{stderr}");
    assert!(output.status.success(), "child failed: {}", output.status);
    assert!(stdout.contains("NO-IO-URING-CHILD-OK"));
}

/// Without the filter (this machine has io_uring), `Auto` takes glommio: the child's result
/// above comes from the filter, not from the machine.
#[test]
fn with_io_uring_auto_picks_glommio() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    if let Err(reason) = plane::probe_io_uring() {
        eprintln!("skipping: io_uring is unavailable here ({reason})");
        return;
    }
    let shards = Shards::start(config(DataPlane::Auto), |_| Echo).unwrap();
    assert_eq!(shards.data_plane().plane, DataPlane::IoUring);
    echo_once(&shards);
    shards.shutdown().unwrap();
}
