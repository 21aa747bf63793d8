//! The primary/backup link between two agents: heartbeats carrying each
//! side's state, failure detection (fast: a refused or unreachable send on a
//! connected UDP socket; slow: heartbeats missed for `dead_ms`), and the
//! choice of which side is *active*.
//!
//! The link is a small UDP protocol of the agents' own (ASCII lines, see
//! [`Beat`]), not a cluster message: servers never see it, it changes nothing
//! in the cluster wire format, and a datagram of it is checked by the same
//! cluster secret (keyed BLAKE3 tag) when one is configured.
//!
//! Roles: each side is configured `Primary` or `Backup`. Which one is
//! *active* is decided here, by the same rules on both sides:
//!
//! - a side whose peer is dead (or was never heard from within `dead_ms` of
//!   its start) is active;
//! - a standby side stays standby while its peer is alive and active;
//! - two live standbys: the primary becomes active;
//! - two live actives (a healed partition, or a restarted side that heard
//!   nothing in its first `dead_ms`): the one that became active later
//!   yields (on a tie, the backup).
//!
//! So a restarted primary that hears its backup active rejoins as the
//! standby (no switch back: that would cost consumers a second switch).

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};

use unid_proto::{AuthKey, NodeId};

/// The most bytes of one heartbeat datagram (below the 1200-byte bound of
/// every unid datagram).
pub const BEAT_BYTES_MAX: usize = 1200;
/// The longest ring folder path a paired agent may have, in bytes.
pub const RING_DIR_BYTES_MAX: usize = 512;
/// The pair file each paired agent writes in its ring folder (a name no
/// sequence can have: it starts with a dot).
pub const PAIR_FILE: &str = ".unid-pair";
/// First line of every heartbeat.
const MAGIC: &str = "unid-pair 1";

/// Which side of a pair an agent is configured to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairRole {
    /// Active when both are healthy.
    Primary,
    /// Stands by; takes over when the primary dies.
    Backup,
}

impl PairRole {
    /// `primary` or `backup`.
    pub fn as_str(self) -> &'static str {
        match self {
            PairRole::Primary => "primary",
            PairRole::Backup => "backup",
        }
    }
}

/// How an agent pairs with another. Both sides need one.
#[derive(Clone, Debug)]
pub struct PairConfig {
    /// This side's role.
    pub role: PairRole,
    /// Where this side receives the peer's heartbeats (UDP). A backup may use
    /// port 0 (any): the primary learns its address from its heartbeats.
    pub listen: SocketAddr,
    /// The peer's `listen` address. Required for a backup (the primary it
    /// backs up, `--backup-of`); a primary learns its backup's.
    pub peer: Option<SocketAddr>,
    /// Heartbeat interval, ms (1..=1000). Default 10.
    pub heartbeat_ms: u64,
    /// The peer counts as dead after hearing nothing for this long, ms
    /// (at least 2 heartbeats, at most 60,000). Default 100.
    pub dead_ms: u64,
}

impl PairConfig {
    /// Defaults for `role` listening on `listen`.
    pub fn new(role: PairRole, listen: SocketAddr, peer: Option<SocketAddr>) -> PairConfig {
        PairConfig {
            role,
            listen,
            peer,
            heartbeat_ms: 10,
            dead_ms: 100,
        }
    }

    /// Checks every bound; the reason names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.role == PairRole::Backup && self.peer.is_none() {
            return Err("peer: a backup needs the primary's address (--backup-of)".into());
        }
        if !(1..=1000).contains(&self.heartbeat_ms) {
            return Err("heartbeat_ms must be in 1..=1000".into());
        }
        if self.dead_ms < 2 * self.heartbeat_ms || self.dead_ms > 60_000 {
            return Err("dead_ms must be in 2 * heartbeat_ms ..= 60000".into());
        }
        if self.peer == Some(self.listen) {
            return Err("peer must differ from listen".into());
        }
        Ok(())
    }
}

/// Why the peer counts as dead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerLoss {
    /// A send to it was refused (ICMP port unreachable: the process is gone).
    Refused,
    /// Host or network unreachable (ICMP, or no route).
    Unreachable,
    /// Nothing heard for `dead_ms`.
    MissedHeartbeats,
}

/// What this side knows of its peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerState {
    /// Never heard from.
    Unknown,
    /// Heartbeats arrive.
    Alive,
    /// Gone, and why (the fast signal or the slow one).
    Dead(PeerLoss),
}

