//! One simulated agent: its own UDP socket (so its own per-source rate bucket on the
//! server), registration with `Hello`, a window of block requests in flight, retransmits
//! with the same seq, and the redirects (`NotLeader`, `LeaderChange`, ICMP errors from a
//! dead server). It records every grant for the checker and every latency.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use unid_loadgen::checker::{Grant, Unanswered};
use unid_proto::{
    Codec, DATAGRAM_BYTES_MAX, ErrorCode, Header, Id, Message, NodeId, NodeRole, decode,
};

/// Highest latency the histograms hold, in microseconds (larger values are clamped).
pub const LATENCY_US_MAX: u64 = 120_000_000;

/// Error codes are 1..=9; index 0 counts codes this version does not know.
pub const ERROR_CODES: usize = 10;

/// Availability thresholds: a request answered within this many microseconds of its first
/// send.
pub const AVAILABILITY_US: [u64; 3] = [10_000, 100_000, 1_000_000];

/// State every agent thread shares with `main`.
pub struct Shared {
    /// When the run started: every `t_us` is measured from here.
    pub start: Instant,
    /// No new request after this.
    pub stop_issuing_at: Instant,
    /// Give up on requests still unanswered after this.
    pub drain_until: Instant,
    /// Set by `main` to stop everything now.
    pub abort: AtomicBool,
    /// `--requests-max` (u64::MAX: none).
    pub requests_max: u64,
    /// Requests issued so far (all agents).
    pub requests: AtomicU64,
    /// Grants received so far (first answer per request).
    pub grants: AtomicU64,
    /// Ids in those grants.
    pub ids: AtomicU64,
    /// Errors received.
    pub errors: AtomicU64,
    /// Requests sent again, for any reason.
    pub retransmits: AtomicU64,
    /// Ids the ring consumers took.
    pub consumed: AtomicU64,
}

/// What each agent is told.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The servers' UDP addresses (the first one is asked first).
    pub servers: Vec<SocketAddr>,
    /// The sequence.
    pub sequence: String,
    /// Ids per block request.
    pub count: u64,
    /// Requests in flight per agent.
    pub window: usize,
    /// Requests per second for this agent (0: as fast as the window allows).
    pub rate_per_s: f64,
    /// First retransmit timeout; doubles per attempt up to [`RTO_MS_MAX`].
    pub rto_ms: u64,
    /// Datagram faults injected between this agent and the servers.
    pub faults: Faults,
    /// Seed of the fault decisions (each agent draws from `seed` and its index).
    pub seed: u64,
    /// Width of a time bucket of the series, in ms.
    pub bucket_ms: u64,
}

/// Datagram faults, each a probability per datagram in each direction. They are applied in
/// the agent's own send and receive paths (the kernel here has no netem): to a server this
/// is the same as a lossy, duplicating, reordering, corrupting link.
#[derive(Copy, Clone, Debug, Default, PartialEq)]
pub struct Faults {
    /// Lost.
    pub drop: f64,
    /// Delivered twice.
    pub duplicate: f64,
    /// Held back and delivered after the next datagram (or when the agent next idles).
    pub reorder: f64,
    /// One random bit flipped (the CRC must catch it: the server drops it, or our decode
    /// fails).
    pub corrupt: f64,
}

impl Faults {
    /// Whether any fault is on.
    pub fn any(&self) -> bool {
        self.drop > 0.0 || self.duplicate > 0.0 || self.reorder > 0.0 || self.corrupt > 0.0
    }
}

/// Flips one random bit of `data`.
fn flip_bit(rng: &mut SmallRng, data: &mut [u8]) {
    if !data.is_empty() {
        let i = rng.random_range(0..data.len());
        data[i] ^= 1 << rng.random_range(0..8);
    }
}

/// The receive timeouts an agent uses (smallest first).
const READ_TIMEOUTS: [Duration; 5] = [
    Duration::from_micros(200),
    Duration::from_millis(1),
    Duration::from_millis(5),
    Duration::from_millis(20),
    Duration::from_millis(50),
];

