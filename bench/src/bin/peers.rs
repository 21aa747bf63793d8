//! The peers driver: measures unid and what users would pick instead with one client machinery
//! (`unid_bench::closed_loop`: N worker threads in each of P processes, a closed loop, an
//! untimed phase for ids/s and a timed phase with an HDR histogram for p50/p99, the same code
//! for every system), and writes the comparison report.
//!
//! ```text
//! peers measure --label L --system SYSTEM [--threads N] [--procs P] [--seconds S] [...]
//!     prints one TSV row: label system clients ids/s ops/s p50_ns p99_ns p999_ns ids/s_timed
//! peers report --tsv ROWS --meta META.md --out results/peers.md --svg-dir results
//! ```
//!
//! Systems: `noop` (the timer's own cost), `fetch_add`, `uuid_v7`, `snowflake`, `pg_nextval`
//! (`--pg URL --pg-seq NAME`), `redis_incr` (`--redis URL [--by N] [--pipeline D]`),
//! `unid_next` and `unid_take_range` (`--ring-dir DIR --sequence NAME [--n MAX]`),
//! `unid_socket` (`--socket ADDR --sequence NAME [--n N]`). `scripts/peers.sh` runs them all.
//! Built only with `--features peers` (PostgreSQL and Redis clients).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use unid_bench::closed_loop::{self, Op, Outcome, Phases};
use unid_bench::ops::{
    FetchAdd, Noop, Snowflake, UnidNext, UnidSocket, UnidTakeRange, UuidV7, open_ring,
};
use unid_ring::monotonic_ms;

#[derive(Parser, Debug)]
#[command(name = "peers")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Measure one system; print one TSV row.
    Measure(Measure),
    /// Write the report (markdown and SVG) from the rows of a run.
    Report(Report),
}

#[derive(clap::Args, Debug, Clone)]
struct Measure {
    /// Row label in the report.
    #[arg(long)]
    label: String,
    /// What to measure (see the module docs).
    #[arg(long)]
    system: String,
    /// Worker threads per process (each its own connection or handle).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Processes (this binary re-executed), all started on one CLOCK_MONOTONIC instant.
    #[arg(long, default_value_t = 1)]
    procs: usize,
    /// Untimed plus timed phase (half each), after a warm-up.
    #[arg(long, default_value_t = 4.0)]
    seconds: f64,
    /// Warm-up, discarded.
    #[arg(long, default_value_t = 500)]
    warmup_ms: u64,
    /// PostgreSQL connection string.
    #[arg(
        long,
        default_value = "host=127.0.0.1 port=55432 user=postgres dbname=postgres"
    )]
    pg: String,
    /// PostgreSQL sequence for `pg_nextval`.
    #[arg(long, default_value = "peers_c1")]
    pg_seq: String,
    /// Redis URL.
    #[arg(long, default_value = "redis://127.0.0.1:56379/")]
    redis: String,
    /// Redis increment (1: `INCR`, else `INCRBY n`).
    #[arg(long, default_value_t = 1)]
    by: u64,
    /// Redis commands per round trip (1: no pipelining).
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    /// unid ring folder.
    #[arg(long, default_value = "/dev/shm/unid")]
    ring_dir: PathBuf,
    /// unid agent socket.
    #[arg(long, default_value = "127.0.0.1:7411")]
    socket: SocketAddr,
    /// unid sequence.
    #[arg(long, default_value = "default")]
    sequence: String,
    /// Ids per unid request (`take_range` max, `NEXT seq n`).
    #[arg(long, default_value_t = 1)]
    n: u64,
    /// Internal: run as a child process starting at this monotonic ms; print the outcome.
    #[arg(long, hide = true)]
    child_start_ms: Option<u64>,
    /// Internal: index of this child among the processes.
    #[arg(long, hide = true, default_value_t = 0)]
    child_index: usize,
}