/// The pair's line in [`crate::Status`].
#[derive(Clone, Debug, PartialEq)]
pub struct PairStatus {
    /// This side's configured role.
    pub role: PairRole,
    /// Whether this side is the active one.
    pub active: bool,
    /// Where this side listens for heartbeats.
    pub listen: SocketAddr,
    /// The peer's heartbeat address, once known.
    pub peer: Option<SocketAddr>,
    /// The peer's state.
    pub peer_state: PeerState,
    /// Whether the peer said it is active (last heartbeat).
    pub peer_active: bool,
    /// The peer's incarnation (changes when it restarts), 0 if unknown.
    pub peer_incarnation: u64,
    /// The peer's node id in the cluster, 0 if unknown.
    pub peer_node_id: NodeId,
    /// The peer's ring folder.
    pub peer_ring_dir: Option<PathBuf>,
    /// The peer's localhost socket.
    pub peer_socket: Option<SocketAddr>,
    /// Milliseconds since the peer was last heard, if ever.
    pub peer_heard_ms_ago: Option<u64>,
    /// Times this side became active after standing by.
    pub takeovers: u64,
}

/// One heartbeat: what a side tells its peer. Encoded as ASCII lines
/// `key value`: `unid-pair 1`, `role`, `incarnation`, `node`, `active`,
/// `connection`, `listen`, `socket`, then `seq NAME RATE HIGH` per sequence
/// (as many as fit), `ring_dir PATH` and, with a secret, `tag HEX` over
/// everything before it.
#[derive(Clone, Debug, PartialEq)]
pub struct Beat {
    /// The sender's role.
    pub role: PairRole,
    /// The sender's incarnation.
    pub incarnation: u64,
    /// The sender's node id (0 while registering).
    pub node_id: NodeId,
    /// Whether the sender is active.
    pub active: bool,
    /// When the sender became active (wall clock, µs since the Unix epoch;
    /// 0 when standing by).
    pub active_since_us: u64,
    /// The sender's cluster connection (`connected`, `unreachable`, ...).
    pub connection: String,
    /// The sender's heartbeat address (an unspecified IP means "the
    /// datagram's source IP").
    pub listen: SocketAddr,
    /// The sender's localhost socket.
    pub socket: Option<SocketAddr>,
    /// Per sequence: name, consumption rate (ids/s), end of the last block
    /// received (every id the sender holds is below it).
    pub sequences: Vec<(String, f64, u128)>,
    /// The sender's ring folder.
    pub ring_dir: PathBuf,
}

impl Beat {
    /// The datagram (at most [`BEAT_BYTES_MAX`] bytes: sequences that do not
    /// fit are left out).
    pub fn encode(&self, key: Option<&AuthKey>) -> Vec<u8> {
        use std::fmt::Write as _;
        let mut head = String::new();
        let _ = writeln!(head, "{MAGIC}");
        let _ = writeln!(head, "role {}", self.role.as_str());
        let _ = writeln!(head, "incarnation {}", self.incarnation);
        let _ = writeln!(head, "node {}", self.node_id);
        let _ = writeln!(head, "active {}", u8::from(self.active));
        let _ = writeln!(head, "active_since {}", self.active_since_us);
        let _ = writeln!(head, "connection {}", self.connection);
        let _ = writeln!(head, "listen {}", self.listen);
        match self.socket {
            Some(s) => {
                let _ = writeln!(head, "socket {s}");
            }
            None => head.push_str("socket off\n"),
        }
        let tail = format!("ring_dir {}\n", self.ring_dir.display());
        // Room for the tag line: "tag " + 64 hex + "\n".
        let budget = BEAT_BYTES_MAX - tail.len().min(BEAT_BYTES_MAX) - 69;
        for (name, rate, high) in &self.sequences {
            let line = format!("seq {name} {rate:.1} {high}\n");
            if head.len() + line.len() > budget {
                break;
            }
            head.push_str(&line);
        }
        head.push_str(&tail);
        if let Some(key) = key {
            let tag = key.tag(head.as_bytes());
            head.push_str("tag ");
            for b in tag {
                let _ = write!(head, "{b:02x}");
            }
            head.push('\n');
        }
        let mut out = head.into_bytes();
        out.truncate(BEAT_BYTES_MAX);
        out
    }

