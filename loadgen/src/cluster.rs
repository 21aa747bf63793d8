//! `--spawn-servers N`: `unid server` processes on 127.0.0.1 with free ports and temporary
//! data dirs, which the nemesis can kill (SIGKILL) and restart from their data dirs. As root
//! (for the partition rules, which match packets by their owner's uid) each server can run
//! as its own uid; for the clock jump, each can run under libfaketime with its wall clock
//! read from a file the nemesis rewrites.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, bail};
use rand::{Rng as _, SeedableRng as _};

/// Most servers `--spawn-servers` starts.
pub const SPAWN_SERVERS_MAX: usize = 7;

/// The lowest port [`free_port`] picks.
const PORT_MIN: u16 = 12_000;

/// Whether `port` is free on 127.0.0.1 for both TCP and UDP right now.
fn free_now(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok() && UdpSocket::bind(("127.0.0.1", port)).is_ok()
}

/// A port free for both TCP and UDP on 127.0.0.1, not in `given`, and below the kernel's
/// ephemeral range (`ip_local_port_range`) when there is room: a port taken from `bind(0)`
/// can be handed by the kernel to another socket or an outgoing connection (servers retrying
/// Raft connections use several a second) before the server binds it, and the server then
/// exits with `EADDRINUSE`; seen in CI as a cluster that never elected a leader. (The same
/// rule as `unid_engine::ports`, which loadgen must not link.)
pub fn free_port(given: &mut HashSet<u16>) -> anyhow::Result<u16> {
    let high: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    // RandomState is keyed randomly per process: concurrent loadgens pick different ports.
    let seed =
        std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    if high > PORT_MIN {
        for _ in 0..1_000 {
            let port = rng.random_range(PORT_MIN..high);
            if !given.contains(&port) && free_now(port) {
                given.insert(port);
                return Ok(port);
            }
        }
    }
    for _ in 0..100 {
        let t = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
        let port = t.local_addr()?.port();
        drop(t);
        if !given.contains(&port) && free_now(port) {
            given.insert(port);
            return Ok(port);
        }
    }
    bail!("no port free for both TCP and UDP on 127.0.0.1 after 1100 tries")
}

/// libfaketime's preload library (Debian package `libfaketime`, pulled in by `faketime`).
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Sets `cmd` up to run under libfaketime: its wall clock shifted by `offset` (e.g. `-1h`),
/// or read from `file` (re-read every second, so a running process can be made to jump).
/// The monotonic clock is left alone (`FAKETIME_DONT_FAKE_MONOTONIC`).
pub fn faketime_env(
    cmd: &mut Command,
    offset: Option<&str>,
    file: Option<&Path>,
) -> anyhow::Result<()> {
    if !Path::new(LIBFAKETIME).is_file() {
        bail!("{LIBFAKETIME} is missing: apt-get install -y faketime");
    }
    cmd.env("LD_PRELOAD", LIBFAKETIME)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    if let Some(o) = offset {
        cmd.env("FAKETIME", o);
    }
    if let Some(f) = file {
        cmd.env("FAKETIME_TIMESTAMP_FILE", f)
            .env("FAKETIME_CACHE_DURATION", "1");
    }
    Ok(())
}

/// Makes `path` (a directory loadgen created) owned by `uid` (gid the same).
pub fn give_to(path: &Path, uid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
        .with_context(|| format!("chown {} to uid {uid}", path.display()))
}

/// How the servers are started.
#[derive(Clone, Debug, Default)]
pub struct SpawnOptions {
    /// Server `id` runs as uid `uid_base + id` (root only).
    pub uid_base: Option<u32>,
    /// Each server's wall clock comes from a libfaketime file (see [`Cluster::jump_clock`]).
    pub faketime: bool,
    /// More arguments for every `unid server` (e.g. `--election-ms 40-70`).
    pub server_args: Vec<String>,
}

/// One spawned server.
pub struct Server {
    /// Its node id (1 ..= N).
    pub id: u64,
    /// Its UDP address.
    pub udp: SocketAddr,
    /// Its Raft (TCP) address.
    pub raft: SocketAddr,
    /// The uid it runs as, if not loadgen's.
    pub uid: Option<u32>,
    dir: PathBuf,
    log: PathBuf,
    clock_file: Option<PathBuf>,
    child: Option<Child>,
}

/// The spawned cluster; dropping it kills every server.
pub struct Cluster {
    /// The servers, server `id` at index `id - 1`.
    pub servers: Vec<Server>,
    unid_bin: PathBuf,
    peers: Vec<String>,
    server_args: Vec<String>,
}

