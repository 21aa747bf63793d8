//! The agent's UDP sockets towards the servers: one *connected* socket per
//! server, so that the kernel reports what ICMP says about a path (port
//! unreachable → `ECONNREFUSED`, host or network unreachable) on that
//! socket's next `send` or `recv`, and a send with no route fails at once
//! (`ENETUNREACH`). No `unsafe` and no `IP_RECVERR` needed: that is what a
//! connected UDP socket does.
//!
//! These errors are the *fast* signal that a server or the path to it is
//! gone (the requester then rotates away from it and retransmits at once);
//! requests going unanswered are the slow one. The machine keeps each
//! server's path state (`machine/paths.rs`).

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use crate::PathLoss;

/// The most server sockets kept (servers learned beyond are dropped first
/// when they are no longer among the requester's).
pub(crate) const SOCKETS_MAX: usize = 128;

/// The loss an I/O error means, if it is one of the path errors.
pub(crate) fn classify(e: &std::io::Error) -> Option<PathLoss> {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Some(PathLoss::Refused),
        std::io::ErrorKind::HostUnreachable => Some(PathLoss::HostUnreachable),
        std::io::ErrorKind::NetworkUnreachable => Some(PathLoss::NetworkUnreachable),
        _ => None,
    }
}

struct Entry {
    addr: SocketAddr,
    socket: UdpSocket,
}

/// What a receive produced.
pub(crate) enum Recv {
    /// A datagram of `len` bytes from `from`.
    Datagram { len: usize, from: SocketAddr },
    /// The kernel reported a path error for `from`.
    PathError { from: SocketAddr, loss: PathLoss },
}

/// The connected sockets, one per server.
pub(crate) struct Net {
    entries: Vec<Entry>,
    /// The entry in blocking mode (the one waited on).
    blocking: Option<usize>,
    /// Next entry to drain first (fairness).
    cursor: usize,
}

impl Net {
    pub(crate) fn new() -> Net {
        Net {
            entries: Vec::new(),
            blocking: None,
            cursor: 0,
        }
    }

    fn index(&mut self, addr: SocketAddr, keep: &[SocketAddr]) -> std::io::Result<usize> {
        if let Some(i) = self.entries.iter().position(|e| e.addr == addr) {
            return Ok(i);
        }
        if self.entries.len() >= SOCKETS_MAX {
            // Forget one the requester no longer uses.
            let Some(i) = self.entries.iter().position(|e| !keep.contains(&e.addr)) else {
                return Err(std::io::Error::other("too many server sockets"));
            };
            // Every remaining socket goes back to non-blocking: the next
            // `recv` picks the one to wait on again.
            self.entries.swap_remove(i);
            for e in &self.entries {
                let _ = e.socket.set_nonblocking(true);
            }
            self.blocking = None;
        }
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0".parse().expect("valid")
        } else {
            "0.0.0.0:0".parse().expect("valid")
        };
        let socket = UdpSocket::bind(bind)?;
        socket.connect(addr)?;
        socket.set_nonblocking(true)?;
        self.entries.push(Entry { addr, socket });
        Ok(self.entries.len() - 1)
    }

    /// Opens the socket for `addr` now (so its errors can be read).
    pub(crate) fn ensure(&mut self, addr: SocketAddr, keep: &[SocketAddr]) -> std::io::Result<()> {
        self.index(addr, keep).map(|_| ())
    }

    /// Sends `bytes` to `addr` on its connected socket.
    pub(crate) fn send(
        &mut self,
        addr: SocketAddr,
        bytes: &[u8],
        keep: &[SocketAddr],
    ) -> std::io::Result<usize> {
        let i = self.index(addr, keep)?;
        self.entries[i].socket.send(bytes)
    }

    /// Waits up to `wait` on `leader`'s socket for one datagram or error
    /// (or sleeps, if it has no socket yet), then reads the other sockets
    /// without waiting, at most `per_socket_max` each. Calls `f` for each.
    pub(crate) fn recv(
        &mut self,
        leader: SocketAddr,
        wait: Duration,
        buf: &mut [u8],
        per_socket_max: usize,
        mut f: impl FnMut(Recv, &[u8]),
    ) {
        let want = self.entries.iter().position(|e| e.addr == leader);
        if want != self.blocking {
            if let Some(old) = self.blocking
                && let Some(e) = self.entries.get(old)
            {
                let _ = e.socket.set_nonblocking(true);
            }
            if let Some(new) = want {
                let _ = self.entries[new].socket.set_nonblocking(false);
            }
            self.blocking = want;
        }
        match want {
            Some(i) => {
                let e = &self.entries[i];
                let _ = e
                    .socket
                    .set_read_timeout(Some(wait.max(Duration::from_micros(100))));
                if let Some(r) = read_one(e, buf) {
                    let len = match r {
                        Recv::Datagram { len, .. } => len,
                        Recv::PathError { .. } => 0,
                    };
                    f(r, &buf[..len]);
                }
            }
            None => std::thread::sleep(wait),
        }
        let n = self.entries.len();
        if n == 0 {
            return;
        }
        self.cursor = (self.cursor + 1) % n;
        for k in 0..n {
            let i = (self.cursor + k) % n;
            if Some(i) == self.blocking {
                // Waited on: what else queued there is read by the next
                // call's wait, which returns at once.
                continue;
            }
            for _ in 0..per_socket_max {
                let Some(r) = read_one(&self.entries[i], buf) else {
                    break;
                };
                let len = match r {
                    Recv::Datagram { len, .. } => len,
                    Recv::PathError { .. } => 0,
                };
                f(r, &buf[..len]);
            }
        }
    }
}

fn read_one(e: &Entry, buf: &mut [u8]) -> Option<Recv> {
    match e.socket.recv(buf) {
        Ok(len) => Some(Recv::Datagram { len, from: e.addr }),
        Err(err) => classify(&err).map(|loss| Recv::PathError { from: e.addr, loss }),
    }
}
