//! The replicated state: sequences and their committed ceilings, the node
//! table, cluster settings, and the pure function that applies one command.
//!
//! Nothing here does I/O. [`ClusterState::apply`] is deterministic: every
//! replica that applies the same log gets the same state, which is what makes
//! the state machine a state machine.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use unid_proto::types::{Id, NodeId, SequenceName, Width};

/// Agent node ids start here; server node ids are below it. Keeps the two
/// id spaces disjoint, so a node id alone says which kind of node it is.
pub const AGENT_ID_FIRST: NodeId = 1 << 32;

/// The most sequences a cluster holds.
pub const SEQUENCES_MAX: usize = 100_000;
/// The most nodes (servers and agents) in the node table.
pub const NODES_MAX: usize = 100_000;
/// The most cluster settings.
pub const SETTINGS_MAX: usize = 64;
/// The longest setting key, agent name or address, in bytes.
pub const TEXT_BYTES_MAX: usize = 255;

/// Setting key: how long an agent's lease lasts, in milliseconds.
pub const SETTING_LEASE_MS: &str = "lease_ms";
/// Setting key: by how many ids the leader raises a ceiling by default.
pub const SETTING_RAISE_IDS_DEFAULT: &str = "raise_ids_default";
/// Setting key: the cluster's id (random, non-zero), carried in every datagram.
/// Set once: a `SetSetting` of it when it is already non-zero changes nothing,
/// so that two leaders proposing one at the cluster's birth agree on the first.
pub const SETTING_CLUSTER_ID: &str = "cluster_id";

/// A replicated command: the `D` type of the Raft log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Create a sequence whose first id is `start`. Rejected if it exists or
    /// `start` is not a legal id of `width`.
    CreateSequence {
        /// The sequence name.
        name: String,
        /// Its width in bytes (2, 4, 8 or 16).
        width: u8,
        /// The first id it will issue; also its initial ceiling.
        start: Id,
    },
    /// Raise the committed ceiling of a sequence to `ceiling` (max semantics:
    /// a lower value is a no-op that answers the current ceiling). Rejected if
    /// `ceiling > width.limit()`.
    RaiseCeiling {
        /// The sequence name.
        name: String,
        /// The new exclusive bound of grantable ids.
        ceiling: Id,
    },
    /// Register an agent: it gets a fresh node id that is never reused. A
    /// previous registration under the same name is replaced.
    RegisterAgent {
        /// The agent's stable name (e.g. host name).
        name: String,
        /// The agent's incarnation (increases on every agent restart).
        incarnation: u64,
        /// Its address (IP or host).
        addr: String,
        /// Its port.
        port: u16,
        /// Free-form role tag.
        role: String,
    },
    /// Record (or update) a server in the node table.
    UpsertServer {
        /// Server node id (`1..AGENT_ID_FIRST`).
        id: NodeId,
        /// Its Raft address `ip:port`.
        addr: String,
    },
    /// Mark an agent as seen in the current term (lease renewal bookkeeping).
    TouchNode {
        /// The node id.
        id: NodeId,
    },
    /// Remove a node from the node table (an expired agent or a removed
    /// server). Its id is never reused.
    RemoveNode {
        /// The node id.
        id: NodeId,
    },
    /// Set a cluster setting.
    SetSetting {
        /// Setting key, at most [`TEXT_BYTES_MAX`] bytes.
        key: String,
        /// Its value.
        value: u64,
    },
}

/// Why the state machine refused a command. Refusals are replicated results:
/// every replica refuses the same command the same way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// The sequence already exists.
    #[error("sequence already exists")]
    SequenceExists,
    /// No sequence has this name.
    #[error("no such sequence")]
    NoSuchSequence,
    /// The name is not a valid sequence name.
    #[error("invalid sequence name")]
    BadName,
    /// The width is not 2, 4, 8 or 16.
    #[error("invalid width")]
    BadWidth,
    /// The value is outside what the sequence's width allows.
    #[error("value {value} beyond the width limit {limit}")]
    BeyondLimit {
        /// The value asked for.
        value: Id,
        /// The width's limit.
        limit: Id,
    },
    /// A table is full (see the `*_MAX` constants).
    #[error("table full")]
    TableFull,
    /// A text field is too long or a server id out of range.
    #[error("invalid argument")]
    BadArgument,
    /// No node has this id.
    #[error("no such node")]
    NoSuchNode,
    /// The agent id counter is exhausted (never in practice: 2^64 - 2^32 ids).
    #[error("node ids exhausted")]
    IdsExhausted,
}

