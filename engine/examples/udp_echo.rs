//! UDP echo benchmark: the network-stack baseline unid's grant rate is compared with.
//!
//! A server of `--shards` glommio shards echoes datagrams; a client executor drives `--sockets`
//! UDP sockets (distinct source ports, so `SO_REUSEPORT` spreads them over the shards), each
//! keeping `--window` datagrams of `--bytes` bytes in flight with `sendmmsg`/`recvmmsg`. After a
//! warm-up of 1 s it counts echoed datagrams for `--seconds` (at most 60) and prints the rate.
//!
//! `--mode batched` (default) runs the server on [`Shards`] (recvmmsg after io_uring readiness).
//! Two servers for comparison, with the same socket options and the same client:
//! `--mode per-datagram` uses glommio's own `UdpSocket::recv_from`/`send_to` (a nonblocking
//! syscall per datagram, an io_uring operation when the socket is empty), and `--mode uring` a
//! plain thread per shard driving a raw io_uring: 64 `RECVMSG` operations in flight and one
//! `SENDMSG` operation per echo, so no syscall per datagram at all, only `io_uring_enter` per
//! batch of completions.
//!
//! ```text
//! cargo run --release -p unid-engine --example udp_echo -- --seconds 5 [--mode per-datagram]
//!     [--mode uring] [--shards 2] [--sockets 8] [--window 64] [--bytes 32] [--spin-us 0]
//! ```

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_lite::future;
use glommio::{LocalExecutorBuilder, Placement};
use unid_engine::shard::{Handler, Readiness, ShardConfig, Shards};
use unid_engine::udp::{BATCH_DATAGRAMS_MAX, RecvBatch, SendBatch, UdpConfig, UdpSocket};

const WARMUP: Duration = Duration::from_secs(1);
const SECONDS_MAX: u64 = 60;
/// A socket that hears nothing for this long counts its in-flight datagrams as lost.
const LOSS_TIMEOUT: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
struct Args {
    seconds: u64,
    shards: usize,
    sockets: usize,
    window: usize,
    bytes: usize,
    spin_us: u64,
    mode: Mode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Batched,
    PerDatagram,
    Uring,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        seconds: 5,
        shards: 2,
        sockets: 8,
        window: 64,
        bytes: 32,
        spin_us: 0,
        mode: Mode::Batched,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => args.seconds = value()?.parse()?,
            "--shards" => args.shards = value()?.parse()?,
            "--sockets" => args.sockets = value()?.parse()?,
            "--window" => args.window = value()?.parse()?,
            "--bytes" => args.bytes = value()?.parse()?,
            "--spin-us" => args.spin_us = value()?.parse()?,
            "--mode" => {
                args.mode = match value()?.as_str() {
                    "batched" => Mode::Batched,
                    "per-datagram" => Mode::PerDatagram,
                    "uring" => Mode::Uring,
                    other => bail!("unknown mode {other}"),
                }
            }
            other => bail!("unknown flag {other}"),
        }
    }
    if args.seconds == 0 || args.seconds > SECONDS_MAX {
        bail!("--seconds must be 1 ..= {SECONDS_MAX}");
    }
    if args.bytes < 8 || args.bytes > 1400 {
        bail!("--bytes must be 8 ..= 1400");
    }
    if args.sockets == 0 || args.sockets > 256 || args.window == 0 || args.window > 4096 {
        bail!("--sockets must be 1 ..= 256 and --window 1 ..= 4096");
    }
    Ok(args)
}

/// glommio's error is not `Sync`, so it cannot become an `anyhow::Error` directly.
fn gl<T>(result: glommio::Result<T, ()>) -> anyhow::Result<T> {
    result.map_err(|e| anyhow::anyhow!("{e}"))
}

struct Echo;

impl Handler for Echo {
    type Message = ();

    fn on_datagram(&mut self, data: &[u8], from: SocketAddr, _now_us: u64, out: &mut SendBatch) {
        // Room for one reply is guaranteed by the shard loop.
        let _ = out.push(from, data);
    }
}

/// The per-datagram server: glommio's UdpSocket, one recv_from and one send_to per datagram.
struct PerDatagramServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    joins: Vec<glommio::ExecutorJoinHandle<anyhow::Result<u64>>>,
}

