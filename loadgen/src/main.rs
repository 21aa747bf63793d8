//! `loadgen`: many simulated agents asking a unid cluster for blocks over UDP, real agents
//! with ring consumers, a checker of every grant and id, a UDP proxy for datagram faults,
//! and a seeded nemesis (kills, partitions, clock jumps). See `loadgen --help`.

mod agent;
mod batched;
mod cluster;
mod consumer;
mod echo;
mod fleet;
mod mux;
mod nemesis;
mod partition;
mod plot;
mod proxy;
mod report;
mod series;
mod sys;
mod wire;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use unid_proto::Width;

use agent::{Agent, AgentConfig, AgentResult, Faults, Shared};
use cluster::Cluster;
use nemesis::Kind;

/// Most simulated agents (each is a thread with its own socket).
const AGENTS_MAX: usize = 512;
/// Most requests in flight per agent.
const WINDOW_MAX: usize = 1024;
/// `--server-cpu` pins the server threads whose names start so (its UDP shards).
const SHARD_THREAD_PREFIX: &str = "unid-shard";
/// Most ring consumers per real agent.
const CONSUMERS_PER_AGENT_MAX: usize = 8;

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
    /// Faults to inject, in turn (comma-separated, cycling; `all`: every kind). Needs
    /// `--spawn-servers`. See the README for each kind.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "none")]
    nemesis: Vec<Kind>,
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
    /// Start this many real `unid agent` processes (needs `--spawn-servers`), each with its
    /// own ring dir and socket, and ring consumers taking ids from them.
    #[arg(long, default_value_t = 0)]
    real_agents: usize,
    /// Ring consumers (threads using the `unid` client crate) per real agent.
    #[arg(long, default_value_t = 1)]
    consumers_per_agent: usize,
    /// Ids per second each consumer takes, one `next()` at a time (0: as fast as it can).
    #[arg(long, default_value_t = 5_000.0)]
    consumer_rate: f64,
    /// The real agents' `--refill-period-ms` (how long a block should last). 1000, not the
    /// agent's default 100: a ring holding ~1 s of ids rides over a ~200 ms failover
    /// without a `next()` waiting (with 100 ms, waits of 15-30 ms were seen).
    #[arg(long, default_value_t = 1_000)]
    refill_period_ms: u64,
    /// Put a UDP proxy between every agent (simulated and real) and the servers: the
    /// datagram faults below, and a record of every grant as the servers sent it.
    #[arg(long)]
    proxy: bool,
    /// Proxy: drop this fraction of datagrams, each direction.
    #[arg(long, default_value_t = 0.0)]
    proxy_drop: f64,
    /// Proxy: send this fraction twice.
    #[arg(long, default_value_t = 0.0)]
    proxy_duplicate: f64,
    /// Proxy: send this fraction after the next one.
    #[arg(long, default_value_t = 0.0)]
    proxy_reorder: f64,
    /// Proxy: hold this fraction back for about `--proxy-delay-ms`.
    #[arg(long, default_value_t = 0.0)]
    proxy_delay: f64,
    /// Proxy: the delay (each delayed datagram waits 0.5x to 1.5x of it).
    #[arg(long, default_value_t = 20)]
    proxy_delay_ms: u64,
    /// Proxy: flip one bit in this fraction.
    #[arg(long, default_value_t = 0.0)]
    proxy_corrupt: f64,
    /// Remove every iptables rule a loadgen run left (comment `unid-loadgen-PID`), and exit.
    #[arg(long)]
    remove_rules: bool,
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
    /// Many agents multiplexed over a few sockets per thread with batched I/O
    /// (`recvmmsg`/`sendmmsg`), each its own registered node (up to 100,000): `--agents`,
    /// `--window`, `--rate`, `--count`, `--duration-s` keep their meaning; no faults, no real
    /// agents. Its own report (throughput, latency, fairness, the server's CPU per grant,
    /// RSS and data per agent).
    #[arg(long)]
    batched: bool,
    /// `--batched`: agent threads.
    #[arg(long, default_value_t = 1)]
    mux_threads: usize,
    /// `--batched`: sockets per agent thread (each on its own 127.0.1.x address).
    #[arg(long, default_value_t = 8)]
    sockets_per_thread: usize,
    /// `--batched`: most requests in flight over all agents.
    #[arg(long, default_value_t = 512)]
    inflight_max: usize,
    /// `--batched`: measuring starts this long after every agent registered.
    #[arg(long, default_value_t = 1.0)]
    warmup_s: f64,
    /// `--batched`: `Hello`s per second in all (retries too; each agent retries after 1 s).
    #[arg(long, default_value_t = 300.0)]
    hello_rate: f64,
    /// `--batched`: how long the agents may take to register.
    #[arg(long, default_value_t = 120.0)]
    register_timeout_s: f64,
    /// One more argument for every spawned `unid server` (repeat), e.g.
    /// `--server-arg=--election-ms --server-arg=40-70`.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    server_arg: Vec<String>,
    /// Pin loadgen's agent threads (`--batched`) to this CPU.
    #[arg(long)]
    client_cpu: Option<usize>,
    /// Pin the spawned servers' UDP shards (threads `unid-shard*`; Raft threads are not
    /// pinned) or the echo peer's threads to this CPU.
    #[arg(long)]
    server_cpu: Option<usize>,
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
    if a.batched {
        if a.agents == 0 || a.agents > mux::MUX_AGENTS_MAX {
            bail!("--batched: --agents must be in 1..={}", mux::MUX_AGENTS_MAX);
        }
        if a.real_agents > 0 || a.proxy || a.drop + a.duplicate + a.reorder + a.corrupt > 0.0 {
            bail!("--batched takes no real agents, proxy or datagram faults");
        }
        if a.nemesis.iter().any(|k| *k != Kind::None) {
            bail!("--batched takes no nemesis");
        }
        if !(a.warmup_s >= 0.0 && a.warmup_s <= 600.0) || a.inflight_max == 0 {
            bail!("--warmup-s must be in [0, 600] and --inflight-max at least 1");
        }
        if !(a.hello_rate > 0.0 && a.hello_rate.is_finite()) {
            bail!("--hello-rate must be a positive number");
        }
    } else if a.agents > AGENTS_MAX || (a.agents == 0 && a.real_agents == 0) {
        bail!("--agents must be in 1..={AGENTS_MAX} (0 only with --real-agents)");
    }
    if a.real_agents > fleet::REAL_AGENTS_MAX {
        bail!("--real-agents must be in 0..={}", fleet::REAL_AGENTS_MAX);
    }
    if a.real_agents > 0 && a.spawn_servers.is_none() {
        bail!("--real-agents needs --spawn-servers");
    }
    if a.consumers_per_agent == 0 || a.consumers_per_agent > CONSUMERS_PER_AGENT_MAX {
        bail!("--consumers-per-agent must be in 1..={CONSUMERS_PER_AGENT_MAX}");
    }
    if !(a.consumer_rate >= 0.0 && a.consumer_rate.is_finite()) {
        bail!("--consumer-rate must be a finite number >= 0");
    }
    if a.refill_period_ms == 0 || a.refill_period_ms > 60_000 {
        bail!("--refill-period-ms must be in 1..=60000");
    }
    if a.proxy_delay_ms > proxy::DELAY_MS_MAX {
        bail!("--proxy-delay-ms must be at most {}", proxy::DELAY_MS_MAX);
    }
    if a.proxy && a.echo_peer {
        bail!("--proxy and --echo-peer do not go together");
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
        ("--proxy-drop", a.proxy_drop),
        ("--proxy-duplicate", a.proxy_duplicate),
        ("--proxy-reorder", a.proxy_reorder),
        ("--proxy-delay", a.proxy_delay),
        ("--proxy-corrupt", a.proxy_corrupt),
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
    let kinds = nemesis::expand(&a.nemesis);
    if !kinds.is_empty() && a.spawn_servers.is_none() {
        bail!(
            "--nemesis {} needs --spawn-servers (it kills and restarts them)",
            kinds[0].name()
        );
    }
    Ok(width)
}

