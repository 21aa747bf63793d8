//! The summary of a run (merged from the simulated agents, the consumers, the proxy and the
//! nemesis), every check on it, and its markdown report.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use hdrhistogram::Histogram;
use unid_loadgen::checker::{self, Failover, Grant, Run, Unanswered, Verdict};
use unid_proto::{ErrorCode, Id, Width};

use crate::Args;
use crate::agent::{self, AVAILABILITY_US, AgentResult, ERROR_CODES};
use crate::consumer::{self, ConsumerResult};
use crate::nemesis::{Fault, Kind};
use crate::series::Series;

/// A latency table under `heading`: how many were answered, p50, p99, p99.9 and max of `h`.
pub(crate) fn latency_table(o: &mut String, heading: &str, h: &Histogram<u64>) {
    let _ = writeln!(o, "{heading}\n");
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
}

/// Failover targets from the issue: median and worst time to the new leader's first grant,
/// and the longest `next()` wait during a leader failover.
pub const FAILOVER_MEDIAN_TARGET_MS: f64 = 300.0;
/// See [`FAILOVER_MEDIAN_TARGET_MS`].
pub const FAILOVER_WORST_TARGET_MS: f64 = 1_000.0;
/// See [`FAILOVER_MEDIAN_TARGET_MS`].
pub const NEXT_WAIT_TARGET_MS: f64 = 10.0;

/// The proxy's counters at the end.
pub struct ProxyReport {
    forwarded: u64,
    faults: [u64; 5],
    rewritten: u64,
    refused: u64,
    base: crate::proxy::ProxyFaults,
}

impl ProxyReport {
    /// Reads `p`'s counters.
    pub fn of(p: &crate::proxy::Proxy) -> ProxyReport {
        let s = p.stats();
        ProxyReport {
            forwarded: s.forwarded.load(Ordering::Relaxed),
            faults: std::array::from_fn(|i| s.faults[i].load(Ordering::Relaxed)),
            rewritten: s.rewritten.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
            base: p.faults(),
        }
    }
}

/// What `main` hands over at the end.
pub struct Input {
    /// The sequence's width.
    pub width: Width,
    /// The simulated agents'.
    pub results: Vec<AgentResult>,
    /// The ring consumers'.
    pub consumers: Vec<ConsumerResult>,
    /// Every grant the servers sent through the proxy, if it ran, and the proxy clients'
    /// names.
    pub wire_grants: Option<(Vec<Grant>, std::collections::HashMap<u32, String>)>,
    /// The nemesis' faults.
    pub faults: Vec<Fault>,
    /// When the issuing ended.
    pub issuing_end: Instant,
    /// When the run started.
    pub start: Instant,
    /// Width of the series' buckets.
    pub bucket_ms: u64,
    /// The proxy's counters.
    pub proxy: Option<ProxyReport>,
    /// How often each real agent was started.
    pub agent_starts: Vec<u32>,
    /// `--real-agents`.
    pub real_agents: usize,
    /// The names the real agents register with, by index.
    pub real_agent_names: Vec<String>,
}

/// Per fault, what the report says about it.
pub struct FaultOutcome {
    /// The fault.
    pub fault: Fault,
    /// For a failover: µs from the fault to the first grant by another server.
    pub failover_us: Option<u64>,
    /// Longest `next()` wait from the fault to the next one (µs).
    pub next_wait_max_us: u64,
    /// Ids granted and never used, charged to it.
    pub ids_unused: Id,
    /// Ids never granted (gaps), charged to it.
    pub ids_never_granted: Id,
}