impl PerDatagramServer {
    fn start(args: &Args) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let mut joins = Vec::new();
        let mut addr: SocketAddr = "127.0.0.1:0".parse()?;
        for shard in 0..args.shards {
            let stop = stop.clone();
            let addr_tx = addr_tx.clone();
            let mut builder = LocalExecutorBuilder::new(Placement::Fixed(shard))
                .name("echo-per-datagram")
                .io_memory(512 << 10);
            if args.spin_us > 0 {
                builder = builder.spin_before_park(Duration::from_micros(args.spin_us));
            }
            let bind = addr;
            joins.push(gl(builder.spawn(move || async move {
                // Same socket options as the batched server (SO_REUSEPORT, 4 MiB buffers), so
                // only the I/O style differs.
                let raw = socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::DGRAM,
                    Some(socket2::Protocol::UDP),
                )?;
                raw.set_reuse_port(true)?;
                raw.set_recv_buffer_size(4 << 20)?;
                raw.set_send_buffer_size(4 << 20)?;
                raw.set_nonblocking(true)?;
                raw.bind(&bind.into())?;
                let socket = glommio::net::UdpSocket::from(raw);
                gl(socket.set_read_timeout(Some(Duration::from_millis(50))))?;
                addr_tx.send(gl(socket.local_addr())?)?;
                let mut buf = vec![0u8; 2048];
                let mut echoed = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                        continue; // timeout: check the stop flag
                    };
                    if socket.send_to(&buf[..n], from).await.is_ok() {
                        echoed += 1;
                    }
                }
                Ok(echoed)
            }))?);
            addr = addr_rx.recv()?;
        }
        Ok(Self { addr, stop, joins })
    }

    fn stop(self) -> anyhow::Result<Vec<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut echoed = Vec::new();
        for join in self.joins {
            echoed.push(join.join().map_err(|e| anyhow::anyhow!("{e}"))??);
        }
        Ok(echoed)
    }
}

#[derive(Debug, Default)]
struct ClientTotals {
    replies: Cell<u64>,
    lost: Cell<u64>,
    stop: Cell<bool>,
}

/// One client socket keeping `window` datagrams in flight.
async fn client_socket(
    server: SocketAddr,
    window: usize,
    bytes: usize,
    totals: Rc<ClientTotals>,
) -> anyhow::Result<()> {
    let mut socket = UdpSocket::bind("127.0.0.1:0".parse()?, &UdpConfig::default())?;
    let mut ready = Readiness::new(&socket)?;
    let mut recv = RecvBatch::new(BATCH_DATAGRAMS_MAX)?;
    let mut send = SendBatch::new(BATCH_DATAGRAMS_MAX)?;
    let mut in_flight = 0usize;
    let mut seq = 0u64;
    while !totals.stop.get() {
        while in_flight + send.len() < window && !send.is_full() {
            send.push_with(server, |buf| {
                buf[..8].copy_from_slice(&seq.to_le_bytes());
                bytes
            })?;
            seq += 1;
        }
        let before = send.len();
        let report = socket.send_batch(&mut send);
        debug_assert_eq!(before, report.sent + report.failed + report.pending);
        in_flight += report.sent;
        let got = socket.recv_batch(&mut recv)?;
        if got > 0 {
            in_flight = in_flight.saturating_sub(got);
            totals.replies.set(totals.replies.get() + got as u64);
            continue;
        }
        if in_flight + send.len() < window {
            continue; // room to send more before waiting
        }
        let timed_out = future::or(
            async {
                ready.readable().await;
                false
            },
            async {
                glommio::timer::sleep(LOSS_TIMEOUT).await;
                true
            },
        )
        .await;
        if timed_out && !totals.stop.get() {
            totals.lost.set(totals.lost.get() + in_flight as u64);
            in_flight = 0;
        }
    }
    Ok(())
}

struct ClientResult {
    replies: u64,
    lost: u64,
    elapsed: Duration,
    /// CPU time of the whole process during the measurement.
    process_cpu: Duration,
    /// CPU time of the client thread during the measurement.
    client_cpu: Duration,
}

/// User + system CPU time from a `/proc/.../stat` file (fields 14 and 15, in clock ticks).
fn cpu_time(stat_path: &str) -> Duration {
    let Ok(stat) = std::fs::read_to_string(stat_path) else {
        return Duration::ZERO;
    };
    // The command name (field 2) may contain spaces; fields after it are plain numbers.
    let Some(after_name) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return Duration::ZERO;
    };
    let fields: Vec<u64> = after_name
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // After the name: state (not a number, filtered out), then fields 4.. ; utime is field 14.
    let ticks = fields.get(10).copied().unwrap_or(0) + fields.get(11).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions; it only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

