//! Batched, nonblocking UDP: the only module of unid with socket syscalls.
//!
//! This is unid's counterpart of `quinn-udp`: a small layer over `recvmmsg(2)`, `sendmmsg(2)` and
//! the socket error queue (`recvmsg(2)` with `MSG_ERRQUEUE`, see `ip(7)` `IP_RECVERR` and `ipv6(7)`
//! `IPV6_RECVERR`). It knows nothing about executors: every call is a single nonblocking syscall
//! (or a bounded handful), so it can be driven by glommio (see [`crate::shard`]), by a test thread
//! or by a benchmark alike.
//!
//! # Bounds
//! - A [`RecvBatch`] or [`SendBatch`] holds at most [`BATCH_DATAGRAMS_MAX`] datagrams of at most
//!   [`DATAGRAM_BYTES_MAX`] bytes. All their memory is allocated when they are built; receiving and
//!   sending allocate nothing.
//! - [`UdpSocket::drain_errors`] reads at most [`ERRORS_PER_DRAIN_MAX`] error-queue entries per
//!   call; the rest stay queued for the next call (the socket stays readable while they do).
//! - Retries of interrupted or stale-error syscalls are bounded ([`SYSCALL_RETRIES_MAX`]).
//!
//! # Asynchronous errors and `IP_RECVERR`
//! With `IP_RECVERR`/`IPV6_RECVERR` on, an ICMP error for a datagram we sent (port unreachable →
//! `ECONNREFUSED`, host/net unreachable) is queued on the socket's error queue with the original
//! destination, which [`UdpSocket::drain_errors`] turns into a typed [`PeerError`]. That is the fast
//! failure signal: on loopback a closed port is reported within microseconds.
//!
//! The kernel *also* stores the last such error in the socket's pending error (`sk_err`), and the
//! next `recvmmsg` or `sendmmsg` on the socket reports it once, whatever that call was about. This
//! module absorbs those stale reports: [`UdpSocket::recv_batch`] counts them and retries;
//! [`UdpSocket::send_batch`] retries the datagram that received such an error once before blaming
//! its own destination. The error queue stays the one source of truth for peer errors.

use std::io;
use std::mem::{MaybeUninit, size_of};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

use crate::Error;

/// Most datagrams one [`RecvBatch`] or [`SendBatch`] holds, so most per `recvmmsg`/`sendmmsg`.
pub const BATCH_DATAGRAMS_MAX: usize = 64;

/// Largest datagram payload this crate sends or receives whole, in bytes. Received datagrams
/// longer than this are cut and flagged [`Datagram::truncated`]. 1500 is the Ethernet MTU: unid
/// keeps datagrams under the path MTU so they are never fragmented.
pub const DATAGRAM_BYTES_MAX: usize = 1500;

/// Most error-queue entries one [`UdpSocket::drain_errors`] call reads.
pub const ERRORS_PER_DRAIN_MAX: usize = 64;

/// Most times one call retries a syscall that was interrupted (`EINTR`) or that reported a stale
/// asynchronous error.
pub const SYSCALL_RETRIES_MAX: usize = 8;

const _: () = assert!(BATCH_DATAGRAMS_MAX > 0 && BATCH_DATAGRAMS_MAX <= 1024); // UIO_MAXIOV
const _: () = assert!(DATAGRAM_BYTES_MAX <= u16::MAX as usize);
const _: () = assert!(ERRORS_PER_DRAIN_MAX > 0);

/// Socket options for [`UdpSocket::bind`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpConfig {
    /// `SO_REUSEPORT`: lets several sockets (one per shard) bind the same address; the kernel
    /// spreads incoming datagrams between them by a hash of the source and destination.
    pub reuse_port: bool,
    /// `SO_RCVBUF` in bytes (the kernel doubles it and caps it at `net.core.rmem_max`); `None`
    /// keeps the system default.
    pub recv_buffer_bytes: Option<usize>,
    /// `SO_SNDBUF` in bytes (doubled and capped at `net.core.wmem_max`); `None` keeps the default.
    pub send_buffer_bytes: Option<usize>,
}

impl Default for UdpConfig {
    fn default() -> Self {
        Self {
            reuse_port: true,
            recv_buffer_bytes: Some(4 << 20),
            send_buffer_bytes: Some(4 << 20),
        }
    }
}

/// Why a peer could not be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerErrorKind {
    /// `ECONNREFUSED`: nothing listens on the destination port (ICMP port unreachable).
    Refused,
    /// `EHOSTUNREACH` or `EHOSTDOWN`: no route to the host, or it does not answer ARP/ND.
    HostUnreachable,
    /// `ENETUNREACH` or `ENETDOWN`: no route to the destination network.
    NetUnreachable,
    /// `EMSGSIZE`: the datagram is larger than the socket or the path allows.
    MessageTooLong,
    /// Any other errno.
    Other(i32),
}

impl PeerErrorKind {
    /// Classifies an errno.
    pub fn from_errno(errno: i32) -> Self {
        match errno {
            libc::ECONNREFUSED => Self::Refused,
            libc::EHOSTUNREACH | libc::EHOSTDOWN => Self::HostUnreachable,
            libc::ENETUNREACH | libc::ENETDOWN => Self::NetUnreachable,
            libc::EMSGSIZE => Self::MessageTooLong,
            other => Self::Other(other),
        }
    }
}

