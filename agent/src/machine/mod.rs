//! The agent's decision logic as one sans-IO state machine, quinn-proto style: events in
//! (datagrams as received bytes, send errors, timeouts, ring consumption), datagrams and
//! ring writes out, time passed in. No sockets, threads, clock reads, shared memory or
//! OS randomness: the agent's driver (`driver.rs`) feeds it from real sockets and rings,
//! and a simulator can feed it from simulated ones, so both run the code that ships.
//!
//! # Driving it
//!
//! ```text
//! Machine::new(config, now, seed)
//! loop:
//!   handle_datagram(now, from, bytes)     every datagram from a server socket (raw bytes:
//!                                         CRC, tag, cluster id, epoch and replays are
//!                                         checked here)
//!   handle_send_error(now, to, loss)      a send to `to` failed, or the kernel reported
//!                                         an error on its path (ICMP)
//!   handle_ring_taken(now, index, taken)  ids consumers have taken from ring `index` so far
//!   handle_timeout(now)                   periodically (at poll_timeout at the latest, and
//!                                         after reporting ring consumption): timers,
//!                                         registration, pings, refill decisions
//!   after any of these, until None:
//!     poll_output()   -> Output           open a ring / write a block into it; answer
//!                                         OpenRing with handle_ring_opened at once, and
//!                                         report a refused Write with handle_ring_refused
//!     poll_transmit(now) -> Transmit      encoded datagrams to send
//!   poll_timeout()    -> Option<now_us>   when handle_timeout is due at the latest
//!
//! paired (MachineConfig::pair), also:
//!   handle_pair_datagram(now, from, bytes) each datagram on the pair link, before the
//!                                         handle_timeout that judges them
//!   handle_pair_error(loss)               the kernel reported an error towards the peer
//!   poll_pair_transmit() -> Transmit      after handle_timeout: the heartbeat, to send
//!                                         to `pair_peer()`; then handle_pair_sent(result)
//!   poll_output() -> Output::PairFile     rewrite the pair file
//! ```
//!
//! The I/O side also reports the wall clock (`set_wall_clock_us`, for the incarnation of
//! a re-registration and the pair's `active_since`) and the localhost socket's address
//! (`set_local_socket`, told to the peer).
//!
//! Given the same calls and the same seed, the outputs are the same.
//!
//! # Files
//!
//! - `registration.rs`: `Hello`/`Welcome`, pings and leases, the connection state;
//! - `link.rs`: requests and their answers: the requester, the servers it knows,
//!   redirects, `LeaderChange` and its replay windows, the node table;
//! - `blocks.rs`: one sequence's bookkeeping: grant checks, the refill decision, ring
//!   accounting;
//! - `paths.rs`: what the kernel said about each server's path;
//! - `pairing.rs`: the primary/backup pair: heartbeats, failure detection, who is
//!   active, the takeover;
//! - `tests.rs`: the machine driven by a fake server, no sockets.

mod blocks;
mod link;
mod pairing;
mod paths;
mod registration;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::net::SocketAddr;

use rand::SeedableRng;
use rand::rngs::SmallRng;
use unid_core::{Disposition, Reply, Response, Sizer};
use unid_proto::{
    AuthKey, ClusterId, Codec, DATAGRAM_BYTES_MAX, DecodeError, ErrorCode, Header, Message, NodeId,
    NodeRole, SequenceName, VERSIONS, Versions, Width, decode,
};

/// After a server refused this agent's protocol versions, the next `Hello` waits this long
/// (the server may be upgraded meanwhile), in µs.
pub const INCOMPATIBLE_RETRY_US: u64 = 10_000_000;

/// A server that cannot serve this agent: no protocol version in common.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incompatibility {
    /// The server.
    pub server: SocketAddr,
    /// The versions it speaks (for a datagram of another header version: that version).
    pub server_versions: Versions,
    /// Its software string, if it sent one.
    pub server_software: String,
    /// The versions this agent speaks.
    pub ours: Versions,
}

