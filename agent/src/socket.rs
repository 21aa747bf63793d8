//! The localhost socket: a line protocol any language can speak (see
//! `agent/README.md`). Ids come from the rings, taken as an ordinary
//! consumer, so the same id never leaves both ways.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
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

struct Ctx {
    shared: Arc<Shared>,
    ring_dir: PathBuf,
    sequences: Vec<String>,
    wait_ms: u64,
    idle_ms: u64,
    connections_max: usize,
    connections: AtomicUsize,
    consumers: Mutex<HashMap<String, Arc<Consumer>>>,
}

pub(crate) struct Server {
    listener: TcpListener,
    ctx: Arc<Ctx>,
}

impl Server {
    pub(crate) fn bind(
        addr: SocketAddr,
        config: &AgentConfig,
        shared: Arc<Shared>,
    ) -> Result<Server, Error> {
        let listener = TcpListener::bind(addr).map_err(|source| Error::Io {
            op: "bind tcp",
            addr,
            source,
        })?;
        listener.set_nonblocking(true).map_err(|source| Error::Io {
            op: "set_nonblocking",
            addr,
            source,
        })?;
        Ok(Server {
            listener,
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
            }),
        })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub(crate) fn run(self) {
        tracing::info!(addr = %self.local_addr(), "localhost socket listening");
        let mut threads = Vec::new();
        while !self.ctx.shared.stop.load(Ordering::Acquire) {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    threads.retain(|t: &std::thread::JoinHandle<()>| !t.is_finished());
                    let ctx = Arc::clone(&self.ctx);
                    if ctx.connections.fetch_add(1, Ordering::AcqRel) >= ctx.connections_max {
                        ctx.connections.fetch_sub(1, Ordering::AcqRel);
                        Metrics::add(&ctx.shared.metrics.socket_refused, 1);
                        let mut stream = stream;
                        let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
                        let _ = stream.write_all(b"ERR BUSY too many connections; retry later\n");
                        continue;
                    }
                    let spawned = std::thread::Builder::new()
                        .name("unid-agent-conn".to_owned())
                        .spawn(move || {
                            serve(&ctx, stream);
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
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    tracing::debug!("accept: {e}");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        for t in threads {
            let _ = t.join();
        }
    }
}

/// One connection: read lines, answer each, until EOF, QUIT, idle timeout,
/// a too-long line or stop.
fn serve(ctx: &Ctx, mut stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(POLL_MS)));
    let _ = stream.set_write_timeout(Some(Duration::from_millis(WRITE_TIMEOUT_MS)));
    let _ = stream.set_nodelay(true);
    let mut line: Vec<u8> = Vec::with_capacity(SOCKET_LINE_BYTES_MAX);
    let mut buf = [0u8; 512];
    let mut last_active = Instant::now();
    let mut out = String::new();
    // After `GET /metrics HTTP/1.x`: skip header lines until the blank one.
    let mut http = false;
    loop {
        if ctx.shared.stop.load(Ordering::Acquire) {
            return;
        }
        let n = match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if last_active.elapsed() >= Duration::from_millis(ctx.idle_ms) {
                    return;
                }
                continue;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        last_active = Instant::now();
        for &b in &buf[..n] {
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
