//! `--batched`: many simulated agents multiplexed over a few sockets per thread, with batched
//! I/O (`recvmmsg`/`sendmmsg`, [`crate::sys`]). Each agent is its own registered node: its own
//! `Hello` (own name, own incarnation), its own node id in every header, its own window of
//! block requests, its own seq numbers. Up to [`MUX_AGENTS_MAX`] agents.
//!
//! Replies are matched to agents by seq: agent `k` of a thread numbers its datagrams
//! `k << 32 | n` (`n` = 1, 2, ...), so the server's reply (`reply_to`) names the agent. Its
//! per-sender replay window only needs each agent's seqs to increase, which they do.
//!
//! Sockets are bound to distinct loopback addresses (127.0.1.x): the server limits new
//! registrations per source IP (50/s), and each source address has its own rate bucket.
//!
//! Scope: one server or a cluster without faults (redirects and `NotReady` are followed,
//! retransmits after an RTO, `NotRegistered` registers again); the fault machinery of the
//! per-thread agents (`src/agent.rs`) is not here. Every grant is checked: no id twice in the
//! run, each agent's blocks increasing.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use unid_proto::{Codec, DATAGRAM_BYTES_MAX, ErrorCode, Header, Message, NodeId, NodeRole, decode};

use crate::sys::{self, RecvBufs, SendQueue};

/// Most multiplexed agents.
pub const MUX_AGENTS_MAX: usize = 100_000;
/// Most sockets per thread.
pub const SOCKETS_PER_THREAD_MAX: usize = 64;
/// Hellos one thread sends per loop turn at most (registration is rate limited anyway).
const HELLOS_PER_TURN_MAX: usize = 32;
/// How often the retransmit timers are scanned.
const SCAN_EVERY: Duration = Duration::from_millis(5);
/// While agents register, each registered one sends a request this often (its lease is
/// 10 s), and no more.
const KEEPALIVE_US: u64 = 3_000_000;
/// Agent-local seq bits.
const SEQ_BITS: u32 = 32;

/// State shared by the threads and `main`.
pub struct MuxShared {
    /// Start of the run (all µs are since then).
    pub start: Instant,
    /// Stop everything.
    pub abort: AtomicBool,
    /// Agents registered (first `Welcome` each).
    pub registered: AtomicU64,
    /// The measuring window, µs since the start (0: not set yet). Requests are issued from
    /// registration until `measure_end_us`; grants and latencies count inside the window.
    pub measure_start_us: AtomicU64,
    /// See `measure_start_us`.
    pub measure_end_us: AtomicU64,
    /// After `measure_end_us`, wait this long for answers, then stop.
    pub drain_us: u64,
    /// Grants so far (progress).
    pub grants: AtomicU64,
}

/// What one thread is told.
#[derive(Clone, Debug)]
pub struct MuxConfig {
    /// Server UDP addresses.
    pub servers: Vec<SocketAddr>,
    /// The sequence.
    pub sequence: String,
    /// Ids per request.
    pub count: u64,
    /// Requests in flight per agent.
    pub window: usize,
    /// Requests in flight per thread (all its agents).
    pub inflight_max: usize,
    /// Requests per second for this thread (0: as fast as the windows allow).
    pub rate_per_s: f64,
    /// Retransmit timeout.
    pub rto_ms: u64,
    /// Global indexes of this thread's agents.
    pub first_agent: u32,
    /// How many.
    pub agents: u32,
    /// Sockets of this thread.
    pub sockets: usize,
    /// Index of this thread's first socket among all (its loopback address).
    pub first_socket: usize,
    /// Incarnation base (agent `i` uses base + i).
    pub incarnation: u64,
    /// Pin the thread to this CPU.
    pub cpu: Option<usize>,
    /// `Hello`s per second of this thread (retries too).
    pub hello_rate_per_s: f64,
}

