//! `loadgen --nemesis all` against three real `unid server`s, two real `unid agent`s with
//! ring consumers, everything behind the fault proxy: every fault kind once (kill -9 of the
//! leader, a follower and an agent, SIGTERM of the leader, partitions, a proxy burst, a
//! clock jump, a restart of everything), and the checker must pass. Partitions need root
//! and iptables, clock jumps libfaketime: without them the report must say SKIPPED (never a
//! silent pass).
//!
//! The `unid` binary comes from `UNID_BIN`, else from the same target directory as
//! `loadgen` (`cargo build -p unid-cli` first), else this test builds it there.

mod support;

use std::process::Command;

use support::{LOADGEN, unid_bin};

fn partitions_possible() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false);
    root && Command::new("iptables")
        .args(["-w", "-S", "OUTPUT"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn every_fault_kind_with_real_agents_behind_the_proxy_passes_the_checker() {
    let unid = unid_bin();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("all.md");
    let out = Command::new(LOADGEN)
        .args(["--spawn-servers", "3", "--unid-bin"])
        .arg(&unid)
        .args(["--duration-s", "32", "--drain-s", "20"])
        .args([
            "--agents", "4", "--window", "4", "--count", "50", "--rate", "1000",
        ])
        .args(["--real-agents", "2", "--consumer-rate", "2000"])
        .args([
            "--proxy",
            "--proxy-drop",
            "0.01",
            "--proxy-duplicate",
            "0.01",
        ])
        .args([
            "--proxy-reorder",
            "0.01",
            "--proxy-delay",
            "0.05",
            "--proxy-delay-ms",
            "5",
        ])
        .args(["--proxy-corrupt", "0.005"])
        .args(["--nemesis", "all", "--every-ms", "2000", "--seed", "5"])
        .arg("--report")
        .arg(&report)
        .output()
        .expect("run loadgen");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let text = std::fs::read_to_string(&report).unwrap_or_default();
    assert!(
        out.status.success(),
        "loadgen failed ({}):\n{stderr}\n{text}",
        out.status
    );
    assert!(text.starts_with("# loadgen report: PASSED"), "{text}");
    assert!(text.contains("## Checker: passed"), "{text}");
    // Every check ran and found nothing.
    for check in [
        "| simulated agents' blocks",
        "| consumers' ids",
        "| every block the servers sent",
        "| after each failover",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(check))
            .unwrap_or_else(|| panic!("no {check:?} line:\n{text}"));
        assert!(line.ends_with("| 0 |"), "{line}");
    }
    // Every kind ran once (partitions only where they can, else SKIPPED and said so).
    let rows: Vec<Vec<String>> = text
        .lines()
        .skip_while(|l| !l.starts_with("## Nemesis"))
        .skip(4)
        .take_while(|l| l.starts_with("| "))
        .map(|l| l.split('|').map(|c| c.trim().to_owned()).collect())
        .collect();
    let partitions = partitions_possible();
    // Clock jumps need libfaketime (Debian package `faketime`).
    let faketime =
        std::path::Path::new("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1").is_file();
    for kind in [
        "kill-leader",
        "kill-follower",
        "kill-agent",
        "term-leader",
        "partition-leader",
        "partition-split",
        "partition-agent",
        "proxy",
        "clock-jump",
        "restart-all",
    ] {
        let row = rows
            .iter()
            .find(|r| r[2] == kind)
            .unwrap_or_else(|| panic!("{kind} never ran:\n{text}"));
        let skipped = row[4].starts_with("SKIPPED");
        let needs_root = kind.starts_with("partition");
        let can_run = (partitions || !needs_root) && (faketime || kind != "clock-jump");
        if !can_run {
            assert!(skipped, "{kind} should be skipped here: {row:?}");
        } else {
            assert!(!skipped, "{kind} was skipped: {row:?}\n{text}");
            assert_ne!(row[6], "-", "{kind} never healed: {row:?}");
        }
    }
    if !partitions || !faketime {
        assert!(text.contains("SKIPPED"), "{text}");
    }
    // A leader kill was followed by a grant from the new leader.
    let kill = rows.iter().find(|r| r[2] == "kill-leader").unwrap();
    let ms: f64 = kill[7]
        .parse()
        .unwrap_or_else(|_| panic!("no grant after the kill: {kill:?}\n{text}"));
    assert!(ms > 0.0, "{kill:?}");
    // The consumers took ids all along, and the proxy did damage.
    assert!(text.contains("## Ring consumers"), "{text}");
    let count = |what: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("| {what} |")))
            .unwrap_or_else(|| panic!("no {what:?} line:\n{text}"));
        line.split('|').nth(2).unwrap().trim().parse().unwrap()
    };
    for what in ["dropped", "duplicated", "reordered", "delayed", "corrupted"] {
        assert!(count(&format!("proxy: {what}")) > 0, "{what}\n{text}");
    }
    assert!(
        count("proxy: answers with server addresses rewritten") > 0,
        "{text}"
    );
    // The plots, linked from the report.
    for svg in ["all-latency.svg", "all-throughput.svg"] {
        let body = std::fs::read_to_string(dir.path().join(svg)).unwrap();
        assert!(body.starts_with("<svg"), "{svg}");
        assert!(text.contains(&format!("]({svg})")), "{text}");
    }
    // No partition rule left behind.
    if partitions {
        let rules = Command::new("iptables")
            .args(["-w", "-S", "OUTPUT"])
            .output()
            .unwrap();
        let rules = String::from_utf8_lossy(&rules.stdout);
        let pid_tag = "unid-loadgen-";
        assert!(
            !rules
                .lines()
                .any(|l| l.contains(pid_tag) && !other_run_alive(l)),
            "rules left: {rules}"
        );
    }
}