/// Where a [`PeerError`] was learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorOrigin {
    /// `sendmmsg` refused the datagram synchronously (see [`SendBatch::failures`]).
    Send,
    /// An ICMP or ICMPv6 error from the network, read from the error queue.
    Icmp,
    /// The local stack, read from the error queue (e.g. `EMSGSIZE` after a path MTU change).
    Local,
    /// Another `SO_EE_ORIGIN_*` value.
    Other(u8),
}

/// A datagram we sent could not reach its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerError {
    /// Destination of the datagram that failed.
    pub dest: SocketAddr,
    /// What went wrong.
    pub kind: PeerErrorKind,
    /// Where the error came from.
    pub origin: ErrorOrigin,
    /// Address of the node that reported the error (`SO_EE_OFFENDER`), for ICMP errors.
    pub offender: Option<IpAddr>,
}

/// Per-kind error counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorCounters {
    /// [`PeerErrorKind::Refused`].
    pub refused: u64,
    /// [`PeerErrorKind::HostUnreachable`].
    pub host_unreachable: u64,
    /// [`PeerErrorKind::NetUnreachable`].
    pub net_unreachable: u64,
    /// [`PeerErrorKind::MessageTooLong`].
    pub message_too_long: u64,
    /// [`PeerErrorKind::Other`].
    pub other: u64,
}

impl ErrorCounters {
    fn bump(&mut self, kind: PeerErrorKind) {
        let slot = match kind {
            PeerErrorKind::Refused => &mut self.refused,
            PeerErrorKind::HostUnreachable => &mut self.host_unreachable,
            PeerErrorKind::NetUnreachable => &mut self.net_unreachable,
            PeerErrorKind::MessageTooLong => &mut self.message_too_long,
            PeerErrorKind::Other(_) => &mut self.other,
        };
        *slot += 1;
    }

    /// Sum over all kinds.
    pub fn total(&self) -> u64 {
        self.refused
            + self.host_unreachable
            + self.net_unreachable
            + self.message_too_long
            + self.other
    }
}

/// What one socket has done since it was created. Plain integers: a socket belongs to one thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpCounters {
    /// `recvmmsg` calls that returned at least one datagram.
    pub recv_batches: u64,
    /// Datagrams received (truncated ones included).
    pub datagrams_in: u64,
    /// Payload bytes received (as stored, so at most [`DATAGRAM_BYTES_MAX`] per datagram).
    pub bytes_in: u64,
    /// Datagrams longer than [`DATAGRAM_BYTES_MAX`] (`MSG_TRUNC`).
    pub truncated_in: u64,
    /// Datagrams dropped because their source address was not IPv4 or IPv6.
    pub unknown_source_in: u64,
    /// Stale asynchronous errors (`sk_err`) that `recvmmsg` reported and that were skipped.
    pub recv_stale_errors: u64,
    /// `recvmmsg` calls that failed with `ENOMEM`/`ENOBUFS` (kernel memory pressure; reported as
    /// an empty receive).
    pub recv_transient_errors: u64,
    /// `sendmmsg` calls that sent at least one datagram.
    pub send_batches: u64,
    /// Datagrams handed to the kernel.
    pub datagrams_out: u64,
    /// Payload bytes handed to the kernel.
    pub bytes_out: u64,
    /// Times `sendmmsg` stopped on `EAGAIN`/`ENOBUFS` with datagrams left queued.
    pub send_would_block: u64,
    /// Stale asynchronous errors that `sendmmsg` reported for an earlier datagram (retried).
    pub send_stale_errors: u64,
    /// Datagrams `sendmmsg` refused, by kind (skipped, see [`SendBatch::failures`]).
    pub send_failed: ErrorCounters,
    /// Error-queue entries turned into [`PeerError`]s, by kind.
    pub peer_errors: ErrorCounters,
    /// Error-queue entries without a usable `sock_extended_err` or destination (dropped).
    pub error_queue_unparsed: u64,
}

/// One received datagram, borrowed from a [`RecvBatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram<'a> {
    /// The payload (its first [`DATAGRAM_BYTES_MAX`] bytes if truncated).
    pub data: &'a [u8],
    /// Source address.
    pub from: SocketAddr,
    /// The datagram was longer than [`DATAGRAM_BYTES_MAX`] and was cut (`MSG_TRUNC`).
    pub truncated: bool,
}

#[derive(Debug, Clone, Copy)]
struct RecvMeta {
    len: usize,
    from: SocketAddr,
    truncated: bool,
}

/// Preallocated buffers for up to `capacity` datagrams received with one `recvmmsg`.
pub struct RecvBatch {
    capacity: usize,
    bufs: Box<[u8]>,
    names: Box<[libc::sockaddr_storage]>,
    iovecs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    meta: Vec<RecvMeta>,
}

// SAFETY: the raw pointers inside `iovecs` and `hdrs` only ever point into this batch's own boxed
// buffers (whose heap addresses do not change when the batch moves), are rewritten before every
// syscall and are never dereferenced by Rust code. Moving the batch to another thread is as safe
// as moving the boxes themselves.
unsafe impl Send for RecvBatch {}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("capacity", &self.capacity)
            .field("len", &self.meta.len())
            .finish()
    }
}

fn zeroed_box<T>(n: usize) -> Box<[T]> {
    (0..n)
        .map(|_| {
            // SAFETY: only instantiated with libc's plain C structs (`sockaddr_storage`, `iovec`,
            // `mmsghdr`), for which all-zero bytes are a valid value (null pointers, zero lengths).
            unsafe { MaybeUninit::<T>::zeroed().assume_init() }
        })
        .collect()
}

