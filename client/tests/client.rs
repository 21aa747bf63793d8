//! The client without an agent process: a ring made here with
//! `unid_ring::Producer`, and a scripted line server standing in for the
//! agent's socket.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

use unid::{Error, Id, Options, Unid, Width};

/// A fresh ring folder under /dev/shm, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let d = PathBuf::from(format!(
            "/dev/shm/unid-client-test-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port nothing listens on.
fn dead_socket() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Serves one connection, answering each request line with the next
/// scripted reply (a reply may be several lines), then closes.
fn scripted(replies: Vec<&'static str>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let Ok((s, _)) = l.accept() else { return };
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        for reply in replies {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let _ = w.write_all(reply.as_bytes());
        }
    });
    addr
}

fn options(dir: &Dir, socket: SocketAddr) -> Options {
    Options {
        ring_dir: dir.0.clone(),
        socket,
        socket_fallback: true,
        wait: Duration::from_millis(100),
        backup_ring_dir: None,
    }
}

#[test]
fn no_agent_and_bad_names_are_clear_errors() {
    let d = Dir::new("none");
    let e = Unid::open_with("orders", options(&d, dead_socket())).unwrap_err();
    assert!(matches!(e, Error::AgentNotRunning { .. }), "{e}");
    assert!(e.to_string().contains("unid agent"), "{e}");
    let e = Unid::open_with("../etc", options(&d, dead_socket())).unwrap_err();
    assert!(matches!(e, Error::InvalidName { .. }), "{e}");
}

#[test]
fn ring_ids_typed_by_width_and_closed_ring_reported() {
    let d = Dir::new("ring");
    let mut p =
        unid_ring::Producer::create(&d.0, "small", &unid_ring::ProducerOptions::new(2)).unwrap();
    p.push(65_000, 10).unwrap();
    let mut u = Unid::open_with("small", options(&d, dead_socket())).unwrap();
    assert!(u.via_ring());
    assert_eq!(u.width(), Some(Width::W2));
    let id = u.next().unwrap();
    assert_eq!((id.get(), id.width()), (65_000, Width::W2));
    assert_eq!(u16::try_from(id).unwrap(), 65_000);
    assert_eq!(u64::try_from(id).unwrap(), 65_000);
    assert_eq!(id.to_string(), "65000");
    let rest: Vec<u128> = u.take(9).unwrap().iter().map(|i| i.get()).collect();
    assert_eq!(rest, (65_001..65_010).collect::<Vec<_>>());
    // Empty ring, live producer, no socket: not ready (retry), after the wait.
    let e = u.next().unwrap_err();
    assert!(matches!(e, Error::NotReady { .. }), "{e}");
    drop(p);
    let e = u.next().unwrap_err();
    assert!(matches!(e, Error::AgentNotRunning { .. }), "{e}");
    assert!(matches!(u.take(0), Err(Error::BadCount { asked: 0 })));
}

#[test]
fn wide_ids_do_not_narrow() {
    let d = Dir::new("wide");
    let mut p =
        unid_ring::Producer::create(&d.0, "big", &unid_ring::ProducerOptions::new(16)).unwrap();
    p.push(u128::from(u64::MAX) + 5, 3).unwrap();
    let mut u = Unid::open_with("big", options(&d, dead_socket())).unwrap();
    let id: Id = u.next().unwrap();
    assert!(matches!(
        u64::try_from(id),
        Err(Error::TooWide { bits: 64, .. })
    ));
    assert_eq!(u128::from(id), u128::from(u64::MAX) + 5);
}

#[test]
fn socket_fallback_keeps_every_id_of_a_reply_in_order() {
    // One reply spanning two blocks: 10, 11 then 20. All three are handed
    // out, in order, before anything newer.
    let socket = scripted(vec!["PONG\n", "OK 3 4\n10\n11\n20\n", "OK 1 4\n30\n"]);
    let d = Dir::new("sock");
    let mut u = Unid::open_with("s", options(&d, socket)).unwrap();
    assert!(!u.via_ring());
    let ids: Vec<u128> = u.take(3).unwrap().iter().map(|i| i.get()).collect();
    assert_eq!(ids, vec![10, 11, 20]);
    assert_eq!(u.next().unwrap().get(), 30);
    assert_eq!(u.width(), Some(Width::W4));
}

#[test]
fn socket_errors_map_to_typed_errors() {
    let socket = scripted(vec![
        "PONG\n",
        "ERR UNKNOWN_SEQUENCE nope\n",
        "ERR EXHAUSTED done\n",
        "ERR NOT_READY later\n",
        "OK 2 4\n5\n",
    ]);
    let d = Dir::new("errs");
    let mut u = Unid::open_with("s", options(&d, socket)).unwrap();
    assert!(matches!(u.next(), Err(Error::UnknownSequence { .. })));
    assert!(matches!(u.next(), Err(Error::Exhausted { .. })));
    assert!(matches!(u.next(), Err(Error::NotReady { .. })));
    // A short reply (2 announced, 1 sent, then EOF) is an error, never a
    // made-up id.
    let e = u.next().unwrap_err();
    assert!(
        matches!(
            e,
            Error::Io { .. } | Error::Protocol { .. } | Error::AgentNotRunning { .. }
        ),
        "{e}"
    );
    let socket = scripted(vec!["PONG\n", "OK 1 8\nnot-a-number\n"]);
    let mut u = Unid::open_with("s", options(&d, socket)).unwrap();
    assert!(matches!(u.next(), Err(Error::Protocol { .. })));
}
