//! unid data plane: thread-per-core UDP servers on glommio with batched I/O.
//!
//! Two layers, following quinn's split between `quinn-udp` (syscalls) and the protocol (no I/O):
//!
//! - [`udp`] is the only place with socket syscalls and `unsafe` (besides one in [`sd_notify`]): a nonblocking socket
//!   (`SO_REUSEPORT`, sized buffers, `IP_RECVERR`/`IPV6_RECVERR`) with [`udp::UdpSocket::recv_batch`]
//!   (`recvmmsg`), [`udp::UdpSocket::send_batch`] (`sendmmsg`) and
//!   [`udp::UdpSocket::drain_errors`] (the socket error queue, turned into typed
//!   [`udp::PeerError`]s: the fast "peer is gone" signal).
//! - [`shard`] runs one glommio `LocalExecutor` per core, each with its own socket bound to the
//!   same address, and drives a user [`shard::Handler`] — the place where `unid-core`'s state
//!   machines are plugged in later. Handlers see datagrams, peer errors, cross-thread messages and
//!   timeouts, with the time passed in as `now_us` ([`now_us`]); they never touch a socket.
//! - [`server`] is the unid server process: shards whose handler grants blocks from
//!   `unid-core`'s allocator, and a control task on a tokio thread driving `unid-consensus`
//!   (leader tracking, ceiling raises, registrations, graceful handoff, fail-stop).
//! - [`plane`] chooses the data plane: glommio/io_uring, or plain threads waiting in `ppoll(2)`
//!   where io_uring is refused (containers' seccomp profiles, `kernel.io_uring_disabled`).
//! - [`metrics`] formats Prometheus text metrics and serves them over HTTP (`--metrics`).
//! - [`client`] is a small blocking UDP client of servers, for operator tools and tests.
//! - [`sd_notify`] is systemd's readiness protocol (`Type=notify`) for the `unid` binary; here
//!   because removing `NOTIFY_SOCKET` from the environment is an `unsafe` call.
//!
//! # Why `recvmmsg` after io_uring readiness, not one io_uring op per datagram
//! glommio's `UdpSocket` offers one receive or send per datagram — first tried as a plain
//! nonblocking syscall ("yolo"), then submitted as an io_uring operation when the socket is empty
//! — and no batching. unid's traffic is many small datagrams from many agents, where the
//! per-datagram cost dominates. So a shard uses io_uring only to *wait*: it parks on a 1-byte
//! `MSG_PEEK` receive submitted through glommio's ring ([`shard::Readiness`]), and when woken it
//! drains the socket with `recvmmsg` — up to [`udp::BATCH_DATAGRAMS_MAX`] datagrams per syscall —
//! and answers with one `sendmmsg`. When idle, a shard sleeps in the ring like any glommio task,
//! so timers and cross-thread channels share the same executor.
//!
//! Measured here (`results/udp-echo.md`, `udp_echo` example, quiet 2-core VM, medians of 3): the
//! batched shards echoed 248k datagrams/s at 3.8 µs of server CPU per datagram; the same server on
//! glommio's `recv_from`/`send_to` 192k/s at 4.7 µs; a raw io_uring server with one `RECVMSG` and
//! one `SENDMSG` operation per datagram 201k/s at 4.7 µs. Batching wins, but by 10–30% of CPU, not
//! by the 64x fewer syscalls: on loopback the kernel's UDP path costs more than the syscalls.
//!
//! # Limits
//! Every queue is bounded: batches ([`udp::BATCH_DATAGRAMS_MAX`] datagrams of
//! [`udp::DATAGRAM_BYTES_MAX`] bytes), error drains ([`udp::ERRORS_PER_DRAIN_MAX`]), the
//! per-shard message channel ([`shard::ShardConfig::channel_messages_max`]) and the work a shard
//! does per loop turn before it yields ([`shard::RECV_BATCHES_PER_TURN_MAX`],
//! [`shard::MESSAGES_PER_TURN_MAX`]).

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Instant;

pub mod client;
pub mod driver;
pub mod metrics;
pub mod plane;
pub mod ports;
pub mod sd_notify;
pub mod server;
pub mod shard;
pub mod udp;

/// Errors of the engine crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket operation failed; `op` names it (e.g. `"bind"`, `"recvmmsg"`) and `addr` is the
    /// socket's address (the local one, or the one being bound).
    #[error("{op} on {addr}: {source}")]
    Io {
        /// The operation that failed.
        op: &'static str,
        /// The address of the socket.
        addr: SocketAddr,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Another socket (another process, or another server in this one) holds the UDP address:
    /// a second server on one address would split the agents between two clusters.
    #[error(
        "UDP address {addr} is already in use (another unid server?); pick another --listen or stop the other process"
    )]
    AddrInUse {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// A configuration value is out of its allowed range; the message says which.
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    /// A datagram longer than [`udp::DATAGRAM_BYTES_MAX`] was queued for sending.
    #[error("datagram of {bytes} bytes exceeds the {max} byte limit", max = udp::DATAGRAM_BYTES_MAX)]
    DatagramTooLong {
        /// Its length.
        bytes: usize,
    },
    /// A [`udp::SendBatch`] is full.
    #[error("send batch full ({capacity} datagrams)")]
    BatchFull {
        /// The batch's capacity.
        capacity: usize,
    },
    /// A shard's executor could not be created or its thread spawned.
    #[error("starting shard {shard}: {reason}")]
    ShardStart {
        /// Index of the shard.
        shard: usize,
        /// glommio's or the OS's explanation.
        reason: String,
    },
    /// io_uring was asked for ([`plane::DataPlane::IoUring`]) but does not work here (a
    /// seccomp filter such as Docker's default, or `kernel.io_uring_disabled`); `reason` is the
    /// probe's finding.
    #[error(
        "io_uring is unavailable ({reason}); use the threads data plane (--data-plane threads or auto) or allow io_uring"
    )]
    IoUringUnavailable {
        /// Which io_uring call failed and how.
        reason: String,
    },
    /// A shard thread panicked or its executor failed while running.
    #[error("shard {shard} failed: {reason}")]
    ShardFailed {
        /// Index of the shard.
        shard: usize,
        /// The panic message or error.
        reason: String,
    },
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// Microseconds since a process-wide origin (fixed by the first call), from the monotonic clock.
///
/// Every shard uses this clock, so `now_us` values from different shards compare. It never goes
/// backwards and starts near 0, so `u64` lasts for 584 000 years.
pub fn now_us() -> u64 {
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    #[test]
    fn now_us_is_monotonic() {
        let a = super::now_us();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = super::now_us();
        assert!(b >= a + 2_000, "{a} then {b}");
    }
}
