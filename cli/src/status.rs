//! `unid status`: the cluster at a glance, asked of the leader (through any server given by
//! `--server`): servers with role, term and health; the leader; registered agents; per
//! sequence the committed ceiling and how much of the width is left. Then this host's agents,
//! asked on their localhost sockets (`--agent`, default the usual socket if one answers): each
//! one's cluster connection, network, paths to the servers, and its primary/backup pair with
//! which side is active.

use anyhow::bail;
use unid_engine::client::{Answer, Client};
use unid_proto::{Message, NodeRole, SequenceStatus, Width};

use crate::sequence::{ClusterArgs, out};

/// Options of `unid status`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// A local agent's socket to ask for its state and pair (repeat) [default: UNID_SOCKET or
    /// 127.0.0.1:7411, if it answers]. Its pair peer's socket is asked too.
    #[arg(long = "agent", value_name = "ADDR")]
    agents: Vec<std::net::SocketAddr>,
    /// Only the local agents: do not ask the cluster.
    #[arg(long)]
    agents_only: bool,
}

/// The most local agents shown.
const LOCAL_AGENTS_MAX: usize = 16;

/// An agent's `PAIR` answer as `key value` pairs (None: no answer).
fn ask_pair(addr: std::net::SocketAddr) -> Option<Vec<(String, String)>> {
    use std::io::{BufRead, BufReader, Write};
    let s =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .ok()?;
    (&s).write_all(b"PAIR\nQUIT\n").ok()?;
    let mut r = BufReader::new(s);
    let mut head = String::new();
    r.read_line(&mut head).ok()?;
    let n: usize = head.trim_end().strip_prefix("OK ")?.parse().ok()?;
    let mut out = Vec::new();
    for _ in 0..n.min(200) {
        let mut line = String::new();
        r.read_line(&mut line).ok()?;
        let (k, v) = line.trim_end().split_once(' ')?;
        out.push((k.to_owned(), v.to_owned()));
    }
    Some(out)
}

/// Prints this host's agents and their pairs.
fn local_agents(explicit: &[std::net::SocketAddr]) {
    let defaulted = explicit.is_empty();
    let mut queue: Vec<std::net::SocketAddr> = if defaulted {
        let s = std::env::var("UNID_SOCKET")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| unid_agent::SOCKET_ADDR_DEFAULT.parse().expect("valid"));
        vec![s]
    } else {
        explicit.to_vec()
    };
    let mut shown = 0;
    let mut at = 0;
    let mut header = false;
    while at < queue.len() && shown < LOCAL_AGENTS_MAX {
        let addr = queue[at];
        at += 1;
        let Some(kv) = ask_pair(addr) else {
            if !defaulted || at > 1 {
                if !header {
                    out!("local agents:");
                    header = true;
                }
                out!("  {addr}  no answer (agent not running?)");
            }
            continue;
        };
        if !header {
            out!("local agents:");
            header = true;
        }
        shown += 1;
        let get = |k: &str| {
            kv.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
                .unwrap_or("-")
        };
        let role = get("role");
        let pair = if role == "none" {
            "unpaired".to_owned()
        } else {
            let peer_role = match (get("peer_state"), get("peer_active")) {
                ("alive", "1") => " (active)",
                ("alive", _) => " (standby)",
                _ => "",
            };
            let me = if get("active") == "1" {
                "ACTIVE"
            } else {
                "standby"
            };
            format!(
                "{role} {me}  peer {} {}{peer_role}",
                get("peer"),
                get("peer_state")
            )
        };
        out!(
            "  {addr}  node {}  {}  network {}  {pair}",
            get("node_id"),
            get("connection"),
            get("network")
        );
        let paths: Vec<String> = kv
            .iter()
            .filter(|(k, _)| k == "server")
            .map(|(_, v)| v.clone())
            .collect();
        if !paths.is_empty() {
            out!("      servers: {}", paths.join(", "));
        }
        if let Some(peer) = kv
            .iter()
            .find(|(k, _)| k == "peer_socket")
            .and_then(|(_, v)| v.parse::<std::net::SocketAddr>().ok())
            && !queue.contains(&peer)
        {
            queue.push(peer);
        }
    }
}

struct Server {
    id: u64,
    addr: std::net::SocketAddr,
    role: String,
    term: u64,
    health: String,
}

struct Seq {
    name: String,
    width: Width,
    ceiling: u128,
    remaining: u128,
}

struct Page {
    leader: u64,
    term: u64,
    servers: Vec<Server>,
    sequences: Vec<Seq>,
    more: bool,
}