impl Incompatibility {
    /// What to upgrade, in words.
    pub fn advice(&self) -> String {
        let (s, o) = (self.server_versions, self.ours);
        if s.max < o.min {
            format!(
                "upgrade the server {} (or run an agent that speaks version {s})",
                self.server
            )
        } else if s.min > o.max {
            format!("upgrade this agent to one that speaks version {s}")
        } else {
            "the ranges overlap: check both builds".to_owned()
        }
    }
}

impl core::fmt::Display for Incompatibility {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let software = if self.server_software.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.server_software)
        };
        write!(
            f,
            "server {}{software} speaks protocol version {}, this agent ({}) speaks {}: {}",
            self.server,
            self.server_versions,
            unid_proto::SOFTWARE,
            self.ours,
            self.advice()
        )
    }
}

use crate::{Connection, Error, SequenceState};
use blocks::Seq;
use link::{Answer, Link, Req, TableFetch};
pub use pairing::PairSetup;
use pairing::Pairing;
use paths::Paths;
pub use paths::{PathLoss, PathState, ServerPath};
use registration::Registration;

pub use unid_core::{RequesterConfig, SizingConfig};

/// What the decision logic needs to know. [`crate::AgentConfig::machine_config`] makes
/// one from an agent's configuration.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    /// Servers to contact (the first is the first leader guess). 1 to
    /// `requester.servers_max`, no repeats.
    pub servers: Vec<SocketAddr>,
    /// Sequences to serve; index `i` here is `index` in every input and output.
    pub sequences: Vec<SequenceName>,
    /// This agent's name in `Hello`.
    pub name: String,
    /// The incarnation of the first `Hello` (wall-clock µs at start), also the first
    /// request seq (seqs must not repeat across restarts). At least 1.
    pub incarnation: u64,
    /// The cluster secret's key: every datagram is tagged and checked.
    pub key: Option<AuthKey>,
    /// The cluster id to serve, if known; `None`: the first one answered is pinned.
    pub cluster: Option<ClusterId>,
    /// Block sizing.
    pub sizing: SizingConfig,
    /// Blocks (of the current size) to keep per ring (1..=16).
    pub blocks_ahead: u32,
    /// Retransmission, backoff, deadlines.
    pub requester: RequesterConfig,
    /// Primary/backup pairing with another agent, if any.
    pub pair: Option<PairSetup>,
}

impl MachineConfig {
    /// Checks every bound; the error names the field.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field, reason: &str| {
            Err(Error::InvalidConfig {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.servers.is_empty() || self.servers.len() > self.requester.servers_max {
            return bad("servers", "must hold 1 to requester.servers_max addresses");
        }
        if self
            .servers
            .iter()
            .enumerate()
            .any(|(i, a)| self.servers[..i].contains(a))
        {
            return bad("servers", "must not repeat an address");
        }
        if self.sequences.is_empty() || self.sequences.len() > crate::SEQUENCES_MAX {
            return bad("sequences", "must hold 1 to 64 names");
        }
        if self.requester.requests_max < self.sequences.len() + 2 {
            return bad(
                "requester.requests_max",
                "must be at least the number of sequences + 2 (Hello, Ping)",
            );
        }
        if self
            .sequences
            .iter()
            .enumerate()
            .any(|(i, s)| self.sequences[..i].contains(s))
        {
            return bad("sequences", "must not repeat a name");
        }
        if let Err(e) = SequenceName::check(&self.name) {
            return bad("name", &e.to_string());
        }
        if !(1..=16).contains(&self.blocks_ahead) {
            return bad("blocks_ahead", "must be in 1..=16");
        }
        if self.cluster == Some(0) {
            return bad(
                "cluster",
                "a cluster id is never 0 (leave it unset to learn it)",
            );
        }
        if self.incarnation == 0 {
            return bad("incarnation", "must be at least 1");
        }
        if let Err(e) = self.sizing.validate() {
            return bad("sizing", &e.to_string());
        }
        if let Err(e) = self.requester.validate() {
            return bad("requester", &e.to_string());
        }
        if let Some(p) = &self.pair
            && let Err(e) = p.config.validate()
        {
            return bad("pair", &e);
        }
        Ok(())
    }
}

/// An encoded datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The server.
    pub to: SocketAddr,
    /// The datagram (header, message, CRC, tag), at most `DATAGRAM_BYTES_MAX` bytes.
    pub bytes: Vec<u8>,
}

