//! Same seed → same history: a run's event trace digest (every grant,
//! commit, leader, consumed range and fault, with its simulated time) and
//! its counters are identical when the seed runs again, and differ between
//! seeds.

use unid_sim::{SimConfig, run};

#[test]
fn a_seed_run_twice_gives_the_same_history() {
    for seed in [0, 1, 7, 42] {
        let a = run(SimConfig::short(seed)).expect("first run");
        let b = run(SimConfig::short(seed)).expect("second run");
        assert!(
            a.seen.events > 100,
            "seed {seed}: too few events to compare"
        );
        assert_eq!(a.seen, b.seen, "seed {seed}: histories differ");
        assert_eq!(a.net, b.net, "seed {seed}: network counters differ");
        assert_eq!(a.crashes, b.crashes, "seed {seed}");
        assert_eq!(a.lost_writes, b.lost_writes, "seed {seed}");
        assert_eq!(a.sim_ms, b.sim_ms, "seed {seed}");
    }
}

#[test]
fn different_seeds_give_different_histories() {
    let a = run(SimConfig::short(3)).expect("run");
    let b = run(SimConfig::short(4)).expect("run");
    assert_ne!(a.seen.digest, b.seen.digest);
}
