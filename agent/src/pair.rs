//! The primary/backup link between two agents: its configuration and status types,
//! the heartbeat format ([`Beat`]), the pair file, and the link's sockets
//! (`PairLink`). What the heartbeats decide (failure detection, which side is
//! *active*, the takeover) is the state machine's (`machine/pairing.rs`).
//!
//! The link is a small UDP protocol of the agents' own (ASCII lines, see
//! [`Beat`]), not a cluster message: servers never see it, it changes nothing
//! in the cluster wire format, and a datagram of it is checked by the same
//! cluster secret (keyed BLAKE3 tag) when one is configured.
//!
//! Failure detection: fast, a refused or unreachable send on a connected UDP
//! socket (`PairLink` reads the kernel's report); slow, heartbeats missed for
//! `dead_ms`.

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

/// The link's sockets: one to receive the peer's heartbeats, one connected to the
/// peer's listen address to send them (a refused or unreachable send shows on it).
pub(crate) struct PairLink {
    /// Unconnected, non-blocking: receives the peer's heartbeats.
    listen: UdpSocket,
    local: SocketAddr,
    /// Connected to the peer's listen address, non-blocking.
    out: Option<(SocketAddr, UdpSocket)>,
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

impl PairLink {
    /// Binds the listen socket.
    pub(crate) fn bind(listen: SocketAddr) -> std::io::Result<PairLink> {
        let socket = UdpSocket::bind(listen)?;
        socket.set_nonblocking(true)?;
        let local = socket.local_addr()?;
        Ok(PairLink {
            listen: socket,
            local,
            out: None,
        })
    }

    /// The address heartbeats are received on.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Keeps the sending socket connected to `to` (a new one when it changes).
    pub(crate) fn connect(&mut self, to: Option<SocketAddr>) {
        let Some(to) = to else {
            return;
        };
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

    /// Reads what arrived (at most 64 datagrams), calling `f` for each.
    pub(crate) fn recv(&self, mut f: impl FnMut(SocketAddr, &[u8])) {
        let mut buf = [0u8; BEAT_BYTES_MAX + 1];
        for _ in 0..64 {
            match self.listen.recv_from(&mut buf) {
                Ok((n, from)) => f(from, &buf[..n]),
                Err(_) => break, // WouldBlock (or an error of no use here).
            }
        }
    }

    /// The error the kernel reported for earlier sends (ICMP), if any: it shows on the
    /// connected socket's receive (nothing is sent to it, so only errors come out).
    pub(crate) fn error(&self) -> Option<PeerLoss> {
        let (_, s) = self.out.as_ref()?;
        let mut buf = [0u8; 64];
        match s.recv(&mut buf) {
            Err(e) => classify(&e),
            Ok(_) => None,
        }
    }

    /// Sends a heartbeat to `to` on the connected socket; `None` when there is none
    /// (it could not be opened). The error's loss, if it is one.
    pub(crate) fn send(
        &mut self,
        to: SocketAddr,
        bytes: &[u8],
    ) -> Option<Result<(), Option<PeerLoss>>> {
        self.connect(Some(to));
        let (_, s) = self.out.as_ref()?;
        Some(s.send(bytes).map(|_| ()).map_err(|e| classify(&e)))
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

    #[test]
    fn a_send_to_a_closed_port_is_reported_refused() {
        let gone = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = gone.local_addr().unwrap();
        drop(gone);
        let mut link = PairLink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut seen = None;
        for _ in 0..50 {
            match link.send(to, b"x") {
                Some(Err(loss)) => seen = loss,
                _ => seen = seen.or(link.error()),
            }
            if seen.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(seen, Some(PeerLoss::Refused));
    }

    #[test]
    fn heartbeats_arrive_on_the_listen_socket() {
        let a = PairLink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut b = PairLink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let bytes = beat().encode(None);
        assert!(matches!(b.send(a.local_addr(), &bytes), Some(Ok(()))));
        let mut got = Vec::new();
        for _ in 0..100 {
            a.recv(|from, d| got.push((from, d.to_vec())));
            if !got.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(got.len(), 1);
        assert_eq!(Beat::decode(&got[0].1, None), Some(beat()));
    }
}