/// How long redirects back to a leader that announced its departure are ignored.
const DEPARTED: Duration = Duration::from_millis(1_000);

/// Upper bound of the retransmit timeout.
pub const RTO_MS_MAX: u64 = 1_000;

/// What an agent recorded.
pub struct AgentResult {
    /// Every grant received (a request answered twice appears twice).
    pub grants: Vec<Grant>,
    /// Requests with neither a grant nor a final error at the end.
    pub unanswered: Vec<Unanswered>,
    /// Latency from first send to the first answer (grant or final error), in µs.
    pub latency_us: Histogram<u64>,
    /// Errors received, by code (see [`ERROR_CODES`]).
    pub errors_by_code: [u64; ERROR_CODES],
    /// Requests issued.
    pub requests: u64,
    /// Requests ended by a final error (not retried).
    pub failed: u64,
    /// Requests answered within each of [`AVAILABILITY_US`].
    pub answered_within: [u64; 3],
    /// Retransmits after a timeout (same seq, same server).
    pub retransmits: u64,
    /// Resends to another server (redirect, silent server, new registration).
    pub redirect_resends: u64,
    /// Resends after `NotReady`, `RateLimited` or `Internal`.
    pub error_retries: u64,
    /// `NotLeader` answers followed.
    pub redirects: u64,
    /// `LeaderChange` messages followed.
    pub leader_changes: u64,
    /// Times it registered (`Welcome`).
    pub registrations: u64,
    /// Times it switched to the next server after timeouts with no answer at all.
    pub rotations: u64,
    /// Socket errors on receive (ICMP unreachable from a dead server, mostly).
    pub socket_errors: u64,
    /// Datagrams that did not decode.
    pub undecodable: u64,
    /// Faults injected: dropped, duplicated, reordered, corrupted (both directions).
    pub faults: [u64; 4],
    /// Grants and their latencies per time bucket.
    pub series: crate::series::Series,
}

struct Request {
    first_sent: Instant,
    retry_at: Instant,
    /// Why it will be sent again at `retry_at`.
    why: Resend,
    attempts: u32,
    floor: Id,
}

/// Why a request is sent again (same seq).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Resend {
    /// No answer within the RTO.
    Timeout,
    /// Another server: a redirect, a silent server, a new registration.
    Redirect,
    /// The server said `NotReady`, `RateLimited` or `Internal`.
    Error,
}

/// One agent; `run` drives it until the run ends.
pub struct Agent {
    index: u32,
    cfg: AgentConfig,
    shared: Arc<Shared>,
    sock: UdpSocket,
    codec: Codec,
    target: SocketAddr,
    target_index: usize,
    node_id: NodeId,
    incarnation: u64,
    seq: u64,
    hello_seq: u64,
    hello_due: Instant,
    hello_attempts: u32,
    highest_epoch: u64,
    inflight: BTreeMap<u64, Request>,
    max_end: Id,
    last_rotate: Instant,
    last_heard: Instant,
    /// A leader that said it is leaving (`LeaderChange`), and when: redirects back to it
    /// are ignored for [`DEPARTED`].
    departed: Option<(SocketAddr, Instant)>,
    out: AgentResult,
    rng: SmallRng,
    /// An outgoing datagram held back (reorder), and where to.
    held_out: Option<(Vec<u8>, SocketAddr)>,
    /// An incoming datagram held back (reorder), and where from.
    held_in: Option<(Vec<u8>, SocketAddr)>,
}

