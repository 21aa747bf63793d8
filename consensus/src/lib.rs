//! unid consensus: the Raft-replicated part of a unid server.
//!
//! Built on [`openraft`] **0.9.25** (pinned; the stable line, tokio runtime)
//! with a durable log store and state machine on [`redb`] **4.5.0**
//! (pinned), and a small TCP transport of its own.
//!
//! | module | what |
//! |---|---|
//! | [`state`] | the replicated state ([`state::ClusterState`]) and the pure, deterministic `apply` of a [`state::Command`] |
//! | [`store`] | redb log store + state machine; every write fsync'd |
//! | [`types`] | the openraft type configuration |
//! | [`frame`] | peer frames: length, payload, CRC32, optional MAC |
//! | [`network`] | openraft RPCs over TCP: client and server |
//! | [`node`] | [`node::ConsensusNode`], the handle the engine drives |
//! | [`error`] | the crate's [`error::Error`] |
//!
//! # What is replicated
//! Every sequence (name, width, start, **committed ceiling**), the node table
//! (servers and agents: id, address, port, role, incarnation, registered /
//! last-seen term), cluster settings, and the agent id counter. Commands:
//! `CreateSequence`, `RaiseCeiling` (max semantics; never above
//! `Width::limit()`), `RegisterAgent` (fresh id from a counter that starts at
//! [`state::AGENT_ID_FIRST`] = 2^32 and never goes back, so agent ids are
//! never reused and never collide with server ids `1..2^32`),
//! `UpsertServer`, `TouchNode`, `RemoveNode`, `SetSetting`.
//!
//! # Why ids granted under a ready ceiling are unique across leaders
//! The rule the engine must follow:
//!
//! 1. A leader grants an id `x` of sequence `S` only if `x < C`, where `C`
//!    is a ceiling it knows is **committed**: the answer of
//!    [`raise_ceiling`](node::ConsensusNode::raise_ceiling) (the state
//!    machine's value after applying a committed entry) or a value read by
//!    [`ready_ceilings`](node::ConsensusNode::ready_ceilings).
//! 2. When a node becomes leader it calls `ready_ceilings` and treats every
//!    id below the ceiling it reads as possibly granted: it starts granting
//!    at `>=` that ceiling, after committing a higher one.
//!
//! Why that is enough. Let leader `L1` (term `t1`) grant `x < C1`, with
//! `C1` committed at log index `i1`. Let `L2` be a leader of any later term
//! `t2 > t1`.
//! * **"Later" means a greater leader id `(term, node id)`.** openraft 0.9
//!   without its `single-term-leader` feature (this crate's configuration)
//!   identifies a leader by `LeaderId { term, node_id }`, totally ordered,
//!   and may elect two leaders in one term: a voter that voted for `(4, 1)`
//!   also grants the greater `(4, 2)` (found by the simulator in `sim/`).
//!   Read every "later term" here as "greater leader id": Leader
//!   Completeness holds in that order, and the smaller of two leaders of
//!   one term can no longer commit once a voter moved on, so it never
//!   passes `ready_ceilings` and never grants. One server never leads twice
//!   in one term, so the engine's use of the term as its leadership epoch
//!   stays sound.
//! * Raft's *Leader Completeness* property: an entry committed in some term
//!   is in the log of every leader of every later term. So `L2`'s log holds
//!   entry `i1`. (This rests on every node persisting its vote and log
//!   before answering — see [`store`]: every write is fsync'd first.)
//! * `L2` may not yet *know* `i1` is committed: a new leader learns what is
//!   committed only by committing an entry of its own term (Raft §5.4.2).
//!   openraft's leader appends a blank entry at the start of its term.
//!   `ready_ceilings` calls [`openraft::Raft::ensure_linearizable`], whose
//!   read index is `max(committed, the leader's blank entry)`, and waits
//!   until the state machine has **applied** up to it. The blank entry comes
//!   after `i1` in `L2`'s log, so `i1` has been applied, and because
//!   `RaiseCeiling` only ever raises, the ceiling `L2` reads is `>= C1 > x`.
//! * `ensure_linearizable` also confirms, with a quorum of heartbeats, that
//!   `L2` is still the leader when it is called; a node that lost leadership
//!   gets an error, not a stale ceiling.
//! * **An old, partitioned leader.** `L1` may not know it was deposed and
//!   may go on granting — but only below ceilings already committed (rule
//!   1), all of which `L2` has seen, as shown. To grant more it must commit a
//!   higher ceiling, which needs a majority in term `t1`; a majority has
//!   moved to `t2` and rejects `t1` entries, so the raise fails (or times
//!   out) and `L1` grants nothing new. Two leaders at once thus hand out
//!   disjoint ranges: `L1` below `C1`, `L2` at or above its ready ceiling
//!   `>= C1`.
//! * Crashes: a ceiling is committed only once a majority fsync'd it, so any
//!   majority that elects a later leader still holds it after restarts.
//!
//! [`state`](node::ConsensusNode::state) reads the local applied state with
//! none of these guarantees (a lagging follower, a deposed leader): use it
//! for display, never for granting.
//!
//! # Timing and failover
//! [`node::Timing::default`]: heartbeat 20 ms, election timeout randomized
//! in 60–100 ms. In openraft 0.9 the upper bound is also the **leader
//! lease**: a voter that heard from a leader within `election_max_ms`
//! refuses to vote for anyone else, and a follower that was following a
//! leader starts an election only after `lease + its election timeout`
//! without hearing from it (timers are checked every `1.5 * heartbeat`).
//! So after a leader dies a new one is elected after about
//! `100 + [60, 100) + <= 30` ms plus one vote round trip: **160–230 ms**.
//! Measured by `three_nodes_elect_raise_and_fail_over` (debug build,
//! loopback, 2 cores, 10 runs, from the stop call to a node reporting
//! itself leader): crash median ~205 ms (range 180–240 ms, the top with
//! two busy-looping processes competing for the CPUs). The
//! "heartbeat 50 / election 150–300 ms" often quoted would give 450–650 ms
//! with this lease rule.
//!
//! # Leader handoff on shutdown
//! openraft 0.9.25 has no leadership-transfer API (0.10, still alpha, adds
//! `Trigger::transfer_leader`). The closest sound thing, done by
//! [`shutdown`](node::ConsensusNode::shutdown): the leader picks the voter
//! with the highest matched log id, stops its own Raft (no more heartbeats),
//! and sends that voter an `Elect` RPC. The voter waits
//! `election_max_ms + heartbeat_ms / 2` — until the other voters' leases
//! have run out, since before that they would refuse its vote — and then
//! calls `raft.trigger().elect()` unless another leader appeared. Being the
//! most up-to-date voter it wins the vote, typically before any randomized
//! timer fires. Result: a new leader ~`election_max_ms` + one round trip
//! after shutdown (~110 ms with the defaults; measured median ~125 ms,
//! range 120–160 ms, in the same runs) instead of
//! 160–230 ms, and a deterministic successor. It is safe whatever happens:
//! if the `Elect` RPC is lost, ordinary elections take over; triggering an
//! election is always allowed by Raft. A leader cannot make its followers
//! drop their leases early in 0.9, so the lease wait cannot be skipped.
//!
//! # Removing a server
//! [`remove_server`](node::ConsensusNode::remove_server) commits the
//! membership change and then tells the removed server (an openraft 0.9
//! leader stops replicating to it, so it would not learn it from the log).
//! The removed server disables its own elections and its
//! [`leader_watch`](node::ConsensusNode::leader_watch) reports
//! `member == false`: it must stop serving. If it was down at that moment,
//! it never wins an election anyway (its log is behind every remaining
//! voter's), and the operator should not restart it.
//!
//! # Limits
//! Frames: 16 MiB payload ([`frame::FRAME_PAYLOAD_BYTES_MAX`]); snapshot
//! chunks 1 MiB by default. Peer connections accepted: 256. Sequences,
//! nodes: 100,000 each; settings 64; text fields 255 bytes (see
//! [`state`]). Writes and linearizable reads time out after
//! `write_timeout_ms` (2 s by default).

pub mod error;
pub mod frame;
pub mod network;
pub mod node;
/// The replicated state lives in `unid-core` (pure, shared with the server state machine
/// of `unid-machine`); re-exported here under its old path.
pub use unid_core::state;
pub mod store;
pub mod types;

pub use error::{Error, Result};
pub use node::{ConsensusNode, LeaderInfo, NodeConfig, NodeMetrics, Role, Timing};
pub use state::{
    ClusterState, Command, NodeKind, NodeRecord, Rejection, Response, SETTING_CLUSTER_ID,
    SequenceState,
};
pub use store::AppliedState;
