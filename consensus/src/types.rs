//! The openraft type configuration.

use std::io::Cursor;

use crate::state::{Command, Response};

openraft::declare_raft_types!(
    /// unid's Raft types: commands are [`Command`], results [`Response`], node
    /// ids `u64` ([`unid_proto::types::NodeId`]), nodes carry their Raft
    /// address in [`openraft::BasicNode`], snapshots are in-memory byte
    /// buffers, and the runtime is tokio.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// openraft's storage error for this config.
pub type StorageError = openraft::StorageError<u64>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<u64, openraft::BasicNode>;
/// Stored membership.
pub type StoredMembership = openraft::StoredMembership<u64, openraft::BasicNode>;
