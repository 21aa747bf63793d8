//! `unid`: unique, increasing integer ids for applications.
//!
//! The local agent (`unid agent`) keeps a shared-memory ring of ids per
//! sequence; [`Unid::open`] maps it and [`Unid::next`] takes an id with a few
//! atomic operations and no system call. When the ring is not there (the
//! agent has not received a block yet, or runs elsewhere in a container with
//! only the socket shared), the client uses the agent's localhost socket
//! instead, and switches to the ring as soon as it appears.
//!
//! ```no_run
//! # fn main() -> Result<(), unid::Error> {
//! let mut orders = unid::Unid::open("orders")?;
//! let id = orders.next()?;                 // an `Id`: value and width
//! let as_u64: u64 = id.try_into()?;        // fails only for a 16-byte sequence
//! let batch = orders.take(100)?;           // 100 ids, increasing
//! assert!(batch[0] > id);
//! println!("{id} {as_u64} {}", batch.len());
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! - No id is returned twice, by this handle or any other, in any process on
//!   any host of the cluster.
//! - Ids returned by one handle strictly increase, across ring and socket and
//!   across agent restarts.
//! - Ids taken and not used are lost, never reused (ids are unique, not
//!   dense).
//!
//! # Where the agent is
//!
//! | what | default | override |
//! |---|---|---|
//! | ring folder | `/dev/shm/unid` | `UNID_RING_DIR` or [`Options::ring_dir`] |
//! | agent's Unix socket (tried first) | `RING_DIR/.unid-socket` | follows the ring folder |
//! | localhost socket | `127.0.0.1:7411` | `UNID_SOCKET` or [`Options::socket`] |
//! | the agent's uid, if neither this process's nor root's | none | `UNID_AGENT_UID` or [`Options::agent_uid`] |
//! | backup agent's ring folder | read from `RING_DIR/.unid-pair` | `UNID_BACKUP_RING_DIR` or [`Options::backup_ring_dir`] |
//!
//! # Whom it trusts
//!
//! Ring folder, ring and seal files and the agent's sockets must belong to
//! this process's user, root or [`Options::agent_uid`], and the folder must
//! not be writable by others ([`Error::Insecure`] otherwise: a squatted
//! `/dev/shm/unid`, another user listening on the agent's port). Ids a ring
//! hands out that are not above the handle's last one are
//! [`Error::Corrupt`], never returned. See `ring/README.md` (threat model).
//!
//! # Primary and backup agents
//!
//! When the agent is paired with a backup agent (`unid agent --backup-of`),
//! each writes a pair file `.unid-pair` in its ring folder naming the other's
//! ring folder. A handle then maps both rings and takes from the one it used
//! last; when that one is empty (its agent killed, or slow) it takes from the
//! other at once, without waiting for the dead agent to be noticed, and keeps
//! to it. An id not above the last one this handle returned is discarded
//! (the other agent's blocks may be older): ids are lost at a switch, never
//! repeated and never out of order. [`Unid::stats`] counts switches and
//! discarded ids.

#![forbid(unsafe_code)]

mod socket;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use unid_ring::{Consumer, RingError};

pub use unid_proto::Width;

/// The most ids one [`Unid::take`] returns.
pub const TAKE_IDS_MAX: usize = 1_000_000;
/// Default ring folder (also the agent's).
pub const RING_DIR_DEFAULT: &str = "/dev/shm/unid";
/// Default agent socket.
pub const SOCKET_DEFAULT: &str = "127.0.0.1:7411";
/// How often a handle on the socket looks whether the ring has appeared.
const RING_PROBE_EVERY: Duration = Duration::from_secs(1);
/// How often a paired handle tries to map a missing, closed or dead ring
/// again (a restarted agent makes a new file).
const RING_REOPEN_EVERY: Duration = Duration::from_millis(100);
/// While both rings of a pair are empty, how long one futex wait on a ring
/// lasts before the other ring is looked at.
const PAIR_WAIT_SLICE: Duration = Duration::from_millis(1);
/// In pair mode, an empty ring whose agent's heartbeat is older than this
/// counts as dead (it is then mapped again when due, in case a restarted
/// agent made a new file). Agents beat every few milliseconds.
const PAIR_AGENT_STALE_MS: u64 = 50;
/// The most takes spent discarding ids not above the last one returned in
/// one call (each take discards up to a whole block).
const SKIP_TAKES_MAX: u32 = 1 << 16;

