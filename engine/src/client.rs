//! A small blocking UDP client of unid servers, for operator tools (`unid sequence`, `unid
//! status`) and tests. Not the agent's data path (that is `unid-core`'s `Requester`).
//!
//! One request at a time: [`Client::call`] sends a message, waits up to
//! [`ClientConfig::attempt_ms`] for the answer, follows `NotLeader` redirects (at most
//! [`REDIRECTS_MAX`] per call), moves on to the next server when one does not answer, and gives
//! up after [`ClientConfig::deadline_ms`]. Answers are matched on `reply_to`; stale or foreign
//! datagrams are ignored.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use unid_proto::{AuthKey, Codec, DATAGRAM_BYTES_MAX, Frame, Header, Message, NodeId, decode};

/// Most `NotLeader` redirects one [`Client::call`] follows.
pub const REDIRECTS_MAX: u32 = 8;

/// Errors of [`Client`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A socket operation failed.
    #[error("{op}: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The request could not be encoded (the message says why).
    #[error("encoding the request: {0}")]
    Encode(String),
    /// No server gave a usable answer before the deadline.
    #[error("no answer from {servers:?} within {waited_ms} ms (last: {last})")]
    NoAnswer {
        /// The servers tried.
        servers: Vec<SocketAddr>,
        /// How long it tried.
        waited_ms: u64,
        /// What happened last (e.g. "redirected to ...", "timed out").
        last: String,
    },
    /// The client was given no server.
    #[error("no server given")]
    NoServers,
}

/// How a [`Client`] retries.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// How long to wait for one answer before retrying elsewhere.
    pub attempt_ms: u64,
    /// How long one call may take in all.
    pub deadline_ms: u64,
    /// The cluster secret, if the cluster uses one.
    pub secret: Option<Vec<u8>>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            attempt_ms: 400,
            deadline_ms: 5_000,
            secret: None,
        }
    }
}

/// What [`Client::call`]'s `accept` closure says about an answer.
pub enum Answer<T> {
    /// The call is done.
    Done(T),
    /// Not an answer to keep (e.g. "not ready"): wait a little and send again to the same server.
    Retry,
}

/// A blocking request/response client. See the module docs.
pub struct Client {
    socket: UdpSocket,
    servers: Vec<SocketAddr>,
    key: Option<AuthKey>,
    codec: Codec,
    config: ClientConfig,
    seq: u64,
    current: usize,
    /// Where the last answer came from (the server that answered).
    pub last_server: Option<SocketAddr>,
    /// The highest epoch (Raft term) seen in an answer.
    pub epoch: u64,
}

