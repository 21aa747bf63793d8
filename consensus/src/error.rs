//! The crate's error type.

use std::time::Duration;

use unid_proto::types::NodeId;

use crate::state::Rejection;

/// Everything that can go wrong in `unid-consensus`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The embedded database could not be opened, read or written (the
    /// operation and file are in the message).
    #[error("storage: {0}")]
    Storage(String),
    /// Binding or accepting on the Raft address failed.
    #[error("network I/O on {addr}: {source}")]
    Io {
        /// The address involved.
        addr: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The configuration is invalid (the message says which field).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// This node is not the leader; the leader, if known, is given so the
    /// caller can send the request there.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader's id and Raft address, if known.
        leader: Option<(NodeId, String)>,
    },
    /// Forwarding a write to the leader failed (unreachable, connection
    /// lost, or the leader failed it).
    #[error("forwarding to leader {leader}: {reason}")]
    Forward {
        /// The leader it was sent to.
        leader: NodeId,
        /// What went wrong.
        reason: String,
    },
    /// The operation did not finish in time (e.g. no quorum to commit).
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The state machine refused the command.
    #[error("rejected: {0}")]
    Rejected(#[from] Rejection),
    /// The cluster is already initialized; `initialize` is a one-time step.
    #[error("already initialized")]
    AlreadyInitialized,
    /// The Raft core stopped (shut down, or a storage error made it stop).
    #[error("raft stopped: {0}")]
    Stopped(String),
    /// Another Raft error (membership change refused, quorum lost, ...).
    #[error("raft: {0}")]
    Raft(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
