//! The localhost socket: a line protocol any language can speak (see
//! `agent/README.md`). Ids come from the rings, taken as an ordinary
//! consumer, so the same id never leaves both ways.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use unid_ring::{Consumer, RingError};

use crate::{
    AgentConfig, Error, Metrics, SOCKET_IDS_MAX, SOCKET_LINE_BYTES_MAX, SequenceState, Shared,
};

/// How often blocked reads and the accept loop look at the stop flag.
const POLL_MS: u64 = 50;
/// How long a reply may take to write before the connection is dropped.
const WRITE_TIMEOUT_MS: u64 = 5_000;
/// The longest a request line (or an HTTP request's headers) may take to arrive from its
/// first byte, in ms (at most `socket_idle_ms`): a slow sender cannot hold a slot.
pub(crate) const LINE_MS_MAX: u64 = 10_000;
/// The Unix socket's name in the ring folder (no sequence can have it: it starts with a dot).
pub const UNIX_SOCKET_NAME: &str = unid_ring::secure::UNIX_SOCKET_NAME;

struct Ctx {
    shared: Arc<Shared>,
    ring_dir: PathBuf,
    sequences: Vec<String>,
    wait_ms: u64,
    idle_ms: u64,
    connections_max: usize,
    connections: AtomicUsize,
    consumers: Mutex<HashMap<String, Arc<Consumer>>>,
    /// Who may connect (see [`Ctx::allowed_unix`], [`Ctx::allowed_tcp`]).
    euid: u32,
    /// The ring group (the agent's egid) when rings are group-readable.
    group: Option<u32>,
    tcp_any_user: bool,
}

/// One accepted connection.
enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn setup(&self) {
        let read = Some(Duration::from_millis(POLL_MS));
        let write = Some(Duration::from_millis(WRITE_TIMEOUT_MS));
        match self {
            Conn::Tcp(s) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(read);
                let _ = s.set_write_timeout(write);
                let _ = s.set_nodelay(true);
            }
            Conn::Unix(s) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(read);
                let _ = s.set_write_timeout(write);
            }
        }
    }

    /// Writes a refusal without blocking the accept loop for long.
    fn refuse(mut self, line: &str) {
        match &self {
            Conn::Tcp(s) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
            }
            Conn::Unix(s) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
            }
        }
        let _ = self.write_all(line.as_bytes());
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
        }
    }
}

impl Ctx {
    /// A Unix-socket peer may take ids if it is the agent's user, root, or (group-readable
    /// rings) in the agent's group: exactly who may map the rings.
    fn allowed_unix(&self, s: &UnixStream) -> Result<(), String> {
        let c = unid_ring::peer::unix_peer(s).map_err(|e| format!("SO_PEERCRED: {e}"))?;
        if c.uid == self.euid || c.uid == 0 {
            return Ok(());
        }
        if let Some(g) = self.group
            && (c.gid == g
                || unid_ring::peer::process_groups(c.pid).is_ok_and(|gs| gs.contains(&g)))
        {
            return Ok(());
        }
        Err(format!(
            "uid {} may not take ids from this agent (its user {}, root{})",
            c.uid,
            self.euid,
            match self.group {
                Some(g) => format!(" or group {g}"),
                None => String::new(),
            }
        ))
    }

    /// A TCP peer may take ids if its socket belongs to the agent's user or root (looked up
    /// in `/proc/net/tcp`, so loopback only), or anyone with `socket_tcp_any_user`.
    fn allowed_tcp(&self, s: &TcpStream) -> Result<(), String> {
        if self.tcp_any_user {
            return Ok(());
        }
        let (Ok(local), Ok(peer)) = (s.local_addr(), s.peer_addr()) else {
            return Err("no peer address".to_owned());
        };
        match unid_ring::peer::tcp_peer_uid(local, peer) {
            Ok(Some(uid)) if uid == self.euid || uid == 0 => Ok(()),
            Ok(Some(uid)) => Err(format!(
                "uid {uid} may not take ids over TCP (only uid {} and root; others use the Unix socket {} if in the ring group)",
                self.euid,
                self.ring_dir.join(UNIX_SOCKET_NAME).display()
            )),
            Ok(None) => Err(format!("{peer} is not a local socket this host lists")),
            Err(e) => Err(format!("cannot read /proc/net/tcp: {e}")),
        }
    }
}

