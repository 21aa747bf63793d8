//! The consensus driver: the task that performs the [`unid_machine::Server`]'s consensus calls
//! on its [`ConsensusNode`] and feeds the results back. It has no socket of its own: what the
//! machine sends goes through an [`Outbox`] (the engine's shards, or the simulator's
//! network), and time comes from a [`Clock`] (the monotonic clock, or the simulator's).
//!
//! The engine and the simulator run this same driver (and so the same machine): the only
//! code the simulator replaces is the I/O under it.
//!
//! # Locks
//! The machine sits behind one `std::sync::Mutex`. Every critical section is a pure
//! in-memory computation of a few microseconds; none does I/O, awaits or sleeps, and the
//! lock order is always the machine first, then the consensus state's read lock.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use unid_consensus::{Command, ConsensusNode, Response, Role};
use unid_core::Raise;
use unid_machine::Server;
use unid_machine::server::{
    Action, Asker, CreateError, Leadership, MembershipError, QUORUM_CHECK_TIMEOUT_MS, RaftView,
    RegisterError, TICK_MS, Transmit, role_tag,
};
use unid_proto::{ErrorCode, RaftRole, SequenceName};

/// Where the machine's datagrams go, and how the rest of the network is reached.
pub trait Outbox: Send + Sync + 'static {
    /// Sends (or queues) one datagram; waits only for room in a queue.
    fn send(&self, t: Transmit) -> impl Future<Output = ()> + Send;

    /// Whether a server to be added answers at its Raft address `raft`: checked before the
    /// membership is touched (a learner that never answers stalls later changes). The default
    /// tries TCP connections for up to 3 s; the simulator asks its network instead.
    fn raft_reachable(&self, raft: SocketAddr) -> impl Future<Output = bool> + Send {
        tcp_reachable(raft)
    }
}

/// Microseconds on a monotonic clock.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// How the server is asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Keep running.
    Run,
    /// As leader, tell agents and servers where to go, then hand leadership off.
    Graceful,
    /// No notices, no handoff.
    Abrupt,
}

/// Why [`Driver::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Asked to stop.
    Stopped(StopMode),
    /// This server was removed from the cluster.
    Removed,
    /// Consensus stopped (storage failure or fatal Raft error).
    Failed,
}

/// The consensus driver (see the module docs).
pub struct Driver<O: Outbox> {
    machine: Arc<Mutex<Server>>,
    consensus: Arc<ConsensusNode>,
    outbox: O,
    clock: Clock,
    /// Notified when the machine has actions (a grant asked for a raise, a Hello for a
    /// registration).
    wake: Arc<Notify>,
    write_timeout: Duration,
    /// Proposes a cluster id (random in the engine, seeded in the simulator).
    cluster_id: Arc<dyn Fn() -> u64 + Send + Sync>,
}

/// Locks the machine. A panic while holding the lock is a bug that already stopped a thread;
/// keep serving the state as it is rather than cascading.
pub fn lock(machine: &Mutex<Server>) -> MutexGuard<'_, Server> {
    machine.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the machine knows of `consensus` beyond its applied state.
pub fn raft_view(consensus: &ConsensusNode) -> RaftView {
    let m = consensus.metrics();
    let rm = consensus.raft().metrics();
    let rm = rm.borrow();
    RaftView {
        term: m.term,
        role: Some(match m.role {
            Role::Leader => RaftRole::Leader,
            Role::Candidate => RaftRole::Candidate,
            Role::Learner => RaftRole::Learner,
            Role::Follower | Role::Shutdown => RaftRole::Follower,
        }),
        voters: m.voters,
        learners: m.learners,
        members: rm
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect(),
        replication: rm
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .map(|(id, l)| (*id, l.as_ref().map(|l| l.index)))
                    .collect()
            })
            .unwrap_or_default(),
        last_log: rm.last_log_index,
    }
}

impl<O: Outbox> Driver<O> {
    /// A driver of `machine` on `consensus`.
    pub fn new(
        machine: Arc<Mutex<Server>>,
        consensus: Arc<ConsensusNode>,
        outbox: O,
        clock: Clock,
        wake: Arc<Notify>,
        write_timeout: Duration,
        cluster_id: Arc<dyn Fn() -> u64 + Send + Sync>,
    ) -> Driver<O> {
        Driver {
            machine,
            consensus,
            outbox,
            clock,
            wake,
            write_timeout,
            cluster_id,
        }
    }

    /// The consensus node.
    pub fn consensus(&self) -> &Arc<ConsensusNode> {
        &self.consensus
    }

    /// The outbox.
    pub fn outbox(&self) -> &O {
        &self.outbox
    }

    /// The machine.
    pub fn machine_handle(&self) -> Arc<Mutex<Server>> {
        self.machine.clone()
    }

    /// Gives up the driver for its consensus node (to shut it down).
    pub fn into_consensus(self) -> Arc<ConsensusNode> {
        self.consensus
    }