/// The fault seed of agent `index`.
fn seed_for(seed: u64, index: u32) -> u64 {
    seed ^ (u64::from(index) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl Agent {
    /// A new agent with its own socket on 127.0.0.1.
    pub fn new(
        index: u32,
        cfg: AgentConfig,
        shared: Arc<Shared>,
        incarnation: u64,
    ) -> std::io::Result<Self> {
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        let now = Instant::now();
        let target = cfg.servers[index as usize % cfg.servers.len()];
        let cfg_seed = cfg.seed;
        let cfg_bucket_ms = cfg.bucket_ms;
        Ok(Agent {
            index,
            target,
            target_index: index as usize % cfg.servers.len(),
            cfg,
            shared,
            sock,
            codec: Codec::new(),
            node_id: 0,
            incarnation,
            seq: 0,
            hello_seq: 0,
            hello_due: now,
            hello_attempts: 0,
            highest_epoch: 0,
            inflight: BTreeMap::new(),
            max_end: 0,
            last_rotate: now,
            last_heard: now,
            departed: None,
            out: AgentResult {
                grants: Vec::new(),
                unanswered: Vec::new(),
                latency_us: Histogram::new_with_bounds(1, LATENCY_US_MAX, 3)
                    .expect("valid histogram bounds"),
                errors_by_code: [0; ERROR_CODES],
                requests: 0,
                failed: 0,
                answered_within: [0; 3],
                retransmits: 0,
                redirect_resends: 0,
                error_retries: 0,
                redirects: 0,
                leader_changes: 0,
                registrations: 0,
                rotations: 0,
                socket_errors: 0,
                undecodable: 0,
                faults: [0; 4],
                series: crate::series::Series::new(cfg_bucket_ms),
            },
            rng: SmallRng::seed_from_u64(seed_for(cfg_seed, index)),
            held_out: None,
            held_in: None,
        })
    }

    fn t_us(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.shared.start).as_micros() as u64
    }

    fn send(&mut self, seq: u64, msg: &Message<'_>) {
        let mut buf = [0u8; DATAGRAM_BYTES_MAX];
        let header = Header {
            sender: self.node_id,
            seq,
            reply_to: 0,
            epoch: self.highest_epoch,
        };
        if let Ok(n) = self.codec.encode(&header, msg, None, &mut buf) {
            let to = self.target;
            self.transmit(&buf[..n], to);
        }
    }

    /// Sends one datagram through the fault injection.
    fn transmit(&mut self, data: &[u8], to: SocketAddr) {
        let f = self.cfg.faults;
        if !f.any() {
            // A full socket buffer or an ICMP error: the retransmit timer covers it.
            let _ = self.sock.send_to(data, to);
            return;
        }
        if self.rng.random_bool(f.drop) {
            self.out.faults[0] += 1;
            return;
        }
        let mut data = data.to_vec();
        if self.rng.random_bool(f.corrupt) {
            self.out.faults[3] += 1;
            flip_bit(&mut self.rng, &mut data);
        }
        if self.held_out.is_none() && self.rng.random_bool(f.reorder) {
            self.out.faults[2] += 1;
            self.held_out = Some((data, to));
            return;
        }
        let _ = self.sock.send_to(&data, to);
        if self.rng.random_bool(f.duplicate) {
            self.out.faults[1] += 1;
            let _ = self.sock.send_to(&data, to);
        }
        if let Some((d, t)) = self.held_out.take() {
            let _ = self.sock.send_to(&d, t);
        }
    }

    /// Receives one datagram through the fault injection and handles it.
    fn deliver(&mut self, data: &[u8], from: SocketAddr) {
        let f = self.cfg.faults;
        if !f.any() {
            self.handle(data, from, Instant::now());
            return;
        }
        if self.rng.random_bool(f.drop) {
            self.out.faults[0] += 1;
            return;
        }
        let mut data = data.to_vec();
        if self.rng.random_bool(f.corrupt) {
            self.out.faults[3] += 1;
            flip_bit(&mut self.rng, &mut data);
        }
        if self.held_in.is_none() && self.rng.random_bool(f.reorder) {
            self.out.faults[2] += 1;
            self.held_in = Some((data, from));
            return;
        }
        self.handle(&data, from, Instant::now());
        if self.rng.random_bool(f.duplicate) {
            self.out.faults[1] += 1;
            self.handle(&data, from, Instant::now());
        }
        self.flush_held_in();
    }

    /// Delivers the held-back datagrams (the agent is idle, or another went past them).
    fn flush_held(&mut self) {
        if let Some((d, t)) = self.held_out.take() {
            let _ = self.sock.send_to(&d, t);
        }
        self.flush_held_in();
    }

    fn flush_held_in(&mut self) {
        if let Some((d, from)) = self.held_in.take() {
            self.handle(&d, from, Instant::now());
        }
    }

    fn send_hello(&mut self) {
        // A long name: a follower's NotLeader must fit in no more bytes than the Hello.
        let name = format!(
            "loadgen-agent-{:05}-padded-so-a-not-leader-answer-fits",
            self.index
        );
        let msg = Message::Hello {
            role: NodeRole::Agent,
            incarnation: self.incarnation,
            name: &name,
            listen: None,
            backup_of: None,
            versions: unid_proto::VERSIONS,
            software: unid_proto::SOFTWARE,
        };
        self.send(self.hello_seq, &msg);
    }

    fn send_request(&mut self, seq: u64) {
        let sequence = self.cfg.sequence.clone();
        let msg = Message::BlockRequest {
            sequence: &sequence,
            count: self.cfg.count,
        };
        self.send(seq, &msg);
    }

    fn rto(&self, attempts: u32) -> Duration {
        let ms = self
            .cfg
            .rto_ms
            .saturating_mul(1u64 << attempts.min(10))
            .min(RTO_MS_MAX);
        Duration::from_millis(ms)
    }

    /// Resend everything in flight at once (after a redirect or a registration).
    /// The backoff starts again: it is another server.
    fn retry_all_now(&mut self, now: Instant) {
        for r in self.inflight.values_mut() {
            r.retry_at = now;
            r.why = Resend::Redirect;
            r.attempts = 0;
        }
    }

    /// Switches to the server after the current one in the list.
    fn rotate(&mut self, now: Instant) {
        if let Some(i) = self.cfg.servers.iter().position(|s| *s == self.target) {
            self.target_index = i;
        }
        self.target_index = (self.target_index + 1) % self.cfg.servers.len();
        self.target = self.cfg.servers[self.target_index];
        self.last_rotate = now;
    }

    fn register_again(&mut self, now: Instant) {
        self.node_id = 0;
        self.seq += 1;
        self.hello_seq = self.seq;
        self.hello_due = now;
        self.hello_attempts = 0;
    }

    fn answered(&mut self, seq: u64, now: Instant) -> Option<Request> {
        let r = self.inflight.remove(&seq)?;
        let lat = now.saturating_duration_since(r.first_sent).as_micros() as u64;
        let _ = self.out.latency_us.record(lat.clamp(1, LATENCY_US_MAX));
        let t = self.t_us(now);
        self.out.series.record(t, lat);
        for (i, limit) in AVAILABILITY_US.iter().enumerate() {
            if lat <= *limit {
                self.out.answered_within[i] += 1;
            }
        }
        Some(r)
    }

    fn handle(&mut self, data: &[u8], from: SocketAddr, now: Instant) {
        let Ok(frame) = decode(data, None) else {
            self.out.undecodable += 1;
            return;
        };
        let h = frame.header;
        if from == self.target {
            self.last_heard = now;
        }
        let stale = h.epoch != 0 && h.epoch < self.highest_epoch;
        if !stale {
            self.highest_epoch = self.highest_epoch.max(h.epoch);
        }
        match frame.message {
            Message::BlockGrant { width, block, .. } => {
                if h.reply_to == 0 || h.reply_to > self.seq || h.reply_to == self.hello_seq {
                    return;
                }
                let (floor, sent_us) = match self.answered(h.reply_to, now) {
                    Some(r) => {
                        self.shared.grants.fetch_add(1, Ordering::Relaxed);
                        self.shared.ids.fetch_add(block.count(), Ordering::Relaxed);
                        (r.floor, self.t_us(r.first_sent))
                    }
                    // A second answer to a request already answered: still ids granted to
                    // this agent, so the checker sees it; its floor and send time are
                    // unknown (0: the failover rule does not cover it).
                    None => (0, 0),
                };
                self.out.grants.push(Grant {
                    agent: self.index,
                    seq: h.reply_to,
                    first: block.first(),
                    count: block.count(),
                    width,
                    t_us: self.t_us(now),
                    epoch: h.epoch,
                    from,
                    floor,
                    sent_us,
                });
                self.max_end = self.max_end.max(block.end());
            }
            Message::Welcome { node_id, .. }
                if h.reply_to == self.hello_seq && self.node_id == 0 =>
            {
                self.node_id = node_id;
                self.target = from;
                self.out.registrations += 1;
                self.retry_all_now(now);
            }
            Message::NotLeader { leader, .. } => {
                if stale {
                    return;
                }
                self.out.redirects += 1;
                let departed = self
                    .departed
                    .is_some_and(|(a, at)| Some(a) == leader && now.duration_since(at) < DEPARTED);
                if departed {
                    // The successor named by LeaderChange does not lead yet and still names
                    // the leader that left: stay, and ask it again shortly.
                    let later = now + Duration::from_millis(10);
                    for r in self.inflight.values_mut() {
                        r.retry_at = r.retry_at.min(later);
                        r.why = Resend::Redirect;
                    }
                    self.hello_due = self.hello_due.min(later);
                    return;
                }
                match leader {
                    Some(l) if l != self.target => self.target = l,
                    // Unknown leader (an election), or it names the server we asked: wait a
                    // little, then try the next server.
                    _ => {
                        let later = now + Duration::from_millis(20);
                        if now.duration_since(self.last_rotate) >= Duration::from_millis(20) {
                            self.rotate(now);
                        }
                        for r in self.inflight.values_mut() {
                            r.retry_at = r.retry_at.min(later);
                            r.why = Resend::Redirect;
                            r.why = Resend::Redirect;
                        }
                        self.hello_due = self.hello_due.min(later);
                        return;
                    }
                }
                self.retry_all_now(now);
                self.hello_due = now;
            }
            Message::LeaderChange { leader, .. } => {
                if stale {
                    return;
                }
                self.out.leader_changes += 1;
                self.departed = Some((from, now));
                self.target = leader;
                self.retry_all_now(now);
                self.hello_due = now;
            }
            Message::Error {
                code,
                retry_after_ms,
                ..
            } => {
                self.shared.errors.fetch_add(1, Ordering::Relaxed);
                let slot = code as usize;
                self.out.errors_by_code[if slot < ERROR_CODES { slot } else { 0 }] += 1;
                let later = now + Duration::from_millis(u64::from(retry_after_ms.clamp(1, 1_000)));
                if h.reply_to == self.hello_seq {
                    self.hello_due = later;
                    return;
                }
                match code {
                    ErrorCode::NotReady | ErrorCode::RateLimited | ErrorCode::Internal => {
                        if let Some(r) = self.inflight.get_mut(&h.reply_to) {
                            r.retry_at = later;
                            r.why = Resend::Error;
                        }
                    }
                    ErrorCode::NotRegistered => {
                        if self.node_id != 0 {
                            self.register_again(now);
                        }
                    }
                    _ => {
                        if self.answered(h.reply_to, now).is_some() {
                            self.out.failed += 1;
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Runs until the run ends; returns what it recorded.
    pub fn run(mut self) -> AgentResult {
        self.register_again(Instant::now());
        let interval =
            (self.cfg.rate_per_s > 0.0).then(|| Duration::from_secs_f64(1.0 / self.cfg.rate_per_s));
        let mut next_issue = Instant::now();
        let mut buf = [0u8; 2048];
        let mut read_timeout = Duration::ZERO;
        loop {
            let now = Instant::now();
            if self.shared.abort.load(Ordering::Relaxed) || now >= self.shared.drain_until {
                break;
            }
            let issuing = now < self.shared.stop_issuing_at;
            if !issuing && self.inflight.is_empty() {
                break;
            }
            if self.node_id == 0 {
                if self.hello_due <= now {
                    self.hello_attempts += 1;
                    if self.hello_attempts % 3 == 0 {
                        self.rotate(now);
                    }
                    self.send_hello();
                    self.hello_due = now + Duration::from_millis(200);
                }
            } else {
                while issuing && self.inflight.len() < self.cfg.window && next_issue <= now {
                    let n = self.shared.requests.fetch_add(1, Ordering::Relaxed);
                    if n >= self.shared.requests_max {
                        break;
                    }
                    self.seq += 1;
                    let seq = self.seq;
                    self.send_request(seq);
                    self.out.requests += 1;
                    self.inflight.insert(
                        seq,
                        Request {
                            first_sent: now,
                            retry_at: now + self.rto(0),
                            why: Resend::Timeout,
                            attempts: 0,
                            floor: self.max_end,
                        },
                    );
                    next_issue = match interval {
                        // Behind by more than a second: do not burst to catch up.
                        Some(i) => (next_issue + i).max(now - Duration::from_secs(1)),
                        None => now,
                    };
                }
                // Not a word from the server we ask for an RTO while requests wait: it is
                // probably dead (a killed leader sends nothing, and an unconnected UDP socket
                // hears no ICMP). Ask the next server at once, whatever the backoff: it
                // answers or redirects.
                let quiet = Duration::from_millis(self.cfg.rto_ms);
                if !self.inflight.is_empty()
                    && now.duration_since(self.last_heard) >= quiet
                    && now.duration_since(self.last_rotate) >= quiet
                {
                    self.rotate(now);
                    self.out.rotations += 1;
                    self.retry_all_now(now);
                }
                let due: Vec<u64> = self
                    .inflight
                    .iter()
                    .filter(|(_, r)| r.retry_at <= now)
                    .map(|(s, _)| *s)
                    .collect();
                for seq in due {
                    self.send_request(seq);
                    let (attempts, why) = {
                        let r = self.inflight.get_mut(&seq).expect("listed above");
                        r.attempts += 1;
                        (r.attempts, r.why)
                    };
                    let at = now + self.rto(attempts);
                    if let Some(r) = self.inflight.get_mut(&seq) {
                        r.retry_at = at;
                        r.why = Resend::Timeout;
                    }
                    match why {
                        Resend::Timeout => self.out.retransmits += 1,
                        Resend::Redirect => self.out.redirect_resends += 1,
                        Resend::Error => self.out.error_retries += 1,
                    }
                    self.shared.retransmits.fetch_add(1, Ordering::Relaxed);
                }
            }
            // Sleep in recv until the next thing to do.
            let mut wake = now + Duration::from_millis(50);
            if self.node_id == 0 {
                wake = wake.min(self.hello_due);
            } else {
                if issuing && self.inflight.len() < self.cfg.window {
                    wake = wake.min(next_issue);
                }
                if let Some(r) = self.inflight.values().map(|r| r.retry_at).min() {
                    wake = wake.min(r);
                    let quiet = Duration::from_millis(self.cfg.rto_ms);
                    wake = wake.min(self.last_heard.max(self.last_rotate) + quiet);
                }
            }
            // A few fixed timeouts, so that the socket option rarely changes (one syscall
            // saved per datagram under load); waking a little early is harmless.
            let left = wake.saturating_duration_since(now);
            let timeout = READ_TIMEOUTS
                .iter()
                .rev()
                .copied()
                .find(|t| *t <= left)
                .unwrap_or(READ_TIMEOUTS[0]);
            if timeout != read_timeout {
                let _ = self.sock.set_read_timeout(Some(timeout));
                read_timeout = timeout;
            }
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) => self.deliver(&buf[..n], from),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    self.flush_held();
                }
                Err(_) => {
                    // ICMP port unreachable: the server we sent to is gone. Try the next one.
                    self.out.socket_errors += 1;
                    let now = Instant::now();
                    if now.duration_since(self.last_rotate) >= Duration::from_millis(20) {
                        self.rotate(now);
                        self.retry_all_now(now);
                        self.hello_due = self.hello_due.min(now);
                    }
                }
            }
        }
        let unanswered: Vec<Unanswered> = self
            .inflight
            .iter()
            .map(|(seq, r)| Unanswered {
                agent: self.index,
                seq: *seq,
                sent_us: self.t_us(r.first_sent),
            })
            .collect();
        self.out.unanswered = unanswered;
        self.out
    }
}
