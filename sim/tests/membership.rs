//! Membership changes in the simulator: the operator adds and removes servers during the
//! chaos (`unid cluster add-server` / `remove-server`, real datagrams to the real server
//! machines, real openraft learners and joint configurations), and every invariant holds.

use unid_sim::{SimConfig, run};

/// Seeds of the short profile run with membership changes forced on.
const SEEDS: std::ops::Range<u64> = 1000..1024;

#[test]
fn servers_added_and_removed_under_faults_keep_every_invariant() {
    let (mut done, mut added_server_granted) = (0, 0);
    let mut failed = Vec::new();
    for seed in SEEDS {
        let mut config = SimConfig::short(seed);
        config.membership_changes = true;
        let servers = config.servers as u64;
        let report = run(config).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        if let Some(v) = report.violations.first() {
            failed.push(format!(
                "seed {seed}: {v}\n  replay: {}",
                report.replay_command()
            ));
        }
        done += report.membership_done;
        if report.seen.granting_server_max > servers {
            added_server_granted += 1;
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    // The changes really happen, and an added server goes on to lead and grant (its
    // allocator built from ceilings it got by snapshot or log as a learner).
    assert!(done >= SEEDS.count() as u64 / 2, "only {done} changes done");
    assert!(added_server_granted > 0, "no added server ever granted");
}

/// The replay command names the flag when it differs from the seed's own draw, so a failing
/// seed replays with the same schedule.
#[test]
fn the_replay_command_keeps_the_membership_schedule() {
    let seed = (0..64)
        .find(|&s| !SimConfig::from_seed(s).membership_changes)
        .expect("a seed without membership changes");
    let mut config = SimConfig::from_seed(seed);
    assert!(!unid_sim::replay_command(&config).contains("membership"));
    config.membership_changes = true;
    assert!(unid_sim::replay_command(&config).ends_with(" --membership-changes"));
}
