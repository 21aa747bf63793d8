//! `unid server`: one member of the Raft cluster, granting blocks over UDP.
//!
//! Every option can come from a flag or from `--config FILE` (TOML, same names with `_`
//! instead of `-`; `peer` is a list of `"ID=RAFT_ADDR=UDP_ADDR"` strings); a flag wins over the
//! file. SIGTERM or SIGINT stops the server gracefully: as leader it tells agents and the other
//! servers where the next leader is (`LeaderChange`) and hands leadership off. A second signal
//! exits at once.
//!
//! Under systemd (`Type=notify`, `NOTIFY_SOCKET` set) it sends `READY=1` once its UDP port is
//! bound and answering (Raft started, the cluster bootstrapped with `--init`), `STOPPING=1`
//! when a graceful stop begins, and `WATCHDOG=1` every half `WATCHDOG_USEC` if the unit has
//! `WatchdogSec=` (see `crate::notify`).

use anyhow::{Context as _, bail};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use unid_engine::server::{DEFAULT_RAFT_PORT, DEFAULT_UDP_PORT, Peer, ServerConfig};

/// Options of `unid server`.
#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// TOML file with any of the options below (flags win).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// This server's node id (1 .. 2^32), unique in the cluster.
    #[arg(long)]
    id: Option<u64>,
    /// UDP address for agents and tools [default: 127.0.0.1:7400]. Beyond loopback it
    /// needs --secret-file (or --insecure-without-secret).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// TCP address for Raft peers [default: 127.0.0.1:7500]. Beyond loopback it needs
    /// --secret-file (or --insecure-without-secret).
    #[arg(long, value_name = "ADDR")]
    raft: Option<SocketAddr>,
    /// A server of the cluster, as ID=RAFT_ADDR=UDP_ADDR (repeat; may include this one).
    #[arg(long, value_name = "ID=RAFT=UDP")]
    peer: Vec<String>,
    /// Where the Raft log and state live [default: ./unid-data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Bootstrap a new cluster with this server and the peers as voters. Run it on one
    /// server, once; later runs with --init log that the cluster exists and go on.
    #[arg(long)]
    init: bool,
    /// File holding the cluster secret (every datagram and peer frame is authenticated).
    #[arg(long, value_name = "FILE")]
    secret_file: Option<PathBuf>,
    /// UDP shards (threads with their own socket) [default: 1].
    #[arg(long)]
    shards: Option<usize>,
    /// How the shards wait for datagrams [default: auto]: `io-uring` (glommio executors),
    /// `threads` (plain threads in ppoll; for containers whose seccomp profile refuses
    /// io_uring, or kernel.io_uring_disabled), `auto` (io-uring if it works here, else threads,
    /// with a warning saying why).
    #[arg(long, value_name = "PLANE", value_parser = clap::builder::PossibleValuesParser::new(["auto", "io-uring", "threads"]))]
    data_plane: Option<String>,
    /// Agent lease in milliseconds [default: 10000].
    #[arg(long)]
    lease_ms: Option<u32>,
    /// Raft heartbeat interval in ms [default: 20]. Shorter detects a dead leader sooner
    /// and sends more heartbeats (each follower gets one per interval).
    #[arg(long, value_name = "MS")]
    heartbeat_ms: Option<u64>,
    /// Raft election timeout, randomized in MIN-MAX ms [default: 60-100]. MAX is also the
    /// leader lease (openraft 0.9): a new leader is elected about MAX + a draw in MIN-MAX
    /// after the old one died; shorter means faster failover and more risk of an election
    /// nobody needed when a busy machine delays heartbeats.
    #[arg(long, value_name = "MIN-MAX")]
    election_ms: Option<String>,
    /// Serve Prometheus metrics over HTTP on this address (`GET /metrics`) [default: off].
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Listen beyond loopback without a cluster secret: anyone who reaches the ports can
    /// take blocks, register agents, and create sequences. Only on a network you trust.
    #[arg(long)]
    insecure_without_secret: bool,
}

