//! `unid cluster add-server|remove-server`: membership changes at runtime. The request goes to
//! the servers given by `--server` (redirects to the leader followed); the leader runs it
//! (learner catch-up then voter, or removal) and answers with the voters once it committed.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use unid_engine::client::Answer;
use unid_proto::{ErrorCode, Message, NodeId};

use crate::sequence::{ClusterArgs, out};

/// How long to wait for one answer: the leader's membership change may take up to 5 Raft
/// write timeouts (10 s) for a new server to catch up; asking again meanwhile only gets
/// "a membership change is running".
const ATTEMPT_MS: u64 = 12_000;

/// How to reach the cluster, with a longer default timeout than `unid sequence`.
#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// A server's UDP address (repeat to give several; they are tried in order).
    #[arg(long = "server", value_name = "ADDR", default_value = "127.0.0.1:7400")]
    pub servers: Vec<SocketAddr>,
    /// File holding the cluster secret, if the cluster uses one.
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// Give up after this many milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub timeout_ms: u64,
}

/// `unid cluster` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Add a server (started without --init): learner until it has caught up, then voter.
    AddServer {
        /// The server as ID=RAFT_ADDR=UDP_ADDR (as in `unid server --peer`).
        server: String,
        #[command(flatten)]
        target: Target,
    },
    /// Remove a server (not the leader): it stops by itself once it learns it was removed.
    RemoveServer {
        /// The server's node id.
        id: NodeId,
        #[command(flatten)]
        target: Target,
    },
}

/// Parses `ID=RAFT_ADDR=UDP_ADDR`.
fn parse_server(s: &str) -> anyhow::Result<(NodeId, SocketAddr, SocketAddr)> {
    let mut parts = s.split('=');
    let (Some(id), Some(raft), Some(udp), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        bail!("expected ID=RAFT_ADDR=UDP_ADDR, got {s:?}");
    };
    let id: NodeId = id
        .parse()
        .with_context(|| format!("bad server id {id:?}"))?;
    if id == 0 {
        bail!("server id 0 is not allowed");
    }
    let raft = raft
        .parse()
        .with_context(|| format!("bad Raft address {raft:?}"))?;
    let udp = udp
        .parse()
        .with_context(|| format!("bad UDP address {udp:?}"))?;
    Ok((id, raft, udp))
}

/// Runs a `unid cluster` subcommand.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    let (msg_owned, target) = match cmd {
        Command::AddServer { server, target } => {
            let (id, raft, listen) = parse_server(&server)?;
            (Message::AddServer { id, raft, listen }, target)
        }
        Command::RemoveServer { id, target } => {
            if id == 0 {
                bail!("server id 0 is not allowed");
            }
            (Message::RemoveServer { id }, target)
        }
    };
    let cluster = ClusterArgs {
        servers: target.servers,
        secret_file: target.secret_file,
        timeout_ms: target.timeout_ms,
    };
    let mut client = cluster.client_waiting(ATTEMPT_MS)?;
    let answer = client.call(0, &msg_owned, |frame, _| match frame.message {
        Message::Membership { voters, truncated } => Some(Answer::Done(Ok((
            voters.iter().map(|s| (s.id, s.addr)).collect::<Vec<_>>(),
            truncated,
        )))),
        Message::Error {
            code: ErrorCode::NotReady,
            ..
        } => Some(Answer::Retry),
        Message::Error { code, text, .. } => Some(Answer::Done(Err(format!(
            "the server answered {code:?}: {text}"
        )))),
        _ => None,
    })?;
    match answer {
        Ok((voters, truncated)) => {
            out!("voters:");
            for (id, addr) in voters {
                out!("  {id} {addr}");
            }
            if truncated {
                out!("  (more not shown)");
            }
            Ok(())
        }
        Err(e) => bail!("{e}"),
    }
}