impl RecvBatch {
    /// A batch for up to `capacity` datagrams (1 ..= [`BATCH_DATAGRAMS_MAX`]).
    pub fn new(capacity: usize) -> Result<Self, Error> {
        if capacity == 0 || capacity > BATCH_DATAGRAMS_MAX {
            return Err(Error::Config(
                "batch capacity must be 1 ..= BATCH_DATAGRAMS_MAX",
            ));
        }
        Ok(Self {
            capacity,
            bufs: vec![0u8; capacity * DATAGRAM_BYTES_MAX].into_boxed_slice(),
            names: zeroed_box(capacity),
            iovecs: zeroed_box(capacity),
            hdrs: zeroed_box(capacity),
            meta: Vec::with_capacity(capacity),
        })
    }

    /// Most datagrams one receive fills in.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Datagrams from the last [`UdpSocket::recv_batch`].
    pub fn len(&self) -> usize {
        self.meta.len()
    }

    /// The last receive returned nothing.
    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }

    /// Datagram `index` of the last receive.
    pub fn get(&self, index: usize) -> Option<Datagram<'_>> {
        let meta = self.meta.get(index)?;
        let start = index * DATAGRAM_BYTES_MAX;
        Some(Datagram {
            data: &self.bufs[start..start + meta.len],
            from: meta.from,
            truncated: meta.truncated,
        })
    }

    /// The datagrams of the last receive, in arrival order.
    pub fn iter(&self) -> impl Iterator<Item = Datagram<'_>> + '_ {
        (0..self.meta.len()).filter_map(|i| self.get(i))
    }
}

/// Datagrams queued for one `sendmmsg`, in preallocated buffers.
///
/// [`UdpSocket::send_batch`] removes what it sent or skipped; datagrams it could not send because
/// the socket buffer was full (`EAGAIN`) stay queued, in order, for the next call.
pub struct SendBatch {
    capacity: usize,
    len: usize,
    bufs: Box<[u8]>,
    lens: Box<[usize]>,
    dests: Box<[SocketAddr]>,
    names: Box<[libc::sockaddr_storage]>,
    name_lens: Box<[libc::socklen_t]>,
    iovecs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    failures: Vec<PeerError>,
}

// SAFETY: as for `RecvBatch`: the raw pointers in `iovecs` and `hdrs` point only into this batch's
// own boxes, are rewritten before each syscall and are never dereferenced by Rust code.
unsafe impl Send for SendBatch {}

impl std::fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch")
            .field("capacity", &self.capacity)
            .field("len", &self.len)
            .field("failures", &self.failures)
            .finish()
    }
}

impl SendBatch {
    /// A batch for up to `capacity` datagrams (1 ..= [`BATCH_DATAGRAMS_MAX`]).
    pub fn new(capacity: usize) -> Result<Self, Error> {
        if capacity == 0 || capacity > BATCH_DATAGRAMS_MAX {
            return Err(Error::Config(
                "batch capacity must be 1 ..= BATCH_DATAGRAMS_MAX",
            ));
        }
        let unspecified = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        Ok(Self {
            capacity,
            len: 0,
            bufs: vec![0u8; capacity * DATAGRAM_BYTES_MAX].into_boxed_slice(),
            lens: vec![0; capacity].into_boxed_slice(),
            dests: vec![unspecified; capacity].into_boxed_slice(),
            names: zeroed_box(capacity),
            name_lens: vec![0; capacity].into_boxed_slice(),
            iovecs: zeroed_box(capacity),
            hdrs: zeroed_box(capacity),
            failures: Vec::with_capacity(capacity),
        })
    }

    /// Most datagrams the batch holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Datagrams queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// No room for another datagram.
    pub fn is_full(&self) -> bool {
        self.len == self.capacity
    }

    /// Room left, in datagrams.
    pub fn remaining(&self) -> usize {
        self.capacity - self.len
    }

    /// Queues a copy of `data` for `dest`.
    pub fn push(&mut self, dest: SocketAddr, data: &[u8]) -> Result<(), Error> {
        if data.len() > DATAGRAM_BYTES_MAX {
            return Err(Error::DatagramTooLong { bytes: data.len() });
        }
        self.push_with(dest, |buf| {
            buf[..data.len()].copy_from_slice(data);
            data.len()
        })
    }

    /// Queues a datagram for `dest` written in place: `write` gets a [`DATAGRAM_BYTES_MAX`]-byte
    /// buffer and returns how many bytes it wrote.
    ///
    /// # Panics
    /// If `write` returns more than [`DATAGRAM_BYTES_MAX`].
    pub fn push_with(
        &mut self,
        dest: SocketAddr,
        write: impl FnOnce(&mut [u8]) -> usize,
    ) -> Result<(), Error> {
        if self.is_full() {
            return Err(Error::BatchFull {
                capacity: self.capacity,
            });
        }
        let i = self.len;
        let buf = &mut self.bufs[i * DATAGRAM_BYTES_MAX..(i + 1) * DATAGRAM_BYTES_MAX];
        let written = write(buf);
        assert!(
            written <= DATAGRAM_BYTES_MAX,
            "push_with wrote past the buffer"
        );
        self.lens[i] = written;
        self.dests[i] = dest;
        self.name_lens[i] = write_sockaddr(dest, &mut self.names[i]);
        self.len += 1;
        Ok(())
    }