/// An id: its value and the width of its sequence.
///
/// Ordered by value (all ids of one sequence share a width). Prints in
/// decimal. Converts to `u128` always, and to `u64`/`u32`/`u16` with
/// `try_into` when its value fits (it always does for a sequence of that
/// width or narrower).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id {
    value: u128,
    width: Width,
}

impl Id {
    /// The value.
    pub const fn get(self) -> u128 {
        self.value
    }

    /// The width of its sequence.
    pub const fn width(self) -> Width {
        self.width
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.value, f)
    }
}

impl From<Id> for u128 {
    fn from(id: Id) -> u128 {
        id.value
    }
}

macro_rules! narrow {
    ($t:ty) => {
        impl TryFrom<Id> for $t {
            type Error = Error;
            fn try_from(id: Id) -> Result<$t, Error> {
                <$t>::try_from(id.value).map_err(|_| Error::TooWide {
                    id: id.value,
                    bits: <$t>::BITS,
                })
            }
        }
    };
}
narrow!(u64);
narrow!(u32);
narrow!(u16);

/// Everything that can go wrong; each message says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No agent serves this sequence here: no ring and no socket answer.
    #[error(
        "no unid agent serves sequence {sequence:?} here (no ring in {ring_dir}, nothing on {socket}): start one with `unid agent --server ADDR --sequence {sequence}`, or set UNID_RING_DIR / UNID_SOCKET"
    )]
    AgentNotRunning {
        /// The sequence.
        sequence: String,
        /// Where the ring was looked for.
        ring_dir: PathBuf,
        /// Where the socket was tried.
        socket: SocketAddr,
    },
    /// The agent does not serve this sequence, or the cluster does not know it.
    #[error(
        "unknown sequence {sequence:?}: {detail}. Create it with `unid sequence create {sequence}` and add `--sequence {sequence}` to the agent"
    )]
    UnknownSequence {
        /// The sequence.
        sequence: String,
        /// What the agent said.
        detail: String,
    },
    /// The sequence has no ids left. Final: ids never wrap.
    #[error("sequence {sequence:?} is exhausted: it has no ids left in its width")]
    Exhausted {
        /// The sequence.
        sequence: String,
    },
    /// The agent is running but has no ids right now (cluster unreachable,
    /// or still starting). Retry later.
    #[error("no ids available for {sequence:?} right now: {detail}; retry later")]
    NotReady {
        /// The sequence.
        sequence: String,
        /// What the agent said, or which wait timed out.
        detail: String,
    },
    /// This process may not map the ring file.
    #[error(
        "no permission to open ring {path}: run as the agent's user, or run the agent with ring mode 0660 and join its group"
    )]
    PermissionDenied {
        /// The ring file.
        path: PathBuf,
    },
    /// The ring folder or file (or the agent's socket) could be someone
    /// else's: a foreign owner, writable by others, a symlink, or a peer
    /// that is not the agent's user. Nothing was taken from it.
    #[error(
        "refusing {path}: {reason}. The agent must own its ring folder (mode 0700/0750); set UNID_AGENT_UID if it runs as another user than this process and not as root"
    )]
    Insecure {
        /// The folder, file or socket.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Not a valid sequence name.
    #[error(
        "invalid sequence name {name:?}: 1-64 of [A-Za-z0-9_.-], starting with a letter or digit"
    )]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// More ids asked for than [`TAKE_IDS_MAX`], or 0.
    #[error("cannot take {asked} ids at once: 1..={TAKE_IDS_MAX}")]
    BadCount {
        /// How many were asked for.
        asked: usize,
    },
    /// An id does not fit the integer type asked for.
    #[error("id {id} does not fit in {bits} bits")]
    TooWide {
        /// The id.
        id: u128,
        /// The target type's bits.
        bits: u32,
    },
    /// The ring file is broken or of another version; restart the agent.
    #[error("ring problem: {0}; restart the agent")]
    Ring(RingError),
    /// The ring (or the socket) gave ids this handle must not return: not
    /// above the last id it returned, or outside the sequence's width. Some
    /// process wrote to the ring outside the protocol (a rewound head, a
    /// lowered block) or the agent is broken. The ids are dropped, never
    /// returned; restart the agent (a new ring) and find the writer.
    #[error(
        "ring of {sequence:?} gave {first}+{count} after id {last:?}: not increasing or out of range (the ring was written outside the protocol); ids dropped, restart the agent"
    )]
    Corrupt {
        /// The sequence.
        sequence: String,
        /// First id of the offending run.
        first: u128,
        /// Ids in the run.
        count: u64,
        /// The last id this handle returned.
        last: Option<u128>,
    },
    /// The agent's socket answered something that is not the protocol.
    #[error("unexpected answer from the agent at {socket}: {line:?}")]
    Protocol {
        /// The socket.
        socket: SocketAddr,
        /// The offending line (cut to 100 bytes).
        line: String,
    },
    /// Talking to the socket failed.
    #[error("{op} {socket}: {source}")]
    Io {
        /// What was done.
        op: &'static str,
        /// The socket.
        socket: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Where to find the agent and how long to wait.
#[derive(Clone, Debug)]
pub struct Options {
    /// Ring folder. Default: `UNID_RING_DIR`, else `/dev/shm/unid`.
    pub ring_dir: PathBuf,
    /// Agent socket. Default: `UNID_SOCKET`, else `127.0.0.1:7411`.
    pub socket: SocketAddr,
    /// Use the socket when the ring is not there. Default true.
    pub socket_fallback: bool,
    /// How long [`Unid::next`] waits for an empty ring to be refilled.
    /// Default 2 s.
    pub wait: Duration,
    /// The backup agent's ring folder. Default: `UNID_BACKUP_RING_DIR`,
    /// else what the pair file `ring_dir/.unid-pair` names, else none.
    pub backup_ring_dir: Option<PathBuf>,
    /// The agent's uid, when it runs as another user than this process
    /// and not as root. Rings, folders and sockets are trusted only when
    /// owned by this process's user, root or this uid. Default:
    /// `UNID_AGENT_UID`, else none.
    pub agent_uid: Option<u32>,
}

impl Default for Options {
    fn default() -> Options {
        let ring_dir = std::env::var_os("UNID_RING_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(RING_DIR_DEFAULT));
        let socket = std::env::var("UNID_SOCKET")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| SOCKET_DEFAULT.parse().expect("valid address"));
        Options {
            ring_dir,
            socket,
            socket_fallback: true,
            wait: Duration::from_secs(2),
            backup_ring_dir: std::env::var_os("UNID_BACKUP_RING_DIR").map(PathBuf::from),
            agent_uid: std::env::var("UNID_AGENT_UID")
                .ok()
                .and_then(|s| s.trim().parse().ok()),
        }
    }
}

enum Source {
    Ring(Consumer),
    Socket { probed: Instant },
}

/// Counters of one handle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Times a paired handle moved from one agent's ring to the other's.
    pub switches: u64,
    /// Ids taken from a ring and discarded because they were not above the
    /// last id returned (after a switch): lost, never repeated.
    pub ids_skipped: u128,
}

