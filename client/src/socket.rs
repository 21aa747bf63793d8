//! The agent's localhost line protocol, client side (see `agent/README.md`).

use std::io::{BufRead, BufReader, Write};

use std::net::{SocketAddr, TcpStream};
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
    Refused(std::io::Error),
    /// `ERR CODE text`.
    Agent { code: String, text: String },
    /// Not the protocol.
    Protocol(String),
    /// I/O failed mid-way.
    Io(&'static str, std::io::Error),
}

pub(crate) struct Client {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl Client {
    pub(crate) fn new(addr: SocketAddr) -> Client {
        Client { addr, conn: None }
    }

    fn connect(&mut self) -> Result<&mut BufReader<TcpStream>, Failure> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, Duration::from_millis(CONNECT_MS))
                .map_err(Failure::Refused)?;
            let _ = s.set_nodelay(true);
            s.set_read_timeout(Some(Duration::from_millis(READ_MS)))
                .map_err(|e| Failure::Io("set_read_timeout", e))?;
            self.conn = Some(BufReader::new(s));
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    /// One request, one reply header; drops the connection on any failure
    /// so the next call starts clean. A kept connection that fails (the
    /// agent restarted) is replaced once.
    fn request<T>(
        &mut self,
        line: &str,
        read: impl Fn(&mut BufReader<TcpStream>, &str) -> Result<T, Failure>,
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
        read: &impl Fn(&mut BufReader<TcpStream>, &str) -> Result<T, Failure>,
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

    pub(crate) fn ping(&mut self) -> Result<(), std::io::Error> {
        match self.request("PING\n", |_, head| {
            if head == "PONG" {
                Ok(())
            } else {
                Err(Failure::Protocol(cut(head)))
            }
        }) {
            Ok(()) => Ok(()),
            Err(Failure::Refused(e) | Failure::Io(_, e)) => Err(e),
            Err(_) => Err(std::io::Error::other(
                "the socket does not speak the unid protocol",
            )),
        }
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

fn read_line(conn: &mut BufReader<TcpStream>) -> Result<String, Failure> {
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