    /// Parses a datagram; `None` if it is not a well-formed heartbeat (or
    /// its tag is missing or wrong when `key` is given).
    pub fn decode(bytes: &[u8], key: Option<&AuthKey>) -> Option<Beat> {
        if bytes.len() > BEAT_BYTES_MAX {
            return None;
        }
        let text = std::str::from_utf8(bytes).ok()?;
        let (body, tag) = match text.rfind("tag ") {
            Some(at) if at > 0 && text.as_bytes()[at - 1] == b'\n' => {
                (&text[..at], Some(text[at + 4..].trim_end()))
            }
            _ => (text, None),
        };
        if let Some(key) = key {
            let tag = tag?;
            if tag.len() % 2 != 0 {
                return None;
            }
            let raw: Option<Vec<u8>> = (0..tag.len() / 2)
                .map(|i| u8::from_str_radix(tag.get(2 * i..2 * i + 2)?, 16).ok())
                .collect();
            if !key.verify(body.as_bytes(), &raw?) {
                return None;
            }
        }
        let mut lines = body.lines();
        if lines.next()? != MAGIC {
            return None;
        }
        let mut beat = Beat {
            role: PairRole::Primary,
            incarnation: 0,
            node_id: 0,
            active: false,
            active_since_us: 0,
            connection: String::new(),
            listen: "0.0.0.0:0".parse().expect("valid"),
            socket: None,
            sequences: Vec::new(),
            ring_dir: PathBuf::new(),
        };
        let mut seen_role = false;
        let mut seen_listen = false;
        for line in lines {
            let (k, v) = line.split_once(' ')?;
            match k {
                "role" => {
                    beat.role = match v {
                        "primary" => PairRole::Primary,
                        "backup" => PairRole::Backup,
                        _ => return None,
                    };
                    seen_role = true;
                }
                "incarnation" => beat.incarnation = v.parse().ok()?,
                "node" => beat.node_id = v.parse().ok()?,
                "active" => beat.active = v == "1",
                "active_since" => beat.active_since_us = v.parse().ok()?,
                "connection" => beat.connection = v.chars().take(32).collect(),
                "listen" => {
                    beat.listen = v.parse().ok()?;
                    seen_listen = true;
                }
                "socket" => beat.socket = v.parse().ok(),
                "seq" => {
                    let mut w = v.split(' ');
                    let name = w.next()?.to_owned();
                    let rate: f64 = w.next()?.parse().ok()?;
                    let high: u128 = w.next()?.parse().ok()?;
                    if !rate.is_finite() || rate < 0.0 || beat.sequences.len() >= 64 {
                        return None;
                    }
                    beat.sequences.push((name, rate, high));
                }
                "ring_dir" => beat.ring_dir = PathBuf::from(v),
                _ => {} // Unknown keys are ignored (newer peers).
            }
        }
        (seen_role && seen_listen && beat.incarnation != 0).then_some(beat)
    }
}

/// What changed in a tick, for the driver to act on.
#[derive(Debug, Default)]
pub(crate) struct PairEvents {
    /// This side just became active after standing by: fetch fresh blocks.
    pub(crate) took_over: bool,
    /// The pair file should be rewritten.
    pub(crate) file_dirty: bool,
}

/// Counters the link keeps (copied into [`crate::Metrics`] by the driver).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PairCounters {
    pub(crate) beats_sent: u64,
    pub(crate) beats_received: u64,
    pub(crate) beats_dropped: u64,
    pub(crate) send_errors: u64,
    pub(crate) losses_fast: u64,
    pub(crate) losses_slow: u64,
    pub(crate) takeovers: u64,
}

/// One side of the link.
pub(crate) struct Pair {
    config: PairConfig,
    key: Option<AuthKey>,
    /// Unconnected, non-blocking: receives the peer's heartbeats.
    listen: UdpSocket,
    local: SocketAddr,
    /// Connected to the peer's listen address, non-blocking: sends
    /// heartbeats; a refused or unreachable send shows on it.
    out: Option<(SocketAddr, UdpSocket)>,
    state: PeerState,
    peer: Option<Beat>,
    heard_us: Option<u64>,
    active: bool,
    /// Wall clock (µs) when this side became active, 0 while standing by.
    active_since_us: u64,
    started_us: u64,
    next_beat_us: u64,
    pub(crate) counters: PairCounters,
}

fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
        .max(1)
}

fn classify(e: &std::io::Error) -> Option<PeerLoss> {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Some(PeerLoss::Refused),
        std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable => {
            Some(PeerLoss::Unreachable)
        }
        _ => None,
    }
}

impl Pair {
    pub(crate) fn bind(
        config: PairConfig,
        key: Option<AuthKey>,
        now_us: u64,
    ) -> std::io::Result<Pair> {
        let listen = UdpSocket::bind(config.listen)?;
        listen.set_nonblocking(true)?;
        let local = listen.local_addr()?;
        let mut pair = Pair {
            key,
            listen,
            local,
            out: None,
            state: PeerState::Unknown,
            peer: None,
            heard_us: None,
            active: false,
            active_since_us: 0,
            started_us: now_us,
            next_beat_us: now_us,
            counters: PairCounters::default(),
            config,
        };
        if let Some(peer) = pair.config.peer {
            pair.connect(peer);
        }
        Ok(pair)
    }

    /// The address heartbeats are received on.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub(crate) fn is_active(&self) -> bool {
        self.active
    }

    pub(crate) fn role(&self) -> PairRole {
        self.config.role
    }

    pub(crate) fn peer(&self) -> Option<&Beat> {
        self.peer.as_ref()
    }

    fn connect(&mut self, to: SocketAddr) {
        if self.out.as_ref().is_some_and(|(a, _)| *a == to) {
            return;
        }
        let bind: SocketAddr = if to.is_ipv6() {
            "[::]:0".parse().expect("valid")
        } else {
            "0.0.0.0:0".parse().expect("valid")
        };
        let made = UdpSocket::bind(bind).and_then(|s| {
            s.connect(to)?;
            s.set_nonblocking(true)?;
            Ok(s)
        });
        match made {
            Ok(s) => {
                tracing::info!(peer = %to, "pair: sending heartbeats to the peer");
                self.out = Some((to, s));
            }
            Err(e) => tracing::warn!(peer = %to, "pair: cannot open a socket to the peer: {e}"),
        }
    }

    fn lose(&mut self, why: PeerLoss, events: &mut PairEvents) {
        if matches!(self.state, PeerState::Dead(_)) {
            return;
        }
        let was = self.state;
        self.state = PeerState::Dead(why);
        if was == PeerState::Alive {
            match why {
                PeerLoss::MissedHeartbeats => self.counters.losses_slow += 1,
                _ => self.counters.losses_fast += 1,
            }
            tracing::warn!(
                peer = ?self.out.as_ref().map(|o| o.0),
                "pair: peer lost ({why:?}){}",
                if matches!(why, PeerLoss::MissedHeartbeats) {
                    " (slow signal: no heartbeat)"
                } else {
                    " (fast signal: send error)"
                }
            );
        }
        events.file_dirty = true;
    }

    /// Sends a heartbeat when due, reads what arrived, judges the peer and
    /// decides who is active.
    pub(crate) fn tick(&mut self, now_us: u64, me: &mut Beat) -> PairEvents {
        let mut events = PairEvents::default();
        // Receive.
        let mut buf = [0u8; BEAT_BYTES_MAX + 1];
        for _ in 0..64 {
            match self.listen.recv_from(&mut buf) {
                Ok((n, from)) => self.on_beat(now_us, from, &buf[..n], &mut events),
                Err(_) => break, // WouldBlock (or an error of no use here).
            }
        }
        // Errors the kernel reported for earlier sends (ICMP) show on the
        // connected socket's recv.
        if let Some((_, s)) = &self.out {
            // Nothing is sent to it: only errors come out of it.
            if let Err(e) = s.recv(&mut buf)
                && let Some(why) = classify(&e)
            {
                self.counters.send_errors += 1;
                self.lose(why, &mut events);
            }
        }
        // Slow signal.
        let dead_us = self.config.dead_ms * 1000;
        match (self.state, self.heard_us) {
            (PeerState::Alive, Some(h)) if now_us.saturating_sub(h) > dead_us => {
                self.lose(PeerLoss::MissedHeartbeats, &mut events)
            }
            (PeerState::Unknown, _) if now_us.saturating_sub(self.started_us) > dead_us => {
                tracing::warn!("pair: no heartbeat from a peer since start");
                self.state = PeerState::Dead(PeerLoss::MissedHeartbeats);
                events.file_dirty = true;
            }
            _ => {}
        }
        // Who is active.
        let peer_active = self.peer.as_ref().is_some_and(|p| p.active);
        let peer_since = self.peer.as_ref().map_or(0, |p| p.active_since_us);
        let active = match self.state {
            PeerState::Dead(_) => true,
            PeerState::Unknown => false,
            PeerState::Alive => match (self.active, peer_active) {
                (false, true) => false,
                (false, false) => self.config.role == PairRole::Primary,
                (true, false) => true,
                // Both active: the later one yields; on a tie the backup.
                (true, true) => match self.active_since_us.cmp(&peer_since) {
                    std::cmp::Ordering::Less => true,
                    std::cmp::Ordering::Greater => false,
                    std::cmp::Ordering::Equal => self.config.role == PairRole::Primary,
                },
            },
        };
        if active != self.active {
            if active {
                tracing::warn!(
                    role = self.config.role.as_str(),
                    peer = ?self.state,
                    "pair: this agent is now ACTIVE"
                );
                if self.peer.is_some() {
                    events.took_over = true;
                    self.counters.takeovers += 1;
                }
            } else {
                tracing::info!(
                    role = self.config.role.as_str(),
                    "pair: the peer is active; this agent stands by"
                );
            }
            self.active = active;
            self.active_since_us = if active { wall_us() } else { 0 };
            events.file_dirty = true;
        }
        // Send.
        if now_us >= self.next_beat_us {
            self.next_beat_us = now_us + self.config.heartbeat_ms * 1000;
            me.active = self.active;
            me.active_since_us = self.active_since_us;
            me.listen = self.local;
            let bytes = me.encode(self.key.as_ref());
            if let Some((_, s)) = &self.out {
                match s.send(&bytes) {
                    Ok(_) => self.counters.beats_sent += 1,
                    Err(e) => {
                        self.counters.send_errors += 1;
                        if let Some(why) = classify(&e) {
                            self.lose(why, &mut events);
                        }
                    }
                }
            }
        }
        events
    }

    fn on_beat(&mut self, now_us: u64, from: SocketAddr, bytes: &[u8], events: &mut PairEvents) {
        let Some(mut beat) = Beat::decode(bytes, self.key.as_ref()) else {
            self.counters.beats_dropped += 1;
            return;
        };
        if beat.listen.ip().is_unspecified() {
            beat.listen = SocketAddr::new(from.ip(), beat.listen.port());
        }
        if let Some(peer) = self.config.peer
            && beat.listen != peer
        {
            // A backup hears only the primary it was configured with.
            self.counters.beats_dropped += 1;
            return;
        }
        self.counters.beats_received += 1;
        self.heard_us = Some(now_us);
        self.connect(beat.listen);
        let prev = self.peer.as_ref();
        if prev.is_some_and(|p| p.incarnation != beat.incarnation) {
            tracing::info!(
                incarnation = beat.incarnation,
                "pair: the peer restarted (new incarnation)"
            );
        }
        if prev.is_none_or(|p| {
            p.incarnation != beat.incarnation
                || p.active != beat.active
                || p.ring_dir != beat.ring_dir
                || p.socket != beat.socket
                || p.node_id != beat.node_id
        }) {
            events.file_dirty = true;
        }
        if self.state != PeerState::Alive {
            tracing::info!(peer = %beat.listen, role = beat.role.as_str(), active = beat.active, "pair: peer alive");
            self.state = PeerState::Alive;
            events.file_dirty = true;
        }
        self.peer = Some(beat);
    }

    pub(crate) fn status(&self, now_us: u64) -> PairStatus {
        let p = self.peer.as_ref();
        PairStatus {
            role: self.config.role,
            active: self.active,
            listen: self.local,
            peer: self.out.as_ref().map(|o| o.0).or(self.config.peer),
            peer_state: self.state,
            peer_active: p.is_some_and(|p| p.active) && self.state == PeerState::Alive,
            peer_incarnation: p.map_or(0, |p| p.incarnation),
            peer_node_id: p.map_or(0, |p| p.node_id),
            peer_ring_dir: p.map(|p| p.ring_dir.clone()),
            peer_socket: p.and_then(|p| p.socket),
            peer_heard_ms_ago: self.heard_us.map(|h| now_us.saturating_sub(h) / 1000),
            takeovers: self.counters.takeovers,
        }
    }

    /// The pair file's text: `key value` lines the client library reads to
    /// find the peer's ring folder.
    pub(crate) fn file_text(&self, me: &Beat) -> String {
        use std::fmt::Write as _;
        let mut t = String::new();
        let _ = writeln!(t, "role {}", self.config.role.as_str());
        let _ = writeln!(t, "active {}", u8::from(self.active));
        let _ = writeln!(t, "incarnation {}", me.incarnation);
        let _ = writeln!(t, "listen {}", self.local);
        if let Some(s) = me.socket {
            let _ = writeln!(t, "socket {s}");
        }
        let state = match self.state {
            PeerState::Unknown => "unknown",
            PeerState::Alive => "alive",
            PeerState::Dead(_) => "dead",
        };
        let _ = writeln!(t, "peer_state {state}");
        if let Some(p) = &self.peer {
            let _ = writeln!(t, "peer_active {}", u8::from(p.active));
            if let Some(s) = p.socket {
                let _ = writeln!(t, "peer_socket {s}");
            }
            let _ = writeln!(t, "peer_ring_dir {}", p.ring_dir.display());
        }
        t
    }
}

