//! `loadgen`: many simulated agents asking a unid cluster for blocks over UDP, a checker of
//! every grant, and a seeded kill-leader nemesis. See `loadgen --help`.

mod agent;
mod cluster;
mod echo;
mod wire;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use unid_loadgen::checker::{self, Grant, Unanswered, Verdict};
use unid_proto::{ErrorCode, Width};

use agent::{AVAILABILITY_US, Agent, AgentConfig, AgentResult, ERROR_CODES, Faults, Shared};
use cluster::Cluster;

/// Most simulated agents (each is a thread with its own socket).
const AGENTS_MAX: usize = 512;
/// No kill this close to the end of the issuing: the failover could not be measured.
const KILL_MARGIN: Duration = Duration::from_secs(2);
/// Most requests in flight per agent.
const WINDOW_MAX: usize = 1024;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Nemesis {
    /// No faults.
    None,
    /// SIGKILL the leader every `--every-ms` (seeded jitter ±25%), restart it from its data
    /// dir after a quarter to half of that. Needs `--spawn-servers`; no kill in the last 2 s
    /// of the issuing.
    KillLeader,
    /// The same schedule, but SIGTERM: the leader hands off and sends `LeaderChange` before
    /// it exits (SIGKILL if it has not exited within 5 s).
    TermLeader,
}

/// Load generator and checker for a unid cluster.
#[derive(Parser, Debug)]
#[command(name = "loadgen", version)]
struct Args {
    /// Start this many `unid server` processes on 127.0.0.1 (temporary data dirs).
    #[arg(long, value_name = "N")]
    spawn_servers: Option<usize>,
    /// The `unid` binary for `--spawn-servers`.
    #[arg(long, value_name = "PATH", env = "UNID_BIN")]
    unid_bin: Option<PathBuf>,
    /// An existing server's UDP address (repeat), instead of `--spawn-servers`.
    #[arg(long = "server", value_name = "ADDR")]
    servers: Vec<SocketAddr>,
    /// The sequence to ask for (created if missing).
    #[arg(long, default_value = "loadgen")]
    sequence: String,
    /// Its width in bytes (2, 4, 8 or 16).
    #[arg(long, default_value_t = 8)]
    width: u8,
    /// Ids per block request.
    #[arg(long, default_value_t = 100)]
    count: u64,
    /// Simulated agents (threads, each with its own UDP socket).
    #[arg(long, default_value_t = 16)]
    agents: usize,
    /// Block requests in flight per agent.
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// Target block requests per second over all agents (0: as fast as the windows allow).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// How long to issue requests.
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Stop issuing after this many requests in all.
    #[arg(long)]
    requests_max: Option<u64>,
    /// After the issuing stops, how long to keep retrying unanswered requests before they
    /// count as never answered.
    #[arg(long, default_value_t = 10.0)]
    drain_s: f64,
    /// First retransmit timeout (doubles per attempt, up to 1 s).
    #[arg(long, default_value_t = 100)]
    rto_ms: u64,
    /// Fault to inject.
    #[arg(long, value_enum, default_value_t = Nemesis::None)]
    nemesis: Nemesis,
    /// Seed of the nemesis schedule (same seed, same schedule).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Mean interval between faults.
    #[arg(long, default_value_t = 10_000)]
    every_ms: u64,
    /// Drop this fraction of datagrams, each direction (0..=1).
    #[arg(long, default_value_t = 0.0)]
    drop: f64,
    /// Deliver this fraction of datagrams twice, each direction.
    #[arg(long, default_value_t = 0.0)]
    duplicate: f64,
    /// Deliver this fraction of datagrams after the next one, each direction.
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// Flip one bit in this fraction of datagrams, each direction.
    #[arg(long, default_value_t = 0.0)]
    corrupt: f64,
    /// Write a markdown report here.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Keep the spawned servers' data dirs and logs (printed at the end).
    #[arg(long)]
    keep_data: bool,
    /// Instead of servers, start a UDP echo peer on 127.0.0.1 and drive it with the same
    /// agents: the network-stack baseline for grants/s (see `src/echo.rs`).
    #[arg(long)]
    echo_peer: bool,
    /// Threads of the echo peer.
    #[arg(long, default_value_t = 2)]
    echo_threads: usize,
}

