//! A checker that cannot fail proves nothing. The simulator runs the product's own server
//! machine and driver, so deliberate breakages are applied to that code itself, one at a
//! time, by `scripts/sim-mutants.sh` (CI), which expects these seeds to fail on each and
//! names the invariant that fired. Here: the unbroken code passes the same seeds, so those
//! failures come from the breakage, not from the seeds.

use unid_sim::{SimConfig, run};

/// The seeds `scripts/sim-mutants.sh` runs (keep in step with it).
const MUTANT_SEEDS: std::ops::Range<u64> = 0..8;

#[test]
fn the_real_code_passes_the_mutant_seeds() {
    let mut failed = Vec::new();
    for seed in MUTANT_SEEDS {
        let report = run(SimConfig::short(seed)).expect("run");
        if let Some(v) = report.violations.first() {
            failed.push((seed, v.invariant, report.replay_command()));
        }
    }
    assert_eq!(failed, vec![]);
}
