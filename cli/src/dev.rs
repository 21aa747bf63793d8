//! `unid dev`: a whole local cluster in one command, for a newcomer.
//!
//! Starts `--servers` servers and one agent as child processes of this same
//! binary (`unid server …`, `unid agent …`) on 127.0.0.1, creates the
//! `default` sequence, shows the first ids, prints how to get more, and runs
//! until Ctrl-C (SIGINT) or SIGTERM. Then it stops every child (SIGTERM, then
//! SIGKILL after a grace period) and removes what it made: the temporary
//! folder holding the servers' data and the children's logs, and the ring
//! file of the `default` sequence.
//!
//! Ports: server `i` (from 0) listens for UDP on `base_port + i` and for Raft
//! on `base_port + 100 + i`; with the defaults server 0 is on 7400, where
//! `unid status` and `unid sequence` look first. The agent serves the default
//! ring folder and the default localhost socket, so `unid next` needs no flag.

use anyhow::{Context as _, bail};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The most servers `unid dev` starts.
const SERVERS_MAX: u8 = 5;
/// How long the cluster may take to accept the `default` sequence.
const CLUSTER_READY_TIMEOUT_MS: u64 = 30_000;
/// How long the agent may take to open its localhost socket.
const AGENT_READY_TIMEOUT_MS: u64 = 15_000;
/// How long a child has to exit after SIGTERM before it is killed.
const STOP_GRACE_MS: u64 = 5_000;
/// How often the supervisor checks for a signal or a dead child.
const POLL_MS: u64 = 50;
/// Lines of a failed child's log shown on the terminal.
const LOG_TAIL_LINES: usize = 20;

/// Options of `unid dev`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// How many servers to start (1 to 5).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=SERVERS_MAX as i64))]
    servers: u8,
    /// UDP port of the first server; Raft ports start 100 above.
    #[arg(long, default_value_t = 7400)]
    base_port: u16,
    /// Width in bytes of the `default` sequence (2, 4, 8 or 16).
    #[arg(long, default_value_t = 8)]
    width: u8,
    /// Folder of the agent's shared-memory rings.
    #[arg(long, default_value = "/dev/shm/unid")]
    ring_dir: PathBuf,
    /// The agent's localhost socket.
    #[arg(long, default_value = "127.0.0.1:7411")]
    socket: SocketAddr,
    /// Let the children log to this terminal instead of to files.
    #[arg(long)]
    verbose: bool,
}

/// A child process this command started and must stop.
struct Managed {
    name: String,
    child: Child,
    log: Option<PathBuf>,
}

/// Everything `unid dev` started; stopping it is idempotent.
struct Cluster {
    work_dir: PathBuf,
    /// Ring files the agent created for us, removed once it has stopped.
    rings: Vec<PathBuf>,
    children: Vec<Managed>,
}