/// Whether the loadgen run that added this rule still runs (tests run in parallel).
fn other_run_alive(rule: &str) -> bool {
    let Some(i) = rule.find("unid-loadgen-") else {
        return false;
    };
    let pid: String = rule[i + "unid-loadgen-".len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// A leader cut off from its peers but not from its agents (`partition-split`) keeps leading in
/// its own eyes (openraft 0.9 has no check-quorum). It used to answer `NotReady`, and the
/// agents kept retrying it and never reached the new leader until the partition healed (of 5
/// single splits 3 took 1.5-2.5 s). Now a leader that no quorum confirmed for 300 ms sends
/// them elsewhere (`NotLeader` naming no leader; `unid_engine::server::QUORUM_LOST_MS`):
/// measured 284-353 ms alone, 274-768 ms in the 10-minute run. Asserted is the behaviour, not
/// the speed (this runs beside other process tests on 2 loaded cores; once it took over 1 s):
/// in each of the splits the new leader's first grant comes while the partition is still in
/// force (it lasts 1.5-3 s), which before the fix it never did.
#[test]
fn after_a_split_the_new_leader_grants_before_the_partition_heals() {
    if !partitions_possible() {
        eprintln!("SKIPPED: partitions need root and iptables");
        return;
    }
    let unid = unid_bin();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("split.md");
    let out = Command::new(LOADGEN)
        .args(["--spawn-servers", "3", "--unid-bin"])
        .arg(&unid)
        .args(["--duration-s", "24", "--agents", "2", "--window", "2"])
        .args(["--rate", "200"])
        .args(["--real-agents", "1", "--nemesis", "partition-split"])
        .args(["--every-ms", "6000", "--seed", "3", "--report"])
        .arg(&report)
        .output()
        .expect("run loadgen");
    let text = std::fs::read_to_string(&report).unwrap_or_default();
    assert!(
        out.status.success(),
        "{}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Vec<String>> = text
        .lines()
        .filter(|l| l.contains("| partition-split | ") && !l.contains("median"))
        .map(|l| {
            l.split('|')
                .map(|c| c.trim().to_owned())
                .collect::<Vec<_>>()
        })
        .filter(|r| r.len() > 10)
        .collect();
    assert!(rows.len() >= 2, "fewer than 2 splits:\n{text}");
    for row in rows {
        // | # | kind | at (s) | target | term | healed at (s) | fault → first grant (ms) | ...
        let at: f64 = row[3].parse().unwrap();
        let healed: f64 = row[6]
            .parse()
            .unwrap_or_else(|_| panic!("split never healed: {row:?}"));
        let ms: f64 = row[7].parse().unwrap_or(f64::INFINITY);
        assert!(
            ms < (healed - at) * 1e3,
            "the new leader's first grant came {ms} ms after the split, not before the heal \
             ({:.0} ms):\n{text}",
            (healed - at) * 1e3
        );
    }
}
