//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong creating, opening or using a ring.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    /// No ring file at this path (no agent serves this sequence on this host, or a wrong dir).
    #[error("no ring at {path}: is the agent running for this sequence?")]
    NotFound {
        /// The ring file's path.
        path: PathBuf,
    },
    /// The file exists but this process may not open it read-write (mode 0600/0660, group).
    #[error(
        "permission denied opening ring {path}: the consumer must be the agent's user or in its group"
    )]
    PermissionDenied {
        /// The ring file's path.
        path: PathBuf,
    },
    /// The file does not start with the ring magic: not a unid ring.
    #[error("{path} is not a unid ring (magic {found:#018x})")]
    BadMagic {
        /// The ring file's path.
        path: PathBuf,
        /// The first 8 bytes, little-endian.
        found: u64,
    },
    /// A unid ring of a layout version this build does not understand.
    #[error("ring {path} has layout version {found}, this build understands {supported}")]
    UnsupportedVersion {
        /// The ring file's path.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Version this crate reads.
        supported: u32,
    },
    /// The header or a slot is inconsistent (size, width, capacity, slot contents).
    #[error("ring {path} is corrupt: {reason}")]
    Corrupt {
        /// The ring file's path.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// The ring is empty right now; try again (or use a `take_*_timeout`).
    #[error("ring is empty")]
    WouldBlock,
    /// A `take_*_timeout` waited its whole timeout and the ring stayed empty.
    #[error("ring stayed empty for the whole timeout")]
    TimedOut,
    /// The ring is empty and its agent is dead: heartbeat older than the bound, or pid gone.
    #[error("agent (pid {pid}) of this ring is dead: heartbeat {heartbeat_age_ms} ms old")]
    AgentDead {
        /// The agent's pid as written in the header.
        pid: u32,
        /// Age of its last heartbeat.
        heartbeat_age_ms: u64,
    },
    /// The agent closed the ring (shut down or replaced it) and it is drained.
    #[error("ring closed by its agent and drained")]
    Closed,
    /// A system call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// The operation (`open`, `mmap`, `rename`, ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `Producer::create` found a ring at this path whose agent (another live process) is still
    /// serving it: not closed, heartbeat fresh, pid present.
    #[error("ring {path} is served by a live agent (pid {pid})")]
    InUse {
        /// The ring file's path.
        path: PathBuf,
        /// The other agent's pid.
        pid: u32,
    },
    /// A sequence name that cannot be a file name (empty, `/`, leading `.`, NUL, > 200 bytes).
    #[error("invalid ring name {name:?}")]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// Bad producer options (width, capacity, mode).
    #[error("invalid ring configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: &'static str,
    },
    /// `push` with a first id below the end of the previous block.
    #[error("push of {first} is not increasing: next id must be at least {next_min}")]
    NotIncreasing {
        /// First id pushed.
        first: u128,
        /// Smallest acceptable first id.
        next_min: u128,
    },
    /// `push` with count 0, or ids beyond the width's largest id.
    #[error("push of {count} ids from {first} is out of range for width {width}")]
    OutOfRange {
        /// First id pushed.
        first: u128,
        /// Count pushed.
        count: u64,
        /// Ring width in bytes.
        width: u8,
    },
    /// The ring folder or file could have been made or changed by someone other than the agent:
    /// a symlink, a foreign owner, or writable by others (see `ring/README.md`, threat model).
    #[error("refusing ring {path}: {reason}")]
    Insecure {
        /// The folder or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The ring published its last possible block (2^44 - 2): create a new ring.
    #[error("ring exhausted its 2^44 block indices; create a new ring")]
    Exhausted,
}
