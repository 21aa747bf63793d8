//! Rings in real shared memory (`/dev/shm`): errors, waiting, liveness, threads, processes,
//! SIGKILLed consumers, and a separately compiled C reader of the layout.
//!
//! Child processes re-execute this test binary with `UNID_RING_CHILD` set; the `child_entry`
//! test then acts as the consumer (and does nothing in a normal run).
#![cfg(not(loom))]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use unid_ring::{Consumer, ConsumerOptions, IdRange, Producer, ProducerOptions, RingError};

/// A fresh directory under /dev/shm, removed on drop.
struct TestDir(PathBuf);

impl TestDir {
    fn new(tag: &str) -> TestDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = PathBuf::from(format!(
            "/dev/shm/unid-ring-test-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        TestDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn opts(width: u8, capacity: u64) -> ProducerOptions {
    ProducerOptions {
        capacity,
        ..ProducerOptions::new(width)
    }
}

// ---------------------------------------------------------------- child processes

/// Child modes: `consume` takes until Closed, writing each range as "first count\n" to `OUT`.
/// `open` only opens and exits 0 (ok), 10 (PermissionDenied) or 11 (other error).
#[test]
fn child_entry() {
    let Ok(mode) = std::env::var("UNID_RING_CHILD") else {
        return;
    };
    let dir = PathBuf::from(std::env::var("UNID_RING_DIR").unwrap());
    let name = std::env::var("UNID_RING_NAME").unwrap();
    match mode.as_str() {
        "open" => std::process::exit(match Consumer::open(&dir, &name) {
            Ok(_) => 0,
            Err(RingError::PermissionDenied { .. }) => 10,
            Err(_) => 11,
        }),
        "consume" => {
            let out = PathBuf::from(std::env::var("UNID_RING_OUT").unwrap());
            let mut file = std::fs::File::create(out).unwrap();
            let c = Consumer::open(&dir, &name).unwrap();
            let mut rng = std::process::id() as u64 | 1;
            loop {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                match c.take_range_timeout(1 + rng % 8, Duration::from_secs(10)) {
                    // One write(2) per range: a kill loses at most the ranges it had claimed.
                    Ok(r) => file
                        .write_all(format!("{} {}\n", r.first, r.count).as_bytes())
                        .unwrap(),
                    Err(RingError::Closed) => std::process::exit(0),
                    Err(e) => {
                        eprintln!("child {}: {e}", std::process::id());
                        std::process::exit(3)
                    }
                }
            }
        }
        other => panic!("unknown child mode {other}"),
    }
}

fn spawn_child(mode: &str, dir: &Path, name: &str, out: Option<&Path>) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_entry",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ])
    .env("UNID_RING_CHILD", mode)
    .env("UNID_RING_DIR", dir)
    .env("UNID_RING_NAME", name)
    .stdout(Stdio::null());
    if let Some(out) = out {
        cmd.env("UNID_RING_OUT", out);
    }
    cmd
}

fn spawn_consumer(dir: &Path, name: &str, out: &Path) -> Child {
    spawn_child("consume", dir, name, Some(out))
        .spawn()
        .unwrap()
}

/// Ranges a child wrote (an unterminated last line, cut by a kill, is ignored).
fn read_ranges(path: &Path) -> Vec<IdRange> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines: Vec<&str> = text.split('\n').collect();
    lines.pop(); // after the last '\n': empty or a partial line
    lines
        .iter()
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            IdRange {
                first: a.parse().unwrap(),
                count: b.parse().unwrap(),
            }
        })
        .collect()
}

