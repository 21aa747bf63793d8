//! unid's server as a state machine with no I/O.
//!
//! [`server::Server`] decides everything a unid server does: which datagram gets which
//! answer, when it grants and from what, when it proposes a ceiling raise, registers an
//! agent, confirms its leadership or hands it over. It owns no socket, no runtime, no clock
//! and no Raft node: datagrams and consensus results come in as plain values with the time
//! (`now_us`), and what to send and what to ask of consensus comes out. It is modelled on
//! `quinn_proto::Connection` (events in, transmits out, time passed in) and on TigerBeetle's
//! replica, which its simulator drives unchanged.
//!
//! Two drivers run it: `unid-engine` (glommio UDP shards in front of the server, a tokio task
//! performing the consensus calls) and `unid-sim` (a simulated network, clock and disk
//! around the same driver and the real openraft node). Nothing of the server's logic exists
//! twice: a breakage of this crate is a breakage the simulator's seeds run.
//!
//! Like `unid-proto` and `unid-core`, this crate never depends on glommio, openraft, tokio or
//! libc (`scripts/check-deps.sh`).

pub mod server;

pub use server::Server;
