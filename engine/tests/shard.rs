//! The shard runner on both data planes (glommio/io_uring and plain threads): echo through 2
//! shards, cross-thread messages, timeouts, peer errors, shutdown, and starting as an
//! unprivileged user. Each `fn name(plane)` runs as `name::io_uring` and `name::threads`.

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket as StdSocket};
use std::sync::mpsc;
use std::time::Duration;

use unid_engine::plane::DataPlane;
use unid_engine::shard::{Handler, SendError, ShardConfig, ShardPlacement, Shards};
use unid_engine::udp::{ErrorOrigin, PeerError, PeerErrorKind, SendBatch};

const DEADLINE: Duration = Duration::from_secs(10);

/// Echoes every datagram; sends `(dest, bytes)` messages as datagrams.
struct Echo;

impl Handler for Echo {
    type Message = (SocketAddr, Vec<u8>);

    fn on_datagram(&mut self, data: &[u8], from: SocketAddr, _now_us: u64, out: &mut SendBatch) {
        out.push(from, data)
            .expect("the shard leaves room for one reply");
    }

    fn on_message(&mut self, (dest, data): Self::Message, _now_us: u64, out: &mut SendBatch) {
        out.push(dest, &data)
            .expect("the shard leaves room for one datagram");
    }
}

fn config(shards: usize, plane: DataPlane) -> ShardConfig {
    let mut config = ShardConfig::new(shards, "127.0.0.1:0".parse().unwrap());
    config.data_plane = plane;
    config
}

/// Turns each `fn name(plane: DataPlane)` into two tests, `name::io_uring` and `name::threads`.
macro_rules! on_both_planes {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn io_uring() {
                super::$name(unid_engine::plane::DataPlane::IoUring);
            }

            #[test]
            fn threads() {
                super::$name(unid_engine::plane::DataPlane::Threads);
            }
        }
    )*};
}

on_both_planes!(
    two_shard_echo_answers_everything,
    messages_from_other_threads_reach_the_shard,
    timeouts_fire_with_monotonic_now,
    closed_peer_is_reported_to_the_handler,
    unpinned_shards_say_why,
    truncated_datagrams_are_dropped_and_counted,
    shards_serve_ipv6,
    more_shards_than_cpus_run_unbound,
    failed_pinning_falls_back_to_unbound,
    tokio_task_sends_to_shards,
    idle_shard_sleeps,
    an_address_already_held_is_refused_naming_it,
    messages_queued_before_a_stop_are_delivered,
);

const PLANES: [DataPlane; 2] = [DataPlane::IoUring, DataPlane::Threads];

fn client() -> StdSocket {
    let socket = StdSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(DEADLINE)).unwrap();
    socket
}

/// Sends `count` numbered datagrams from `sockets` clients, `window` in flight per client,
/// and checks every one is answered exactly once with its own bytes.
fn echo_round_trip(server: SocketAddr, clients: &[StdSocket], count: u32, window: u32) {
    for (c, socket) in clients.iter().enumerate() {
        let mut answered = HashSet::new();
        let mut next = 0u32;
        while (answered.len() as u32) < count {
            while next < count && next - (answered.len() as u32) < window {
                let msg = [c as u32, next].map(u32::to_le_bytes).concat();
                socket.send_to(&msg, server).unwrap();
                next += 1;
            }
            let mut buf = [0u8; 64];
            let (n, from) = socket
                .recv_from(&mut buf)
                .expect("reply within the deadline");
            assert_eq!(from, server);
            assert_eq!(n, 8);
            let owner = u32::from_le_bytes(buf[..4].try_into().unwrap());
            let seq = u32::from_le_bytes(buf[4..8].try_into().unwrap());
            assert_eq!(owner, c as u32);
            assert!(seq < next, "reply to a request not sent yet");
            assert!(answered.insert(seq), "duplicate reply {seq}");
        }
    }
}

