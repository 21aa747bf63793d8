//! `unid-sim`: runs seeds of the deterministic simulation.
//!
//! ```text
//! unid-sim --seeds 0..1000          # a sweep; prints a replay command per failing seed
//! unid-sim --seed 42 --verbose      # replay one seed, printing its history
//! ```

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use unid_sim::{SimConfig, run};

struct Args {
    seeds: std::ops::Range<u64>,
    verbose: bool,
    quiet: bool,
    rounds: Option<u32>,
    torn: bool,
    membership: Option<bool>,
    pairs: Option<bool>,
    restart_all: Option<bool>,
}

fn parse() -> anyhow::Result<Args> {
    let mut seeds = 0..100;
    let mut verbose = false;
    let mut quiet = false;
    let mut rounds = None;
    let mut torn = true;
    let mut membership = None;
    let mut pairs = None;
    let mut restart_all = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seed" => {
                let s: u64 = it.next().context("--seed N")?.parse().context("--seed N")?;
                seeds = s..s + 1;
            }
            "--seeds" => {
                let v = it.next().context("--seeds A..B")?;
                let (a, b) = v.split_once("..").context("--seeds A..B")?;
                seeds = a.parse().context("--seeds A..B")?..b.parse().context("--seeds A..B")?;
            }
            "--verbose" | "-v" => verbose = true,
            "--quiet" | "-q" => quiet = true,
            "--rounds" => {
                rounds = Some(
                    it.next()
                        .context("--rounds N")?
                        .parse()
                        .context("--rounds N")?,
                )
            }
            "--no-torn-writes" => torn = false,
            "--membership-changes" => membership = Some(true),
            "--no-membership-changes" => membership = Some(false),
            "--pairs" => pairs = Some(true),
            "--no-pairs" => pairs = Some(false),
            "--restart-all" => restart_all = Some(true),
            "--no-restart-all" => restart_all = Some(false),
            "--help" | "-h" => {
                println!(
                    "unid-sim [--seeds A..B | --seed N] [--verbose] [--quiet] [--rounds N] [--no-torn-writes]\n\
                     \x20        [--membership-changes | --no-membership-changes] [--pairs | --no-pairs]\n\
                     \x20        [--restart-all | --no-restart-all]\n\
                     Runs the deterministic simulation for each seed; exits 1 if any seed \
                     violates an invariant, printing the command that replays it."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(Args {
        seeds,
        verbose,
        quiet,
        rounds,
        torn,
        membership,
        pairs,
        restart_all,
    })
}

fn main() -> anyhow::Result<ExitCode> {
    let args = parse()?;
    let started = Instant::now();
    let (mut clean, mut failed) = (0u64, Vec::new());
    let mut shared = Vec::new();
    let (mut changed, mut changes_done, mut changes_failed) = (0u64, 0u64, 0u64);
    let (mut paired, mut pair) = (0u64, unid_sim::app::PairStats::default());
    let (mut restarting, mut restart_alls, mut rewarms) = (0u64, 0u64, 0u64);
    for seed in args.seeds.clone() {
        let mut config = SimConfig::from_seed(seed);
        config.verbose = args.verbose;
        config.torn_writes = args.torn;
        if let Some(r) = args.rounds {
            config.rounds = r;
        }
        if let Some(m) = args.membership {
            config.membership_changes = m;
        }
        if let Some(p) = args.pairs {
            config.pairs = p;
        }
        if let Some(r) = args.restart_all {
            config.restart_all = r;
        }
        let report = run(config).with_context(|| format!("seed {seed}"))?;
        if report.seen.shared_terms > 0 {
            shared.push(seed);
        }
        if report.config.membership_changes {
            changed += 1;
        }
        changes_done += report.membership_done;
        if report.config.pairs {
            paired += 1;
            pair.taken += report.pair.taken;
            pair.from_backup += report.pair.from_backup;
            pair.switches += report.pair.switches;
            pair.discarded += report.pair.discarded;
            pair.takeovers += report.pair.takeovers;
            pair.backup_takeovers += report.pair.backup_takeovers;
        }
        changes_failed += report.membership_failed;
        restarting += u64::from(report.config.restart_all);
        restart_alls += report.restart_alls;
        rewarms += report.rewarms;
        if report.ok() {
            clean += 1;
            if !args.quiet {
                println!(
                    "seed {seed}: ok ({} servers, {} grants, {} terms with a leader ({} with two), {} crashes, membership changes {} done {} not, {} ms simulated, recovery {} ms, digest {:016x})",
                    report.config.servers,
                    report.seen.grants,
                    report.seen.leaders,
                    report.seen.shared_terms,
                    report.crashes,
                    report.membership_done,
                    report.membership_failed,
                    report.sim_ms,
                    report.seen.recovery_us_max / 1000,
                    report.seen.digest
                );
            }
        } else {
            println!("seed {seed}: FAILED: {}", report.violations[0]);
            println!("  replay: {}", report.replay_command());
            failed.push(seed);
        }
    }
    println!(
        "{} seeds: {clean} clean, {} failed{} in {:.1} s",
        clean + failed.len() as u64,
        failed.len(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(" ({failed:?})")
        },
        started.elapsed().as_secs_f64()
    );
    println!(
        "seeds where openraft elected two leaders in one term (allowed by its (term, node) leader ids; \
         never two granting): {}{}",
        shared.len(),
        if shared.is_empty() {
            String::new()
        } else {
            format!(" ({:?})", &shared[..shared.len().min(20)])
        }
    );
    println!(
        "seeds with membership changes: {changed}; changes answered done: {changes_done}, \
         refused or given up: {changes_failed}"
    );
    println!(
        "seeds with a backup agent pair: {paired}; takeovers {} ({} by the backup); its consumers took {} ids, {} from \
         the backup's ring, switched rings {} times, discarded {} ids not above their last",
        pair.takeovers,
        pair.backup_takeovers,
        pair.taken,
        pair.from_backup,
        pair.switches,
        pair.discarded
    );
    println!(
        "seeds with restart-all: {restarting}; every server restarted at once {restart_alls} times; \
         allocators dropped by a raise above their own and rebuilt in the same term: {rewarms}"
    );
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