    /// Drops every queued datagram (failures are kept until the next send).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Datagrams the last [`UdpSocket::send_batch`] skipped because `sendmmsg` refused them, with
    /// their destination and error ([`ErrorOrigin::Send`]). At most [`Self::capacity`].
    pub fn failures(&self) -> &[PeerError] {
        &self.failures
    }

    /// Moves datagrams `from..len` to the front.
    fn keep_tail(&mut self, from: usize) {
        debug_assert!(from <= self.len);
        if from == 0 {
            return;
        }
        let left = self.len - from;
        self.bufs
            .copy_within(from * DATAGRAM_BYTES_MAX..self.len * DATAGRAM_BYTES_MAX, 0);
        self.lens.copy_within(from..self.len, 0);
        self.dests.copy_within(from..self.len, 0);
        self.names.copy_within(from..self.len, 0);
        self.name_lens.copy_within(from..self.len, 0);
        self.len = left;
    }
}

/// Outcome of one [`UdpSocket::send_batch`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Datagrams handed to the kernel.
    pub sent: usize,
    /// Datagrams refused and skipped (listed in [`SendBatch::failures`]).
    pub failed: usize,
    /// Datagrams still queued because the socket buffer was full (`EAGAIN`/`ENOBUFS`).
    pub pending: usize,
}

/// A nonblocking UDP socket with batched I/O and the error queue turned on.
#[derive(Debug)]
pub struct UdpSocket {
    socket: Socket,
    local_addr: SocketAddr,
    counters: UdpCounters,
}

fn errno_of(err: &io::Error) -> i32 {
    err.raw_os_error().unwrap_or(0)
}

/// Errors the kernel reports from a pending `sk_err` left by an earlier ICMP error.
fn is_async_error(errno: i32) -> bool {
    matches!(
        errno,
        libc::ECONNREFUSED
            | libc::EHOSTUNREACH
            | libc::EHOSTDOWN
            | libc::ENETUNREACH
            | libc::ENETDOWN
            | libc::EPROTO
            | libc::EMSGSIZE
    )
}