/// The result of applying one log entry: the `R` type of the Raft log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// A blank or membership entry: nothing to say.
    None,
    /// The sequence was created with this ceiling (= start).
    Created {
        /// Its initial ceiling.
        ceiling: Id,
    },
    /// The committed ceiling after a raise (never lower than before).
    Ceiling {
        /// The committed ceiling.
        ceiling: Id,
    },
    /// The agent's newly assigned node id.
    Registered {
        /// The fresh node id.
        id: NodeId,
    },
    /// Generic success for updates with nothing to return.
    Done,
    /// Whether a removed node existed.
    Removed {
        /// `true` if the node was in the table.
        existed: bool,
    },
    /// The command was refused.
    Rejected(Rejection),
}

/// One sequence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceState {
    /// Width in bytes (2, 4, 8 or 16).
    pub width: u8,
    /// The first id.
    pub start: Id,
    /// The committed ceiling: every id ever granted is `< ceiling`. Only grows;
    /// never above the width's limit.
    pub ceiling: Id,
}

impl SequenceState {
    /// The width (always valid: checked on creation).
    pub fn width(&self) -> Width {
        Width::from_bytes(self.width).unwrap_or(Width::W16)
    }
}

/// The kind of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeKind {
    /// A Raft server.
    Server,
    /// An agent.
    Agent,
}

/// One entry of the node table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node id (servers `< AGENT_ID_FIRST <=` agents).
    pub id: NodeId,
    /// Server or agent.
    pub kind: NodeKind,
    /// Agent name (empty for servers).
    pub name: String,
    /// Address (IP, host, or `ip:port` for servers).
    pub addr: String,
    /// Port (0 for servers, whose port is in `addr`).
    pub port: u16,
    /// Free-form role tag.
    pub role: String,
    /// Agent incarnation (0 for servers).
    pub incarnation: u64,
    /// The Raft term of the entry that registered it.
    pub registered_term: u64,
    /// The Raft term of the last entry that touched it.
    pub last_seen_term: u64,
}

/// The whole replicated application state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Sequences by name.
    pub sequences: BTreeMap<String, SequenceState>,
    /// The node table.
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// Cluster settings.
    pub settings: BTreeMap<String, u64>,
    /// The next agent id to hand out; starts at [`AGENT_ID_FIRST`] and only
    /// grows, so ids are never reused.
    pub next_agent_id: NodeId,
}

/// What an apply changed, so the store can persist just that.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Touched {
    /// Nothing but the applied log id.
    Nothing,
    /// This sequence.
    Sequence(String),
    /// These nodes (an insert plus maybe a replaced one).
    Nodes(Vec<NodeId>),
    /// Settings or counters.
    Meta,
}

impl ClusterState {
    /// A fresh state.
    pub fn new() -> ClusterState {
        ClusterState {
            next_agent_id: AGENT_ID_FIRST,
            ..ClusterState::default()
        }
    }

    /// The value of a setting, or `default` if unset.
    pub fn setting(&self, key: &str, default: u64) -> u64 {
        self.settings.get(key).copied().unwrap_or(default)
    }

    /// Applies one command at Raft term `term`. Deterministic.
    pub fn apply(&mut self, cmd: &Command, term: u64) -> (Response, Touched) {
        match self.apply_inner(cmd, term) {
            Ok(ok) => ok,
            Err(rej) => (Response::Rejected(rej), Touched::Nothing),
        }
    }