impl Cluster {
    fn spawn(&mut self, name: &str, args: &[String], verbose: bool) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("finding the unid executable")?;
        let mut cmd = Command::new(&exe);
        // Its own process group: Ctrl-C in a terminal signals the whole
        // foreground group, and the children must be stopped by us, in order,
        // not race us to exit.
        cmd.args(args).stdin(Stdio::null()).process_group(0);
        let log = if verbose {
            None
        } else {
            let path = self.work_dir.join(format!("{name}.log"));
            let file = std::fs::File::create(&path)
                .with_context(|| format!("creating log file {}", path.display()))?;
            cmd.stdout(file.try_clone()?).stderr(file);
            Some(path)
        };
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {} {}", exe.display(), args.join(" ")))?;
        self.children.push(Managed {
            name: name.to_owned(),
            child,
            log,
        });
        Ok(())
    }

    /// The first child that has exited, with its status.
    fn exited(&mut self) -> Option<(String, std::process::ExitStatus, Option<PathBuf>)> {
        for m in &mut self.children {
            if let Ok(Some(status)) = m.child.try_wait() {
                return Some((m.name.clone(), status, m.log.clone()));
            }
        }
        None
    }

    /// SIGTERM to every child (agent first: it was started last), then
    /// SIGKILL to any still running after the grace period.
    fn stop(&mut self) {
        for m in self.children.iter().rev() {
            let pid = nix::unistd::Pid::from_raw(m.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_millis(STOP_GRACE_MS);
        for m in self.children.iter_mut().rev() {
            loop {
                match m.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        eprintln!("unid dev: {} did not stop in time; killing it", m.name);
                        let _ = m.child.kill();
                        let _ = m.child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(POLL_MS)),
                }
            }
        }
        self.children.clear();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
        for ring in &self.rings {
            match std::fs::remove_file(ring) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => eprintln!("unid dev: could not remove {}: {e}", ring.display()),
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.work_dir) {
            eprintln!(
                "unid dev: could not remove {}: {e}",
                self.work_dir.display()
            );
        }
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// The arguments of server `index` (from 0) of `count`.
fn server_args(args: &Args, work_dir: &Path, index: u8, count: u8) -> Vec<String> {
    let udp = |i: u8| format!("127.0.0.1:{}", args.base_port + u16::from(i));
    let raft = |i: u8| format!("127.0.0.1:{}", args.base_port + 100 + u16::from(i));
    let mut v = vec![
        "server".to_owned(),
        "--id".to_owned(),
        (index + 1).to_string(),
        "--listen".to_owned(),
        udp(index),
        "--raft".to_owned(),
        raft(index),
        "--data-dir".to_owned(),
        work_dir
            .join(format!("server-{}", index + 1))
            .display()
            .to_string(),
    ];
    for peer in 0..count {
        v.push("--peer".to_owned());
        v.push(format!("{}={}={}", peer + 1, raft(peer), udp(peer)));
    }
    if index == 0 {
        v.push("--init".to_owned());
    }
    v
}

fn server_flags(args: &Args) -> Vec<String> {
    (0..args.servers)
        .flat_map(|i| {
            [
                "--server".to_owned(),
                format!("127.0.0.1:{}", args.base_port + u16::from(i)),
            ]
        })
        .collect()
}

/// Runs `unid ARGS…` to completion, returning its status and output.
fn run_unid(args: &[String]) -> anyhow::Result<std::process::Output> {
    let exe = std::env::current_exe().context("finding the unid executable")?;
    Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running unid {}", args.join(" ")))
}

/// Runs `unid dev`.
pub fn run(args: Args) -> anyhow::Result<()> {
    if !matches!(args.width, 2 | 4 | 8 | 16) {
        bail!("--width must be 2, 4, 8 or 16, not {}", args.width);
    }
    if args
        .base_port
        .checked_add(100 + u16::from(SERVERS_MAX))
        .is_none()
    {
        bail!(
            "--base-port {} leaves no room for the Raft ports",
            args.base_port
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing the Ctrl-C handler")?;
    }

    let work_dir = std::env::temp_dir().join(format!("unid-dev-{}", std::process::id()));
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;
    let mut cluster = Cluster {
        work_dir: work_dir.clone(),
        rings: vec![args.ring_dir.join("default")],
        children: Vec::new(),
    };

    for i in 0..args.servers {
        let a = server_args(&args, &work_dir, i, args.servers);
        cluster.spawn(&format!("server-{}", i + 1), &a, args.verbose)?;
    }

    // The cluster is ready when it accepts the `default` sequence (or says it
    // already has it, from an earlier run on the same data).
    let mut create = vec![
        "sequence".to_owned(),
        "create".to_owned(),
        "default".to_owned(),
        "--width".to_owned(),
        args.width.to_string(),
    ];
    create.extend(server_flags(&args));
    let deadline = Instant::now() + Duration::from_millis(CLUSTER_READY_TIMEOUT_MS);
    loop {
        check_alive(&mut cluster)?;
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let out = run_unid(&create)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || stderr.contains("already exists") {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "the cluster did not accept the `default` sequence within {} s: {}",
                CLUSTER_READY_TIMEOUT_MS / 1000,
                stderr.trim()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    let mut agent = vec![
        "agent".to_owned(),
        "--sequence".to_owned(),
        "default".to_owned(),
        "--ring-dir".to_owned(),
        args.ring_dir.display().to_string(),
        "--socket".to_owned(),
        args.socket.to_string(),
    ];
    agent.extend(server_flags(&args));
    cluster.spawn("agent", &agent, args.verbose)?;
    let deadline = Instant::now() + Duration::from_millis(AGENT_READY_TIMEOUT_MS);
    while TcpStream::connect_timeout(&args.socket, Duration::from_millis(200)).is_err() {
        check_alive(&mut cluster)?;
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the agent did not open {} within {} s",
                args.socket,
                AGENT_READY_TIMEOUT_MS / 1000
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // `unid next` finds this agent by its defaults; name the ring folder and socket when they
    // are not the defaults (the check below, and the hints, would ask another agent).
    let mut where_args: Vec<String> = Vec::new();
    if args.ring_dir != Path::new(unid::RING_DIR_DEFAULT) {
        where_args.extend(["--ring-dir".to_owned(), args.ring_dir.display().to_string()]);
    }
    if args.socket.to_string() != unid_agent::SOCKET_ADDR_DEFAULT {
        where_args.extend(["--socket".to_owned(), args.socket.to_string()]);
    }
    // Show ids coming out, through the same path `unid next` takes.
    let mut next_args = vec!["next".to_owned(), "-n".to_owned(), "5".to_owned()];
    next_args.extend(where_args.iter().cloned());
    let first = run_unid(&next_args)?;
    if !first.status.success() {
        bail!(
            "the agent is up but `unid next` failed: {}",
            String::from_utf8_lossy(&first.stderr).trim()
        );
    }
    let ids = String::from_utf8_lossy(&first.stdout);
    let ids: Vec<&str> = ids.lines().collect();
    println!(
        "unid dev: {} server{} and an agent are running on 127.0.0.1 (data and logs in {}).",
        args.servers,
        if args.servers == 1 { "" } else { "s" },
        work_dir.display()
    );
    println!(
        "unid dev: the first ids of sequence `default`: {}",
        ids.join(" ")
    );
    // The command as the user typed it (`./target/release/unid`, or `unid` on the PATH).
    let me = std::env::args().next().unwrap_or_else(|| "unid".to_owned());
    println!("unid dev: in another terminal:");
    let next_where: String = where_args.iter().map(|a| format!(" {a}")).collect();
    println!("    {me} next -n 5{next_where}            # five more ids, one per line");
    let mut status_where = String::new();
    if args.base_port != unid_agent::SERVER_PORT_DEFAULT {
        status_where.push_str(&format!(" --server 127.0.0.1:{}", args.base_port));
    }
    if args.socket.to_string() != unid_agent::SOCKET_ADDR_DEFAULT {
        status_where.push_str(&format!(" --agent {}", args.socket));
    }
    println!("    {me} status{status_where}               # servers, leader, agents, sequences");
    println!(
        "    exec 3<>/dev/tcp/{}/{}; echo 'NEXT default 3' >&3; head -n4 <&3   # any language: the localhost socket",
        args.socket.ip(),
        args.socket.port()
    );
    println!(
        "unid dev: ready. Ctrl-C stops everything and removes {}.",
        work_dir.display()
    );

    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        check_alive(&mut cluster)?;
        std::thread::sleep(Duration::from_millis(POLL_MS));
    }
    println!("unid dev: stopping.");
    drop(cluster);
    println!("unid dev: stopped and cleaned up.");
    Ok(())
}

/// Fails if a child died on its own.
fn check_alive(cluster: &mut Cluster) -> anyhow::Result<()> {
    if let Some((name, status, log)) = cluster.exited() {
        let shown = log.map(|p| tail(&p)).unwrap_or_default();
        bail!("{name} exited unexpectedly ({status}); its last log lines:\n{shown}");
    }
    Ok(())
}