#[derive(clap::Args, Debug)]
struct Report {
    /// The TSV rows of the run (several rounds: rows with the same label).
    #[arg(long)]
    tsv: PathBuf,
    /// Markdown with the command and machine, put at the top.
    #[arg(long)]
    meta: PathBuf,
    /// The report.
    #[arg(long)]
    out: PathBuf,
    /// Folder for `peers-throughput.svg` and `peers-latency.svg`.
    #[arg(long)]
    svg_dir: PathBuf,
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL and Redis operations.

struct PgNextval {
    client: postgres::Client,
    stmt: postgres::Statement,
}

impl Op for PgNextval {
    type Error = postgres::Error;
    fn op(&mut self) -> Result<u64, postgres::Error> {
        let row = self.client.query_one(&self.stmt, &[])?;
        black_box(row.get::<_, i64>(0));
        Ok(1)
    }
}

enum RedisCall {
    One(redis::Cmd),
    Pipe(redis::Pipeline),
}

struct RedisIncr {
    con: redis::Connection,
    call: RedisCall,
    ids_per_op: u64,
}

impl Op for RedisIncr {
    type Error = redis::RedisError;
    fn op(&mut self) -> Result<u64, redis::RedisError> {
        match &self.call {
            RedisCall::One(c) => {
                black_box(c.query::<i64>(&mut self.con)?);
            }
            RedisCall::Pipe(p) => {
                black_box(p.query::<Vec<i64>>(&mut self.con)?);
            }
        }
        Ok(self.ids_per_op)
    }
}

// ---------------------------------------------------------------------------------------------
// measure

fn run_ops<O: Op>(ops: Vec<O>, phases: Phases) -> anyhow::Result<Outcome> {
    Ok(closed_loop::run(ops, phases, || {})?)
}

/// One process's share of a measurement.
fn run_here(m: &Measure, phases: Phases) -> anyhow::Result<Outcome> {
    let t = m.threads;
    let base = m.child_index * t;
    match m.system.as_str() {
        "noop" => run_ops((0..t).map(|_| Noop).collect(), phases),
        "fetch_add" => {
            let c = Arc::new(AtomicU64::new(0));
            run_ops((0..t).map(|_| FetchAdd(c.clone())).collect(), phases)
        }
        "uuid_v7" => run_ops((0..t).map(|_| UuidV7).collect(), phases),
        "snowflake" => run_ops((0..t).map(|i| Snowflake::new(base + i)).collect(), phases),
        "pg_nextval" => {
            let mut ops = Vec::with_capacity(t);
            for _ in 0..t {
                let mut client = postgres::Client::connect(&m.pg, postgres::NoTls)
                    .with_context(|| format!("connect to PostgreSQL ({})", m.pg))?;
                let stmt = client
                    .prepare(&format!("SELECT nextval('{}')", m.pg_seq))
                    .context("prepare nextval")?;
                ops.push(PgNextval { client, stmt });
            }
            run_ops(ops, phases)
        }
        "redis_incr" => {
            let client = redis::Client::open(m.redis.as_str()).context("Redis URL")?;
            let mut ops = Vec::with_capacity(t);
            for _ in 0..t {
                let con = client
                    .get_connection()
                    .with_context(|| format!("connect to Redis ({})", m.redis))?;
                let one = || {
                    if m.by == 1 {
                        let mut c = redis::cmd("INCR");
                        c.arg("peers");
                        c
                    } else {
                        let mut c = redis::cmd("INCRBY");
                        c.arg("peers").arg(m.by);
                        c
                    }
                };
                let call = if m.pipeline <= 1 {
                    RedisCall::One(one())
                } else {
                    let mut p = redis::pipe();
                    for _ in 0..m.pipeline {
                        p.add_command(one());
                    }
                    RedisCall::Pipe(p)
                };
                ops.push(RedisIncr {
                    con,
                    call,
                    ids_per_op: m.by * m.pipeline.max(1) as u64,
                });
            }
            run_ops(ops, phases)
        }
        "unid_next" | "unid_take_range" => {
            let mut handles = Vec::with_capacity(t);
            for _ in 0..t {
                let u = open_ring(&m.ring_dir, &m.sequence).with_context(|| {
                    format!("open ring {:?} in {}", m.sequence, m.ring_dir.display())
                })?;
                if !u.via_ring() {
                    bail!("the unid client did not map the ring");
                }
                handles.push(u);
            }
            if m.system == "unid_next" {
                run_ops(handles.into_iter().map(UnidNext).collect(), phases)
            } else {
                run_ops(
                    handles.into_iter().map(|u| UnidTakeRange(u, m.n)).collect(),
                    phases,
                )
            }
        }
        "unid_socket" => {
            let mut ops = Vec::with_capacity(t);
            for _ in 0..t {
                ops.push(UnidSocket::connect(m.socket, &m.sequence, m.n)?);
            }
            run_ops(ops, phases)
        }
        other => bail!("unknown system {other:?}"),
    }
}

fn measure(m: &Measure) -> anyhow::Result<()> {
    if !(m.seconds > 0.0 && m.seconds <= 600.0) {
        bail!("--seconds must be in (0, 600]");
    }
    if m.procs == 0 || m.procs > 64 {
        bail!("--procs must be in 1..=64");
    }
    let half_ms = (m.seconds * 500.0) as u64;
    let phases = |start_ms| Phases {
        start_ms,
        warmup_ms: m.warmup_ms,
        untimed_ms: half_ms,
        timed_ms: half_ms,
    };
    if let Some(start_ms) = m.child_start_ms {
        let o = run_here(m, phases(start_ms))?;
        print!("{}", closed_loop::to_text(&o));
        return Ok(());
    }
    let outcome = if m.procs == 1 {
        run_here(m, phases(monotonic_ms() + 200))?
    } else {
        // Children connect first, then all start on one instant.
        let start_ms = monotonic_ms() + 1500;
        let exe = std::env::current_exe().context("own executable")?;
        let args: Vec<String> = std::env::args().skip(1).collect();
        let children = (0..m.procs)
            .map(|i| {
                Command::new(&exe)
                    .args(&args)
                    .arg("--child-start-ms")
                    .arg(start_ms.to_string())
                    .arg("--child-index")
                    .arg(i.to_string())
                    .stdout(Stdio::piped())
                    .spawn()
                    .context("spawn a child process")
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut all = Outcome::empty();
        for (i, ch) in children.into_iter().enumerate() {
            let out = ch.wait_with_output().context("wait for a child")?;
            if !out.status.success() {
                bail!("child {i} failed ({})", out.status);
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let o = closed_loop::parse(&text).context("child output")?;
            // Rates of processes that ran at once add up: merge counts over the longest phase.
            all.merge(&o);
        }
        all
    };
    let h = &outcome.latency_ns;
    println!(
        "{}\t{}\t{}\t{:.0}\t{:.0}\t{}\t{}\t{}\t{:.0}",
        m.label,
        m.system,
        if m.procs > 1 {
            format!("{} procs × {} threads", m.procs, m.threads)
        } else {
            format!(
                "{} thread{}",
                m.threads,
                if m.threads > 1 { "s" } else { "" }
            )
        },
        outcome.ids_per_s(),
        outcome.ops_per_s(),
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        outcome.ids_per_s_timed()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// report

#[derive(Clone, Debug)]
struct Row {
    label: String,
    system: String,
    clients: String,
    ids_per_s: f64,
    ops_per_s: f64,
    p50_ns: f64,
    p99_ns: f64,
}

/// One label's rounds: the median round (by ids/s) and the range.
struct Summary {
    median: Row,
    min: f64,
    max: f64,
    rounds: usize,
}

fn parse_rows(text: &str) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 7 {
            bail!(
                "row {}: {} fields, expected at least 7: {line:?}",
                i + 1,
                f.len()
            );
        }
        let num = |j: usize| -> anyhow::Result<f64> {
            f[j].trim()
                .parse()
                .with_context(|| format!("row {} field {}: {:?}", i + 1, j + 1, f[j]))
        };
        rows.push(Row {
            label: f[0].to_owned(),
            system: f[1].to_owned(),
            clients: f[2].to_owned(),
            ids_per_s: num(3)?,
            ops_per_s: num(4)?,
            p50_ns: num(5)?,
            p99_ns: num(6)?,
        });
    }
    Ok(rows)
}

fn summarize(rows: &[Row]) -> Vec<Summary> {
    // One entry per (label, clients), in the order of first appearance.
    let mut order: Vec<(String, String)> = Vec::new();
    let mut by: BTreeMap<(String, String), Vec<Row>> = BTreeMap::new();
    for r in rows {
        let key = (r.label.clone(), r.clients.clone());
        if !by.contains_key(&key) {
            order.push(key.clone());
        }
        by.entry(key).or_default().push(r.clone());
    }
    order
        .into_iter()
        .map(|l| {
            let mut v = by.remove(&l).expect("listed");
            v.sort_by(|a, b| a.ids_per_s.total_cmp(&b.ids_per_s));
            Summary {
                min: v[0].ids_per_s,
                max: v[v.len() - 1].ids_per_s,
                rounds: v.len(),
                median: v[v.len() / 2].clone(),
            }
        })
        .collect()
}

fn si(x: f64) -> String {
    let (v, u) = if x >= 1e9 {
        (x / 1e9, "G")
    } else if x >= 1e6 {
        (x / 1e6, "M")
    } else if x >= 1e3 {
        (x / 1e3, "k")
    } else {
        (x, "")
    };
    if v >= 100.0 {
        format!("{v:.0}{u}")
    } else if v >= 10.0 {
        format!("{v:.1}{u}")
    } else {
        format!("{v:.2}{u}")
    }
}

fn time_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

fn ratio(x: f64) -> String {
    if x > 0.0 && x < 0.1 {
        // Small ratios read better inverted: "1/690" rather than "0.00x".
        return format!("1/{:.0}", 1.0 / x);
    }
    if x >= 100.0 {
        format!("{x:.0}x")
    } else if x >= 10.0 {
        format!("{x:.1}x")
    } else {
        format!("{x:.2}x")
    }
}

fn is_unid(s: &Summary) -> bool {
    s.median.system.starts_with("unid") || s.median.system == "loadgen_grants"
}

fn is_reference(s: &Summary) -> bool {
    matches!(s.median.system.as_str(), "noop" | "loadgen_echo")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A horizontal bar chart on a log10 axis; `bars` are (label, value, colour, value text).
fn svg_bars(
    title: &str,
    axis: &str,
    tick: fn(f64) -> String,
    bars: &[(String, f64, &str, String)],
) -> String {
    let (label_w, plot_w, row_h, top) = (360.0, 520.0, 22.0, 50.0);
    let width = label_w + plot_w + 120.0;
    let height = top + row_h * bars.len() as f64 + 50.0;
    let vals: Vec<f64> = bars.iter().map(|b| b.1).filter(|v| *v > 0.0).collect();
    let lo = vals
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .log10()
        .floor();
    let hi = vals
        .iter()
        .copied()
        .fold(0.0, f64::max)
        .log10()
        .ceil()
        .max(lo + 1.0);
    let x = |v: f64| label_w + (v.max(10f64.powf(lo)).log10() - lo) / (hi - lo) * plot_w;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="15" font-weight="bold">{}</text>"#,
        esc(title)
    );
    let mut e = lo as i32;
    while e <= hi as i32 {
        let gx = x(10f64.powi(e));
        let _ = writeln!(
            s,
            r##"<line x1="{gx:.1}" y1="{top}" x2="{gx:.1}" y2="{:.1}" stroke="#ddd"/><text x="{gx:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text>"##,
            top + row_h * bars.len() as f64,
            top + row_h * bars.len() as f64 + 16.0,
            tick(10f64.powi(e))
        );
        e += 1;
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#333">{}</text>"##,
        label_w + plot_w / 2.0,
        top + row_h * bars.len() as f64 + 36.0,
        esc(axis)
    );
    for (i, (label, v, colour, text)) in bars.iter().enumerate() {
        let y = top + row_h * i as f64;
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><rect x="{label_w}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{colour}"/><text x="{:.1}" y="{:.1}" fill="#222">{}</text>"##,
            label_w - 8.0,
            y + 15.0,
            esc(label),
            y + 3.0,
            (x(*v) - label_w).max(1.0),
            row_h - 6.0,
            x(*v) + 5.0,
            y + 15.0,
            esc(text)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn colour(s: &Summary) -> &'static str {
    if is_unid(s) {
        "#2b6cb0"
    } else if is_reference(s) || s.median.system == "fetch_add" {
        "#a0aec0"
    } else {
        "#dd6b20"
    }
}

fn report(r: &Report) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(&r.tsv).with_context(|| format!("read {}", r.tsv.display()))?;
    let meta =
        std::fs::read_to_string(&r.meta).with_context(|| format!("read {}", r.meta.display()))?;
    let rows = parse_rows(&text)?;
    if rows.is_empty() {
        bail!("no rows in {}", r.tsv.display());
    }
    let sums = summarize(&rows);
    let rounds = sums.iter().map(|s| s.rounds).max().unwrap_or(0);
    let mut o = String::new();
    o.push_str(&meta);
    let _ = writeln!(
        o,
        "\n## Results\n\nMedian of {rounds} rounds (the round with the median ids/s; its range \
         across rounds in brackets). ids/s from the untimed closed loop; p50/p99 per \
         operation from the timed loop (an operation is one call: one `next()`, one \
         `nextval()`, one round trip of a Redis pipeline, one `NEXT` line, one block \
         request). In-process latencies include the timer (see the `timer` row).\n"
    );
    let _ = writeln!(
        o,
        "| system | clients | ids/s | [range] | ops/s | p50 | p99 |\n|---|---|---:|---|---:|---:|---:|"
    );
    for s in &sums {
        let m = &s.median;
        let _ = writeln!(
            o,
            "| {}{} | {} | **{}** | [{} – {}] | {} | {} | {} |",
            if is_unid(s) { "unid: " } else { "" },
            m.label,
            m.clients,
            si(m.ids_per_s),
            si(s.min),
            si(s.max),
            si(m.ops_per_s),
            time_ns(m.p50_ns),
            time_ns(m.p99_ns)
        );
    }
    // Ratios: each unid path ÷ each peer, in ids/s.
    let unids: Vec<&Summary> = sums.iter().filter(|s| is_unid(s)).collect();
    let peers: Vec<&Summary> = sums
        .iter()
        .filter(|s| !is_unid(s) && !is_reference(s))
        .collect();
    let _ = writeln!(
        o,
        "\n## Ratios: unid ids/s ÷ each peer's ids/s (same run, medians)\n"
    );
    let mut head = String::from("| peer ↓ / unid → |");
    let mut sep = String::from("|---|");
    for u in &unids {
        let _ = write!(head, " {} ({}) |", u.median.label, u.median.clients);
        sep.push_str("---:|");
    }
    let _ = writeln!(o, "{head}\n{sep}");
    for p in &peers {
        let mut line = format!("| {} ({}) |", p.median.label, p.median.clients);
        for u in &unids {
            let _ = write!(
                line,
                " {} |",
                ratio(u.median.ids_per_s / p.median.ids_per_s)
            );
        }
        let _ = writeln!(o, "{line}");
    }
    let find = |sys: &str| sums.iter().find(|s| s.median.system == sys);
    if let (Some(g), Some(e)) = (find("loadgen_grants"), find("loadgen_echo")) {
        let fr = g.median.ops_per_s / e.median.ops_per_s;
        let _ = writeln!(
            o,
            "\n## Grants against the network stack\n\nloadgen's agents against one `unid \
             server`: **{} grants/s**; the same agents against loadgen's echo peer \
             (`--echo-peer`: one decode, one encode, one reply per datagram, nothing else): \
             **{} answers/s**. Grants are **{:.0}%** of the echo baseline (target: at least \
             70%: {}). Per-round figures are in `peers-rows.tsv`; notes on what limits each figure in `peers-notes.md`.",
            si(g.median.ops_per_s),
            si(e.median.ops_per_s),
            fr * 100.0,
            if fr >= 0.7 { "met" } else { "not met" }
        );
    }
    let _ = writeln!(
        o,
        "\n## Plots\n\n![ids per second](peers-throughput.svg)\n\n![latency](peers-latency.svg)\n"
    );
    std::fs::write(&r.out, &o).with_context(|| format!("write {}", r.out.display()))?;

    let mut by_rate: Vec<&Summary> = sums.iter().filter(|s| s.median.system != "noop").collect();
    by_rate.sort_by(|a, b| b.median.ids_per_s.total_cmp(&a.median.ids_per_s));
    let bars: Vec<_> = by_rate
        .iter()
        .map(|s| {
            (
                format!("{} ({})", s.median.label, s.median.clients),
                s.median.ids_per_s,
                colour(s),
                si(s.median.ids_per_s),
            )
        })
        .collect();
    let svg = svg_bars(
        "ids per second, same machine, same run (blue: unid, orange: peers, grey: baselines)",
        "ids/s (log scale)",
        si,
        &bars,
    );
    let p = r.svg_dir.join("peers-throughput.svg");
    std::fs::write(&p, svg).with_context(|| format!("write {}", p.display()))?;
    let mut by_lat: Vec<&Summary> = sums.iter().collect();
    by_lat.sort_by(|a, b| a.median.p50_ns.total_cmp(&b.median.p50_ns));
    let mut bars = Vec::new();
    for s in by_lat {
        let name = format!("{} ({})", s.median.label, s.median.clients);
        bars.push((
            format!("{name} p50"),
            s.median.p50_ns,
            colour(s),
            time_ns(s.median.p50_ns),
        ));
        bars.push((
            "p99".to_owned(),
            s.median.p99_ns,
            "#cbd5e0",
            time_ns(s.median.p99_ns),
        ));
    }
    let svg = svg_bars(
        "latency of one operation, p50 (coloured) and p99 (light)",
        "time per operation (log scale; in-process rows include ~20 ns of timer)",
        time_ns,
        &bars,
    );
    let p = r.svg_dir.join("peers-latency.svg");
    std::fs::write(&p, svg).with_context(|| format!("write {}", p.display()))?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Measure(m) => measure(&m),
        Cmd::Report(r) => report(&r),
    }
}
