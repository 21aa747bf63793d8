//! Backup-agent pairs in the simulator: agent 0 and a backup agent run the real agent
//! machine's pairing (keyed heartbeats over the simulated network, the fast signal of a
//! refused send to a crashed peer, the slow one behind a partition, who is active, the
//! takeover's fresh blocks), while the pair's consumers read both rings as the client's
//! pair mode does. Every invariant holds, and the pair really works under the faults:
//! takeovers happen and the consumers get ids from the backup's ring.

use unid_sim::{SimConfig, run};

/// Seeds of the short profile run with the pair forced on.
const SEEDS: std::ops::Range<u64> = 3000..3024;

#[test]
fn a_backup_pair_under_faults_keeps_every_invariant_and_takes_over() {
    let mut failed = Vec::new();
    let (mut takeovers, mut from_backup, mut switches, mut taken) = (0, 0, 0, 0);
    let mut backup_takeovers = 0;
    let mut seeds_with_takeover = 0;
    for seed in SEEDS {
        let mut config = SimConfig::short(seed);
        config.pairs = true;
        let report = run(config).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        if let Some(v) = report.violations.first() {
            failed.push(format!(
                "seed {seed}: {v}\n  replay: {}",
                report.replay_command()
            ));
        }
        let p = report.pair;
        assert!(p.taken > 0, "seed {seed}: the pair's consumers got no id");
        assert!(p.from_backup <= p.taken);
        takeovers += p.takeovers;
        backup_takeovers += p.backup_takeovers;
        from_backup += p.from_backup;
        switches += p.switches;
        taken += p.taken;
        seeds_with_takeover += u64::from(p.takeovers > 0);
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    // Agent crashes and partitions in the chaos make a standby active on most seeds, and
    // the consumers move between the two rings (each move discarding what is not above
    // their last id, which the `increasing` invariant checks).
    assert!(
        seeds_with_takeover >= SEEDS.count() as u64 / 2,
        "takeovers on {seeds_with_takeover} seeds only ({takeovers} in all)"
    );
    // And the backup becomes active when the primary is crashed or cut off (7 of the 29
    // takeovers on these seeds; 0 if a dead peer did not make the standby active).
    assert!(
        backup_takeovers > 0,
        "the backup never took over ({takeovers} takeovers)"
    );
    assert!(switches > 0, "the consumers never switched rings");
    assert!(
        from_backup > 0 && from_backup < taken,
        "{from_backup} of {taken} ids from the backup's ring: both rings should serve"
    );
}

/// Without the pair, no agent is paired and the stats stay zero; the replay command names
/// the flag when it differs from the seed's own draw.
#[test]
fn the_pair_is_a_drawn_part_of_the_seed_and_replays() {
    let seed = (0..64)
        .find(|&s| !SimConfig::from_seed(s).pairs)
        .expect("a seed without a pair");
    let mut config = SimConfig::short(seed);
    assert!(!unid_sim::replay_command(&config).contains("pairs"));
    let report = run(config.clone()).expect("run");
    assert!(report.ok(), "{:?}", report.violations.first());
    assert_eq!(report.pair, unid_sim::app::PairStats::default());
    config.pairs = true;
    assert!(unid_sim::replay_command(&config).ends_with(" --pairs"));
    assert!(
        (0..64).any(|s| SimConfig::from_seed(s).pairs),
        "no seed draws a pair"
    );
}