impl Args {
    fn proxy_faults(&self) -> proxy::ProxyFaults {
        proxy::ProxyFaults {
            drop: self.proxy_drop,
            duplicate: self.proxy_duplicate,
            reorder: self.proxy_reorder,
            delay: self.proxy_delay,
            delay_ms: self.proxy_delay_ms,
            corrupt: self.proxy_corrupt,
        }
    }
}

fn run() -> anyhow::Result<bool> {
    let args = Args::parse();
    if args.remove_rules {
        let n = partition::remove_stale(true)?;
        eprintln!("loadgen: removed {n} iptables rule(s)");
        return Ok(true);
    }
    let width = validate(&args)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let kinds = nemesis::expand(&args.nemesis);

    let tmp = tempfile::Builder::new()
        .prefix("unid-loadgen-")
        .tempdir()
        .context("create a temporary directory")?;
    // Partitions: iptables rules matching the owner's uid, so each server and real agent
    // runs as its own uid (root only); else they are skipped, and say why.
    let mut rules: Result<partition::Rules, String> = if kinds.iter().any(|k| k.needs_rules()) {
        match partition::unavailable() {
            None => {
                let stale = partition::remove_stale(false).unwrap_or(0);
                if stale > 0 {
                    eprintln!("loadgen: removed {stale} iptables rule(s) left by dead runs");
                }
                Ok(partition::Rules::new())
            }
            Some(why) => {
                eprintln!("loadgen: partitions will be SKIPPED: {why}");
                Err(why)
            }
        }
    } else {
        Err("no partition in the schedule".into())
    };
    let uid_base = rules.is_ok().then(partition::uid_base);
    if uid_base.is_some() {
        // The servers and agents (other uids) make their files under it.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .context("chmod the temporary directory")?;
    }
    let server_clocks =
        kinds.contains(&Kind::ClockJump) && std::path::Path::new(cluster::LIBFAKETIME).is_file();
    if kinds.contains(&Kind::ClockJump) && !server_clocks {
        eprintln!(
            "loadgen: no {} (apt-get install -y faketime): clock jumps will be SKIPPED",
            cluster::LIBFAKETIME
        );
    }
    let mut given: HashSet<u16> = HashSet::new();
    let mut cluster = match args.spawn_servers {
        Some(n) => {
            let bin = args
                .unid_bin
                .as_deref()
                .context("--spawn-servers needs --unid-bin PATH (or UNID_BIN)")?;
            let opts = cluster::SpawnOptions {
                uid_base,
                faketime: server_clocks,
                server_args: args.server_arg.clone(),
            };
            Some(Cluster::spawn(bin, tmp.path(), n, &opts, &mut given)?)
        }
        None => None,
    };
    let echo = match args.echo_peer {
        true => Some(echo::EchoPeer::start(
            args.echo_threads,
            width,
            args.server_cpu,
        )?),
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

    if let (Some(cpu), Some(c)) = (args.server_cpu, &cluster) {
        for s in &c.servers {
            if let Some(pid) = c.pid(s.id) {
                // The UDP shards only: with its Raft threads on the same core, 1,000 agents
                // registering at once starved Raft (ceiling raises timed out after 2 s).
                let n = sys::pin_threads(pid, SHARD_THREAD_PREFIX, cpu)
                    .with_context(|| format!("pin server {}'s shards to CPU {cpu}", s.id))?;
                anyhow::ensure!(
                    n > 0,
                    "server {} has no thread named {SHARD_THREAD_PREFIX}*",
                    s.id
                );
            }
        }
    }
    if args.batched {
        let interrupted = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(signal, interrupted.clone())
                .context("install a signal handler")?;
        }
        let peer = match (&cluster, &echo) {
            (_, Some(e)) => batched::Peer::Echo(e),
            (Some(c), None) => batched::Peer::Cluster(c, status.leader_id),
            (None, None) => batched::Peer::External,
        };
        let (report, passed) = batched::run(&args, servers.clone(), peer, &command, &interrupted)?;
        println!("{report}");
        if let Some(path) = &args.report {
            std::fs::write(path, &report).with_context(|| format!("write {}", path.display()))?;
            eprintln!("loadgen: report written to {}", path.display());
        }
        if !passed {
            eprintln!("loadgen: CHECK FAILED (see the report's checks)");
        }
        return Ok(passed);
    }
    let start = Instant::now();
    let stop_issuing_at = start + Duration::from_secs_f64(args.duration_s);
    // Buckets of the time series: 100 ms, wider for long runs (at most ~6000 per run).
    let bucket_ms = ((args.duration_s * 1000.0 / 6000.0) as u64).max(100);
    let proxy = match args.proxy {
        true => Some(proxy::Proxy::start(
            &servers,
            args.proxy_faults(),
            args.seed,
            start,
            &mut given,
        )?),
        false => None,
    };
    // The addresses the agents are given.
    let agent_servers = proxy
        .as_ref()
        .map_or_else(|| servers.clone(), |p| p.fronts());
    if let Some(p) = &proxy {
        eprintln!("loadgen: proxy fronts {:?}", p.fronts());
    }
    let mut fleet = match (args.real_agents, &cluster) {
        (0, _) | (_, None) => None,
        (n, Some(_)) => Some(fleet::Fleet::spawn(
            args.unid_bin
                .as_deref()
                .context("--real-agents needs --unid-bin")?,
            tmp.path(),
            n,
            agent_servers.clone(),
            &args.sequence,
            args.refill_period_ms,
            uid_base.map(|b| b + 16),
            &mut given,
        )?),
    };
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
        consumed: AtomicU64::new(0),
    });
    let cfg = AgentConfig {
        servers: agent_servers.clone(),
        sequence: args.sequence.clone(),
        count: args.count,
        window: args.window,
        rate_per_s: args.rate / args.agents.max(1) as f64,
        rto_ms: args.rto_ms,
        faults: Faults {
            drop: args.drop,
            duplicate: args.duplicate,
            reorder: args.reorder,
            corrupt: args.corrupt,
        },
        seed: args.seed,
        bucket_ms,
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
    let mut consumer_handles = Vec::new();
    if let Some(f) = &fleet {
        for a in &f.agents {
            for _ in 0..args.consumers_per_agent {
                let c = consumer::ConsumerConfig {
                    index: consumer_handles.len() as u32,
                    agent: a.index,
                    sequence: args.sequence.clone(),
                    ring_dir: a.ring_dir.clone(),
                    socket: a.socket,
                    agent_uid: a.uid,
                    rate_per_s: args.consumer_rate,
                    bucket_ms,
                };
                let sh = shared.clone();
                consumer_handles.push(
                    std::thread::Builder::new()
                        .name(format!("consumer-{}", c.index))
                        .spawn(move || consumer::run(c, sh))
                        .context("spawn a consumer thread")?,
                );
            }
        }
    }

    // Progress, nemesis, and waiting for the agents and consumers.
    let mut nem = nemesis::Nemesis::new(kinds.clone(), args.seed, args.every_ms, start);
    let seen: Vec<SocketAddr> = agent_servers.clone();
    let seen_addr = move |id: u64| seen[(id as usize).saturating_sub(1).min(seen.len() - 1)];
    let mut notes: Vec<String> = Vec::new();
    let mut next_progress = start + Duration::from_secs(1);
    let (mut last_grants, mut last_ids, mut last_consumed) = (0u64, 0u64, 0u64);
    loop {
        let now = Instant::now();
        if handles.iter().all(|h| h.is_finished())
            && consumer_handles.iter().all(|h| h.is_finished())
        {
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
            if let Some(f) = fleet.as_mut() {
                for (i, st) in f.exited() {
                    let note = format!(
                        "real agent {i} exited on its own ({st}) at {:.3} s; last log lines:\n{}",
                        now.duration_since(start).as_secs_f64(),
                        f.log_tail(i, 10)
                    );
                    eprintln!("loadgen: {note}");
                    notes.push(note);
                }
            }
            let mut ctx = nemesis::Ctx {
                cluster: c,
                fleet: fleet.as_mut(),
                proxy: proxy.as_ref().map(|p| (p, args.proxy_faults())),
                rules: rules.as_mut().map_err(|e| e.clone()),
                seen_addr: &seen_addr,
                server_clocks,
                notes: &mut notes,
            };
            if shared.abort.load(Ordering::Relaxed) {
                nem.heal(now, &mut ctx);
            } else {
                nem.tick(now, stop_issuing_at, &mut ctx);
            }
        }
        if now >= next_progress {
            let g = shared.grants.load(Ordering::Relaxed);
            let ids = shared.ids.load(Ordering::Relaxed);
            let consumed = shared.consumed.load(Ordering::Relaxed);
            let requests = shared
                .requests
                .load(Ordering::Relaxed)
                .min(shared.requests_max);
            eprintln!(
                "loadgen: t={:>5.1}s grants/s={:>8} ids/s={:>10} next/s={:>7} requests={} \
                 grants={} outstanding={} errors={} resends={}",
                now.duration_since(start).as_secs_f64(),
                g - last_grants,
                ids - last_ids,
                consumed - last_consumed,
                requests,
                g,
                requests.saturating_sub(g),
                shared.errors.load(Ordering::Relaxed),
                shared.retransmits.load(Ordering::Relaxed),
            );
            (last_grants, last_ids, last_consumed) = (g, ids, consumed);
            next_progress += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ended = Instant::now();
    if let Some(c) = cluster.as_mut() {
        let mut ctx = nemesis::Ctx {
            cluster: c,
            fleet: fleet.as_mut(),
            proxy: proxy.as_ref().map(|p| (p, args.proxy_faults())),
            rules: rules.as_mut().map_err(|e| e.clone()),
            seen_addr: &seen_addr,
            server_clocks,
            notes: &mut notes,
        };
        nem.heal(ended, &mut ctx);
    }
    let results: Vec<AgentResult> = handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("an agent thread panicked"))
        })
        .collect::<anyhow::Result<_>>()?;
    let consumers: Vec<consumer::ConsumerResult> = consumer_handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("a consumer thread panicked"))
        })
        .collect::<anyhow::Result<_>>()?;
    let proxy_stats = proxy.as_ref().map(report::ProxyReport::of);
    let wire_grants = proxy.map(|p| p.finish());
    let real_agent_names: Vec<String> = fleet
        .as_ref()
        .map(|f| {
            f.agents
                .iter()
                .map(|a| fleet::agent_name(a.index))
                .collect()
        })
        .unwrap_or_default();
    let agent_starts: Vec<u32> = fleet
        .as_ref()
        .map(|f| f.agents.iter().map(|a| a.starts).collect())
        .unwrap_or_default();
    let input = report::Input {
        width,
        results,
        consumers,
        wire_grants,
        faults: nem.faults.clone(),
        issuing_end: stop_issuing_at.min(ended),
        start,
        bucket_ms,
        proxy: proxy_stats,
        agent_starts,
        real_agents: args.real_agents,
        real_agent_names,
    };
    let summary = report::Summary::new(&args, input);
    let plots = match &args.report {
        Some(path) => plot::write(path, &summary)?,
        None => Vec::new(),
    };
    let report = summary.markdown(&command, &args, &notes, &plots);
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
            "loadgen: FAILED: {} server or agent problem(s), see the report",
            notes.len()
        );
    }
    if let Ok(r) = rules.as_mut()
        && let Err(e) = r.clear()
    {
        eprintln!("loadgen: removing the partition rules: {e:#}");
    }
    drop(fleet.take());
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
