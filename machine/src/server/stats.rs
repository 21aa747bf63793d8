//! The server's counters and gauges: atomics the machine bumps and the engine's metrics
//! endpoint reads without taking the machine's lock, and the gauges read under it.

use std::sync::atomic::{AtomicU64, Ordering};

use unid_proto::{DecodeError, ErrorCode};

/// Counters, readable while the server runs (the engine's `ServerHandle::stats`).
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Datagrams handed to the server logic.
    pub datagrams_in: AtomicU64,
    /// Dropped: failed to decode or authenticate.
    pub dropped_malformed: AtomicU64,
    /// Dropped: over the source's rate.
    pub dropped_rate: AtomicU64,
    /// Dropped: the answer would have been larger than an unregistered sender's request.
    pub dropped_amplification: AtomicU64,
    /// Dropped: a message type a server does not take, or a request for nothing.
    pub dropped_unexpected: AtomicU64,
    /// Refused (`Unauthorized`): a change (sequence create, server add or remove) from a
    /// source that is neither loopback nor authenticated by the cluster secret.
    pub refused_admin: AtomicU64,
    /// Refused (`RateLimited`): a new registration over its source IP's or the server's
    /// registration rate ([`super::REGISTER_RATE_PER_IP_PER_S`], [`super::REGISTER_RATE_PER_S`]).
    pub refused_registration_rate: AtomicU64,
    /// Refused (`RateLimited`): a registration the replicated node table had no room for.
    pub refused_registration_full: AtomicU64,
    /// Agents whose lease ended removed from the replicated node table (through Raft).
    pub agents_removed: AtomicU64,
    /// Replays refused: a `BlockRequest` whose seq was already handled (and is no longer
    /// cached) or is older than the agent's replay window (answered `Error{Replayed}`), or
    /// a `Hello` not newer than the last one registered under its name (answered
    /// `Error{BadRequest}`); see [`unid_proto::ReplayWindow`].
    pub dropped_replay: AtomicU64,
    /// Dropped: carrying another cluster's id.
    pub dropped_cluster: AtomicU64,
    /// Refused (`VersionMismatch`): a `Hello` offering no protocol version this server speaks.
    pub refused_version: AtomicU64,
    /// Dropped (answered `VersionMismatch` when the answer is no larger): a datagram whose
    /// header carries a protocol version this server does not speak.
    pub dropped_version: AtomicU64,
    /// Blocks granted.
    pub grants: AtomicU64,
    /// Retransmits answered from the reply cache.
    pub replies_cached: AtomicU64,
    /// `NotLeader` answers.
    pub not_leader: AtomicU64,
    /// Agents registered by this server.
    pub registrations: AtomicU64,
    /// Ceiling raises committed by this server.
    pub raises_committed: AtomicU64,
    /// Ceiling raises that failed.
    pub raises_failed: AtomicU64,
    /// Allocators dropped because a raise revealed a committed ceiling above anything they
    /// proposed, after which this server read the ceilings again in the same term (see
    /// `Server::on_raise_done`).
    pub rewarms: AtomicU64,
}

/// A snapshot of [`ServerStats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerStatsSnapshot {
    /// See [`ServerStats::datagrams_in`].
    pub datagrams_in: u64,
    /// See [`ServerStats::dropped_malformed`].
    pub dropped_malformed: u64,
    /// See [`ServerStats::dropped_rate`].
    pub dropped_rate: u64,
    /// See [`ServerStats::dropped_amplification`].
    pub dropped_amplification: u64,
    /// See [`ServerStats::dropped_unexpected`].
    pub dropped_unexpected: u64,
    /// See [`ServerStats::refused_admin`].
    pub refused_admin: u64,
    /// See [`ServerStats::refused_registration_rate`].
    pub refused_registration_rate: u64,
    /// See [`ServerStats::refused_registration_full`].
    pub refused_registration_full: u64,
    /// See [`ServerStats::agents_removed`].
    pub agents_removed: u64,
    /// See [`ServerStats::dropped_replay`].
    pub dropped_replay: u64,
    /// See [`ServerStats::dropped_cluster`].
    pub dropped_cluster: u64,
    /// See [`ServerStats::refused_version`].
    pub refused_version: u64,
    /// See [`ServerStats::dropped_version`].
    pub dropped_version: u64,
    /// See [`ServerStats::grants`].
    pub grants: u64,
    /// See [`ServerStats::replies_cached`].
    pub replies_cached: u64,
    /// See [`ServerStats::not_leader`].
    pub not_leader: u64,
    /// See [`ServerStats::registrations`].
    pub registrations: u64,
    /// See [`ServerStats::raises_committed`].
    pub raises_committed: u64,
    /// See [`ServerStats::raises_failed`].
    pub raises_failed: u64,
    /// See [`ServerStats::rewarms`].
    pub rewarms: u64,
}

impl ServerStats {
    /// The current values.
    pub fn snapshot(&self) -> ServerStatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServerStatsSnapshot {
            datagrams_in: g(&self.datagrams_in),
            dropped_malformed: g(&self.dropped_malformed),
            dropped_rate: g(&self.dropped_rate),
            dropped_amplification: g(&self.dropped_amplification),
            dropped_unexpected: g(&self.dropped_unexpected),
            refused_admin: g(&self.refused_admin),
            refused_registration_rate: g(&self.refused_registration_rate),
            refused_registration_full: g(&self.refused_registration_full),
            agents_removed: g(&self.agents_removed),
            dropped_replay: g(&self.dropped_replay),
            dropped_cluster: g(&self.dropped_cluster),
            refused_version: g(&self.refused_version),
            dropped_version: g(&self.dropped_version),
            grants: g(&self.grants),
            replies_cached: g(&self.replies_cached),
            not_leader: g(&self.not_leader),
            registrations: g(&self.registrations),
            raises_committed: g(&self.raises_committed),
            raises_failed: g(&self.raises_failed),
            rewarms: g(&self.rewarms),
        }
    }
}

