//! Pairing with a backup (or primary) agent: the peer's heartbeats in, this side's out,
//! failure detection (fast: a refused or unreachable send, reported by the I/O side;
//! slow: heartbeats missed for `dead_ms`), which side is *active*, and the takeover: fresh
//! blocks sized from the peer's rate (`take_over`). The heartbeat format is `pair::Beat`;
//! the sockets are the driver's (`pair::PairLink`).
//!
//! Which side is active is decided by the same rules on both sides:
//!
//! - a side whose peer is dead (or was never heard from within `dead_ms` of its start) is
//!   active;
//! - a standby side stays standby while its peer is alive and active;
//! - two live standbys: the primary becomes active;
//! - two live actives (a healed partition, or a restarted side that heard nothing in its
//!   first `dead_ms`): the one that became active later yields (on a tie, the backup).
//!
//! So a restarted primary that hears its backup active rejoins as the standby (no switch
//! back: that would cost consumers a second switch).

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::pair::{Beat, PairConfig, PairRole, PairStatus, PeerLoss, PeerState};

use super::{Machine, Output, Transmit};

/// How an agent pairs: its [`PairConfig`], plus what the I/O side knows once bound.
#[derive(Clone, Debug)]
pub struct PairSetup {
    /// Role, peer, heartbeat and dead times.
    pub config: PairConfig,
    /// The address heartbeats are received on (the real port when the configured one
    /// was 0); heartbeats tell the peer.
    pub listen: SocketAddr,
    /// This agent's ring folder; heartbeats tell the peer (its consumers switch to it).
    pub ring_dir: PathBuf,
}

/// One side of the pair.
pub(super) struct Pairing {
    setup: PairSetup,
    /// Where heartbeats go: the configured peer, then the `listen` the peer's
    /// heartbeats carry.
    peer_addr: Option<SocketAddr>,
    state: PeerState,
    peer: Option<Beat>,
    heard_us: Option<u64>,
    active: bool,
    /// Wall clock (µs) when this side became active, 0 while standing by.
    active_since_us: u64,
    started_us: u64,
    next_beat_us: u64,
    /// The pair file should be rewritten.
    file_dirty: bool,
    /// A heartbeat waiting for `poll_pair_transmit`.
    beat_out: Option<Vec<u8>>,
}

impl Pairing {
    pub(super) fn new(setup: PairSetup, now_us: u64) -> Pairing {
        Pairing {
            peer_addr: setup.config.peer,
            setup,
            state: PeerState::Unknown,
            peer: None,
            heard_us: None,
            active: false,
            active_since_us: 0,
            started_us: now_us,
            next_beat_us: now_us,
            file_dirty: false,
            beat_out: None,
        }
    }

    /// Reports the pairing timers to `add`.
    pub(super) fn timers(&self, add: &mut impl FnMut(u64)) {
        add(self.next_beat_us);
        let dead_us = self.setup.config.dead_ms * 1000;
        match (self.state, self.heard_us) {
            (PeerState::Alive, Some(h)) => add(h + dead_us + 1),
            (PeerState::Unknown, _) => add(self.started_us + dead_us + 1),
            _ => {}
        }
    }
}

impl Machine {
    /// The pair's line in the status, if paired.
    pub fn pair_status(&self, now_us: u64) -> Option<PairStatus> {
        let p = self.pairing.as_ref()?;
        let peer = p.peer.as_ref();
        Some(PairStatus {
            role: p.setup.config.role,
            active: p.active,
            listen: p.setup.listen,
            peer: p.peer_addr,
            peer_state: p.state,
            peer_active: peer.is_some_and(|b| b.active) && p.state == PeerState::Alive,
            peer_incarnation: peer.map_or(0, |b| b.incarnation),
            peer_node_id: peer.map_or(0, |b| b.node_id),
            peer_ring_dir: peer.map(|b| b.ring_dir.clone()),
            peer_socket: peer.and_then(|b| b.socket),
            peer_heard_ms_ago: p.heard_us.map(|h| now_us.saturating_sub(h) / 1000),
            takeovers: self.counters.takeovers,
        })
    }

    /// Whether this agent serves (always, unless paired and standing by).
    pub fn is_active(&self) -> bool {
        self.pairing.as_ref().is_none_or(|p| p.active)
    }

    /// Where heartbeats go now, if paired and known: the I/O side keeps a connected
    /// socket to it (so the kernel's errors for it can be read and reported with
    /// [`handle_pair_error`](Self::handle_pair_error)).
    pub fn pair_peer(&self) -> Option<SocketAddr> {
        self.pairing.as_ref()?.peer_addr
    }

    /// The address of the localhost socket, told to the peer (its clients fall back to
    /// it), once bound.
    pub fn set_local_socket(&mut self, socket: Option<SocketAddr>) {
        self.local_socket = socket;
    }

