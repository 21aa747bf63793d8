//! `--proxy`: a user-space UDP proxy between the agents (simulated and real) and the servers,
//! for the datagram faults this kernel cannot make (no netem): drop, duplicate, reorder,
//! delay, corrupt, each a probability per datagram and direction, changeable while it runs
//! (the `proxy` nemesis turns a burst on and off).
//!
//! It listens on one front port per server. Each client (source address) seen on a front
//! gets its own upstream socket connected to that server, so the server sees one address per
//! client (its rate buckets and agent table stay per client) and answers come back to the
//! right one. Server addresses in answers (`Welcome`, `NotLeader`, `LeaderChange`,
//! `NodeTable`) are rewritten to the matching front, so a redirected client stays behind the
//! proxy. Every `BlockGrant` a server sends is recorded as it left the server (before any
//! fault): the checker's view of what was granted, real agents included.

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use unid_loadgen::checker::Grant;
use unid_proto::{Codec, DATAGRAM_BYTES_MAX, List, Message, Node, Server, decode};

/// Most clients per front port.
pub const CLIENTS_MAX: usize = 1_024;
/// Longest delay, in ms.
pub const DELAY_MS_MAX: u64 = 10_000;
/// Most datagrams held back (delayed) per direction of a client; beyond, they are sent.
const HELD_MAX: usize = 4_096;
/// How long a proxy thread blocks before it looks at its queues and the stop flag.
const POLL: Duration = Duration::from_millis(20);
/// Longest a reordered datagram waits for the next one to pass it.
const HOLD_MAX: Duration = Duration::from_millis(5);

/// Datagram faults, probabilities per datagram and direction.
#[derive(Copy, Clone, Debug, Default, PartialEq)]
pub struct ProxyFaults {
    /// Lost.
    pub drop: f64,
    /// Sent twice.
    pub duplicate: f64,
    /// Held back and sent after the next one (or after 5 ms if none comes).
    pub reorder: f64,
    /// Held back for `delay_ms` (0.5x to 1.5x).
    pub delay: f64,
    /// The delay.
    pub delay_ms: u64,
    /// One random bit flipped.
    pub corrupt: f64,
}

impl ProxyFaults {
    fn any(&self) -> bool {
        self.drop > 0.0
            || self.duplicate > 0.0
            || self.reorder > 0.0
            || (self.delay > 0.0 && self.delay_ms > 0)
            || self.corrupt > 0.0
    }
}

/// Counters: datagrams forwarded, then dropped, duplicated, reordered, delayed, corrupted.
#[derive(Default)]
pub struct ProxyStats {
    /// Forwarded (both ways).
    pub forwarded: AtomicU64,
    /// Faults applied, in the order of [`ProxyFaults`]' fields (delay counted once).
    pub faults: [AtomicU64; 5],
    /// Answers whose server addresses were rewritten.
    pub rewritten: AtomicU64,
    /// Clients refused beyond [`CLIENTS_MAX`].
    pub refused: AtomicU64,
}

struct Inner {
    stop: AtomicBool,
    faults: Mutex<ProxyFaults>,
    /// Each server's address → its front.
    to_front: HashMap<SocketAddr, SocketAddr>,
    grants: Mutex<Vec<Grant>>,
    /// Each client's name, from its first `Hello` (client id → name).
    names: Mutex<HashMap<u32, String>>,
    stats: ProxyStats,
    start: Instant,
    seed: u64,
    clients: AtomicU64,
}

/// A running proxy; stopped on drop.
pub struct Proxy {
    fronts: Vec<SocketAddr>,
    inner: Arc<Inner>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

/// One direction's fault machinery.
struct Link {
    rng: SmallRng,
    held: Option<(Instant, Vec<u8>, SocketAddr)>,
    delayed: VecDeque<(Instant, Vec<u8>, SocketAddr)>,
}

impl Link {
    fn new(seed: u64) -> Link {
        Link {
            rng: SmallRng::seed_from_u64(seed),
            held: None,
            delayed: VecDeque::new(),
        }
    }