/// Everything the report says.
pub struct Summary {
    /// Every check together.
    pub verdict: Verdict,
    grants_verdict: Verdict,
    consumers_verdict: Verdict,
    wire_verdict: Option<Verdict>,
    failover_verdict: Verdict,
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
    faults_injected: [u64; 4],
    answered_twice: u64,
    issuing_s: f64,
    longest_gap_us: (u64, u64),
    /// Per fault.
    pub outcomes: Vec<FaultOutcome>,
    /// Lost ids charged to no fault (left in rings or in flight at the end).
    lost_at_end: (Id, Id),
    lost_known: bool,
    /// Grants over time (simulated agents).
    pub grant_series: Series,
    /// `next()` over time (all consumers).
    pub next_series: Series,
    next_wait_ns: Histogram<u64>,
    consumers: usize,
    ids_consumed: Id,
    consumer_errors: std::collections::BTreeMap<String, u64>,
    consumer_panics: Vec<String>,
    consumers_full: usize,
    first_id_us_max: Option<u64>,
    waiting_at_end: Vec<(u32, u64)>,
    /// Every wait of at least `consumer::LONG_WAIT_US`, (began, wait) in µs, sorted.
    long_waits: Vec<(u64, u64)>,
    proxy: Option<ProxyReport>,
    agent_starts: Vec<u32>,
    real_agents: usize,
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

impl Summary {
    /// Merges and checks.
    pub fn new(args: &Args, input: Input) -> Summary {
        let Input {
            width,
            results,
            consumers,
            wire_grants,
            faults,
            issuing_end,
            start,
            bucket_ms,
            proxy,
            agent_starts,
            real_agents,
            real_agent_names,
        } = input;
        let mut latency_us = Histogram::new_with_bounds(1, agent::LATENCY_US_MAX, 3)
            .expect("valid histogram bounds");
        let mut next_wait_ns = Histogram::new_with_bounds(1, consumer::WAIT_NS_MAX, 3)
            .expect("valid histogram bounds");
        let mut grants: Vec<Grant> = Vec::new();
        let mut unanswered = Vec::new();
        let mut s = Summary {
            verdict: Verdict::default(),
            grants_verdict: Verdict::default(),
            consumers_verdict: Verdict::default(),
            wire_verdict: None,
            failover_verdict: Verdict::default(),
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
            faults_injected: [0; 4],
            answered_twice: 0,
            issuing_s: issuing_end.duration_since(start).as_secs_f64().max(1e-3),
            longest_gap_us: (0, 0),
            outcomes: Vec::new(),
            lost_at_end: (0, 0),
            lost_known: false,
            grant_series: Series::new(bucket_ms),
            next_series: Series::new(bucket_ms),
            next_wait_ns: next_wait_ns.clone(),
            consumers: consumers.len(),
            ids_consumed: 0,
            consumer_errors: Default::default(),
            consumer_panics: Vec::new(),
            consumers_full: 0,
            first_id_us_max: None,
            waiting_at_end: Vec::new(),
            long_waits: Vec::new(),
            proxy,
            agent_starts,
            real_agents,
        };
        for r in results {
            let _ = latency_us.add(&r.latency_us);
            s.grant_series.merge(&r.series);
            grants.extend(r.grants);
            unanswered.extend(r.unanswered);
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
            for (a, b) in s.faults_injected.iter_mut().zip(r.faults) {
                *a += b;
            }
        }
        let mut runs: Vec<Vec<Run>> = Vec::new();
        for c in consumers {
            let _ = next_wait_ns.add(&c.wait_ns);
            s.next_series.merge(&c.series);
            s.ids_consumed += c.runs.iter().map(|r| Id::from(r.count)).sum::<Id>();
            for (k, n) in c.errors {
                *s.consumer_errors.entry(k).or_default() += n;
            }
            s.consumer_panics.extend(c.panics);
            s.consumers_full += usize::from(c.full);
            s.first_id_us_max = s.first_id_us_max.max(c.first_id_us);
            s.long_waits.extend(&c.long_waits);
            if let Some(w) = c.waiting_at_end_us {
                s.waiting_at_end.push((c.cfg.index, w));
            }
            if c.first_id_us.is_none() {
                s.consumer_panics.push(format!(
                    "consumer {} (agent {}) never received an id",
                    c.cfg.index, c.cfg.agent
                ));
            }
            runs.push(c.runs);
        }
        s.latency_us = latency_us;
        s.next_wait_ns = next_wait_ns;
        s.long_waits.sort_unstable();

        // The checks.
        s.grants_verdict = checker::check(width, &mut grants, &unanswered);
        s.unanswered = unanswered;
        s.consumers_verdict = checker::check_consumers(width, &grants, &runs);
        let requests_granted: std::collections::HashSet<(u32, u64)> =
            grants.iter().map(|g| (g.agent, g.seq)).collect();
        s.answered_twice = s.grants_verdict.grants - requests_granted.len() as u64;
        let (mut wire, names) = match wire_grants {
            Some((w, n)) => (Some(w), n),
            None => (None, Default::default()),
        };
        if let Some(w) = wire.as_mut() {
            s.wire_verdict = Some(checker::check(width, w, &[]));
        }

        // Arrival times of every grant: the simulated agents' and, through the proxy, the
        // real agents'.
        let mut times: Vec<(u64, SocketAddr)> = grants.iter().map(|g| (g.t_us, g.from)).collect();
        if let Some(w) = &wire {
            times.extend(w.iter().map(|g| (g.t_us, g.from)));
        }
        times.sort_unstable();
        let issuing_end_us = (args.duration_s * 1e6) as u64;
        let sim_times: Vec<u64> = {
            let mut t: Vec<u64> = grants.iter().map(|g| g.t_us).collect();
            t.sort_unstable();
            t
        };
        if let Some(last) = sim_times.last().copied()
            && last < issuing_end_us
            && args.requests_max.is_some()
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

        // Per fault: failover time, longest next() wait, lost ids.
        let ran: Vec<&Fault> = faults.iter().filter(|f| f.skipped.is_none()).collect();
        let faults_us: Vec<u64> = ran.iter().map(|f| f.t_us).collect();
        let spans: Vec<checker::FaultSpan> = ran
            .iter()
            .map(|f| checker::FaultSpan {
                start_us: f.t_us,
                heal_us: f.healed_us.unwrap_or(u64::MAX),
                agents_killed: f.agents_killed.clone(),
            })
            .collect();
        let mut used: Vec<(Id, Id)> = grants.iter().map(|g| (g.first, g.end())).collect();
        used.extend(runs.iter().flatten().map(|r| (r.first, r.end())));
        // Which real agent each proxy client is (by the name in its Hello).
        let real_agent_of = |client: u32| {
            names
                .get(&client)
                .and_then(|n| real_agent_names.iter().position(|r| r == n))
        };
        let granted: Vec<(Grant, Option<usize>)> = match &wire {
            Some(w) => w.iter().map(|g| (*g, real_agent_of(g.agent))).collect(),
            None => grants.iter().map(|g| (*g, None)).collect(),
        };
        s.lost_known = wire.is_some() || real_agents == 0;
        let (unused, never) = if s.lost_known {
            checker::lost_per_fault(&granted, &mut used, &spans)
        } else {
            (vec![0; faults_us.len() + 1], vec![0; faults_us.len() + 1])
        };
        s.lost_at_end = (unused[faults_us.len()], never[faults_us.len()]);
        let mut failovers = Vec::new();
        let mut ran_i = 0usize;
        for f in &faults {
            let mut o = FaultOutcome {
                fault: f.clone(),
                failover_us: None,
                next_wait_max_us: 0,
                ids_unused: 0,
                ids_never_granted: 0,
            };
            if f.skipped.is_none() {
                let until = faults_us.get(ran_i + 1).copied().unwrap_or(issuing_end_us);
                // Waits that began in [fault, next fault): exact for the long ones; the
                // series (100 ms buckets) only says something when all were short.
                let long = s
                    .long_waits
                    .iter()
                    .filter(|(b, _)| *b >= f.t_us && *b < until)
                    .map(|(_, w)| *w)
                    .max();
                o.next_wait_max_us = long.unwrap_or_else(|| {
                    s.next_series
                        .max_between(f.t_us, until)
                        .min(consumer::LONG_WAIT_US - 1)
                });
                o.ids_unused = unused[ran_i];
                o.ids_never_granted = never[ran_i];
                if f.kind.is_failover() {
                    // After a restart of everything, the first grant after the restart, from
                    // any server; else the first from another server than the old leader.
                    let all = f.kind == Kind::RestartAll;
                    let after = if all {
                        f.healed_us.unwrap_or(f.t_us)
                    } else {
                        f.t_us
                    };
                    o.failover_us = times
                        .iter()
                        .find(|(t, from)| *t > after && (all || Some(*from) != f.old_leader))
                        .map(|(t, _)| t - f.t_us);
                    failovers.push(Failover {
                        fault_us: f.t_us,
                        new_first_grant_us: o.failover_us.map(|d| f.t_us + d),
                    });
                }
                ran_i += 1;
            }
            s.outcomes.push(o);
        }
        s.failover_verdict = checker::check_failovers(&grants, &failovers);

        let mut v = Verdict {
            grants: s.grants_verdict.grants,
            ids: s.grants_verdict.ids,
            ..Verdict::default()
        };
        v.merge_violations(&s.grants_verdict);
        v.merge_violations(&s.consumers_verdict);
        if let Some(w) = &s.wire_verdict {
            v.merge_violations(w);
        }
        v.merge_violations(&s.failover_verdict);
        for p in &s.consumer_panics {
            v.merge_violations(&Verdict {
                violations: 1,
                described: vec![p.clone()],
                ..Verdict::default()
            });
        }
        s.verdict = v;
        s
    }

