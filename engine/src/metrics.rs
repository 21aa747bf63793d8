//! Prometheus text metrics of the server, and the small HTTP endpoint that serves them.
//!
//! - [`Exposition`] writes the text format (version 0.0.4): `# HELP`/`# TYPE` once per family,
//!   label values escaped (`\\`, `\"`, `\n`), HELP text escaped (`\\`, `\n`).
//! - [`Histogram`] is a fixed-bucket histogram of atomics (no lock on the hot path).
//! - [`MetricsServer`] is a plain `std::net::TcpListener` thread. It answers only
//!   `GET /metrics` (200, `text/plain; version=0.0.4`); another path is 404, another method
//!   405, anything unparsable or larger than [`REQUEST_BYTES_MAX`] 400. Every connection has a
//!   read and write timeout, at most [`CONNECTIONS_MAX`] are served at once (more are closed
//!   at once), and one answer closes the connection. Nothing a client sends can stop it.
//!
//! The server's own metrics are gathered by [`crate::server`] (counters are atomics, gauges
//! are read under the server's short state lock and formatted after it is released).

use std::fmt::Write as _;
use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Largest HTTP request (request line and headers) read, in bytes.
pub const REQUEST_BYTES_MAX: usize = 8 * 1024;
/// Most connections served at once; more are closed unanswered.
pub const CONNECTIONS_MAX: usize = 8;
/// Read and write timeout of one connection, in milliseconds.
pub const IO_TIMEOUT_MS: u64 = 2_000;
/// How often the accept loop checks whether to stop, in milliseconds.
const ACCEPT_POLL_MS: u64 = 50;

