//! The crate's one error type.

use unid_proto::{Id, SeqNo};

/// Everything that can go wrong in `unid-core`.
///
/// Variants are small and `Copy`-like (no names, no strings): the caller knows
/// which sequence or request it asked about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range; `field` names it, `reason` says
    /// which bound it broke.
    #[error("invalid config: {field} {reason}")]
    InvalidConfig {
        /// The field, as spelled in the config struct.
        field: &'static str,
        /// The bound it broke.
        reason: &'static str,
    },
    /// The sequence has no ids left below its width's limit. Ids never wrap;
    /// this is final.
    #[error("sequence exhausted: no ids left below its width's limit")]
    Exhausted,
    /// This leader has not yet had a ceiling raise committed for the
    /// sequence, so it may not grant from it. Retry shortly.
    #[error("leader not ready: its first ceiling raise has not committed yet")]
    NotReady,
    /// The leader has granted everything below its committed ceiling and is
    /// waiting for a raise to commit. Retry shortly. In steady state this does
    /// not happen: raises are asked for ahead of demand.
    #[error("no committed headroom: waiting for a ceiling raise to commit")]
    AwaitingRaise,
    /// The sequence is not known to this state machine.
    #[error("unknown sequence")]
    UnknownSequence,
    /// The sequence is already known (added twice).
    #[error("sequence already known")]
    DuplicateSequence,
    /// Adding the sequence would exceed the configured bound.
    #[error("too many sequences (at most {max})")]
    TooManySequences {
        /// The configured bound (`sequences_max`).
        max: usize,
    },
    /// A request asked for zero ids.
    #[error("request for zero ids")]
    EmptyRequest,
    /// A committed ceiling was reported that this leader never proposed: it
    /// belongs to another leader, and using it could repeat ids. Not applied.
    #[error("committed ceiling {ceiling} is above any this leader proposed ({proposed_max})")]
    CeilingNotProposed {
        /// The ceiling reported.
        ceiling: Id,
        /// The highest ceiling this leader proposed (or started from).
        proposed_max: Id,
    },
    /// A ceiling above the width's limit.
    #[error("ceiling {ceiling} is above the width's limit {limit}")]
    CeilingOutOfRange {
        /// The ceiling given.
        ceiling: Id,
        /// The width's exclusive limit.
        limit: Id,
    },
    /// The requester already has `max` requests outstanding.
    #[error("too many outstanding requests (at most {max})")]
    TooManyOutstanding {
        /// The configured bound (`requests_max`).
        max: usize,
    },
    /// A request got no usable answer after every allowed transmission.
    #[error("request {seq} got no usable answer after {attempts} attempts")]
    AttemptsExhausted {
        /// The request's sequence number.
        seq: SeqNo,
        /// Transmissions made (`attempts_max`).
        attempts: u32,
    },
    /// A request got no usable answer before its deadline.
    #[error("request {seq} got no usable answer within {waited_ms} ms")]
    DeadlineExceeded {
        /// The request's sequence number.
        seq: SeqNo,
        /// How long it waited (`request_timeout_ms`).
        waited_ms: u64,
    },
    /// The requester has used every sequence number (`u64::MAX` requests).
    #[error("request sequence numbers exhausted")]
    SeqNoExhausted,
}
