//! The unid id logic as plain state machines. Time (`now_us`) and randomness
//! are passed in; nothing here reads a clock, a socket or a file.
//!
//! Time is always `now_us: u64`, microseconds on a monotonic clock from an
//! arbitrary origin. A `now_us` earlier than one already passed in is treated
//! as the later one (time never goes backwards inside a state machine).
//!
//! | Module | Side | State machine |
//! |---|---|---|
//! | [`sequence`] | both | ids left in a width; caps that scale with small widths |
//! | [`allocator`] | leader | committed ceiling, raise-ahead, block grants |
//! | [`sizing`] | agent | block size from the measured consumption rate |
//! | [`rate`] | both | time-decayed rate estimate (ids per second) |
//! | [`requester`] | agent | request seq, retransmit, backoff, redirects, epochs |
//! | [`dedupe`] | server | reply cache keyed by (agent, seq) |
//!
//! Every state machine has a validated configuration with a bound on each
//! queue, cache and retry loop (TigerBeetle's "limit on everything"); every
//! failure is an [`Error`] variant.
#![forbid(unsafe_code)]

pub mod allocator;
pub mod dedupe;
pub mod error;
pub mod rate;
pub mod requester;
pub mod sequence;
pub mod sizing;

pub use allocator::{
    AllocatorConfig, AllocatorStats, CommittedCeiling, LeaderAllocator, Raise, SequenceView,
};
pub use dedupe::{Lookup, ReplyCache, ReplyCacheConfig, ReplyCacheStats};
pub use error::Error;
pub use rate::Rate;
pub use requester::{
    Disposition, Event, Reply, Requester, RequesterConfig, RequesterStats, Response, Transmit,
};
pub use sizing::{Sizer, SizingConfig};
