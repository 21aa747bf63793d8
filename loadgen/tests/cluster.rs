//! `loadgen` against three real `unid server` processes on 127.0.0.1: with the leader killed
//! (SIGKILL) and restarted: the checker must pass and the report must show the kill and the
//! time to the new leader's first grant.
//! With datagrams lost, duplicated, reordered and corrupted, the checker passes too.
//!
//! The `unid` binary comes from `UNID_BIN`, else from the same target directory as
//! `loadgen` (`cargo build -p unid-cli` first), else this test builds it there.

mod support;

use std::process::Command;

use support::{LOADGEN, unid_bin};

#[test]
fn checker_passes_through_a_leader_kill_and_reports_the_failover() {
    let unid = unid_bin();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.md");
    let out = Command::new(LOADGEN)
        .args(["--spawn-servers", "3", "--unid-bin"])
        .arg(&unid)
        .args(["--duration-s", "8", "--drain-s", "10"])
        .args(["--agents", "8", "--window", "4", "--count", "50"])
        .args([
            "--nemesis",
            "kill-leader",
            "--seed",
            "3",
            "--every-ms",
            "4000",
        ])
        .arg("--report")
        .arg(&report)
        .output()
        .expect("run loadgen");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "loadgen failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    let text = std::fs::read_to_string(&report).unwrap();
    assert!(text.starts_with("# loadgen report: PASSED"), "{text}");
    assert!(text.contains("## Checker: passed"), "{text}");
    assert!(text.contains(" 0 violation(s)"), "{text}");
    // Progress lines, one a second.
    assert!(stderr.matches("loadgen: t=").count() >= 5, "{stderr}");

    // One kill at least (the first is due 3-5 s in), restarted, and a grant from another
    // server afterwards.
    let kills: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("## Nemesis"))
        .filter(|l| l.starts_with("| 1 ") || l.starts_with("| 2 "))
        .collect();
    assert!(!kills.is_empty(), "no kill in the report:\n{text}");
    for k in &kills {
        let cells: Vec<&str> = k.split('|').map(str::trim).collect();
        // | # | kind | at | target | term | healed | failover ms | next() wait | lost | never |
        assert_eq!(cells[2], "kill-leader", "{k}");
        assert_ne!(cells[6], "-", "server never restarted: {k}");
        let ms: f64 = cells[7]
            .parse()
            .unwrap_or_else(|_| panic!("no grant after the kill: {k}\n{text}"));
        assert!(ms > 0.0, "{k}");
    }
    // Grants were made, and every request was answered.
    let throughput = text
        .lines()
        .skip_while(|l| !l.starts_with("## Throughput"))
        .nth(4)
        .unwrap();
    let cells: Vec<&str> = throughput.split('|').map(str::trim).collect();
    let requests: u64 = cells[1].parse().unwrap();
    let granted: u64 = cells[2].parse().unwrap();
    assert!(requests > 100, "{throughput}");
    assert_eq!(requests, granted, "{throughput}");
}

#[test]
fn kill_leader_without_spawned_servers_is_a_clear_error() {
    let out = Command::new(LOADGEN)
        .args(["--server", "127.0.0.1:9", "--nemesis", "kill-leader"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("needs --spawn-servers"), "{stderr}");
}

#[test]
fn checker_passes_through_lost_duplicated_reordered_and_corrupted_datagrams() {
    let unid = unid_bin();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.md");
    let out = Command::new(LOADGEN)
        .args(["--spawn-servers", "3", "--unid-bin"])
        .arg(&unid)
        .args(["--duration-s", "4", "--drain-s", "10"])
        .args(["--agents", "4", "--window", "4", "--count", "10"])
        .args(["--drop", "0.05", "--duplicate", "0.05", "--reorder", "0.05"])
        .args(["--corrupt", "0.02", "--seed", "11"])
        .arg("--report")
        .arg(&report)
        .output()
        .expect("run loadgen");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "loadgen failed ({}):\n{stderr}",
        out.status
    );
    let text = std::fs::read_to_string(&report).unwrap();
    assert!(text.starts_with("# loadgen report: PASSED"), "{text}");
    let count = |what: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("| {what} |")))
            .unwrap_or_else(|| panic!("no {what:?} line:\n{text}"));
        line.split('|').nth(2).unwrap().trim().parse().unwrap()
    };
    for what in ["dropped", "duplicated", "reordered", "corrupted"] {
        assert!(count(&format!("faults injected: {what}")) > 0, "{text}");
    }
    // Corrupted answers fail the CRC; lost ones are resent.
    assert!(count("undecodable datagrams") > 0, "{text}");
    assert!(
        count("retransmits after a timeout (same seq)") > 0,
        "{text}"
    );
}
