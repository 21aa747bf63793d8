//! `loadgen --batched`: the many-agent run ([`crate::mux`]) against spawned servers, given
//! servers or the echo peer, with the server's (or echo peer's) CPU time per answer and
//! memory, and its own short report.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::Args;
use crate::cluster::Cluster;
use crate::echo::EchoPeer;
use crate::mux::{self, MuxConfig, MuxShared, MuxSummary, MuxThread};
use crate::sys;

/// What the server side is: a spawned server (its pid and id) or the echo peer.
pub enum Peer<'a> {
    /// A spawned cluster; the leader is measured.
    Cluster(&'a Cluster, u64),
    /// The in-process echo peer.
    Echo(&'a EchoPeer),
    /// Servers loadgen did not start: nothing to measure on their side.
    External,
}

/// Figures of the peer side at one moment.
#[derive(Clone, Copy, Default)]
struct PeerSample {
    cpu_ns: u64,
    rss: u64,
    data: u64,
    answered: u64,
}

fn sample(peer: &Peer<'_>) -> PeerSample {
    match peer {
        Peer::Cluster(c, id) => {
            let pid = c.pid(*id);
            PeerSample {
                cpu_ns: pid
                    .and_then(|p| sys::cpu_ns(&format!("/proc/{p}/stat")))
                    .unwrap_or(0),
                rss: pid.and_then(sys::rss_bytes).unwrap_or(0),
                data: c.data_bytes(*id),
                answered: 0,
            }
        }
        Peer::Echo(e) => PeerSample {
            cpu_ns: e.cpu_ns(),
            rss: 0,
            data: 0,
            answered: e.answered(),
        },
        Peer::External => PeerSample::default(),
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// Runs the batched agents; returns the report and whether the checks passed.
pub fn run(
    args: &Args,
    servers: Vec<SocketAddr>,
    peer: Peer<'_>,
    command: &str,
    interrupted: &AtomicBool,
) -> anyhow::Result<(String, bool)> {
    let n = args.agents;
    let threads = args.mux_threads.clamp(1, n.max(1));
    let sockets = args
        .sockets_per_thread
        .clamp(1, mux::SOCKETS_PER_THREAD_MAX);
    let start = Instant::now();
    let shared = Arc::new(MuxShared {
        start,
        abort: AtomicBool::new(false),
        registered: AtomicU64::new(0),
        measure_start_us: AtomicU64::new(0),
        measure_end_us: AtomicU64::new(0),
        drain_us: (args.drain_s * 1e6) as u64,
        grants: AtomicU64::new(0),
    });
    let incarnation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1)
        * 1000;
    let before = sample(&peer);
    let mut handles = Vec::new();
    let per = n.div_ceil(threads);
    for t in 0..threads {
        let first = t * per;
        let count = per.min(n.saturating_sub(first));
        if count == 0 {
            break;
        }
        let cfg = MuxConfig {
            servers: servers.clone(),
            sequence: args.sequence.clone(),
            count: args.count,
            window: args.window,
            inflight_max: (args.inflight_max / threads).max(1),
            rate_per_s: args.rate / threads as f64,
            rto_ms: args.rto_ms,
            first_agent: first as u32,
            agents: count as u32,
            sockets: sockets.min(count),
            first_socket: t * sockets,
            incarnation,
            cpu: args.client_cpu,
            hello_rate_per_s: args.hello_rate / threads as f64,
        };
        let th = MuxThread::new(cfg, shared.clone())?;
        handles.push(
            std::thread::Builder::new()
                .name(format!("mux-{t}"))
                .spawn(move || th.run())
                .context("spawn a mux thread")?,
        );
    }
    // Registration.
    let reg_deadline = start + Duration::from_secs_f64(args.register_timeout_s);
    let mut next_progress = start + Duration::from_secs(1);
    while shared.registered.load(Ordering::Relaxed) < n as u64 {
        let now = Instant::now();
        if now >= reg_deadline || interrupted.load(Ordering::Relaxed) {
            shared.abort.store(true, Ordering::Relaxed);
            for h in handles {
                let _ = h.join();
            }
            anyhow::bail!(
                "only {} of {n} agents registered within {} s",
                shared.registered.load(Ordering::Relaxed),
                args.register_timeout_s
            );
        }
        if now >= next_progress {
            eprintln!(
                "loadgen: registering: {} of {n} agents",
                shared.registered.load(Ordering::Relaxed)
            );
            next_progress += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let registered_at = start.elapsed();
    let after_reg = sample(&peer);
    // Warm up, then the window.
    let ms = start.elapsed() + Duration::from_secs_f64(args.warmup_s);
    let me = ms + Duration::from_secs_f64(args.duration_s);
    shared
        .measure_end_us
        .store(me.as_micros() as u64, Ordering::Relaxed);
    shared
        .measure_start_us
        .store(ms.as_micros() as u64, Ordering::Relaxed);
    while start.elapsed() < ms {
        std::thread::sleep(Duration::from_millis(1));
    }
    let w0 = sample(&peer);
    let g0 = shared.grants.load(Ordering::Relaxed);
    let mut next_progress = Instant::now() + Duration::from_secs(1);
    let mut last = g0;
    while start.elapsed() < me {
        if interrupted.load(Ordering::Relaxed) {
            shared.abort.store(true, Ordering::Relaxed);
            break;
        }
        if Instant::now() >= next_progress {
            let g = shared.grants.load(Ordering::Relaxed);
            eprintln!("loadgen: grants/s={}", g - last);
            last = g;
            next_progress += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let w1 = sample(&peer);
    let results: Vec<_> = handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("a mux thread panicked"))
        })
        .collect::<anyhow::Result<_>>()?;
    let end = sample(&peer);
    let mut s = MuxSummary::new(results);
    if matches!(peer, Peer::Echo(_)) {
        // The echo peer's threads share one counter and answer in any order: it promises
        // no increasing blocks per agent (a server does, per agent, in the order it grants).
        s.not_increasing = 0;
    }
    let window_s = args.duration_s;
    let grants_per_s = s.grants as f64 / window_s;
    let mut o = String::new();
    let passed = s.passed();
    let _ = writeln!(
        o,
        "# loadgen batched report: {}\n",
        if passed { "PASSED" } else { "FAILED" }
    );
    let _ = writeln!(o, "```sh\n{command}\n```\n");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let _ = writeln!(
        o,
        "- Machine: `nproc` = {}, load average at the end {}.",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let pin = |c: Option<usize>| c.map_or_else(|| "not pinned".to_owned(), |c| format!("CPU {c}"));
    let _ = writeln!(
        o,
        "- Pinning: {} on {}, loadgen's agent threads on {}.",
        match peer {
            Peer::Cluster(..) => "the server's UDP shard (its Raft threads unpinned)",
            Peer::Echo(_) => "the echo peer's threads",
            Peer::External => "the servers (not started here)",
        },
        pin(args.server_cpu),
        pin(args.client_cpu)
    );
    let _ = writeln!(
        o,
        "- Settings: {n} agents (each registered: own Hello, node id, seqs) on {threads} thread(s) x {} socket(s), window {} per agent, at most {} in flight in all, {} ids per request, rate {}, measured {window_s:.1} s after {:.1} s of warm-up; Hellos (retries too) paced at {}/s in all, all registered {:.2} s after the start.\n",
        sockets.min(n),
        args.window,
        args.inflight_max,
        args.count,
        if args.rate > 0.0 {
            format!("{} requests/s in all", args.rate)
        } else {
            "as fast as the windows allow".to_owned()
        },
        args.warmup_s,
        args.hello_rate,
        registered_at.as_secs_f64()
    );
    let _ = writeln!(o, "### Throughput\n");
    let _ = writeln!(o, "| requests | granted | grants/s | ids granted | ids/s |");
    let _ = writeln!(o, "|---|---|---|---|---|");
    let _ = writeln!(
        o,
        "| {} | {} | {:.0} | {} | {:.0} |\n",
        s.requests,
        s.grants,
        grants_per_s,
        s.ids,
        s.ids as f64 / window_s
    );
    crate::report::latency_table(
        &mut o,
        "### Latency (first send → grant, µs)",
        &s.latency_us,
    );
    let mut per = s.grants_per_agent.clone();
    per.sort_unstable();
    let min = per.first().copied().unwrap_or(0);
    let median = per.get(per.len() / 2).copied().unwrap_or(0);
    let _ = writeln!(o, "### Fairness (grants per agent in the window)\n");
    let _ = writeln!(
        o,
        "| agents | slowest | median | fastest | median ÷ slowest |\n|---|---|---|---|---|"
    );
    let _ = writeln!(
        o,
        "| {} | {} | {} | {} | {} |\n",
        per.len(),
        min,
        median,
        per.last().copied().unwrap_or(0),
        if min > 0 {
            format!("{:.2}", median as f64 / min as f64)
        } else {
            "inf (an agent got nothing)".to_owned()
        }
    );
    let peer_cpu = w1.cpu_ns.saturating_sub(w0.cpu_ns);
    let answers = match peer {
        Peer::Echo(_) => w1.answered.saturating_sub(w0.answered),
        _ => s.grants,
    };
    let _ = writeln!(o, "### Peer side\n");
    let _ = writeln!(o, "| figure | value |\n|---|---|");
    if !matches!(peer, Peer::External) {
        let _ = writeln!(
            o,
            "| CPU time in the window (ms) | {:.0} |",
            peer_cpu as f64 / 1e6
        );
        let _ = writeln!(o, "| answers in the window | {answers} |");
        let _ = writeln!(
            o,
            "| cpu_per_answer_ns | {:.0} |",
            if answers > 0 {
                peer_cpu as f64 / answers as f64
            } else {
                0.0
            }
        );
    }
    if let Peer::Cluster(..) = peer {
        let _ = writeln!(
            o,
            "| RSS before the agents (MiB) | {:.1} |",
            mib(before.rss)
        );
        let _ = writeln!(
            o,
            "| RSS with all registered (MiB) | {:.1} |",
            mib(after_reg.rss)
        );
        let _ = writeln!(o, "| RSS at the end (MiB) | {:.1} |", mib(end.rss));
        let per_agent = end.rss.max(after_reg.rss).saturating_sub(before.rss) as f64 / n as f64;
        let _ = writeln!(o, "| rss_per_agent_bytes | {per_agent:.0} |");
        let _ = writeln!(
            o,
            "| data dir before / after registration / end (KiB) | {:.0} / {:.0} / {:.0} |",
            before.data as f64 / 1024.0,
            after_reg.data as f64 / 1024.0,
            end.data as f64 / 1024.0
        );
        let _ = writeln!(
            o,
            "| data_per_agent_bytes (registration) | {:.0} |",
            after_reg.data.saturating_sub(before.data) as f64 / n as f64
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "### Client side\n");
    let _ = writeln!(o, "| figure | value |\n|---|---|");
    let _ = writeln!(
        o,
        "| recvmmsg calls / datagrams / mean batch | {} / {} / {:.1} |",
        s.recv_calls,
        s.recv_datagrams,
        s.recv_datagrams as f64 / s.recv_calls.max(1) as f64
    );
    let _ = writeln!(
        o,
        "| sendmmsg calls / datagrams / mean batch | {} / {} / {:.1} |",
        s.send_calls,
        s.send_datagrams,
        s.send_datagrams as f64 / s.send_calls.max(1) as f64
    );
    if let Peer::Echo(e) = peer {
        let (rc, sc) = e.calls();
        let _ = writeln!(
            o,
            "| echo peer: recvmmsg / sendmmsg calls, mean answers per sendmmsg | {rc} / {sc} / {:.1} |",
            e.answered() as f64 / sc.max(1) as f64
        );
    }
    let _ = writeln!(
        o,
        "| client CPU in the window (ms) | {:.0} |",
        s.cpu_ns as f64 / 1e6
    );
    let _ = writeln!(o, "| registrations | {} |", s.registrations);
    let _ = writeln!(o, "| retransmits | {} |", s.retransmits);
    let _ = writeln!(o, "| unanswered at the end | {} |", s.unanswered);
    for (code, &k) in s.errors.iter().enumerate() {
        if k > 0 {
            let _ = writeln!(o, "| Error code {code} | {k} |");
        }
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "### Checks\n\n| check | result |\n|---|---|\n| no id granted twice ({} blocks) | {} overlapping |\n| each agent's blocks increase (not checked for the echo peer) | {} not above the previous |\n",
        s.blocks, s.overlaps, s.not_increasing
    );
    Ok((o, passed))
}