fn run_client(server: SocketAddr, args: &Args) -> anyhow::Result<ClientResult> {
    let args = args.clone();
    let mut builder = LocalExecutorBuilder::new(Placement::Unbound)
        .name("echo-client")
        .io_memory(512 << 10);
    if args.spin_us > 0 {
        builder = builder.spin_before_park(Duration::from_micros(args.spin_us));
    }
    let join = gl(builder.spawn(move || async move {
        let totals = Rc::new(ClientTotals::default());
        let tasks: Vec<_> = (0..args.sockets)
            .map(|_| {
                glommio::spawn_local(client_socket(
                    server,
                    args.window,
                    args.bytes,
                    totals.clone(),
                ))
            })
            .collect();
        glommio::timer::sleep(WARMUP).await;
        let (start, replies0, lost0) = (Instant::now(), totals.replies.get(), totals.lost.get());
        let (process0, client0) = (
            cpu_time("/proc/self/stat"),
            cpu_time("/proc/thread-self/stat"),
        );
        glommio::timer::sleep(Duration::from_secs(args.seconds)).await;
        let result = ClientResult {
            replies: totals.replies.get() - replies0,
            lost: totals.lost.get() - lost0,
            elapsed: start.elapsed(),
            process_cpu: cpu_time("/proc/self/stat").saturating_sub(process0),
            client_cpu: cpu_time("/proc/thread-self/stat").saturating_sub(client0),
        };
        totals.stop.set(true);
        for task in tasks {
            task.await?;
        }
        anyhow::Ok(result)
    }))?;
    join.join().map_err(|e| anyhow::anyhow!("{e}"))?
}

/// The kernel's UDP `RcvbufErrors` counter (datagrams dropped on full receive buffers), from
/// `/proc/net/snmp`; host-wide, so other traffic counts too.
fn rcvbuf_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    let at = names.iter().position(|n| *n == "RcvbufErrors")?;
    values.get(at)?.parse().ok()
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let rcvbuf_errors_before = rcvbuf_errors();
    let mode = match args.mode {
        Mode::Batched => "batched",
        Mode::PerDatagram => "per-datagram",
        Mode::Uring => "uring",
    };
    let (result, server_report) = match args.mode {
        Mode::PerDatagram => {
            let server = PerDatagramServer::start(&args)?;
            let result = run_client(server.addr, &args)?;
            let echoed = server.stop()?;
            (result, format!("echoed per shard: {echoed:?}"))
        }
        Mode::Uring => {
            let server = uring::Server::start(&args)?;
            let result = run_client(server.addr, &args)?;
            let echoed = server.stop()?;
            (result, format!("echoed per shard: {echoed:?}"))
        }
        Mode::Batched => {
            let mut config = ShardConfig::new(args.shards, "127.0.0.1:0".parse()?);
            if args.spin_us > 0 {
                config.spin_before_park = Some(Duration::from_micros(args.spin_us));
            }
            let shards = Shards::start(config, |_| Echo)?;
            let placements = format!("{:?}", shards.placements());
            let result = run_client(shards.local_addr(), &args)?;
            let stats = shards.shutdown()?;
            let mut report = format!("placements {placements}");
            for s in &stats {
                let per_batch = s.udp.datagrams_in as f64 / s.udp.recv_batches.max(1) as f64;
                report.push_str(&format!(
                    "\n  shard {}: {} datagrams, {:.1} per recvmmsg, {} turns, {} waits",
                    s.index, s.udp.datagrams_in, per_batch, s.turns, s.waits
                ));
            }
            (result, report)
        }
    };
    let rate = result.replies as f64 / result.elapsed.as_secs_f64();
    println!(
        "mode {mode}: {:.0} echoed datagrams/s ({} in {:.2} s; {} lost; shards {}, sockets {}, \
         window {}, bytes {}, spin_us {})",
        rate,
        result.replies,
        result.elapsed.as_secs_f64(),
        result.lost,
        args.shards,
        args.sockets,
        args.window,
        args.bytes,
        args.spin_us
    );
    let server_cpu = result.process_cpu.saturating_sub(result.client_cpu);
    println!(
        "server CPU {:.2} s ({:.2} us per datagram), client CPU {:.2} s ({:.2} us per datagram)",
        server_cpu.as_secs_f64(),
        server_cpu.as_secs_f64() * 1e6 / result.replies.max(1) as f64,
        result.client_cpu.as_secs_f64(),
        result.client_cpu.as_secs_f64() * 1e6 / result.replies.max(1) as f64,
    );
    println!("{server_report}");
    if let (Some(before), Some(after)) = (rcvbuf_errors_before, rcvbuf_errors()) {
        println!("kernel UDP RcvbufErrors during the run: {}", after - before);
    }
    Ok(())
}