impl Client {
    /// A client of `servers` (tried in order) bound to an ephemeral local port.
    pub fn new(servers: &[SocketAddr], config: ClientConfig) -> Result<Client, ClientError> {
        let first = *servers.first().ok_or(ClientError::NoServers)?;
        let bind: SocketAddr = if first.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        let socket =
            UdpSocket::bind(bind).map_err(|source| ClientError::Io { op: "bind", source })?;
        // Start request numbers from the clock so a new process never reuses an old one's.
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1)
            .max(1);
        Ok(Client {
            socket,
            servers: servers.to_vec(),
            key: config.secret.as_deref().map(AuthKey::from_secret),
            codec: Codec::new(),
            config,
            seq,
            current: 0,
            last_server: None,
            epoch: 0,
        })
    }

    /// The local address (to tell a server where to send notices).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.socket.local_addr().ok()
    }

    /// Makes `server` the one tried first by the next call.
    pub fn prefer(&mut self, server: SocketAddr) {
        match self.servers.iter().position(|s| *s == server) {
            Some(i) => self.current = i,
            None => {
                self.servers.push(server);
                self.current = self.servers.len() - 1;
            }
        }
    }

    /// Sends `msg` as node `sender` and returns what `accept` makes of the first acceptable
    /// answer. `NotLeader` answers naming a leader are followed before `accept` sees them (it
    /// sees those that name none, and every other message).
    pub fn call<T>(
        &mut self,
        sender: NodeId,
        msg: &Message<'_>,
        mut accept: impl FnMut(&Frame<'_>, SocketAddr) -> Option<Answer<T>>,
    ) -> Result<T, ClientError> {
        let started = Instant::now();
        let deadline = started + Duration::from_millis(self.config.deadline_ms);
        let mut out = [0u8; DATAGRAM_BYTES_MAX];
        let mut buf = [0u8; 2048];
        let mut redirects = 0;
        let mut target = self.servers[self.current];
        let mut last = String::from("nothing sent");
        while Instant::now() < deadline {
            self.seq += 1;
            let seq = self.seq;
            let header = Header {
                sender,
                seq,
                reply_to: 0,
                epoch: self.epoch,
            };
            let len = self
                .codec
                .encode(&header, msg, self.key.as_ref(), &mut out)
                .map_err(|e| ClientError::Encode(e.to_string()))?;
            // Connected, so that a server that is down is reported at once (ICMP port
            // unreachable reaches only connected UDP sockets) and only its answers arrive.
            let sent = self
                .socket
                .connect(target)
                .and_then(|()| self.socket.send(&out[..len]));
            if let Err(e) = sent {
                last = format!("sending to {target}: {e}");
                self.next_server(&mut target);
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            let attempt_end =
                (Instant::now() + Duration::from_millis(self.config.attempt_ms)).min(deadline);
            let mut next = Step::Timeout;
            while next == Step::Timeout {
                let now = Instant::now();
                if now >= attempt_end {
                    break;
                }
                let _ = self.socket.set_read_timeout(Some(attempt_end - now));
                let from = target;
                let n = match self.socket.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        break;
                    }
                    // ICMP port unreachable from a server that is down.
                    Err(e) => {
                        last = format!("{target}: {e}");
                        next = Step::Refused;
                        break;
                    }
                };
                let Ok(frame) = decode(&buf[..n], self.key.as_ref()) else {
                    continue;
                };
                if frame.header.reply_to != seq {
                    continue;
                }
                self.epoch = self.epoch.max(frame.header.epoch);
                if let Message::NotLeader {
                    leader: Some(leader),
                    ..
                } = frame.message
                {
                    if redirects < REDIRECTS_MAX && leader != from {
                        redirects += 1;
                        last = format!("{from} redirected to {leader}");
                        self.prefer(leader);
                        target = leader;
                        next = Step::Resend;
                        continue;
                    }
                    last = format!("{from} redirected to {leader} (not followed)");
                    next = Step::Wait;
                    continue;
                }
                self.last_server = Some(from);
                match accept(&frame, from) {
                    Some(Answer::Done(t)) => return Ok(t),
                    Some(Answer::Retry) => {
                        last = format!("{from} answered {:?}", frame.message.message_type());
                        next = Step::Wait;
                    }
                    None => continue,
                }
            }
            match next {
                Step::Resend => {}
                Step::Wait => std::thread::sleep(Duration::from_millis(50)),
                Step::Refused => {
                    self.next_server(&mut target);
                    std::thread::sleep(Duration::from_millis(20));
                }
                Step::Timeout => {
                    if last == "nothing sent" || !last.starts_with(&target.to_string()) {
                        last = format!("{target} timed out");
                    }
                    self.next_server(&mut target);
                }
            }
        }
        Err(ClientError::NoAnswer {
            servers: self.servers.clone(),
            waited_ms: started.elapsed().as_millis() as u64,
            last,
        })
    }

    fn next_server(&mut self, target: &mut SocketAddr) {
        self.current = (self.current + 1) % self.servers.len();
        *target = self.servers[self.current];
    }
}

#[derive(PartialEq, Eq)]
enum Step {
    Timeout,
    Refused,
    Resend,
    Wait,
}