/// One ring of a pair.
struct Slot {
    dir: PathBuf,
    consumer: Option<Consumer>,
    /// Closed or agent dead: reopen when due.
    dead: bool,
    reopen_at: Instant,
}

/// Both rings of a primary/backup pair; `current` is the one used last.
struct PairRings {
    slots: [Slot; 2],
    current: usize,
}

/// The pair file's `peer_ring_dir` in `dir`, if any.
fn peer_ring_dir(dir: &std::path::Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(dir.join(".unid-pair")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("peer_ring_dir "))
        .map(PathBuf::from)
        .filter(|p| !p.as_os_str().is_empty() && p != dir)
}

/// A handle on one sequence. Cheap to open; open one per thread (it is
/// `Send`; methods take `&mut self`), or share one behind a `Mutex`.
pub struct Unid {
    sequence: String,
    options: Options,
    source: Source,
    socket: socket::Client,
    width: Option<Width>,
    last: Option<u128>,
    /// Ids from a socket reply not handed out yet (a reply can span
    /// blocks); always handed out before anything newer.
    buffered: std::collections::VecDeque<u128>,
    /// Paired agents: both rings.
    pair: Option<PairRings>,
    /// Ids taken from a ring beyond what was asked (after discarding a
    /// stale run); handed out first.
    spare: Option<(u128, u64)>,
    stats: Stats,
}

