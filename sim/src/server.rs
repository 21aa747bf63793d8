//! One simulated server: the real [`ConsensusNode`] (openraft + the redb
//! store on a [`SimDisk`](crate::disk::SimDisk)) and glue that mirrors
//! `engine/src/server.rs` function by function:
//!
//! | here | engine/src/server.rs |
//! |---|---|
//! | `Glue::control` | `Controller::run` (leader watch, raise notify, tick with `is_running` and lease expiry) |
//! | `on_leader` | `Controller::on_leader` (phases, dropping the allocator first) |
//! | `become_leader` + `install` | `Controller::become_leader`, `Controller::install` (allocator from `ready_state` only; agents from the node table) |
//! | `propose_raises`, `commit_raise` | the same names (raises through this node's `raft().client_write`, never forwarded; stale term ignored) |
//! | `register` | `Controller::handle_request` for `Control::Register` |
//! | `on_datagram` (Hello) | the `Message::Hello` arm of `Shard::handle` |
//! | `block_request` | `Shard::block_request` (reply cache, replay window, `grant`, the `UnknownSequence` → `add_sequence` path, `poll_raise_for`) |
//! | `check_quorum`, `quorum_lost`, `not_ready_or_away` | `Controller::check_quorum`, `Shared::quorum_lost`, `ServerHandler::not_ready_or_away` (a leader no quorum confirmed for `QUORUM_LOST_MS` answers `NotLeader` naming no leader instead of `NotReady`, and takes no new registrations) |
//!
//! What differs: one shard instead of one per core, datagrams are
//! [`Msg`] values rather than FlatBuffers (the codec, rate limits, metrics,
//! admin requests, membership changes, the cluster id and the per-name
//! `Hello` replay check are not simulated: simulated agents have no names
//! and there is one cluster), and
//! `tokio::select!` is `biased` for determinism (the engine's is not; both
//! orders are valid there).
//!
//! [`Bug`] switches deliberately break the glue, so that tests can show the
//! invariants catch a broken server.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use unid_consensus::{Command, ConsensusNode, LeaderInfo, NodeKind, Response};
use unid_core::{
    AllocatorConfig, CommittedCeiling, LeaderAllocator, Lookup, Raise, ReplyCache, ReplyCacheConfig,
};
use unid_proto::{NodeId, ReplayWindow, SeqNo, SequenceName};

use crate::clock::Clock;
use crate::invariants::Observer;
use crate::net::{Code, Datagram, Endpoint, Msg, Net, server_addr};

/// The control loop's tick, as the engine's `TICK_MS`.
pub const TICK_MS: u64 = 50;
/// Most raises proposed per turn, as the engine's `RAISES_PER_TURN_MAX`.
pub const RAISES_PER_TURN_MAX: usize = 256;
/// An agent not heard from for this long is forgotten.
pub const LEASE_MS: u64 = 10_000;
/// Most agents one server holds.
pub const AGENTS_MAX: usize = 1024;
/// Wait between two failed `ready_state` tries, as the engine's.
const READY_RETRY_MS: u64 = 20;
/// How long a leader's check that a quorum still follows it may take, as the
/// engine's `QUORUM_CHECK_TIMEOUT_MS`.
pub const QUORUM_CHECK_TIMEOUT_MS: u64 = 200;
/// A leader no quorum confirmed for this long sends agents elsewhere, as the
/// engine's `QUORUM_LOST_MS`.
pub const QUORUM_LOST_MS: u64 = 300;

/// A deliberate bug in the glue, for tests that show the checker fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Bug {
    /// The real glue.
    #[default]
    None,
    /// A new leader builds its allocator from its local applied state
    /// instead of `ready_state` (which may lag what earlier leaders
    /// committed).
    LocalStateForReady,
    /// A raise is reported to the allocator as committed when it is
    /// proposed, before consensus commits it.
    GrantBeforeCommit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Follower,
    Warming,
    Leading,
    Stopped,
}

