//! Grants per second from one in-process `engine::server` (one Raft voter, fsync'd raises).
//!
//! ```sh
//! cargo run --release -p unid-engine --example grant_load -- [agents] [in_flight] [seconds] [shards]
//! ```
//!
//! Each agent is a thread with one UDP socket that keeps `in_flight` block requests (of 1000
//! ids) outstanding. Prints grants/s, other answers, and the server's counters.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use unid_engine::client::{Answer, Client, ClientConfig};
use unid_engine::server::{ServerConfig, run};
use unid_proto::{Codec, Header, Message, NodeRole, Width, decode};

fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let (agents, in_flight, seconds, shards) = (arg(1, 4), arg(2, 16), arg(3, 5), arg(4, 1));
    let dir = std::env::temp_dir().join(format!("unid-grant-load-{}", std::process::id()));
    let mut config = ServerConfig::new(1, &dir);
    config.udp_addr = "127.0.0.1:0".parse()?;
    config.raft_addr = "127.0.0.1:0".parse()?;
    config.init = true;
    config.shards = shards as usize;
    let server = run(config)?;
    let addr = server.udp_addr();
    let mut admin = Client::new(&[addr], ClientConfig::default())?;
    let msg = Message::SequenceCreate {
        name: "load",
        width: Width::W8,
        start: 1,
    };
    admin.call(0, &msg, |f, _| match f.message {
        Message::SequenceInfo { .. } => Some(Answer::Done(())),
        _ => Some(Answer::Retry),
    })?;

    let stop = Arc::new(AtomicBool::new(false));
    let grants = Arc::new(AtomicU64::new(0));
    let others = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..agents)
        .map(|i| {
            let (stop, grants, others) = (stop.clone(), grants.clone(), others.clone());
            std::thread::spawn(move || agent(i, addr, in_flight, &stop, &grants, &others))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500)); // registration and warm-up
    let (g0, o0, t0) = (
        grants.load(Ordering::Relaxed),
        others.load(Ordering::Relaxed),
        Instant::now(),
    );
    std::thread::sleep(Duration::from_secs(seconds));
    let (g1, o1, dt) = (
        grants.load(Ordering::Relaxed),
        others.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64(),
    );
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    println!(
        "agents {agents} in_flight {in_flight} shards {shards}: {:.0} grants/s, {:.0} other answers/s over {dt:.1} s",
        (g1 - g0) as f64 / dt,
        (o1 - o0) as f64 / dt
    );
    println!("server: {:?}", server.stats());
    server.shutdown()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn agent(
    i: u64,
    server: SocketAddr,
    in_flight: u64,
    stop: &AtomicBool,
    grants: &AtomicU64,
    others: &AtomicU64,
) {
    let mut client = Client::new(&[server], ClientConfig::default()).expect("client");
    let name = format!("load-agent-{i}");
    let hello = Message::Hello {
        role: NodeRole::Agent,
        incarnation: 1,
        name: &name,
        listen: None,
        backup_of: None,
        versions: unid_proto::VERSIONS,
        software: unid_proto::SOFTWARE,
    };
    let node = client
        .call(0, &hello, |f, _| match f.message {
            Message::Welcome { node_id, .. } => Some(Answer::Done(node_id)),
            _ => Some(Answer::Retry),
        })
        .expect("welcome");
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.connect(server).expect("connect");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut codec = Codec::new();
    let mut out = [0u8; 1200];
    let mut buf = [0u8; 1500];
    let mut seq = 0u64;
    let mut send = |seq: u64| {
        let h = Header {
            sender: node,
            seq,
            reply_to: 0,
            epoch: 0,
        };
        let m = Message::BlockRequest {
            sequence: "load",
            count: 1000,
        };
        let n = codec.encode(&h, &m, None, &mut out).expect("encode");
        let _ = sock.send(&out[..n]);
    };
    for _ in 0..in_flight {
        seq += 1;
        send(seq);
    }
    while !stop.load(Ordering::Relaxed) {
        match sock.recv(&mut buf) {
            Ok(n) => {
                match decode(&buf[..n], None).map(|f| f.message) {
                    Ok(Message::BlockGrant { .. }) => grants.fetch_add(1, Ordering::Relaxed),
                    _ => others.fetch_add(1, Ordering::Relaxed),
                };
                seq += 1;
                send(seq);
            }
            // Lost (or rate limited): refill the window.
            Err(_) => {
                for _ in 0..in_flight {
                    seq += 1;
                    send(seq);
                }
            }
        }
    }
}