/// One kill by the nemesis.
struct Kill {
    t_us: u64,
    id: u64,
    addr: SocketAddr,
    term: u64,
    restarted_us: Option<u64>,
}

fn main() {
    match run() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("loadgen: error: {e:#}");
            std::process::exit(2);
        }
    }
}

fn validate(a: &Args) -> anyhow::Result<Width> {
    let Some(width) = Width::from_bytes(a.width) else {
        bail!("--width must be 2, 4, 8 or 16, not {}", a.width);
    };
    if a.agents == 0 || a.agents > AGENTS_MAX {
        bail!("--agents must be in 1..={AGENTS_MAX}");
    }
    if a.window == 0 || a.window > WINDOW_MAX {
        bail!("--window must be in 1..={WINDOW_MAX}");
    }
    if a.count == 0 {
        bail!("--count must be at least 1");
    }
    if !(a.rate >= 0.0 && a.rate.is_finite()) {
        bail!("--rate must be a finite number >= 0");
    }
    if !(a.duration_s > 0.0 && a.duration_s <= 86_400.0) {
        bail!("--duration-s must be in (0, 86400]");
    }
    if !(a.drain_s >= 0.0 && a.drain_s <= 600.0) {
        bail!("--drain-s must be in [0, 600]");
    }
    if a.rto_ms == 0 || a.rto_ms > agent::RTO_MS_MAX {
        bail!("--rto-ms must be in 1..={}", agent::RTO_MS_MAX);
    }
    for (name, p) in [
        ("--drop", a.drop),
        ("--duplicate", a.duplicate),
        ("--reorder", a.reorder),
        ("--corrupt", a.corrupt),
    ] {
        if !(0.0..=1.0).contains(&p) {
            bail!("{name} must be a fraction in [0, 1], not {p}");
        }
    }
    if a.every_ms < 100 {
        bail!("--every-ms must be at least 100");
    }
    if a.echo_peer && (a.spawn_servers.is_some() || !a.servers.is_empty()) {
        bail!("--echo-peer replaces the servers: give neither --spawn-servers nor --server");
    }
    match (a.spawn_servers, a.servers.is_empty() && !a.echo_peer) {
        (Some(_), false) => bail!("give --spawn-servers or --server, not both"),
        (None, true) => bail!("give --spawn-servers N (with --unid-bin) or --server ADDR"),
        _ => {}
    }
    if a.nemesis != Nemesis::None && a.spawn_servers.is_none() {
        bail!(
            "--nemesis kill-leader/term-leader needs --spawn-servers (it kills and restarts them)"
        );
    }
    Ok(width)
}