fn set_int_option(socket: &Socket, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `socket` keeps its descriptor open for the call; the option value is a valid
    // `c_int` on the stack and its exact size is passed, as setsockopt(2) requires.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl UdpSocket {
    /// Opens a nonblocking UDP socket bound to `addr` (port 0 picks a free port) with `config`'s
    /// options and `IP_RECVERR` (IPv4) or `IPV6_RECVERR` (IPv6) on.
    pub fn bind(addr: SocketAddr, config: &UdpConfig) -> Result<Self, Error> {
        let io_err = |op: &'static str| move |source: io::Error| Error::Io { op, addr, source };
        let domain = if addr.is_ipv6() {
            Domain::IPV6
        } else {
            Domain::IPV4
        };
        let socket = Socket::new(domain, Type::DGRAM.cloexec(), Some(Protocol::UDP))
            .map_err(io_err("socket"))?;
        socket
            .set_nonblocking(true)
            .map_err(io_err("set nonblocking"))?;
        if config.reuse_port {
            socket
                .set_reuse_port(true)
                .map_err(io_err("set SO_REUSEPORT"))?;
        }
        if let Some(bytes) = config.recv_buffer_bytes {
            socket
                .set_recv_buffer_size(bytes)
                .map_err(io_err("set SO_RCVBUF"))?;
        }
        if let Some(bytes) = config.send_buffer_bytes {
            socket
                .set_send_buffer_size(bytes)
                .map_err(io_err("set SO_SNDBUF"))?;
        }
        if addr.is_ipv6() {
            set_int_option(&socket, libc::IPPROTO_IPV6, libc::IPV6_RECVERR, 1)
                .map_err(io_err("set IPV6_RECVERR"))?;
            // For v4-mapped peers of a dual-stack socket; harmless if the socket is v6-only.
            let _ = set_int_option(&socket, libc::IPPROTO_IP, libc::IP_RECVERR, 1);
        } else {
            set_int_option(&socket, libc::IPPROTO_IP, libc::IP_RECVERR, 1)
                .map_err(io_err("set IP_RECVERR"))?;
        }
        socket.bind(&addr.into()).map_err(io_err("bind"))?;
        let local_addr = socket
            .local_addr()
            .map_err(io_err("getsockname"))?
            .as_socket()
            .ok_or_else(|| Error::Io {
                op: "getsockname",
                addr,
                source: io::Error::new(io::ErrorKind::InvalidData, "not an IP address"),
            })?;
        Ok(Self {
            socket,
            local_addr,
            counters: UdpCounters::default(),
        })
    }

    /// The address the socket is bound to (with the port the kernel chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// What this socket has done so far.
    pub fn counters(&self) -> &UdpCounters {
        &self.counters
    }

    /// `SO_RCVBUF` as the kernel reports it (twice the requested size, capped).
    pub fn recv_buffer_bytes(&self) -> Result<usize, Error> {
        self.socket
            .recv_buffer_size()
            .map_err(|source| self.io_error("get SO_RCVBUF", source))
    }

    /// `SO_SNDBUF` as the kernel reports it (twice the requested size, capped).
    pub fn send_buffer_bytes(&self) -> Result<usize, Error> {
        self.socket
            .send_buffer_size()
            .map_err(|source| self.io_error("get SO_SNDBUF", source))
    }

    /// A second descriptor for the same socket (`dup`), for a runtime's readiness wait.
    pub(crate) fn try_clone_socket(&self) -> Result<Socket, Error> {
        self.socket
            .try_clone()
            .map_err(|source| self.io_error("dup", source))
    }

    fn io_error(&self, op: &'static str, source: io::Error) -> Error {
        Error::Io {
            op,
            addr: self.local_addr,
            source,
        }
    }

    /// Receives up to `batch.capacity()` datagrams with one nonblocking `recvmmsg`, replacing the
    /// batch's previous content. Returns how many arrived; 0 means none was queued.
    ///
    /// A stale asynchronous error (see the module docs) is counted in
    /// [`UdpCounters::recv_stale_errors`] and the receive retried (at most
    /// [`SYSCALL_RETRIES_MAX`] times; then 0 is returned and the socket stays readable).
    pub fn recv_batch(&mut self, batch: &mut RecvBatch) -> Result<usize, Error> {
        batch.meta.clear();
        let n = batch.capacity;
        for i in 0..n {
            batch.iovecs[i] = libc::iovec {
                iov_base: batch.bufs[i * DATAGRAM_BYTES_MAX..].as_mut_ptr().cast(),
                iov_len: DATAGRAM_BYTES_MAX,
            };
            let hdr = &mut batch.hdrs[i];
            hdr.msg_hdr.msg_name = (&raw mut batch.names[i]).cast();
            hdr.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_hdr.msg_iov = &raw mut batch.iovecs[i];
            hdr.msg_hdr.msg_iovlen = 1;
            hdr.msg_hdr.msg_control = std::ptr::null_mut();
            hdr.msg_hdr.msg_controllen = 0;
            hdr.msg_hdr.msg_flags = 0;
            hdr.msg_len = 0;
        }
        let mut retries = 0;
        let got = loop {
            // SAFETY: `hdrs[..n]` are initialised just above; each points at its own
            // `sockaddr_storage` (with its full size as `msg_namelen`) and at one iovec covering
            // exactly its `DATAGRAM_BYTES_MAX`-byte slot of `bufs`. All of them live in `batch`,
            // which is borrowed mutably for the whole call, and the syscall is nonblocking, so
            // the kernel writes into them only during the call.
            let rc = unsafe {
                libc::recvmmsg(
                    self.socket.as_raw_fd(),
                    batch.hdrs.as_mut_ptr(),
                    n as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if rc >= 0 {
                break rc as usize;
            }
            let err = io::Error::last_os_error();
            let errno = errno_of(&err);
            if errno == libc::EAGAIN || errno == libc::EWOULDBLOCK {
                return Ok(0);
            }
            if errno == libc::ENOMEM || errno == libc::ENOBUFS {
                // Kernel memory pressure: transient; the datagrams stay queued.
                self.counters.recv_transient_errors += 1;
                return Ok(0);
            }
            let retryable = errno == libc::EINTR || is_async_error(errno);
            if !retryable {
                return Err(self.io_error("recvmmsg", err));
            }
            if errno != libc::EINTR {
                self.counters.recv_stale_errors += 1;
            }
            retries += 1;
            if retries > SYSCALL_RETRIES_MAX {
                return Ok(0);
            }
        };
        assert!(got <= n, "recvmmsg returned more datagrams than asked for");
        if got > 0 {
            self.counters.recv_batches += 1;
        }
        for i in 0..got {
            let hdr = &batch.hdrs[i];
            let len = (hdr.msg_len as usize).min(DATAGRAM_BYTES_MAX);
            let truncated = hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.counters.datagrams_in += 1;
            self.counters.bytes_in += len as u64;
            if truncated {
                self.counters.truncated_in += 1;
            }
            match read_sockaddr(&batch.names[i], hdr.msg_hdr.msg_namelen) {
                Some(from) => batch.meta.push(RecvMeta {
                    len,
                    from,
                    truncated,
                }),
                None => {
                    self.counters.unknown_source_in += 1;
                    // Keep indices aligned with the buffers: record it, flagged, from 0.0.0.0:0,
                    // so `get(i)` still finds slot `i`. Callers drop datagrams from port 0.
                    batch.meta.push(RecvMeta {
                        len,
                        from: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
                        truncated,
                    });
                }
            }
        }
        Ok(got)
    }

    /// Sends the batch's datagrams with `sendmmsg`, removing what was sent or refused.
    ///
    /// - A datagram `sendmmsg` refuses is skipped and recorded in [`SendBatch::failures`] (which
    ///   this call clears first) and counted in [`UdpCounters::send_failed`]. A stale asynchronous
    ///   error is first retried once, since it may belong to an earlier datagram.
    /// - On `EAGAIN`/`ENOBUFS` the call stops and the unsent datagrams stay queued in order
    ///   ([`SendReport::pending`]), for the caller to retry or drop; nothing is dropped silently.
    pub fn send_batch(&mut self, batch: &mut SendBatch) -> SendReport {
        batch.failures.clear();
        for i in 0..batch.len {
            batch.iovecs[i] = libc::iovec {
                iov_base: batch.bufs[i * DATAGRAM_BYTES_MAX..].as_mut_ptr().cast(),
                iov_len: batch.lens[i],
            };
            let hdr = &mut batch.hdrs[i];
            hdr.msg_hdr.msg_name = (&raw mut batch.names[i]).cast();
            hdr.msg_hdr.msg_namelen = batch.name_lens[i];
            hdr.msg_hdr.msg_iov = &raw mut batch.iovecs[i];
            hdr.msg_hdr.msg_iovlen = 1;
            hdr.msg_hdr.msg_control = std::ptr::null_mut();
            hdr.msg_hdr.msg_controllen = 0;
            hdr.msg_hdr.msg_flags = 0;
            hdr.msg_len = 0;
        }
        let fd = self.socket.as_raw_fd();
        send_loop(batch, &mut self.counters, |batch, next| {
            let total = batch.len;
            // SAFETY: `hdrs[next..total]` were initialised above and point at this batch's own
            // `sockaddr_storage`s (with the lengths `write_sockaddr` produced) and iovecs that
            // cover `lens[i] <= DATAGRAM_BYTES_MAX` bytes of each slot. `batch` is borrowed
            // mutably for the whole call; the kernel only reads them during the nonblocking call.
            let rc = unsafe {
                libc::sendmmsg(
                    fd,
                    batch.hdrs[next..total].as_mut_ptr(),
                    (total - next) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            match rc {
                // 0 cannot happen for a non-empty vector; treat it like EAGAIN.
                0 => Err(libc::EAGAIN),
                rc if rc > 0 => Ok(rc as usize),
                _ => Err(errno_of(&io::Error::last_os_error())),
            }
        })
    }

    /// Reads up to [`ERRORS_PER_DRAIN_MAX`] entries of the socket's error queue
    /// (`recvmsg(MSG_ERRQUEUE)`) and appends them to `out` as [`PeerError`]s. Returns how many
    /// were appended; entries that cannot be parsed are dropped and counted in
    /// [`UdpCounters::error_queue_unparsed`].
    pub fn drain_errors(&mut self, out: &mut Vec<PeerError>) -> Result<usize, Error> {
        let mut appended = 0;
        let mut interrupts = 0;
        let mut reads = 0;
        while reads < ERRORS_PER_DRAIN_MAX {
            // SAFETY: all-zero bytes are a valid `sockaddr_storage`.
            let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            // Enough for a `cmsghdr` + `sock_extended_err` + offender `sockaddr_in6`, 8-aligned.
            let mut control = [0u64; 32];
            // The payload of the failed datagram is not needed: an empty iovec, MSG_TRUNC set.
            let mut iov = libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            };
            // SAFETY: all-zero bytes are a valid `msghdr` (null pointers, zero lengths).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_name = (&raw mut name).cast();
            msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            msg.msg_iov = &raw mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = size_of_val(&control);
            // SAFETY: `msg` points at `name`, `iov` and `control`, all locals that outlive the
            // nonblocking call, with their true sizes; the kernel writes only within them.
            let rc = unsafe {
                libc::recvmsg(
                    self.socket.as_raw_fd(),
                    &raw mut msg,
                    libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
                )
            };
            if rc < 0 {
                let err = io::Error::last_os_error();
                match errno_of(&err) {
                    // Empty queue, or memory pressure (the entry stays queued for next time).
                    libc::EAGAIN | libc::ENOMEM | libc::ENOBUFS => break,
                    libc::EINTR if interrupts < SYSCALL_RETRIES_MAX => {
                        interrupts += 1;
                        continue;
                    }
                    _ => return Err(self.io_error("recvmsg(MSG_ERRQUEUE)", err)),
                }
            }
            reads += 1;
            let dest = read_sockaddr(&name, msg.msg_namelen);
            // SAFETY: `msg` was filled by a successful recvmsg: its control pointer and the
            // `msg_controllen` the kernel set describe initialised bytes of `control`.
            let extended = unsafe { parse_extended_err(&msg) };
            match (dest, extended) {
                (Some(dest), Some((errno, origin, offender))) => {
                    let kind = PeerErrorKind::from_errno(errno);
                    self.counters.peer_errors.bump(kind);
                    out.push(PeerError {
                        dest,
                        kind,
                        origin,
                        offender,
                    });
                    appended += 1;
                }
                _ => self.counters.error_queue_unparsed += 1,
            }
        }
        Ok(appended)
    }
}

/// The decisions of [`UdpSocket::send_batch`], apart from the syscall: `sendmmsg(batch, next)`
/// sends datagrams `next..batch.len()` and returns how many went out, or the errno that stopped
/// the first one. Kept separate so tests can replay any sequence of kernel answers.
fn send_loop(
    batch: &mut SendBatch,
    counters: &mut UdpCounters,
    mut sendmmsg: impl FnMut(&mut SendBatch, usize) -> Result<usize, i32>,
) -> SendReport {
    let mut report = SendReport::default();
    let total = batch.len;
    let mut next = 0;
    // Whether datagram `next` already got a stale-error retry.
    let mut retried_next = false;
    let mut interrupts = 0;
    // Each turn sends something, skips a datagram, stops, or uses one of a bounded number of
    // retries: at most 2 * total + SYSCALL_RETRIES_MAX turns.
    while next < total {
        match sendmmsg(batch, next) {
            Ok(sent) => {
                assert!(
                    sent > 0 && sent <= total - next,
                    "sendmmsg sent {sent} of {}",
                    total - next
                );
                counters.send_batches += 1;
                counters.datagrams_out += sent as u64;
                for i in next..next + sent {
                    counters.bytes_out += batch.lens[i] as u64;
                }
                report.sent += sent;
                next += sent;
                retried_next = false;
            }
            Err(libc::EAGAIN | libc::ENOBUFS) => break,
            Err(libc::EINTR) if interrupts < SYSCALL_RETRIES_MAX => interrupts += 1,
            Err(errno) if is_async_error(errno) && !retried_next => {
                counters.send_stale_errors += 1;
                retried_next = true;
            }
            Err(errno) => {
                let kind = PeerErrorKind::from_errno(errno);
                counters.send_failed.bump(kind);
                batch.failures.push(PeerError {
                    dest: batch.dests[next],
                    kind,
                    origin: ErrorOrigin::Send,
                    offender: None,
                });
                report.failed += 1;
                next += 1;
                retried_next = false;
            }
        }
    }
    report.pending = total - next;
    if report.pending > 0 {
        counters.send_would_block += 1;
    }
    batch.keep_tail(next);
    debug_assert_eq!(batch.len, report.pending);
    debug_assert_eq!(report.sent + report.failed + report.pending, total);
    report
}

impl AsRawFd for UdpSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl AsFd for UdpSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor is owned by `self.socket` and stays open for as long as the
        // returned borrow of `self` lives.
        unsafe { BorrowedFd::borrow_raw(self.socket.as_raw_fd()) }
    }
}

/// Finds the `IP_RECVERR`/`IPV6_RECVERR` control message in `msg` and returns its errno, origin
/// and offender.
///
/// # Safety
/// `msg` must come from a successful `recvmsg(MSG_ERRQUEUE)`: `msg_control` points to at least
/// `msg_controllen` initialised bytes that stay valid during the call.
unsafe fn parse_extended_err(msg: &libc::msghdr) -> Option<(i32, ErrorOrigin, Option<IpAddr>)> {
    // SAFETY: the caller guarantees `msg` describes a valid, initialised control buffer.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    let mut seen = 0;
    while !cmsg.is_null() && seen < 8 {
        seen += 1;
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR return either null or a pointer to a complete
        // `cmsghdr` inside the control buffer; `read_unaligned` needs no alignment.
        let header = unsafe { cmsg.read_unaligned() };
        let is_recverr = (header.cmsg_level == libc::IPPROTO_IP
            && header.cmsg_type == libc::IP_RECVERR)
            || (header.cmsg_level == libc::IPPROTO_IPV6 && header.cmsg_type == libc::IPV6_RECVERR);
        // SAFETY: CMSG_LEN only computes a length from the argument.
        let header_len = unsafe { libc::CMSG_LEN(0) } as usize;
        let data_len = (header.cmsg_len as usize).saturating_sub(header_len);
        if is_recverr && data_len >= size_of::<libc::sock_extended_err>() {
            // SAFETY: `cmsg` is a valid control message whose data holds at least a
            // `sock_extended_err` (checked just above); read unaligned to be safe.
            let data = unsafe { libc::CMSG_DATA(cmsg) };
            // SAFETY: as above, `data` points at `data_len >= size_of::<sock_extended_err>()`
            // initialised bytes.
            let ee = unsafe { data.cast::<libc::sock_extended_err>().read_unaligned() };
            let origin = match ee.ee_origin {
                libc::SO_EE_ORIGIN_ICMP | libc::SO_EE_ORIGIN_ICMP6 => ErrorOrigin::Icmp,
                libc::SO_EE_ORIGIN_LOCAL => ErrorOrigin::Local,
                other => ErrorOrigin::Other(other),
            };
            let mut offender = None;
            let rest = data_len - size_of::<libc::sock_extended_err>();
            if origin == ErrorOrigin::Icmp && rest >= size_of::<libc::sa_family_t>() {
                let mut storage = MaybeUninit::<libc::sockaddr_storage>::zeroed();
                let copy = rest.min(size_of::<libc::sockaddr_storage>());
                // SAFETY: `SO_EE_OFFENDER`: the offender's sockaddr follows the
                // `sock_extended_err` within the message data; `copy` bytes of it are inside the
                // control message and fit in `storage`, which does not overlap it.
                let storage = unsafe {
                    std::ptr::copy_nonoverlapping(
                        data.add(size_of::<libc::sock_extended_err>()),
                        storage.as_mut_ptr().cast::<u8>(),
                        copy,
                    );
                    storage.assume_init()
                };
                offender = read_sockaddr(&storage, copy as libc::socklen_t).map(|a| a.ip());
            }
            return Some((ee.ee_errno as i32, origin, offender));
        }
        // SAFETY: `msg` and `cmsg` are valid as established above.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
    None
}

/// Converts a kernel-filled socket address, if it is IPv4 or IPv6 and `len` covers it.
fn read_sockaddr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match i32::from(storage.ss_family) {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a `sockaddr_in`, `len` covers it and
            // `sockaddr_storage` is aligned for every socket address type.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for `sockaddr_in6`.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                u32::from_be(sin6.sin6_flowinfo),
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Writes `addr` into `storage` and returns its length.
fn write_sockaddr(addr: SocketAddr, storage: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: `sockaddr_storage` is larger than and aligned for `sockaddr_in`.
            unsafe {
                (storage as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in>()
                    .write(sin);
            }
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo().to_be(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: `sockaddr_storage` is larger than and aligned for `sockaddr_in6`.
            unsafe {
                (storage as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in6>()
                    .write(sin6);
            }
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_round_trip() {
        for addr in [
            "127.0.0.1:9".parse::<SocketAddr>().unwrap(),
            "[::1]:65535".parse().unwrap(),
            "[fe80::1%2]:7".parse().unwrap(),
        ] {
            // SAFETY: all-zero bytes are a valid `sockaddr_storage`.
            let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            let len = write_sockaddr(addr, &mut storage);
            assert_eq!(read_sockaddr(&storage, len), Some(addr));
            assert_eq!(read_sockaddr(&storage, len - 1), None);
        }
    }

    /// Replays `answers` as the kernel's replies to `sendmmsg`, on a batch of `n` datagrams
    /// whose payload is their index.
    fn replay(n: u8, answers: &[Result<usize, i32>]) -> (SendReport, SendBatch, UdpCounters) {
        let mut batch = SendBatch::new(BATCH_DATAGRAMS_MAX).unwrap();
        for i in 0..n {
            let dest = SocketAddr::from((Ipv4Addr::LOCALHOST, 1000 + u16::from(i)));
            batch.push(dest, &[i]).unwrap();
        }
        let mut counters = UdpCounters::default();
        let mut answers = answers.iter();
        let report = send_loop(&mut batch, &mut counters, |_, _| {
            *answers
                .next()
                .expect("send_loop made more calls than expected")
        });
        assert!(
            answers.next().is_none(),
            "send_loop made fewer calls than expected"
        );
        (report, batch, counters)
    }

    fn payloads(batch: &SendBatch) -> Vec<u8> {
        (0..batch.len())
            .map(|i| batch.bufs[i * DATAGRAM_BYTES_MAX])
            .collect()
    }

    #[test]
    fn send_loop_sends_in_pieces() {
        let (report, batch, counters) = replay(10, &[Ok(4), Ok(6)]);
        assert_eq!((report.sent, report.failed, report.pending), (10, 0, 0));
        assert!(batch.is_empty());
        assert_eq!((counters.send_batches, counters.datagrams_out), (2, 10));
    }

    #[test]
    fn send_loop_retries_a_stale_error_once() {
        // The refusal belongs to an earlier datagram: the retry of datagram 3 succeeds.
        let (report, batch, counters) = replay(5, &[Ok(3), Err(libc::ECONNREFUSED), Ok(2)]);
        assert_eq!((report.sent, report.failed, report.pending), (5, 0, 0));
        assert!(batch.failures().is_empty());
        assert_eq!(counters.send_stale_errors, 1);
    }

    #[test]
    fn send_loop_skips_a_datagram_refused_twice() {
        let (report, batch, counters) = replay(
            5,
            &[
                Ok(2),
                Err(libc::EHOSTUNREACH),
                Err(libc::EHOSTUNREACH),
                Ok(2),
            ],
        );
        assert_eq!((report.sent, report.failed, report.pending), (4, 1, 0));
        let failure = batch.failures()[0];
        assert_eq!(failure.dest.port(), 1002);
        assert_eq!(failure.kind, PeerErrorKind::HostUnreachable);
        assert_eq!(counters.send_failed.host_unreachable, 1);
    }

    #[test]
    fn send_loop_skips_a_hard_failure_at_once() {
        let (report, batch, _) = replay(3, &[Err(libc::EACCES), Ok(2)]);
        assert_eq!((report.sent, report.failed), (2, 1));
        assert_eq!(batch.failures()[0].dest.port(), 1000);
        assert_eq!(batch.failures()[0].kind, PeerErrorKind::Other(libc::EACCES));
    }

    #[test]
    fn send_loop_keeps_unsent_datagrams_in_order_on_eagain() {
        let (report, mut batch, counters) = replay(8, &[Ok(3), Err(libc::EAGAIN)]);
        assert_eq!((report.sent, report.failed, report.pending), (3, 0, 5));
        assert_eq!(payloads(&batch), vec![3, 4, 5, 6, 7]);
        assert_eq!(batch.dests[0].port(), 1003);
        assert_eq!(counters.send_would_block, 1);
        // The next call sends the rest, starting where the first stopped.
        let mut counters = UdpCounters::default();
        let report = send_loop(&mut batch, &mut counters, |b, next| {
            assert_eq!(next, 0);
            Ok(b.len())
        });
        assert_eq!((report.sent, report.pending), (5, 0));
    }

    #[test]
    fn send_loop_bounds_interrupt_retries() {
        let mut answers = vec![Err(libc::EINTR); SYSCALL_RETRIES_MAX];
        answers.push(Ok(2));
        let (report, _, _) = replay(2, &answers);
        assert_eq!(report.sent, 2);
        // One interrupt too many: the datagram is given up, not retried forever.
        let mut answers = vec![Err(libc::EINTR); SYSCALL_RETRIES_MAX + 1];
        answers.push(Ok(1));
        let (report, batch, _) = replay(2, &answers);
        assert_eq!((report.sent, report.failed), (1, 1));
        assert_eq!(batch.failures()[0].kind, PeerErrorKind::Other(libc::EINTR));
    }

    #[test]
    fn batch_bounds() {
        assert!(RecvBatch::new(0).is_err());
        assert!(SendBatch::new(BATCH_DATAGRAMS_MAX + 1).is_err());
        let mut batch = SendBatch::new(2).unwrap();
        let dest: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert!(matches!(
            batch.push(dest, &[0; DATAGRAM_BYTES_MAX + 1]),
            Err(Error::DatagramTooLong { .. })
        ));
        batch.push(dest, b"a").unwrap();
        batch.push(dest, b"b").unwrap();
        assert!(matches!(
            batch.push(dest, b"c"),
            Err(Error::BatchFull { capacity: 2 })
        ));
        batch.keep_tail(1);
        assert_eq!(batch.len(), 1);
        assert_eq!(&batch.bufs[..1], b"b");
    }
}