    fn apply_inner(&mut self, cmd: &Command, term: u64) -> Result<(Response, Touched), Rejection> {
        if self.next_agent_id < AGENT_ID_FIRST {
            // A state from `Default` rather than `new()`.
            self.next_agent_id = AGENT_ID_FIRST;
        }
        match cmd {
            Command::CreateSequence { name, width, start } => {
                SequenceName::new(name).map_err(|_| Rejection::BadName)?;
                let w = Width::from_bytes(*width).ok_or(Rejection::BadWidth)?;
                if self.sequences.contains_key(name) {
                    return Err(Rejection::SequenceExists);
                }
                if self.sequences.len() >= SEQUENCES_MAX {
                    return Err(Rejection::TableFull);
                }
                if *start >= w.limit() {
                    return Err(Rejection::BeyondLimit {
                        value: *start,
                        limit: w.limit(),
                    });
                }
                self.sequences.insert(
                    name.clone(),
                    SequenceState {
                        width: *width,
                        start: *start,
                        ceiling: *start,
                    },
                );
                Ok((
                    Response::Created { ceiling: *start },
                    Touched::Sequence(name.clone()),
                ))
            }
            Command::RaiseCeiling { name, ceiling } => {
                let seq = self
                    .sequences
                    .get_mut(name)
                    .ok_or(Rejection::NoSuchSequence)?;
                let limit = seq.width().limit();
                if *ceiling > limit {
                    return Err(Rejection::BeyondLimit {
                        value: *ceiling,
                        limit,
                    });
                }
                if *ceiling <= seq.ceiling {
                    return Ok((
                        Response::Ceiling {
                            ceiling: seq.ceiling,
                        },
                        Touched::Nothing,
                    ));
                }
                seq.ceiling = *ceiling;
                debug_assert!(seq.ceiling <= limit);
                Ok((
                    Response::Ceiling { ceiling: *ceiling },
                    Touched::Sequence(name.clone()),
                ))
            }
            Command::RegisterAgent {
                name,
                incarnation,
                addr,
                port,
                role,
            } => {
                for t in [name, addr, role] {
                    if t.len() > TEXT_BYTES_MAX {
                        return Err(Rejection::BadArgument);
                    }
                }
                let replaced: Vec<NodeId> = self
                    .nodes
                    .values()
                    .filter(|n| n.kind == NodeKind::Agent && &n.name == name)
                    .map(|n| n.id)
                    .collect();
                if replaced.is_empty() && self.nodes.len() >= NODES_MAX {
                    return Err(Rejection::TableFull);
                }
                let id = self.next_agent_id;
                self.next_agent_id = id.checked_add(1).ok_or(Rejection::IdsExhausted)?;
                for old in &replaced {
                    self.nodes.remove(old);
                }
                self.nodes.insert(
                    id,
                    NodeRecord {
                        id,
                        kind: NodeKind::Agent,
                        name: name.clone(),
                        addr: addr.clone(),
                        port: *port,
                        role: role.clone(),
                        incarnation: *incarnation,
                        registered_term: term,
                        last_seen_term: term,
                    },
                );
                let mut touched = replaced;
                touched.push(id);
                Ok((Response::Registered { id }, Touched::Nodes(touched)))
            }
            Command::UpsertServer { id, addr } => {
                if *id == 0 || *id >= AGENT_ID_FIRST || addr.len() > TEXT_BYTES_MAX {
                    return Err(Rejection::BadArgument);
                }
                if !self.nodes.contains_key(id) && self.nodes.len() >= NODES_MAX {
                    return Err(Rejection::TableFull);
                }
                let registered_term = self.nodes.get(id).map_or(term, |n| n.registered_term);
                self.nodes.insert(
                    *id,
                    NodeRecord {
                        id: *id,
                        kind: NodeKind::Server,
                        name: String::new(),
                        addr: addr.clone(),
                        port: 0,
                        role: "server".to_owned(),
                        incarnation: 0,
                        registered_term,
                        last_seen_term: term,
                    },
                );
                Ok((Response::Done, Touched::Nodes(vec![*id])))
            }
            Command::TouchNode { id } => {
                let n = self.nodes.get_mut(id).ok_or(Rejection::NoSuchNode)?;
                n.last_seen_term = n.last_seen_term.max(term);
                Ok((Response::Done, Touched::Nodes(vec![*id])))
            }
            Command::RemoveNode { id } => {
                let existed = self.nodes.remove(id).is_some();
                Ok((Response::Removed { existed }, Touched::Nodes(vec![*id])))
            }
            Command::SetSetting { key, value } => {
                if key.is_empty() || key.len() > TEXT_BYTES_MAX {
                    return Err(Rejection::BadArgument);
                }
                if !self.settings.contains_key(key) && self.settings.len() >= SETTINGS_MAX {
                    return Err(Rejection::TableFull);
                }
                if key == SETTING_CLUSTER_ID && self.setting(key, 0) != 0 {
                    return Ok((Response::Done, Touched::Nothing));
                }
                self.settings.insert(key.clone(), *value);
                Ok((Response::Done, Touched::Meta))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(name: &str, width: u8, start: Id) -> Command {
        Command::CreateSequence {
            name: name.into(),
            width,
            start,
        }
    }
    fn raise(name: &str, ceiling: Id) -> Command {
        Command::RaiseCeiling {
            name: name.into(),
            ceiling,
        }
    }

    #[test]
    fn ceilings_only_rise_and_stop_at_limit() {
        let mut s = ClusterState::new();
        assert_eq!(
            s.apply(&create("a", 2, 5), 1).0,
            Response::Created { ceiling: 5 }
        );
        assert_eq!(
            s.apply(&create("a", 2, 5), 1).0,
            Response::Rejected(Rejection::SequenceExists)
        );
        assert_eq!(
            s.apply(&raise("a", 100), 1).0,
            Response::Ceiling { ceiling: 100 }
        );
        assert_eq!(
            s.apply(&raise("a", 50), 1).0,
            Response::Ceiling { ceiling: 100 }
        );
        assert_eq!(s.sequences["a"].ceiling, 100);
        assert_eq!(
            s.apply(&raise("a", 0x1_0000), 1).0,
            Response::Rejected(Rejection::BeyondLimit {
                value: 0x1_0000,
                limit: 0xFFFF
            })
        );
        assert_eq!(
            s.apply(&raise("a", 0xFFFF), 1).0,
            Response::Ceiling { ceiling: 0xFFFF }
        );
        assert_eq!(
            s.apply(&raise("b", 1), 1).0,
            Response::Rejected(Rejection::NoSuchSequence)
        );
        assert_eq!(
            s.apply(&create("w", 3, 0), 1).0,
            Response::Rejected(Rejection::BadWidth)
        );
        assert_eq!(
            s.apply(&create("-x", 4, 0), 1).0,
            Response::Rejected(Rejection::BadName)
        );
        assert_eq!(
            s.apply(&create("big", 2, 0xFFFF), 1).0,
            Response::Rejected(Rejection::BeyondLimit {
                value: 0xFFFF,
                limit: 0xFFFF
            })
        );
        assert_eq!(
            s.apply(&raise("c", u128::MAX), 1).0,
            Response::Rejected(Rejection::NoSuchSequence)
        );
        s.apply(&create("c", 16, 0), 1);
        assert_eq!(
            s.apply(&raise("c", u128::MAX), 1).0,
            Response::Ceiling { ceiling: u128::MAX }
        );
    }

    #[test]
    fn agent_ids_are_fresh_and_disjoint_from_servers() {
        let mut s = ClusterState::new();
        let reg = |inc| Command::RegisterAgent {
            name: "host1".into(),
            incarnation: inc,
            addr: "127.0.0.1".into(),
            port: 7000,
            role: "app".into(),
        };
        let (r1, _) = s.apply(&reg(1), 3);
        let (r2, _) = s.apply(&reg(2), 4);
        assert_eq!(r1, Response::Registered { id: AGENT_ID_FIRST });
        assert_eq!(
            r2,
            Response::Registered {
                id: AGENT_ID_FIRST + 1
            }
        );
        // The re-registration replaced the old record.
        assert_eq!(s.nodes.len(), 1);
        let n = &s.nodes[&(AGENT_ID_FIRST + 1)];
        assert_eq!((n.incarnation, n.registered_term), (2, 4));
        // Removing never frees an id for reuse.
        s.apply(
            &Command::RemoveNode {
                id: AGENT_ID_FIRST + 1,
            },
            5,
        );
        assert_eq!(
            s.apply(&reg(3), 5).0,
            Response::Registered {
                id: AGENT_ID_FIRST + 2
            }
        );
        assert_eq!(
            s.apply(
                &Command::UpsertServer {
                    id: AGENT_ID_FIRST,
                    addr: "x".into()
                },
                5
            )
            .0,
            Response::Rejected(Rejection::BadArgument)
        );
        assert_eq!(
            s.apply(
                &Command::UpsertServer {
                    id: 1,
                    addr: "127.0.0.1:1".into()
                },
                5
            )
            .0,
            Response::Done
        );
        assert_eq!(s.nodes[&1].kind, NodeKind::Server);
    }

    #[test]
    fn settings_are_bounded() {
        let mut s = ClusterState::new();
        for i in 0..SETTINGS_MAX {
            let cmd = Command::SetSetting {
                key: format!("k{i}"),
                value: i as u64,
            };
            assert_eq!(s.apply(&cmd, 1).0, Response::Done);
        }
        let cmd = Command::SetSetting {
            key: "one_more".into(),
            value: 1,
        };
        assert_eq!(s.apply(&cmd, 1).0, Response::Rejected(Rejection::TableFull));
        let cmd = Command::SetSetting {
            key: "k0".into(),
            value: 9,
        };
        assert_eq!(s.apply(&cmd, 1).0, Response::Done);
        assert_eq!(s.setting("k0", 0), 9);
        assert_eq!(s.setting(SETTING_LEASE_MS, 1234), 1234);
    }

    #[test]
    fn the_cluster_id_is_set_once() {
        let mut s = ClusterState::new();
        let set = |value| Command::SetSetting {
            key: SETTING_CLUSTER_ID.into(),
            value,
        };
        assert_eq!(s.apply(&set(0), 1).0, Response::Done);
        assert_eq!(s.apply(&set(77), 1).0, Response::Done);
        assert_eq!(s.apply(&set(88), 2).0, Response::Done);
        assert_eq!(s.setting(SETTING_CLUSTER_ID, 0), 77);
    }

    proptest::proptest! {
        /// Whatever commands arrive, in whatever order: a ceiling never goes
        /// down, never exceeds its width's limit, and agent ids never repeat.
        #[test]
        fn ceilings_never_decrease(ops in proptest::collection::vec((0u8..4, 0u8..3, proptest::num::u128::ANY), 1..200)) {
            let mut s = ClusterState::new();
            let names = ["a", "b", "c"];
            let mut seen_ids = std::collections::BTreeSet::new();
            for (kind, which, value) in ops {
                let name = names[which as usize].to_owned();
                let before: BTreeMap<String, Id> =
                    s.sequences.iter().map(|(k, v)| (k.clone(), v.ceiling)).collect();
                let cmd = match kind {
                    0 => Command::CreateSequence { name, width: [2, 4, 8, 16][(value % 4) as usize], start: value >> 100 },
                    1 | 2 => Command::RaiseCeiling { name, ceiling: value >> (value % 128) },
                    _ => Command::RegisterAgent { name, incarnation: 1, addr: String::new(), port: 0, role: String::new() },
                };
                let (resp, _) = s.apply(&cmd, 1);
                if let Response::Registered { id } = resp {
                    proptest::prop_assert!(seen_ids.insert(id));
                }
                for (k, v) in &s.sequences {
                    proptest::prop_assert!(v.ceiling <= v.width().limit());
                    if let Some(b) = before.get(k) {
                        proptest::prop_assert!(v.ceiling >= *b);
                    }
                }
            }
        }
    }
}
