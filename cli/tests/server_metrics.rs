//! `unid server --metrics`: the Prometheus endpoint counts exactly what was done to the server.

mod server_support;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use server_support::*;
use unid_proto::{ErrorCode, Message};

/// `GET path` on `addr`: (status line, body).
fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// The value of the sample `key` (name with labels, as written), if present.
fn value(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
}

fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    body
}

#[test]
fn metrics_count_grants_ids_cache_hits_errors_and_bad_crc_exactly() {
    let root = tempfile::tempdir().unwrap();
    let mut servers = servers(root.path(), 1);
    let metrics: SocketAddr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let s = &mut servers[0];
    let log = std::fs::File::create(&s.log).unwrap();
    s.child = Some(
        std::process::Command::new(UNID)
            .args(["server", "--id", "1", "--init"])
            .args(["--listen", &s.udp.to_string()])
            .args(["--raft", &s.raft.to_string()])
            .args(["--metrics", &metrics.to_string()])
            .arg("--data-dir")
            .arg(&s.dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let udp = s.udp;
    create_sequence(&[udp], "orders", 8);

    // Before any grant: the families are there, with zero grants for the new sequence.
    let text = scrape(metrics);
    assert!(
        text.contains("# TYPE unid_server_grants_total counter\n"),
        "{text}"
    );
    assert_eq!(value(&text, "unid_server_is_leader"), Some(1.0), "{text}");

    let mut agent = Agent::new();
    agent.register(udp, Duration::from_secs(10));
    let mut ids = 0u64;
    let mut grants = 0u64;
    for count in [1, 10, 100, 7] {
        let (_, got) = agent.grant(udp, "orders", count, Duration::from_secs(10));
        ids += got;
        grants += 1;
    }
    // A retransmit is answered from the cache: no new grant.
    agent.seq += 1;
    let req = agent.encode(
        agent.seq,
        &Message::BlockRequest {
            sequence: "orders",
            count: 5,
        },
    );
    agent.send_raw(udp, &req);
    let (_, first, _) = agent.recv(Duration::from_secs(2)).expect("a grant");
    let Reply::Grant { count, .. } = first else {
        panic!("{first:?}")
    };
    ids += count;
    grants += 1;
    agent.send_raw(udp, &req);
    let (_, again, _) = agent
        .recv(Duration::from_secs(2))
        .expect("the cached grant");
    assert_eq!(first, again);
    // One UnknownSequence error.
    let r = agent.call(
        udp,
        &Message::BlockRequest {
            sequence: "nope",
            count: 1,
        },
        Duration::from_secs(2),
    );
    assert_eq!(r, Some(Reply::Error(ErrorCode::UnknownSequence)));
    // Two datagrams with a wrong CRC (the last byte of an unauthenticated datagram is CRC).
    let mut corrupt = agent.encode(agent.seq + 100, &Message::Ping { sent_us: 1 });
    *corrupt.last_mut().unwrap() ^= 0x01;
    agent.send_raw(udp, &corrupt);
    agent.send_raw(udp, &corrupt);
    assert!(agent.recv(Duration::from_millis(300)).is_none());

    // The server handles datagrams asynchronously: wait for both to be counted.
    let bad_crc = "unid_server_datagrams_dropped_total{reason=\"bad_crc\"}";
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = scrape(metrics);
        if value(&text, bad_crc) == Some(2.0) || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let v = |key: &str| value(&text, key).unwrap_or_else(|| panic!("no {key} in\n{text}"));
    assert_eq!(v(bad_crc), 2.0);
    assert_eq!(
        v("unid_server_datagrams_dropped_total{reason=\"auth\"}"),
        0.0
    );
    assert_eq!(v("unid_server_grants_total"), grants as f64);
    assert_eq!(
        v("unid_server_sequence_grants_total{sequence=\"orders\"}"),
        grants as f64
    );
    assert_eq!(
        v("unid_server_sequence_ids_granted_total{sequence=\"orders\"}"),
        ids as f64
    );
    assert_eq!(v("unid_server_reply_cache_hits_total"), 1.0);
    assert_eq!(
        v("unid_server_errors_sent_total{code=\"UnknownSequence\"}"),
        1.0
    );
    assert_eq!(v("unid_server_agents"), 1.0);
    assert_eq!(v("unid_server_is_leader"), 1.0);
    assert_eq!(v("unid_server_granting"), 1.0);
    assert!(v("unid_server_term") >= 1.0);
    assert!(v("unid_server_ceiling_raises_total") >= 1.0);
    assert_eq!(
        v("unid_server_ceiling_raise_seconds_count"),
        v("unid_server_ceiling_raises_total")
    );
    let ceiling = v("unid_server_sequence_ceiling{sequence=\"orders\"}");
    assert!(ceiling > ids as f64, "{ceiling} <= {ids}");
    assert!(v("unid_server_sequence_ids_left{sequence=\"orders\"}") > 1e18);
    assert!(v("unid_server_datagrams_out_total") >= grants as f64 + 2.0);
    assert!(v("unid_server_datagrams_in_total") >= grants as f64 + 5.0);

    // Anything but GET /metrics is refused, and the server keeps serving.
    assert_eq!(http_get(metrics, "/").0, "HTTP/1.1 404 Not Found");
    let mut raw = TcpStream::connect(metrics).unwrap();
    raw.write_all(b"\x16\x03\x01 not http\r\n\r\n").unwrap();
    let mut out = String::new();
    raw.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    agent.grant(udp, "orders", 1, Duration::from_secs(5));
    assert_eq!(
        value(&scrape(metrics), "unid_server_grants_total"),
        Some(grants as f64 + 1.0)
    );
}
