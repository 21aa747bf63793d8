//! The operations measured by [`crate::closed_loop`] that need no server: the in-process
//! references and unid's client paths (ring and localhost socket). PostgreSQL and Redis are in
//! `src/bin/peers.rs` (behind the `peers` feature).

use std::convert::Infallible;
use std::hint::black_box;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::closed_loop::Op;

/// `AtomicU64::fetch_add(1)` on a counter shared by every worker of a process.
pub struct FetchAdd(pub Arc<AtomicU64>);

impl Op for FetchAdd {
    type Error = Infallible;
    fn op(&mut self) -> Result<u64, Infallible> {
        black_box(self.0.fetch_add(1, Ordering::Relaxed));
        Ok(1)
    }
}

/// Nothing: with every operation timed, its latency is the timer's own cost.
pub struct Noop;

impl Op for Noop {
    type Error = Infallible;
    fn op(&mut self) -> Result<u64, Infallible> {
        Ok(black_box(1))
    }
}

/// `uuid::Uuid::now_v7()`.
pub struct UuidV7;

impl Op for UuidV7 {
    type Error = Infallible;
    fn op(&mut self) -> Result<u64, Infallible> {
        black_box(uuid::Uuid::now_v7());
        Ok(1)
    }
}

/// A Twitter Snowflake id from `rs-snowflake` (`SnowflakeIdGenerator::generate`: 41 bits of
/// milliseconds, 10 bits of machine and node, 12 bits of sequence, so at most 4096 ids per
/// millisecond per generator; it waits for the next millisecond when they are used up). One
/// generator per worker, each with its own node id, as Snowflake is deployed.
pub struct Snowflake(pub snowflake::SnowflakeIdGenerator);

impl Snowflake {
    /// A generator for worker `index` (node ids wrap at 32).
    pub fn new(index: usize) -> Snowflake {
        Snowflake(snowflake::SnowflakeIdGenerator::new(1, (index % 32) as i32))
    }
}

impl Op for Snowflake {
    type Error = Infallible;
    fn op(&mut self) -> Result<u64, Infallible> {
        black_box(self.0.generate());
        Ok(1)
    }
}

/// Opens `sequence`'s ring in `ring_dir` with the `unid` client, with no socket fallback (a
/// measurement of the ring must not quietly become one of the socket).
pub fn open_ring(ring_dir: &std::path::Path, sequence: &str) -> Result<unid::Unid, unid::Error> {
    let options = unid::Options {
        ring_dir: ring_dir.to_path_buf(),
        socket_fallback: false,
        ..unid::Options::default()
    };
    unid::Unid::open_with(sequence, options)
}

/// `unid::Unid::next()` from the shared-memory ring.
pub struct UnidNext(pub unid::Unid);

impl Op for UnidNext {
    type Error = unid::Error;
    fn op(&mut self) -> Result<u64, unid::Error> {
        // As an application of a width-8 sequence takes it (the crate docs): the value as a
        // `u64`. (`black_box` of the whole `Id` copied it with one 16-byte load right after
        // the two 8-byte stores that made it, a store-forwarding stall that cost about as
        // much as the rest of the client's work: measured with `perf annotate`.)
        let id: u64 = self.0.next()?.try_into()?;
        black_box(id);
        Ok(1)
    }
}

/// `unid::Unid::take_range(max)` from the shared-memory ring: up to `max` consecutive ids.
pub struct UnidTakeRange(pub unid::Unid, pub u64);

impl Op for UnidTakeRange {
    type Error = unid::Error;
    fn op(&mut self) -> Result<u64, unid::Error> {
        let (first, count) = self.0.take_range(self.1)?;
        black_box(first);
        Ok(count)
    }
}

/// `NEXT <sequence> <n>` on the agent's localhost TCP socket (`agent/README.md`), as a
/// program in any language would do it: one request line, then `OK <k> <width>` and `k` ids in
/// decimal, each parsed.
pub struct UnidSocket {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
    request: Vec<u8>,
    line: String,
}

/// What went wrong on the agent's socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Connect, read or write failed.
    #[error("agent socket {addr}: {source}")]
    Io {
        /// The agent's address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The agent said something else than `OK <k> <width>` and `k` ids.
    #[error("agent socket: unexpected answer {line:?}")]
    Protocol {
        /// The line.
        line: String,
    },
}

impl UnidSocket {
    /// Connects to the agent at `addr`, to ask for `n` ids of `sequence` per request.
    pub fn connect(addr: SocketAddr, sequence: &str, n: u64) -> Result<UnidSocket, SocketError> {
        let io = |source| SocketError::Io { addr, source };
        let stream = TcpStream::connect(addr).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        Ok(UnidSocket {
            addr,
            reader: BufReader::with_capacity(1 << 16, stream),
            request: format!("NEXT {sequence} {n}\n").into_bytes(),
            line: String::new(),
        })
    }

    /// Reads one line into `self.line` (without its line end).
    fn read_line(&mut self) -> Result<(), SocketError> {
        self.line.clear();
        let addr = self.addr;
        let n = self
            .reader
            .read_line(&mut self.line)
            .map_err(|source| SocketError::Io { addr, source })?;
        if n == 0 {
            return Err(SocketError::Protocol {
                line: "(connection closed)".into(),
            });
        }
        let len = self.line.trim_end().len();
        self.line.truncate(len);
        Ok(())
    }

    fn protocol(&self) -> SocketError {
        SocketError::Protocol {
            line: self.line.clone(),
        }
    }
}

impl Op for UnidSocket {
    type Error = SocketError;
    fn op(&mut self) -> Result<u64, SocketError> {
        let addr = self.addr;
        self.reader
            .get_mut()
            .write_all(&self.request)
            .map_err(|source| SocketError::Io { addr, source })?;
        self.read_line()?;
        let k: u64 = match self.line.split_whitespace().collect::<Vec<_>>()[..] {
            ["OK", k, _width] => k.parse().map_err(|_| self.protocol())?,
            _ => return Err(self.protocol()),
        };
        for _ in 0..k {
            self.read_line()?;
            let id: u128 = self.line.parse().map_err(|_| self.protocol())?;
            black_box(id);
        }
        Ok(k)
    }
}

/// `unid_ring::Consumer::try_take()` directly, below the client (spinning while the ring is
/// empty): what the client's `next()` adds is the difference.
pub struct RingTryTake(pub unid_ring::Consumer);

impl Op for RingTryTake {
    type Error = unid_ring::RingError;
    fn op(&mut self) -> Result<u64, unid_ring::RingError> {
        loop {
            match self.0.try_take() {
                Ok(id) => {
                    black_box(id);
                    return Ok(1);
                }
                Err(unid_ring::RingError::WouldBlock) => std::hint::spin_loop(),
                Err(e) => return Err(e),
            }
        }
    }
}
