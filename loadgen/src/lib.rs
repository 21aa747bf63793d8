//! unid-loadgen: drives a unid cluster over the wire format with many simulated agents,
//! checks every grant, and can kill the leader on a seeded schedule. The binary is
//! `loadgen` (see `loadgen --help`); this library holds the parts worth testing on their
//! own.
//!
//! It depends only on `unid-proto` (never on the server's crates): it sees the cluster the
//! way an agent does.
#![forbid(unsafe_code)]

pub mod checker;
