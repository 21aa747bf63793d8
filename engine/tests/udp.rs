//! Batched UDP on loopback: recvmmsg/sendmmsg, truncation, failures, and the error queue.

use std::net::{SocketAddr, UdpSocket as StdSocket};
use std::time::{Duration, Instant};

use unid_engine::udp::{
    BATCH_DATAGRAMS_MAX, DATAGRAM_BYTES_MAX, ErrorOrigin, PeerError, PeerErrorKind, RecvBatch,
    SendBatch, UdpConfig, UdpSocket,
};

const DEADLINE: Duration = Duration::from_secs(5);

fn bind(addr: &str) -> Option<UdpSocket> {
    let addr: SocketAddr = addr.parse().unwrap();
    match UdpSocket::bind(addr, &UdpConfig::default()) {
        Ok(socket) => Some(socket),
        Err(err) if addr.is_ipv6() => {
            eprintln!("skipping: cannot bind {addr}: {err}");
            None
        }
        Err(err) => panic!("bind {addr}: {err}"),
    }
}

/// Receives until `want` datagrams arrived (or the deadline passes), polling the nonblocking
/// socket.
fn recv_all(socket: &mut UdpSocket, want: usize) -> Vec<(Vec<u8>, SocketAddr, bool)> {
    let mut batch = RecvBatch::new(BATCH_DATAGRAMS_MAX).unwrap();
    let mut got = Vec::new();
    let start = Instant::now();
    while got.len() < want && start.elapsed() < DEADLINE {
        let n = socket.recv_batch(&mut batch).unwrap();
        if n == 0 {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        assert_eq!(n, batch.len());
        for d in batch.iter() {
            got.push((d.data.to_vec(), d.from, d.truncated));
        }
    }
    got
}

fn many_datagrams(server_addr: &str, client_addr: &str) {
    let (Some(mut server), Some(mut client)) = (bind(server_addr), bind(client_addr)) else {
        return;
    };
    const TOTAL: usize = 1000;
    let mut out = SendBatch::new(BATCH_DATAGRAMS_MAX).unwrap();
    let mut sent = 0;
    let mut received = Vec::new();
    // Windows of one batch, so the receive buffer never overflows.
    while sent < TOTAL {
        let window = (TOTAL - sent).min(BATCH_DATAGRAMS_MAX);
        for i in sent..sent + window {
            // Lengths vary from 4 to DATAGRAM_BYTES_MAX bytes.
            let len = 4 + (i * 37) % (DATAGRAM_BYTES_MAX - 3);
            out.push_with(server.local_addr(), |buf| {
                buf[..4].copy_from_slice(&(i as u32).to_le_bytes());
                buf[4..len].fill(i as u8);
                len
            })
            .unwrap();
        }
        let report = client.send_batch(&mut out);
        assert_eq!((report.sent, report.failed, report.pending), (window, 0, 0));
        assert!(out.is_empty());
        received.extend(recv_all(&mut server, window));
        sent += window;
    }
    assert_eq!(received.len(), TOTAL);
    for (i, (data, from, truncated)) in received.iter().enumerate() {
        assert_eq!(*from, client.local_addr());
        assert!(!truncated);
        assert_eq!(data.len(), 4 + (i * 37) % (DATAGRAM_BYTES_MAX - 3));
        assert_eq!(u32::from_le_bytes(data[..4].try_into().unwrap()), i as u32);
        assert!(data[4..].iter().all(|&b| b == i as u8));
    }
    assert_eq!(client.counters().datagrams_out, TOTAL as u64);
    assert_eq!(server.counters().datagrams_in, TOTAL as u64);
    assert!(server.counters().recv_batches <= TOTAL as u64);
    assert_eq!(server.counters().truncated_in, 0);
}

#[test]
fn recv_send_batches_v4() {
    many_datagrams("127.0.0.1:0", "127.0.0.1:0");
}

#[test]
fn recv_send_batches_v6() {
    many_datagrams("[::1]:0", "[::1]:0");
}

#[test]
fn truncation_is_flagged() {
    let mut server = bind("127.0.0.1:0").unwrap();
    let client = StdSocket::bind("127.0.0.1:0").unwrap();
    client
        .send_to(&[7u8; DATAGRAM_BYTES_MAX + 500], server.local_addr())
        .unwrap();
    client.send_to(&[8u8; 10], server.local_addr()).unwrap();
    let got = recv_all(&mut server, 2);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].0.len(), DATAGRAM_BYTES_MAX);
    assert!(got[0].2, "long datagram must be flagged truncated");
    assert_eq!(got[1].0, vec![8u8; 10]);
    assert!(!got[1].2);
    assert_eq!(server.counters().truncated_in, 1);
}

#[test]
fn buffer_sizes_are_applied() {
    let config = UdpConfig {
        reuse_port: true,
        recv_buffer_bytes: Some(64 << 10),
        send_buffer_bytes: Some(32 << 10),
    };
    let socket = UdpSocket::bind("127.0.0.1:0".parse().unwrap(), &config).unwrap();
    // Linux doubles the requested size (socket(7)); the caps are far above these values.
    assert_eq!(socket.recv_buffer_bytes().unwrap(), 128 << 10);
    assert_eq!(socket.send_buffer_bytes().unwrap(), 64 << 10);
}

