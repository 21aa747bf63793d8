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
        agent_uid: None,
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

/// `next()` (its fast path over one ring) and `take_range()` (the general way)
/// interleaved: every id once, increasing, across blocks, a block cut by a
/// `take_range` and a restarted agent's new ring file; a 2-byte ring hands
/// out its last id below the reserved all-ones value and nothing above.
#[test]
fn next_and_take_range_interleave_across_blocks_and_a_restarted_agent() {
    let d = Dir::new("interleave");
    let mut p =
        unid_ring::Producer::create(&d.0, "mix", &unid_ring::ProducerOptions::new(2)).unwrap();
    p.push(10, 3).unwrap();
    p.push(20, 5).unwrap();
    let mut u = Unid::open_with("mix", options(&d, dead_socket())).unwrap();
    let mut got = vec![u.next().unwrap().get()];
    let (first, count) = u.take_range(4).unwrap(); // the rest of the first block only
    assert_eq!((first.get(), count), (11, 2));
    got.extend((0..count).map(|i| first.get() + u128::from(i)));
    got.push(u.next().unwrap().get());
    let (first, count) = u.take_range(2).unwrap();
    got.extend((0..count).map(|i| first.get() + u128::from(i)));
    got.push(u.next().unwrap().get());
    assert_eq!(got, vec![10, 11, 12, 20, 21, 22, 23]);
    // The agent restarts: the old ring is closed, a new file holds higher ids.
    drop(p);
    let mut p =
        unid_ring::Producer::create(&d.0, "mix", &unid_ring::ProducerOptions::new(2)).unwrap();
    p.push(65_530, 5).unwrap(); // 65_530..=65_534: the last ids a 2-byte sequence has
    let id = u.next().unwrap();
    assert_eq!(
        (id.get(), id.width()),
        (24, Width::W2),
        "the old ring's last id first"
    );
    let rest: Vec<u128> = (0..5).map(|_| u.next().unwrap().get()).collect();
    assert_eq!(rest, (65_530..=65_534).collect::<Vec<_>>());
    let e = u.next().unwrap_err();
    assert!(matches!(e, Error::NotReady { .. }), "{e}");
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

fn paired_options(primary: &Dir, backup: Option<&Dir>) -> Options {
    Options {
        ring_dir: primary.0.clone(),
        socket: dead_socket(),
        socket_fallback: false,
        wait: Duration::from_millis(200),
        backup_ring_dir: backup.map(|b| b.0.clone()),
        agent_uid: None,
    }
}

fn values(ids: Vec<Id>) -> Vec<u128> {
    ids.iter().map(|i| i.get()).collect()
}

#[test]
fn paired_rings_switch_discard_what_is_not_above_and_keep_order() {
    let (d1, d2) = (Dir::new("pair-p"), Dir::new("pair-b"));
    let opts = unid_ring::ProducerOptions::new(8);
    let mut p1 = unid_ring::Producer::create(&d1.0, "s", &opts).unwrap();
    let mut p2 = unid_ring::Producer::create(&d2.0, "s", &opts).unwrap();
    p1.push(1000, 100).unwrap();
    // The backup's blocks: one older than the primary's, one newer.
    p2.push(10, 50).unwrap();
    p2.push(5000, 100).unwrap();
    let mut u = Unid::open_with("s", paired_options(&d1, Some(&d2))).unwrap();
    assert!(u.paired() && u.via_ring() && !u.on_backup());
    assert_eq!(
        values(u.take(100).unwrap()),
        (1000..1100).collect::<Vec<_>>()
    );
    // The primary's ring is empty: the backup's at once, its old block
    // discarded (lost, never returned).
    assert_eq!(u.next().unwrap().get(), 5000);
    assert!(u.on_backup());
    assert_eq!(u.stats().switches, 1);
    assert_eq!(u.stats().ids_skipped, 50);
    // The primary refills below the last id: the handle stays on the backup.
    p1.push(2000, 10).unwrap();
    assert_eq!(
        values(u.take(99).unwrap()),
        (5001..5100).collect::<Vec<_>>()
    );
    // Both empty (the primary's ids are all below the last): not ready.
    p1.heartbeat_now();
    p2.heartbeat_now();
    let e = u.next().unwrap_err();
    assert!(
        matches!(e, Error::NotReady { .. } | Error::AgentNotRunning { .. }),
        "{e}"
    );
    assert_eq!(u.stats().ids_skipped, 60);
    p2.push(6000, 5).unwrap();
    p1.push(7000, 3).unwrap();
    assert_eq!(u.next().unwrap().get(), 6000);
    assert_eq!(values(u.take(4).unwrap()), (6001..6005).collect::<Vec<_>>());
    // Backup empty: the primary (7000.. is above 6004).
    assert_eq!(values(u.take(3).unwrap()), vec![7000, 7001, 7002]);
    assert!(!u.on_backup());
    assert_eq!(u.stats().switches, 2);
    p2.push(30_000, 1).unwrap();
    assert_eq!(u.next().unwrap().get(), 30_000);
    assert_eq!(u.stats().switches, 3);
    // A primary ring with a stale block before a long one: the stale one is
    // discarded, the long one taken whole and handed out across calls
    // (the spare), nothing beyond the stale block lost.
    p1.push(10_000, 10).unwrap();
    p1.push(40_000, 50).unwrap();
    assert_eq!(u.next().unwrap().get(), 40_000);
    assert_eq!(
        values(u.take(49).unwrap()),
        (40_001..40_050).collect::<Vec<_>>()
    );
    assert_eq!(u.stats().switches, 4);
    assert_eq!(u.stats().ids_skipped, 70);
}

#[test]
fn the_pair_file_names_the_backup_and_a_replaced_ring_is_mapped_again() {
    let (d1, d2) = (Dir::new("pfile-p"), Dir::new("pfile-b"));
    let opts = unid_ring::ProducerOptions::new(4);
    let mut p1 = unid_ring::Producer::create(&d1.0, "t", &opts).unwrap();
    let mut p2 = unid_ring::Producer::create(&d2.0, "t", &opts).unwrap();
    std::fs::write(
        d1.0.join(".unid-pair"),
        format!("role primary\nactive 1\npeer_ring_dir {}\n", d2.0.display()),
    )
    .unwrap();
    p1.push(100, 2).unwrap();
    p2.push(200, 2).unwrap();
    let mut u = Unid::open_with("t", paired_options(&d1, None)).unwrap();
    assert!(u.paired());
    assert_eq!(values(u.take(2).unwrap()), vec![100, 101]);
    // The primary goes (its ring closed): the backup serves.
    drop(p1);
    assert_eq!(values(u.take(2).unwrap()), vec![200, 201]);
    // A restarted primary replaces its ring file; the backup is empty: the
    // new primary ring is mapped again and used.
    let mut again = unid_ring::Producer::create(&d1.0, "t", &opts).unwrap();
    again.push(300, 2).unwrap();
    p2.heartbeat_now();
    assert_eq!(values(u.take(2).unwrap()), vec![300, 301]);
    assert_eq!(u.stats().switches, 2);
}

/// Writes `value` over the ring's `head` (offset 128) as a consumer with
/// write access could.
fn write_head(ring: &std::path::Path, value: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(ring).unwrap();
    f.write_at(&value.to_le_bytes(), 128).unwrap();
}

/// Issue 12 item 3: a rewound ring head makes a handle return `Corrupt`,
/// never an id it returned before and never a panic.
#[test]
fn a_rewound_head_is_corrupt_not_a_repeat_or_a_panic() {
    let d = Dir::new("rewind");
    let mut p =
        unid_ring::Producer::create(&d.0, "r", &unid_ring::ProducerOptions::new(8)).unwrap();
    p.push(100, 50).unwrap();
    let mut u = Unid::open_with("r", options(&d, dead_socket())).unwrap();
    let first: Vec<u128> = u.take(20).unwrap().iter().map(|i| i.get()).collect();
    assert_eq!(first, (100..120).collect::<Vec<_>>());
    write_head(&d.0.join("r"), 0); // back to block 0, offset 0
    let mut seen: std::collections::HashSet<u128> = first.into_iter().collect();
    let mut corrupt = 0;
    for _ in 0..40 {
        match u.next() {
            Ok(id) => assert!(seen.insert(id.get()), "id {id} returned twice"),
            Err(Error::Corrupt { .. }) => corrupt += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(corrupt > 0, "the rewind went unnoticed");
}

/// Issue 12 item 2: a squatted ring folder (writable by others, or owned by
/// another user) is refused: nothing is taken from the forged ring in it.
#[test]
fn a_squatted_ring_folder_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let d = Dir::new("squat");
    let mut p =
        unid_ring::Producer::create(&d.0, "f", &unid_ring::ProducerOptions::new(8)).unwrap();
    p.push(1, 5).unwrap(); // "ids issued long before"
    std::fs::set_permissions(&d.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = Unid::open_with("f", options(&d, dead_socket())).unwrap_err();
    assert!(matches!(e, Error::Insecure { .. }), "{e}");
    std::fs::set_permissions(&d.0, std::fs::Permissions::from_mode(0o700)).unwrap();
    if unid_ring::secure::euid() != 0 {
        return;
    }
    // Owned by another user (a squatter): refused, unless it is the
    // configured agent user.
    std::os::unix::fs::chown(&d.0, Some(65534), Some(65534)).unwrap();
    std::os::unix::fs::chown(d.0.join("f"), Some(65534), Some(65534)).unwrap();
    let e = Unid::open_with("f", options(&d, dead_socket())).unwrap_err();
    assert!(matches!(e, Error::Insecure { .. }), "{e}");
    let mut trusting = options(&d, dead_socket());
    trusting.agent_uid = Some(65534);
    let mut u = Unid::open_with("f", trusting).unwrap();
    assert_eq!(u.next().unwrap().get(), 1);
}

/// Child mode (`UNID_CLIENT_CHILD=listen`): a fake agent on a loopback
/// port; prints the port, answers `PONG` to `PING` and id `1` to
/// anything else. Run as another user by the test below.
#[test]
fn child_entry() {
    if std::env::var("UNID_CLIENT_CHILD").as_deref() != Ok("listen") {
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    println!("port {}", l.local_addr().unwrap().port());
    std::io::stdout().flush().unwrap();
    for s in l.incoming() {
        let Ok(s) = s else { continue };
        std::thread::spawn(move || {
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                let reply = if line.starts_with("PING") {
                    "PONG\n"
                } else {
                    "OK 1 8\n1\n"
                };
                let _ = w.write_all(reply.as_bytes());
                line.clear();
            }
        });
    }
}

/// Issue 12 item 6: with no agent running, another user's listener on the
/// agent's port is refused (its owner is not the agent's user); nothing it
/// sends is returned.
#[test]
fn a_foreign_listener_on_the_agent_port_is_refused() {
    use std::os::unix::process::CommandExt;
    if unid_ring::secure::euid() != 0 {
        eprintln!("not root: cannot run a listener as another user; skipping");
        return;
    }
    /// Kills the child however the test ends.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = match std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_entry",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .env("UNID_CLIENT_CHILD", "listen")
        .uid(65534)
        .gid(65534)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot run the test binary as uid 65534 ({e}): skipping");
            return;
        }
    };
    let mut child = Kill(child);
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    let port: u16 = loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "child exited");
        if let Some(p) = line.trim().strip_prefix("port ") {
            break p.parse().unwrap();
        }
    };
    let socket: SocketAddr = ([127, 0, 0, 1], port).into();
    let d = Dir::new("foreign");
    let got = Unid::open_with("default", options(&d, socket)).and_then(|mut u| u.next());
    drop(child);
    match got {
        Err(Error::Insecure { reason, .. }) => assert!(reason.contains("65534"), "{reason}"),
        other => panic!("a foreign listener was trusted: {other:?}"),
    }
}