struct Core {
    phase: Phase,
    term: u64,
    leader: Option<NodeId>,
    allocator: Option<LeaderAllocator>,
    pending_raises: Vec<Raise>,
    /// Registered agents: node id → (address, last seen).
    agents: BTreeMap<NodeId, (SocketAddr, u64)>,
    hellos: BTreeMap<(SocketAddr, u64), NodeId>,
    hellos_pending: BTreeSet<(SocketAddr, u64)>,
    replies: ReplyCache<Msg>,
    /// The engine's `Core::windows`: seqs of each agent that got a lasting answer.
    windows: BTreeMap<NodeId, ReplayWindow>,
}

impl Core {
    fn drop_allocator(&mut self) {
        self.allocator = None;
        self.pending_raises.clear();
    }

    fn expire(&mut self, now_us: u64, lease_us: u64) {
        self.agents
            .retain(|_, (_, seen)| seen.saturating_add(lease_us) > now_us);
        let agents = &self.agents;
        self.hellos.retain(|_, id| agents.contains_key(id));
        self.windows.retain(|id, _| agents.contains_key(id));
        self.replies.expire(now_us);
    }
}

/// A registration for the control task (the engine's `Control::Register`).
struct Register {
    from: SocketAddr,
    reply_to: SeqNo,
    incarnation: u64,
}

/// The glue of one server incarnation.
pub struct Glue {
    id: NodeId,
    incarnation: u64,
    consensus: Arc<ConsensusNode>,
    core: Mutex<Core>,
    raise_notify: Notify,
    control_tx: mpsc::UnboundedSender<Register>,
    net: Net,
    clock: Clock,
    obs: Observer,
    allocator_config: AllocatorConfig,
    write_timeout: Duration,
    bug: Bug,
    /// `now_us` when a quorum last confirmed this server's leadership.
    quorum_ok_us: AtomicU64,
    /// A leadership check is running.
    quorum_checking: AtomicBool,
}

impl std::fmt::Debug for Glue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Glue").field("id", &self.id).finish()
    }
}

/// Everything a running server owns; dropping it (or [`Server::crash`])
/// stops its tasks.
#[derive(Debug)]
pub struct Server {
    /// The glue.
    pub glue: Arc<Glue>,
    tasks: JoinSet<()>,
}

impl Server {
    /// Starts the glue of `consensus` (incarnation `incarnation`): its
    /// control task and its shard (datagram) task.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        consensus: Arc<ConsensusNode>,
        incarnation: u64,
        net: Net,
        clock: Clock,
        obs: Observer,
        write_timeout: Duration,
        bug: Bug,
    ) -> Result<Server, crate::SimError> {
        let id = consensus.id();
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (inbox_tx, inbox_rx) = mpsc::unbounded_channel();
        let glue = Arc::new(Glue {
            id,
            incarnation,
            consensus: consensus.clone(),
            core: Mutex::new(Core {
                phase: Phase::Follower,
                term: 0,
                leader: None,
                allocator: None,
                pending_raises: Vec::new(),
                agents: BTreeMap::new(),
                hellos: BTreeMap::new(),
                hellos_pending: BTreeSet::new(),
                replies: ReplyCache::new(ReplyCacheConfig::DEFAULT)?,
                windows: BTreeMap::new(),
            }),
            raise_notify: Notify::new(),
            control_tx,
            net: net.clone(),
            clock,
            obs,
            allocator_config: AllocatorConfig::DEFAULT,
            write_timeout,
            bug,
            quorum_ok_us: AtomicU64::new(0),
            quorum_checking: AtomicBool::new(false),
        });
        net.server_up(id, incarnation, consensus.raft().clone(), inbox_tx);
        let mut tasks = JoinSet::new();
        tasks.spawn(glue.clone().control(control_rx));
        tasks.spawn(glue.clone().shard(inbox_rx));
        Ok(Server { glue, tasks })
    }

    /// Whether Raft stopped (a storage error: the disk failed).
    pub fn consensus_stopped(&self) -> bool {
        !self.glue.consensus.is_running()
    }

    /// The consensus node.
    pub fn consensus(&self) -> &Arc<ConsensusNode> {
        &self.glue.consensus
    }

    /// Crashes the server: its tasks stop at once and its endpoint goes down.
    /// The caller drops the consensus node (Raft stops) and the disk.
    pub fn crash(mut self) -> Arc<ConsensusNode> {
        self.glue.net.down(Endpoint::Server(self.glue.id));
        self.tasks.abort_all();
        self.glue.consensus.clone()
    }
}