/// The `--config` file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    id: Option<u64>,
    listen: Option<SocketAddr>,
    raft: Option<SocketAddr>,
    #[serde(default)]
    peer: Vec<String>,
    data_dir: Option<PathBuf>,
    init: Option<bool>,
    secret_file: Option<PathBuf>,
    shards: Option<usize>,
    data_plane: Option<String>,
    lease_ms: Option<u32>,
    heartbeat_ms: Option<u64>,
    election_ms: Option<String>,
    metrics: Option<SocketAddr>,
    insecure_without_secret: Option<bool>,
}

/// `MIN-MAX` (milliseconds, MIN < MAX) of `--election-ms`.
fn parse_election(range: &str) -> anyhow::Result<(u64, u64)> {
    let bad =
        || anyhow::anyhow!("--election-ms {range:?}: give MIN-MAX in ms, MIN < MAX, e.g. 60-100");
    let (a, b) = range.split_once('-').ok_or_else(bad)?;
    let (min, max): (u64, u64) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if min == 0 || min >= max {
        return Err(bad());
    }
    Ok((min, max))
}

/// Whether `addr` (from this server's own `--peer` entry) can be the address it binds as
/// `bound`: same port, and the same IP unless `bound` is a wildcard (0.0.0.0 binds every IP).
fn same_endpoint(addr: SocketAddr, bound: SocketAddr) -> bool {
    addr.port() == bound.port() && (bound.ip().is_unspecified() || addr.ip() == bound.ip())
}

/// Refuses a `--peer` entry for this server whose addresses are not the ones it listens on:
/// the other servers would reach something else.
fn check_self_peer(peer: &Peer, raft: SocketAddr, udp: SocketAddr) -> anyhow::Result<()> {
    let raft_listed: SocketAddr = peer.raft_addr.parse().with_context(|| {
        format!(
            "peer {}: Raft address {:?} is not ip:port",
            peer.id, peer.raft_addr
        )
    })?;
    if !same_endpoint(raft_listed, raft) {
        bail!(
            "--peer {id}={raft_listed}=...: this server's Raft address there is not its --raft {raft}",
            id = peer.id
        );
    }
    if !same_endpoint(peer.udp_addr, udp) {
        bail!(
            "--peer {id}=...={listed}: this server's UDP address there is not its --listen {udp}",
            id = peer.id,
            listed = peer.udp_addr
        );
    }
    Ok(())
}

fn parse_peer(s: &str) -> anyhow::Result<Peer> {
    let mut parts = s.splitn(3, '=');
    let (Some(id), Some(raft), Some(udp)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("peer {s:?} is not ID=RAFT_ADDR=UDP_ADDR");
    };
    let id: u64 = id
        .parse()
        .with_context(|| format!("peer {s:?}: id {id:?} is not a number"))?;
    let raft_addr: SocketAddr = raft
        .parse()
        .with_context(|| format!("peer {s:?}: Raft address {raft:?} is not ip:port"))?;
    let udp_addr: SocketAddr = udp
        .parse()
        .with_context(|| format!("peer {s:?}: UDP address {udp:?} is not ip:port"))?;
    Ok(Peer {
        id,
        raft_addr: raft_addr.to_string(),
        udp_addr,
    })
}