/// The raw io_uring echo server: one ring operation per datagram.
mod uring {
    use std::mem::size_of;
    use std::net::SocketAddr;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use anyhow::anyhow;
    use io_uring::{IoUring, opcode, types};
    use unid_engine::udp::{UdpConfig, UdpSocket};

    use super::Args;

    /// Receive operations kept in flight per shard.
    const SLOTS: usize = 64;
    /// `user_data` bit marking a send completion (the low bits are the slot).
    const SEND_BIT: u64 = 1 << 32;
    /// `user_data` of the periodic timeout that lets the loop see the stop flag.
    const TIMEOUT: u64 = u64::MAX;

    /// One datagram's buffer and the headers of its receive and its echo.
    struct Slot {
        buf: [u8; 2048],
        name: libc::sockaddr_storage,
        recv_iov: libc::iovec,
        send_iov: libc::iovec,
        recv_hdr: libc::msghdr,
        send_hdr: libc::msghdr,
    }

    pub struct Server {
        pub addr: SocketAddr,
        stop: Arc<AtomicBool>,
        joins: Vec<std::thread::JoinHandle<anyhow::Result<u64>>>,
    }

    impl Server {
        pub fn start(args: &Args) -> anyhow::Result<Self> {
            let first = UdpSocket::bind("127.0.0.1:0".parse()?, &UdpConfig::default())?;
            let addr = first.local_addr();
            let stop = Arc::new(AtomicBool::new(false));
            let mut sockets = vec![first];
            for _ in 1..args.shards {
                sockets.push(UdpSocket::bind(addr, &UdpConfig::default())?);
            }
            let joins = sockets
                .into_iter()
                .enumerate()
                .map(|(cpu, socket)| {
                    let stop = stop.clone();
                    std::thread::Builder::new()
                        .name(format!("echo-uring-{cpu}"))
                        .spawn(move || serve(socket, &stop, cpu))
                })
                .collect::<Result<_, _>>()?;
            Ok(Self { addr, stop, joins })
        }

        pub fn stop(self) -> anyhow::Result<Vec<u64>> {
            self.stop.store(true, Ordering::Relaxed);
            self.joins
                .into_iter()
                .map(|j| j.join().map_err(|_| anyhow!("uring shard panicked"))?)
                .collect()
        }
    }

    fn pin_to(cpu: usize) {
        // SAFETY: all-zero bytes are a valid, empty `cpu_set_t`.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid `cpu_set_t`; CPU_SET ignores CPUs beyond CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut set) };
        // SAFETY: `set` is valid for the call and its exact size is passed.
        let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
        if rc != 0 {
            eprintln!("uring shard: cannot pin to CPU {cpu}; running unbound");
        }
    }

    /// Queues a receive into slot `i`.
    ///
    /// # Safety
    /// `slots` must point to `SLOTS` slots that stay allocated until the ring is dropped, and
    /// slot `i` must have no operation in flight.
    unsafe fn arm_recv(
        ring: &mut IoUring,
        fd: types::Fd,
        slots: *mut Slot,
        i: usize,
    ) -> anyhow::Result<()> {
        // SAFETY: the caller guarantees the slot exists and that the kernel is not using it.
        let slot = unsafe { &mut *slots.add(i) };
        slot.recv_iov = libc::iovec {
            iov_base: slot.buf.as_mut_ptr().cast(),
            iov_len: slot.buf.len(),
        };
        slot.recv_hdr.msg_name = (&raw mut slot.name).cast();
        slot.recv_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        slot.recv_hdr.msg_iov = &raw mut slot.recv_iov;
        slot.recv_hdr.msg_iovlen = 1;
        let entry = opcode::RecvMsg::new(fd, &raw mut slot.recv_hdr)
            .build()
            .user_data(i as u64);
        // SAFETY: the entry points into slot `i` (header, iovec, buffer, address), which stays
        // allocated (the caller's contract) and untouched until its completion is reaped.
        unsafe { ring.submission().push(&entry) }.map_err(|_| anyhow!("submission queue full"))
    }

