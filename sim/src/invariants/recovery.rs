//! **Recovery**: a server that crashed (its unsynced writes lost, or some
//! of them kept: a torn commit) restarts from its disk. redb must recover
//! its last durable commit; the store must load its log, vote and state
//! machine from it. A restart that fails is a durability bug.

use unid_proto::NodeId;

/// Checks the outcome of restarting `server`.
pub fn restarted(server: NodeId, outcome: Result<(), String>) -> Result<(), String> {
    outcome.map_err(|e| format!("server {server} cannot restart from its disk: {e}"))
}