#[test]
fn reuse_port_lets_two_sockets_share_a_port() {
    let a = bind("127.0.0.1:0").unwrap();
    let b = UdpSocket::bind(a.local_addr(), &UdpConfig::default()).unwrap();
    assert_eq!(a.local_addr(), b.local_addr());
    let no_reuse = UdpConfig {
        reuse_port: false,
        ..UdpConfig::default()
    };
    assert!(UdpSocket::bind(a.local_addr(), &no_reuse).is_err());
}

/// An address on loopback where nothing listens (bound, read, then closed).
fn closed_port(ip: &str) -> SocketAddr {
    let socket = StdSocket::bind(format!("{ip}:0")).unwrap();
    socket.local_addr().unwrap()
}

fn drain_until_error(socket: &mut UdpSocket) -> Vec<PeerError> {
    let mut errors = Vec::new();
    let start = Instant::now();
    while errors.is_empty() && start.elapsed() < DEADLINE {
        socket.drain_errors(&mut errors).unwrap();
        if errors.is_empty() {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    errors
}

fn refused(local: &str, ip: &str) {
    let Some(mut socket) = bind(local) else {
        return;
    };
    let dead = closed_port(ip);
    let mut out = SendBatch::new(4).unwrap();
    out.push(dead, b"anyone there?").unwrap();
    let report = socket.send_batch(&mut out);
    assert_eq!(report.sent, 1, "the first send to a closed port succeeds");
    let errors = drain_until_error(&mut socket);
    assert_eq!(errors.len(), 1, "one ICMP port unreachable: {errors:?}");
    let err = errors[0];
    assert_eq!(err.kind, PeerErrorKind::Refused);
    assert_eq!(err.dest, dead);
    assert_eq!(err.origin, ErrorOrigin::Icmp);
    assert_eq!(err.offender.map(|ip| ip.is_loopback()), Some(true));
    assert_eq!(socket.counters().peer_errors.refused, 1);

    // The socket keeps working afterwards, for sending and receiving.
    let live = StdSocket::bind(format!("{ip}:0")).unwrap();
    live.set_read_timeout(Some(DEADLINE)).unwrap();
    out.push(live.local_addr().unwrap(), b"hello").unwrap();
    assert_eq!(socket.send_batch(&mut out).sent, 1);
    let mut buf = [0u8; 16];
    let (n, from) = live.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"hello"[..], socket.local_addr()));
    live.send_to(b"back", socket.local_addr()).unwrap();
    let got = recv_all(&mut socket, 1);
    assert_eq!(got[0].0, b"back");
}

#[test]
fn closed_port_gives_refused_v4() {
    refused("127.0.0.1:0", "127.0.0.1");
}

#[test]
fn closed_port_gives_refused_v6() {
    refused("[::1]:0", "[::1]");
}

/// Several refusals queue several events; a stale pending error does not break the next sends.
#[test]
fn many_refusals_are_all_reported() {
    let mut socket = bind("127.0.0.1:0").unwrap();
    let dead: Vec<SocketAddr> = (0..5).map(|_| closed_port("127.0.0.1")).collect();
    let live = StdSocket::bind("127.0.0.1:0").unwrap();
    live.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut out = SendBatch::new(BATCH_DATAGRAMS_MAX).unwrap();
    for addr in &dead {
        out.push(*addr, b"x").unwrap();
    }
    assert_eq!(socket.send_batch(&mut out).sent, dead.len());
    let mut errors = Vec::new();
    let start = Instant::now();
    while errors.len() < dead.len() && start.elapsed() < DEADLINE {
        // Sends in between meet the pending socket error and must still go out.
        out.push(live.local_addr().unwrap(), b"y").unwrap();
        let report = socket.send_batch(&mut out);
        assert_eq!((report.sent, report.failed), (1, 0), "{:?}", out.failures());
        socket.drain_errors(&mut errors).unwrap();
        std::thread::sleep(Duration::from_micros(500));
    }
    let mut dests: Vec<SocketAddr> = errors.iter().map(|e| e.dest).collect();
    dests.sort();
    let mut want = dead.clone();
    want.sort();
    assert_eq!(dests, want);
    assert!(errors.iter().all(|e| e.kind == PeerErrorKind::Refused));
    eprintln!("{:?}", socket.counters());
}

/// A datagram `sendmmsg` refuses is skipped and reported; the ones after it still go out.
#[test]
fn send_continues_past_a_failed_datagram() {
    let mut socket = bind("127.0.0.1:0").unwrap();
    let live = StdSocket::bind("127.0.0.1:0").unwrap();
    live.set_read_timeout(Some(DEADLINE)).unwrap();
    let live_addr = live.local_addr().unwrap();
    // Broadcast without SO_BROADCAST fails with EACCES before anything leaves the host.
    let broadcast: SocketAddr = "255.255.255.255:9".parse().unwrap();
    let mut out = SendBatch::new(8).unwrap();
    out.push(live_addr, b"one").unwrap();
    out.push(broadcast, b"never").unwrap();
    out.push(live_addr, b"two").unwrap();
    let report = socket.send_batch(&mut out);
    assert_eq!((report.sent, report.failed, report.pending), (2, 1, 0));
    assert_eq!(out.failures().len(), 1);
    let failure = out.failures()[0];
    assert_eq!(failure.dest, broadcast);
    assert_eq!(failure.kind, PeerErrorKind::Other(EACCES));
    assert_eq!(failure.origin, ErrorOrigin::Send);
    assert_eq!(socket.counters().send_failed.other, 1);
    let mut buf = [0u8; 8];
    let n = live.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"one");
    let n = live.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"two");
}

/// `EACCES` on Linux.
const EACCES: i32 = 13;