/// Merges flags over the config file into a [`ServerConfig`].
fn build(args: Args) -> anyhow::Result<ServerConfig> {
    let file: FileConfig = match &args.config {
        Some(path) => crate::config::load(path)?,
        None => FileConfig::default(),
    };
    let id = args
        .id
        .or(file.id)
        .context("--id is required (or `id` in the config file)")?;
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from("unid-data"));
    let mut config = ServerConfig::new(id, data_dir);
    config.udp_addr = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], DEFAULT_UDP_PORT)));
    config.raft_addr = args
        .raft
        .or(file.raft)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], DEFAULT_RAFT_PORT)));
    config.init = args.init || file.init.unwrap_or(false);
    if let Some(shards) = args.shards.or(file.shards) {
        config.shards = shards;
    }
    if let Some(plane) = args.data_plane.or(file.data_plane) {
        config.data_plane = plane
            .parse()
            .map_err(|_| anyhow::anyhow!("data_plane {plane:?}: give auto, io-uring or threads"))?;
    }
    if let Some(lease_ms) = args.lease_ms.or(file.lease_ms) {
        config.lease_ms = lease_ms;
    }
    if let Some(ms) = args.heartbeat_ms.or(file.heartbeat_ms) {
        config.timing.heartbeat_ms = ms;
    }
    if let Some(range) = args.election_ms.or(file.election_ms) {
        let (min, max) = parse_election(&range)?;
        config.timing.election_min_ms = min;
        config.timing.election_max_ms = max;
    }
    let t = &config.timing;
    if t.heartbeat_ms == 0 || 2 * t.heartbeat_ms > t.election_min_ms {
        bail!(
            "--heartbeat-ms {} must be at least 1 and at most half the election minimum {} ms",
            t.heartbeat_ms,
            t.election_min_ms
        );
    }
    config.metrics_addr = args.metrics.or(file.metrics);
    config.insecure_without_secret =
        args.insecure_without_secret || file.insecure_without_secret.unwrap_or(false);
    let peers = if args.peer.is_empty() {
        file.peer
    } else {
        args.peer
    };
    let mut listed_self = false;
    for p in &peers {
        let peer = parse_peer(p)?;
        if peer.id == id {
            // This server itself, listed so that every server can share one peer list: its
            // addresses there are the ones the others use, so they must be this server's.
            check_self_peer(&peer, config.raft_addr, config.udp_addr)?;
            listed_self = true;
            continue;
        }
        config.peers.push(peer);
    }
    if !peers.is_empty() && !listed_self && !config.init {
        // Without --init a server only ever gets a vote from a cluster that lists it; one
        // missing from its own peer list would ask for votes forever.
        bail!(
            "--peer lists servers {} but not this server (--id {id}); list every server, this one too, \
             as ID=RAFT_ADDR=UDP_ADDR",
            peers
                .iter()
                .filter_map(|p| p.split('=').next())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(path) = args.secret_file.or(file.secret_file) {
        config.secret = Some(crate::config::read_secret(&path)?);
    }
    Ok(config)
}

/// Runs `unid server`; `notifier` reports readiness and stopping to systemd.
pub fn run(args: Args, notifier: unid_engine::sd_notify::Notifier) -> anyhow::Result<()> {
    let config = build(args)?;
    crate::logs::init("info,openraft=warn");
    crate::notify::log_start(&notifier);
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data dir {}", config.data_dir.display()))?;
    let id = config.id;
    let handle = unid_engine::server::run(config).context("starting the server")?;
    let stopper = handle.stopper();
    let signal_notifier = notifier.clone();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("unid-signals".into())
        .spawn(move || {
            let mut signals = signals.forever();
            if let Some(sig) = signals.next() {
                tracing::info!(id, signal = sig, "signal received: stopping gracefully");
                crate::notify::report(
                    signal_notifier.stopping("stopping: handing leadership over, then exiting"),
                );
                stopper.stop();
            }
            if let Some(sig) = signals.next() {
                tracing::warn!(id, signal = sig, "second signal: exiting without waiting");
                std::process::exit(1);
            }
        })
        .context("starting the signal thread")?;
    tracing::info!(
        id,
        udp = %handle.udp_addr(),
        raft = %handle.raft_addr(),
        metrics = ?handle.metrics_addr(),
        "server running"
    );
    crate::notify::report(notifier.ready(&format!(
        "serving: udp {}, raft {}",
        handle.udp_addr(),
        handle.raft_addr()
    )));
    crate::notify::spawn_watchdog(&notifier, || true)?;
    handle.wait().context("server")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn flags_win_over_the_file_and_self_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(
            &path,
            "id = 2\nmetrics = \"127.0.0.1:9400\"\nlisten = \"127.0.0.1:9000\"\nraft = \"127.0.0.1:3\"\npeer = [\"1=127.0.0.1:1=127.0.0.1:2\", \"2=127.0.0.1:3=127.0.0.1:9001\"]\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "x",
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:9001",
        ]);
        let c = build(cli.args).unwrap();
        assert_eq!(c.id, 2);
        assert_eq!(c.udp_addr, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.peers[0].id, 1);
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9400".parse().unwrap()));
    }

    #[test]
    fn config_errors_name_the_key_and_bad_peers_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, "id = 1\nlisten_addr = \"x\"\n").unwrap();
        let cli = Cli::parse_from(["x", "--config", path.to_str().unwrap()]);
        let err = format!("{:#}", build(cli.args).unwrap_err());
        assert!(err.contains("listen_addr"), "{err}");
        let err = format!("{:#}", parse_peer("1=127.0.0.1:1").unwrap_err());
        assert!(err.contains("ID=RAFT_ADDR=UDP_ADDR"), "{err}");
        let cli = Cli::parse_from(["x"]);
        assert!(format!("{:#}", build(cli.args).unwrap_err()).contains("--id"));
    }

    #[test]
    fn election_timing_flags_are_parsed_and_checked() {
        let cli = Cli::parse_from(["x", "--id", "1"]);
        let c = build(cli.args).unwrap();
        let d = unid_engine::server::ServerConfig::new(1, "x").timing;
        assert_eq!(
            (
                c.timing.heartbeat_ms,
                c.timing.election_min_ms,
                c.timing.election_max_ms
            ),
            (d.heartbeat_ms, d.election_min_ms, d.election_max_ms)
        );
        let cli = Cli::parse_from([
            "x",
            "--id",
            "1",
            "--heartbeat-ms",
            "10",
            "--election-ms",
            "40-70",
        ]);
        let c = build(cli.args).unwrap();
        assert_eq!(
            (
                c.timing.heartbeat_ms,
                c.timing.election_min_ms,
                c.timing.election_max_ms
            ),
            (10, 40, 70)
        );
        for bad in [
            ["--election-ms", "70-40"],
            ["--election-ms", "x"],
            ["--heartbeat-ms", "50"],
        ] {
            let cli = Cli::parse_from(["x", "--id", "1", bad[0], bad[1]]);
            assert!(build(cli.args).is_err(), "{bad:?} accepted");
        }
    }

    /// Issue 12 item 12: mistakes that used to start a server that could never work.
    #[test]
    fn a_peer_list_without_this_server_or_with_other_addresses_for_it_is_refused() {
        let build_from = |args: &[&str]| {
            let mut all = vec!["x"];
            all.extend_from_slice(args);
            build(Cli::parse_from(all).args).map_err(|e| format!("{e:#}"))
        };
        let others = ["--peer", "1=127.0.0.1:7501=127.0.0.1:7401"];
        let me = [
            "--id",
            "2",
            "--listen",
            "127.0.0.1:7402",
            "--raft",
            "127.0.0.1:7502",
        ];
        // Own id missing, without --init: refused, naming the listed ids.
        let err = build_from(&[&me[..], &others[..]].concat()).unwrap_err();
        assert!(
            err.contains("not this server (--id 2)") && err.contains('1'),
            "{err}"
        );
        // With --init it bootstraps from --raft: accepted.
        assert!(build_from(&[&me[..], &others[..], &["--init"]].concat()).is_ok());
        // Listed with the addresses it binds: accepted; with others: refused, naming them.
        let listed = ["--peer", "2=127.0.0.1:7502=127.0.0.1:7402"];
        assert!(build_from(&[&me[..], &others[..], &listed[..]].concat()).is_ok());
        let wrong_raft = ["--peer", "2=127.0.0.1:7999=127.0.0.1:7402"];
        let err = build_from(&[&me[..], &others[..], &wrong_raft[..]].concat()).unwrap_err();
        assert!(
            err.contains("127.0.0.1:7999") && err.contains("--raft"),
            "{err}"
        );
        let wrong_udp = ["--peer", "2=127.0.0.1:7502=127.0.0.2:7402"];
        let err = build_from(&[&me[..], &others[..], &wrong_udp[..]].concat()).unwrap_err();
        assert!(err.contains("--listen"), "{err}");
        // A wildcard bind may be listed under any of the host's addresses.
        let wild = [
            "--id",
            "2",
            "--listen",
            "0.0.0.0:7402",
            "--raft",
            "0.0.0.0:7502",
        ];
        let lan = ["--peer", "2=10.1.2.3:7502=10.1.2.3:7402"];
        assert!(build_from(&[&wild[..], &others[..], &lan[..]].concat()).is_ok());
    }
}
