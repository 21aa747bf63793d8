//! The crate's error type.

use unid_proto::NodeId;

/// Why a simulation could not run (a violated invariant is not an error: it
/// is reported in [`crate::Report::violations`]).
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The tokio runtime could not be built.
    #[error("building the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// A server's consensus node refused to start or to bootstrap.
    #[error("consensus on server {server}: {source}")]
    Consensus {
        /// The server.
        server: NodeId,
        /// What consensus said.
        #[source]
        source: unid_consensus::Error,
    },
    /// A `unid-core` state machine rejected its configuration.
    #[error("core: {0}")]
    Core(#[from] unid_core::Error),
    /// The simulation's own configuration is invalid.
    #[error("invalid simulation config: {0}")]
    Config(String),
    /// The cluster did not elect a leader and create its sequences during
    /// the fault-free setup phase.
    #[error("setup: {0}")]
    Setup(String),
}