fn two_shard_echo_answers_everything(plane: DataPlane) {
    let shards = Shards::start(config(2, plane), |_| Echo).unwrap();
    assert_eq!(shards.len(), 2);
    assert_eq!(shards.data_plane().plane, plane);
    for placement in shards.placements() {
        eprintln!("placement: {placement:?}");
    }
    let server = shards.local_addr();
    assert_ne!(server.port(), 0);
    // Several client sockets: SO_REUSEPORT hashes by source, so they spread over the shards.
    let clients: Vec<StdSocket> = (0..8).map(|_| client()).collect();
    const PER_CLIENT: u32 = 500;
    echo_round_trip(server, &clients, PER_CLIENT, 32);
    let stats = shards.shutdown().unwrap();
    assert_eq!(stats.len(), 2);
    let handled: u64 = stats.iter().map(|s| s.datagrams_handled).sum();
    let sent: u64 = stats.iter().map(|s| s.udp.datagrams_out).sum();
    let total = u64::from(PER_CLIENT) * clients.len() as u64;
    assert_eq!(handled, total);
    assert_eq!(sent, total);
    for s in &stats {
        eprintln!(
            "shard {}: handled {} in {} recv batches, {} turns, {} waits",
            s.index, s.datagrams_handled, s.udp.recv_batches, s.turns, s.waits
        );
        assert_eq!(s.udp.datagrams_in, s.datagrams_handled);
        assert_eq!(s.datagrams_dropped_in + s.datagrams_dropped_out, 0);
    }
}

fn messages_from_other_threads_reach_the_shard(plane: DataPlane) {
    let mut cfg = config(2, plane);
    cfg.channel_messages_max = 4;
    let shards = Shards::start(cfg, |_| Echo).unwrap();
    let receiver = client();
    let dest = receiver.local_addr().unwrap();
    // From plain threads, to both shards, through all three sending methods.
    std::thread::scope(|scope| {
        for index in 0..2 {
            let tx = shards.sender(index).unwrap();
            scope.spawn(move || {
                for i in 0..20u8 {
                    tx.send_blocking((dest, vec![index as u8, i])).unwrap();
                }
                let mut msg = (dest, vec![index as u8, 100]);
                loop {
                    match tx.try_send(msg) {
                        Ok(()) => break,
                        Err(SendError::Full(back)) => {
                            msg = back;
                            std::thread::yield_now();
                        }
                        Err(SendError::Closed(_)) => panic!("shard closed"),
                    }
                }
                futures_lite_block_on(tx.send((dest, vec![index as u8, 101]))).unwrap();
            });
        }
    });
    let mut seen = HashSet::new();
    while seen.len() < 2 * 22 {
        let mut buf = [0u8; 8];
        let (n, _) = receiver
            .recv_from(&mut buf)
            .expect("message datagram within deadline");
        assert_eq!(n, 2);
        assert!(seen.insert((buf[0], buf[1])));
    }
    let stop = shards.stop_handle();
    let tx = shards.sender(0).unwrap();
    // Stop from another thread, join here.
    std::thread::spawn(move || stop.stop()).join().unwrap();
    let stats = shards.join().unwrap();
    assert_eq!(stats.iter().map(|s| s.messages).sum::<u64>(), 44);
    // The shards are gone: senders report it and give the message back.
    assert!(matches!(
        tx.try_send((dest, vec![])),
        Err(SendError::Closed(_))
    ));
}

/// Polls a future to completion on this thread (the channel's async send needs no runtime).
fn futures_lite_block_on<F: std::future::Future>(fut: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park_timeout(Duration::from_millis(10));
    }
}

/// Fires `on_timeout` every `period_us` and reports to the test thread.
struct Ticker {
    next_us: u64,
    period_us: u64,
    ticks: mpsc::Sender<u64>,
}

impl Handler for Ticker {
    type Message = ();

    fn on_datagram(&mut self, _: &[u8], _: SocketAddr, _: u64, _: &mut SendBatch) {}

    fn poll_timeout(&self) -> Option<u64> {
        Some(self.next_us)
    }

    fn on_timeout(&mut self, now_us: u64, _out: &mut SendBatch) {
        assert!(now_us >= self.next_us, "timeout fired early");
        self.next_us = now_us + self.period_us;
        let _ = self.ticks.send(now_us);
    }
}

fn timeouts_fire_with_monotonic_now(plane: DataPlane) {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let shards = Shards::start(config(1, plane), move |_| Ticker {
        next_us: unid_engine::now_us() + 2_000,
        period_us: 2_000,
        ticks: tx.lock().unwrap().clone(),
    })
    .unwrap();
    let mut last = 0;
    for _ in 0..5 {
        let now = rx
            .recv_timeout(DEADLINE)
            .expect("a tick within the deadline");
        assert!(now >= last + 2_000 || last == 0, "ticks {last} then {now}");
        last = now;
    }
    let stats = shards.shutdown().unwrap();
    assert!(stats[0].timeouts >= 5);
}