    /// Queues the echo of the `len` bytes slot `i` received, back to their source.
    ///
    /// # Safety
    /// As for [`arm_recv`]; slot `i`'s receive must have completed with `len` bytes.
    unsafe fn arm_send(
        ring: &mut IoUring,
        fd: types::Fd,
        slots: *mut Slot,
        i: usize,
        len: usize,
    ) -> anyhow::Result<()> {
        // SAFETY: the caller guarantees the slot exists and that the kernel is not using it.
        let slot = unsafe { &mut *slots.add(i) };
        slot.send_iov = libc::iovec {
            iov_base: slot.buf.as_mut_ptr().cast(),
            iov_len: len.min(slot.buf.len()),
        };
        slot.send_hdr.msg_name = (&raw mut slot.name).cast();
        slot.send_hdr.msg_namelen = slot.recv_hdr.msg_namelen;
        slot.send_hdr.msg_iov = &raw mut slot.send_iov;
        slot.send_hdr.msg_iovlen = 1;
        let entry = opcode::SendMsg::new(fd, &raw const slot.send_hdr)
            .build()
            .user_data(SEND_BIT | i as u64);
        // SAFETY: as in `arm_recv`: slot `i` stays allocated and untouched until completion.
        unsafe { ring.submission().push(&entry) }.map_err(|_| anyhow!("submission queue full"))
    }

    fn serve(socket: UdpSocket, stop: &AtomicBool, cpu: usize) -> anyhow::Result<u64> {
        pin_to(cpu);
        let mut ring = IoUring::new(256)?;
        let fd = types::Fd(socket.as_raw_fd());
        // Leaked on purpose: operations may still be in flight when the loop stops, and the
        // kernel must never write into freed memory. (A few hundred KiB, once per run.)
        let slots: Vec<Slot> = (0..SLOTS)
            .map(|_| {
                // SAFETY: all-zero bytes are a valid `Slot` (byte arrays and plain C structs
                // with null pointers and zero lengths).
                unsafe { std::mem::zeroed::<Slot>() }
            })
            .collect();
        let slots: *mut Slot = Box::leak(slots.into_boxed_slice()).as_mut_ptr();
        let timeout: &'static types::Timespec =
            Box::leak(Box::new(types::Timespec::new().nsec(50_000_000)));
        let timeout_entry = opcode::Timeout::new(timeout).build().user_data(TIMEOUT);
        for i in 0..SLOTS {
            // SAFETY: the slots are leaked, so they outlive the ring, and none is in use yet.
            unsafe { arm_recv(&mut ring, fd, slots, i)? };
        }
        // SAFETY: the timespec is leaked, so it outlives the operation.
        unsafe { ring.submission().push(&timeout_entry) }
            .map_err(|_| anyhow!("submission queue full"))?;
        let mut echoed = 0u64;
        let mut done: Vec<(u64, i32)> = Vec::with_capacity(512);
        while !stop.load(Ordering::Relaxed) {
            ring.submit_and_wait(1)?;
            done.clear();
            done.extend(ring.completion().map(|c| (c.user_data(), c.result())));
            for &(user_data, result) in &done {
                if user_data == TIMEOUT {
                    // SAFETY: the timespec is leaked, so it outlives the operation.
                    unsafe { ring.submission().push(&timeout_entry) }
                        .map_err(|_| anyhow!("submission queue full"))?;
                    continue;
                }
                let i = (user_data & 0xffff) as usize;
                assert!(i < SLOTS);
                if user_data & SEND_BIT != 0 {
                    echoed += u64::from(result >= 0);
                    // SAFETY: the send on slot `i` has completed; the slots are leaked.
                    unsafe { arm_recv(&mut ring, fd, slots, i)? };
                } else if result >= 0 {
                    // SAFETY: the receive on slot `i` has completed with `result` bytes.
                    unsafe { arm_send(&mut ring, fd, slots, i, result as usize)? };
                } else {
                    // A failed receive (e.g. a pending ICMP error): receive again.
                    // SAFETY: the receive on slot `i` has completed; the slots are leaked.
                    unsafe { arm_recv(&mut ring, fd, slots, i)? };
                }
            }
        }
        // The ring and socket drop here; the leaked slots stay valid for any late completion.
        Ok(echoed)
    }
}
