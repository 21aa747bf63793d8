//! `--echo-peer`: the network-stack baseline for the grant rate. Instead of unid servers,
//! loadgen starts an echo peer on 127.0.0.1 and drives it with the very same agents (same
//! threads, sockets, windows, timers, histograms and checker) as a real cluster, so that
//! "grants/s" against servers and "echoes/s" against this peer come from the same client code
//! and can be compared as a ratio measured in one run.
//!
//! The peer answers every datagram with one datagram, as cheaply as the wire format allows and
//! with no other work: one socket, [`ECHO_THREADS_MAX`] threads at most blocking in
//! `recv_from` on it, one `decode` and one `encode` per datagram (a `Hello` gets a `Welcome`, a
//! `BlockRequest` a `BlockGrant` of the next ids from one shared counter, so the checker still
//! passes; a `StatusRequest` and a `SequenceCreate` get what loadgen's start-up waits for), one
//! `send_to`. No consensus, no allocator, no reply cache, no rate limit. It batches as the
//! server's shards do: `recvmmsg` of up to 64 datagrams, then one `sendmmsg` of the answers
//! ([`crate::sys`]), so grants ÷ echoes compares like with like. Its threads' CPU time is read
//! from `/proc/self/task/TID/stat` ([`EchoPeer::cpu_ns`]), as the server's from `/proc/PID/stat`.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::Context as _;
use unid_proto::{
    Block, Codec, DATAGRAM_BYTES_MAX, ErrorCode, Header, List, Message, Width, decode,
};

/// Most echo threads.
pub const ECHO_THREADS_MAX: usize = 64;

/// `SO_RCVBUF` and `SO_SNDBUF` of the peer's socket, as the server's shards
/// (`unid_engine::udp`; the kernel caps them at `net.core.rmem_max`/`wmem_max`).
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// How long a peer thread waits in `poll` before it checks whether to stop.
const POLL_MS: i32 = 50;

/// A running echo peer; stopped (threads joined) on drop.
pub struct EchoPeer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    echoed: Arc<AtomicU64>,
    tids: Arc<Mutex<Vec<i32>>>,
    /// recvmmsg calls that returned datagrams, and sendmmsg calls.
    calls: Arc<[AtomicU64; 2]>,
}

impl EchoPeer {
    /// Binds 127.0.0.1 on a free port and starts `threads` threads answering on it, granting
    /// ids of `width`, pinned to CPU `cpu` if given.
    pub fn start(threads: usize, width: Width, cpu: Option<usize>) -> anyhow::Result<EchoPeer> {
        anyhow::ensure!(
            (1..=ECHO_THREADS_MAX).contains(&threads),
            "--echo-threads must be in 1..={ECHO_THREADS_MAX}"
        );
        let sock = socket()?;
        sock.set_nonblocking(true)
            .context("make the echo peer's socket nonblocking")?;
        let addr = sock.local_addr().context("the echo peer's address")?;
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU64::new(0));
        // Ids handed out in the grants, shared so each agent's blocks increase.
        let next_id = Arc::new(AtomicU64::new(1));
        let tids = Arc::new(Mutex::new(Vec::new()));
        let calls: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let mut handles = Vec::with_capacity(threads);
        for _ in 0..threads {
            let sock = sock.try_clone().context("clone the echo peer's socket")?;
            let (stop, echoed, next_id) = (stop.clone(), echoed.clone(), next_id.clone());
            let (tids, calls) = (tids.clone(), calls.clone());
            let started = Arc::new(AtomicI32::new(0));
            let s2 = started.clone();
            handles.push(std::thread::spawn(move || {
                if let Some(c) = cpu {
                    let _ = crate::sys::pin(0, c);
                }
                tids.lock().expect("tids").push(crate::sys::gettid());
                s2.store(1, Ordering::Release);
                serve(&sock, width, &stop, &echoed, &next_id, &calls)
            }));
            while started.load(Ordering::Acquire) == 0 {
                std::thread::yield_now();
            }
        }
        Ok(EchoPeer {
            addr,
            stop,
            threads: handles,
            echoed,
            tids,
            calls,
        })
    }

    /// CPU time (user + system) its threads used so far, in ns (clock-tick resolution).
    pub fn cpu_ns(&self) -> u64 {
        let tids = self.tids.lock().expect("tids").clone();
        tids.iter()
            .filter_map(|t| crate::sys::cpu_ns(&format!("/proc/self/task/{t}/stat")))
            .sum()
    }

    /// Datagrams answered so far.
    pub fn answered(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }

    /// `recvmmsg` calls that returned datagrams, and `sendmmsg` calls, so far.
    pub fn calls(&self) -> (u64, u64) {
        (
            self.calls[0].load(Ordering::Relaxed),
            self.calls[1].load(Ordering::Relaxed),
        )
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
        eprintln!(
            "loadgen: echo peer answered {} datagrams",
            self.echoed.load(Ordering::Relaxed)
        );
    }
}

