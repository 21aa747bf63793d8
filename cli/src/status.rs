//! `unid status`: the cluster at a glance, asked of the leader (through any server given by
//! `--server`): servers with role, term and health; the leader; registered agents; per
//! sequence the committed ceiling and how much of the width is left.

use anyhow::bail;
use unid_engine::client::{Answer, Client};
use unid_proto::{Message, NodeRole, SequenceStatus, Width};

use crate::sequence::{ClusterArgs, out};

/// Options of `unid status`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    cluster: ClusterArgs,
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