fn run() -> anyhow::Result<bool> {
    let args = Args::parse();
    let width = validate(&args)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");

    let tmp = tempfile::Builder::new()
        .prefix("unid-loadgen-")
        .tempdir()
        .context("create a temporary directory")?;
    let mut cluster = match args.spawn_servers {
        Some(n) => {
            let bin = args
                .unid_bin
                .as_deref()
                .context("--spawn-servers needs --unid-bin PATH (or UNID_BIN)")?;
            Some(Cluster::spawn(bin, tmp.path(), n)?)
        }
        None => None,
    };
    let echo = match args.echo_peer {
        true => Some(echo::EchoPeer::start(args.echo_threads, width)?),
        false => None,
    };
    let servers = match (&cluster, &echo) {
        (_, Some(e)) => vec![e.addr()],
        (Some(c), None) => c.addrs(),
        (None, None) => args.servers.clone(),
    };
    eprintln!("loadgen: servers {servers:?}");
    let status = wire::wait_leader(&servers, Duration::from_secs(30), || {
        match cluster.as_mut() {
            Some(c) => match c.exited().first() {
                Some((id, st)) => bail!(
                    "spawned server {id} exited ({st}) before a leader was agreed; its log ends:\n{}",
                    c.log_tail(*id, 20)
                ),
                None => Ok(()),
            },
            None => Ok(()),
        }
    })?;
    eprintln!(
        "loadgen: leader {} (term {})",
        status.leader_id, status.term
    );
    wire::Admin::new()?.create_sequence(
        &servers,
        &args.sequence,
        width,
        Duration::from_secs(20),
    )?;

    let start = Instant::now();
    let stop_issuing_at = start + Duration::from_secs_f64(args.duration_s);
    let shared = Arc::new(Shared {
        start,
        stop_issuing_at,
        drain_until: stop_issuing_at + Duration::from_secs_f64(args.drain_s),
        abort: AtomicBool::new(false),
        requests_max: args.requests_max.unwrap_or(u64::MAX),
        requests: AtomicU64::new(0),
        grants: AtomicU64::new(0),
        ids: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        retransmits: AtomicU64::new(0),
    });
    let cfg = AgentConfig {
        servers: servers.clone(),
        sequence: args.sequence.clone(),
        count: args.count,
        window: args.window,
        rate_per_s: args.rate / args.agents as f64,
        rto_ms: args.rto_ms,
        faults: Faults {
            drop: args.drop,
            duplicate: args.duplicate,
            reorder: args.reorder,
            corrupt: args.corrupt,
        },
        seed: args.seed,
    };
    // Distinct per run, so a rerun against the same servers registers afresh.
    let incarnation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1);
    // Ctrl-C or SIGTERM: stop the agents, report, and stop the spawned servers on the way
    // out. A second one exits at once (the servers are then left running).
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, interrupted.clone())
            .context("install a signal handler")?;
        signal_hook::flag::register(signal, interrupted.clone())
            .context("install a signal handler")?;
    }
    let handles: Vec<_> = (0..args.agents)
        .map(|i| {
            let agent = Agent::new(i as u32, cfg.clone(), shared.clone(), incarnation)
                .context("bind an agent socket on 127.0.0.1")?;
            std::thread::Builder::new()
                .name(format!("agent-{i}"))
                .spawn(move || agent.run())
                .context("spawn an agent thread")
        })
        .collect::<anyhow::Result<_>>()?;

    // Progress, nemesis, and waiting for the agents.
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let jitter = |rng: &mut SmallRng, mean_ms: u64| {
        Duration::from_millis(rng.random_range(mean_ms * 3 / 4..=mean_ms * 5 / 4))
    };
    let mut next_kill =
        (args.nemesis != Nemesis::None).then(|| start + jitter(&mut rng, args.every_ms));
    let mut restart: Option<(Instant, usize)> = None;
    let mut kills: Vec<Kill> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let mut next_progress = start + Duration::from_secs(1);
    let (mut last_grants, mut last_ids) = (0u64, 0u64);
    loop {
        let now = Instant::now();
        if handles.iter().all(|h| h.is_finished()) {
            break;
        }
        if interrupted.load(Ordering::Relaxed) && !shared.abort.swap(true, Ordering::Relaxed) {
            eprintln!("loadgen: interrupted: stopping (again to quit at once)");
            notes.push("interrupted by a signal before the end".to_owned());
        }
        if let Some(c) = cluster.as_mut() {
            for (id, st) in c.exited() {
                let note = format!(
                    "server {id} exited on its own ({st}) at {:.3} s; last log lines:\n{}",
                    now.duration_since(start).as_secs_f64(),
                    c.log_tail(id, 10)
                );
                eprintln!("loadgen: {note}");
                notes.push(note);
            }
        }
        // Restart the killed server when due, and at the end of the issuing so that the
        // drain runs against a whole cluster.
        if let (Some((at, k)), Some(c)) = (restart, cluster.as_mut())
            && (now >= at || now >= stop_issuing_at)
        {
            let id = kills[k].id;
            match c.start(id, false) {
                Ok(()) => {
                    kills[k].restarted_us = Some(now.duration_since(start).as_micros() as u64);
                    eprintln!("loadgen: restarted server {id}");
                }
                Err(e) => notes.push(format!("restart of server {id} failed: {e:#}")),
            }
            restart = None;
        }
        if let (Some(at), Some(c)) = (next_kill, cluster.as_mut())
            && now >= at
            && restart.is_none()
        {
            if now + KILL_MARGIN >= stop_issuing_at {
                // Too close to the end to see the failover.
                next_kill = None;
            } else {
                // The leader as the running servers report it.
                let mut admin = wire::Admin::new()?;
                let running: Vec<(u64, SocketAddr)> = c
                    .servers
                    .iter()
                    .map(|s| (s.id, s.udp))
                    .collect::<Vec<_>>()
                    .into_iter()
                    .filter(|(id, _)| c.running(*id))
                    .collect();
                let leader = running
                    .iter()
                    .filter_map(|(_, a)| admin.status(*a, Duration::from_millis(200)))
                    .find(|s| s.leader_id != 0);
                match leader {
                    Some(st) if c.running(st.leader_id) => {
                        let killed_at = Instant::now();
                        let how = if args.nemesis == Nemesis::TermLeader {
                            if c.term(st.leader_id, Duration::from_secs(5)) {
                                "SIGTERM"
                            } else {
                                notes.push(format!(
                                    "server {} did not exit within 5 s of SIGTERM (SIGKILLed)",
                                    st.leader_id
                                ));
                                "SIGTERM, then SIGKILL"
                            }
                        } else {
                            c.kill9(st.leader_id);
                            "kill -9"
                        };
                        let addr = c.servers[(st.leader_id - 1) as usize].udp;
                        let t_us = killed_at.duration_since(start).as_micros() as u64;
                        eprintln!(
                            "loadgen: {how} leader {} (term {}) at {:.3} s",
                            st.leader_id,
                            st.term,
                            t_us as f64 / 1e6
                        );
                        kills.push(Kill {
                            t_us,
                            id: st.leader_id,
                            addr,
                            term: st.term,
                            restarted_us: None,
                        });
                        let down = Duration::from_millis(
                            rng.random_range(args.every_ms / 4..=args.every_ms / 2),
                        );
                        restart = Some((killed_at + down, kills.len() - 1));
                        next_kill = Some(killed_at + jitter(&mut rng, args.every_ms));
                    }
                    _ => {
                        // No leader right now: try again shortly.
                        next_kill = Some(now + Duration::from_millis(500));
                    }
                }
            }
        }
        if now >= next_progress {
            let g = shared.grants.load(Ordering::Relaxed);
            let ids = shared.ids.load(Ordering::Relaxed);
            let requests = shared
                .requests
                .load(Ordering::Relaxed)
                .min(shared.requests_max);
            eprintln!(
                "loadgen: t={:>5.1}s grants/s={:>8} ids/s={:>10} requests={} grants={} \
                 outstanding={} errors={} resends={}",
                now.duration_since(start).as_secs_f64(),
                g - last_grants,
                ids - last_ids,
                requests,
                g,
                requests.saturating_sub(g),
                shared.errors.load(Ordering::Relaxed),
                shared.retransmits.load(Ordering::Relaxed),
            );
            (last_grants, last_ids) = (g, ids);
            next_progress += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ended = Instant::now();
    let results: Vec<AgentResult> = handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("an agent thread panicked"))
        })
        .collect::<anyhow::Result<_>>()?;

    let summary = Summary::new(
        &args,
        width,
        results,
        start,
        stop_issuing_at.min(ended),
        &kills,
    );
    let report = summary.markdown(&command, &args, &kills, &notes);
    println!("{report}");
    if let Some(path) = &args.report {
        std::fs::write(path, &report).with_context(|| format!("write {}", path.display()))?;
        eprintln!("loadgen: report written to {}", path.display());
    }
    let passed = summary.verdict.passed() && notes.is_empty();
    if !summary.verdict.passed() {
        eprintln!(
            "loadgen: CHECK FAILED: {} violation(s):",
            summary.verdict.violations
        );
        for v in &summary.verdict.described {
            eprintln!("  {v}");
        }
    }
    if !notes.is_empty() {
        eprintln!(
            "loadgen: FAILED: {} server problem(s), see the report",
            notes.len()
        );
    }
    if args.keep_data || !passed {
        drop(cluster.take());
        let kept = tmp.keep();
        eprintln!(
            "loadgen: server data dirs and logs kept in {}",
            kept.display()
        );
    }
    Ok(passed)
}

