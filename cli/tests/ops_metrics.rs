//! The operations files match the binary they ship with:
//!
//! - every metric name (and every fixed label value) that the alert rules, their promtool
//!   tests and the Grafana dashboard under `ops/` use is one a real `unid server` or
//!   `unid agent` exports, scraped from the processes' `/metrics`;
//! - those processes run from the packaged default configs (`packaging/etc/*.toml`, flags
//!   over them), so an unknown key there fails here.

mod server_support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use server_support::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `GET /metrics` on `addr`: the body, or `None` while nothing answers.
fn scrape(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.contains(" 200 ").then(|| body.to_owned())
}

/// What a scrape exports: family names (`# TYPE`) and, per sample name, its label pairs.
#[derive(Default, Debug)]
struct Exported {
    families: BTreeSet<String>,
    samples: BTreeMap<String, BTreeSet<(String, String)>>,
}

impl Exported {
    fn add(&mut self, text: &str) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                if let Some(name) = rest.split_whitespace().next() {
                    self.families.insert(name.to_owned());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let labels = self.samples.entry(line[..name_end].to_owned()).or_default();
            if line[name_end..].starts_with('{') {
                let close = line.rfind('}').expect("a closed label set");
                labels.extend(
                    matchers(&line[name_end + 1..close])
                        .into_iter()
                        .map(|(k, _, v)| (k, v)),
                );
            }
        }
    }

    /// Whether `name` is a family or a sample of one (`_bucket`, `_sum`, `_count`).
    fn has(&self, name: &str) -> bool {
        self.families.contains(name) || self.samples.contains_key(name)
    }
}

/// One label matcher: key, operator, value.
type Matcher = (String, String, String);

/// `key op "value"` pairs of a label set or selector body (ops `=`, `!=`, `=~`, `!~`).
fn matchers(body: &str) -> Vec<Matcher> {
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        let Some(op_at) = rest.find(['=', '!']) else {
            break;
        };
        let key = rest[..op_at].trim().to_owned();
        let after = &rest[op_at..];
        let op_len =
            if after.starts_with("=~") || after.starts_with("!=") || after.starts_with("!~") {
                2
            } else {
                1
            };
        let op = after[..op_len].to_owned();
        let Some(value) = after[op_len..].trim_start().strip_prefix('"') else {
            break;
        };
        let end = value.find('"').unwrap_or(value.len());
        out.push((key, op, value[..end].to_owned()));
        rest = value.get(end + 1..).unwrap_or("");
    }
    out
}

/// Every `unid_*` metric name in `text` with the selector that follows it, if any. YAML
/// comment lines are skipped (they may say `unid_server_*`).
fn references(text: &str) -> Vec<(String, Vec<Matcher>)> {
    let text = text.replace("\\\"", "\"");
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let mut at = 0;
        while let Some(i) = line[at..].find("unid_") {
            let start = at + i;
            let boundary = start == 0 || {
                let c = line.as_bytes()[start - 1];
                !(c.is_ascii_alphanumeric() || c == b'_')
            };
            let end = line[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(line.len(), |e| start + e);
            if boundary {
                let mut sel = Vec::new();
                if line[end..].starts_with('{')
                    && let Some(close) = line[end..].find('}')
                {
                    sel = matchers(&line[end + 1..end + close]);
                }
                out.push((line[start..end].to_owned(), sel));
            }
            at = end;
        }
    }
    out
}

/// What in `file` does not match `exported`: unknown names, unknown label keys, and fixed
/// (`=`) label values no sample carries. `job` and `instance` come from Prometheus;
/// `sequence` values are whatever an operator named the sequences.
fn mismatches(file: &str, text: &str, exported: &Exported) -> Vec<String> {
    let mut bad = Vec::new();
    for (name, sel) in references(text) {
        if !exported.has(&name) {
            bad.push(format!("{file}: {name} is not exported"));
            continue;
        }
        let labels = exported.samples.get(&name);
        for (key, op, value) in sel {
            if key == "job" || key == "instance" {
                continue;
            }
            let has_key = labels.is_some_and(|l| l.iter().any(|(k, _)| *k == key));
            if !has_key {
                bad.push(format!("{file}: {name} has no label {key:?}"));
            } else if op == "="
                && key != "sequence"
                && !labels.is_some_and(|l| l.contains(&(key.clone(), value.clone())))
            {
                bad.push(format!("{file}: {name} never has {key}={value:?}"));
            }
        }
    }
    bad
}