/// Something the I/O side must do with a ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Create sequence `index`'s ring for ids of `width` (the first grant told it), then
    /// call [`Machine::handle_ring_opened`] with the result before anything else. The
    /// grant waits for it: on success it comes as a [`Output::Write`], on failure it is
    /// dropped (lost, never repeated) and asked again later.
    OpenRing {
        /// The sequence.
        index: usize,
        /// Its width.
        width: Width,
    },
    /// Append the ids `first..first + count` to ring `index`, in this order, after
    /// every earlier write (hold what does not fit yet). Ids are strictly increasing
    /// across writes of one ring and never repeat. A write the ring refuses is reported
    /// with [`Machine::handle_ring_refused`].
    Write {
        /// The sequence.
        index: usize,
        /// The first id.
        first: u128,
        /// How many (at least 1).
        count: u64,
    },
    /// Replace the pair file (`pair::PAIR_FILE` in the ring folder, read by the client
    /// library to find the peer) with this text. Paired agents only.
    PairFile {
        /// The whole file.
        text: String,
    },
}

/// The machine's counters (the I/O side copies them into [`crate::Metrics`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Block grants accepted.
    pub grants: u64,
    /// Ids in accepted grants.
    pub ids_granted: u64,
    /// Grants dropped (checks failed, or the ring refused them).
    pub grants_rejected: u64,
    /// Block requests sent (first transmissions).
    pub block_requests: u64,
    /// Retransmissions of any request.
    pub retransmits: u64,
    /// Redirects followed.
    pub redirects: u64,
    /// `LeaderChange` messages acted on.
    pub leader_changes: u64,
    /// `LeaderChange` messages ignored.
    pub leader_changes_rejected: u64,
    /// Datagrams dropped for another cluster's id.
    pub other_cluster_dropped: u64,
    /// Replayed datagrams dropped.
    pub replays_dropped: u64,
    /// Datagrams dropped: undecodable, bad tag, unknown source, stale epoch.
    pub datagrams_dropped: u64,
    /// Requests given up.
    pub requests_failed: u64,
    /// Registrations (`Welcome` received).
    pub registrations: u64,
    /// Refusals for lack of a common protocol version (`VersionMismatch`, or a datagram of
    /// a header version this agent does not speak).
    pub version_refusals: u64,
    /// Last refill latency (block request sent → grant written), µs.
    pub refill_latency_us_last: u64,
    /// Largest refill latency, µs.
    pub refill_latency_us_max: u64,
    /// Times a ring was found empty while serving.
    pub ring_empty_events: u64,
    /// Server paths that went down (once per change).
    pub path_losses: u64,
    /// Times every server became unroutable.
    pub network_losses: u64,
    /// Heartbeats sent to the pair peer.
    pub peer_beats_sent: u64,
    /// Heartbeats received from the pair peer.
    pub peer_beats_received: u64,
    /// Pair datagrams dropped (malformed, bad tag, not the configured peer).
    pub peer_beats_dropped: u64,
    /// Sends to the peer refused or unreachable.
    pub peer_send_errors: u64,
    /// Peer losses noticed by the fast signal (send error).
    pub peer_losses_fast: u64,
    /// Peer losses noticed by the slow signal (missed heartbeats).
    pub peer_losses_slow: u64,
    /// Times this agent became active after standing by.
    pub takeovers: u64,
}