/// Checks per-file strict increase and global uniqueness; returns the number of distinct ids.
fn check_outputs(files: &[PathBuf]) -> u64 {
    let mut all: Vec<IdRange> = Vec::new();
    for f in files {
        let ranges = read_ranges(f);
        for w in ranges.windows(2) {
            assert!(
                w[0].last() < w[1].first,
                "{f:?}: not increasing at {}",
                w[1].first
            );
        }
        all.extend(ranges);
    }
    all.sort_unstable_by_key(|r| r.first);
    for w in all.windows(2) {
        assert!(
            w[0].last() < w[1].first,
            "id {} handed out twice",
            w[1].first
        );
    }
    all.iter().map(|r| r.count).sum()
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "child {} wedged: did not exit within {timeout:?}",
                child.id()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Pushes `first..end` in blocks of `block` ids, heartbeating, until done or `deadline`.
fn produce_all(p: &mut Producer, mut next: u128, end: u128, block: u64, deadline: Instant) {
    let mut last_hb = Instant::now();
    while next < end {
        assert!(Instant::now() < deadline, "producer wedged at id {next}");
        let n = block.min((end - next) as u64);
        let got = p.push(next, n).unwrap();
        next += u128::from(got);
        if got == 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
        if last_hb.elapsed() > Duration::from_millis(100) {
            p.heartbeat_now();
            last_hb = Instant::now();
        }
    }
}

// ---------------------------------------------------------------- errors and lifecycle

/// Threads may share one `&Consumer`; a `Producer` may move to another thread.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    const fn send<T: Send>() {}
    send_sync::<Consumer>();
    send::<Producer>();
};

#[test]
fn open_errors_are_typed() {
    let dir = TestDir::new("errors");
    std::fs::create_dir_all(dir.path()).unwrap();
    assert!(matches!(
        Consumer::open(dir.path(), "nope"),
        Err(RingError::NotFound { .. })
    ));
    assert!(matches!(
        Consumer::open(dir.path(), "../x"),
        Err(RingError::InvalidName { .. })
    ));
    assert!(matches!(
        Producer::create(dir.path(), "x", &opts(3, 8)),
        Err(RingError::InvalidConfig { .. })
    ));
    assert!(matches!(
        Producer::create(dir.path(), "x", &opts(8, 6)),
        Err(RingError::InvalidConfig { .. })
    ));
    std::fs::write(dir.path().join("junk"), vec![7u8; 4096]).unwrap();
    assert!(matches!(
        Consumer::open(dir.path(), "junk"),
        Err(RingError::BadMagic { .. })
    ));

    let _p = Producer::create(dir.path(), "seq", &opts(8, 8)).unwrap();
    let file = dir.path().join("seq");
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(&bytes[..8], b"UNIDRING");
    let mut v2 = bytes.clone();
    v2[8] = 2;
    std::fs::write(dir.path().join("v2"), &v2).unwrap();
    assert!(matches!(
        Consumer::open(dir.path(), "v2"),
        Err(RingError::UnsupportedVersion {
            found: 2,
            supported: 1,
            ..
        })
    ));
    std::fs::write(dir.path().join("short"), &bytes[..200]).unwrap();
    assert!(matches!(
        Consumer::open(dir.path(), "short"),
        Err(RingError::Corrupt { .. })
    ));
    let mut w = bytes.clone();
    w[12] = 5;
    std::fs::write(dir.path().join("width5"), &w).unwrap();
    assert!(matches!(
        Consumer::open(dir.path(), "width5"),
        Err(RingError::Corrupt { .. })
    ));
    // No temporary file left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        names.iter().all(|n| !n.to_string_lossy().starts_with('.')),
        "{names:?}"
    );
}