/// The `Content-Type` of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The kind of a metric family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (names end in `_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Buckets, sum and count.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Escapes a label value: backslash, double quote and newline.
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes HELP text: backslash and newline.
pub fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Builds a text exposition, one family at a time.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines. `name` must be a valid metric name.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        debug_assert!(valid_name(name), "{name}");
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
        self
    }

    /// One sample of `name` (a family started before, or its `_bucket`/`_sum`/`_count`).
    /// `value` is anything that prints as a Prometheus number (integers, floats).
    pub fn sample(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        value: impl std::fmt::Display,
    ) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                debug_assert!(valid_name(k), "{k}");
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }

    /// A family with one unlabelled sample.
    pub fn single(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        value: impl std::fmt::Display,
    ) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// A histogram family from a [`Histogram`]: cumulative buckets (`le` in seconds), sum and
    /// count.
    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) -> &mut Self {
        self.family(name, Kind::Histogram, help);
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (i, &bound_us) in h.bounds_us().iter().enumerate() {
            cumulative += h.bucket(i);
            let le = format!("{}", bound_us as f64 / 1e6);
            self.sample(&bucket, &[("le", &le)], cumulative);
        }
        cumulative += h.bucket(h.bounds_us().len());
        self.sample(&bucket, &[("le", "+Inf")], cumulative);
        let sum_s = h.sum_us() as f64 / 1e6;
        self.sample(&format!("{name}_sum"), &[], sum_s);
        self.sample(&format!("{name}_count"), &[], cumulative)
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

pub use unid_machine::server::{
    COMMIT_BOUNDS_US, Counters as ServerCounters, DropKind, Gauges as ServerGauges, Histogram,
    METRICS_SEQUENCES_MAX, SequenceGauges,
};

// ---------------------------------------------------------------- server metrics ---

/// The server's counters of its sockets (the machine's are in [`ServerCounters`]). Atomics.
#[derive(Debug, Default)]
pub(crate) struct IoCounters {
    /// Datagrams queued for sending (answers and notices).
    pub(crate) datagrams_out: AtomicU64,
    /// Undeliverable datagrams by [`crate::udp::PeerErrorKind`] (refused, host unreachable,
    /// net unreachable, message too long, other).
    pub(crate) send_errors: [AtomicU64; 5],
}

impl IoCounters {
    pub(crate) fn send_failed(&self, kind: crate::udp::PeerErrorKind) {
        use crate::udp::PeerErrorKind as K;
        let i = match kind {
            K::Refused => 0,
            K::HostUnreachable => 1,
            K::NetUnreachable => 2,
            K::MessageTooLong => 3,
            K::Other(_) => 4,
        };
        self.send_errors[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// The server's metrics in the text format.
pub(crate) fn render_server(
    stats: &crate::server::ServerStatsSnapshot,
    c: &ServerCounters,
    io: &IoCounters,
    g: &ServerGauges,
    plane: crate::plane::DataPlane,
) -> String {
    let sequences_omitted = g.sequences_omitted;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut e = Exposition::new();
    let name = "unid_server_data_plane";
    e.family(
        name,
        Kind::Gauge,
        "1 for the data plane the shards run on (io-uring: glommio; threads: ppoll fallback)",
    )
    .sample(name, &[("plane", plane.name())], 1);
    e.single(
        "unid_server_datagrams_in_total",
        Kind::Counter,
        "datagrams handed to the server logic",
        stats.datagrams_in,
    );
    e.single(
        "unid_server_datagrams_out_total",
        Kind::Counter,
        "datagrams queued for sending (answers, notices)",
        load(&io.datagrams_out),
    );
    let name = "unid_server_datagrams_dropped_total";
    e.family(
        name,
        Kind::Counter,
        "datagrams dropped unanswered, by reason",
    );
    for (kind, reason) in DropKind::ALL {
        e.sample(
            name,
            &[("reason", reason)],
            load(&c.decode_dropped[kind as usize]),
        );
    }
    e.sample(name, &[("reason", "rate_limited")], stats.dropped_rate);
    e.sample(
        name,
        &[("reason", "amplification")],
        stats.dropped_amplification,
    );
    e.sample(name, &[("reason", "unexpected")], stats.dropped_unexpected);
    e.sample(name, &[("reason", "replay")], stats.dropped_replay);
    e.sample(name, &[("reason", "other_cluster")], stats.dropped_cluster);
    e.sample(name, &[("reason", "version")], stats.dropped_version);
    let name = "unid_server_registrations_refused_total";
    e.family(
        name,
        Kind::Counter,
        "new agent registrations refused, by reason (rate: over the per-IP or total rate; full: node table full; version: no protocol version in common)",
    );
    e.sample(name, &[("reason", "rate")], stats.refused_registration_rate);
    e.sample(name, &[("reason", "full")], stats.refused_registration_full);
    e.sample(name, &[("reason", "version")], stats.refused_version);
    e.single(
        "unid_server_agents_removed_total",
        Kind::Counter,
        "agents whose lease ended removed from the replicated node table",
        stats.agents_removed,
    );
    e.single(
        "unid_server_admin_refused_total",
        Kind::Counter,
        "changes (sequence create, server add or remove) refused: neither loopback nor the secret",
        stats.refused_admin,
    );
    e.single(
        "unid_server_reply_cache_hits_total",
        Kind::Counter,
        "retransmitted requests answered from the reply cache",
        stats.replies_cached,
    );
    e.single(
        "unid_server_redirects_total",
        Kind::Counter,
        "NotLeader answers (redirects to the leader)",
        stats.not_leader,
    );
    let name = "unid_server_errors_sent_total";
    e.family(name, Kind::Counter, "Error answers, by code");
    for code in 1..c.errors_sent.len() {
        let Some(ec) = u8::try_from(code)
            .ok()
            .and_then(unid_proto::ErrorCode::from_u8)
        else {
            continue;
        };
        e.sample(
            name,
            &[("code", &format!("{ec:?}"))],
            load(&c.errors_sent[code]),
        );
    }
    let name = "unid_server_send_errors_total";
    e.family(
        name,
        Kind::Counter,
        "datagrams that could not be delivered (sendmmsg or ICMP), by kind",
    );
    for (i, kind) in [
        "refused",
        "host_unreachable",
        "net_unreachable",
        "message_too_long",
        "other",
    ]
    .into_iter()
    .enumerate()
    {
        e.sample(name, &[("kind", kind)], load(&io.send_errors[i]));
    }
    e.single(
        "unid_server_grants_total",
        Kind::Counter,
        "blocks granted by this server",
        stats.grants,
    );
    e.single(
        "unid_server_registrations_total",
        Kind::Counter,
        "agents registered by this server",
        stats.registrations,
    );
    e.single(
        "unid_server_leader_changes_total",
        Kind::Counter,
        "times this server saw the leader change",
        load(&c.leader_changes),
    );
    e.single(
        "unid_server_leaderships_total",
        Kind::Counter,
        "times this server became leader (won an election or was handed leadership)",
        load(&c.leaderships),
    );
    e.single(
        "unid_server_quorum_lost_total",
        Kind::Counter,
        "times this leader went 300 ms without a quorum confirming it (agents sent elsewhere)",
        load(&c.quorum_lost),
    );
    e.single("unid_server_term", Kind::Gauge, "current Raft term", g.term);
    e.single(
        "unid_server_is_leader",
        Kind::Gauge,
        "1 if this server is the leader",
        u8::from(g.is_leader),
    );
    e.single(
        "unid_server_granting",
        Kind::Gauge,
        "1 if this server grants (leader with a ready allocator)",
        u8::from(g.granting),
    );
    e.single(
        "unid_server_agents",
        Kind::Gauge,
        "agents registered with this server (leases not expired)",
        g.agents,
    );
    e.single(
        "unid_server_ceiling_raises_total",
        Kind::Counter,
        "ceiling raises committed by this server",
        stats.raises_committed,
    );
    e.single(
        "unid_server_ceiling_raises_failed_total",
        Kind::Counter,
        "ceiling raises that failed",
        stats.raises_failed,
    );
    e.single(
        "unid_server_rewarms_total",
        Kind::Counter,
        "allocators dropped because a raise revealed a committed ceiling above their own \
         proposals (a restored leader, or a deposed one), ceilings then read again",
        stats.rewarms,
    );
    e.histogram(
        "unid_server_ceiling_raise_seconds",
        "time to commit a ceiling raise through Raft",
        &c.raise_latency,
    );
    type Field = fn(&SequenceGauges) -> String;
    let per_sequence: [(&str, Kind, &str, Field); 4] = [
        (
            "unid_server_sequence_grants_total",
            Kind::Counter,
            "blocks granted by this server, by sequence",
            |s| s.grants.to_string(),
        ),
        (
            "unid_server_sequence_ids_granted_total",
            Kind::Counter,
            "ids granted by this server, by sequence",
            |s| s.ids.to_string(),
        ),
        (
            "unid_server_sequence_ceiling",
            Kind::Gauge,
            "committed ceiling (ids below it may be granted), by sequence",
            |s| s.ceiling.to_string(),
        ),
        (
            "unid_server_sequence_ids_left",
            Kind::Gauge,
            "ids left before the sequence is exhausted",
            |s| s.ids_left.to_string(),
        ),
    ];
    for (name, kind, help, field) in per_sequence {
        e.family(name, kind, help);
        for s in &g.sequences {
            e.sample(name, &[("sequence", &s.name)], field(s));
        }
    }
    e.single(
        "unid_server_sequences_omitted",
        Kind::Gauge,
        "sequences left out of the per-sequence metrics (more than the limit)",
        sequences_omitted,
    );
    e.finish()
}

// ------------------------------------------------------------------------ HTTP ---

/// What to answer to one request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// `GET /metrics`.
    Metrics,
    /// An HTTP status with a short plain-text reason.
    Status(u16, &'static str),
}

/// Decides what to answer from a request's bytes (its request line decides).
pub(crate) fn route(request: &[u8]) -> Route {
    let line_end = request
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(request.len());
    let Ok(line) = std::str::from_utf8(&request[..line_end]) else {
        return Route::Status(400, "Bad Request");
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::Status(400, "Bad Request");
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return Route::Status(400, "Bad Request");
    }
    let path = target.split('?').next().unwrap_or(target);
    if method != "GET" {
        return Route::Status(405, "Method Not Allowed");
    }
    if path != "/metrics" {
        return Route::Status(404, "Not Found");
    }
    Route::Metrics
}

/// Whether the headers ended (`\r\n\r\n` or `\n\n`).
fn headers_end(buf: &[u8]) -> bool {
    buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
}

/// Renders the metrics text; called once per `GET /metrics`, on the connection's thread.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// A running metrics endpoint. Dropping it stops the accept loop (connections being served
/// finish by themselves within their timeouts).
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl MetricsServer {
    /// Binds `addr` (port 0: any) and serves `render`'s text on `GET /metrics`.
    pub fn start(addr: SocketAddr, render: Render) -> crate::Result<MetricsServer> {
        Self::start_on(Self::bind(addr)?, render)
    }

    /// Binds `addr` (port 0: any) for [`Self::start_on`]: lets a server find out that the
    /// address is taken before it starts anything else.
    pub fn bind(addr: SocketAddr) -> crate::Result<TcpListener> {
        TcpListener::bind(addr).map_err(|source| crate::Error::Io {
            op: "bind metrics",
            addr,
            source,
        })
    }

    /// Serves `render`'s text on `GET /metrics` on a listener from [`Self::bind`].
    pub fn start_on(listener: TcpListener, render: Render) -> crate::Result<MetricsServer> {
        let addr = listener.local_addr().map_err(|source| crate::Error::Io {
            op: "local_addr",
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        let io = |op, source| crate::Error::Io { op, addr, source };
        listener
            .set_nonblocking(true)
            .map_err(|e| io("set_nonblocking", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("unid-metrics".into())
            .spawn(move || accept_loop(&listener, &thread_stop, &render))
            .map_err(|e| io("spawn metrics thread", e))?;
        Ok(MetricsServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool, render: &Render) {
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => {
                if active.load(Ordering::Acquire) >= CONNECTIONS_MAX {
                    continue; // Dropped: closed unanswered.
                }
                active.fetch_add(1, Ordering::AcqRel);
                let (active2, render) = (active.clone(), render.clone());
                let spawned = std::thread::Builder::new()
                    .name("unid-metrics-conn".into())
                    .spawn(move || {
                        // Frees the slot even if rendering panics.
                        let _slot = Slot(active2);
                        serve(stream, &render);
                    });
                if spawned.is_err() {
                    active.fetch_sub(1, Ordering::AcqRel);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(ACCEPT_POLL_MS));
            }
            Err(e) => {
                // EMFILE and the like: wait rather than spin.
                tracing::debug!("metrics accept: {e}");
                std::thread::sleep(Duration::from_millis(ACCEPT_POLL_MS));
            }
        }
    }
}

/// One of the [`CONNECTIONS_MAX`] connection slots, given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Reads one request (bounded in size and time) and answers it.
fn serve(mut stream: TcpStream, render: &Render) {
    let timeout = Duration::from_millis(IO_TIMEOUT_MS);
    if stream.set_nonblocking(false).is_err()
        || stream.set_read_timeout(Some(timeout)).is_err()
        || stream.set_write_timeout(Some(timeout)).is_err()
    {
        return;
    }
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let mut too_large = false;
    while !headers_end(&buf) {
        if buf.len() >= REQUEST_BYTES_MAX {
            too_large = true;
            break;
        }
        if Instant::now() >= deadline {
            return; // Too slow: closed unanswered.
        }
        let want = chunk.len().min(REQUEST_BYTES_MAX - buf.len());
        match stream.read(&mut chunk[..want]) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return, // Timed out or reset.
        }
    }
    let route = if too_large {
        Route::Status(400, "Bad Request")
    } else if !headers_end(&buf) {
        // The client stopped before the end of its headers.
        Route::Status(400, "Bad Request")
    } else {
        route(&buf)
    };
    let (status, reason, content_type, body) = match route {
        Route::Metrics => (200, "OK", CONTENT_TYPE, render()),
        Route::Status(code, reason) => (
            code,
            reason,
            "text/plain; charset=utf-8",
            format!("{reason}: only GET /metrics is served\n"),
        ),
    };
    let allow = if status == 405 { "Allow: GET\r\n" } else { "" };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body.as_bytes());
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_help_are_escaped_and_families_typed() {
        let mut e = Exposition::new();
        e.family("unid_server_x_total", Kind::Counter, "a \\ b\nc");
        e.sample(
            "unid_server_x_total",
            &[("sequence", "we\"ird\\na\nme"), ("code", "ok")],
            3,
        );
        e.single("unid_server_term", Kind::Gauge, "term", 7);
        let h = Histogram::new(&[1_000, 10_000]);
        h.observe_us(500);
        h.observe_us(1_000);
        h.observe_us(5_000);
        h.observe_us(20_000);
        e.histogram("unid_server_lat_seconds", "latency", &h);
        let text = e.finish();
        let want = "# HELP unid_server_x_total a \\\\ b\\nc\n\
# TYPE unid_server_x_total counter\n\
unid_server_x_total{sequence=\"we\\\"ird\\\\na\\nme\",code=\"ok\"} 3\n\
# HELP unid_server_term term\n\
# TYPE unid_server_term gauge\n\
unid_server_term 7\n\
# HELP unid_server_lat_seconds latency\n\
# TYPE unid_server_lat_seconds histogram\n\
unid_server_lat_seconds_bucket{le=\"0.001\"} 2\n\
unid_server_lat_seconds_bucket{le=\"0.01\"} 3\n\
unid_server_lat_seconds_bucket{le=\"+Inf\"} 4\n\
unid_server_lat_seconds_sum 0.0265\n\
unid_server_lat_seconds_count 4\n";
        assert_eq!(text, want);
        assert_eq!(h.count(), 4);
    }

    #[test]
    fn decode_failures_are_grouped_and_rendered_by_reason() {
        use unid_proto::DecodeError as D;
        let c = ServerCounters::default();
        for e in [
            D::BadCrc {
                computed: 1,
                found: 2,
            },
            D::MissingTag,
            D::BadTag,
            D::UnexpectedTag,
            D::TooShort { len: 3 },
            D::LengthMismatch {
                expected: 40,
                actual: 30,
            },
            D::LengthMismatch {
                expected: 30,
                actual: 40,
            },
            D::BadMagic { found: [0, 0] },
        ] {
            c.decode_failed(&e);
        }
        c.error_sent(unid_proto::ErrorCode::Exhausted);
        let io = IoCounters::default();
        io.send_failed(crate::udp::PeerErrorKind::Refused);
        let g = ServerGauges {
            sequences: vec![SequenceGauges {
                name: "a\"b".into(),
                grants: 2,
                ids: u128::from(u64::MAX) + 1,
                ceiling: 10,
                ids_left: 5,
            }],
            ..ServerGauges::default()
        };
        let stats = crate::server::ServerStatsSnapshot {
            dropped_rate: 4,
            ..Default::default()
        };
        let text = render_server(&stats, &c, &io, &g, crate::plane::DataPlane::Threads);
        for line in [
            "unid_server_datagrams_dropped_total{reason=\"bad_crc\"} 1\n",
            "unid_server_datagrams_dropped_total{reason=\"auth\"} 3\n",
            "unid_server_datagrams_dropped_total{reason=\"truncated\"} 2\n",
            "unid_server_datagrams_dropped_total{reason=\"malformed\"} 2\n",
            "unid_server_datagrams_dropped_total{reason=\"rate_limited\"} 4\n",
            "unid_server_errors_sent_total{code=\"Exhausted\"} 1\n",
            "unid_server_send_errors_total{kind=\"refused\"} 1\n",
            "unid_server_data_plane{plane=\"threads\"} 1\n",
            "unid_server_sequence_ids_granted_total{sequence=\"a\\\"b\"} 18446744073709551616\n",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        // Every sample belongs to a family declared once, with HELP and TYPE.
        let mut declared = std::collections::HashSet::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(declared.insert(name.to_owned()), "{name} declared twice");
                assert!(text.contains(&format!("# HELP {name} ")), "{name}");
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| declared.contains(*f)))
                    .unwrap_or(name);
                assert!(declared.contains(family), "{name} has no TYPE");
            }
        }
    }

    #[test]
    fn only_get_metrics_is_routed() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n").code(), 404);
        assert_eq!(route(b"GET /metricsx HTTP/1.1\r\n\r\n").code(), 404);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n").code(), 405);
        assert_eq!(route(b"GET /metrics\r\n\r\n").code(), 400);
        assert_eq!(route(b"GET /metrics SSH/2\r\n\r\n").code(), 400);
        assert_eq!(route(b"GET metrics HTTP/1.1\r\n\r\n").code(), 400);
        assert_eq!(route(b"\xff\xfe /metrics HTTP/1.1\r\n\r\n").code(), 400);
        assert_eq!(route(b"").code(), 400);
    }

    impl Route {
        fn code(&self) -> u16 {
            match self {
                Route::Metrics => 200,
                Route::Status(c, _) => *c,
            }
        }
    }

    fn ask(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(request);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    #[test]
    fn the_endpoint_answers_get_metrics_and_refuses_the_rest() {
        let render: Render = Arc::new(|| "unid_server_up 1\n".to_owned());
        let server = MetricsServer::start("127.0.0.1:0".parse().unwrap(), render).unwrap();
        let addr = server.local_addr();
        let ok = ask(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains(CONTENT_TYPE), "{ok}");
        assert!(ok.ends_with("\r\n\r\nunid_server_up 1\n"), "{ok}");
        for (req, status) in [
            (&b"GET /other HTTP/1.1\r\n\r\n"[..], "404"),
            (b"DELETE /metrics HTTP/1.1\r\n\r\n", "405"),
            (b"hello\n\n", "400"),
            (b"GET /metrics HTTP/1.1\r\nHost: x\r\n", "400"), // ended before the blank line
            (b"\0\0\0\0", "400"),
        ] {
            let got = ask(addr, req);
            assert!(
                got.starts_with(&format!("HTTP/1.1 {status} ")),
                "{req:?}: {got}"
            );
        }
        // A request larger than the limit is refused without being read to its end.
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.resize(REQUEST_BYTES_MAX * 4, b'a');
        let got = ask(addr, &big);
        assert!(got.is_empty() || got.starts_with("HTTP/1.1 400 "), "{got}");
        // Idle connections beyond the limit are closed; the endpoint still answers after.
        let idle: Vec<TcpStream> = (0..CONNECTIONS_MAX + 2)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(IO_TIMEOUT_MS + 500));
        drop(idle);
        let ok = ask(addr, b"GET /metrics HTTP/1.0\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        drop(server);
        assert!(TcpStream::connect(addr).is_err(), "stopped on drop");
    }
}