impl fmt::Debug for Unid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Unid")
            .field("sequence", &self.sequence)
            .field("via_ring", &self.via_ring())
            .field("width", &self.width)
            .finish()
    }
}

impl Unid {
    /// Opens `sequence` with [`Options::default`].
    pub fn open(sequence: &str) -> Result<Unid, Error> {
        Unid::open_with(sequence, Options::default())
    }

    /// Opens `sequence`: maps its ring, or (with `socket_fallback`) checks
    /// that the agent's socket answers.
    pub fn open_with(sequence: &str, options: Options) -> Result<Unid, Error> {
        if unid_proto::SequenceName::check(sequence).is_err() {
            return Err(Error::InvalidName {
                name: sequence.to_owned(),
            });
        }
        let socket = socket::Client::new(options.socket, &options.ring_dir, options.agent_uid);
        let mut unid = Unid {
            sequence: sequence.to_owned(),
            source: Source::Socket {
                probed: Instant::now(),
            },
            socket,
            width: None,
            last: None,
            buffered: std::collections::VecDeque::new(),
            pair: None,
            spare: None,
            stats: Stats::default(),
            options,
        };
        let primary = unid.open_ring();
        if unid.find_pair(primary.as_ref().ok().map(|c| c.width())) {
            if let Ok(c) = primary {
                unid.width = Width::from_bytes(c.width());
                if let Some(p) = &mut unid.pair {
                    // Mapped again with the pair's liveness options.
                    p.slots[0].consumer =
                        open_paired(&p.slots[0].dir, &unid.sequence, unid.options.agent_uid).ok();
                    p.slots[0].dead = p.slots[0].consumer.is_none();
                }
                drop(c);
            }
            if unid.width.is_some() {
                return Ok(unid);
            }
        }
        match unid.open_ring() {
            Ok(c) => {
                unid.width = Width::from_bytes(c.width());
                unid.source = Source::Ring(c);
            }
            Err(Error::AgentNotRunning { .. }) if unid.options.socket_fallback => {
                match unid.socket.ping() {
                    Ok(()) => {}
                    Err(socket::Failure::Insecure(path, reason)) => {
                        return Err(Error::Insecure { path, reason });
                    }
                    Err(_) => return Err(unid.not_running()),
                }
            }
            Err(e) => return Err(e),
        }
        Ok(unid)
    }

    /// Counters: switches between paired rings, ids discarded.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Whether this handle maps the rings of a primary/backup pair.
    pub fn paired(&self) -> bool {
        self.pair.is_some()
    }

    /// Looks for a backup ring folder (options, then the pair file) and,
    /// if there is one, sets up pair mode with the backup's ring mapped if
    /// it exists. With `width` (the primary ring's), a backup ring of
    /// another width is not used. Returns whether pair mode is on.
    fn find_pair(&mut self, width: Option<u8>) -> bool {
        if self.pair.is_some() {
            return true;
        }
        let Some(dir) = self
            .options
            .backup_ring_dir
            .clone()
            .or_else(|| peer_ring_dir(&self.options.ring_dir))
        else {
            return false;
        };
        let now = Instant::now();
        let backup = open_paired(&dir, &self.sequence, self.options.agent_uid)
            .ok()
            .filter(|c| width.is_none_or(|w| w == c.width()));
        if self.width.is_none()
            && let Some(c) = &backup
        {
            self.width = Width::from_bytes(c.width());
        }
        self.pair = Some(PairRings {
            slots: [
                Slot {
                    dir: self.options.ring_dir.clone(),
                    consumer: None,
                    dead: false,
                    reopen_at: now,
                },
                Slot {
                    dir,
                    consumer: backup,
                    dead: false,
                    reopen_at: now + RING_REOPEN_EVERY,
                },
            ],
            current: 0,
        });
        true
    }

    /// The sequence's name.
    pub fn sequence(&self) -> &str {
        &self.sequence
    }

    /// The sequence's width, once known (from the ring, or the first id).
    pub fn width(&self) -> Option<Width> {
        self.width
    }

    /// Whether ids come from the shared-memory ring (else the socket).
    pub fn via_ring(&self) -> bool {
        matches!(self.source, Source::Ring(_))
            || self
                .pair
                .as_ref()
                .is_some_and(|p| p.slots.iter().any(|s| s.consumer.is_some()))
    }