/// Everything the report says, merged from the agents.
struct Summary {
    verdict: Verdict,
    grants: Vec<Grant>,
    unanswered: Vec<Unanswered>,
    latency_us: Histogram<u64>,
    errors_by_code: [u64; ERROR_CODES],
    requests: u64,
    failed: u64,
    answered_within: [u64; 3],
    retransmits: u64,
    redirect_resends: u64,
    error_retries: u64,
    redirects: u64,
    leader_changes: u64,
    registrations: u64,
    rotations: u64,
    socket_errors: u64,
    undecodable: u64,
    faults: [u64; 4],
    /// Requests answered with two different blocks (the ids of one are never used).
    answered_twice: u64,
    issuing_s: f64,
    /// For each kill: the first grant after it from another server, in µs after the kill.
    failover_us: Vec<Option<u64>>,
    /// Longest time without any grant during the issuing period, and when it started.
    longest_gap_us: (u64, u64),
}

impl Summary {
    fn new(
        args: &Args,
        width: Width,
        results: Vec<AgentResult>,
        start: Instant,
        issuing_end: Instant,
        kills: &[Kill],
    ) -> Summary {
        let mut latency_us = Histogram::new_with_bounds(1, agent::LATENCY_US_MAX, 3)
            .expect("valid histogram bounds");
        let mut s = Summary {
            verdict: Verdict::default(),
            grants: Vec::new(),
            unanswered: Vec::new(),
            latency_us: latency_us.clone(),
            errors_by_code: [0; ERROR_CODES],
            requests: 0,
            failed: 0,
            answered_within: [0; 3],
            retransmits: 0,
            redirect_resends: 0,
            error_retries: 0,
            redirects: 0,
            leader_changes: 0,
            registrations: 0,
            rotations: 0,
            socket_errors: 0,
            undecodable: 0,
            faults: [0; 4],
            answered_twice: 0,
            issuing_s: issuing_end.duration_since(start).as_secs_f64().max(1e-3),
            failover_us: Vec::new(),
            longest_gap_us: (0, 0),
        };
        for r in results {
            let _ = latency_us.add(&r.latency_us);
            s.grants.extend(r.grants);
            s.unanswered.extend(r.unanswered);
            for (a, b) in s.errors_by_code.iter_mut().zip(r.errors_by_code) {
                *a += b;
            }
            for (a, b) in s.answered_within.iter_mut().zip(r.answered_within) {
                *a += b;
            }
            s.requests += r.requests;
            s.failed += r.failed;
            s.retransmits += r.retransmits;
            s.redirect_resends += r.redirect_resends;
            s.error_retries += r.error_retries;
            s.redirects += r.redirects;
            s.leader_changes += r.leader_changes;
            s.registrations += r.registrations;
            s.rotations += r.rotations;
            s.socket_errors += r.socket_errors;
            s.undecodable += r.undecodable;
            for (a, b) in s.faults.iter_mut().zip(r.faults) {
                *a += b;
            }
        }
        s.latency_us = latency_us;
        s.verdict = checker::check(width, &mut s.grants, &s.unanswered);
        let requests_granted: std::collections::HashSet<(u32, u64)> =
            s.grants.iter().map(|g| (g.agent, g.seq)).collect();
        s.answered_twice = s.verdict.grants - requests_granted.len() as u64;
        // The checker sorted by id; failover and gaps need arrival order.
        let mut times: Vec<(u64, SocketAddr)> = s.grants.iter().map(|g| (g.t_us, g.from)).collect();
        times.sort_unstable();
        for k in kills {
            s.failover_us.push(
                times
                    .iter()
                    .find(|(t, from)| *t > k.t_us && *from != k.addr)
                    .map(|(t, _)| t - k.t_us),
            );
        }
        let issuing_end_us = (args.duration_s * 1e6) as u64;
        // With --requests-max the issuing may end early: rate over the time to the last grant.
        if let Some(last) = times.last().map(|(t, _)| *t)
            && last < issuing_end_us
        {
            s.issuing_s = (last as f64 / 1e6).max(1e-3);
        }
        let mut prev = 0u64;
        for (t, _) in times.iter().filter(|(t, _)| *t <= issuing_end_us) {
            if t - prev > s.longest_gap_us.0 {
                s.longest_gap_us = (t - prev, prev);
            }
            prev = *t;
        }
        s
    }