#[test]
fn file_mode_and_permission_denied() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TestDir::new("perm");
    let _a = Producer::create(dir.path(), "private", &opts(8, 8)).unwrap();
    let _b = Producer::create(
        dir.path(),
        "shared",
        &ProducerOptions {
            mode: 0o660,
            group: Some(65534),
            ..opts(8, 8)
        },
    )
    .unwrap();
    let mode = |n: &str| {
        std::fs::metadata(dir.path().join(n))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("private"), 0o600);
    assert_eq!(mode("shared"), 0o660);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: skipping the other-user half of this test");
        return;
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    use std::os::unix::process::CommandExt;
    let run_as_nobody = |name: &str| {
        spawn_child("open", dir.path(), name, None)
            .uid(65534)
            .gid(65534)
            .status()
            .map(|s| s.code())
    };
    let private = match run_as_nobody("private") {
        Ok(code) => code,
        Err(e) => {
            // E.g. the test binary sits in a directory uid 65534 cannot enter.
            eprintln!("cannot run the test binary as uid 65534 ({e}): skipping");
            return;
        }
    };
    assert_eq!(private, Some(10), "0600 ring must refuse another user");
    assert_eq!(
        run_as_nobody("shared").ok().flatten(),
        Some(0),
        "0660 ring must admit its group"
    );
}

#[test]
fn closed_after_drain_and_agent_dead() {
    let dir = TestDir::new("life");
    let mut p = Producer::create(dir.path(), "s", &opts(4, 4)).unwrap();
    let c = Consumer::open(dir.path(), "s").unwrap();
    assert_eq!(c.width(), 4);
    assert!(matches!(c.try_take(), Err(RingError::WouldBlock)));
    p.push(5, 3).unwrap();
    assert_eq!(p.ids_available(), 3);
    drop(p);
    assert!(matches!(c.check_agent(), Err(RingError::Closed)));
    // Published ids are still handed out, then Closed.
    assert_eq!(
        c.try_take_range(10).unwrap(),
        IdRange { first: 5, count: 3 }
    );
    assert!(matches!(c.try_take(), Err(RingError::Closed)));
    assert!(matches!(
        c.take_timeout(Duration::from_secs(5)),
        Err(RingError::Closed)
    ));

    // A stale heartbeat: the agent counts as dead once the ring is empty.
    let p = Producer::create(dir.path(), "t", &opts(8, 4)).unwrap();
    let c = Consumer::open_with(
        dir.path(),
        "t",
        ConsumerOptions {
            agent_stale_ms: 100,
            ..ConsumerOptions::default()
        },
    )
    .unwrap();
    p.heartbeat(unid_ring::monotonic_ms().saturating_sub(1000));
    assert!(matches!(c.try_take(), Err(RingError::AgentDead { .. })));
    let t0 = Instant::now();
    assert!(matches!(
        c.take_timeout(Duration::from_secs(10)),
        Err(RingError::AgentDead { .. })
    ));
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "dead agent noticed promptly"
    );
    p.heartbeat_now();
    assert!(c.check_agent().is_ok());
    // Replacing the ring: the old mapping keeps working until its producer is gone.
    let mut p2 = Producer::create(dir.path(), "t", &opts(8, 4)).unwrap();
    p2.push(1, 1).unwrap();
    drop(p);
    assert!(matches!(c.try_take(), Err(RingError::Closed)));
    let c2 = Consumer::open(dir.path(), "t").unwrap();
    assert_eq!(c2.try_take().unwrap(), 1);

    // A ring served by another live agent (pid 1, fresh heartbeat) is not replaced.
    let mut bytes = std::fs::read(dir.path().join("t")).unwrap();
    bytes[40..44].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(dir.path().join("owned"), &bytes).unwrap();
    assert!(matches!(
        Producer::create(dir.path(), "owned", &opts(8, 4)),
        Err(RingError::InUse { pid: 1, .. })
    ));
    drop(p2);
}

#[test]
fn dead_agent_pid_noticed_while_waiting() {
    let dir = TestDir::new("pid");
    let p = Producer::create(dir.path(), "s", &opts(8, 4)).unwrap();
    // Forge a pid that does not exist (pid_max is below 2^22 + 1 on Linux).
    let path = dir.path().join("s");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[40..44].copy_from_slice(&0x40_0001u32.to_le_bytes());
    std::fs::write(dir.path().join("forged"), &bytes).unwrap();
    let c = Consumer::open(dir.path(), "forged").unwrap();
    let t0 = Instant::now();
    assert!(matches!(
        c.take_timeout(Duration::from_secs(10)),
        Err(RingError::AgentDead { .. })
    ));
    assert!(t0.elapsed() < Duration::from_secs(2));
    drop(p);
}