#[test]
fn the_checker_finds_unknown_names_labels_and_values() {
    let mut e = Exported::default();
    e.add("# TYPE unid_server_x_total counter\nunid_server_x_total{code=\"NotReady\"} 1\n# TYPE unid_server_h_seconds histogram\nunid_server_h_seconds_bucket{le=\"0.1\"} 1\n");
    let ok = "expr: rate(unid_server_x_total{job=~\"a\",code=\"NotReady\"}[5m]) + unid_server_h_seconds_bucket{le=\"0.1\"}\n# unid_server_* in a comment\n";
    assert_eq!(mismatches("f", ok, &e), Vec::<String>::new());
    let bad = "a: unid_server_y_total + unid_server_x_total{kind=\"a\"} + unid_server_x_total{code=\"Nope\"}\n\"expr\": \"unid_server_x_total{code=\\\"Nope2\\\"}\"";
    assert_eq!(
        mismatches("f", bad, &e),
        vec![
            "f: unid_server_y_total is not exported",
            "f: unid_server_x_total has no label \"kind\"",
            "f: unid_server_x_total never has code=\"Nope\"",
            "f: unid_server_x_total never has code=\"Nope2\"",
        ]
    );
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Scrapes `addr` until `done` holds for the text (at most 20 s).
fn scrape_until(addr: SocketAddr, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(text) = scrape(addr)
            && done(&text)
        {
            return text;
        }
        assert!(Instant::now() < deadline, "{what} never showed on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn rules_tests_and_dashboard_use_only_exported_metrics() {
    let root = tempfile::tempdir().unwrap();
    let repo = repo();
    let mut servers = servers(root.path(), 1);
    let s = &mut servers[0];
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log = std::fs::File::create(&s.log).unwrap();
    s.child = Some(
        Command::new(UNID)
            .arg("server")
            .arg("--config")
            .arg(repo.join("packaging/etc/server.toml"))
            .args(["--id", "1", "--init"])
            .args(["--listen", &s.udp.to_string()])
            .args(["--raft", &s.raft.to_string()])
            .args(["--metrics", &metrics.to_string()])
            .arg("--data-dir")
            .arg(&s.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let udp = s.udp;
    create_sequence(&[udp], "orders", 8);

    // A primary agent (pair link listening, so the pair gauges are there) from the packaged
    // config, with its ring in a private folder.
    let socket = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let peer = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let agent_log = root.path().join("agent.log");
    let file = std::fs::File::create(&agent_log).unwrap();
    let _agent = Proc(
        Command::new(UNID)
            .arg("agent")
            .arg("--config")
            .arg(repo.join("packaging/etc/agent.toml"))
            .args(["--server", &udp.to_string(), "--sequence", "orders"])
            .arg("--ring-dir")
            .arg(root.path().join("rings"))
            .args(["--socket", &socket.to_string()])
            .args(["--peer-listen", &peer.to_string()])
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap(),
    );
    let agent_text = scrape_until(socket, "the agent's ring of orders", |t| {
        t.contains("unid_agent_ring_ids{sequence=\"orders\"}")
            && t.contains("unid_agent_connected 1")
    });
    // After the agent's first grant: the sequence's own samples and a ceiling raise.
    let server_text = scrape_until(metrics, "a grant for orders", |t| {
        t.contains("unid_server_sequence_ids_granted_total{sequence=\"orders\"}")
            && !t.contains("unid_server_ceiling_raise_seconds_count 0")
    });
    let mut exported = Exported::default();
    exported.add(&server_text);
    exported.add(&agent_text);
    assert!(
        exported
            .families
            .iter()
            .any(|f| f.starts_with("unid_agent_"))
    );

    let files = [
        "ops/prometheus/unid-alerts.yml",
        "ops/prometheus/unid-alerts.test.yml",
        "ops/grafana/unid-dashboard.json",
    ];
    let mut bad = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(repo.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        let names: BTreeSet<String> = references(&text).into_iter().map(|(n, _)| n).collect();
        // Not vacuous: each file uses a good part of what is exported.
        assert!(names.len() >= 10, "{f} names only {names:?}");
        bad.extend(mismatches(f, &text, &exported));
    }
    assert!(
        bad.is_empty(),
        "names or labels the processes do not export:\n{}\n--- server:\n{server_text}\n--- agent:\n{agent_text}",
        bad.join("\n")
    );
}
