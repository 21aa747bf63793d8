//! A primary agent and its backup (`unid agent --backup-of`) as processes,
//! against a fake server (`unid_agent::testing`), with two application
//! processes taking ids through the `unid` crate: kill -9 of the primary,
//! its restart (it rejoins as the standby), then kill -9 of the backup. The
//! applications keep getting ids, none repeated, each one's increasing; the
//! longest `next()` wait is measured and printed.
//!
//! The application processes are this test binary run again
//! (`pair_consumer_child`, which does nothing unless `UNID_PAIR_CONSUMER`
//! is set).

use std::collections::HashSet;
use std::io::{BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use unid_agent::testing::FakeCluster;

const UNID: &str = env!("CARGO_BIN_EXE_unid");

/// A port free for TCP and UDP on 127.0.0.1, below the kernel's ephemeral range, so nothing
/// takes it before the agent binds it (see `unid_engine::ports`).
fn free_port() -> SocketAddr {
    let port = unid_engine::ports::free_port().expect("a free port on 127.0.0.1");
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Starts a primary (`--peer-listen link`) on ring folder `d1` and socket `s1`, and its
/// backup (`--backup-of link`) on `d2` and `s2`, both against `server`, logging under `work`.
fn start_pair(
    server: SocketAddr,
    (d1, s1): (&Path, SocketAddr),
    (d2, s2): (&Path, SocketAddr),
    link: SocketAddr,
    work: &Path,
) -> (Agent, Agent) {
    let primary = Agent::start(
        agent_args(server, d1, s1, &["--peer-listen".into(), link.to_string()]),
        work.join("primary.log"),
        s1,
    );
    let backup = Agent::start(
        agent_args(server, d2, s2, &["--backup-of".into(), link.to_string()]),
        work.join("backup.log"),
        s2,
    );
    (primary, backup)
}

/// A fresh folder under /dev/shm, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let d = PathBuf::from(format!(
            "/dev/shm/unid-cli-backup-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `unid agent` process; killed (SIGKILL) on drop.
struct Agent {
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
    socket: SocketAddr,
}

impl Agent {
    fn start(args: Vec<String>, log: PathBuf, socket: SocketAddr) -> Agent {
        let mut a = Agent {
            child: None,
            args,
            log,
            socket,
        };
        a.restart();
        a
    }

    fn restart(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(UNID)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start unid agent");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(self.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "agent socket never opened:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, and reap.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn agent_args(server: SocketAddr, dir: &Path, socket: SocketAddr, pair: &[String]) -> Vec<String> {
    let mut v: Vec<String> = [
        "agent",
        "--server",
        &server.to_string(),
        "--sequence",
        "jobs",
        "--refill-period-ms",
        "50",
        "--socket",
        &socket.to_string(),
        "--ring-dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(dir.display().to_string());
    v.extend(pair.iter().cloned());
    v
}

/// The pair file's `key value` lines.
fn pair_file(dir: &Path) -> String {
    std::fs::read_to_string(dir.join(".unid-pair")).unwrap_or_default()
}

/// Whether the pair file in `dir` has the line `line`.
fn pair_says(dir: &Path, line: &str) -> bool {
    pair_file(dir).lines().any(|l| l == line)
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `METRICS` from an agent's socket.
fn metrics(socket: SocketAddr) -> String {
    let Ok(mut s) = TcpStream::connect(socket) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"METRICS\nQUIT\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// `unid status --agents-only --agent ...`: the local agents' lines.
fn unid_status(agents: &[SocketAddr]) -> String {
    let mut cmd = Command::new(UNID);
    cmd.args(["status", "--agents-only"]);
    for a in agents {
        cmd.args(["--agent", &a.to_string()]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// A consumer process: the ids it took (from its output file) and its summary.
struct Consumer {
    child: Child,
    out: PathBuf,
}

fn consumer(dir: &Path, socket: SocketAddr, out: PathBuf, stop: &Path) -> Consumer {
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "pair_consumer_child", "--nocapture", "--quiet"])
        .env("UNID_PAIR_CONSUMER", "1")
        .env("UNID_RING_DIR", dir)
        .env("UNID_SOCKET", socket.to_string())
        .env("UNID_TEST_OUT", &out)
        .env("UNID_TEST_STOP", stop)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Consumer { child, out }
}

fn wall_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros()
}

struct Summary {
    /// `next()` calls longer than 50 µs: (wall clock µs at the call, µs,
    /// whether the call moved to the other agent's ring).
    slow: Vec<(u128, u128, bool)>,
    ids: Vec<u64>,
    max_wait_us: u64,
    max_wait_at_ms: u64,
    switches: u64,
    skipped: u64,
    errors: u64,
}

impl Consumer {
    fn finish(mut self) -> Summary {
        let st = self.child.wait().unwrap();
        assert!(st.success(), "consumer failed: {st}");
        let bytes = std::fs::read(&self.out).unwrap();
        let ids = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let text = std::fs::read_to_string(self.out.with_extension("summary")).unwrap();
        let get = |k: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k} ")))
                .unwrap_or_else(|| panic!("{k} missing in {text}"))
                .parse()
                .unwrap()
        };
        let slow = text
            .lines()
            .filter_map(|l| l.strip_prefix("slow "))
            .map(|l| {
                let mut w = l.split(' ');
                let (t, d, sw) = (w.next().unwrap(), w.next().unwrap(), w.next().unwrap());
                (t.parse().unwrap(), d.parse().unwrap(), sw == "1")
            })
            .collect();
        Summary {
            slow,
            ids,
            max_wait_us: get("max_wait_us"),
            max_wait_at_ms: get("max_wait_at_ms"),
            switches: get("switches"),
            skipped: get("skipped"),
            errors: get("errors"),
        }
    }
}

/// The application process (run by `consumer`): takes ids with `next()`
/// (about 250k/s, in bursts of 64) until the stop file appears, writes them
/// to `UNID_TEST_OUT`, the longest `next()` (after the first 1000) and the
/// counters beside it.
#[test]
fn pair_consumer_child() {
    if std::env::var_os("UNID_PAIR_CONSUMER").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("UNID_TEST_OUT").unwrap());
    let stop = PathBuf::from(std::env::var_os("UNID_TEST_STOP").unwrap());
    let mut unid = unid::Unid::open("jobs").expect("open");
    assert!(unid.paired(), "the pair file names the backup's ring");
    let mut w = BufWriter::new(std::fs::File::create(&out).unwrap());
    let start = Instant::now();
    let (mut max_wait, mut max_at, mut errors) = (Duration::ZERO, Duration::ZERO, 0u64);
    // Long waits, with the wall clock (comparable with the parent's).
    let mut slow: Vec<(u128, u128, bool)> = Vec::new();
    let mut n = 0u64;
    loop {
        let switches = unid.stats().switches;
        let t = Instant::now();
        match unid.next() {
            Ok(id) => {
                let d = t.elapsed();
                // The first takes map pages and may meet an empty ring.
                if d > max_wait && n >= 1000 {
                    max_wait = d;
                    max_at = t - start;
                }
                if d > Duration::from_micros(50) && slow.len() < 100_000 {
                    let switched = unid.stats().switches != switches;
                    slow.push((wall_us(), d.as_micros(), switched));
                }
                w.write_all(&u64::try_from(id).unwrap().to_le_bytes())
                    .unwrap();
            }
            Err(e) => {
                errors += 1;
                eprintln!("consumer: next() failed: {e}");
                if errors > 20 {
                    break;
                }
            }
        }
        n += 1;
        if n.is_multiple_of(64) {
            std::thread::sleep(Duration::from_micros(200));
            if n.is_multiple_of(1024) && stop.exists() {
                break;
            }
        }
    }
    w.flush().unwrap();
    let slow: String = slow
        .iter()
        .map(|(t, d, sw)| format!("slow {t} {d} {}\n", u8::from(*sw)))
        .collect();
    let s = unid.stats();
    std::fs::write(
        out.with_extension("summary"),
        format!(
            "max_wait_us {}\nmax_wait_at_ms {}\nswitches {}\nskipped {}\nerrors {errors}\n{slow}",
            max_wait.as_micros(),
            max_at.as_millis(),
            s.switches,
            s.ids_skipped
        ),
    )
    .unwrap();
}

#[test]
fn kill9_of_the_primary_then_of_the_backup_applications_keep_taking_ids() {
    let cluster = FakeCluster::new(8, &["jobs"]);
    let server = cluster.start_server(1).unwrap();
    let (d1, d2, work) = (Dir::new("primary"), Dir::new("backup"), Dir::new("work"));
    let (s1, s2) = (free_port(), free_port());
    let link = free_port();
    let (mut primary, mut backup) =
        start_pair(server.addr(), (&d1.0, s1), (&d2.0, s2), link, &work.0);
    wait_for("the pair to form", Duration::from_secs(20), || {
        pair_says(&d1.0, "active 1")
            && pair_says(&d1.0, &format!("peer_ring_dir {}", d2.0.display()))
            && pair_says(&d2.0, "active 0")
            && pair_says(&d2.0, "peer_state alive")
            && d1.0.join("jobs").exists()
            && d2.0.join("jobs").exists()
    });
    let mut status = String::new();
    wait_for(
        "unid status to show the pair",
        Duration::from_secs(10),
        || {
            status = unid_status(&[s1]);
            status.contains("primary ACTIVE") && status.contains("backup standby")
        },
    );
    eprintln!("unid status, pair formed:\n{status}");
    let stop = work.0.join("stop");
    let a = consumer(&d1.0, s1, work.0.join("a.ids"), &stop);
    let b = consumer(&d1.0, s1, work.0.join("b.ids"), &stop);
    std::thread::sleep(Duration::from_millis(1200));

    // 1. kill -9 the primary: the backup takes over.
    let t_kill1 = Instant::now();
    let kill1_us = wall_us();
    primary.kill9();
    wait_for("the backup to take over", Duration::from_secs(10), || {
        pair_says(&d2.0, "active 1")
    });
    let takeover_ms = t_kill1.elapsed().as_millis();
    // The status snapshot is refreshed every 20 ms.
    wait_for(
        "unid status to show the takeover",
        Duration::from_secs(10),
        || {
            status = unid_status(&[s2]);
            status.contains("backup ACTIVE")
        },
    );
    eprintln!("unid status, after kill -9 of the primary:\n{status}");
    assert!(
        status.contains("dead-refused"),
        "the backup saw the primary go by the fast signal: {status}"
    );
    std::thread::sleep(Duration::from_millis(800));

    // 2. The primary comes back: it rejoins as the standby.
    primary.restart();
    wait_for(
        "the restarted primary to stand by",
        Duration::from_secs(10),
        || {
            pair_says(&d1.0, "active 0")
                && pair_says(&d1.0, "peer_state alive")
                && d1.0.join("jobs").exists()
        },
    );
    assert!(pair_says(&d2.0, "active 1"), "backup stays active");
    std::thread::sleep(Duration::from_millis(500));

    // 3. kill -9 the backup (now active): the primary takes over again.
    let kill2_us = wall_us();
    backup.kill9();
    wait_for("the primary to take over", Duration::from_secs(10), || {
        pair_says(&d1.0, "active 1")
    });
    std::thread::sleep(Duration::from_millis(800));
    let m = metrics(s1);
    std::fs::write(&stop, b"").unwrap();
    let (a, b) = (a.finish(), b.finish());

    // No id twice; each consumer's ids increase; every id was granted.
    let mut seen = HashSet::new();
    for (name, s) in [("a", &a), ("b", &b)] {
        assert_eq!(s.errors, 0, "consumer {name} saw errors");
        assert!(s.ids.len() > 10_000, "consumer {name}: {} ids", s.ids.len());
        for w in s.ids.windows(2) {
            assert!(w[0] < w[1], "consumer {name}: {} then {}", w[0], w[1]);
        }
        for id in &s.ids {
            assert!(seen.insert(*id), "id {id} handed out twice");
        }
        assert!(
            s.switches >= 2,
            "consumer {name} switched {} times",
            s.switches
        );
    }
    let granted = cluster.granted();
    for id in &seen {
        let id = u128::from(*id);
        assert!(
            granted
                .iter()
                .any(|(_, f, c)| id >= *f && id < f + u128::from(*c)),
            "id {id} was never granted"
        );
    }
    assert!(metric(&m, "unid_agent_pair_active") == Some(1), "{m}");
    assert!(
        metric(&m, "unid_agent_peer_lost_fast_total").unwrap_or(0) >= 1,
        "the restarted primary saw the backup go by the fast signal:\n{m}"
    );
    assert!(metric(&m, "unid_agent_takeovers_total") == Some(1), "{m}");
    let log = backup.log_text();
    assert_eq!(
        log.matches("pair: peer lost").count(),
        1,
        "one line per change:\n{log}"
    );
    // The longest next() in the second after each kill, over both
    // consumers, and in a second before the first kill as the reference
    // (on a loaded 2-core machine a consumer can be preempted anywhere).
    let window = |from: u128, switching: Option<bool>| -> u128 {
        a.slow
            .iter()
            .chain(&b.slow)
            .filter(|(t, _, sw)| {
                *t >= from && *t < from + 1_000_000 && switching.is_none_or(|s| s == *sw)
            })
            .map(|(_, d, _)| *d)
            .max()
            .unwrap_or(0)
    };
    eprintln!(
        "switch-over waits: longest next() in the second after kill -9 of the primary: {} us (the calls that switched rings: {} us); of the backup: {} us (switching: {} us); in the second before the first kill (reference): {} us (calls under 50 us count as 0)",
        window(kill1_us, None),
        window(kill1_us, Some(true)),
        window(kill2_us, None),
        window(kill2_us, Some(true)),
        window(kill1_us.saturating_sub(1_000_000), None),
    );
    eprintln!(
        "switch-over: backup active {takeover_ms} ms after kill -9; longest next(): a {} us (at {} ms), b {} us (at {} ms); ids a {} b {}; switches a {} b {}; discarded a {} b {}",
        a.max_wait_us,
        a.max_wait_at_ms,
        b.max_wait_us,
        b.max_wait_at_ms,
        a.ids.len(),
        b.ids.len(),
        a.switches,
        b.switches,
        a.skipped,
        b.skipped
    );
}

/// Sends `sig` (`-STOP`, `-CONT`) to the agent.
fn signal(agent: &Agent, sig: &str) {
    let pid = agent.child.as_ref().expect("running").id();
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[test]
fn a_frozen_primary_is_replaced_by_missed_heartbeats_and_thawed_settles() {
    let cluster = FakeCluster::new(8, &["jobs"]);
    let server = cluster.start_server(1).unwrap();
    let (d1, d2, work) = (
        Dir::new("frozen-p"),
        Dir::new("frozen-b"),
        Dir::new("frozen-w"),
    );
    let (s1, s2) = (free_port(), free_port());
    let link = free_port();
    let (primary, backup) = start_pair(server.addr(), (&d1.0, s1), (&d2.0, s2), link, &work.0);
    wait_for("the pair to form", Duration::from_secs(20), || {
        pair_says(&d1.0, "active 1")
            && pair_says(&d2.0, "peer_state alive")
            && d1.0.join("jobs").exists()
            && d2.0.join("jobs").exists()
    });
    let stop = work.0.join("stop");
    let a = consumer(&d1.0, s1, work.0.join("a.ids"), &stop);
    std::thread::sleep(Duration::from_millis(800));
    // Frozen: no ICMP, no heartbeat. Only silence tells (the slow signal),
    // as for a host cut off.
    signal(&primary, "-STOP");
    wait_for("the backup to take over", Duration::from_secs(10), || {
        pair_says(&d2.0, "active 1")
    });
    let mut status = String::new();
    wait_for("unid status to show it", Duration::from_secs(10), || {
        status = unid_status(&[s2]);
        status.contains("backup ACTIVE") && status.contains("dead-missedheartbeats")
    });
    std::thread::sleep(Duration::from_millis(800));
    // Thawed: both think they are active for a moment; the later one (the
    // backup) yields, and exactly one stays active.
    signal(&primary, "-CONT");
    wait_for("one active side", Duration::from_secs(10), || {
        let (p, b) = (pair_says(&d1.0, "active 1"), pair_says(&d2.0, "active 1"));
        p != b && pair_says(&d1.0, "peer_state alive") && pair_says(&d2.0, "peer_state alive")
    });
    std::thread::sleep(Duration::from_millis(500));
    let m = metrics(s2);
    std::fs::write(&stop, b"").unwrap();
    let a = a.finish();
    assert_eq!(a.errors, 0);
    assert!(a.switches >= 1, "{} switches", a.switches);
    for w in a.ids.windows(2) {
        assert!(w[0] < w[1], "{} then {}", w[0], w[1]);
    }
    let unique: HashSet<u64> = a.ids.iter().copied().collect();
    assert_eq!(unique.len(), a.ids.len());
    assert!(
        metric(&m, "unid_agent_peer_lost_slow_total").unwrap_or(0) >= 1,
        "{m}"
    );
    eprintln!(
        "frozen primary: {status}; consumer: {} ids, {} switches, {} discarded, longest next() {} us",
        a.ids.len(),
        a.switches,
        a.skipped,
        a.max_wait_us
    );
    drop((primary, backup));
}