/// One sequence as the machine sees it (for status lines and heartbeats).
#[derive(Clone, Debug, PartialEq)]
pub struct SequenceView {
    /// Its name.
    pub name: SequenceName,
    /// Its width, once the first grant told it.
    pub width: Option<Width>,
    /// What it is doing.
    pub state: SequenceState,
    /// Every id accepted so far is below this.
    pub next_min: u128,
    /// Measured consumption, ids per second.
    pub rate_ids_per_s: f64,
    /// Size of the last block asked for.
    pub block_ids: u64,
    /// Ids written and not taken (in the ring or held by the I/O side).
    pub ids_ahead: u64,
}

/// The agent's state machine. See the module docs.
pub struct Machine {
    config: MachineConfig,
    codec: Codec,
    rng: SmallRng,
    link: Link,
    /// The cluster id this agent serves: configured, or pinned from the first answer that
    /// carried one (0 until then). Sent on every request; an answer carrying another
    /// non-zero id is dropped (issue 12: two clusters on one address).
    cluster: ClusterId,
    reg: Registration,
    seqs: Vec<Seq>,
    table: TableFetch,
    paths: Paths,
    pairing: Option<Pairing>,
    /// The localhost socket's address, for the pair heartbeat and file.
    local_socket: Option<SocketAddr>,
    counters: Counters,
    /// The last server that could not serve this agent's protocol versions (cleared by a
    /// `Welcome`).
    incompatible: Option<Incompatibility>,
    /// The time of the latest `handle_timeout`: the machine's own timers at or before it
    /// were acted on (or wait on something else), so `poll_timeout` leaves them out.
    ticked_us: u64,
    /// Bounded by the driving rule (drained after every call): at most one
    /// `OpenRing` or `Write` per grant, one grant per sequence in flight.
    outputs: VecDeque<Output>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("node_id", &self.reg.node_id)
            .field("connection", &self.reg.connection)
            .field("leader", &self.link.requester.leader())
            .field("epoch", &self.link.requester.highest_epoch())
            .finish_non_exhaustive()
    }
}