    /// Sends `data` to `to` (None: the connected peer) through the faults.
    fn send(&mut self, inner: &Inner, sock: &UdpSocket, mut data: Vec<u8>, to: Option<SocketAddr>) {
        let f = *inner.faults.lock().expect("not poisoned");
        let st = &inner.stats;
        st.forwarded.fetch_add(1, Ordering::Relaxed);
        let to_addr = to.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        if !f.any() {
            put(sock, &data, to);
            self.flush(sock, true);
            return;
        }
        if self.rng.random_bool(f.drop.clamp(0.0, 1.0)) {
            st.faults[0].fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.rng.random_bool(f.corrupt.clamp(0.0, 1.0)) && !data.is_empty() {
            st.faults[4].fetch_add(1, Ordering::Relaxed);
            let i = self.rng.random_range(0..data.len());
            data[i] ^= 1 << self.rng.random_range(0..8);
        }
        let copies = if self.rng.random_bool(f.duplicate.clamp(0.0, 1.0)) {
            st.faults[1].fetch_add(1, Ordering::Relaxed);
            2
        } else {
            1
        };
        if f.delay_ms > 0
            && self.rng.random_bool(f.delay.clamp(0.0, 1.0))
            && self.delayed.len() < HELD_MAX
        {
            st.faults[3].fetch_add(1, Ordering::Relaxed);
            let ms = self.rng.random_range(f.delay_ms / 2..=f.delay_ms * 3 / 2);
            let due = Instant::now() + Duration::from_millis(ms.min(DELAY_MS_MAX));
            for _ in 0..copies {
                self.delayed.push_back((due, data.clone(), to_addr));
            }
            // Keep the queue in due order (delays differ): a sort of a short queue.
            self.delayed.make_contiguous().sort_by_key(|d| d.0);
            return;
        }
        if self.held.is_none() && self.rng.random_bool(f.reorder.clamp(0.0, 1.0)) {
            st.faults[2].fetch_add(1, Ordering::Relaxed);
            self.held = Some((Instant::now() + HOLD_MAX, data, to_addr));
            return;
        }
        for _ in 0..copies {
            put(sock, &data, to);
        }
        // This one went past the held one: now the held one.
        self.flush(sock, true);
    }

    /// Sends the delayed datagrams that are due, and with `passed` (another datagram went
    /// out after it, or the link is idle) the reordered one.
    fn flush(&mut self, sock: &UdpSocket, passed: bool) {
        let now = Instant::now();
        if self.held.as_ref().is_some_and(|h| passed || h.0 <= now)
            && let Some((_, d, to)) = self.held.take()
        {
            put(sock, &d, (to.port() != 0).then_some(to));
        }
        while self.delayed.front().is_some_and(|d| d.0 <= now) {
            let (_, d, to) = self.delayed.pop_front().expect("checked");
            put(sock, &d, (to.port() != 0).then_some(to));
        }
    }

    fn next_due(&self) -> Option<Instant> {
        let held = self.held.as_ref().map(|h| h.0);
        let delayed = self.delayed.front().map(|d| d.0);
        held.into_iter().chain(delayed).min()
    }
}

fn put(sock: &UdpSocket, data: &[u8], to: Option<SocketAddr>) {
    // A full buffer or an ICMP error: the senders' retransmits cover it.
    let _ = match to {
        Some(t) => sock.send_to(data, t),
        None => sock.send(data),
    };
}

fn recv_timeout(link: &Link) -> Duration {
    link.next_due()
        .map(|d| {
            d.saturating_duration_since(Instant::now())
                .clamp(Duration::from_micros(100), POLL)
        })
        .unwrap_or(POLL)
}

impl Proxy {
    /// Starts a front on 127.0.0.1 for each of `servers` (ports from `given`).
    pub fn start(
        servers: &[SocketAddr],
        faults: ProxyFaults,
        seed: u64,
        start: Instant,
        given: &mut std::collections::HashSet<u16>,
    ) -> anyhow::Result<Proxy> {
        let mut socks = Vec::new();
        let mut to_front = HashMap::new();
        for s in servers {
            let port = crate::cluster::free_port(given)?;
            let sock = UdpSocket::bind(("127.0.0.1", port))
                .with_context(|| format!("bind proxy front 127.0.0.1:{port}"))?;
            sock.set_read_timeout(Some(POLL))?;
            to_front.insert(*s, sock.local_addr()?);
            socks.push((sock, *s));
        }
        let inner = Arc::new(Inner {
            stop: AtomicBool::new(false),
            faults: Mutex::new(faults),
            to_front,
            grants: Mutex::new(Vec::new()),
            names: Mutex::new(HashMap::new()),
            stats: ProxyStats::default(),
            start,
            seed,
            clients: AtomicU64::new(0),
        });
        let threads = Arc::new(Mutex::new(Vec::new()));
        let mut fronts = Vec::new();
        for (i, (sock, server)) in socks.into_iter().enumerate() {
            fronts.push(sock.local_addr()?);
            let inner2 = inner.clone();
            let threads2 = threads.clone();
            let h = std::thread::Builder::new()
                .name(format!("proxy-front-{i}"))
                .spawn(move || front_loop(Arc::new(sock), server, inner2, threads2))
                .context("spawn a proxy thread")?;
            threads.lock().expect("not poisoned").push(h);
        }
        Ok(Proxy {
            fronts,
            inner,
            threads,
        })
    }