    /// In pair mode: whether the ring used last is the backup's (the one
    /// named by `backup_ring_dir` or the pair file).
    pub fn on_backup(&self) -> bool {
        self.pair.as_ref().is_some_and(|p| p.current == 1)
    }

    /// The next id: from the ring (waiting up to `options.wait` if it is
    /// empty), else from the agent's socket.
    #[allow(clippy::should_implement_trait)] // fallible; `Iterator` would hide errors
    #[inline]
    pub fn next(&mut self) -> Result<Id, Error> {
        // Fast path: one ring (no pair), nothing spare or buffered from the socket: one take
        // from the ring and the checks of `take_range`, no clock, no allocation, no copy of a
        // large result. Anything else (an empty, closed or dead ring, a pair, the socket)
        // goes the general way, which takes nothing more than this did not.
        if let Source::Ring(c) = &self.source
            && let Some(width) = self.width
            && c.width() == width.bytes()
            && self.spare.is_none()
            && self.buffered.is_empty()
            && self.pair.is_none()
            && let Ok(r) = c.try_take_range(1)
        {
            // `width.limit()` without its branches: 2^(8 * bytes) - 1.
            let limit = u128::MAX >> (128 - 8 * u32::from(width.bytes()));
            debug_assert_eq!(limit, width.limit());
            // The checks of `accept` for a run asked of at most one id.
            if r.count == 1 && r.first < limit && self.last.is_none_or(|l| r.first > l) {
                self.last = Some(r.first);
                return Ok(Id {
                    value: r.first,
                    width,
                });
            }
            return Err(self.corrupt(r.first, r.count));
        }
        self.next_general()
    }

    /// [`Unid::next`] the general way (through [`Unid::take_range`]).
    #[inline(never)]
    fn next_general(&mut self) -> Result<Id, Error> {
        let (first, count) = self.take_range(1)?;
        debug_assert_eq!(count, 1);
        Ok(first)
    }

    /// Checks a run taken for a request of at most `max` ids and makes it this handle's
    /// last: ids from one handle increase (the ring only moves forward, a restarted agent's
    /// blocks lie above every earlier one, a paired handle discards what is not above the
    /// last id). A ring written outside the protocol (a rewound head, a lowered block)
    /// breaks that: checked here, never trusted, never a panic.
    #[inline]
    fn accept(
        &mut self,
        first: u128,
        count: u64,
        max: u64,
        width: Width,
    ) -> Result<(Id, u64), Error> {
        let end = first.checked_add(u128::from(count));
        let fits = end.is_some_and(|e| width.contains(e - 1));
        if count == 0 || count > max || !fits || self.last.is_some_and(|l| first <= l) {
            return Err(self.corrupt(first, count));
        }
        self.last = Some(first + u128::from(count) - 1);
        self.width = Some(width);
        Ok((
            Id {
                value: first,
                width,
            },
            count,
        ))
    }

    /// The run `first`+`count` may not be returned (see [`Unid::accept`]).
    #[cold]
    fn corrupt(&self, first: u128, count: u64) -> Error {
        Error::Corrupt {
            sequence: self.sequence.clone(),
            first,
            count,
            last: self.last,
        }
    }

    /// `n` ids (1..=[`TAKE_IDS_MAX`]), increasing. Consecutive runs come
    /// from one block; there may be gaps between runs.
    pub fn take(&mut self, n: usize) -> Result<Vec<Id>, Error> {
        if !(1..=TAKE_IDS_MAX).contains(&n) {
            return Err(Error::BadCount { asked: n });
        }
        let mut ids = Vec::with_capacity(n);
        while ids.len() < n {
            let (first, count) = self.take_range((n - ids.len()) as u64)?;
            ids.extend((0..count).map(|i| Id {
                value: first.value + u128::from(i),
                width: first.width,
            }));
        }
        Ok(ids)
    }

    /// Up to `max` consecutive ids (at least one): `(first, count)`, the
    /// ids `first .. first + count`. The cheapest way to take many.
    pub fn take_range(&mut self, max: u64) -> Result<(Id, u64), Error> {
        let max = max.clamp(1, socket::SOCKET_IDS_MAX);
        let (first, count, width) = self.take_raw(max)?;
        self.accept(first, count, max, width)
    }