    fn markdown(&self, command: &str, args: &Args, kills: &[Kill], notes: &[String]) -> String {
        let mut o = String::new();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        let nproc = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let load = std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        let verdict = if self.verdict.passed() && notes.is_empty() {
            "PASSED"
        } else {
            "FAILED"
        };
        let _ = writeln!(o, "# loadgen report: {verdict}\n");
        let _ = writeln!(o, "```sh\n{command}\n```\n");
        let _ = writeln!(
            o,
            "- Machine: `nproc` = {nproc}, kernel {kernel}, load average at the end {load}."
        );
        let _ = writeln!(
            o,
            "- Settings: {} agents × window {}, {} ids per request, rate {}, issuing {:.1} s \
             (requests max {}), drain {:.1} s, first RTO {} ms, sequence `{}` width {}, \
             nemesis {:?} (seed {}, every {} ms), datagram faults each way: drop {}, duplicate \
             {}, reorder {}, corrupt {}.\n",
            args.agents,
            args.window,
            args.count,
            if args.rate > 0.0 {
                format!("{} req/s", args.rate)
            } else {
                "as fast as possible".into()
            },
            args.duration_s,
            args.requests_max
                .map_or_else(|| "none".to_owned(), |m| m.to_string()),
            args.drain_s,
            args.rto_ms,
            args.sequence,
            args.width,
            args.nemesis,
            args.seed,
            args.every_ms,
            args.drop,
            args.duplicate,
            args.reorder,
            args.corrupt,
        );
        let granted = self.requests - self.failed - self.unanswered.len() as u64;
        let _ = writeln!(o, "## Throughput\n");
        let _ = writeln!(o, "| requests | granted | grants/s | ids granted | ids/s |");
        let _ = writeln!(o, "|---|---|---|---|---|");
        let _ = writeln!(
            o,
            "| {} | {} | {:.0} | {} | {:.0} |\n",
            self.requests,
            granted,
            granted as f64 / self.issuing_s,
            self.verdict.ids,
            self.verdict.ids as f64 / self.issuing_s
        );
        let _ = writeln!(
            o,
            "Rates are over the issuing period ({:.2} s; up to the last grant if that came \
             earlier); grants answered during the drain count too.\n",
            self.issuing_s
        );
        let h = &self.latency_us;
        let _ = writeln!(o, "## Latency (first send → answer, µs)\n");
        let _ = writeln!(o, "| answered | p50 | p99 | p99.9 | max |");
        let _ = writeln!(o, "|---|---|---|---|---|");
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} |\n",
            h.len(),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max()
        );
        let _ = writeln!(
            o,
            "## Availability (fraction of requests answered within)\n"
        );
        let heads: Vec<String> = AVAILABILITY_US
            .iter()
            .map(|us| {
                if us % 1_000_000 == 0 {
                    format!("{} s", us / 1_000_000)
                } else {
                    format!("{} ms", us / 1_000)
                }
            })
            .collect();
        let _ = writeln!(o, "| {} |", heads.join(" | "));
        let _ = writeln!(o, "|---|---|---|");
        let frac = |n: u64| {
            if self.requests == 0 {
                "-".to_owned()
            } else {
                format!("{:.5}", n as f64 / self.requests as f64)
            }
        };
        let _ = writeln!(
            o,
            "| {} | {} | {} |\n",
            frac(self.answered_within[0]),
            frac(self.answered_within[1]),
            frac(self.answered_within[2])
        );
        let _ = writeln!(o, "## Protocol\n");
        let _ = writeln!(o, "| what | count |");
        let _ = writeln!(o, "|---|---|");
        for (what, n) in [
            ("retransmits after a timeout (same seq)", self.retransmits),
            (
                "resends to another server (redirect, silence, registration)",
                self.redirect_resends,
            ),
            (
                "retries after NotReady/RateLimited/Internal",
                self.error_retries,
            ),
            ("NotLeader redirects followed", self.redirects),
            ("LeaderChange followed", self.leader_changes),
            ("registrations (Welcome)", self.registrations),
            ("switches to the next server after silence", self.rotations),
            ("requests ended by a final error", self.failed),
            (
                "requests granted two different blocks (ids wasted, not repeated)",
                self.answered_twice,
            ),
            ("socket errors (ICMP unreachable)", self.socket_errors),
            ("undecodable datagrams", self.undecodable),
            ("faults injected: dropped", self.faults[0]),
            ("faults injected: duplicated", self.faults[1]),
            ("faults injected: reordered", self.faults[2]),
            ("faults injected: corrupted", self.faults[3]),
        ] {
            let _ = writeln!(o, "| {what} | {n} |");
        }
        for (code, n) in self.errors_by_code.iter().enumerate() {
            if *n > 0 {
                let name = ErrorCode::from_u8(code as u8)
                    .map_or_else(|| "unknown code".to_owned(), |c| format!("{c:?}"));
                let _ = writeln!(o, "| Error {name} | {n} |");
            }
        }
        let _ = writeln!(o);
        if !kills.is_empty() {
            let how = if args.nemesis == Nemesis::TermLeader {
                "SIGTERM to the leader (handoff)"
            } else {
                "kill -9 of the leader"
            };
            let _ = writeln!(o, "## Nemesis: {how}\n");
            let _ = writeln!(
                o,
                "| # | at (s) | server | term | restarted at (s) | signal → first grant by another server (ms) |"
            );
            let _ = writeln!(o, "|---|---|---|---|---|---|");
            for (i, (k, f)) in kills.iter().zip(&self.failover_us).enumerate() {
                let _ = writeln!(
                    o,
                    "| {} | {:.3} | {} | {} | {} | {} |",
                    i + 1,
                    k.t_us as f64 / 1e6,
                    k.id,
                    k.term,
                    k.restarted_us
                        .map_or_else(|| "-".to_owned(), |t| format!("{:.3}", t as f64 / 1e6)),
                    f.map_or_else(|| "none".to_owned(), |f| format!("{:.1}", f as f64 / 1e3)),
                );
            }
            let _ = writeln!(o);
        }
        let _ = writeln!(
            o,
            "Longest time without any grant while issuing: {:.1} ms (from {:.3} s).\n",
            self.longest_gap_us.0 as f64 / 1e3,
            self.longest_gap_us.1 as f64 / 1e6
        );
        let _ = writeln!(
            o,
            "## Checker: {}\n",
            if self.verdict.passed() {
                "passed"
            } else {
                "FAILED"
            }
        );
        let _ = writeln!(
            o,
            "{} distinct grants, {} ids; no id granted twice, every id inside width {}, no \
             agent's block below one it already had, every request answered: {} violation(s).",
            self.verdict.grants, self.verdict.ids, args.width, self.verdict.violations
        );
        for v in &self.verdict.described {
            let _ = writeln!(o, "- {v}");
        }
        for n in notes {
            let _ = writeln!(o, "\n- {n}");
        }
        o
    }
}
