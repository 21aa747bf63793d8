//! One `unid server` process: sequences, grants, retransmits, bad datagrams, the CLI.

mod server_support;

use std::time::Duration;

use server_support::*;
use unid_proto::{ErrorCode, Message};

#[test]
fn one_server_grants_disjoint_increasing_blocks_and_drops_bad_datagrams() {
    let root = tempfile::tempdir().unwrap();
    let mut servers = servers(root.path(), 1);
    start_cluster(&mut servers);
    let s = servers[0].udp;
    create_sequence(&[s], "orders", 8);

    // Unregistered senders are told to Hello first.
    let mut agent = Agent::new();
    agent.node_id = 12345;
    let r = agent.call(
        s,
        &Message::BlockRequest {
            sequence: "orders",
            count: 10,
        },
        Duration::from_secs(2),
    );
    assert_eq!(r, Some(Reply::Error(ErrorCode::NotRegistered)));

    agent.register(s, Duration::from_secs(10));
    assert!(agent.node_id >= 1 << 32, "agent ids are above server ids");
    let mut blocks = Vec::new();
    for i in 0..50 {
        blocks.push(agent.grant(s, "orders", 1 + i * 7, Duration::from_secs(10)));
    }
    for w in blocks.windows(2) {
        let (a, b) = (w[0], w[1]);
        assert!(
            a.0 + a.1 as u128 <= b.0,
            "blocks overlap or go back: {a:?} {b:?}"
        );
    }
    assert!(blocks[0].0 >= 1);

    // A retransmit (same sender, same seq) gets the identical datagram, not a new block.
    agent.seq += 1;
    let seq = agent.seq;
    let req = agent.encode(
        seq,
        &Message::BlockRequest {
            sequence: "orders",
            count: 5,
        },
    );
    agent.send_raw(s, &req);
    let (_, first, raw1) = agent.recv(Duration::from_secs(2)).expect("an answer");
    agent.send_raw(s, &req);
    let (_, again, raw2) = agent.recv(Duration::from_secs(2)).expect("an answer");
    assert!(matches!(first, Reply::Grant { .. }), "{first:?}");
    assert_eq!(first, again);
    assert_eq!(raw1, raw2, "the cached reply is sent again byte for byte");

    // Unknown sequences are named as such.
    let r = agent.call(
        s,
        &Message::BlockRequest {
            sequence: "nope",
            count: 1,
        },
        Duration::from_secs(2),
    );
    assert_eq!(r, Some(Reply::Error(ErrorCode::UnknownSequence)));

    // Garbage, a truncated datagram and a bit flip get no answer at all.
    let mut flipped = req.clone();
    flipped[45] ^= 0x10;
    for bad in [
        vec![0u8; 7],
        b"UN\x01\x05hello there".to_vec(),
        req[..req.len() - 3].to_vec(),
        flipped,
    ] {
        agent.send_raw(s, &bad);
    }
    assert!(
        agent.recv(Duration::from_millis(300)).is_none(),
        "bad datagrams are never answered"
    );
    // ... and the server keeps serving.
    let next = agent.grant(s, "orders", 3, Duration::from_secs(5));
    let last = blocks.last().unwrap();
    assert!(next.0 >= last.0 + last.1 as u128);

    // The CLI sees it all.
    let addr = s.to_string();
    let (ok, out, err) = unid(&["sequence", "list", "--server", &addr]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "orders");
    let (ok, out, err) = unid(&["sequence", "describe", "orders", "--server", &addr]);
    assert!(ok, "{err}");
    assert!(out.contains("width:    8 bytes"), "{out}");
    let (ok, out, err) = unid(&["status", "--server", &addr]);
    assert!(ok, "{err}");
    assert!(out.contains("leader: 1"), "{out}");
    assert!(out.contains("agents: 1"), "{out}");
    assert!(out.contains("orders"), "{out}");
    let (ok, _, err) = unid(&["sequence", "create", "orders", "--server", &addr]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = unid(&["sequence", "describe", "nope", "--server", &addr]);
    assert!(!ok && err.contains("no sequence named"), "{err}");

    // SIGTERM stops it cleanly; restarting with --init again is a no-op.
    let st = servers[0].sigterm(Duration::from_secs(10));
    assert!(st.success(), "{st:?}\n{}", servers[0].log_text());
    let peers = vec![servers[0].peer_arg()];
    servers[0].start(&peers, true);
    let after = agent.grant(s, "orders", 3, Duration::from_secs(15));
    assert!(
        after.0 >= next.0 + next.1 as u128,
        "{after:?} after {next:?}"
    );
    assert!(servers[0].log_text().contains("already initialized"));
}

#[test]
fn a_server_without_a_reachable_cli_target_fails_clearly() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let (ok, _, err) = unid(&["sequence", "list", "--server", &addr, "--timeout-ms", "600"]);
    assert!(!ok);
    assert!(err.contains("no answer"), "{err}");
}

#[test]
fn with_a_cluster_secret_only_authenticated_requests_are_answered() {
    let root = tempfile::tempdir().unwrap();
    let secret = root.path().join("secret");
    std::fs::write(&secret, "  correct horse battery staple\n").unwrap();
    // Servers and tools refuse a secret file others may read.
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut servers = servers(root.path(), 1);
    let s = &mut servers[0];
    let log = std::fs::File::create(&s.log).unwrap();
    s.child = Some(
        std::process::Command::new(UNID)
            .args(["server", "--id", "1", "--init"])
            .args([
                "--listen",
                &s.udp.to_string(),
                "--raft",
                &s.raft.to_string(),
            ])
            .arg("--data-dir")
            .arg(&s.dir)
            .arg("--secret-file")
            .arg(&secret)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let addr = s.udp.to_string();
    let secret = secret.to_str().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, _, err) = unid(&[
            "sequence",
            "create",
            "secret",
            "--server",
            &addr,
            "--secret-file",
            secret,
        ]);
        if ok {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{err}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, out, err) = unid(&[
        "sequence",
        "list",
        "--server",
        &addr,
        "--secret-file",
        secret,
    ]);
    assert!(ok && out.trim() == "secret", "{out} {err}");
    // Without the secret: no answer at all (and no crash).
    let (ok, _, err) = unid(&["sequence", "list", "--server", &addr, "--timeout-ms", "700"]);
    assert!(!ok && err.contains("no answer"), "{err}");
    let mut agent = Agent::new();
    let r = agent.call(
        s.udp,
        &Message::Ping { sent_us: 1 },
        Duration::from_millis(300),
    );
    assert_eq!(r, None);
}