/// Sends a datagram per message and forwards peer errors to the test.
struct Prober {
    errors: mpsc::Sender<PeerError>,
}

impl Handler for Prober {
    type Message = SocketAddr;

    fn on_datagram(&mut self, _: &[u8], _: SocketAddr, _: u64, _: &mut SendBatch) {}

    fn on_message(&mut self, dest: SocketAddr, _now_us: u64, out: &mut SendBatch) {
        out.push(dest, b"probe").unwrap();
    }

    fn on_peer_error(&mut self, err: PeerError, _now_us: u64) {
        let _ = self.errors.send(err);
    }
}

fn closed_peer_is_reported_to_the_handler(plane: DataPlane) {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let shards = Shards::start(config(1, plane), move |_| Prober {
        errors: tx.lock().unwrap().clone(),
    })
    .unwrap();
    let dead = StdSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    shards.sender(0).unwrap().send_blocking(dead).unwrap();
    let err = rx
        .recv_timeout(DEADLINE)
        .expect("a peer error within the deadline");
    assert_eq!(err.dest, dead);
    assert_eq!(err.kind, PeerErrorKind::Refused);
    assert_eq!(err.origin, ErrorOrigin::Icmp);
    // A datagram the kernel refuses at once (broadcast without SO_BROADCAST: EACCES, nothing
    // leaves the host) is reported too, as a send failure.
    let broadcast: SocketAddr = "255.255.255.255:9".parse().unwrap();
    shards.sender(0).unwrap().send_blocking(broadcast).unwrap();
    let err = rx
        .recv_timeout(DEADLINE)
        .expect("a send failure within the deadline");
    assert_eq!((err.dest, err.origin), (broadcast, ErrorOrigin::Send));
    assert_eq!(err.kind, PeerErrorKind::Other(13)); // EACCES
    let stats = shards.shutdown().unwrap();
    assert_eq!(stats[0].peer_errors, 2);
    assert_eq!(stats[0].udp.peer_errors.refused, 1);
    assert_eq!(stats[0].udp.send_failed.other, 1);
}

#[test]
fn invalid_configs_are_rejected() {
    for plane in PLANES {
        let mut cfg = config(0, plane);
        assert!(Shards::start(cfg.clone(), |_| Echo).is_err());
        cfg.shards = 2;
        cfg.udp.reuse_port = false;
        assert!(Shards::start(cfg.clone(), |_| Echo).is_err());
        let mut cfg = config(1, plane);
        cfg.io_memory_bytes = 4096;
        assert!(Shards::start(cfg, |_| Echo).is_err());
    }
}

fn unpinned_shards_say_why(plane: DataPlane) {
    let mut cfg = config(1, plane);
    cfg.pin_cpus = false;
    let shards = Shards::start(cfg, |_| Echo).unwrap();
    assert!(
        matches!(&shards.placements()[0], ShardPlacement::Unbound { reason } if reason.contains("disabled"))
    );
    drop(shards); // Dropping stops and joins.
}

const CHILD_ENV: &str = "UNID_ENGINE_UNPRIVILEGED_CHILD";

/// Run by `unprivileged_start` in a child process as `nobody`; does nothing otherwise.
#[test]
fn unprivileged_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let memlock = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .unwrap();
    eprintln!("child: uid {uid}; {memlock}");
    assert_eq!(uid, 65534, "the child must run as nobody");
    // The soft limit is the first number; glommio's default io_memory (10 MiB per executor)
    // would exceed it, our 512 KiB per executor must not.
    let soft = memlock.split_whitespace().nth(3).unwrap();
    if let Ok(bytes) = soft.parse::<u64>() {
        assert!(
            bytes >= 2 * (512 << 10),
            "memlock {bytes} too small for 2 shards"
        );
    }
    for plane in PLANES {
        let shards = Shards::start(config(2, plane), |_| Echo).unwrap();
        let socket = client();
        socket.send_to(b"ping", shards.local_addr()).unwrap();
        let mut buf = [0u8; 8];
        let (n, _) = socket.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");
        shards.shutdown().unwrap();
    }
    println!("UNPRIVILEGED-CHILD-OK");
}