    fn take_raw(&mut self, max: u64) -> Result<(u128, u64, Width), Error> {
        if let (Some((first, count)), Some(width)) = (self.spare.take(), self.width) {
            let n = count.min(max);
            if n < count {
                self.spare = Some((first + u128::from(n), count - n));
            }
            return Ok((first, n, width));
        }
        if let (Some(&first), Some(width)) = (self.buffered.front(), self.width) {
            return Ok(self.take_buffered(first, max, width));
        }
        if self.pair.is_some() {
            return self.take_pair(max);
        }
        if let Source::Socket { probed } = self.source
            && probed.elapsed() >= RING_PROBE_EVERY
        {
            if self.find_pair(None) {
                return self.take_pair(max);
            }
            match self.open_ring() {
                Ok(c) => self.source = Source::Ring(c),
                Err(_) => {
                    self.source = Source::Socket {
                        probed: Instant::now(),
                    }
                }
            }
        }
        let reopened = false;
        self.take_ring_or_socket(max, reopened)
    }

    /// Takes from a pair of rings: the current one, else the other (then
    /// current), discarding ids not above the last returned; waits in short
    /// slices on both while both are empty, up to `options.wait`.
    fn take_pair(&mut self, max: u64) -> Result<(u128, u64, Width), Error> {
        // Read the clock only once the first look found nothing.
        let mut deadline: Option<Instant> = None;
        loop {
            // The first ring (current first) found empty but alive.
            let mut live: Option<usize> = None;
            let current = self.pair.as_ref().expect("pair mode").current;
            for k in [current, 1 - current] {
                self.reopen_if_due(k);
                let last = self.last;
                let pair = self.pair.as_mut().expect("pair mode");
                let slot = &mut pair.slots[k];
                let Some(c) = &slot.consumer else { continue };
                let Some(width) = Width::from_bytes(c.width()) else {
                    continue;
                };
                if self.width.is_some_and(|w| w != width) {
                    continue; // Not the same sequence: never mixed.
                }
                match take_fresh(c, max, last, &mut self.stats) {
                    Ok((first, count, spare)) => {
                        if k != pair.current {
                            pair.current = k;
                            self.stats.switches += 1;
                        }
                        slot.dead = false;
                        self.spare = spare;
                        self.width = Some(width);
                        return Ok((first, count, width));
                    }
                    Err(RingError::WouldBlock) => {
                        live = live.or(Some(k));
                    }
                    Err(RingError::Closed | RingError::AgentDead { .. }) => {
                        slot.dead = true;
                    }
                    Err(e) => return Err(Error::Ring(e)),
                }
            }
            let now = Instant::now();
            let deadline = *deadline.get_or_insert(now + self.options.wait);
            if now >= deadline {
                return self.diagnose(max, live.is_some());
            }
            let Some(k) = live else {
                // Both agents gone (or no ring yet). With no ring mapped at
                // all the socket may answer; else look again shortly (a
                // dead ring is mapped again when due).
                let pair = self.pair.as_ref().expect("pair mode");
                let unmapped = pair.slots.iter().all(|s| s.consumer.is_none());
                if unmapped
                    && self.options.socket_fallback
                    && let Ok(got) = self.take_socket(max)
                {
                    return Ok(got);
                }
                std::thread::sleep(PAIR_WAIT_SLICE);
                continue;
            };
            // Both empty: wait briefly on a live ring of this sequence's
            // width (a push wakes it), then look at both again.
            let pair = self.pair.as_ref().expect("pair mode");
            let Some(c) = &pair.slots[k].consumer else {
                continue;
            };
            let Some(width) = Width::from_bytes(c.width()) else {
                continue;
            };
            let slice = PAIR_WAIT_SLICE.min(deadline.saturating_duration_since(now));
            if let Ok(r) = c.take_range_timeout(max, slice) {
                let mut stats = self.stats;
                if let Some((first, count, spare)) = fresh(r, max, self.last, &mut stats) {
                    self.stats = stats;
                    let pair = self.pair.as_mut().expect("pair mode");
                    if k != pair.current {
                        pair.current = k;
                        self.stats.switches += 1;
                    }
                    self.spare = spare;
                    return Ok((first, count, width));
                }
                self.stats = stats;
            }
        }
    }