pub(crate) struct Server {
    listener: Option<TcpListener>,
    unix: Option<(UnixListener, PathBuf)>,
    ctx: Arc<Ctx>,
}

/// Binds the Unix socket `dir/.unid-socket` (the folder made and checked like the rings'),
/// mode 0600 (0660 with group-readable rings). A live socket there (another agent with the
/// same folder) is left alone.
fn bind_unix(dir: &Path, group_access: bool) -> Result<(UnixListener, PathBuf), String> {
    use std::os::unix::fs::PermissionsExt;
    unid_ring::secure::secure_dir_for_agent(dir, None, group_access).map_err(|e| e.to_string())?;
    let path = dir.join(UNIX_SOCKET_NAME);
    if UnixStream::connect(&path).is_ok() {
        return Err(format!(
            "{} is served by another live agent",
            path.display()
        ));
    }
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).map_err(|e| format!("bind {}: {e}", path.display()))?;
    let mode = if group_access { 0o660 } else { 0o600 };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    l.set_nonblocking(true)
        .map_err(|e| format!("set_nonblocking: {e}"))?;
    Ok((l, path))
}

impl Server {
    /// The TCP socket `config.socket` (an error if it cannot be bound) and the Unix socket in
    /// the ring folder (`config.unix_socket`; a warning if it cannot be made). `None` if neither.
    pub(crate) fn bind(config: &AgentConfig, shared: Arc<Shared>) -> Result<Option<Server>, Error> {
        let listener = match config.socket {
            Some(addr) => {
                let l = TcpListener::bind(addr).map_err(|source| Error::Io {
                    op: "bind tcp",
                    addr,
                    source,
                })?;
                l.set_nonblocking(true).map_err(|source| Error::Io {
                    op: "set_nonblocking",
                    addr,
                    source,
                })?;
                Some(l)
            }
            None => None,
        };
        let group_access = config.ring_mode == 0o660;
        let unix = if config.unix_socket {
            match bind_unix(&config.ring_dir, group_access) {
                Ok(u) => Some(u),
                Err(e) => {
                    tracing::warn!("no Unix socket: {e}");
                    None
                }
            }
        } else {
            None
        };
        if listener.is_none() && unix.is_none() {
            return Ok(None);
        }
        Ok(Some(Server {
            listener,
            unix,
            ctx: Arc::new(Ctx {
                shared,
                ring_dir: config.ring_dir.clone(),
                sequences: config
                    .sequences
                    .iter()
                    .map(|s| s.as_str().to_owned())
                    .collect(),
                wait_ms: config.socket_wait_ms,
                idle_ms: config.socket_idle_ms,
                connections_max: config.socket_connections_max,
                connections: AtomicUsize::new(0),
                consumers: Mutex::new(HashMap::new()),
                euid: unid_ring::secure::euid(),
                group: group_access.then(unid_ring::secure::egid),
                tcp_any_user: config.socket_tcp_any_user,
            }),
        }))
    }

    /// The TCP address (the real port when the configured one was 0).
    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    fn accept(&self) -> Option<Conn> {
        if let Some(l) = &self.listener {
            match l.accept() {
                Ok((s, _)) => match self.ctx.allowed_tcp(&s) {
                    Ok(()) => return Some(Conn::Tcp(s)),
                    Err(why) => self.deny(Conn::Tcp(s), &why),
                },
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => tracing::debug!("accept tcp: {e}"),
            }
        }
        if let Some((l, _)) = &self.unix {
            match l.accept() {
                Ok((s, _)) => match self.ctx.allowed_unix(&s) {
                    Ok(()) => return Some(Conn::Unix(s)),
                    Err(why) => self.deny(Conn::Unix(s), &why),
                },
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => tracing::debug!("accept unix: {e}"),
            }
        }
        None
    }