    fn machine(&self) -> MutexGuard<'_, Server> {
        lock(&self.machine)
    }

    /// Runs `f` on the machine with the applied state (machine lock first, then the state's).
    fn with<T>(&self, f: impl FnOnce(&mut Server, &unid_consensus::ClusterState) -> T) -> T {
        let mut m = self.machine();
        self.consensus.with_state(|s| f(&mut m, &s.state))
    }

    /// Sends what the machine queued.
    async fn flush(&self) {
        let out: Vec<Transmit> = {
            let mut m = self.machine();
            std::iter::from_fn(|| m.poll_transmit()).collect()
        };
        for t in out {
            self.outbox.send(t).await;
        }
    }

    /// Follows the leader watch, ticks the machine, and performs its actions until asked to
    /// stop, removed from the cluster, or consensus stops. Returns why, and the driver.
    pub async fn run(self, mut stop_rx: watch::Receiver<StopMode>) -> (Ended, Self) {
        let this = Arc::new(self);
        let mut leader_rx = this.consensus.leader_watch();
        let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Every task the loop starts; aborted at the end so that nothing holds the node.
        let mut tasks = tokio::task::JoinSet::new();
        let mut ended = None;
        let info = *leader_rx.borrow_and_update();
        if this.on_leader(info) {
            ended = Some(Ended::Removed);
        }
        while ended.is_none() {
            this.perform(&mut tasks);
            this.flush().await;
            // Biased: the same order every time, for the simulator's determinism (any order
            // is correct).
            tokio::select! {
                biased;
                changed = leader_rx.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep(Duration::from_millis(TICK_MS)).await;
                        continue;
                    }
                    let info = *leader_rx.borrow_and_update();
                    if this.on_leader(info) {
                        ended = Some(Ended::Removed);
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = this.wake.notified() => {}
                _ = tick.tick() => {
                    if !this.consensus.is_running() {
                        this.machine().on_consensus_stopped();
                        ended = Some(Ended::Failed);
                        continue;
                    }
                    let view = raft_view(&this.consensus);
                    let now = (this.clock)();
                    this.with(|m, s| {
                        m.set_raft_view(view);
                        m.on_tick(now, s);
                    });
                }
                _ = stop_rx.changed() => {
                    let mode = *stop_rx.borrow();
                    if mode != StopMode::Run {
                        ended = Some(Ended::Stopped(mode));
                    }
                }
            }
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        let Ok(driver) = Arc::try_unwrap(this) else {
            unreachable!("every task holding the driver was joined");
        };
        (ended.expect("the loop ends with a reason"), driver)
    }

    fn on_leader(&self, info: unid_consensus::LeaderInfo) -> bool {
        let now = (self.clock)();
        let view = raft_view(&self.consensus);
        let mut m = self.machine();
        m.set_raft_view(view);
        m.on_leader(
            now,
            Leadership {
                leader: info.leader,
                term: info.term,
                member: info.member,
            },
        )
    }

    /// Starts a task for every action the machine queued.
    fn perform(self: &Arc<Self>, tasks: &mut tokio::task::JoinSet<()>) {
        loop {
            let Some(action) = self.machine().poll_action() else {
                return;
            };
            let this = self.clone();
            tasks.spawn(async move {
                this.act(action).await;
                this.flush().await;
            });
        }
    }

    /// Performs one action and reports its result to the machine.
    async fn act(&self, action: Action) {
        match action {
            Action::ReadReady { term } => match self.consensus.ready_state().await {
                Ok(applied) => {
                    let view = raft_view(&self.consensus);
                    let now = (self.clock)();
                    let mut m = self.machine();
                    m.set_raft_view(view);
                    m.on_ready(now, term, &applied.state);
                }
                Err(e) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    self.machine().on_ready_failed(term, &e.to_string());
                }
            },
            Action::Raise { term, raise } => self.raise(term, raise).await,
            Action::Register {
                asker,
                incarnation,
                name,
                role,
            } => {
                let res = self
                    .consensus
                    .register_agent(
                        &name,
                        incarnation,
                        &asker.from.ip().to_string(),
                        asker.from.port(),
                        role_tag(role),
                    )
                    .await
                    .map_err(|e| match e {
                        unid_consensus::Error::Rejected(unid_consensus::Rejection::TableFull) => {
                            RegisterError::TableFull
                        }
                        e => RegisterError::Failed(e.to_string()),
                    });
                let now = (self.clock)();
                self.machine()
                    .on_registered(now, asker, incarnation, &name, res);
            }
            Action::CreateSequence {
                asker,
                name,
                width,
                start,
            } => {
                use unid_consensus::{Error as E, Rejection as R};
                let res = match SequenceName::new(&name) {
                    Ok(n) => self.consensus.create_sequence(&n, width, start).await,
                    Err(_) => Err(E::Rejected(R::BadName)),
                };
                let res = res.map_err(|e| match e {
                    E::Rejected(R::SequenceExists) => CreateError::Exists,
                    E::Rejected(r) => CreateError::Rejected(r.to_string()),
                    e => CreateError::Failed(e.to_string()),
                });
                self.machine()
                    .on_sequence_created(asker, &name, width, start, res);
            }
            Action::AddServer {
                asker,
                id,
                raft,
                listen,
            } => {
                let res = if self.outbox.raft_reachable(raft).await {
                    match self.consensus.add_server(id, &raft.to_string()).await {
                        Ok(()) => self
                            .consensus
                            .write(Command::UpsertServer {
                                id,
                                addr: listen.to_string(),
                            })
                            .await
                            .map(|_| ()),
                        Err(e) => Err(e),
                    }
                    .map_err(membership_error)
                } else {
                    // A learner that never answers stalls later membership changes (and, seen
                    // on a 1-server cluster, every write): refuse before touching the membership.
                    Err(MembershipError {
                        code: ErrorCode::BadRequest,
                        text: "the new server's Raft address does not accept connections: start it first".into(),
                    })
                };
                self.membership_done(asker, res);
            }
            Action::RemoveServer { asker, id } => {
                let res = self
                    .consensus
                    .remove_server(id)
                    .await
                    .map_err(membership_error);
                self.membership_done(asker, res);
            }
            Action::RemoveNodes { ids } => {
                let mut removed = 0;
                for id in ids {
                    match self.consensus.remove_node(id).await {
                        Ok(true) => removed += 1,
                        Ok(false) => {}
                        Err(e) => {
                            tracing::debug!(id, "removing an expired agent failed: {e}");
                            break;
                        }
                    }
                }
                self.machine().on_nodes_removed(removed);
            }
            Action::ConfirmLeadership { term } => {
                let timeout = Duration::from_millis(QUORUM_CHECK_TIMEOUT_MS);
                let confirmed = self.consensus.confirm_leadership(timeout).await;
                let now = (self.clock)();
                self.machine().on_quorum_checked(now, term, confirmed);
            }
            Action::RecordServers { servers } => {
                for (id, addr) in servers {
                    let cmd = Command::UpsertServer {
                        id,
                        addr: addr.to_string(),
                    };
                    match self.consensus.write(cmd).await {
                        Ok(_) => {
                            tracing::debug!(id, udp = %addr, "recorded a server's UDP address")
                        }
                        Err(e) => tracing::debug!(id, "recording a server's UDP address: {e}"),
                    }
                }
                self.with(|m, s| m.on_servers_recorded(s));
            }
            Action::CreateClusterId => {
                let cmd = Command::SetSetting {
                    key: unid_consensus::SETTING_CLUSTER_ID.to_owned(),
                    value: (self.cluster_id)(),
                };
                if let Err(e) = self.consensus.write(cmd).await {
                    // Tried again when this server (or another) next becomes leader.
                    tracing::warn!("cannot commit the cluster id: {e}");
                }
                self.with(|m, s| m.on_cluster_id(s));
            }
        }
    }

    /// Commits one raise through this node's Raft (never forwarded: see the machine's docs)
    /// and reports it to the machine.
    async fn raise(&self, term: u64, raise: Raise) {
        let cmd = Command::RaiseCeiling {
            name: raise.sequence.as_str().to_owned(),
            ceiling: raise.ceiling,
        };
        let started_us = (self.clock)();
        let res =
            tokio::time::timeout(self.write_timeout, self.consensus.raft().client_write(cmd)).await;
        let now = (self.clock)();
        let outcome = match res {
            Err(_) => Err(format!("timed out after {:?}", self.write_timeout)),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(r)) => match r.data {
                Response::Ceiling { ceiling } => Ok((ceiling, r.log_id.leader_id.term)),
                other => Err(format!("unexpected answer {other:?}")),
            },
        };
        self.machine()
            .on_raise_done(now, term, &raise, outcome, now.saturating_sub(started_us));
    }

    fn membership_done(&self, asker: Asker, res: Result<(), MembershipError>) {
        let view = raft_view(&self.consensus);
        self.with(|m, s| {
            m.set_raft_view(view);
            m.on_membership_done(asker, res, s);
        });
    }
}

fn membership_error(e: unid_consensus::Error) -> MembershipError {
    let code = match e {
        unid_consensus::Error::Config(_) | unid_consensus::Error::Rejected(_) => {
            ErrorCode::BadRequest
        }
        _ => ErrorCode::NotReady,
    };
    MembershipError {
        code,
        text: format!("membership change: {e}"),
    }
}

/// Whether something accepts TCP connections at `raft` within 3 s (checked before a server is
/// added, so that a typo or a server not started is refused up front; a server just started
/// gets the time to bind).
async fn tcp_reachable(raft: SocketAddr) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let attempt =
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(raft));
        if matches!(attempt.await, Ok(Ok(_))) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