    /// Maps slot `k`'s ring again if it is missing or dead and it is time.
    fn reopen_if_due(&mut self, k: usize) {
        let pair = self.pair.as_mut().expect("pair mode");
        let slot = &mut pair.slots[k];
        if (slot.consumer.is_some() && !slot.dead) || Instant::now() < slot.reopen_at {
            return;
        }
        slot.reopen_at = Instant::now() + RING_REOPEN_EVERY;
        if let Ok(c) = open_paired(&slot.dir, &self.sequence, self.options.agent_uid) {
            // The same file again (agent still dead) is harmless.
            slot.consumer = Some(c);
            slot.dead = false;
        }
    }

    /// The first consecutive run (at most `max`) of the buffered ids.
    fn take_buffered(&mut self, first: u128, max: u64, width: Width) -> (u128, u64, Width) {
        let mut count = 0u64;
        while count < max && self.buffered.front() == Some(&(first + u128::from(count))) {
            self.buffered.pop_front();
            count += 1;
        }
        assert!(count >= 1);
        (first, count, width)
    }

    fn take_ring_or_socket(
        &mut self,
        max: u64,
        reopened: bool,
    ) -> Result<(u128, u64, Width), Error> {
        let Source::Ring(consumer) = &self.source else {
            return self.take_socket(max);
        };
        // ok_or_else: the error owns a PathBuf, and building it on every take cost a malloc
        // and free per id (next() 22M/s → 36M/s measured by bench_gates without them).
        let width = Width::from_bytes(consumer.width()).ok_or_else(|| {
            Error::Ring(RingError::Corrupt {
                path: consumer.path().to_path_buf(),
                reason: "width",
            })
        })?;
        let got = match consumer.try_take_range(max) {
            Err(RingError::WouldBlock) => consumer.take_range_timeout(max, self.options.wait),
            other => other,
        };
        if matches!(
            got,
            Err(RingError::Closed | RingError::AgentDead { .. } | RingError::TimedOut)
        ) && self.find_pair(Some(width.bytes()))
        {
            // A pair file appeared since this handle opened: use both rings.
            if let Source::Ring(c) = std::mem::replace(
                &mut self.source,
                Source::Socket {
                    probed: Instant::now(),
                },
            ) && let Some(p) = &mut self.pair
            {
                p.slots[0].consumer = Some(c);
                p.slots[0].dead = true; // Reopened when due.
            }
            return self.take_pair(max);
        }
        match got {
            Ok(r) => Ok((r.first, r.count, width)),
            Err(RingError::Closed | RingError::AgentDead { .. }) if !reopened => {
                // A restarted agent replaces the file: map the new one.
                match self.open_ring() {
                    Ok(c) => {
                        self.source = Source::Ring(c);
                        self.take_ring_or_socket(max, true)
                    }
                    Err(_) => self.diagnose(max, false),
                }
            }
            Err(RingError::Closed | RingError::AgentDead { .. }) => self.diagnose(max, false),
            Err(RingError::TimedOut) => self.diagnose(max, true),
            Err(e) => Err(Error::Ring(e)),
        }
    }

    /// The ring gave nothing: ask the socket (it knows why, and may have
    /// ids after all), else say what the ring said: empty with a live agent
    /// (`agent_alive`) or no agent.
    fn diagnose(&mut self, max: u64, agent_alive: bool) -> Result<(u128, u64, Width), Error> {
        let empty = Error::NotReady {
            sequence: self.sequence.clone(),
            detail: format!("the ring stayed empty for {:?}", self.options.wait),
        };
        if !self.options.socket_fallback {
            return Err(if agent_alive {
                empty
            } else {
                self.not_running()
            });
        }
        match self.take_socket(max) {
            Err(Error::AgentNotRunning { .. }) if agent_alive => Err(empty),
            other => other,
        }
    }