    /// The markdown report. `plots` are the SVG files' names, beside the report.
    pub fn markdown(
        &self,
        command: &str,
        args: &Args,
        notes: &[String],
        plots: &[String],
    ) -> String {
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
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let verdict = if self.verdict.passed() && notes.is_empty() {
            "PASSED"
        } else {
            "FAILED"
        };
        let _ = writeln!(o, "# loadgen report: {verdict}\n");
        let _ = writeln!(o, "```sh\n{command}\n```\n");
        let _ = writeln!(
            o,
            "- Machine: `nproc` = {nproc}, CPU {cpu}, kernel {kernel}, load average at the end \
             {load}."
        );
        let kinds: Vec<String> = args.nemesis.iter().map(|k| k.name()).collect();
        let _ = writeln!(
            o,
            "- Settings: {} simulated agents × window {}, {} ids per request, rate {}, issuing \
             {:.1} s (requests max {}), drain {:.1} s, first RTO {} ms, sequence `{}` width {}, \
             nemesis {} (seed {}, every {} ms), in-agent datagram faults each way: drop {}, \
             duplicate {}, reorder {}, corrupt {}.",
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
            kinds.join(","),
            args.seed,
            args.every_ms,
            args.drop,
            args.duplicate,
            args.reorder,
            args.corrupt,
        );
        if self.real_agents > 0 {
            let _ = writeln!(
                o,
                "- Real agents: {} `unid agent` processes (refill period {} ms), {} ring \
                 consumer(s) each at {} ids/s.",
                self.real_agents,
                args.refill_period_ms,
                args.consumers_per_agent,
                if args.consumer_rate > 0.0 {
                    format!("{}", args.consumer_rate)
                } else {
                    "as many as possible".into()
                }
            );
        }
        if let Some(p) = &self.proxy {
            let b = &p.base;
            let _ = writeln!(
                o,
                "- Proxy between every agent and the servers: drop {}, duplicate {}, reorder {}, \
                 delay {} (~{} ms), corrupt {} per datagram each way (a `proxy` fault raises \
                 them for a while).",
                b.drop, b.duplicate, b.reorder, b.delay, b.delay_ms, b.corrupt
            );
        }
        let _ = writeln!(o);
        for p in plots {
            let _ = writeln!(o, "![{p}]({p})\n");
        }
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
            self.grants_verdict.ids,
            self.grants_verdict.ids as f64 / self.issuing_s
        );
        let _ = writeln!(
            o,
            "Rates are over the issuing period ({:.2} s; up to the last grant if that came \
             earlier); grants answered during the drain count too.\n",
            self.issuing_s
        );
        latency_table(
            &mut o,
            "## Latency (first send → answer, µs)",
            &self.latency_us,
        );
        if self.consumers > 0 {
            let w = &self.next_wait_ns;
            let _ = writeln!(o, "## Ring consumers: `next()` wait (µs)\n");
            let _ = writeln!(
                o,
                "| consumers | ids taken | ids/s | p50 | p99 | p99.9 | max |"
            );
            let _ = writeln!(o, "|---|---|---|---|---|---|---|");
            let us = |ns: u64| format!("{:.1}", ns as f64 / 1e3);
            let _ = writeln!(
                o,
                "| {} | {} | {:.0} | {} | {} | {} | {} |\n",
                self.consumers,
                self.ids_consumed,
                self.ids_consumed as f64 / self.issuing_s,
                us(w.value_at_quantile(0.5)),
                us(w.value_at_quantile(0.99)),
                us(w.value_at_quantile(0.999)),
                us(w.max())
            );
            let _ = writeln!(
                o,
                "A wait runs from the first `next()` call for an id to the id, errors and retries \
                 included (a consumer whose agent is down waits until it is back). The first id \
                 of each consumer is left out (it waits for the agent to register): it came at \
                 most {:.3} s after the start. Agent starts: {:?}. Consumer errors (each retried \
                 after 2 ms): {}.\n",
                self.first_id_us_max.unwrap_or(0) as f64 / 1e6,
                self.agent_starts,
                if self.consumer_errors.is_empty() {
                    "none".to_owned()
                } else {
                    self.consumer_errors
                        .iter()
                        .map(|(k, n)| format!("{k} {n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
            for (c, w) in &self.waiting_at_end {
                let _ = writeln!(
                    o,
                    "Consumer {c} was still waiting in `next()` when the issuing ended (for {:.1} \
                     ms; not in the figures above).\n",
                    *w as f64 / 1e3
                );
            }
            if self.consumers_full > 0 {
                let _ = writeln!(
                    o,
                    "{} consumer(s) stopped early: they reached {} runs of ids.\n",
                    self.consumers_full,
                    consumer::RUNS_MAX
                );
            }
        }
        let _ = writeln!(
            o,
            "## Availability (fraction of block requests answered within)\n"
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
        let mut rows: Vec<(String, u64)> = vec![
            (
                "retransmits after a timeout (same seq)".into(),
                self.retransmits,
            ),
            (
                "resends to another server (redirect, silence, registration)".into(),
                self.redirect_resends,
            ),
            (
                "retries after NotReady/RateLimited/Internal".into(),
                self.error_retries,
            ),
            ("NotLeader redirects followed".into(), self.redirects),
            ("LeaderChange followed".into(), self.leader_changes),
            ("registrations (Welcome)".into(), self.registrations),
            (
                "switches to the next server after silence".into(),
                self.rotations,
            ),
            ("requests ended by a final error".into(), self.failed),
            (
                "requests granted two different blocks (ids wasted, not repeated)".into(),
                self.answered_twice,
            ),
            (
                "socket errors (ICMP unreachable)".into(),
                self.socket_errors,
            ),
            ("undecodable datagrams".into(), self.undecodable),
            ("faults injected: dropped".into(), self.faults_injected[0]),
            (
                "faults injected: duplicated".into(),
                self.faults_injected[1],
            ),
            ("faults injected: reordered".into(), self.faults_injected[2]),
            ("faults injected: corrupted".into(), self.faults_injected[3]),
        ];
        if let Some(p) = &self.proxy {
            rows.push(("proxy: datagrams forwarded".into(), p.forwarded));
            for (i, what) in ["dropped", "duplicated", "reordered", "delayed", "corrupted"]
                .iter()
                .enumerate()
            {
                rows.push((format!("proxy: {what}"), p.faults[i]));
            }
            rows.push((
                "proxy: answers with server addresses rewritten".into(),
                p.rewritten,
            ));
            rows.push(("proxy: clients refused (too many)".into(), p.refused));
        }
        for (what, n) in rows {
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
        if !self.outcomes.is_empty() {
            let _ = writeln!(o, "## Nemesis\n");
            let _ = writeln!(
                o,
                "| # | kind | at (s) | target | term | healed at (s) | fault → first grant by \
                 another server (ms) | longest next() wait (ms) | ids granted, never used | ids \
                 never granted |"
            );
            let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|");
            for (i, x) in self.outcomes.iter().enumerate() {
                let f = &x.fault;
                if let Some(why) = &f.skipped {
                    let _ = writeln!(
                        o,
                        "| {} | {} | {:.3} | SKIPPED: {why} | - | - | - | - | - | - |",
                        i + 1,
                        f.kind.name(),
                        f.t_us as f64 / 1e6
                    );
                    continue;
                }
                let lost = |n: Id| {
                    if self.lost_known {
                        n.to_string()
                    } else {
                        "?".into()
                    }
                };
                let _ = writeln!(
                    o,
                    "| {} | {} | {:.3} | {} | {} | {} | {} | {} | {} | {} |",
                    i + 1,
                    f.kind.name(),
                    f.t_us as f64 / 1e6,
                    f.target,
                    f.term,
                    f.healed_us
                        .map_or_else(|| "-".to_owned(), |t| format!("{:.3}", t as f64 / 1e6)),
                    if f.kind.is_failover() {
                        x.failover_us
                            .map_or_else(|| "none".to_owned(), |u| format!("{:.1}", u as f64 / 1e3))
                    } else {
                        "-".into()
                    },
                    if self.consumers > 0 {
                        format!("{:.1}", x.next_wait_max_us as f64 / 1e3)
                    } else {
                        "-".into()
                    },
                    lost(x.ids_unused),
                    lost(x.ids_never_granted),
                );
            }
            let _ = writeln!(o);
            let skipped = self
                .outcomes
                .iter()
                .filter(|x| x.fault.skipped.is_some())
                .count();
            if skipped > 0 {
                let _ = writeln!(
                    o,
                    "**{skipped} fault(s) SKIPPED** (see the table): they did not run, so this \
                     run says nothing about them.\n"
                );
            }
            // The issue's targets are for leader kills; partitions and restarts are in the
            // table below.
            let kills = |k: Kind| matches!(k, Kind::KillLeader | Kind::TermLeader);
            let mut ms: Vec<f64> = self
                .outcomes
                .iter()
                .filter(|x| kills(x.fault.kind))
                .filter_map(|x| x.failover_us.map(|u| u as f64 / 1e3))
                .collect();
            let n = ms.len();
            if let Some(med) = median(&mut ms) {
                let worst = ms.iter().copied().fold(0.0, f64::max);
                let wait_ms = self
                    .outcomes
                    .iter()
                    .filter(|x| kills(x.fault.kind) && x.fault.skipped.is_none())
                    .map(|x| x.next_wait_max_us as f64 / 1e3)
                    .fold(0.0, f64::max);
                let _ = writeln!(
                    o,
                    "**Leader kills** (kill-leader and term-leader, {n} with a new leader's \
                     grant): fault → first grant by another server median {med:.1} ms, worst \
                     {worst:.1} ms (targets: median under {FAILOVER_MEDIAN_TARGET_MS} ms: {}, \
                     worst under {FAILOVER_WORST_TARGET_MS} ms: {}).{}\n",
                    if med < FAILOVER_MEDIAN_TARGET_MS {
                        "met"
                    } else {
                        "MISSED"
                    },
                    if worst < FAILOVER_WORST_TARGET_MS {
                        "met"
                    } else {
                        "MISSED"
                    },
                    if self.consumers > 0 {
                        format!(
                            " Longest `next()` wait that began during a leader kill: \
                             {wait_ms:.1} ms (target under {NEXT_WAIT_TARGET_MS} ms: {}).",
                            if wait_ms < NEXT_WAIT_TARGET_MS {
                                "met"
                            } else {
                                "MISSED"
                            }
                        )
                    } else {
                        String::new()
                    }
                );
            }
            let mut by_kind: Vec<(Kind, Vec<f64>, f64)> = Vec::new();
            for x in self.outcomes.iter().filter(|x| x.fault.skipped.is_none()) {
                let k = x.fault.kind;
                let i = match by_kind.iter().position(|b| b.0 == k) {
                    Some(i) => i,
                    None => {
                        by_kind.push((k, Vec::new(), 0.0));
                        by_kind.len() - 1
                    }
                };
                if let Some(u) = x.failover_us {
                    by_kind[i].1.push(u as f64 / 1e3);
                }
                by_kind[i].2 = by_kind[i].2.max(x.next_wait_max_us as f64 / 1e3);
            }
            let _ = writeln!(
                o,
                "| kind | times | fault → new leader's first grant, median (ms) | worst (ms) | \
                 longest next() wait (ms) |"
            );
            let _ = writeln!(o, "|---|---|---|---|---|");
            for (k, mut ms, wait) in by_kind {
                let times = self
                    .outcomes
                    .iter()
                    .filter(|x| x.fault.kind == k && x.fault.skipped.is_none())
                    .count();
                let worst = ms.iter().copied().fold(f64::NAN, f64::max);
                let med = median(&mut ms);
                let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
                let _ = writeln!(
                    o,
                    "| {} | {times} | {} | {} | {} |",
                    k.name(),
                    fmt(med),
                    fmt((!worst.is_nan()).then_some(worst)),
                    if self.consumers > 0 {
                        format!("{wait:.1}")
                    } else {
                        "-".into()
                    }
                );
            }
            let _ = writeln!(o);
            let _ = writeln!(
                o,
                "Ids granted and never used: a real agent's, to the fault that killed the agent \
                 with them in its ring; any other (an answer lost on the way, a request answered \
                 twice), to the fault in force when it was granted. Ids never granted (gaps \
                 between blocks: an old leader's unused window), to the last fault started \
                 before the block above the gap. {}\n",
                if self.lost_known {
                    format!(
                        "Charged to no fault (left in rings at the end, lost to the steady \
                         datagram faults, or before any fault): {} granted and unused, {} never \
                         granted.",
                        self.lost_at_end.0, self.lost_at_end.1
                    )
                } else {
                    "Real agents' blocks are seen only through `--proxy`: without it lost ids are \
                     not counted (`?`)."
                        .to_owned()
                }
            );
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
            self.grants_verdict.grants,
            self.grants_verdict.ids,
            args.width,
            self.verdict.violations
        );
        let _ = writeln!(o);
        let _ = writeln!(o, "| check | checked | violations |");
        let _ = writeln!(o, "|---|---|---|");
        let _ = writeln!(
            o,
            "| simulated agents' blocks: unique, in width, above the agent's last, all answered | {} grants | {} |",
            self.grants_verdict.grants, self.grants_verdict.violations
        );
        if self.consumers > 0 {
            let _ = writeln!(
                o,
                "| consumers' ids: unique (with the blocks above), in width, increasing per consumer | {} ids in {} runs | {} |",
                self.consumers_verdict.ids,
                self.consumers_verdict.grants,
                self.consumers_verdict.violations + self.consumer_panics.len() as u64
            );
        }
        if let Some(w) = &self.wire_verdict {
            let _ = writeln!(
                o,
                "| every block the servers sent (seen by the proxy, real agents included): unique, in width | {} grants | {} |",
                w.grants, w.violations
            );
        }
        let _ = writeln!(
            o,
            "| after each failover, grants requested after the new leader's first grant lie above every earlier block | {} failovers | {} |",
            self.failover_verdict.grants, self.failover_verdict.violations
        );
        let _ = writeln!(o);
        for v in &self.verdict.described {
            let _ = writeln!(o, "- {v}");
        }
        for n in notes {
            let _ = writeln!(o, "\n- {n}");
        }
        o
    }
}