impl Glue {
    /// Whether this server leads with its allocator installed.
    pub fn is_leading(&self) -> bool {
        self.core().phase == Phase::Leading
    }

    fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, to: SocketAddr, reply_to: SeqNo, term: u64, msg: Msg) {
        self.net.send(
            Endpoint::Server(self.id),
            self.incarnation,
            Datagram {
                from: server_addr(self.id),
                to,
                sender: self.id,
                seq: 0,
                reply_to,
                epoch: term,
                msg,
            },
        );
    }

    /// The control task: mirrors `Controller::run`.
    async fn control(self: Arc<Self>, mut requests: mpsc::UnboundedReceiver<Register>) {
        let mut leader_rx = self.consensus.leader_watch();
        let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tasks = JoinSet::new();
        self.on_leader(*leader_rx.borrow_and_update(), &mut tasks);
        loop {
            tokio::select! {
                biased;
                changed = leader_rx.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep(Duration::from_millis(TICK_MS)).await;
                        continue;
                    }
                    let info = *leader_rx.borrow_and_update();
                    self.on_leader(info, &mut tasks);
                }
                Some(req) = requests.recv() => {
                    let t = self.clone();
                    tasks.spawn(async move { t.register(req).await });
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = self.raise_notify.notified() => self.propose_raises(&mut tasks),
                _ = tick.tick() => {
                    if !self.consensus.is_running() {
                        let mut core = self.core();
                        core.drop_allocator();
                        core.phase = Phase::Stopped;
                        break;
                    }
                    let now = self.clock.now_us();
                    self.core().expire(now, LEASE_MS * 1000);
                    self.check_quorum(&mut tasks);
                    self.propose_raises(&mut tasks);
                }
            }
        }
        tasks.abort_all();
    }

    /// Mirrors `Controller::on_leader` (membership removal is not simulated).
    fn on_leader(self: &Arc<Self>, info: LeaderInfo, tasks: &mut JoinSet<()>) {
        let id = self.id;
        let mut core = self.core();
        if core.phase == Phase::Stopped {
            return;
        }
        let was = (core.leader, core.term, core.phase);
        if std::env::var_os("UNID_SIM_DEBUG_VOTES").is_some() {
            eprintln!(
                "{:?} server {id} watch {info:?} vote {:?}",
                tokio::time::Instant::now(),
                self.consensus.raft().metrics().borrow().vote
            );
        }
        core.term = info.term;
        core.leader = if info.member { info.leader } else { None };
        let leads = info.member && info.leader == Some(id);
        if leads {
            self.obs.leader(self.clock.now_us(), id, info.term);
            if was.2 == Phase::Follower || was.1 != info.term {
                core.drop_allocator();
                core.phase = Phase::Warming;
                // Elected by a quorum just now.
                self.quorum_ok_us
                    .store(self.clock.now_us(), Ordering::Release);
                let this = self.clone();
                tasks.spawn(async move { this.become_leader(info.term).await });
            }
        } else if was.2 != Phase::Follower {
            core.drop_allocator();
            core.phase = Phase::Follower;
        }
    }

    /// Whether no quorum confirmed this leader's leadership for
    /// [`QUORUM_LOST_MS`] (the engine's `Shared::quorum_lost`).
    fn quorum_lost(&self, now_us: u64) -> bool {
        now_us.saturating_sub(self.quorum_ok_us.load(Ordering::Acquire)) > QUORUM_LOST_MS * 1000
    }

    /// Mirrors `Controller::check_quorum`: while leading, one check at a time
    /// that a quorum still follows.
    fn check_quorum(self: &Arc<Self>, tasks: &mut JoinSet<()>) {
        let leads = matches!(self.core().phase, Phase::Leading | Phase::Warming);
        if !leads || self.quorum_checking.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tasks.spawn(async move {
            let timeout = Duration::from_millis(QUORUM_CHECK_TIMEOUT_MS);
            if this.consensus.confirm_leadership(timeout).await {
                this.quorum_ok_us
                    .store(this.clock.now_us(), Ordering::Release);
            }
            this.quorum_checking.store(false, Ordering::Release);
        });
    }

    /// Mirrors `ServerHandler::not_ready_or_away`: `NotReady`, or a
    /// `NotLeader` naming no leader when no quorum confirmed this leader
    /// lately.
    fn not_ready_or_away(&self, term: u64, now_us: u64) -> Option<(u64, Msg)> {
        if self.quorum_lost(now_us) {
            return Some((term, Msg::NotLeader { leader: None }));
        }
        Some((
            term,
            Msg::Error {
                code: Code::NotReady,
            },
        ))
    }

    /// Mirrors `Controller::become_leader`: reads the ready ceilings and
    /// installs the allocator, retrying while this server still warms up in
    /// `term`.
    async fn become_leader(self: Arc<Self>, term: u64) {
        loop {
            let still = {
                let core = self.core();
                core.phase == Phase::Warming && core.term == term
            };
            if !still {
                return;
            }
            let read = if self.bug == Bug::LocalStateForReady {
                Ok(self.consensus.state())
            } else {
                self.consensus.ready_state().await
            };
            match read {
                Ok(applied) => {
                    let now = self.clock.now_us();
                    let ceilings: Vec<CommittedCeiling> = applied
                        .state
                        .sequences
                        .iter()
                        .filter_map(|(name, s)| {
                            Some(CommittedCeiling {
                                sequence: SequenceName::new(name).ok()?,
                                width: s.width(),
                                ceiling: s.ceiling,
                            })
                        })
                        .collect();
                    let seen: Vec<(String, u128)> = ceilings
                        .iter()
                        .map(|c| (c.sequence.as_str().to_owned(), c.ceiling))
                        .collect();
                    let Ok(alloc) =
                        LeaderAllocator::new(self.allocator_config.clone(), now, ceilings)
                    else {
                        return;
                    };
                    if self.install(term, alloc, &applied.state, now, &seen) {
                        self.raise_notify.notify_one();
                    }
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(READY_RETRY_MS)).await,
            }
        }
    }

    /// Mirrors `Controller::install`.
    fn install(
        &self,
        term: u64,
        alloc: LeaderAllocator,
        state: &unid_consensus::ClusterState,
        now: u64,
        seen: &[(String, u128)],
    ) -> bool {
        let mut core = self.core();
        if core.phase != Phase::Warming || core.term != term {
            return false;
        }
        self.obs.ready(now, self.id, term, seen);
        core.allocator = Some(alloc);
        core.phase = Phase::Leading;
        for r in state.nodes.values() {
            if r.kind != NodeKind::Agent || core.agents.len() >= AGENTS_MAX {
                continue;
            }
            if let Ok(ip) = r.addr.parse::<IpAddr>() {
                core.agents
                    .entry(r.id)
                    .or_insert((SocketAddr::new(ip, r.port), now));
            }
        }
        true
    }

    /// Mirrors `Controller::propose_raises`.
    fn propose_raises(self: &Arc<Self>, tasks: &mut JoinSet<()>) {
        let now = self.clock.now_us();
        let (raises, term) = {
            let mut core = self.core();
            let term = core.term;
            if core.phase != Phase::Leading {
                core.pending_raises.clear();
                return;
            }
            let mut raises = std::mem::take(&mut core.pending_raises);
            if let Some(alloc) = core.allocator.as_mut() {
                while raises.len() < RAISES_PER_TURN_MAX {
                    match alloc.poll_raise(now) {
                        Some(r) => raises.push(r),
                        None => break,
                    }
                }
            }
            if self.bug == Bug::GrantBeforeCommit
                && let Some(alloc) = core.allocator.as_mut()
            {
                for r in &raises {
                    let _ = alloc.on_raise_committed(&r.sequence, r.ceiling);
                }
            }
            (raises, term)
        };
        for raise in raises {
            let this = self.clone();
            tasks.spawn(async move { this.commit_raise(term, raise).await });
        }
    }

    /// Mirrors `Controller::commit_raise`: through this node's Raft only.
    async fn commit_raise(self: Arc<Self>, term: u64, raise: Raise) {
        let cmd = Command::RaiseCeiling {
            name: raise.sequence.as_str().to_owned(),
            ceiling: raise.ceiling,
        };
        let res =
            tokio::time::timeout(self.write_timeout, self.consensus.raft().client_write(cmd)).await;
        let outcome: Result<(u128, u64), ()> = match res {
            Ok(Ok(r)) => match r.data {
                Response::Ceiling { ceiling } => Ok((ceiling, r.log_id.leader_id.term)),
                _ => Err(()),
            },
            _ => Err(()),
        };
        let now = self.clock.now_us();
        let outcome = outcome.map(|(ceiling, entry_term)| {
            // Committed by this node as leader of the entry's term (which is
            // `term` unless leadership moved meanwhile), whatever it does next.
            self.obs
                .committed(now, self.id, entry_term, raise.sequence.as_str(), ceiling);
            ceiling
        });
        let mut core = self.core();
        if core.phase != Phase::Leading || core.term != term {
            return;
        }
        let Some(alloc) = core.allocator.as_mut() else {
            return;
        };
        match outcome {
            Ok(ceiling) => {
                if alloc.on_raise_committed(&raise.sequence, ceiling).is_err() {
                    core.drop_allocator();
                    core.phase = Phase::Follower;
                }
            }
            Err(()) => {
                let _ = alloc.on_raise_failed(now, &raise.sequence, raise.ceiling);
            }
        }
    }

    /// Mirrors `Controller::handle_request` for `Control::Register`.
    async fn register(self: Arc<Self>, req: Register) {
        let res = self
            .consensus
            .register_agent(
                "agent",
                req.incarnation,
                &req.from.ip().to_string(),
                req.from.port(),
                "agent",
            )
            .await;
        let (term, msg) = {
            let mut core = self.core();
            core.hellos_pending.remove(&(req.from, req.incarnation));
            let term = core.term;
            match res {
                Ok(node_id) if core.phase == Phase::Leading => {
                    let now = self.clock.now_us();
                    core.agents.insert(node_id, (req.from, now));
                    core.hellos.insert((req.from, req.incarnation), node_id);
                    (term, Some(Msg::Welcome { node_id }))
                }
                Ok(_) => (term, None),
                Err(_) => (
                    term,
                    Some(Msg::Error {
                        code: Code::NotReady,
                    }),
                ),
            }
        };
        if let Some(msg) = msg {
            self.send(req.from, req.reply_to, term, msg);
        }
    }

    /// The shard task: answers every datagram at once, never waiting on
    /// consensus.
    async fn shard(self: Arc<Self>, mut inbox: mpsc::UnboundedReceiver<Datagram>) {
        while let Some(d) = inbox.recv().await {
            let now = self.clock.now_us();
            let reply = self.on_datagram(&d, now);
            if let Some((term, msg)) = reply {
                self.send(d.from, d.seq, term, msg);
            }
        }
    }

    fn not_leader(core: &Core) -> Msg {
        Msg::NotLeader {
            leader: core.leader.map(server_addr),
        }
    }

    /// Mirrors the Hello arm of `Shard::handle` and `Shard::block_request`.
    fn on_datagram(&self, d: &Datagram, now_us: u64) -> Option<(u64, Msg)> {
        let mut core = self.core();
        let term = core.term;
        let leading = core.phase == Phase::Leading;
        match &d.msg {
            Msg::Hello { incarnation } => {
                if core.phase == Phase::Warming {
                    return self.not_ready_or_away(term, now_us);
                }
                if !leading {
                    return Some((term, Self::not_leader(&core)));
                }
                let key = (d.from, *incarnation);
                if let Some(&node_id) = core.hellos.get(&key) {
                    if let Some(a) = core.agents.get_mut(&node_id) {
                        a.1 = now_us;
                    }
                    return Some((term, Msg::Welcome { node_id }));
                }
                if core.hellos_pending.contains(&key) {
                    return None;
                }
                if self.quorum_lost(now_us) {
                    // Registering needs a quorum: send the agent elsewhere.
                    return Some((term, Msg::NotLeader { leader: None }));
                }
                if core.agents.len() + core.hellos_pending.len() >= AGENTS_MAX {
                    return Some((
                        term,
                        Msg::Error {
                            code: Code::NotReady,
                        },
                    ));
                }
                core.hellos_pending.insert(key);
                let _ = self.control_tx.send(Register {
                    from: d.from,
                    reply_to: d.seq,
                    incarnation: *incarnation,
                });
                None
            }
            Msg::BlockRequest { sequence, count } => {
                self.block_request(&mut core, d, sequence, *count, now_us)
            }
            _ => None,
        }
    }

    /// Mirrors `Shard::block_request`.
    fn block_request(
        &self,
        core: &mut Core,
        d: &Datagram,
        sequence: &str,
        count: u64,
        now_us: u64,
    ) -> Option<(u64, Msg)> {
        let term = core.term;
        if core.phase != Phase::Leading && core.phase != Phase::Warming {
            return Some((term, Self::not_leader(core)));
        }
        if core.phase == Phase::Warming {
            return self.not_ready_or_away(term, now_us);
        }
        let Some(agent) = core.agents.get_mut(&d.sender) else {
            return Some((
                term,
                Msg::Error {
                    code: Code::NotRegistered,
                },
            ));
        };
        agent.1 = now_us;
        agent.0 = d.from;
        match core.replies.lookup(now_us, d.sender, d.seq) {
            Lookup::Hit(m) => return Some((term, m.clone())),
            Lookup::Invalid => return None,
            Lookup::Miss | Lookup::Forgotten => {}
        }
        // The engine's replay check: a seq that already got a lasting answer is refused
        // (the engine answers `Replayed`, here `BadRequest`: the agent asks anew with a new
        // seq), never granted again.
        if core.windows.get(&d.sender).is_some_and(|w| !w.check(d.seq)) {
            return Some((
                term,
                Msg::Error {
                    code: Code::BadRequest,
                },
            ));
        }
        let not_ready = self.not_ready_or_away(term, now_us);
        let Ok(name) = SequenceName::new(sequence) else {
            return Some((
                term,
                Msg::Error {
                    code: Code::BadRequest,
                },
            ));
        };
        let Some(alloc) = core.allocator.as_mut() else {
            return not_ready;
        };
        let mut result = alloc.grant(now_us, &name, count);
        if result == Err(unid_core::Error::UnknownSequence) {
            let found = self
                .consensus
                .with_state(|s| s.state.sequences.get(sequence).cloned());
            if let Some(s) = found {
                let c = CommittedCeiling {
                    sequence: name.clone(),
                    width: s.width(),
                    ceiling: s.ceiling,
                };
                if alloc.add_sequence(now_us, c).is_ok() {
                    self.obs
                        .ready(now_us, self.id, term, &[(sequence.to_owned(), s.ceiling)]);
                }
                result = alloc.grant(now_us, &name, count);
            }
        }
        let width = alloc.sequence(&name).map(|v| v.width);
        if let Some(raise) = alloc.poll_raise_for(now_us, &name) {
            core.pending_raises.push(raise);
            self.raise_notify.notify_one();
        }
        let msg = match result {
            Ok(block) => {
                let width = width.expect("granted from a known sequence");
                self.obs.granted(
                    now_us,
                    self.id,
                    term,
                    sequence,
                    block.first(),
                    block.count(),
                );
                Msg::BlockGrant {
                    sequence: sequence.to_owned(),
                    width,
                    first: block.first(),
                    count: block.count(),
                }
            }
            Err(unid_core::Error::UnknownSequence) => Msg::Error {
                code: Code::UnknownSequence,
            },
            Err(unid_core::Error::Exhausted) => Msg::Error {
                code: Code::Exhausted,
            },
            Err(unid_core::Error::EmptyRequest) => {
                return Some((
                    term,
                    Msg::Error {
                        code: Code::BadRequest,
                    },
                ));
            }
            Err(_) => return not_ready,
        };
        core.replies.insert(now_us, d.sender, d.seq, msg.clone());
        core.windows.entry(d.sender).or_default().mark(d.seq);
        Some((term, msg))
    }
}