    /// The fronts, in the order of the servers given to [`Proxy::start`].
    pub fn fronts(&self) -> Vec<SocketAddr> {
        self.fronts.clone()
    }

    /// Changes the faults from now on.
    pub fn set_faults(&self, f: ProxyFaults) {
        *self.inner.faults.lock().expect("not poisoned") = f;
    }

    /// The faults now.
    pub fn faults(&self) -> ProxyFaults {
        *self.inner.faults.lock().expect("not poisoned")
    }

    /// The counters.
    pub fn stats(&self) -> &ProxyStats {
        &self.inner.stats
    }

    /// Stops the threads and returns every grant the servers sent through the proxy (its
    /// `agent` is the proxy's client id), and the clients' names (from their `Hello`).
    pub fn finish(self) -> (Vec<Grant>, HashMap<u32, String>) {
        self.inner.stop.store(true, Ordering::Relaxed);
        let threads = std::mem::take(&mut *self.threads.lock().expect("not poisoned"));
        for h in threads {
            let _ = h.join();
        }
        // Upstream threads spawned while joining.
        let late = std::mem::take(&mut *self.threads.lock().expect("not poisoned"));
        for h in late {
            let _ = h.join();
        }
        let grants = std::mem::take(&mut *self.inner.grants.lock().expect("not poisoned"));
        let names = std::mem::take(&mut *self.inner.names.lock().expect("not poisoned"));
        (grants, names)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
    }
}

fn front_loop(
    front: Arc<UdpSocket>,
    server: SocketAddr,
    inner: Arc<Inner>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    // Per client: its upstream socket, its link, its id, and whether its name is known.
    let mut ups: HashMap<SocketAddr, (Arc<UdpSocket>, Link, u32, bool)> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    while !inner.stop.load(Ordering::Relaxed) {
        let timeout = ups
            .values()
            .map(|(_, l, _, _)| recv_timeout(l))
            .min()
            .unwrap_or(POLL);
        let _ = front.set_read_timeout(Some(timeout));
        let got = front.recv_from(&mut buf);
        if let Ok((n, client)) = got {
            if !ups.contains_key(&client) {
                if ups.len() >= CLIENTS_MAX {
                    inner.stats.refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let Ok(up) = UdpSocket::bind("127.0.0.1:0").and_then(|u| {
                    u.connect(server)?;
                    u.set_read_timeout(Some(POLL))?;
                    Ok(u)
                }) else {
                    continue;
                };
                let up = Arc::new(up);
                let id = inner.clients.fetch_add(1, Ordering::Relaxed);
                let (up2, front2, inner2) = (up.clone(), front.clone(), inner.clone());
                if let Ok(h) = std::thread::Builder::new()
                    .name(format!("proxy-up-{id}"))
                    .spawn(move || upstream_loop(up2, front2, client, id as u32, inner2))
                {
                    threads.lock().expect("not poisoned").push(h);
                }
                let seed = inner.seed ^ (id + 1).wrapping_mul(0xA076_1D64_78BD_642F);
                ups.insert(client, (up, Link::new(seed), id as u32, false));
            }
            let (up, link, id, named) = ups.get_mut(&client).expect("inserted above");
            if !*named
                && let Ok(frame) = decode(&buf[..n], None)
                && let Message::Hello { name, .. } = frame.message
            {
                inner
                    .names
                    .lock()
                    .expect("not poisoned")
                    .insert(*id, name.to_owned());
                *named = true;
            }
            link.send(&inner, up, buf[..n].to_vec(), None);
        }
        for (up, link, _, _) in ups.values_mut() {
            link.flush(up, got.is_err());
        }
    }
}

fn upstream_loop(
    up: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    id: u32,
    inner: Arc<Inner>,
) {
    let mut link = Link::new(inner.seed ^ u64::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 1);
    let mut buf = vec![0u8; 65_536];
    let mut codec = Codec::new();
    let front_addr = front.local_addr().ok();
    while !inner.stop.load(Ordering::Relaxed) {
        let _ = up.set_read_timeout(Some(recv_timeout(&link)));
        match up.recv(&mut buf) {
            Ok(n) => {
                let data = rewrite(&inner, &mut codec, &buf[..n], id, front_addr);
                link.send(&inner, &front, data, Some(client));
            }
            Err(_) => link.flush(&front, true),
        }
    }
}

/// Records a grant, and rewrites server addresses to their fronts; otherwise the datagram
/// unchanged.
fn rewrite(
    inner: &Inner,
    codec: &mut Codec,
    data: &[u8],
    client: u32,
    front: Option<SocketAddr>,
) -> Vec<u8> {
    let Ok(frame) = decode(data, None) else {
        return data.to_vec();
    };
    let h = frame.header;
    let map = |a: SocketAddr| inner.to_front.get(&a).copied().unwrap_or(a);
    let map_servers = |l: &List<'_, Server>| -> Vec<Server> {
        l.iter()
            .map(|s| Server {
                id: s.id,
                addr: map(s.addr),
            })
            .collect()
    };
    let mut out = [0u8; DATAGRAM_BYTES_MAX];
    let encoded = match frame.message {
        Message::BlockGrant { width, block, .. } => {
            let t_us = inner.start.elapsed().as_micros() as u64;
            inner.grants.lock().expect("not poisoned").push(Grant {
                agent: client,
                seq: h.reply_to,
                first: block.first(),
                count: block.count(),
                width,
                t_us,
                epoch: h.epoch,
                from: front.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
                floor: 0,
                sent_us: 0,
            });
            return data.to_vec();
        }
        Message::Welcome {
            node_id,
            lease_ms,
            servers,
            truncated,
        } => {
            let s = map_servers(&servers);
            codec.encode(
                &h,
                &Message::Welcome {
                    node_id,
                    lease_ms,
                    servers: List::new(&s),
                    truncated,
                },
                None,
                &mut out,
            )
        }
        Message::NotLeader {
            leader_id,
            leader,
            servers,
            truncated,
        } => {
            let s = map_servers(&servers);
            codec.encode(
                &h,
                &Message::NotLeader {
                    leader_id,
                    leader: leader.map(map),
                    servers: List::new(&s),
                    truncated,
                },
                None,
                &mut out,
            )
        }
        Message::LeaderChange {
            leader_id,
            leader,
            servers,
            truncated,
        } => {
            let s = map_servers(&servers);
            codec.encode(
                &h,
                &Message::LeaderChange {
                    leader_id,
                    leader: map(leader),
                    servers: List::new(&s),
                    truncated,
                },
                None,
                &mut out,
            )
        }
        Message::NodeTable {
            version,
            page,
            page_count,
            nodes,
        } => {
            let n: Vec<Node> = nodes
                .iter()
                .map(|x| Node {
                    addr: map(x.addr),
                    ..x
                })
                .collect();
            codec.encode(
                &h,
                &Message::NodeTable {
                    version,
                    page,
                    page_count,
                    nodes: List::new(&n),
                },
                None,
                &mut out,
            )
        }
        _ => return data.to_vec(),
    };
    match encoded {
        Ok(n) => {
            inner.stats.rewritten.fetch_add(1, Ordering::Relaxed);
            out[..n].to_vec()
        }
        Err(_) => data.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use unid_proto::{Block, Header, Width};

    fn inner(faults: ProxyFaults, to_front: HashMap<SocketAddr, SocketAddr>) -> Inner {
        Inner {
            stop: AtomicBool::new(false),
            faults: Mutex::new(faults),
            to_front,
            grants: Mutex::new(Vec::new()),
            names: Mutex::new(HashMap::new()),
            stats: ProxyStats::default(),
            start: Instant::now(),
            seed: 1,
            clients: AtomicU64::new(0),
        }
    }

    /// A sender and a receiver on 127.0.0.1; what the receiver gets within `wait`.
    fn pair() -> (UdpSocket, UdpSocket) {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        (tx, rx)
    }

    fn drain(rx: &UdpSocket) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok(n) = rx.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
    }

    #[test]
    fn each_fault_does_what_it_says() {
        let one = |f: ProxyFaults| {
            let (tx, rx) = pair();
            let inner = inner(f, HashMap::new());
            let mut link = Link::new(3);
            link.send(&inner, &tx, b"first".to_vec(), None);
            link.send(&inner, &tx, b"second".to_vec(), None);
            std::thread::sleep(Duration::from_millis(40));
            link.flush(&tx, true);
            (
                drain(&rx),
                inner
                    .stats
                    .faults
                    .each_ref()
                    .map(|a| a.load(Ordering::Relaxed)),
            )
        };
        let (got, _) = one(ProxyFaults::default());
        assert_eq!(got, vec![b"first".to_vec(), b"second".to_vec()]);
        let (got, n) = one(ProxyFaults {
            drop: 1.0,
            ..Default::default()
        });
        assert!(got.is_empty());
        assert_eq!(n[0], 2);
        let (got, n) = one(ProxyFaults {
            duplicate: 1.0,
            ..Default::default()
        });
        assert_eq!(got.len(), 4);
        assert_eq!(n[1], 2);
        let (got, n) = one(ProxyFaults {
            reorder: 1.0,
            ..Default::default()
        });
        assert_eq!(got, vec![b"second".to_vec(), b"first".to_vec()]);
        assert_eq!(n[2], 1);
        let (got, n) = one(ProxyFaults {
            corrupt: 1.0,
            ..Default::default()
        });
        assert_eq!(got.len(), 2);
        assert_ne!(got[0], b"first".to_vec());
        assert_eq!(got[0].len(), 5);
        assert_eq!(n[4], 2);
        // Delayed: nothing at once, both after the delay.
        let (tx, rx) = pair();
        let inner = inner(
            ProxyFaults {
                delay: 1.0,
                delay_ms: 20,
                ..Default::default()
            },
            HashMap::new(),
        );
        let mut link = Link::new(3);
        link.send(&inner, &tx, b"late".to_vec(), None);
        link.flush(&tx, false);
        assert!(drain(&rx).is_empty());
        std::thread::sleep(Duration::from_millis(35));
        link.flush(&tx, false);
        assert_eq!(drain(&rx), vec![b"late".to_vec()]);
    }

    #[test]
    fn server_addresses_are_rewritten_and_grants_recorded() {
        let server: SocketAddr = "127.0.0.1:7401".parse().unwrap();
        let front: SocketAddr = "127.0.0.1:9401".parse().unwrap();
        let inner = inner(ProxyFaults::default(), HashMap::from([(server, front)]));
        let mut codec = Codec::new();
        let h = Header {
            sender: 1,
            seq: 5,
            reply_to: 4,
            epoch: 2,
        };
        let servers = [Server {
            id: 1,
            addr: server,
        }];
        let mut buf = [0u8; DATAGRAM_BYTES_MAX];
        let msg = Message::NotLeader {
            leader_id: 1,
            leader: Some(server),
            servers: List::new(&servers),
            truncated: false,
        };
        let n = codec.encode(&h, &msg, None, &mut buf).unwrap();
        let out = rewrite(&inner, &mut codec, &buf[..n], 0, Some(front));
        let frame = decode(&out, None).unwrap();
        assert_eq!(frame.header, h);
        match frame.message {
            Message::NotLeader {
                leader, servers, ..
            } => {
                assert_eq!(leader, Some(front));
                assert_eq!(servers.iter().next().unwrap().addr, front);
            }
            other => panic!("{other:?}"),
        }
        let grant = Message::BlockGrant {
            sequence: "s",
            width: Width::W8,
            block: Block::new(100, 10, Width::W8).unwrap(),
        };
        let n = codec.encode(&h, &grant, None, &mut buf).unwrap();
        let out = rewrite(&inner, &mut codec, &buf[..n], 7, Some(front));
        assert_eq!(out, buf[..n].to_vec());
        let g = inner.grants.lock().unwrap();
        assert_eq!(
            (g[0].agent, g[0].seq, g[0].first, g[0].count),
            (7, 4, 100, 10)
        );
        assert_eq!(g[0].from, front);
    }
}
