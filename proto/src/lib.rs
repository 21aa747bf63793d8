//! The unid wire format. No I/O: bytes in, typed messages out, and back.
#![forbid(unsafe_code)]

pub mod types;

pub use types::{Block, Epoch, Id, NameError, NodeId, SeqNo, SequenceName, Width};
pub mod auth;
pub use auth::{AuthKey, TAG_BYTES};