#[test]
fn waiter_is_woken_by_push_and_times_out_otherwise() {
    let dir = TestDir::new("wait");
    let p = Producer::create(dir.path(), "s", &opts(8, 4)).unwrap();
    let c = Consumer::open(dir.path(), "s").unwrap();
    let t0 = Instant::now();
    assert!(matches!(
        c.take_timeout(Duration::from_millis(120)),
        Err(RingError::TimedOut)
    ));
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(120) && waited < Duration::from_secs(2),
        "{waited:?}"
    );

    let p = Arc::new(std::sync::Mutex::new(p));
    let p2 = Arc::clone(&p);
    let pusher = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        p2.lock().unwrap().push(42, 1).unwrap();
    });
    // Default sleep slice is 50 ms; a 30 s timeout returning quickly proves the wake works.
    let t0 = Instant::now();
    assert_eq!(c.take_timeout(Duration::from_secs(30)).unwrap(), 42);
    assert!(t0.elapsed() < Duration::from_secs(5));
    pusher.join().unwrap();
}

// ---------------------------------------------------------------- stress

fn thread_stress(width: u8, total: u64, consumers: usize) {
    let dir = TestDir::new("threads");
    let name = format!("w{width}");
    let mut p = Producer::create(dir.path(), &name, &opts(width, 16)).unwrap();
    let c = Arc::new(Consumer::open(dir.path(), &name).unwrap());
    let handles: Vec<_> = (0..consumers)
        .map(|i| {
            let c = Arc::clone(&c);
            std::thread::spawn(move || {
                let mut got: Vec<IdRange> = Vec::new();
                loop {
                    let r = if i % 2 == 0 {
                        c.try_take_range(1 + i as u64)
                    } else {
                        c.take_range_timeout(3, Duration::from_secs(5))
                    };
                    match r {
                        Ok(r) => got.push(r),
                        Err(RingError::WouldBlock) => std::thread::yield_now(),
                        Err(RingError::Closed) => return got,
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    let first = 1u128;
    let end = first + u128::from(total);
    produce_all(
        &mut p,
        first,
        end,
        37,
        Instant::now() + Duration::from_secs(30),
    );
    drop(p);
    let mut all = Vec::new();
    for h in handles {
        let got = h.join().unwrap();
        assert!(
            got.windows(2).all(|w| w[0].last() < w[1].first),
            "per-consumer order"
        );
        all.extend(got.iter().flat_map(|r| r.first..=r.last()));
    }
    all.sort_unstable();
    assert_eq!(all.len() as u64, total);
    assert!(
        all.iter().zip(first..).all(|(a, b)| *a == b),
        "every id exactly once"
    );
}

#[test]
fn threads_stress_all_widths() {
    thread_stress(2, 65_000, 3); // ids 1..=65_000 < 65_535
    thread_stress(4, 100_000, 3);
    thread_stress(8, 100_000, 3);
    thread_stress(16, 100_000, 3);
}

#[test]
fn threads_stress_width16_high_ids() {
    let dir = TestDir::new("hi");
    let mut p = Producer::create(dir.path(), "s", &opts(16, 4)).unwrap();
    let c = Consumer::open(dir.path(), "s").unwrap();
    let base = u128::MAX - 10;
    assert_eq!(p.push(base, 11).unwrap(), 11);
    let r = c.try_take_range(100).unwrap();
    assert_eq!((r.first, r.count), (base, 11));
    assert!(matches!(p.push(0, 1), Err(RingError::OutOfRange { .. })));
}

#[test]
fn processes_stress() {
    // Every width; width 2 stays below 65,535 ids. Width 16 starts above 2^64.
    for (width, first) in [(2u8, 1u128), (4, 1 << 31), (8, 1 << 60), (16, 3 << 64)] {
        process_stress_one(width, first);
    }
}

fn process_stress_one(width: u8, first: u128) {
    let dir = TestDir::new("procs");
    let mut p = Producer::create(dir.path(), "s", &opts(width, 16)).unwrap();
    let outs: Vec<PathBuf> = (0..3)
        .map(|i| dir.path().join(format!("out-{i}")))
        .collect();
    let mut children: Vec<Child> = outs
        .iter()
        .map(|o| spawn_consumer(dir.path(), "s", o))
        .collect();
    let total = 60_000u64;
    produce_all(
        &mut p,
        first,
        first + u128::from(total),
        41,
        Instant::now() + Duration::from_secs(40),
    );
    drop(p);
    for ch in &mut children {
        assert!(wait_with_timeout(ch, Duration::from_secs(20)).success());
    }
    assert_eq!(
        check_outputs(&outs),
        total,
        "no kill: every id taken exactly once"
    );
    let all: Vec<IdRange> = outs.iter().flat_map(|o| read_ranges(o)).collect();
    assert_eq!(all.iter().map(|r| r.first).min(), Some(first));
    assert_eq!(
        all.iter().map(|r| r.last()).max(),
        Some(first + u128::from(total) - 1)
    );
}

#[test]
fn sigkilled_consumers_wedge_nothing_and_repeat_nothing() {
    let dir = TestDir::new("kill");
    let mut p = Producer::create(dir.path(), "s", &opts(8, 16)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut outs: Vec<PathBuf> = Vec::new();
    let mut n_out = 0;
    let mut next_out = |outs: &mut Vec<PathBuf>| {
        n_out += 1;
        let o = dir.path().join(format!("out-{n_out}"));
        outs.push(o.clone());
        o
    };
    // Two consumers that are never killed, plus a pool that is killed and respawned.
    let mut survivors: Vec<Child> = (0..2)
        .map(|_| spawn_consumer(dir.path(), "s", &next_out(&mut outs)))
        .collect();
    let mut victims: Vec<Child> = (0..2)
        .map(|_| spawn_consumer(dir.path(), "s", &next_out(&mut outs)))
        .collect();
    // Ids pushed so far; the producer paces itself so it runs through the whole kill phase.
    let pushed = Arc::new(AtomicU64::new(0));
    let producer = {
        let stop = Arc::clone(&stop);
        let pushed = Arc::clone(&pushed);
        std::thread::spawn(move || {
            let mut next = 1u128;
            let mut last_progress = Instant::now();
            let mut last_hb = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let got = p.push(next, 200).unwrap();
                next += u128::from(got);
                pushed.store((next - 1) as u64, Ordering::Relaxed);
                if got > 0 {
                    last_progress = Instant::now();
                }
                assert!(
                    last_progress.elapsed() < Duration::from_secs(10),
                    "producer wedged at {next}"
                );
                std::thread::sleep(Duration::from_micros(100));
                if last_hb.elapsed() > Duration::from_millis(100) {
                    p.heartbeat_now();
                    last_hb = Instant::now();
                }
            }
            drop(p); // closes the ring
            (next - 1) as u64
        })
    };
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let kills = 40;
    for k in 0..kills {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(10 + rng % 30));
        let i = (rng >> 32) as usize % victims.len();
        let mut v = victims.swap_remove(i);
        v.kill().unwrap(); // SIGKILL, wherever it is
        let _ = v.wait();
        let before = pushed.load(Ordering::Relaxed);
        victims.push(spawn_consumer(dir.path(), "s", &next_out(&mut outs)));
        if k % 10 == 9 {
            // Progress after kills: the producer can still refill (consumers still take).
            let t0 = Instant::now();
            while pushed.load(Ordering::Relaxed) == before {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "no progress after kill {k}"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let total = producer.join().expect("producer never wedged");
    for ch in survivors.iter_mut().chain(victims.iter_mut()) {
        let st = wait_with_timeout(ch, Duration::from_secs(30));
        assert!(st.success(), "consumer exit {st:?}");
    }
    let distinct = check_outputs(&outs);
    // Killed consumers lose what they claimed but had not written; everything else arrived.
    assert!(
        distinct <= total && distinct > total / 2,
        "distinct {distinct} of {total}"
    );
    assert!(
        total > 10_000,
        "the producer kept going through the kills: {total} ids"
    );
    eprintln!(
        "{kills} kills: {distinct} of {total} ids recorded, {} lost",
        total - distinct
    );
}

/// A consumer SIGKILLed while asleep on the futex leaves `waiters` one too high (documented):
/// the producer then wakes on every push, and everyone else carries on.
#[test]
fn consumer_killed_while_asleep_wedges_nothing() {
    let dir = TestDir::new("sleepkill");
    let mut p = Producer::create(dir.path(), "s", &opts(8, 4)).unwrap();
    let out = dir.path().join("out-sleeper");
    let mut sleeper = spawn_consumer(dir.path(), "s", &out);
    let waiters = || {
        let bytes = std::fs::read(dir.path().join("s")).unwrap();
        u32::from_le_bytes(bytes[268..272].try_into().unwrap())
    };
    let t0 = Instant::now();
    while waiters() == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "child never went to sleep"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    sleeper.kill().unwrap();
    let _ = sleeper.wait();
    assert_eq!(waiters(), 1, "the dead sleeper stays registered");
    assert_eq!(p.push(100, 10).unwrap(), 10);
    let c = Consumer::open(dir.path(), "s").unwrap();
    assert_eq!(c.take_timeout(Duration::from_secs(5)).unwrap(), 100);
    let waiter = std::thread::spawn({
        let dir = dir.path().to_path_buf();
        move || {
            let c = Consumer::open(&dir, "s").unwrap();
            let mut got = Vec::new();
            for _ in 0..11 {
                got.push(c.take_timeout(Duration::from_secs(10)).unwrap());
            }
            got
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(p.push(200, 2).unwrap(), 2);
    let got = waiter.join().unwrap();
    assert_eq!(got[..9], (101..110).collect::<Vec<u128>>()[..]);
    assert_eq!(got[9..], [200, 201]);
    assert!(read_ranges(&out).is_empty(), "the sleeper took nothing");
}

// ---------------------------------------------------------------- separately built reader

/// The layout as documented, read by a C program compiled here with the system `cc`: a reader
/// that shares no code (and no compiler) with this crate. It checks every header field and
/// offset, then takes one id with the documented protocol (`__atomic` builtins).
#[test]
fn c_program_reads_layout_and_takes_an_id() {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    if Command::new(&cc).arg("--version").output().is_err() {
        eprintln!("no C compiler ({cc}): skipping");
        return;
    }
    let dir = TestDir::new("c");
    std::fs::create_dir_all(dir.path()).unwrap();
    let exe = dir.path().join("layout_check");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/layout_check.c");
    let out = Command::new(&cc)
        .args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (width, first) in [
        (2u8, 1000u128),
        (4, 4_000_000_000),
        (8, 1 << 60),
        (16, (7u128 << 64) | 5),
    ] {
        let name = format!("w{width}");
        let mut p = Producer::create(dir.path(), &name, &opts(width, 8)).unwrap();
        p.push(first, 10).unwrap();
        p.push(first + 20, 5).unwrap();
        let c = Consumer::open(dir.path(), &name).unwrap();
        assert_eq!(c.try_take_range(3).unwrap(), IdRange { first, count: 3 });
        let out = Command::new(&exe)
            .arg(dir.path().join(&name))
            .args([width.to_string(), "8".into()])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "C reader: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The C program took id first + 3 and printed it as hi:lo hex words.
        let expect = first + 3;
        assert_eq!(
            stdout.trim(),
            format!(
                "ok id={:016x}:{:016x} tail=2",
                (expect >> 64) as u64,
                expect as u64
            )
        );
        assert_eq!(c.try_take().unwrap(), first + 4);
        drop(p);
    }
}

/// Issue 12 item 2: a ring folder made by someone else (world-writable, a foreign owner, a
/// symlink) is refused by the agent and by consumers, and so is a foreign ring file.
#[test]
fn squatted_folder_and_foreign_files_are_refused() {
    use std::os::unix::fs::{PermissionsExt, symlink};
    let insecure = |r: Result<(), RingError>| matches!(r, Err(RingError::Insecure { .. }));
    let create = |d: &Path| Producer::create(d, "s", &opts(8, 4)).map(drop);
    let open = |d: &Path| Consumer::open(d, "s").map(drop);

    // A folder the agent creates itself: 0700 (0750 with a group).
    let dir = TestDir::new("mine");
    let mut p = Producer::create(dir.path(), "s", &opts(8, 4)).unwrap();
    let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700);
    p.push(1, 10).unwrap();
    open(dir.path()).unwrap();
    // The same folder made writable by others: both sides refuse it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    assert!(insecure(open(dir.path())));
    assert!(insecure(create(dir.path())));
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    // A ring file writable by others.
    let ring = dir.path().join("s");
    std::fs::set_permissions(&ring, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert!(insecure(open(dir.path())));
    std::fs::set_permissions(&ring, std::fs::Permissions::from_mode(0o600)).unwrap();
    open(dir.path()).unwrap();

    // A squatted folder: a symlink to a folder someone prepared.
    let elsewhere = TestDir::new("elsewhere");
    let _q = Producer::create(elsewhere.path(), "s", &opts(8, 4)).unwrap();
    let link = TestDir::new("link");
    symlink(elsewhere.path(), link.path()).unwrap();
    assert!(insecure(open(link.path())));
    assert!(insecure(create(link.path())));
    let _ = std::fs::remove_file(link.path());
    // A symlinked ring file in a good folder.
    let good = TestDir::new("good");
    let _r = Producer::create(good.path(), "t", &opts(8, 4)).unwrap();
    symlink(elsewhere.path().join("s"), good.path().join("s")).unwrap();
    assert!(insecure(open(good.path())));

    // A foreign owner (root only: chown needs it).
    if unid_ring::secure::euid() != 0 {
        eprintln!("not root: skipping the foreign-owner half of this test");
        return;
    }
    let other = 65534;
    let squat = TestDir::new("squat");
    std::fs::create_dir(squat.path()).unwrap();
    std::os::unix::fs::chown(squat.path(), Some(other), Some(other)).unwrap();
    std::fs::set_permissions(squat.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(
        insecure(create(squat.path())),
        "agent took a foreign folder"
    );
    // A forged ring the squatter put there (made by us, then given away).
    std::os::unix::fs::chown(squat.path(), Some(0), Some(0)).unwrap();
    let forged = Producer::create(squat.path(), "s", &opts(8, 4)).unwrap();
    drop(forged);
    std::os::unix::fs::chown(squat.path(), Some(other), Some(other)).unwrap();
    std::os::unix::fs::chown(squat.path().join("s"), Some(other), Some(other)).unwrap();
    assert!(
        insecure(open(squat.path())),
        "root consumer mapped a foreign folder"
    );
    // A consumer told the agent runs as that uid accepts it.
    let trusting = ConsumerOptions {
        agent_uid: Some(other),
        ..ConsumerOptions::default()
    };
    Consumer::open_with(squat.path(), "s", trusting.clone()).unwrap();
    // A foreign file in our own folder.
    std::os::unix::fs::chown(squat.path(), Some(0), Some(0)).unwrap();
    assert!(
        insecure(open(squat.path())),
        "root consumer mapped a foreign file"
    );
    Consumer::open_with(squat.path(), "s", trusting).unwrap();
}