impl Cluster {
    /// Starts `n` servers under `root` (data dirs and logs), the first with `--init`; their
    /// ports are added to `given`.
    pub fn spawn(
        unid_bin: &Path,
        root: &Path,
        n: usize,
        opts: &SpawnOptions,
        given: &mut HashSet<u16>,
    ) -> anyhow::Result<Cluster> {
        if n == 0 || n > SPAWN_SERVERS_MAX {
            bail!("--spawn-servers must be in 1..={SPAWN_SERVERS_MAX}, not {n}");
        }
        if !unid_bin.is_file() {
            bail!("--unid-bin {}: no such file", unid_bin.display());
        }
        let mut servers = Vec::with_capacity(n);
        for id in 1..=n as u64 {
            let uid = opts.uid_base.map(|b| b + id as u32);
            let dir = root.join(format!("server-{id}"));
            if let Some(u) = uid {
                // The server makes its data dir's contents; the dir is its own.
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("create {}", dir.display()))?;
                give_to(&dir, u)?;
            }
            let clock_file = opts
                .faketime
                .then(|| root.join(format!("server-{id}.faketime")));
            if let Some(f) = &clock_file {
                std::fs::write(f, "+0\n").with_context(|| format!("write {}", f.display()))?;
            }
            servers.push(Server {
                id,
                udp: SocketAddr::from(([127, 0, 0, 1], free_port(given)?)),
                raft: SocketAddr::from(([127, 0, 0, 1], free_port(given)?)),
                uid,
                dir,
                log: root.join(format!("server-{id}.log")),
                clock_file,
                child: None,
            });
        }
        let peers = servers
            .iter()
            .map(|s| format!("{}={}={}", s.id, s.raft, s.udp))
            .collect();
        let mut cluster = Cluster {
            servers,
            unid_bin: unid_bin.to_owned(),
            peers,
            server_args: opts.server_args.clone(),
        };
        for id in 1..=n as u64 {
            cluster.start(id, id == 1)?;
        }
        Ok(cluster)
    }

    /// The UDP addresses.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.servers.iter().map(|s| s.udp).collect()
    }

    fn server(&mut self, id: u64) -> anyhow::Result<&mut Server> {
        let i = usize::try_from(id.wrapping_sub(1)).unwrap_or(usize::MAX);
        self.servers
            .get_mut(i)
            .with_context(|| format!("no spawned server with id {id}"))
    }

    /// Whether server `id` runs (as far as this process knows).
    pub fn running(&mut self, id: u64) -> bool {
        self.server(id).map(|s| s.child.is_some()).unwrap_or(false)
    }

    /// Starts (or restarts, from its data dir) server `id`.
    pub fn start(&mut self, id: u64, init: bool) -> anyhow::Result<()> {
        let bin = self.unid_bin.clone();
        let peers = self.peers.clone();
        let extra = self.server_args.clone();
        let s = self.server(id)?;
        if s.child.is_some() {
            bail!("server {id} already runs");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&s.log)
            .with_context(|| format!("open {}", s.log.display()))?;
        let mut cmd = Command::new(&bin);
        cmd.args(["server", "--id", &id.to_string()])
            .args(["--listen", &s.udp.to_string()])
            .args(["--raft", &s.raft.to_string()])
            .arg("--data-dir")
            .arg(&s.dir)
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for p in &peers {
            cmd.args(["--peer", p]);
        }
        cmd.args(&extra);
        if init {
            cmd.arg("--init");
        }
        if let Some(f) = &s.clock_file {
            faketime_env(&mut cmd, None, Some(f))?;
        }
        if let Some(u) = s.uid {
            std::os::unix::process::CommandExt::uid(&mut cmd, u);
            std::os::unix::process::CommandExt::gid(&mut cmd, u);
        }
        s.child = Some(
            cmd.spawn()
                .with_context(|| format!("start {} server --id {id}", bin.display()))?,
        );
        Ok(())
    }

    /// SIGKILLs server `id` and reaps it; false if it was not running.
    pub fn kill9(&mut self, id: u64) -> bool {
        let Ok(s) = self.server(id) else {
            return false;
        };
        match s.child.take() {
            Some(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
                true
            }
            None => false,
        }
    }

    /// Sends SIGTERM to server `id` (a leader hands off and sends `LeaderChange`) and waits
    /// at most `timeout` for it to exit, then SIGKILLs it. Returns whether it exited by
    /// itself; false also if it was not running.
    pub fn term(&mut self, id: u64, timeout: std::time::Duration) -> bool {
        let Ok(s) = self.server(id) else {
            return false;
        };
        let Some(mut c) = s.child.take() else {
            return false;
        };
        let sent = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|st| st.success());
        let deadline = std::time::Instant::now() + timeout;
        while sent && std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// Shifts server `id`'s wall clock to `offset` from the real one (e.g. `-1h`), while it
    /// runs: libfaketime re-reads the file within a second. Needs [`SpawnOptions::faketime`].
    pub fn jump_clock(&mut self, id: u64, offset: &str) -> anyhow::Result<()> {
        let s = self.server(id)?;
        let f = s
            .clock_file
            .as_ref()
            .context("the servers were not started under libfaketime")?;
        std::fs::write(f, format!("{offset}\n")).with_context(|| format!("write {}", f.display()))
    }

    /// Servers that exited on their own (id, status), reaped.
    pub fn exited(&mut self) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        for s in &mut self.servers {
            if let Some(c) = s.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                out.push((s.id, st.to_string()));
                s.child = None;
            }
        }
        out
    }

    /// Server `id`'s process id, while it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        let s = self.servers.iter().find(|s| s.id == id)?;
        s.child.as_ref().map(|c| c.id())
    }

    /// Bytes in server `id`'s data dir (its redb file: the Raft log and the state).
    pub fn data_bytes(&self, id: u64) -> u64 {
        fn walk(p: &Path) -> u64 {
            let Ok(rd) = std::fs::read_dir(p) else {
                return 0;
            };
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        }
        self.servers
            .iter()
            .find(|s| s.id == id)
            .map_or(0, |s| walk(&s.dir))
    }

    /// The last `lines` lines of server `id`'s log.
    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let Some(s) = self.servers.iter().find(|s| s.id == id) else {
            return String::new();
        };
        let text = std::fs::read_to_string(&s.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for s in &mut self.servers {
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