/// What one thread recorded.
pub struct MuxResult {
    /// Latency (first send → grant) of requests first sent in the window, µs.
    pub latency_us: Histogram<u64>,
    /// Grants received in the window, per agent of this thread.
    pub grants_per_agent: Vec<u64>,
    /// Requests sent in the window (first sends).
    pub requests: u64,
    /// Grants received in the window, and their ids.
    pub grants: u64,
    /// See `grants`.
    pub ids: u64,
    /// Every block granted in the run: (first, count).
    pub blocks: Vec<(u128, u64)>,
    /// An agent got a block not above its previous one.
    pub not_increasing: u64,
    /// Retransmits (timeouts) and resends (redirects, errors).
    pub retransmits: u64,
    /// Errors by code (index: code, 0 for unknown).
    pub errors: [u64; crate::agent::ERROR_CODES],
    /// Registrations (`Welcome`s).
    pub registrations: u64,
    /// recvmmsg calls that returned datagrams, and the datagrams.
    pub recv_calls: u64,
    /// See `recv_calls`.
    pub recv_datagrams: u64,
    /// sendmmsg calls and datagrams sent.
    pub send_calls: u64,
    /// See `send_calls`.
    pub send_datagrams: u64,
    /// Requests unanswered at the end.
    pub unanswered: u64,
    /// Thread CPU time over the window, ns.
    pub cpu_ns: u64,
}

struct Inflight {
    seq: u64,
    first_sent_us: u64,
    retry_at_us: u64,
    attempts: u32,
}

struct MAgent {
    node_id: NodeId,
    incarnation: u64,
    /// Last agent-local seq number used.
    n: u64,
    hello_seq: u64,
    hello_due_us: u64,
    target: usize,
    sock: usize,
    inflight: Vec<Inflight>,
    max_end: u128,
    /// When it last sent a new request (µs since the start).
    last_request_us: u64,
}

impl MAgent {
    fn next_seq(&mut self, k: u32) -> u64 {
        self.n += 1;
        (u64::from(k) << SEQ_BITS) | self.n
    }
}

/// The loopback address of socket `i` (127.0.1.1, 127.0.1.2, ...).
pub fn socket_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 1 + (i / 250) as u8, 1 + (i % 250) as u8)
}

fn bind(i: usize) -> anyhow::Result<UdpSocket> {
    use anyhow::Context as _;
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, None).context("create a UDP socket")?;
    let _ = s.set_recv_buffer_size(crate::echo::SOCKET_BUFFER_BYTES);
    let _ = s.set_send_buffer_size(crate::echo::SOCKET_BUFFER_BYTES);
    let addr = SocketAddr::from((socket_ip(i), 0));
    s.bind(&addr.into())
        .with_context(|| format!("bind {addr}"))?;
    s.set_nonblocking(true).context("nonblocking")?;
    Ok(s.into())
}

/// One thread of multiplexed agents: binds its sockets (errors are returned before any
/// thread starts), then [`MuxThread::run`].
pub struct MuxThread {
    cfg: MuxConfig,
    shared: Arc<MuxShared>,
    socks: Vec<UdpSocket>,
}

impl MuxThread {
    /// Binds the sockets.
    pub fn new(cfg: MuxConfig, shared: Arc<MuxShared>) -> anyhow::Result<MuxThread> {
        let socks = (0..cfg.sockets)
            .map(|i| bind(cfg.first_socket + i))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(MuxThread { cfg, shared, socks })
    }