    fn take_socket(&mut self, max: u64) -> Result<(u128, u64, Width), Error> {
        match self.socket.next(&self.sequence, max) {
            Ok((mut ids, width)) => {
                assert!(self.buffered.is_empty() && !ids.is_empty());
                // After a switch between paired agents, this agent's ids
                // may lie below the last one returned: discard those.
                if let Some(l) = self.last {
                    let before = ids.len();
                    ids.retain(|&i| i > l);
                    self.stats.ids_skipped += (before - ids.len()) as u128;
                    if ids.is_empty() {
                        return Err(Error::NotReady {
                            sequence: self.sequence.clone(),
                            detail: "the agent's ids are below the last one returned".into(),
                        });
                    }
                }
                let first = ids[0];
                self.buffered.extend(ids);
                Ok(self.take_buffered(first, max, width))
            }
            Err(socket::Failure::Refused) => Err(self.not_running()),
            Err(socket::Failure::Agent { code, text }) => Err(match code.as_str() {
                "UNKNOWN_SEQUENCE" => Error::UnknownSequence {
                    sequence: self.sequence.clone(),
                    detail: text,
                },
                "EXHAUSTED" => Error::Exhausted {
                    sequence: self.sequence.clone(),
                },
                _ => Error::NotReady {
                    sequence: self.sequence.clone(),
                    detail: format!("{code} {text}"),
                },
            }),
            Err(socket::Failure::Protocol(line)) => Err(Error::Protocol {
                socket: self.options.socket,
                line,
            }),
            Err(socket::Failure::Insecure(path, reason)) => Err(Error::Insecure { path, reason }),
            Err(socket::Failure::Io(op, source)) => Err(Error::Io {
                op,
                socket: self.options.socket,
                source,
            }),
        }
    }

    fn not_running(&self) -> Error {
        Error::AgentNotRunning {
            sequence: self.sequence.clone(),
            ring_dir: self.options.ring_dir.clone(),
            socket: self.options.socket,
        }
    }

    fn open_ring(&self) -> Result<Consumer, Error> {
        let opts = unid_ring::ConsumerOptions {
            agent_uid: self.options.agent_uid,
            ..unid_ring::ConsumerOptions::default()
        };
        match Consumer::open_with(&self.options.ring_dir, &self.sequence, opts) {
            Ok(c) => Ok(c),
            Err(RingError::NotFound { .. }) => Err(Error::AgentNotRunning {
                sequence: self.sequence.clone(),
                ring_dir: self.options.ring_dir.clone(),
                socket: self.options.socket,
            }),
            Err(RingError::PermissionDenied { path }) => Err(Error::PermissionDenied { path }),
            Err(RingError::InvalidName { name }) => Err(Error::InvalidName { name }),
            Err(RingError::Insecure { path, reason }) => Err(Error::Insecure { path, reason }),
            Err(e) => Err(Error::Ring(e)),
        }
    }
}

/// Ids to return, `(first, count)`, and the rest of the run taken beyond
/// them (`spare`).
type Run = (u128, u64, Option<(u128, u64)>);

/// Maps a ring of a pair (liveness judged by [`PAIR_AGENT_STALE_MS`]).
fn open_paired(
    dir: &std::path::Path,
    sequence: &str,
    agent_uid: Option<u32>,
) -> Result<Consumer, RingError> {
    let opts = unid_ring::ConsumerOptions {
        agent_stale_ms: PAIR_AGENT_STALE_MS,
        agent_uid,
        ..unid_ring::ConsumerOptions::default()
    };
    Consumer::open_with(dir, sequence, opts)
}

/// What of range `r` a handle whose last id is `last` may return: `None`
/// if all of it is not above `last` (discarded, counted in `stats`); a run
/// straddling `last` is cut; beyond `max`, the rest is a spare.
fn fresh(r: unid_ring::IdRange, max: u64, last: Option<u128>, stats: &mut Stats) -> Option<Run> {
    assert!(r.count >= 1);
    let end = r.first + u128::from(r.count); // exclusive
    let (first, count) = match last {
        Some(l) if end - 1 <= l => {
            stats.ids_skipped += u128::from(r.count);
            return None;
        }
        Some(l) if r.first <= l => {
            stats.ids_skipped += l - r.first + 1;
            (l + 1, (end - (l + 1)) as u64)
        }
        _ => (r.first, r.count),
    };
    if count > max {
        return Some((first, max, Some((first + u128::from(max), count - max))));
    }
    Some((first, count, None))
}

/// Takes up to `max` ids from `c` above `last` without waiting, discarding
/// whole blocks that are not above it (at most [`SKIP_TAKES_MAX`] takes).
fn take_fresh(
    c: &Consumer,
    max: u64,
    last: Option<u128>,
    stats: &mut Stats,
) -> Result<Run, RingError> {
    let mut ask = max;
    for _ in 0..SKIP_TAKES_MAX {
        let r = c.try_take_range(ask)?;
        match fresh(r, max, last, stats) {
            Some(got) => return Ok(got),
            None => ask = u64::MAX, // Discard whole blocks from now on.
        }
    }
    Err(RingError::WouldBlock)
}
