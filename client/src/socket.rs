//! The agent's localhost line protocol, client side (see `agent/README.md`).

use std::io::{BufRead, BufReader, Read, Write};

use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use unid_proto::Width;

/// The most ids one `NEXT` returns (the agent's bound).
pub(crate) const SOCKET_IDS_MAX: u64 = 10_000;
/// Connect timeout.
const CONNECT_MS: u64 = 1_000;
/// Read timeout: above the agent's longest wait for ids (60 s bound).
const READ_MS: u64 = 65_000;
/// Longest reply line read.
const LINE_BYTES_MAX: usize = 512;

pub(crate) enum Failure {
    /// Nothing listens.
    Refused,
    /// `ERR CODE text`.
    Agent { code: String, text: String },
    /// Not the protocol.
    Protocol(String),
    /// I/O failed mid-way.
    Io(&'static str, std::io::Error),
    /// The listener is not the agent's user (or its folder is not safe).
    Insecure(PathBuf, String),
}

/// A connection to the agent: its Unix socket or its TCP socket.
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

type Conn = BufReader<Stream>;

pub(crate) struct Client {
    addr: SocketAddr,
    /// The agent's Unix socket (`RING_DIR/.unid-socket`), tried first.
    unix: PathBuf,
    ring_dir: PathBuf,
    /// Uids trusted to be the agent: this process's, root, `agent_uid`.
    owners: Vec<u32>,
    conn: Option<Conn>,
}

impl Client {
    pub(crate) fn new(addr: SocketAddr, ring_dir: &Path, agent_uid: Option<u32>) -> Client {
        let mut owners = vec![unid_ring::secure::euid(), 0];
        owners.extend(agent_uid);
        Client {
            addr,
            unix: ring_dir.join(unid_ring::secure::UNIX_SOCKET_NAME),
            ring_dir: ring_dir.to_path_buf(),
            owners,
            conn: None,
        }
    }

    /// The Unix socket if there is one (in a safe folder, owned and served by a trusted
    /// uid), else the TCP socket if its far end belongs to a trusted uid.
    fn open(&self) -> Result<Stream, Failure> {
        let timeout = Some(Duration::from_millis(READ_MS));
        if let Ok(m) = std::fs::symlink_metadata(&self.unix)
            && m.file_type().is_socket()
        {
            let insecure = |r: String| Failure::Insecure(self.unix.clone(), r);
            unid_ring::secure::check_dir(&self.ring_dir, &self.owners)
                .map_err(|e| insecure(e.to_string()))?;
            if !self.owners.contains(&m.uid()) {
                return Err(insecure(format!("the socket is owned by uid {}", m.uid())));
            }
            if let Ok(s) = UnixStream::connect(&self.unix) {
                let cred = unid_ring::peer::unix_peer(&s)
                    .map_err(|e| insecure(format!("SO_PEERCRED: {e}")))?;
                if !self.owners.contains(&cred.uid) {
                    return Err(insecure(format!(
                        "the process serving it runs as uid {}",
                        cred.uid
                    )));
                }
                s.set_read_timeout(timeout)
                    .map_err(|e| Failure::Io("set_read_timeout", e))?;
                return Ok(Stream::Unix(s));
            }
            // A stale socket (agent gone): try TCP.
        }
        let s = TcpStream::connect_timeout(&self.addr, Duration::from_millis(CONNECT_MS))
            .map_err(|_| Failure::Refused)?;
        let path = PathBuf::from(format!("tcp {}", self.addr));
        let (local, peer) = match (s.local_addr(), s.peer_addr()) {
            (Ok(l), Ok(p)) => (l, p),
            _ => return Err(Failure::Insecure(path, "no socket addresses".into())),
        };
        match unid_ring::peer::tcp_peer_uid(local, peer) {
            Ok(Some(uid)) if self.owners.contains(&uid) => {}
            Ok(Some(uid)) => {
                return Err(Failure::Insecure(
                    path,
                    format!("the listener belongs to uid {uid}, not the agent's user"),
                ));
            }
            Ok(None) => {
                return Err(Failure::Insecure(
                    path,
                    "not a socket of this host: its owner cannot be checked".into(),
                ));
            }
            Err(e) => {
                return Err(Failure::Insecure(
                    path,
                    format!("cannot read /proc/net/tcp: {e}"),
                ));
            }
        }
        let _ = s.set_nodelay(true);
        s.set_read_timeout(timeout)
            .map_err(|e| Failure::Io("set_read_timeout", e))?;
        Ok(Stream::Tcp(s))
    }

