//! `unid agent`: keeps this host's shared-memory rings full of ids and serves
//! them on a localhost socket (see `agent/README.md`).
//!
//! Every option can come from a flag or from `--config FILE` (TOML, same
//! names with `_` instead of `-`, `server` and `sequence` as lists); a flag
//! wins over the file. SIGINT or SIGTERM stops the agent: its rings are
//! closed (applications drain what is in them, then get "agent not running").
//!
//! Under systemd (`Type=notify`, `NOTIFY_SOCKET` set) it sends `READY=1` once its sockets are
//! bound and every ring is settled (serving, or the cluster answered that the sequence is
//! unknown or exhausted, or the ring could not be made), or after [`READY_WAIT`] at the
//! latest: an agent whose cluster is down still starts, serves its socket and keeps asking,
//! and its `STATUS=` line says so. `STATUS=` follows the rings and the connection afterwards;
//! `STOPPING=1` when a signal stops it; `WATCHDOG=1` from its main loop if the unit has
//! `WatchdogSec=`.

use anyhow::{Context as _, bail};
use serde::Deserialize;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use unid_agent::{AgentConfig, SERVER_PORT_DEFAULT, SOCKET_ADDR_DEFAULT, SequenceState, Status};

/// Longest wait for the rings before `READY=1` is sent anyway (systemd's `TimeoutStartSec=`
/// defaults to 90 s; an agent must not fail to start because the cluster is down).
pub const READY_WAIT: Duration = Duration::from_secs(5);

/// Options of `unid agent`.
#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// TOML file with any of the options below (flags win).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// A server of the cluster, `HOST[:PORT]` (port 7400 if omitted; repeat).
    #[arg(long, value_name = "ADDR")]
    server: Vec<String>,
    /// A sequence to serve (repeat) [default: default].
    #[arg(long, value_name = "NAME")]
    sequence: Vec<String>,
    /// Folder of the ring files [default: /dev/shm/unid].
    #[arg(long, value_name = "DIR")]
    ring_dir: Option<PathBuf>,
    /// Localhost socket address, or `off` [default: 127.0.0.1:7411].
    #[arg(long, value_name = "ADDR")]
    socket: Option<String>,
    /// How long a block should last at the measured rate, in ms [default: 1000, enough ids to
    /// ride over a leader failover].
    #[arg(long, value_name = "MS")]
    refill_period_ms: Option<u64>,
    /// File holding the cluster secret (every datagram is authenticated).
    #[arg(long, value_name = "FILE")]
    secret_file: Option<PathBuf>,
    /// This agent's name in the cluster [default: agent].
    #[arg(long)]
    name: Option<String>,
    /// Let the ring file's group consume too (mode 0660 instead of 0600).
    #[arg(long)]
    group_readable: bool,
    /// Let any local user take ids over the TCP socket (default: only the
    /// agent's user and root; group members use RING_DIR/.unid-socket).
    #[arg(long)]
    socket_any_user: bool,
    /// Run as the backup of the primary agent whose pair link listens at ADDR
    /// (its --peer-listen). Use another --ring-dir and --socket than the primary.
    #[arg(long, value_name = "ADDR")]
    backup_of: Option<String>,
    /// Where this agent's pair link listens (UDP). A primary needs it to have a
    /// backup; a backup defaults to port 0 (any) on the primary's address family.
    #[arg(long, value_name = "ADDR")]
    peer_listen: Option<String>,
    /// Pair heartbeat interval, in ms [default: 10].
    #[arg(long, value_name = "MS")]
    peer_heartbeat_ms: Option<u64>,
    /// The peer counts as dead after this long without a heartbeat, in ms [default: 100].
    #[arg(long, value_name = "MS")]
    peer_dead_ms: Option<u64>,
}