fn status_page(client: &mut Client, after: Option<&str>) -> anyhow::Result<Page> {
    let msg = Message::StatusRequest {
        sequences_after: after,
    };
    Ok(client.call(0, &msg, |frame, _| match frame.message {
        Message::StatusReply {
            leader_id,
            term,
            servers,
            sequences,
            more,
        } => Some(Answer::Done(Page {
            leader: leader_id,
            term,
            servers: servers
                .iter()
                .map(|s| Server {
                    id: s.id,
                    addr: s.addr,
                    role: format!("{:?}", s.role).to_lowercase(),
                    term: s.term,
                    health: format!("{:?}", s.health).to_lowercase(),
                })
                .collect(),
            sequences: sequences
                .iter()
                .map(|s: SequenceStatus<'_>| Seq {
                    name: s.name.to_owned(),
                    width: s.width,
                    ceiling: s.ceiling,
                    remaining: s.remaining,
                })
                .collect(),
            more,
        })),
        _ => None,
    })?)
}

/// Agents of the node table: (id, address).
fn agents(client: &mut Client) -> anyhow::Result<Vec<(u64, std::net::SocketAddr)>> {
    let mut out = Vec::new();
    let mut page = 0u16;
    let mut version = None;
    let mut restarts = 0;
    loop {
        let msg = Message::NodeTableRequest { page };
        let (v, count, nodes) = client.call(0, &msg, |frame, _| match frame.message {
            Message::NodeTable {
                version,
                page_count,
                nodes,
                ..
            } => Some(Answer::Done((
                version,
                page_count,
                nodes
                    .iter()
                    .filter(|n| n.role != NodeRole::Server)
                    .map(|n| (n.id, n.addr))
                    .collect::<Vec<_>>(),
            ))),
            _ => None,
        })?;
        if version.is_some_and(|x| x != v) && restarts < 5 {
            // The table changed between pages: start over (at most 5 times).
            restarts += 1;
            out.clear();
            page = 0;
            version = Some(v);
            continue;
        }
        version = Some(v);
        out.extend(nodes);
        page += 1;
        if page >= count || page >= 1_000 {
            return Ok(out);
        }
    }
}

/// Runs `unid status`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let result = if args.agents_only {
        Ok(())
    } else {
        cluster(&args)
    };
    local_agents(&args.agents);
    result
}

fn cluster(args: &Args) -> anyhow::Result<()> {
    let mut client = args.cluster.client()?;
    let mut first = status_page(&mut client, None)?;
    // Ask the leader itself if another server answered: it alone sees every follower.
    if first.leader != 0
        && let Some(l) = first.servers.iter().find(|s| s.id == first.leader)
        && client.last_server != Some(l.addr)
    {
        client.prefer(l.addr);
        if let Ok(p) = status_page(&mut client, None) {
            first = p;
        }
    }
    out!(
        "leader: {}   term: {}",
        if first.leader == 0 {
            "none (election in progress?)".to_owned()
        } else {
            first.leader.to_string()
        },
        first.term
    );
    out!("servers:");
    out!(
        "  {:>4}  {:<22} {:<10} {:>6}  health",
        "id",
        "udp",
        "role",
        "term"
    );
    for s in &first.servers {
        out!(
            "  {:>4}  {:<22} {:<10} {:>6}  {}",
            s.id,
            s.addr.to_string(),
            s.role,
            s.term,
            s.health
        );
    }
    let agents = agents(&mut client)?;
    out!("agents: {}", agents.len());
    for (id, addr) in agents.iter().take(50) {
        out!("  {id:>12}  {addr}");
    }
    if agents.len() > 50 {
        out!("  ... and {} more", agents.len() - 50);
    }
    out!("sequences:");
    out!("  {:<24} {:>5}  {:>40}  left", "name", "width", "ceiling");
    let mut page = first;
    for _ in 0..100_000 {
        for s in &page.sequences {
            let pct = s.remaining as f64 / s.width.limit() as f64 * 100.0;
            out!(
                "  {:<24} {:>5}  {:>40}  {} ({:.4}%)",
                s.name,
                s.width.bytes(),
                s.ceiling,
                s.remaining,
                pct
            );
        }
        if !page.more {
            return Ok(());
        }
        let Some(last) = page.sequences.last().map(|s| s.name.clone()) else {
            bail!("the server said more sequences follow but sent none");
        };
        page = status_page(&mut client, Some(&last))?;
    }
    bail!("too many pages of sequences")
}