/// Writes `dir/.unid-pair` atomically (temporary file, then rename).
pub(crate) fn write_pair_file(dir: &Path, text: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".unid-pair.tmp.{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(PAIR_FILE))
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use super::*;

    fn beat() -> Beat {
        Beat {
            role: PairRole::Backup,
            incarnation: 7,
            node_id: 3,
            active: true,
            active_since_us: 1_700_000_000_000_000,
            connection: "connected".into(),
            listen: "127.0.0.1:7412".parse().unwrap(),
            socket: Some("127.0.0.1:7421".parse().unwrap()),
            sequences: vec![("orders".into(), 1234.5, 99), ("b".into(), 0.0, 1)],
            ring_dir: PathBuf::from("/dev/shm/unid b"),
        }
    }

    #[test]
    fn beat_round_trips_with_and_without_a_key() {
        let key = AuthKey::from_secret(b"s3cret");
        let b = beat();
        assert_eq!(Beat::decode(&b.encode(None), None), Some(b.clone()));
        let tagged = b.encode(Some(&key));
        assert_eq!(Beat::decode(&tagged, Some(&key)), Some(b.clone()));
        // Without the tag, or with another key, or altered: refused.
        assert_eq!(Beat::decode(&b.encode(None), Some(&key)), None);
        let other = AuthKey::from_secret(b"other");
        assert_eq!(Beat::decode(&tagged, Some(&other)), None);
        let mut bad = tagged.clone();
        bad[20] ^= 1;
        assert_eq!(Beat::decode(&bad, Some(&key)), None);
        assert_eq!(Beat::decode(b"garbage", None), None);
        assert_eq!(Beat::decode(&[0xff; 10], None), None);
    }

    #[test]
    fn beat_stays_below_the_datagram_bound() {
        let mut b = beat();
        b.sequences = (0..64)
            .map(|i| (format!("{i:0>64}"), f64::MAX, u128::MAX))
            .collect();
        b.ring_dir = PathBuf::from("/".repeat(RING_DIR_BYTES_MAX));
        let key = AuthKey::from_secret(b"k");
        let bytes = b.encode(Some(&key));
        assert!(bytes.len() <= BEAT_BYTES_MAX, "{}", bytes.len());
        let back = Beat::decode(&bytes, Some(&key)).unwrap();
        assert!(!back.sequences.is_empty() && back.sequences.len() < 64);
        assert_eq!(back.ring_dir, b.ring_dir);
    }

    /// Runs both sides on a fake clock for `ms` milliseconds.
    fn run(a: &mut Pair, b: Option<&mut Pair>, from_ms: u64, ms: u64) -> (bool, bool) {
        let (mut ta, mut tb) = (false, false);
        let mut ma = me(a, a.config.role, 1);
        let mut b = b;
        let mut mb = b.as_ref().map(|b| me(b, b.config.role, 2));
        for t in from_ms..from_ms + ms {
            ta |= a.tick(t * 1000, &mut ma).took_over;
            if let (Some(b), Some(mb)) = (b.as_deref_mut(), mb.as_mut()) {
                tb |= b.tick(t * 1000, mb).took_over;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        (ta, tb)
    }

    #[test]
    fn primary_active_backup_stands_by_and_takes_over_when_the_primary_goes() {
        let mut primary = pair(PairRole::Primary, None);
        let mut backup = pair(PairRole::Backup, Some(primary.local_addr()));
        run(&mut primary, Some(&mut backup), 0, 30);
        assert!(primary.is_active());
        assert!(!backup.is_active());
        assert_eq!(backup.status(30_000).peer_state, PeerState::Alive);
        assert_eq!(
            primary.status(30_000).peer_ring_dir,
            Some(PathBuf::from("/tmp/backup"))
        );
        // The primary's process goes: its port refuses.
        drop(primary);
        let (took, _) = run(&mut backup, None, 30, 20);
        assert!(took, "backup took over");
        assert!(backup.is_active());
        assert_eq!(
            backup.status(50_000).peer_state,
            PeerState::Dead(PeerLoss::Refused),
            "the fast signal, well before dead_ms"
        );
        assert_eq!(backup.counters.losses_fast, 1);
    }

    #[test]
    fn silent_peer_is_lost_by_missed_heartbeats_and_a_returning_primary_stands_by() {
        let mut primary = pair(PairRole::Primary, None);
        let listen = primary.local_addr();
        let mut backup = pair(PairRole::Backup, Some(listen));
        run(&mut primary, Some(&mut backup), 0, 20);
        assert!(!backup.is_active());
        // The primary stops ticking (frozen, cut off): no ICMP, only silence.
        let (took, _) = run(&mut backup, None, 20, 80);
        assert!(took);
        assert_eq!(
            backup.status(100_000).peer_state,
            PeerState::Dead(PeerLoss::MissedHeartbeats)
        );
        assert_eq!(backup.counters.losses_slow, 1);
        // A restarted primary (same address, new incarnation) hears an
        // active backup and stands by; the backup stays active.
        drop(primary);
        let mut c = PairConfig::new(PairRole::Primary, listen, None);
        c.heartbeat_ms = 1;
        c.dead_ms = 50;
        let mut again = Pair::bind(c, None, 100_000).unwrap();
        let (a, b) = run(&mut again, Some(&mut backup), 100, 30);
        assert!(!a && !b);
        assert!(!again.is_active());
        assert!(backup.is_active());
        assert_eq!(again.status(130_000).peer_state, PeerState::Alive);
    }
}

#[cfg(test)]
mod both_active {
    use super::tests_support::*;
    use super::*;

    #[test]
    fn a_restarted_primary_that_heard_nothing_at_first_yields_to_the_active_backup() {
        let mut backup_side = pair(PairRole::Backup, None);
        // The backup is active (its primary died long ago).
        let (mut b, _) = (me(&backup_side, PairRole::Backup, 2), ());
        for t in 0..60 {
            backup_side.tick(t * 1000, &mut b);
        }
        assert!(backup_side.is_active());
        // A primary comes up at an address the backup does not send to yet,
        // hears nothing for dead_ms and becomes active too.
        let mut primary = pair(PairRole::Primary, None);
        let mut p = me(&primary, PairRole::Primary, 1);
        for t in 0..60 {
            primary.tick(t * 1000, &mut p);
        }
        assert!(primary.is_active());
        // Now they meet: the primary (active later) yields.
        primary.connect(backup_side.local_addr());
        backup_side.connect(primary.local_addr());
        for t in 60..90 {
            primary.tick(t * 1000, &mut p);
            backup_side.tick(t * 1000, &mut b);
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        assert!(!primary.is_active());
        assert!(backup_side.is_active());
    }
}

#[cfg(test)]
mod tests_support {
    use super::*;

    pub(super) fn pair(role: PairRole, peer: Option<SocketAddr>) -> Pair {
        let mut c = PairConfig::new(role, "127.0.0.1:0".parse().unwrap(), peer);
        c.heartbeat_ms = 1;
        c.dead_ms = 50;
        Pair::bind(c, None, 0).unwrap()
    }

    pub(super) fn me(p: &Pair, role: PairRole, incarnation: u64) -> Beat {
        Beat {
            role,
            incarnation,
            node_id: 1,
            active: false,
            active_since_us: 0,
            connection: "connected".into(),
            listen: p.local_addr(),
            socket: None,
            sequences: Vec::new(),
            ring_dir: PathBuf::from(format!("/tmp/{}", role.as_str())),
        }
    }
}