    /// Runs until the window and the drain are over.
    pub fn run(self) -> MuxResult {
        let MuxThread { cfg, shared, socks } = self;
        if let Some(cpu) = cfg.cpu {
            let _ = sys::pin(0, cpu);
        }
        let tid = sys::gettid();
        let stat = format!("/proc/self/task/{tid}/stat");
        let us = |at: Instant| at.saturating_duration_since(shared.start).as_micros() as u64;
        let mut agents: Vec<MAgent> = (0..cfg.agents)
            .map(|k| MAgent {
                node_id: 0,
                incarnation: cfg.incarnation + u64::from(cfg.first_agent + k),
                n: 0,
                hello_seq: 0,
                hello_due_us: 0,
                target: (cfg.first_agent + k) as usize % cfg.servers.len(),
                sock: k as usize % socks.len(),
                inflight: Vec::new(),
                max_end: 0,
                last_request_us: 0,
            })
            .collect();
        let mut out = MuxResult {
            latency_us: Histogram::new_with_bounds(1, crate::agent::LATENCY_US_MAX, 3)
                .expect("valid histogram bounds"),
            grants_per_agent: vec![0; agents.len()],
            requests: 0,
            grants: 0,
            ids: 0,
            blocks: Vec::new(),
            not_increasing: 0,
            retransmits: 0,
            errors: [0; crate::agent::ERROR_CODES],
            registrations: 0,
            recv_calls: 0,
            recv_datagrams: 0,
            send_calls: 0,
            send_datagrams: 0,
            unanswered: 0,
            cpu_ns: 0,
        };
        let names: Vec<String> = (0..cfg.agents)
            .map(|k| {
                format!(
                    "loadgen-agent-{:05}-padded-so-a-not-leader-answer-fits",
                    cfg.first_agent + k
                )
            })
            .collect();
        let mut codec = Codec::new();
        let mut buf = [0u8; DATAGRAM_BYTES_MAX];
        let mut queues: Vec<SendQueue> = (0..socks.len()).map(|_| SendQueue::default()).collect();
        let mut rbufs = RecvBufs::default();
        let mut inflight_total = 0usize;
        let mut cursor = 0usize; // round robin over agents for issuing
        let mut hello_cursor = 0usize;
        let mut hello_tokens = 1.0f64;
        let mut last_hello = Instant::now();
        let mut last_scan = Instant::now();
        let interval_us = (cfg.rate_per_s > 0.0).then(|| 1e6 / cfg.rate_per_s);
        let mut tokens = 0.0f64;
        let mut last_token = Instant::now();
        let mut cpu_start: Option<u64> = None;
        let mut cpu_end: Option<u64> = None;
        let rto_us = cfg.rto_ms * 1000;
        let encode =
            |codec: &mut Codec, buf: &mut [u8], sender: NodeId, seq: u64, msg: &Message<'_>| {
                let header = Header {
                    sender,
                    seq,
                    reply_to: 0,
                    epoch: 0,
                };
                codec.encode(&header, msg, None, buf).ok()
            };
        loop {
            let now = Instant::now();
            let now_us = us(now);
            if shared.abort.load(Ordering::Relaxed) {
                break;
            }
            let ms = shared.measure_start_us.load(Ordering::Relaxed);
            let me = shared.measure_end_us.load(Ordering::Relaxed);
            let in_window = |t: u64| ms != 0 && t >= ms && t < me;
            if ms != 0 && now_us >= ms && cpu_start.is_none() {
                cpu_start = sys::cpu_ns(&stat);
            }
            if me != 0 && now_us >= me && cpu_end.is_none() {
                cpu_end = sys::cpu_ns(&stat);
            }
            let issuing = me == 0 || now_us < me;
            // Until the window is set (agents still registering), a registered agent only
            // keeps its lease: one request every KEEPALIVE.
            let registering = ms == 0;
            if !issuing && (inflight_total == 0 || now_us >= me + shared.drain_us) {
                break;
            }
            // Receive everything queued.
            let mut busy = false;
            for (si, sock) in socks.iter().enumerate() {
                for _ in 0..16 {
                    let n = match sys::recv_batch(sock, &mut rbufs) {
                        Ok(n) => n,
                        Err(_) => break, // an ICMP error; timers cover it
                    };
                    if n == 0 {
                        break;
                    }
                    busy = true;
                    out.recv_calls += 1;
                    out.recv_datagrams += n as u64;
                    for i in 0..n {
                        let (data, from) = rbufs.get(i);
                        let Ok(frame) = decode(data, None) else {
                            continue;
                        };
                        let h = frame.header;
                        let k = (h.reply_to >> SEQ_BITS) as usize;
                        let Some(a) = agents.get_mut(k) else { continue };
                        let _ = si;
                        match frame.message {
                            Message::Welcome { node_id, .. }
                                if h.reply_to == a.hello_seq && a.node_id == 0 =>
                            {
                                a.node_id = node_id;
                                if let Some(t) = cfg.servers.iter().position(|s| *s == from) {
                                    a.target = t;
                                }
                                out.registrations += 1;
                                if out.registrations <= cfg.agents as u64 {
                                    shared.registered.fetch_add(1, Ordering::Relaxed);
                                }
                                for r in &mut a.inflight {
                                    r.retry_at_us = now_us;
                                }
                            }
                            Message::BlockGrant { block, .. } => {
                                let Some(j) = a.inflight.iter().position(|r| r.seq == h.reply_to)
                                else {
                                    continue; // a duplicate answer
                                };
                                let r = a.inflight.swap_remove(j);
                                inflight_total -= 1;
                                if block.first() < a.max_end {
                                    out.not_increasing += 1;
                                }
                                a.max_end = a.max_end.max(block.end());
                                out.blocks.push((block.first(), block.count()));
                                shared.grants.fetch_add(1, Ordering::Relaxed);
                                if in_window(now_us) {
                                    out.grants += 1;
                                    out.ids += block.count();
                                    out.grants_per_agent[k] += 1;
                                }
                                if in_window(r.first_sent_us) {
                                    let lat = now_us.saturating_sub(r.first_sent_us).max(1);
                                    let _ = out
                                        .latency_us
                                        .record(lat.min(crate::agent::LATENCY_US_MAX));
                                }
                            }
                            Message::NotLeader { leader, .. } => {
                                match leader.and_then(|l| cfg.servers.iter().position(|s| *s == l))
                                {
                                    Some(t) => a.target = t,
                                    None => a.target = (a.target + 1) % cfg.servers.len(),
                                }
                                let later = now_us + 10_000;
                                for r in &mut a.inflight {
                                    r.retry_at_us = r.retry_at_us.min(later);
                                }
                                a.hello_due_us = a.hello_due_us.min(later);
                            }
                            Message::LeaderChange { leader, .. } => {
                                if let Some(t) = cfg.servers.iter().position(|s| *s == leader) {
                                    a.target = t;
                                }
                                for r in &mut a.inflight {
                                    r.retry_at_us = now_us;
                                }
                            }
                            Message::Error {
                                code,
                                retry_after_ms,
                                ..
                            } => {
                                let slot = code as usize;
                                out.errors[if slot < out.errors.len() { slot } else { 0 }] += 1;
                                let later =
                                    now_us + u64::from(retry_after_ms.clamp(1, 1_000)) * 1000;
                                if h.reply_to == a.hello_seq {
                                    a.hello_due_us = later;
                                    continue;
                                }
                                let j = a.inflight.iter().position(|r| r.seq == h.reply_to);
                                match code {
                                    ErrorCode::NotReady
                                    | ErrorCode::RateLimited
                                    | ErrorCode::Internal => {
                                        if let Some(j) = j {
                                            a.inflight[j].retry_at_us = later;
                                        }
                                    }
                                    ErrorCode::NotRegistered => {
                                        if a.node_id != 0 {
                                            a.node_id = 0;
                                            a.hello_due_us = now_us;
                                        }
                                    }
                                    _ => {
                                        // Replayed or final: this request is over; the
                                        // window issues a new one.
                                        if let Some(j) = j {
                                            a.inflight.swap_remove(j);
                                            inflight_total -= 1;
                                        }
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    if n < sys::BATCH_MAX {
                        break;
                    }
                }
            }
            // Registrations, paced: agents of a host start one by one, and a burst of 1,000
            // Hellos at once stalled a server's Raft (registration commits timed out).
            let mut hellos = 0;
            hello_tokens = (hello_tokens
                + now.duration_since(last_hello).as_secs_f64() * cfg.hello_rate_per_s)
                .min(HELLOS_PER_TURN_MAX as f64);
            last_hello = now;
            for _ in 0..agents.len() {
                if hellos >= HELLOS_PER_TURN_MAX {
                    break;
                }
                let k = hello_cursor;
                hello_cursor = (hello_cursor + 1) % agents.len();
                let a = &mut agents[k];
                if a.node_id != 0 || a.hello_due_us > now_us {
                    continue;
                }
                if hello_tokens < 1.0 {
                    break;
                }
                hello_tokens -= 1.0;
                a.hello_seq = a.next_seq(k as u32);
                a.hello_due_us = now_us + 1_000_000;
                if a.n % 3 == 0 {
                    a.target = (a.target + 1) % cfg.servers.len();
                }
                let msg = Message::Hello {
                    role: NodeRole::Agent,
                    incarnation: a.incarnation,
                    name: &names[k],
                    listen: None,
                    backup_of: None,
                    versions: unid_proto::VERSIONS,
                    software: unid_proto::SOFTWARE,
                };
                if let Some(n) = encode(&mut codec, &mut buf, 0, a.hello_seq, &msg) {
                    queues[a.sock].push(cfg.servers[a.target], &buf[..n]);
                    hellos += 1;
                }
            }
            // New requests, round robin over the agents.
            if issuing {
                if let Some(iv) = interval_us {
                    let dt = now.duration_since(last_token).as_micros() as f64;
                    last_token = now;
                    tokens = (tokens + dt / iv).min(cfg.inflight_max as f64);
                }
                let request = Message::BlockRequest {
                    sequence: &cfg.sequence,
                    count: cfg.count,
                };
                let mut looked = 0;
                while inflight_total < cfg.inflight_max
                    && looked < agents.len()
                    && (interval_us.is_none() || tokens >= 1.0)
                {
                    let k = cursor;
                    cursor = (cursor + 1) % agents.len();
                    looked += 1;
                    let a = &mut agents[k];
                    if a.node_id == 0
                        || a.inflight.len() >= cfg.window
                        || (registering && now_us < a.last_request_us + KEEPALIVE_US)
                    {
                        continue;
                    }
                    a.last_request_us = now_us;
                    let seq = a.next_seq(k as u32);
                    if let Some(n) = encode(&mut codec, &mut buf, a.node_id, seq, &request) {
                        queues[a.sock].push(cfg.servers[a.target], &buf[..n]);
                        a.inflight.push(Inflight {
                            seq,
                            first_sent_us: now_us,
                            retry_at_us: now_us + rto_us,
                            attempts: 0,
                        });
                        inflight_total += 1;
                        if in_window(now_us) {
                            out.requests += 1;
                        }
                        tokens -= 1.0;
                        looked = 0;
                    }
                }
            }
            // Retransmits.
            if now.duration_since(last_scan) >= SCAN_EVERY {
                last_scan = now;
                for (k, a) in agents.iter_mut().enumerate() {
                    let _ = k;
                    if a.node_id == 0 {
                        continue;
                    }
                    for r in a.inflight.iter_mut().filter(|r| r.retry_at_us <= now_us) {
                        let msg = Message::BlockRequest {
                            sequence: &cfg.sequence,
                            count: cfg.count,
                        };
                        if let Some(n) = encode(&mut codec, &mut buf, a.node_id, r.seq, &msg) {
                            queues[a.sock].push(cfg.servers[a.target], &buf[..n]);
                        }
                        r.attempts += 1;
                        r.retry_at_us = now_us + (rto_us << r.attempts.min(3));
                        out.retransmits += 1;
                    }
                }
            }
            for (q, sock) in queues.iter_mut().zip(&socks) {
                if q.len() > 0 {
                    busy = true;
                    let (c, d) = q.flush(sock);
                    out.send_calls += c;
                    out.send_datagrams += d;
                }
            }
            if !busy {
                sys::poll_readable(&socks, 1);
            }
        }
        let end_cpu = cpu_end.or_else(|| sys::cpu_ns(&stat)).unwrap_or(0);
        out.cpu_ns = end_cpu.saturating_sub(cpu_start.unwrap_or(end_cpu));
        out.unanswered = inflight_total as u64;
        out
    }
}

/// Merged results of all threads, and the checks.
pub struct MuxSummary {
    /// Latency, µs.
    pub latency_us: Histogram<u64>,
    /// Per agent grants in the window.
    pub grants_per_agent: Vec<u64>,
    /// Totals (see [`MuxResult`]).
    pub requests: u64,
    /// See [`MuxResult`].
    pub grants: u64,
    /// See [`MuxResult`].
    pub ids: u64,
    /// See [`MuxResult`].
    pub retransmits: u64,
    /// See [`MuxResult`].
    pub errors: [u64; crate::agent::ERROR_CODES],
    /// See [`MuxResult`].
    pub registrations: u64,
    /// See [`MuxResult`].
    pub recv_calls: u64,
    /// See [`MuxResult`].
    pub recv_datagrams: u64,
    /// See [`MuxResult`].
    pub send_calls: u64,
    /// See [`MuxResult`].
    pub send_datagrams: u64,
    /// See [`MuxResult`].
    pub unanswered: u64,
    /// Client threads' CPU over the window, ns.
    pub cpu_ns: u64,
    /// Blocks granted in the run.
    pub blocks: u64,
    /// Ids granted twice (overlapping blocks), and blocks not above the agent's previous one.
    pub overlaps: u64,
    /// See `overlaps`.
    pub not_increasing: u64,
}

impl MuxSummary {
    /// Merges and checks.
    pub fn new(results: Vec<MuxResult>) -> MuxSummary {
        let mut latency_us =
            Histogram::new_with_bounds(1, crate::agent::LATENCY_US_MAX, 3).expect("bounds");
        let mut s = MuxSummary {
            latency_us: latency_us.clone(),
            grants_per_agent: Vec::new(),
            requests: 0,
            grants: 0,
            ids: 0,
            retransmits: 0,
            errors: [0; crate::agent::ERROR_CODES],
            registrations: 0,
            recv_calls: 0,
            recv_datagrams: 0,
            send_calls: 0,
            send_datagrams: 0,
            unanswered: 0,
            cpu_ns: 0,
            blocks: 0,
            overlaps: 0,
            not_increasing: 0,
        };
        let mut blocks: Vec<(u128, u64)> = Vec::new();
        for r in results {
            let _ = latency_us.add(&r.latency_us);
            s.grants_per_agent.extend(&r.grants_per_agent);
            s.requests += r.requests;
            s.grants += r.grants;
            s.ids += r.ids;
            s.retransmits += r.retransmits;
            for (i, e) in r.errors.iter().enumerate() {
                s.errors[i] += e;
            }
            s.registrations += r.registrations;
            s.recv_calls += r.recv_calls;
            s.recv_datagrams += r.recv_datagrams;
            s.send_calls += r.send_calls;
            s.send_datagrams += r.send_datagrams;
            s.unanswered += r.unanswered;
            s.cpu_ns += r.cpu_ns;
            s.not_increasing += r.not_increasing;
            blocks.extend(r.blocks);
        }
        s.latency_us = latency_us;
        s.blocks = blocks.len() as u64;
        s.overlaps = overlaps(&mut blocks);
        s
    }

    /// Whether every check passed (and some grant came back).
    pub fn passed(&self) -> bool {
        self.overlaps == 0 && self.not_increasing == 0 && self.blocks > 0
    }
}

/// Blocks (first, count) that overlap the one before them once sorted: ids granted twice.
pub fn overlaps(blocks: &mut [(u128, u64)]) -> u64 {
    blocks.sort_unstable();
    let mut n = 0;
    let mut end = 0u128;
    for &(first, count) in blocks.iter() {
        if first < end {
            n += 1;
        }
        end = end.max(first + u128::from(count));
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_blocks_are_found() {
        assert_eq!(overlaps(&mut [(10, 5), (1, 9), (15, 1)]), 0);
        assert_eq!(overlaps(&mut [(10, 5), (1, 10), (15, 1)]), 1);
        assert_eq!(overlaps(&mut [(1, 100), (50, 1), (60, 1)]), 2);
    }

    #[test]
    fn sockets_get_distinct_loopback_addresses() {
        let ips: std::collections::HashSet<_> = (0..600).map(socket_ip).collect();
        assert_eq!(ips.len(), 600);
        assert!(ips.iter().all(|ip| ip.is_loopback()));
    }
}