/// The `--config` file.
#[derive(Deserialize, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: Vec<String>,
    #[serde(default)]
    sequence: Vec<String>,
    ring_dir: Option<PathBuf>,
    socket: Option<String>,
    refill_period_ms: Option<u64>,
    secret_file: Option<PathBuf>,
    name: Option<String>,
    group_readable: Option<bool>,
    socket_any_user: Option<bool>,
    /// Ring slots (power of two).
    ring_capacity: Option<u64>,
    /// Blocks kept in each ring.
    blocks_ahead: Option<u32>,
    /// Smallest block asked for.
    block_ids_min: Option<u64>,
    /// Largest block asked for.
    block_ids_max: Option<u64>,
    /// Most localhost socket connections.
    socket_connections_max: Option<usize>,
    backup_of: Option<String>,
    peer_listen: Option<String>,
    peer_heartbeat_ms: Option<u64>,
    peer_dead_ms: Option<u64>,
}

/// `HOST[:PORT]` to addresses (port 7400 when missing).
fn resolve(server: &str) -> anyhow::Result<Vec<SocketAddr>> {
    if let Ok(a) = server.parse::<SocketAddr>() {
        return Ok(vec![a]);
    }
    let with_port =
        if server.contains(':') && !server.starts_with('[') && server.matches(':').count() == 1 {
            server.to_owned()
        } else if server.parse::<std::net::IpAddr>().is_ok() {
            return Ok(vec![SocketAddr::new(server.parse()?, SERVER_PORT_DEFAULT)]);
        } else {
            format!("{server}:{SERVER_PORT_DEFAULT}")
        };
    let addrs: Vec<SocketAddr> = with_port
        .to_socket_addrs()
        .with_context(|| format!("resolving server {server:?}"))?
        .collect();
    if addrs.is_empty() {
        bail!("server {server:?} resolves to no address");
    }
    Ok(addrs)
}