    fn deny(&self, conn: Conn, why: &str) {
        Metrics::add(&self.ctx.shared.metrics.socket_denied, 1);
        tracing::debug!("socket connection denied: {why}");
        conn.refuse(&format!("ERR DENIED {why}\n"));
    }

    pub(crate) fn run(self) {
        if let Some(a) = self.local_addr() {
            tracing::info!(addr = %a, "localhost socket listening");
        }
        if let Some((_, p)) = &self.unix {
            tracing::info!(path = %p.display(), "unix socket listening");
        }
        let mut threads = Vec::new();
        while !self.ctx.shared.stop.load(Ordering::Acquire) {
            let Some(conn) = self.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            threads.retain(|t: &std::thread::JoinHandle<()>| !t.is_finished());
            let ctx = Arc::clone(&self.ctx);
            if ctx.connections.fetch_add(1, Ordering::AcqRel) >= ctx.connections_max {
                ctx.connections.fetch_sub(1, Ordering::AcqRel);
                Metrics::add(&ctx.shared.metrics.socket_refused, 1);
                conn.refuse("ERR BUSY too many connections; retry later\n");
                continue;
            }
            let spawned = std::thread::Builder::new()
                .name("unid-agent-conn".to_owned())
                .spawn(move || {
                    serve(&ctx, conn);
                    ctx.connections.fetch_sub(1, Ordering::AcqRel);
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.ctx.connections.fetch_sub(1, Ordering::AcqRel);
                    tracing::warn!("cannot start a connection thread: {e}");
                }
            }
        }
        for t in threads {
            let _ = t.join();
        }
        if let Some((_, p)) = &self.unix {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// One connection: read lines, answer each, until EOF, QUIT, a too-long or too-slow line,
/// idle timeout (no complete request for `idle_ms`) or stop. A line must arrive within
/// `min(idle_ms, LINE_MS_MAX)` of its first byte, so trickling bytes holds no slot.
fn serve(ctx: &Ctx, mut stream: Conn) {
    stream.setup();
    let mut line: Vec<u8> = Vec::with_capacity(SOCKET_LINE_BYTES_MAX);
    let mut buf = [0u8; 512];
    let idle = Duration::from_millis(ctx.idle_ms);
    let line_max = Duration::from_millis(ctx.idle_ms.min(LINE_MS_MAX));
    let mut last_request = Instant::now();
    // When the first byte of the request being read arrived (an HTTP request: of its first line).
    let mut line_started: Option<Instant> = None;
    let mut out = String::new();
    // After `GET /metrics HTTP/1.x`: skip header lines until the blank one.
    let mut http = false;
    loop {
        if ctx.shared.stop.load(Ordering::Acquire) {
            return;
        }
        let timed_out = match line_started {
            Some(t) => t.elapsed() >= line_max,
            None => last_request.elapsed() >= idle,
        };
        if timed_out {
            if line_started.is_some() {
                Metrics::add(&ctx.shared.metrics.socket_errors, 1);
                let _ = stream.write_all(
                    format!(
                        "ERR BAD_REQUEST request not complete within {} ms\n",
                        line_max.as_millis()
                    )
                    .as_bytes(),
                );
            }
            return;
        }
        let n = match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        for &b in &buf[..n] {
            if line_started.is_none() {
                line_started = Some(Instant::now());
            }
            if b != b'\n' {
                if line.len() >= SOCKET_LINE_BYTES_MAX {
                    Metrics::add(&ctx.shared.metrics.socket_errors, 1);
                    let _ = stream.write_all(
                        format!("ERR BAD_REQUEST line longer than {SOCKET_LINE_BYTES_MAX} bytes\n")
                            .as_bytes(),
                    );
                    return;
                }
                line.push(b);
                continue;
            }
            out.clear();
            if http {
                let blank = line.iter().all(|b| b.is_ascii_whitespace());
                line.clear();
                if blank {
                    let body = ctx.shared.metrics.prometheus(&ctx.shared.status());
                    let _ = write!(
                        stream,
                        "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    return;
                }
                continue;
            }
            let keep = match answer(ctx, &line, &mut out) {
                Then::Continue => true,
                Then::Close => false,
                Then::Http => {
                    http = true;
                    true
                }
            };
            line.clear();
            if !http {
                line_started = None;
                last_request = Instant::now();
            }
            if stream.write_all(out.as_bytes()).is_err() || !keep {
                return;
            }
        }
    }
}

/// What to do after a request line.
enum Then {
    Continue,
    Close,
    /// An HTTP `GET /metrics`: read the headers, then answer.
    Http,
}

/// Answers one request line into `out`.
fn answer(ctx: &Ctx, line: &[u8], out: &mut String) -> Then {
    use std::fmt::Write as _;
    let mut err = |code: &str, text: &str| {
        Metrics::add(&ctx.shared.metrics.socket_errors, 1);
        let _ = writeln!(out, "ERR {code} {text}");
        Then::Continue
    };
    let Ok(text) = std::str::from_utf8(line) else {
        return err("BAD_REQUEST", "request is not UTF-8");
    };
    let mut words = text.trim_end_matches('\r').split_ascii_whitespace();
    let Some(command) = words.next() else {
        return err(
            "BAD_REQUEST",
            "empty request; try PING or NEXT <sequence> [<n>]",
        );
    };
    let args: Vec<&str> = words.by_ref().take(3).collect();
    if command.eq_ignore_ascii_case("PING") && args.is_empty() {
        out.push_str("PONG\n");
        return Then::Continue;
    }
    if command.eq_ignore_ascii_case("QUIT") && args.is_empty() {
        return Then::Close;
    }
    if command == "GET" && args.first() == Some(&"/metrics") {
        return Then::Http;
    }
    if command.eq_ignore_ascii_case("PAIR") && args.is_empty() {
        let text = crate::pair_text(&ctx.shared.status());
        let _ = writeln!(out, "OK {}", text.lines().count());
        out.push_str(&text);
        return Then::Continue;
    }
    if command.eq_ignore_ascii_case("METRICS") && args.is_empty() {
        let text = ctx.shared.metrics.prometheus(&ctx.shared.status());
        let _ = writeln!(out, "OK {}", text.lines().count());
        out.push_str(&text);
        return Then::Continue;
    }
    if !command.eq_ignore_ascii_case("NEXT") {
        return err(
            "BAD_REQUEST",
            "unknown command; use PING, NEXT <sequence> [<n>], METRICS, PAIR or QUIT",
        );
    }
    let (sequence, n) = match args.as_slice() {
        [s] => (*s, 1),
        [s, n] => match n.parse::<u64>() {
            Ok(n) if (1..=SOCKET_IDS_MAX).contains(&n) => (*s, n),
            _ => {
                return err(
                    "BAD_REQUEST",
                    &format!("count must be an integer in 1..={SOCKET_IDS_MAX}"),
                );
            }
        },
        _ => return err("BAD_REQUEST", "usage: NEXT <sequence> [<n>]"),
    };
    let Some(index) = ctx.sequences.iter().position(|s| s == sequence) else {
        let shown: String = sequence.chars().take(64).collect();
        return err(
            "UNKNOWN_SEQUENCE",
            &format!(
                "sequence {shown:?} is not served by this agent (serving: {})",
                ctx.sequences.join(", ")
            ),
        );
    };
    match take(ctx, index, n) {
        Ok((width, ids)) => {
            Metrics::add(&ctx.shared.metrics.socket_ids, ids.len() as u64);
            let _ = writeln!(out, "OK {} {width}", ids.len());
            for id in ids {
                let _ = writeln!(out, "{id}");
            }
            Then::Continue
        }
        Err((code, text)) => err(code, &text),
    }
}

/// Takes up to `n` ids (at least 1) of sequence `index`, waiting up to
/// `wait_ms` in all for the ring to exist and hold ids.
fn take(ctx: &Ctx, index: usize, n: u64) -> Result<(u8, Vec<u128>), (&'static str, String)> {
    let name = &ctx.sequences[index];
    let deadline = Instant::now() + Duration::from_millis(ctx.wait_ms);
    let mut ids = Vec::new();
    let mut width = 0;
    while (ids.len() as u64) < n {
        let consumer = match consumer(ctx, name) {
            Ok(c) => c,
            Err(RingError::NotFound { .. }) => {
                // No grant yet: the ring appears with the first block.
                if let Some(e) = final_state(ctx, index) {
                    return Err(e);
                }
                if Instant::now() >= deadline {
                    return Err(not_ready(ctx, index));
                }
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => return Err(("INTERNAL", format!("cannot open the ring: {e}"))),
        };
        width = consumer.width();
        let left = deadline.saturating_duration_since(Instant::now());
        let want = n - ids.len() as u64;
        let got = if ids.is_empty() {
            consumer.take_range_timeout(want, left)
        } else {
            // Some ids already: return them rather than wait long for more.
            consumer.take_range_timeout(want, left.min(Duration::from_millis(10)))
        };
        match got {
            Ok(r) => ids.extend((0..r.count).map(|i| r.first + u128::from(i))),
            Err(RingError::TimedOut) if !ids.is_empty() => break,
            Err(RingError::TimedOut) => {
                return Err(final_state(ctx, index).unwrap_or_else(|| not_ready(ctx, index)));
            }
            Err(RingError::Closed | RingError::AgentDead { .. }) => {
                // Replaced or stopping: reopen once, then give up.
                ctx.consumers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(name);
                if !ids.is_empty() {
                    break;
                }
                if ctx.shared.stop.load(Ordering::Acquire) {
                    return Err(("NOT_READY", "the agent is stopping".to_owned()));
                }
                // A ring left by an earlier run (closed, or its agent dead) is never
                // replaced when this run gets no block (the sequence is exhausted or
                // unknown): say so rather than wait for a ring that will not come.
                if let Some(e) = final_state(ctx, index) {
                    return Err(e);
                }
                if Instant::now() >= deadline {
                    return Err(not_ready(ctx, index));
                }
                // An earlier run's ring, not yet replaced: wait for ours.
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(("INTERNAL", format!("ring: {e}"))),
        }
    }
    assert!(!ids.is_empty() && ids.len() as u64 <= n);
    debug_assert!(ids.windows(2).all(|w| w[0] < w[1]));
    Ok((width, ids))
}

fn consumer(ctx: &Ctx, name: &str) -> Result<Arc<Consumer>, RingError> {
    let mut map = ctx.consumers.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = map.get(name) {
        return Ok(Arc::clone(c));
    }
    let c = Arc::new(Consumer::open(&ctx.ring_dir, name)?);
    map.insert(name.to_owned(), Arc::clone(&c));
    Ok(c)
}

/// An error that waiting will not fix.
fn final_state(ctx: &Ctx, index: usize) -> Option<(&'static str, String)> {
    let st = ctx.shared.status();
    let line = st.sequences.get(index)?;
    match &line.state {
        SequenceState::UnknownSequence => Some((
            "UNKNOWN_SEQUENCE",
            format!(
                "the cluster has no sequence {:?}; create it with `unid sequence create {}`",
                line.name.as_str(),
                line.name
            ),
        )),
        SequenceState::Exhausted => Some((
            "EXHAUSTED",
            format!("sequence {} has no ids left", line.name),
        )),
        _ => None,
    }
}

fn not_ready(ctx: &Ctx, index: usize) -> (&'static str, String) {
    let st = ctx.shared.status();
    let state = st
        .sequences
        .get(index)
        .map(|l| format!("{:?}", l.state))
        .unwrap_or_default();
    (
        "NOT_READY",
        format!(
            "no ids available within {} ms (cluster {:?}, sequence {state}); retry",
            ctx.wait_ms, st.connection
        ),
    )
}
