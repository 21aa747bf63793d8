//! Small blocking helpers over the wire format for the control path: status, sequence
//! create. The load itself is driven by `agent.rs`.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use unid_proto::{Codec, DATAGRAM_BYTES_MAX, ErrorCode, Header, Message, NodeId, Width, decode};

/// A throwaway admin socket that sends one request and waits for the answer to it.
pub struct Admin {
    sock: UdpSocket,
    codec: Codec,
    seq: u64,
}

/// What a server said about the cluster.
#[derive(Copy, Clone, Debug)]
pub struct Status {
    /// The leader's id (0: unknown).
    pub leader_id: NodeId,
    /// The term.
    pub term: u64,
}

impl Admin {
    /// Binds a socket on 127.0.0.1 (or `[::1]` for IPv6 servers: not needed here).
    pub fn new() -> anyhow::Result<Admin> {
        let sock = UdpSocket::bind("127.0.0.1:0").context("bind admin socket on 127.0.0.1")?;
        Ok(Admin {
            sock,
            codec: Codec::new(),
            seq: 0,
        })
    }

    /// Sends `msg` to `to` and hands the answer to `f`; `None` after `timeout`.
    fn call<T>(
        &mut self,
        to: SocketAddr,
        msg: &Message<'_>,
        timeout: Duration,
        f: impl Fn(&Message<'_>) -> T,
    ) -> Option<T> {
        self.seq += 1;
        let mut buf = [0u8; DATAGRAM_BYTES_MAX];
        let header = Header {
            sender: 0,
            seq: self.seq,
            reply_to: 0,
            epoch: 0,
        };
        let n = self.codec.encode(&header, msg, None, &mut buf).ok()?;
        let _ = self.sock.send_to(&buf[..n], to);
        let deadline = Instant::now() + timeout;
        let mut rbuf = [0u8; 2048];
        loop {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let _ = self.sock.set_read_timeout(Some(deadline - now));
            let Ok((n, _)) = self.sock.recv_from(&mut rbuf) else {
                // A timeout, or ICMP "port unreachable" from a dead server.
                std::thread::sleep(Duration::from_millis(2));
                continue;
            };
            if let Ok(frame) = decode(&rbuf[..n], None)
                && frame.header.reply_to == self.seq
            {
                return Some(f(&frame.message));
            }
        }
    }

    /// The status as `at` reports it.
    pub fn status(&mut self, at: SocketAddr, timeout: Duration) -> Option<Status> {
        let msg = Message::StatusRequest {
            sequences_after: None,
        };
        self.call(at, &msg, timeout, |m| match *m {
            Message::StatusReply {
                leader_id, term, ..
            } => Some(Status { leader_id, term }),
            _ => None,
        })
        .flatten()
    }

    /// Creates sequence `name` (an existing one of the same width is fine), asking each of
    /// `servers` in turn until one accepts or `timeout` passes.
    pub fn create_sequence(
        &mut self,
        servers: &[SocketAddr],
        name: &str,
        width: Width,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no answer");
        for to in servers.iter().cycle() {
            if Instant::now() >= deadline {
                bail!("cannot create sequence {name:?} within {timeout:?}: {last}");
            }
            let msg = Message::SequenceCreate {
                name,
                width,
                start: 1,
            };
            let r = self.call(*to, &msg, Duration::from_millis(500), |m| match *m {
                Message::SequenceInfo { width: w, .. } => Ok(Some(w)),
                Message::Error {
                    code: ErrorCode::AlreadyExists,
                    ..
                } => Ok(None),
                Message::Error { code, text, .. } => Err(format!("{to}: error {code:?} {text}")),
                ref other => Err(format!("{to}: unexpected {:?}", other.message_type())),
            });
            match r {
                Some(Ok(Some(w))) if w != width => {
                    bail!("sequence {name:?} exists with width {w}, not {width}")
                }
                Some(Ok(_)) => return Ok(()),
                Some(Err(e)) => last = e,
                None => last = format!("{to}: no answer"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        unreachable!("cycle over a non-empty list never ends")
    }
}

/// Waits until every server in `at` names the same leader; returns it. `check` runs between
/// polls and ends the wait with its error (e.g. a spawned server that exited).
pub fn wait_leader(
    at: &[SocketAddr],
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Status> {
    let mut admin = Admin::new()?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        check()?;
        let seen: Vec<Option<Status>> = at
            .iter()
            .map(|a| admin.status(*a, Duration::from_millis(300)))
            .collect();
        if let Some(Some(first)) = seen.first()
            && first.leader_id != 0
            && seen
                .iter()
                .all(|s| s.map(|x| x.leader_id) == Some(first.leader_id))
        {
            return Ok(*first);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("servers {at:?} agreed on no leader within {timeout:?}")
}
