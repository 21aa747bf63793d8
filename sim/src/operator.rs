//! The operator: `unid cluster add-server` and `remove-server` as the CLI sends them (one
//! authenticated `AddServer` or `RemoveServer` datagram, answered with the voters), through
//! the simulated network and its faults, to the real server machines. What the servers do with
//! it (the learner, the catch-up, the joint configuration, the node table) is the product's
//! code: the machine's membership requests and the engine driver's `AddServer`/`RemoveServer`
//! actions.
//!
//! Like the CLI, the operator retries: a redirect goes to the leader it names (or the next
//! server), `NotReady` ("a membership change is running", or no quorum yet) is asked again after
//! a pause, as is a redirect naming no leader (an election), silence moves on to the next
//! server; any other error ends the command.

use std::time::Duration;

use tokio::sync::mpsc;
use unid_proto::{Codec, DATAGRAM_BYTES_MAX, ErrorCode, Header, Message, NodeId};

use crate::net::{Datagram, Endpoint, Net, key, operator_addr, raft_addr, server_addr};

/// Most datagrams one command sends before it gives up.
pub const ATTEMPTS_MAX: u32 = 24;
/// How long the operator waits for an answer to one datagram.
pub const ANSWER_WAIT_MS: u64 = 300;
/// The pause after a `NotReady` answer or a redirect that names no leader.
pub const NOT_READY_PAUSE_MS: u64 = 200;

/// A membership change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Add the (running, empty) server with this id as a voter.
    Add(NodeId),
    /// Remove this voter.
    Remove(NodeId),
}

impl Change {
    /// The server the change is about.
    pub fn server(self) -> NodeId {
        match self {
            Change::Add(id) | Change::Remove(id) => id,
        }
    }
}

/// How a command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The leader answered with the voters after the change.
    Done(Vec<NodeId>),
    /// A server refused it (its error text).
    Refused(String),
    /// No answer worth keeping within [`ATTEMPTS_MAX`] datagrams.
    GaveUp,
}

/// Runs one command (operator incarnation `incarnation`: one per command), asking `servers`
/// in turn. The operator endpoint is up for the command's duration only.
pub async fn run(net: Net, incarnation: u64, change: Change, servers: Vec<NodeId>) -> Outcome {
    let (tx, mut inbox) = mpsc::unbounded_channel();
    net.operator_up(incarnation, tx);
    let outcome = ask(&net, incarnation, change, &servers, &mut inbox).await;
    net.down(Endpoint::Operator);
    outcome
}

async fn ask(
    net: &Net,
    incarnation: u64,
    change: Change,
    servers: &[NodeId],
    inbox: &mut mpsc::UnboundedReceiver<Datagram>,
) -> Outcome {
    let message = match change {
        Change::Add(id) => Message::AddServer {
            id,
            raft: raft_addr(id),
            listen: server_addr(id),
        },
        Change::Remove(id) => Message::RemoveServer { id },
    };
    let key = key();
    let mut codec = Codec::new();
    let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
    let mut next = 0usize;
    let mut target = servers.first().copied();
    for attempt in 0..ATTEMPTS_MAX {
        let Some(to) = target.or_else(|| servers.get(next % servers.len().max(1)).copied()) else {
            return Outcome::GaveUp;
        };
        // Seqs never repeat across commands: the incarnation is in the high bits.
        let seq = (incarnation << 32) | u64::from(attempt + 1);
        let header = Header {
            sender: 0,
            seq,
            reply_to: 0,
            epoch: 0,
        };
        let Ok(len) = codec.encode(&header, &message, Some(&key), &mut buf) else {
            return Outcome::Refused("the request does not encode".into());
        };
        net.send(
            Endpoint::Operator,
            incarnation,
            Datagram {
                from: operator_addr(),
                to: server_addr(to),
                bytes: buf[..len].to_vec(),
            },
        );
        let deadline = tokio::time::Instant::now() + Duration::from_millis(ANSWER_WAIT_MS);
        let answer = loop {
            match tokio::time::timeout_at(deadline, inbox.recv()).await {
                Ok(Some(d)) => match unid_proto::decode(&d.bytes, Some(&key)) {
                    Ok(f) if f.header.reply_to == seq => break Some(reply(f.message)),
                    // Corrupted, or an answer to an earlier attempt: keep waiting.
                    _ => continue,
                },
                Ok(None) | Err(_) => break None,
            }
        };
        match answer {
            Some(Reply::Done(voters)) => return Outcome::Done(voters),
            Some(Reply::Refused(text)) => return Outcome::Refused(text),
            Some(Reply::NotReady) => {
                target = Some(to);
                tokio::time::sleep(Duration::from_millis(NOT_READY_PAUSE_MS)).await;
            }
            Some(Reply::Redirect(Some(leader))) if leader != to => target = Some(leader),
            Some(Reply::Redirect(_)) => {
                // No leader known (an election): the next server, after a pause.
                next += 1;
                target = None;
                tokio::time::sleep(Duration::from_millis(NOT_READY_PAUSE_MS)).await;
            }
            None => {
                next += 1;
                target = None;
            }
        }
    }
    Outcome::GaveUp
}

/// What one answer means for the command.
enum Reply {
    Done(Vec<NodeId>),
    Refused(String),
    NotReady,
    /// Not the leader; the leader it names, if any.
    Redirect(Option<NodeId>),
}

fn reply(m: Message<'_>) -> Reply {
    match m {
        Message::Membership { voters, .. } => Reply::Done(voters.iter().map(|s| s.id).collect()),
        Message::NotLeader { leader_id, .. } => {
            Reply::Redirect((leader_id != 0).then_some(leader_id))
        }
        Message::Error {
            code: ErrorCode::NotReady,
            ..
        } => Reply::NotReady,
        Message::Error { code, text, .. } => Reply::Refused(format!("{code:?}: {text}")),
        other => Reply::Refused(format!("unexpected answer {:?}", other.message_type())),
    }
}