    fn connect(&mut self) -> Result<&mut Conn, Failure> {
        if self.conn.is_none() {
            self.conn = Some(BufReader::new(self.open()?));
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    /// One request, one reply header; drops the connection on any failure
    /// so the next call starts clean. A kept connection that fails (the
    /// agent restarted) is replaced once.
    fn request<T>(
        &mut self,
        line: &str,
        read: impl Fn(&mut Conn, &str) -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        let reused = self.conn.is_some();
        match self.request_once(line, &read) {
            Err(Failure::Io(..)) if reused => self.request_once(line, &read),
            other => other,
        }
    }

    fn request_once<T>(
        &mut self,
        line: &str,
        read: &impl Fn(&mut Conn, &str) -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        let result = (|| {
            let conn = self.connect()?;
            conn.get_mut()
                .write_all(line.as_bytes())
                .map_err(|e| Failure::Io("write", e))?;
            let head = read_line(conn)?;
            if let Some(rest) = head.strip_prefix("ERR ") {
                let (code, text) = rest.split_once(' ').unwrap_or((rest, ""));
                return Err(Failure::Agent {
                    code: code.to_owned(),
                    text: text.to_owned(),
                });
            }
            read(conn, &head)
        })();
        if matches!(result, Err(Failure::Protocol(_) | Failure::Io(..))) {
            self.conn = None;
        }
        result
    }

    pub(crate) fn ping(&mut self) -> Result<(), Failure> {
        self.request("PING\n", |_, head| {
            if head == "PONG" {
                Ok(())
            } else {
                Err(Failure::Protocol(cut(head)))
            }
        })
    }

    /// `NEXT sequence max`: the ids of the reply (1..=max, increasing) and
    /// the sequence's width.
    pub(crate) fn next(&mut self, sequence: &str, max: u64) -> Result<(Vec<u128>, Width), Failure> {
        let max = max.clamp(1, SOCKET_IDS_MAX);
        self.request(&format!("NEXT {sequence} {max}\n"), |conn, head| {
            let mut words = head.split(' ');
            let (Some("OK"), Some(n), Some(w), None) =
                (words.next(), words.next(), words.next(), words.next())
            else {
                return Err(Failure::Protocol(cut(head)));
            };
            let n: u64 = n.parse().map_err(|_| Failure::Protocol(cut(head)))?;
            let width = w
                .parse::<u8>()
                .ok()
                .and_then(Width::from_bytes)
                .ok_or_else(|| Failure::Protocol(cut(head)))?;
            if n == 0 || n > max {
                return Err(Failure::Protocol(cut(head)));
            }
            let mut ids = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let l = read_line(conn)?;
                let id: u128 = l.parse().map_err(|_| Failure::Protocol(cut(&l)))?;
                if ids.last().is_some_and(|&p: &u128| id <= p) || !width.contains(id) {
                    return Err(Failure::Protocol(cut(&l)));
                }
                ids.push(id);
            }
            Ok((ids, width))
        })
    }
}

fn read_line(conn: &mut Conn) -> Result<String, Failure> {
    let mut line = String::new();
    let n = std::io::Read::take(&mut *conn, LINE_BYTES_MAX as u64)
        .read_line(&mut line)
        .map_err(|e| Failure::Io("read", e))?;
    if n == 0 {
        return Err(Failure::Io(
            "read",
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "agent closed the connection",
            ),
        ));
    }
    if !line.ends_with('\n') {
        return Err(Failure::Protocol(cut(&line)));
    }
    line.pop();
    if line.ends_with('\r') {
        line.pop();
    }
    Ok(line)
}

fn cut(s: &str) -> String {
    s.chars().take(100).collect()
}