/// The peer's socket on 127.0.0.1, with the buffers the server's shards use
/// ([`SOCKET_BUFFER_BYTES`]): with the kernel's default 208 KiB, 512 requests in flight overflow
/// it and the lost ones wait out a retransmit timeout, which would understate the baseline.
fn socket() -> anyhow::Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, None).context("create the echo socket")?;
    s.set_recv_buffer_size(SOCKET_BUFFER_BYTES)
        .context("set the echo socket's SO_RCVBUF")?;
    s.set_send_buffer_size(SOCKET_BUFFER_BYTES)
        .context("set the echo socket's SO_SNDBUF")?;
    let addr: SocketAddr = ([127, 0, 0, 1], 0).into();
    s.bind(&addr.into())
        .context("bind the echo peer on 127.0.0.1")?;
    Ok(s.into())
}

fn serve(
    sock: &UdpSocket,
    width: Width,
    stop: &AtomicBool,
    echoed: &AtomicU64,
    next_id: &AtomicU64,
    calls: &[AtomicU64; 2],
) {
    let mut codec = Codec::new();
    let mut bufs = crate::sys::RecvBufs::default();
    let mut queue = crate::sys::SendQueue::default();
    let mut out = [0u8; DATAGRAM_BYTES_MAX];
    while !stop.load(Ordering::Relaxed) {
        let n = crate::sys::recv_batch(sock, &mut bufs).unwrap_or(0);
        if n == 0 {
            crate::sys::poll_readable(std::slice::from_ref(sock), POLL_MS);
            continue;
        }
        calls[0].fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            let (data, from) = bufs.get(i);
            let Ok(frame) = decode(data, None) else {
                continue;
            };
            let header = Header {
                sender: 1,
                seq: frame.header.seq,
                reply_to: frame.header.seq,
                epoch: 1,
            };
            let reply = match frame.message {
                Message::Hello { .. } => Message::Welcome {
                    node_id: 1 + (u64::from(from.port()) << 16),
                    lease_ms: 60_000,
                    servers: List::empty(),
                    truncated: false,
                },
                Message::BlockRequest { sequence, count } => {
                    let first = next_id.fetch_add(count, Ordering::Relaxed);
                    let Some(block) = Block::new(u128::from(first), count, width) else {
                        continue; // past the width's limit: a run of 2-byte ids is soon over
                    };
                    Message::BlockGrant {
                        sequence,
                        width,
                        block,
                    }
                }
                // The control path, so that loadgen's start-up finds a "leader" and the sequence.
                Message::StatusRequest { .. } => Message::StatusReply {
                    leader_id: 1,
                    term: 1,
                    servers: List::empty(),
                    sequences: List::empty(),
                    more: false,
                },
                Message::SequenceCreate { name, .. } => Message::Error {
                    code: ErrorCode::AlreadyExists,
                    sequence: Some(name),
                    retry_after_ms: 0,
                    text: "",
                },
                _ => continue,
            };
            if let Ok(len) = codec.encode(&header, &reply, None, &mut out) {
                queue.push(from, &out[..len]);
            }
        }
        let (c, sent) = queue.flush(sock);
        calls[1].fetch_add(c, Ordering::Relaxed);
        echoed.fetch_add(sent, Ordering::Relaxed);
    }
}
