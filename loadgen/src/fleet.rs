//! `--real-agents N`: real `unid agent` processes (the `unid` binary) that the ring
//! consumers take ids from. Each has its own ring dir, localhost socket and log under the
//! run's temporary dir, so a restarted agent finds its old ring dir again; the nemesis can
//! kill (SIGKILL) and restart them, or restart one with its wall clock shifted (libfaketime).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, bail};

use crate::cluster::{self, free_port};

/// Most real agents.
pub const REAL_AGENTS_MAX: usize = 16;

/// The `--name` real agent `i` registers with.
pub fn agent_name(i: usize) -> String {
    format!("loadgen-real-agent-{i}")
}

/// One real agent.
pub struct RealAgent {
    /// Its index (0-based).
    pub index: usize,
    /// Its ring dir.
    pub ring_dir: PathBuf,
    /// Its localhost socket.
    pub socket: SocketAddr,
    /// The uid it runs as (root runs with partitions only), else loadgen's.
    pub uid: Option<u32>,
    log: PathBuf,
    child: Option<Child>,
    /// Times it was started.
    pub starts: u32,
}

/// The real agents; dropping this kills them.
pub struct Fleet {
    /// Agent `i` at index `i`.
    pub agents: Vec<RealAgent>,
    unid_bin: PathBuf,
    servers: Vec<SocketAddr>,
    sequence: String,
    refill_period_ms: u64,
}

impl Fleet {
    /// Starts `n` agents against `servers` (the addresses they are given: the proxy's when
    /// it runs), serving `sequence`; files under `root`. With `uid_base`, agent `i` runs as
    /// uid `uid_base + i` (for the partition rules, which match on the owner).
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        unid_bin: &Path,
        root: &Path,
        n: usize,
        servers: Vec<SocketAddr>,
        sequence: &str,
        refill_period_ms: u64,
        uid_base: Option<u32>,
        given: &mut HashSet<u16>,
    ) -> anyhow::Result<Fleet> {
        if n > REAL_AGENTS_MAX {
            bail!("--real-agents must be in 0..={REAL_AGENTS_MAX}, not {n}");
        }
        let mut agents = Vec::with_capacity(n);
        for index in 0..n {
            let dir = root.join(format!("agent-{index}"));
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            let uid = uid_base.map(|b| b + index as u32);
            if let Some(u) = uid {
                cluster::give_to(&dir, u)?;
            }
            agents.push(RealAgent {
                index,
                ring_dir: dir.join("ring"),
                socket: SocketAddr::from(([127, 0, 0, 1], free_port(given)?)),
                uid,
                log: root.join(format!("agent-{index}.log")),
                child: None,
                starts: 0,
            });
        }
        let mut fleet = Fleet {
            agents,
            unid_bin: unid_bin.to_owned(),
            servers,
            sequence: sequence.to_owned(),
            refill_period_ms,
        };
        for i in 0..n {
            fleet.start(i, None)?;
        }
        Ok(fleet)
    }

    /// Starts (or restarts) agent `i`. With `clock`, under libfaketime with that offset of
    /// its wall clock (e.g. `-1h`; the monotonic clock is left alone).
    pub fn start(&mut self, i: usize, clock: Option<&str>) -> anyhow::Result<()> {
        let bin = self.unid_bin.clone();
        let servers = self.servers.clone();
        let sequence = self.sequence.clone();
        let refill = self.refill_period_ms;
        let a = self
            .agents
            .get_mut(i)
            .with_context(|| format!("no real agent {i}"))?;
        if a.child.is_some() {
            bail!("agent {i} already runs");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&a.log)
            .with_context(|| format!("open {}", a.log.display()))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("agent")
            .args(["--sequence", &sequence])
            .arg("--ring-dir")
            .arg(&a.ring_dir)
            .args(["--socket", &a.socket.to_string()])
            .args(["--name", &agent_name(i)])
            .args(["--refill-period-ms", &refill.to_string()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for s in &servers {
            cmd.args(["--server", &s.to_string()]);
        }
        if let Some(offset) = clock {
            cluster::faketime_env(&mut cmd, Some(offset), None)?;
        }
        if let Some(u) = a.uid {
            std::os::unix::process::CommandExt::uid(&mut cmd, u);
            std::os::unix::process::CommandExt::gid(&mut cmd, u);
        }
        a.child = Some(
            cmd.spawn()
                .with_context(|| format!("start {} agent (real agent {i})", bin.display()))?,
        );
        a.starts += 1;
        Ok(())
    }

    /// SIGKILLs agent `i` and reaps it; false if it was not running.
    pub fn kill9(&mut self, i: usize) -> bool {
        match self.agents.get_mut(i).and_then(|a| a.child.take()) {
            Some(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
                true
            }
            None => false,
        }
    }

    /// Agents that exited on their own (index, status), reaped.
    pub fn exited(&mut self) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for a in &mut self.agents {
            if let Some(c) = a.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                out.push((a.index, st.to_string()));
                a.child = None;
            }
        }
        out
    }

    /// The last `lines` lines of agent `i`'s log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let Some(a) = self.agents.get(i) else {
            return String::new();
        };
        let text = std::fs::read_to_string(&a.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for a in &mut self.agents {
            if let Some(mut c) = a.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