/// Flags over file over defaults.
fn build(args: Args) -> anyhow::Result<AgentConfig> {
    let file: FileConfig = match &args.config {
        Some(path) => crate::config::load(path)?,
        None => FileConfig::default(),
    };
    let servers = if args.server.is_empty() {
        file.server
    } else {
        args.server
    };
    if servers.is_empty() {
        bail!(
            "no server given: use --server HOST[:PORT] (repeatable) or `server = [..]` in the config file"
        );
    }
    let mut addrs = Vec::new();
    for s in &servers {
        for a in resolve(s)? {
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
    }
    let mut config = AgentConfig::new(addrs);
    let sequences = if args.sequence.is_empty() {
        file.sequence
    } else {
        args.sequence
    };
    if !sequences.is_empty() {
        config.sequences = sequences
            .iter()
            .map(|s| {
                s.parse()
                    .with_context(|| format!("sequence {s:?} is not a valid name"))
            })
            .collect::<anyhow::Result<_>>()?;
    }
    if let Some(d) = args.ring_dir.or(file.ring_dir) {
        config.ring_dir = d;
    }
    let socket = args
        .socket
        .or(file.socket)
        .unwrap_or_else(|| SOCKET_ADDR_DEFAULT.to_owned());
    config.socket = if socket == "off" {
        None
    } else {
        let addr: SocketAddr = socket
            .parse()
            .with_context(|| format!("socket {socket:?} is not IP:PORT (or `off`)"))?;
        if !addr.ip().is_loopback() {
            eprintln!(
                "unid agent: warning: socket {addr} is not a loopback address; anyone who can reach it can take ids"
            );
        }
        Some(addr)
    };
    if let Some(ms) = args.refill_period_ms.or(file.refill_period_ms) {
        config.sizing.refill_period_ms = ms;
        config.sizing.rate_tau_ms = ms;
    }
    if let Some(path) = args.secret_file.or(file.secret_file) {
        config.key = Some(unid_proto::AuthKey::from_secret(
            &crate::config::read_secret(&path)?,
        ));
    }
    if let Some(n) = args.name.or(file.name) {
        config.name = n;
    }
    if args.group_readable || file.group_readable == Some(true) {
        config.ring_mode = 0o660;
    }
    if args.socket_any_user || file.socket_any_user == Some(true) {
        config.socket_tcp_any_user = true;
    }
    if let Some(c) = file.ring_capacity {
        config.ring_capacity = c;
    }
    if let Some(b) = file.blocks_ahead {
        config.blocks_ahead = b;
    }
    if let Some(b) = file.block_ids_min {
        config.sizing.block_ids_min = b;
    }
    if let Some(b) = file.block_ids_max {
        config.sizing.block_ids_max = b;
    }
    if let Some(c) = file.socket_connections_max {
        config.socket_connections_max = c;
    }
    let backup_of = args.backup_of.or(file.backup_of);
    let peer_listen = args.peer_listen.or(file.peer_listen);
    if backup_of.is_some() || peer_listen.is_some() {
        let addr = |what: &str, s: &str| -> anyhow::Result<SocketAddr> {
            s.to_socket_addrs()
                .with_context(|| format!("{what} {s:?} is not HOST:PORT"))?
                .next()
                .with_context(|| format!("{what} {s:?} resolves to no address"))
        };
        let peer = backup_of
            .as_deref()
            .map(|s| addr("--backup-of", s))
            .transpose()?;
        let listen = match (&peer_listen, peer) {
            (Some(l), _) => addr("--peer-listen", l)?,
            (None, Some(p)) if p.is_ipv6() => "[::1]:0".parse()?,
            (None, Some(p)) if p.ip().is_loopback() => "127.0.0.1:0".parse()?,
            (None, _) => "0.0.0.0:0".parse()?,
        };
        let role = if peer.is_some() {
            unid_agent::PairRole::Backup
        } else {
            unid_agent::PairRole::Primary
        };
        let mut pair = unid_agent::PairConfig::new(role, listen, peer);
        if let Some(ms) = args.peer_heartbeat_ms.or(file.peer_heartbeat_ms) {
            pair.heartbeat_ms = ms;
        }
        if let Some(ms) = args.peer_dead_ms.or(file.peer_dead_ms) {
            pair.dead_ms = ms;
        }
        config.pair = Some(pair);
    }
    config.validate()?;
    Ok(config)
}

/// Whether every ring is settled: serving, or waiting on something only the cluster's
/// operator can change. A ring still `Waiting` has had no answer yet.
fn rings_settled(status: &Status) -> bool {
    status
        .sequences
        .iter()
        .all(|s| s.state != SequenceState::Waiting)
}

/// The `STATUS=` line: rings serving out of configured, and the connection.
fn status_line(status: &Status) -> String {
    let serving = status
        .sequences
        .iter()
        .filter(|s| s.state == SequenceState::Serving)
        .count();
    let connection = match status.connection {
        unid_agent::Connection::Registering => "registering with the cluster",
        unid_agent::Connection::Connected => "connected",
        unid_agent::Connection::Unreachable if serving > 0 => {
            "cluster unreachable, serving from the rings"
        }
        unid_agent::Connection::Unreachable => "cluster unreachable",
        unid_agent::Connection::Stopped => "stopped",
    };
    let mut line = format!(
        "{serving} of {} rings serving; {connection}",
        status.sequences.len()
    );
    for s in &status.sequences {
        match &s.state {
            SequenceState::Serving | SequenceState::Waiting => {}
            SequenceState::UnknownSequence => line.push_str(&format!("; {}: unknown", s.name)),
            SequenceState::Exhausted => line.push_str(&format!("; {}: exhausted", s.name)),
            SequenceState::RingError(e) => line.push_str(&format!("; {}: {e}", s.name)),
        }
    }
    line
}

/// Runs `unid agent` until SIGINT or SIGTERM; `notifier` reports readiness to systemd.
pub fn run(args: Args, notifier: unid_engine::sd_notify::Notifier) -> anyhow::Result<()> {
    crate::logs::init("info");
    crate::notify::log_start(&notifier);
    let config = build(args)?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing the signal handler")?;
    }
    let agent = unid_agent::run(config).context("starting the agent")?;
    let started = std::time::Instant::now();
    let mut ready = false;
    let mut last_line = String::new();
    let watchdog = notifier.watchdog_interval();
    let mut next_watchdog = started;
    while !stop.load(Ordering::Relaxed) {
        if !agent.is_running() {
            bail!("the agent's threads stopped unexpectedly");
        }
        if notifier.enabled() {
            let status = agent.status();
            let line = status_line(&status);
            if !ready && (rings_settled(&status) || started.elapsed() >= READY_WAIT) {
                crate::notify::report(notifier.ready(&line));
                ready = true;
            } else if ready && line != last_line {
                crate::notify::report(notifier.status(&line));
            }
            if ready {
                last_line = line;
            }
            // From this loop, which also checks the agent's threads: a stuck agent stops
            // pinging and systemd restarts it.
            if let Some(every) = watchdog
                && std::time::Instant::now() >= next_watchdog
            {
                crate::notify::report(notifier.watchdog());
                next_watchdog = std::time::Instant::now() + every;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    crate::notify::report(notifier.stopping("stopping: closing the rings"));
    agent.stop();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_keys_are_checked_and_flags_win() {
        let err =
            crate::config::parse::<FileConfig>("server = [\"127.0.0.1\"]\nsequnce = [\"a\"]\n")
                .unwrap_err();
        assert!(format!("{err}").contains("sequnce"), "{err}");
        let err = crate::config::parse::<FileConfig>("refill_period_ms = \"fast\"\n").unwrap_err();
        assert!(format!("{err}").contains("refill_period_ms"), "{err}");
        let dir = std::env::temp_dir().join(format!("unid-agent-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.toml");
        std::fs::write(
            &path,
            "server = [\"127.0.0.1\", \"127.0.0.2:7000\"]\nsequence = [\"orders\"]\nsocket = \"off\"\nrefill_period_ms = 250\nblocks_ahead = 3\n",
        )
        .unwrap();
        let config = build(Args {
            config: Some(path.clone()),
            sequence: vec!["flag".to_owned()],
            ..Args::default()
        })
        .unwrap();
        assert_eq!(
            config.servers,
            vec![
                "127.0.0.1:7400".parse::<SocketAddr>().unwrap(),
                "127.0.0.2:7000".parse().unwrap()
            ]
        );
        assert_eq!(config.sequences[0].as_str(), "flag");
        assert_eq!(config.socket, None);
        assert_eq!(config.sizing.refill_period_ms, 250);
        assert_eq!(config.blocks_ahead, 3);
        let err = build(Args::default()).unwrap_err();
        assert!(format!("{err}").contains("--server"), "{err}");
        let secret = dir.join("secret");
        std::fs::write(&secret, "\n").unwrap();
        let err = build(Args {
            server: vec!["127.0.0.1".to_owned()],
            secret_file: Some(secret),
            ..Args::default()
        })
        .unwrap_err();
        assert!(format!("{err}").contains("empty"), "{err}");
        // Pairing: a backup from the file, a primary from the flag.
        std::fs::write(
            &path,
            "server = [\"127.0.0.1\"]\nbackup_of = \"127.0.0.1:7412\"\npeer_dead_ms = 300\n",
        )
        .unwrap();
        let config = build(Args {
            config: Some(path.clone()),
            ..Args::default()
        })
        .unwrap();
        let pair = config.pair.unwrap();
        assert_eq!(pair.role, unid_agent::PairRole::Backup);
        assert_eq!(pair.peer, Some("127.0.0.1:7412".parse().unwrap()));
        assert_eq!(pair.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!((pair.heartbeat_ms, pair.dead_ms), (10, 300));
        let config = build(Args {
            server: vec!["127.0.0.1".to_owned()],
            peer_listen: Some("127.0.0.1:7412".to_owned()),
            ..Args::default()
        })
        .unwrap();
        assert_eq!(config.pair.unwrap().role, unid_agent::PairRole::Primary);
        let err = build(Args {
            server: vec!["127.0.0.1".to_owned()],
            backup_of: Some("127.0.0.1:7412".to_owned()),
            peer_dead_ms: Some(5),
            ..Args::default()
        })
        .unwrap_err();
        assert!(format!("{err}").contains("dead_ms"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
