//! The io_uring probe leaves nothing on the caller's thread. A ring belongs to the thread
//! that set it up, and closing it makes the kernel queue task work on that thread that cuts
//! its next blocking call with a timeout short (`EINTR`): when the probe ran on the caller's
//! thread, a `recv_from` with a read timeout right after it failed with "Interrupted system
//! call" (CI, engine/tests/plane.rs and shard.rs). Its own test binary: the probe runs once
//! per process.

use std::net::UdpSocket;
use std::time::Duration;

#[test]
fn a_blocking_receive_after_the_probe_times_out_instead_of_being_interrupted() {
    if let Err(reason) = unid_engine::plane::probe_io_uring() {
        eprintln!("skipping: io_uring is unavailable here ({reason})");
        return;
    }
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 8];
    let err = socket.recv_from(&mut buf).expect_err("nobody sends");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "the receive should time out, got {err:?}"
    );
}
