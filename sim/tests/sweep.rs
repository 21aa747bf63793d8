//! The seed sweep CI runs: 200 seeds of the short profile (one round of
//! chaos then calm, ~7 s simulated each), split into four tests so that the
//! test harness runs them on both cores. Every seed must keep every
//! invariant; a failure names the seed and the command that replays it.

use unid_sim::{SimConfig, run};

/// Seeds per test; four tests cover `0..200`.
const SEEDS_PER_TEST: u64 = 50;

fn sweep(part: u64) {
    let mut failed = Vec::new();
    for seed in part * SEEDS_PER_TEST..(part + 1) * SEEDS_PER_TEST {
        let report = run(SimConfig::short(seed)).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert!(report.seen.grants > 0, "seed {seed}: nothing was granted");
        assert!(
            report.seen.ids_consumed > 0,
            "seed {seed}: nothing was consumed"
        );
        if !report.ok() {
            failed.push(format!(
                "seed {seed}: {}\n  replay: {}",
                report.violations[0],
                report.replay_command()
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn seeds_0_to_50() {
    sweep(0);
}

#[test]
fn seeds_50_to_100() {
    sweep(1);
}

#[test]
fn seeds_100_to_150() {
    sweep(2);
}

#[test]
fn seeds_150_to_200() {
    sweep(3);
}
