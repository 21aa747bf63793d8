//! Partitions with iptables rules on loopback (`-o lo` only), root only. Each spawned server
//! and real agent runs as its own uid (see `uid_base`), so a rule can match the packets a
//! process sends (`-m owner --uid-owner`): cutting A from B drops A's packets to B's Raft and
//! UDP ports and B's to A's. A cut connection carries nothing either way (the side that did
//! not open it only ever answers). Every rule carries the comment `unid-loadgen-PID` and is
//! removed when the run ends ([`Rules`]' `Drop`, which the Ctrl-C path reaches too); rules
//! left by a run that died (its PID gone) are removed at the next start, and
//! `loadgen --remove-rules` removes every loadgen rule.

use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// The comment prefix of loadgen's rules.
pub const TAG_PREFIX: &str = "unid-loadgen-";

/// The uids of this run: servers `base + id` (id 1..=7), agents `base + 16 + i`.
pub fn uid_base() -> u32 {
    200_000 + (std::process::id() % 100_000) * 32
}

/// Why partitions cannot run here, or `None` if they can.
pub fn unavailable() -> Option<String> {
    // Root: the effective uid, from /proc (no libc).
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false);
    if !root {
        return Some("not root (iptables rules need root)".into());
    }
    match Command::new("iptables")
        .args(["-w", "-S", "OUTPUT"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => None,
        Ok(s) => Some(format!("`iptables -S OUTPUT` failed ({s})")),
        Err(e) => Some(format!("no iptables ({e}): apt-get install -y iptables")),
    }
}

fn iptables(args: &[String]) -> anyhow::Result<()> {
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run iptables")?;
    if !out.status.success() {
        bail!(
            "iptables {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Removes loadgen's rules: all of them (`all`), else only those of runs whose PID is gone.
/// Returns how many.
pub fn remove_stale(all: bool) -> anyhow::Result<usize> {
    let out = Command::new("iptables")
        .args(["-w", "-S", "OUTPUT"])
        .stdin(Stdio::null())
        .output()
        .context("run iptables -S OUTPUT")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut n = 0;
    for line in text.lines().filter(|l| l.starts_with("-A OUTPUT ")) {
        let Some(i) = line.find(TAG_PREFIX) else {
            continue;
        };
        let pid: String = line[i + TAG_PREFIX.len()..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
        if !all && alive {
            continue;
        }
        // `-S` prints the rule as it was added; delete the same spec.
        let spec: Vec<String> = line["-A OUTPUT ".len()..]
            .split_whitespace()
            .map(|s| s.trim_matches('"').to_owned())
            .collect();
        let mut args = vec!["-D".to_owned(), "OUTPUT".to_owned()];
        args.extend(spec);
        if iptables(&args).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

/// The rules this run added; removed on drop.
pub struct Rules {
    tag: String,
    added: Vec<Vec<String>>,
}

impl Default for Rules {
    fn default() -> Self {
        Rules::new()
    }
}

impl Rules {
    /// No rules yet.
    pub fn new() -> Rules {
        Rules {
            tag: format!("{TAG_PREFIX}{}", std::process::id()),
            added: Vec::new(),
        }
    }

    fn add(&mut self, mut spec: Vec<String>) -> anyhow::Result<()> {
        spec.extend(["-m", "comment", "--comment", &self.tag, "-j", "DROP"].map(String::from));
        let mut args = vec!["-I".to_owned(), "OUTPUT".to_owned(), "1".to_owned()];
        args.extend(spec.iter().cloned());
        iptables(&args)?;
        self.added.push(spec);
        Ok(())
    }

    fn owner(uid: u32, proto: &str, dport: Option<u16>) -> Vec<String> {
        let mut v: Vec<String> = ["-o", "lo", "-p", proto, "-m", "owner", "--uid-owner"]
            .map(String::from)
            .to_vec();
        v.push(uid.to_string());
        if let Some(p) = dport {
            v.extend(["--dport".to_owned(), p.to_string()]);
        }
        v
    }

    /// Cuts the process of uid `a` from the server of uid `b` and ports `b_ports` (Raft, UDP)
    /// and back (`a_ports`), both ways.
    pub fn cut(
        &mut self,
        a: u32,
        a_ports: (u16, u16),
        b: u32,
        b_ports: (u16, u16),
    ) -> anyhow::Result<()> {
        self.add(Self::owner(a, "tcp", Some(b_ports.0)))?;
        self.add(Self::owner(a, "udp", Some(b_ports.1)))?;
        self.add(Self::owner(b, "tcp", Some(a_ports.0)))?;
        self.add(Self::owner(b, "udp", Some(a_ports.1)))
    }

    /// Drops every datagram sent to UDP port `port` on loopback (by anyone), and every
    /// datagram the process of `uid` sends: nothing reaches it, nothing leaves it.
    pub fn isolate_udp(&mut self, uid: u32, port: Option<u16>) -> anyhow::Result<()> {
        if let Some(p) = port {
            self.add(
                ["-o", "lo", "-p", "udp", "--dport", &p.to_string()]
                    .map(String::from)
                    .to_vec(),
            )?;
        }
        self.add(Self::owner(uid, "udp", None))
    }

    /// Removes every rule added; returns the first error (the others are still tried).
    pub fn clear(&mut self) -> anyhow::Result<()> {
        let mut first = Ok(());
        for spec in std::mem::take(&mut self.added).into_iter().rev() {
            let mut args = vec!["-D".to_owned(), "OUTPUT".to_owned()];
            args.extend(spec);
            if let Err(e) = iptables(&args)
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }
}

impl Drop for Rules {
    fn drop(&mut self) {
        if let Err(e) = self.clear() {
            eprintln!("loadgen: removing the partition rules: {e:#}");
        }
    }
}