    /// A datagram on the pair link from `from`, as received. Call
    /// [`handle_timeout`](Self::handle_timeout) after a batch of them: the decision runs
    /// there.
    pub fn handle_pair_datagram(&mut self, now_us: u64, from: SocketAddr, bytes: &[u8]) {
        let Some(p) = &mut self.pairing else {
            return;
        };
        let Some(mut beat) = Beat::decode(bytes, self.config.key.as_ref()) else {
            self.counters.peer_beats_dropped += 1;
            return;
        };
        if beat.listen.ip().is_unspecified() {
            beat.listen = SocketAddr::new(from.ip(), beat.listen.port());
        }
        if let Some(peer) = p.setup.config.peer
            && beat.listen != peer
        {
            // A backup hears only the primary it was configured with.
            self.counters.peer_beats_dropped += 1;
            return;
        }
        self.counters.peer_beats_received += 1;
        p.heard_us = Some(now_us);
        p.peer_addr = Some(beat.listen);
        let prev = p.peer.as_ref();
        if prev.is_some_and(|b| b.incarnation != beat.incarnation) {
            tracing::info!(
                incarnation = beat.incarnation,
                "pair: the peer restarted (new incarnation)"
            );
        }
        if prev.is_none_or(|b| {
            b.incarnation != beat.incarnation
                || b.active != beat.active
                || b.ring_dir != beat.ring_dir
                || b.socket != beat.socket
                || b.node_id != beat.node_id
        }) {
            p.file_dirty = true;
        }
        if p.state != PeerState::Alive {
            tracing::info!(peer = %beat.listen, role = beat.role.as_str(), active = beat.active, "pair: peer alive");
            p.state = PeerState::Alive;
            p.file_dirty = true;
        }
        p.peer = Some(beat);
    }

    /// The kernel reported an error on the socket to the peer (ICMP for an earlier
    /// heartbeat): `loss` says which.
    pub fn handle_pair_error(&mut self, loss: PeerLoss) {
        self.counters.peer_send_errors += 1;
        self.lose_peer(loss);
    }

    /// The heartbeat [`poll_pair_transmit`](Self::poll_pair_transmit) gave went out, or
    /// its send failed (with the loss, if the error is one of those).
    pub fn handle_pair_sent(&mut self, result: Result<(), Option<PeerLoss>>) {
        match result {
            Ok(()) => self.counters.peer_beats_sent += 1,
            Err(loss) => {
                self.counters.peer_send_errors += 1;
                if let Some(why) = loss {
                    self.lose_peer(why);
                }
                self.flush_pair_file();
            }
        }
    }

    /// The heartbeat to send to [`pair_peer`](Self::pair_peer), if one is due.
    pub fn poll_pair_transmit(&mut self) -> Option<Transmit> {
        let p = self.pairing.as_mut()?;
        let bytes = p.beat_out.take()?;
        Some(Transmit {
            to: p.peer_addr?,
            bytes,
        })
    }

    fn lose_peer(&mut self, why: PeerLoss) {
        let Some(p) = &mut self.pairing else {
            return;
        };
        if matches!(p.state, PeerState::Dead(_)) {
            return;
        }
        let was = p.state;
        p.state = PeerState::Dead(why);
        if was == PeerState::Alive {
            match why {
                PeerLoss::MissedHeartbeats => self.counters.peer_losses_slow += 1,
                _ => self.counters.peer_losses_fast += 1,
            }
            tracing::warn!(
                peer = ?p.peer_addr,
                "pair: peer lost ({why:?}){}",
                if matches!(why, PeerLoss::MissedHeartbeats) {
                    " (slow signal: no heartbeat)"
                } else {
                    " (fast signal: send error)"
                }
            );
        }
        p.file_dirty = true;
    }

