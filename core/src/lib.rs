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
//!
//! # Example: a leader granting, an agent asking
//!
//! ```
//! use std::net::SocketAddr;
//! use rand::{SeedableRng, rngs::SmallRng};
//! use unid_core::*;
//! use unid_proto::{SequenceName, Width};
//!
//! # fn main() -> Result<(), Error> {
//! let orders = SequenceName::new("orders").unwrap();
//! // Leader side: built from the ceilings consensus reports as committed.
//! let start = CommittedCeiling { sequence: orders.clone(), width: Width::W8, ceiling: 1 };
//! let mut leader = LeaderAllocator::new(AllocatorConfig::DEFAULT, 0, [start])?;
//! assert_eq!(leader.grant(0, &orders, 100), Err(Error::NotReady));
//! let raise = leader.poll_raise(0).expect("a new leader raises at once");
//! // ... replicate `raise` through consensus; when it commits:
//! leader.on_raise_committed(&raise.sequence, raise.ceiling)?;
//! let block = leader.grant(10, &orders, 100)?;
//! assert_eq!((block.first(), block.count()), (1, 100));
//!
//! // Agent side: size the request, send it, retransmit until answered.
//! let sizer = Sizer::new(SizingConfig::DEFAULT, 0)?;
//! let want = sizer.block_ids(0, Width::W8, 0)?;
//! let server: SocketAddr = "127.0.0.1:7000".parse().unwrap();
//! let mut requester: Requester<u64, u64> =
//!     Requester::new(RequesterConfig::DEFAULT, &[server], 1, 0)?;
//! let seq = requester.send(0, want)?;
//! let t = requester.poll_transmit(0).unwrap(); // encode with unid-proto, send
//! assert_eq!((t.seq, t.destination), (seq, server));
//! // Nothing comes back: the timer fires and the same seq goes out again.
//! let mut rng = SmallRng::seed_from_u64(1);
//! let wake = requester.poll_timeout().unwrap();
//! requester.handle_timeout(wake, &mut rng);
//! assert_eq!(requester.poll_transmit(wake).unwrap().seq, seq);
//! // The answer arrives.
//! let response = Response { reply_to: seq, epoch: 1, reply: Reply::Done(42) };
//! assert_eq!(requester.handle_response(wake, server, response), Disposition::Accepted);
//! assert!(matches!(requester.poll_event(), Some(Event::Completed { payload: 42, .. })));
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

pub mod allocator;
pub mod dedupe;
pub mod error;
pub mod rate;
pub mod requester;
pub mod sequence;
pub mod sizing;
pub mod state;

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