pub(crate) fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// A histogram of durations with fixed bucket bounds, in microseconds; lock-free.
#[derive(Debug)]
pub struct Histogram {
    bounds_us: &'static [u64],
    /// One per bound, plus the overflow bucket.
    buckets: Vec<AtomicU64>,
    sum_us: AtomicU64,
}

/// Bucket bounds for Raft commit latencies: 1 ms to 5 s.
pub const COMMIT_BOUNDS_US: &[u64] = &[
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 5_000_000,
];

impl Histogram {
    /// An empty histogram with these (increasing) upper bounds.
    pub fn new(bounds_us: &'static [u64]) -> Histogram {
        debug_assert!(bounds_us.windows(2).all(|w| w[0] < w[1]));
        Histogram {
            bounds_us,
            buckets: (0..=bounds_us.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe_us(&self, us: u64) {
        let i = self.bounds_us.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// The upper bounds of the buckets, in microseconds.
    pub fn bounds_us(&self) -> &'static [u64] {
        self.bounds_us
    }

    /// Observations in bucket `i` (`bounds_us().len()`: the overflow bucket).
    pub fn bucket(&self, i: usize) -> u64 {
        self.buckets[i].load(Ordering::Relaxed)
    }

    /// The sum of the observations, in microseconds.
    pub fn sum_us(&self) -> u64 {
        self.sum_us.load(Ordering::Relaxed)
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

/// Counters of the server that [`ServerStats`] does not have. Atomics only.
#[derive(Debug)]
pub struct Counters {
    /// Datagrams dropped because they failed to decode, by [`DropKind`].
    pub decode_dropped: [AtomicU64; 4],
    /// `Error` answers encoded, by [`ErrorCode`] wire number (index 0: unknown).
    pub errors_sent: [AtomicU64; 16],
    /// Times the known leader changed (to another known leader).
    pub leader_changes: AtomicU64,
    /// Times this server became leader.
    pub leaderships: AtomicU64,
    /// Times this leader went [`super::QUORUM_LOST_MS`] without a quorum confirming its
    /// leadership.
    pub quorum_lost: AtomicU64,
    /// Latency of committed ceiling raises.
    pub raise_latency: Histogram,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            decode_dropped: Default::default(),
            errors_sent: Default::default(),
            leader_changes: AtomicU64::new(0),
            leaderships: AtomicU64::new(0),
            quorum_lost: AtomicU64::new(0),
            raise_latency: Histogram::new(COMMIT_BOUNDS_US),
        }
    }
}

/// Why a datagram failed to decode, grouped for the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropKind {
    /// The CRC32 did not match.
    BadCrc = 0,
    /// Authentication failed: tag missing, wrong, or unexpected.
    Auth = 1,
    /// Shorter than its header says, or than the smallest datagram.
    Truncated = 2,
    /// Anything else (magic, version, type, flags, FlatBuffers, fields).
    Malformed = 3,
}

impl DropKind {
    /// Every kind with its metric label.
    pub const ALL: [(DropKind, &'static str); 4] = [
        (DropKind::BadCrc, "bad_crc"),
        (DropKind::Auth, "auth"),
        (DropKind::Truncated, "truncated"),
        (DropKind::Malformed, "malformed"),
    ];

    /// The kind of a decode error.
    pub fn of(e: &DecodeError) -> DropKind {
        use DecodeError as D;
        match e {
            D::BadCrc { .. } => DropKind::BadCrc,
            D::MissingTag | D::BadTag | D::UnexpectedTag => DropKind::Auth,
            D::TooShort { .. } => DropKind::Truncated,
            D::LengthMismatch { expected, actual } if actual < expected => DropKind::Truncated,
            _ => DropKind::Malformed,
        }
    }
}

impl Counters {
    /// Counts a datagram that failed to decode.
    pub fn decode_failed(&self, e: &DecodeError) {
        self.decode_dropped[DropKind::of(e) as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an `Error` answer.
    pub fn error_sent(&self, code: ErrorCode) {
        let i = (code as usize).min(self.errors_sent.len() - 1);
        self.errors_sent[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// One sequence's figures, gathered under the server's lock.
#[derive(Clone, Debug, Default)]
pub struct SequenceGauges {
    /// The sequence.
    pub name: String,
    /// Blocks granted by this server (since it started).
    pub grants: u64,
    /// Ids in those blocks.
    pub ids: u128,
    /// The committed ceiling (exclusive).
    pub ceiling: u128,
    /// Ids left before the width's limit.
    pub ids_left: u128,
}

/// The server's state figures, gathered under its lock and formatted after.
#[derive(Clone, Debug, Default)]
pub struct Gauges {
    /// The current term.
    pub term: u64,
    /// This server leads (or warms up to).
    pub is_leader: bool,
    /// This server grants (leads with an allocator).
    pub granting: bool,
    /// Agents holding a lease here.
    pub agents: usize,
    /// The sequences, at most [`METRICS_SEQUENCES_MAX`].
    pub sequences: Vec<SequenceGauges>,
    /// Sequences left out beyond [`METRICS_SEQUENCES_MAX`].
    pub sequences_omitted: usize,
}

/// Most sequences listed in the metrics (the rest are left out, counted in
/// `unid_server_sequences_omitted`).
pub const METRICS_SEQUENCES_MAX: usize = 1_000;