/// glommio starts as an ordinary user with the default `ulimit -l` thanks to the small
/// `io_memory`: re-run this test binary as `nobody` through `setpriv` (root only).
#[test]
fn unprivileged_start() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let me = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    if me != 0 {
        eprintln!("skipping unprivileged_start: not root (uid {me}), this run is unprivileged");
        return;
    }
    let Some(setpriv) = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        eprintln!("skipping unprivileged_start: no setpriv");
        return;
    };
    // Copy the test binary where `nobody` can run it (the target dir may not be readable).
    let dir = std::env::temp_dir().join(format!("unid-engine-unpriv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.join("shard-test");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let output = std::process::Command::new(setpriv)
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&exe)
        .args([
            "--exact",
            "unprivileged_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .current_dir(&dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("child stdout:\n{stdout}\nchild stderr:\n{stderr}");
    assert!(output.status.success(), "child failed: {}", output.status);
    assert!(stdout.contains("UNPRIVILEGED-CHILD-OK"));
    assert!(
        !stderr.contains("memlock"),
        "glommio complained about memlock"
    );
}

fn truncated_datagrams_are_dropped_and_counted(plane: DataPlane) {
    let shards = Shards::start(config(1, plane), |_| Echo).unwrap();
    let socket = client();
    socket.send_to(&[1u8; 3000], shards.local_addr()).unwrap();
    socket.send_to(b"short", shards.local_addr()).unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = socket.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"short", "only the short datagram is echoed");
    let stats = shards.shutdown().unwrap();
    assert_eq!(stats[0].datagrams_dropped_in, 1);
    assert_eq!(stats[0].udp.truncated_in, 1);
    assert_eq!(stats[0].datagrams_handled, 1);
}

fn shards_serve_ipv6(plane: DataPlane) {
    let Ok(probe) = StdSocket::bind("[::1]:0") else {
        eprintln!("skipping shards_serve_ipv6: cannot bind ::1");
        return;
    };
    drop(probe);
    let mut cfg = ShardConfig::new(2, "[::1]:0".parse().unwrap());
    cfg.data_plane = plane;
    let shards = Shards::start(cfg, |_| Echo).unwrap();
    let clients: Vec<StdSocket> = (0..4)
        .map(|_| {
            let socket = StdSocket::bind("[::1]:0").unwrap();
            socket.set_read_timeout(Some(DEADLINE)).unwrap();
            socket
        })
        .collect();
    echo_round_trip(shards.local_addr(), &clients, 100, 16);
    let stats = shards.shutdown().unwrap();
    assert_eq!(stats.iter().map(|s| s.datagrams_handled).sum::<u64>(), 400);
}

fn more_shards_than_cpus_run_unbound(plane: DataPlane) {
    let cpus = allowed_cpu_count();
    let shards = Shards::start(config(cpus + 1, plane), |_| Echo).unwrap();
    let placements = shards.placements().to_vec();
    assert!(
        placements[..cpus]
            .iter()
            .all(|p| matches!(p, ShardPlacement::Fixed(_)))
    );
    assert!(
        matches!(&placements[cpus], ShardPlacement::Unbound { reason } if reason.contains("CPUs"))
    );
    let clients: Vec<StdSocket> = (0..4).map(|_| client()).collect();
    echo_round_trip(shards.local_addr(), &clients, 50, 8);
    shards.shutdown().unwrap();
}

/// CPUs in this process's affinity mask, from `Cpus_allowed_list` in `/proc/self/status`.
fn allowed_cpu_count() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim();
    list.split(',')
        .map(|range| match range.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

fn failed_pinning_falls_back_to_unbound(plane: DataPlane) {
    let mut cfg = config(1, plane);
    // No such CPU: glommio refuses Placement::Fixed, the shard must still start, unbound.
    cfg.cpus = Some(vec![4095]);
    let shards = Shards::start(cfg, |_| Echo).unwrap();
    let placement = &shards.placements()[0];
    assert!(
        matches!(placement, ShardPlacement::Unbound { reason } if reason.contains("failed")),
        "{placement:?}"
    );
    let clients = [client()];
    echo_round_trip(shards.local_addr(), &clients, 10, 4);
    shards.shutdown().unwrap();
}

/// The consensus thread runs tokio: it must reach shards through the bounded channel, awaiting
/// room without blocking its runtime, and learn when a shard is gone.
fn tokio_task_sends_to_shards(plane: DataPlane) {
    let mut cfg = config(2, plane);
    cfg.channel_messages_max = 2;
    let shards = Shards::start(cfg, |_| Echo).unwrap();
    let receiver = client();
    let dest = receiver.local_addr().unwrap();
    let senders: Vec<_> = (0..2).map(|i| shards.sender(i).unwrap()).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        let tasks: Vec<_> = senders
            .iter()
            .cloned()
            .enumerate()
            .map(|(index, tx)| {
                tokio::spawn(async move {
                    for i in 0..50u8 {
                        tx.send((dest, vec![index as u8, i])).await.unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
    let mut seen = HashSet::new();
    while seen.len() < 100 {
        let mut buf = [0u8; 8];
        let (n, _) = receiver
            .recv_from(&mut buf)
            .expect("datagram within deadline");
        assert_eq!(n, 2);
        assert!(seen.insert((buf[0], buf[1])));
    }
    shards.shutdown().unwrap();
    let closed = runtime.block_on(senders[0].send((dest, vec![])));
    assert!(matches!(closed, Err(SendError::Closed(_))));
}

/// An idle shard parks in io_uring instead of spinning: a few turns, not thousands.
fn idle_shard_sleeps(plane: DataPlane) {
    let shards = Shards::start(config(1, plane), |_| Echo).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let stats = shards.shutdown().unwrap();
    assert!(
        stats[0].turns <= 4,
        "idle shard looped {} times",
        stats[0].turns
    );
}

/// Issue 12 item 1: a second server on a running server's UDP address (one shard or several)
/// is refused with an error naming the address, and a socket with `SO_REUSEPORT` (what any
/// other process of the same user could open) cannot join a one-shard server's port.
fn an_address_already_held_is_refused_naming_it(plane: DataPlane) {
    for shards in [1, 2] {
        let running = Shards::start(config(shards, plane), |_| Echo).unwrap();
        let addr = running.local_addr();
        for second in [1, 2] {
            let mut cfg = ShardConfig::new(second, addr);
            cfg.data_plane = plane;
            let err = Shards::start(cfg, |_| Echo)
                .err()
                .unwrap_or_else(|| panic!("a {second}-shard server joined a {shards}-shard one"));
            assert!(
                matches!(err, unid_engine::Error::AddrInUse { addr: a } if a == addr),
                "{err:?}"
            );
            assert!(err.to_string().contains(&addr.to_string()), "{err}");
        }
        if shards == 1 {
            let joiner = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::DGRAM,
                Some(socket2::Protocol::UDP),
            )
            .unwrap();
            joiner.set_reuse_port(true).unwrap();
            assert!(
                joiner.bind(&addr.into()).is_err(),
                "a SO_REUSEPORT socket joined a one-shard server's port"
            );
        }
        // Still serving its own clients.
        echo_round_trip(addr, &[client()], 10, 4);
        running.shutdown().unwrap();
    }
}

/// Messages queued just before a stop are still sent: a stopping leader's `LeaderChange`
/// notices are queued an instant before it stops its shards (dropping them made agents find
/// the next leader by themselves, under load in CI).
fn messages_queued_before_a_stop_are_delivered(plane: DataPlane) {
    let shards = Shards::start(config(1, plane), |_| Echo).unwrap();
    let receiver = client();
    let dest = receiver.local_addr().unwrap();
    let sender = shards.sender(0).unwrap();
    const QUEUED: u8 = 100;
    for i in 0..QUEUED {
        sender.try_send((dest, vec![i])).unwrap();
    }
    shards.shutdown().unwrap();
    let mut seen = HashSet::new();
    while seen.len() < usize::from(QUEUED) {
        let mut buf = [0u8; 8];
        let (n, _) = receiver
            .recv_from(&mut buf)
            .expect("every queued message within the deadline");
        assert_eq!(n, 1);
        assert!(seen.insert(buf[0]), "{} twice", buf[0]);
    }
}