impl Machine {
    /// A machine at `now_us`, drawing its jitter from `rng_seed`.
    pub fn new(config: MachineConfig, now_us: u64, rng_seed: u64) -> Result<Machine, Error> {
        config.validate()?;
        let link = Link::new(&config, now_us)?;
        let seqs = config
            .sequences
            .iter()
            .map(|name| {
                Ok(Seq::new(
                    name.clone(),
                    Sizer::new(config.sizing.clone(), 0).map_err(|e| Error::InvalidConfig {
                        field: "sizing",
                        reason: e.to_string(),
                    })?,
                ))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let cluster = config.cluster.unwrap_or(0);
        let mut codec = Codec::new();
        codec.set_cluster(cluster);
        Ok(Machine {
            paths: Paths::new(&config.servers),
            pairing: config.pair.clone().map(|p| Pairing::new(p, now_us)),
            local_socket: None,
            reg: Registration::new(config.incarnation),
            rng: SmallRng::seed_from_u64(rng_seed),
            link,
            cluster,
            codec,
            seqs,
            table: TableFetch::default(),
            counters: Counters::default(),
            incompatible: None,
            ticked_us: 0,
            outputs: VecDeque::new(),
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Whether the agent reaches the cluster.
    pub fn connection(&self) -> Connection {
        self.reg.connection
    }

    /// The node id the leader assigned (0 while registering).
    pub fn node_id(&self) -> NodeId {
        self.reg.node_id
    }

    /// The incarnation the first `Hello` carries.
    pub fn incarnation(&self) -> u64 {
        self.reg.incarnation
    }

    /// Where requests go now.
    pub fn leader(&self) -> SocketAddr {
        self.link.requester.leader()
    }

    /// The servers requests may go to (configured and learned), leader guess first after
    /// a switch.
    pub fn servers(&self) -> &[SocketAddr] {
        &self.link.servers
    }

    /// The highest epoch a leader answered with (the epoch filter).
    pub fn epoch(&self) -> u64 {
        self.link.requester.highest_epoch()
    }

    /// The cluster id served (0 until a server told it).
    pub fn cluster(&self) -> ClusterId {
        self.cluster
    }

    /// Each server path, as the kernel reported it.
    pub fn paths(&self) -> Vec<ServerPath> {
        self.paths.list()
    }

    /// The last server that refused this agent's protocol versions, until one welcomes it.
    pub fn incompatible(&self) -> Option<&Incompatibility> {
        self.incompatible.as_ref()
    }

    /// A server cannot serve this agent's versions: one ERROR per new finding, counted, shown
    /// in the status, and the next `Hello` after [`INCOMPATIBLE_RETRY_US`].
    fn on_incompatible(&mut self, now: u64, from: SocketAddr, versions: Versions, software: &str) {
        self.counters.version_refusals += 1;
        let found = Incompatibility {
            server: from,
            server_versions: versions,
            server_software: software.to_owned(),
            ours: VERSIONS,
        };
        if self.incompatible.as_ref() != Some(&found) {
            tracing::error!(
                "{found}; asking again every {} s",
                INCOMPATIBLE_RETRY_US / 1_000_000
            );
        }
        self.incompatible = Some(found);
        if self.reg.node_id == 0 {
            self.reg.hello_retry_at_us =
                self.reg.hello_retry_at_us.max(now + INCOMPATIBLE_RETRY_US);
        }
    }

    /// Every server path is down for lack of a route.
    pub fn network_down(&self) -> bool {
        self.paths.no_route
    }

    /// Sequence `index` (as configured) at `now_us`.
    pub fn sequence(&self, index: usize, now_us: u64) -> SequenceView {
        self.seqs[index].view(now_us)
    }

    /// How many sequences (the valid `index` values are below it).
    pub fn sequence_count(&self) -> usize {
        self.seqs.len()
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due at the latest: the
    /// requester's timers and this machine's own (re-registration, ping, slow retries).
    /// A refill that consumption makes due is found by the `handle_timeout` that follows
    /// [`handle_ring_taken`](Self::handle_ring_taken).
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut at = self.link.requester.poll_timeout();
        let after = self.ticked_us;
        let mut add = |t: u64| {
            if t > after {
                at = Some(at.map_or(t, |a| a.min(t)));
            }
        };
        self.reg.timers(&mut add);
        if let Some(p) = &self.pairing {
            p.timers(&mut add);
        }
        if self.reg.node_id != 0 {
            for s in &self.seqs {
                if s.inflight.is_none() && s.state != SequenceState::Exhausted {
                    add(s.retry_at_us);
                }
            }
        }
        at
    }

    /// Timers, registration, pings, the node table, every sequence's refill decision and
    /// the pair's (who is active, the heartbeat) at `now_us`.
    pub fn handle_timeout(&mut self, now_us: u64) {
        let now = now_us;
        self.ticked_us = self.ticked_us.max(now);
        if self.link.requester.poll_timeout().is_some_and(|t| t <= now) {
            self.link.requester.handle_timeout(now, &mut self.rng);
        }
        self.drain_events(now);
        self.tick_registration(now);
        if self.reg.node_id != 0 && self.table.wanted && !self.table.inflight {
            let page = self.table.next_page;
            self.table.inflight = self.link.send(now, Req::NodeTable { page }).is_some();
        }
        self.tick_ping(now);
        for index in 0..self.seqs.len() {
            self.refill(now, index);
        }
        self.tick_pairing(now);
    }

    /// A send to `to` failed, or the kernel reported an error on its path (`loss`, if
    /// it is one of the path errors): the requester rotates away from it and sends again
    /// what went there.
    pub fn handle_send_error(&mut self, now_us: u64, to: SocketAddr, loss: Option<PathLoss>) {
        if let Some(loss) = loss {
            self.path_down(to, loss);
        }
        self.link.requester.handle_send_error(now_us, to);
    }

    /// The next datagram to send at `now_us`, encoded.
    pub fn poll_transmit(&mut self, now_us: u64) -> Option<Transmit> {
        let now = now_us;
        let mut out = [0u8; DATAGRAM_BYTES_MAX];
        while let Some(t) = self.link.requester.poll_transmit(now) {
            if t.attempt > 1 {
                self.counters.retransmits += 1;
            }
            let header = Header {
                sender: if matches!(t.request, Req::Hello) {
                    0
                } else {
                    self.reg.node_id
                },
                seq: t.seq,
                reply_to: 0,
                epoch: self.link.requester.highest_epoch(),
            };
            let message = match &t.request {
                Req::Hello => Message::Hello {
                    role: NodeRole::Agent,
                    incarnation: self.reg.hello_incarnation,
                    name: &self.config.name,
                    listen: None,
                    // A standby backup names the primary it stands in for (once it has
                    // heard its node id).
                    backup_of: self.reg.backup_of,
                    versions: unid_proto::VERSIONS,
                    software: unid_proto::SOFTWARE,
                },
                Req::Ping => Message::Ping { sent_us: now },
                Req::NodeTable { page } => Message::NodeTableRequest { page: *page },
                Req::Block { index, count } => Message::BlockRequest {
                    sequence: self.seqs[*index].name.as_str(),
                    count: *count,
                },
            };
            let len = match self
                .codec
                .encode(&header, &message, self.config.key.as_ref(), &mut out)
            {
                Ok(len) => len,
                Err(e) => {
                    tracing::error!("cannot encode {:?}: {e}", t.request);
                    continue;
                }
            };
            self.paths.ensure(t.destination, &self.link.servers);
            return Some(Transmit {
                to: t.destination,
                bytes: out[..len].to_vec(),
            });
        }
        None
    }

    /// The next ring operation, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The agent stops: the connection shows `Stopped`.
    pub fn stop(&mut self) {
        self.set_connection(Connection::Stopped);
    }

    /// A datagram from `from` (a server's socket), as received.
    pub fn handle_datagram(&mut self, now_us: u64, from: SocketAddr, bytes: &[u8]) {
        let now = now_us;
        self.path_up(from);
        let frame = match decode(bytes, self.config.key.as_ref()) {
            Ok(f) => f,
            Err(DecodeError::UnsupportedVersion { version })
                if version != 0 && self.link.servers.contains(&from) =>
            {
                self.counters.datagrams_dropped += 1;
                self.on_incompatible(now, from, Versions::only(version), "");
                return;
            }
            Err(e) => {
                self.counters.datagrams_dropped += 1;
                tracing::debug!("dropped datagram from {from}: {e}");
                return;
            }
        };
        if frame.cluster != 0 && self.cluster != 0 && frame.cluster != self.cluster {
            self.counters.other_cluster_dropped += 1;
            let n = self.counters.other_cluster_dropped;
            if n.is_power_of_two() {
                tracing::warn!(%from, cluster = format_args!("{:016x}", frame.cluster), ours = format_args!("{:016x}", self.cluster), dropped = n, "dropped an answer from another cluster (two clusters on one address, or a server list that mixes them?)");
            }
            return;
        }
        if let Message::VersionMismatch {
            versions, software, ..
        } = frame.message
        {
            // Answered outside the requester: the refused Hello times out there and is
            // sent again no sooner than INCOMPATIBLE_RETRY_US.
            if self.link.servers.contains(&from) {
                self.on_incompatible(now, from, versions, software);
            } else {
                self.counters.datagrams_dropped += 1;
            }
            return;
        }
        let epoch = frame.header.epoch;
        let highest = self.link.requester.highest_epoch();
        if epoch < highest || !self.link.servers.contains(&from) {
            self.counters.datagrams_dropped += 1;
            return;
        }
        // Only a leader's answers raise the highest epoch (the rule is the requester's:
        // `Done` and `TryLater` raise it, redirects do not). Any server serves node-table
        // pages and rate-limits, and a server that is not the leader may be in a higher
        // term than every leader (a partitioned server's failed elections raise its term):
        // if those counted, every answer of the real, lower-term leader would be dropped
        // for as long as no leader reaches that term (found by `sim/`, seeds 464 and 947).
        let from_leader = !matches!(
            frame.message,
            Message::NotLeader { .. }
                | Message::NodeTable { .. }
                | Message::Error {
                    code: ErrorCode::RateLimited,
                    ..
                }
        );
        let mut learn_after: Vec<SocketAddr> = Vec::new();
        let reply = match frame.message {
            Message::LeaderChange {
                leader,
                servers,
                truncated,
                ..
            } => {
                let learned: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
                let seq = frame.header.seq;
                self.on_leader_change(now, from, seq, epoch, leader, &learned, truncated);
                return;
            }
            Message::Welcome {
                node_id,
                lease_ms,
                servers,
                truncated,
            } => {
                self.table.wanted |= truncated;
                // Learned after the Welcome is taken: rebuilding the requester first would
                // orphan the Hello it answers.
                learn_after = servers.iter().map(|s| s.addr).collect();
                Reply::Done(Answer::Welcome { node_id, lease_ms })
            }
            Message::BlockGrant {
                sequence,
                width,
                block,
            } => Reply::Done(Answer::Grant {
                sequence: sequence.to_owned(),
                width,
                first: block.first(),
                count: block.count(),
            }),
            Message::Pong { lease_ms, .. } => Reply::Done(Answer::Pong { lease_ms }),
            Message::NodeTable {
                version,
                page,
                page_count,
                nodes,
            } => Reply::Done(Answer::NodeTable {
                version,
                page,
                page_count,
                servers: nodes
                    .iter()
                    .filter(|n| n.role == NodeRole::Server)
                    .map(|n| n.addr)
                    .collect(),
                only_servers: nodes.iter().all(|n| n.role == NodeRole::Server),
            }),
            Message::Error {
                code: ErrorCode::NotReady | ErrorCode::RateLimited,
                ..
            } => Reply::TryLater,
            Message::Error { code, .. } => Reply::Done(Answer::Error { code }),
            Message::NotLeader {
                leader,
                servers,
                truncated,
                ..
            } => {
                self.table.wanted |= truncated;
                let learned: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
                if let Some(l) = leader
                    && !self.link.servers.contains(&l)
                {
                    // A leader we did not know: switch to it directly.
                    tracing::info!(leader = %l, "redirected to a server not configured");
                    if self.switch(now, l, &learned) {
                        self.counters.redirects += 1;
                    }
                    return;
                }
                Reply::Redirect { leader }
            }
            _ => {
                self.counters.datagrams_dropped += 1;
                return;
            }
        };
        let response = Response {
            reply_to: frame.header.reply_to,
            // A non-leader's answer is not stale (the filter above passed it) and must
            // raise nothing in the requester.
            epoch: if from_leader { epoch } else { highest },
            reply,
        };
        match self.link.requester.handle_response(now, from, response) {
            Disposition::Accepted | Disposition::TryLater => {
                self.pin_cluster(from, frame.cluster);
                self.link.saw_server_seq(from, frame.header.seq);
            }
            Disposition::Redirected => {
                self.pin_cluster(from, frame.cluster);
                self.link.saw_server_seq(from, frame.header.seq);
                self.counters.redirects += 1;
            }
            Disposition::StaleEpoch | Disposition::UnknownSource => {
                self.counters.datagrams_dropped += 1
            }
            _ => {}
        }
        if self.reg.connection == Connection::Unreachable && self.reg.node_id != 0 {
            self.set_connection(Connection::Connected);
        }
        self.drain_events(now);
        if !learn_after.is_empty() {
            self.learn(now, from, &learn_after);
        }
    }

    /// Pins the cluster id of the first answer to a request of ours that carries one.
    fn pin_cluster(&mut self, from: SocketAddr, cluster: ClusterId) {
        if self.cluster == 0 && cluster != 0 {
            self.cluster = cluster;
            self.codec.set_cluster(cluster);
            tracing::info!(server = %from, cluster = format_args!("{cluster:016x}"), "serving cluster (answers of any other are dropped)");
        }
    }
}