    /// Judges the peer, decides who is active, takes over if this side just became
    /// active, and makes the heartbeat when due.
    pub(super) fn tick_pairing(&mut self, now_us: u64) {
        let Some(p) = &mut self.pairing else {
            return;
        };
        // Slow signal.
        let dead_us = p.setup.config.dead_ms * 1000;
        match (p.state, p.heard_us) {
            (PeerState::Alive, Some(h)) if now_us.saturating_sub(h) > dead_us => {
                self.lose_peer(PeerLoss::MissedHeartbeats)
            }
            (PeerState::Unknown, _) if now_us.saturating_sub(p.started_us) > dead_us => {
                tracing::warn!("pair: no heartbeat from a peer since start");
                p.state = PeerState::Dead(PeerLoss::MissedHeartbeats);
                p.file_dirty = true;
            }
            _ => {}
        }
        let Some(p) = &mut self.pairing else {
            return;
        };
        // Who is active.
        let role = p.setup.config.role;
        let peer_active = p.peer.as_ref().is_some_and(|b| b.active);
        let peer_since = p.peer.as_ref().map_or(0, |b| b.active_since_us);
        let active = match p.state {
            PeerState::Dead(_) => true,
            PeerState::Unknown => false,
            PeerState::Alive => match (p.active, peer_active) {
                (false, true) => false,
                (false, false) => role == PairRole::Primary,
                (true, false) => true,
                // Both active: the later one yields; on a tie the backup.
                (true, true) => match p.active_since_us.cmp(&peer_since) {
                    std::cmp::Ordering::Less => true,
                    std::cmp::Ordering::Greater => false,
                    std::cmp::Ordering::Equal => role == PairRole::Primary,
                },
            },
        };
        let mut took_over = false;
        if active != p.active {
            if active {
                tracing::warn!(
                    role = role.as_str(),
                    peer = ?p.state,
                    "pair: this agent is now ACTIVE"
                );
                if p.peer.is_some() {
                    took_over = true;
                    self.counters.takeovers += 1;
                }
            } else {
                tracing::info!(
                    role = role.as_str(),
                    "pair: the peer is active; this agent stands by"
                );
            }
            p.active = active;
            p.active_since_us = if active { self.reg.wall_us.max(1) } else { 0 };
            p.file_dirty = true;
        }
        // Send.
        if now_us >= p.next_beat_us {
            p.next_beat_us = now_us + p.setup.config.heartbeat_ms * 1000;
            let beat = self.beat(now_us).encode(self.config.key.as_ref());
            if let Some(p) = &mut self.pairing
                && p.peer_addr.is_some()
            {
                p.beat_out = Some(beat);
            }
        }
        self.flush_pair_file();
        let Some(p) = &self.pairing else {
            return;
        };
        // For `Hello`: a standby backup names the primary it stands in for (once it has
        // heard the primary's node id).
        let id = p.peer.as_ref().map_or(0, |b| b.node_id);
        self.reg.backup_of = (role == PairRole::Backup && !p.active && id != 0).then_some(id);
        if took_over {
            let peer_rates: Vec<(String, f64)> = p
                .peer
                .as_ref()
                .map(|b| {
                    b.sequences
                        .iter()
                        .map(|(n, r, _)| (n.clone(), *r))
                        .collect()
                })
                .unwrap_or_default();
            self.take_over(now_us, &peer_rates);
        }
    }

    /// What this side tells its peer.
    fn beat(&self, now_us: u64) -> Beat {
        let p = self.pairing.as_ref().expect("paired");
        Beat {
            role: p.setup.config.role,
            incarnation: self.reg.incarnation,
            node_id: self.reg.node_id,
            active: p.active,
            active_since_us: p.active_since_us,
            connection: format!("{:?}", self.reg.connection).to_lowercase(),
            listen: p.setup.listen,
            socket: self.local_socket,
            sequences: self.pair_sequences(now_us),
            ring_dir: p.setup.ring_dir.clone(),
        }
    }

    /// The pair file's text, as an output, when something in it changed.
    fn flush_pair_file(&mut self) {
        let Some(p) = &mut self.pairing else {
            return;
        };
        if !std::mem::take(&mut p.file_dirty) {
            return;
        }
        if let Some(peer) = &p.peer
            && peer.ring_dir == p.setup.ring_dir
        {
            tracing::error!(ring_dir = %peer.ring_dir.display(), "pair: the peer uses the same ring folder; give each agent its own --ring-dir");
        }
        let text = self.pair_file_text();
        self.outputs.push_back(Output::PairFile { text });
    }

    /// The pair file's text: `key value` lines the client library reads to find the
    /// peer's ring folder.
    fn pair_file_text(&self) -> String {
        use std::fmt::Write as _;
        let p = self.pairing.as_ref().expect("paired");
        let mut t = String::new();
        let _ = writeln!(t, "role {}", p.setup.config.role.as_str());
        let _ = writeln!(t, "active {}", u8::from(p.active));
        let _ = writeln!(t, "incarnation {}", self.reg.incarnation);
        let _ = writeln!(t, "listen {}", p.setup.listen);
        if let Some(s) = self.local_socket {
            let _ = writeln!(t, "socket {s}");
        }
        let state = match p.state {
            PeerState::Unknown => "unknown",
            PeerState::Alive => "alive",
            PeerState::Dead(_) => "dead",
        };
        let _ = writeln!(t, "peer_state {state}");
        if let Some(b) = &p.peer {
            let _ = writeln!(t, "peer_active {}", u8::from(b.active));
            if let Some(s) = b.socket {
                let _ = writeln!(t, "peer_socket {s}");
            }
            let _ = writeln!(t, "peer_ring_dir {}", b.ring_dir.display());
        }
        t
    }
}
