//! The run: one seed → a cluster shape, a fault schedule and every random
//! choice of the network, the disks and the agents.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;
use unid_agent::PairRole;
use unid_consensus::store::{self, IoMode};
use unid_consensus::{ConsensusNode, NodeConfig, Timing};
use unid_proto::{Id, NodeId, SequenceName, Width};

use crate::agent::{Agent, AgentSpec, Consumer, PairSpec, Rings};
use crate::app::{PairApp, PairStats};
use crate::clock::Clock;
use crate::disk::SimDisk;
use crate::error::SimError;
use crate::invariants::{Observer, Seen, Violation};
use crate::net::{Endpoint, Faults, Net, NetStats, raft_addr};
use crate::operator::{self, Change, Outcome};
use crate::server::Server;

/// Raft timing in the simulation. The election timeout range has a single
/// value (`max = min + 1`; openraft draws from `min..max` with
/// `rand::thread_rng`, which cannot be seeded): the seeded network delays
/// break the ties instead.
pub const TIMING: Timing = Timing {
    heartbeat_ms: 50,
    election_min_ms: 150,
    election_max_ms: 151,
    connect_timeout_ms: 100,
    write_timeout_ms: 1_000,
    install_snapshot_timeout_ms: 1_000,
    backoff_ms: 100,
};

/// Everything a run does, derived from its seed by [`SimConfig::from_seed`]
/// (fields may be changed before [`run`]).
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// The seed.
    pub seed: u64,
    /// Servers: 3 or 5.
    pub servers: usize,
    /// Agents.
    pub agents: usize,
    /// Consumers per agent.
    pub consumers_per_agent: usize,
    /// Sequences: name, width, start.
    pub sequences: Vec<(String, Width, Id)>,
    /// Rounds of chaos followed by calm.
    pub rounds: u32,
    /// Chaos lasts between these, in milliseconds.
    pub chaos_ms: (u64, u64),
    /// Calm lasts this long, in milliseconds.
    pub calm_ms: u64,
    /// The progress invariant's bound, in milliseconds (< `calm_ms`).
    pub progress_bound_ms: u64,
    /// Whether a crash may keep a random subset of unsynced writes (a torn
    /// commit) rather than none.
    pub torn_writes: bool,
    /// Invariants not enforced, by file name (tests only: to show that one
    /// invariant alone catches what another would catch first).
    pub skip_invariants: Vec<&'static str>,
    /// Print every event.
    pub verbose: bool,
    /// Whether an operator adds or removes a server once per round, during the chaos
    /// (`unid cluster add-server` / `remove-server`: half the seeds; between 3 and 5 voters,
    /// at most 9 servers).
    pub membership_changes: bool,
    /// Whether agent 0 has a backup agent (one more agent, the last): the two exchange
    /// heartbeats over the simulated network, and agent 0's consumers are an application
    /// that reads both rings as the client's pair mode does (half the seeds).
    pub pairs: bool,
    /// Whether the leader faults may also crash every server at once and restart them all
    /// within the election timeout (the `restart-all` of loadgen), so that openraft restores
    /// the leader in its old term with entries of that term unapplied (half the seeds).
    pub restart_all: bool,
}

impl SimConfig {
    /// The configuration seed `seed` runs with.
    pub fn from_seed(seed: u64) -> SimConfig {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x7368_6170_6500_0000);
        let servers = if rng.random_bool(0.3) { 5 } else { 3 };
        SimConfig {
            seed,
            servers,
            agents: rng.random_range(2..=4),
            consumers_per_agent: rng.random_range(1..=2),
            sequences: vec![
                ("orders".into(), Width::W8, rng.random_range(1..1_000)),
                // Some seeds start the 2-byte sequence near its end, so that
                // it runs out during the run (the exhausted path).
                (
                    "small".into(),
                    Width::W2,
                    if rng.random_bool(0.3) {
                        Id::from(u16::MAX - 1) - rng.random_range(200..3_000)
                    } else {
                        rng.random_range(1..100)
                    },
                ),
            ],
            rounds: 2,
            chaos_ms: (1_000, 3_000),
            calm_ms: 5_000,
            progress_bound_ms: 4_000,
            torn_writes: true,
            skip_invariants: Vec::new(),
            verbose: false,
            // Drawn last: the fields above are what they were before it existed.
            membership_changes: rng.random_bool(0.5),
            // Drawn after it, for the same reason.
            pairs: rng.random_bool(0.5),
            // And after that one.
            restart_all: rng.random_bool(0.5),
        }
    }

    /// The shorter run the test sweep uses (one round of chaos and calm
    /// instead of two): the same cluster and the same first round.
    pub fn short(seed: u64) -> SimConfig {
        SimConfig {
            rounds: 1,
            ..SimConfig::from_seed(seed)
        }
    }

    fn validate(&self) -> Result<(), SimError> {
        let bad = |m: &str| Err(SimError::Config(m.to_owned()));
        if !(1..=9).contains(&self.servers) {
            return bad("servers must be in 1..=9");
        }
        if !(1..=32).contains(&self.agents) || !(1..=8).contains(&self.consumers_per_agent) {
            return bad("agents must be in 1..=32, consumers per agent in 1..=8");
        }
        if self.sequences.is_empty() || self.chaos_ms.0 > self.chaos_ms.1 {
            return bad("need a sequence, and chaos_ms.0 <= chaos_ms.1");
        }
        if self.progress_bound_ms >= self.calm_ms {
            return bad("progress_bound_ms must be below calm_ms");
        }
        Ok(())
    }
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Report {
    /// The configuration it ran.
    pub config: SimConfig,
    /// Every invariant violation, in order (the run stops soon after the
    /// first).
    pub violations: Vec<Violation>,
    /// What the checker saw, including the trace digest.
    pub seen: Seen,
    /// Network counters.
    pub net: NetStats,
    /// Server crashes (scheduled, and disk failures).
    pub crashes: u64,
    /// Unsynced disk writes lost, and kept (torn), at crashes.
    pub lost_writes: (u64, u64),
    /// Simulated time the run covered, in milliseconds.
    pub sim_ms: u64,
    /// Membership changes the leader answered as done.
    pub membership_done: u64,
    /// Membership changes refused or given up on (a change may still have happened: the
    /// voters are read back from Raft).
    pub membership_failed: u64,
    /// What the pair's consumers did (zeros without a pair).
    pub pair: PairStats,
    /// Times every server was crashed at once and restarted ([`SimConfig::restart_all`]).
    pub restart_alls: u64,
    /// Allocators dropped by a raise that revealed a higher committed ceiling, with the
    /// ceilings read again in the same term (`ServerStats::rewarms`, over every server and
    /// incarnation).
    pub rewarms: u64,
}

impl Report {
    /// Whether every invariant held.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// The command that replays this seed.
    pub fn replay_command(&self) -> String {
        replay_command(&self.config)
    }
}

/// The command that replays the run of `config`, printing its history.
pub fn replay_command(config: &SimConfig) -> String {
    let d = SimConfig::from_seed(config.seed);
    let mut cmd = format!(
        "cargo run --release -p unid-sim -- --seed {} --verbose",
        config.seed
    );
    if config.rounds != d.rounds {
        cmd.push_str(&format!(" --rounds {}", config.rounds));
    }
    if !config.torn_writes {
        cmd.push_str(" --no-torn-writes");
    }
    if config.membership_changes != d.membership_changes {
        cmd.push_str(if config.membership_changes {
            " --membership-changes"
        } else {
            " --no-membership-changes"
        });
    }
    if config.pairs != d.pairs {
        cmd.push_str(if config.pairs {
            " --pairs"
        } else {
            " --no-pairs"
        });
    }
    if config.restart_all != d.restart_all {
        cmd.push_str(if config.restart_all {
            " --restart-all"
        } else {
            " --no-restart-all"
        });
    }
    cmd
}

/// Runs one simulation to its end on a fresh single-threaded runtime with a
/// paused clock.
pub fn run(config: SimConfig) -> Result<Report, SimError> {
    config.validate()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(SimError::Runtime)?;
    let report = rt.block_on(async move {
        let mut w = World::new(config);
        let res = w.simulate().await;
        w.shutdown();
        res.map(|()| w.report())
    });
    // Dropping the runtime drops every task still parked.
    drop(rt);
    report
}

/// A server's place in the cluster, as far as the schedule knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// A voter: counts for the calm majority.
    Voter,
    /// Started for an `add-server` that has not made it a voter (yet).
    Joining,
    /// Removed from the voters: down for good.
    Retired,
}

struct ServerSlot {
    id: NodeId,
    role: Role,
    disk: SimDisk,
    incarnation: u64,
    running: Option<Server>,
    /// Restart at this time (after a disk failure), if down.
    restart_at_us: Option<u64>,
}

struct AgentSlot {
    spec: AgentSpec,
    incarnation: u64,
    task: Option<JoinHandle<()>>,
    /// Its rings: they outlive its incarnations (see [`Rings`]).
    rings: Rings,
}

struct World {
    config: SimConfig,
    rng: SmallRng,
    clock: Clock,
    net: Net,
    obs: Observer,
    servers: Vec<ServerSlot>,
    agents: Vec<AgentSlot>,
    crashes: u64,
    lost_writes: (u64, u64),
    /// Draws of the membership schedule (its own stream: seeds without membership changes
    /// draw nothing from it).
    membership_rng: SmallRng,
    /// The operator's command in flight.
    operator: Option<(Change, JoinHandle<Outcome>)>,
    operator_incarnation: u64,
    /// The last [`World::settle_membership`] found one voter set, led.
    membership_settled: bool,
    membership_done: u64,
    membership_failed: u64,
    /// The pair's application, if the run has a pair.
    pair_app: Option<JoinHandle<()>>,
    pair_stats: Arc<Mutex<PairStats>>,
    /// Every server incarnation's machine counters (summed in the report).
    server_stats: Vec<Arc<unid_machine::server::ServerStats>>,
    restart_alls: u64,
}

/// Most servers a run has, added ones included.
const SERVERS_MAX: usize = 9;

/// How often the schedule wakes to check invariants and disks.
const STEP_MS: u64 = 25;

impl World {
    fn new(config: SimConfig) -> World {
        let seed = config.seed;
        let verbose = config.verbose;
        let bound = config.progress_bound_ms * 1000;
        World {
            rng: SmallRng::seed_from_u64(seed),
            clock: Clock::new(),
            net: Net::new(seed),
            obs: Observer::new(verbose, bound, config.skip_invariants.clone()),
            servers: Vec::new(),
            agents: Vec::new(),
            crashes: 0,
            lost_writes: (0, 0),
            membership_rng: SmallRng::seed_from_u64(seed ^ 0x6d65_6d62_6572_0000),
            operator: None,
            operator_incarnation: 0,
            membership_settled: true,
            membership_done: 0,
            membership_failed: 0,
            pair_app: None,
            pair_stats: Arc::default(),
            server_stats: Vec::new(),
            restart_alls: 0,
            config,
        }
    }

    fn now_us(&self) -> u64 {
        self.clock.now_us()
    }

    fn fault(&self, what: String) {
        self.obs.fault(self.now_us(), what);
    }

    async fn start_server(&mut self, i: usize) -> Result<(), SimError> {
        let slot = &mut self.servers[i];
        let id = slot.id;
        slot.incarnation += 1;
        let inc = slot.incarnation;
        let (log, sm) =
            store::open_with_backend(slot.disk.clone(), IoMode::Inline, &format!("server {id}"))
                .map_err(|source| SimError::Consensus { server: id, source })?;
        let mut cfg = NodeConfig::new(id, "/nonexistent-sim-dir", raft_addr(id));
        cfg.timing = TIMING;
        cfg.snapshot_logs = 100;
        cfg.logs_to_keep = 20;
        let node = ConsensusNode::start_with_network(cfg, log, sm, self.net.raft_network(id, inc))
            .await
            .map_err(|source| SimError::Consensus { server: id, source })?;
        let servers: Vec<NodeId> = self.servers.iter().map(|s| s.id).collect();
        let server = Server::start(
            Arc::new(node),
            inc,
            &servers,
            self.net.clone(),
            self.clock,
            self.obs.clone(),
            Duration::from_millis(TIMING.write_timeout_ms),
        )?;
        self.server_stats.push(server.stats());
        self.servers[i].running = Some(server);
        self.servers[i].restart_at_us = None;
        Ok(())
    }

    fn crash_server(&mut self, i: usize, why: &str) {
        let torn = self.config.torn_writes && self.rng.random_bool(0.5);
        let slot = &mut self.servers[i];
        let Some(server) = slot.running.take() else {
            return;
        };
        // Power off: the disk first (nothing more reaches it), then the
        // network, then every task.
        let old = slot.disk.clone();
        slot.disk = old.crash(&mut self.rng, torn);
        let st = old.stats();
        self.lost_writes.0 += st.lost_writes;
        self.lost_writes.1 += st.kept_writes;
        let id = slot.id;
        Self::power_off(server.crash());
        self.crashes += 1;
        self.fault(format!(
            "crash server {id} ({why}; unsynced writes lost {}, kept {})",
            st.lost_writes, st.kept_writes
        ));
    }

    /// Stops a downed server's Raft (in the background: it may be waiting on a peer).
    fn power_off(node: Arc<ConsensusNode>) {
        let raft = node.raft().clone();
        drop(node);
        tokio::spawn(async move {
            let _ = raft.shutdown().await;
        });
    }

    /// A graceful stop of server `i` (SIGTERM): `LeaderChange` notices as leader, then down;
    /// its disk keeps what was synced (every commit is), and it restarts like a crashed one.
    fn stop_server_gracefully(&mut self, i: usize) {
        let slot = &mut self.servers[i];
        let Some(server) = slot.running.take() else {
            return;
        };
        let old = slot.disk.clone();
        slot.disk = old.crash(&mut self.rng, false);
        let id = slot.id;
        let (successor, node) = server.stop_gracefully();
        Self::power_off(node);
        self.crashes += 1;
        self.fault(format!(
            "graceful stop of server {id} (LeaderChange naming {successor:?})"
        ));
    }

    async fn restart_server(&mut self, i: usize) {
        let id = self.servers[i].id;
        self.fault(format!("restart server {id}"));
        if let Err(e) = self.start_server(i).await {
            // A server that cannot recover its disk is a durability bug.
            let now = self.now_us();
            self.obs
                .fault(now, format!("VIOLATION restart: server {id}: {e}"));
            self.obs.restart_failed(now, id, e.to_string());
        }
    }

    fn start_agent(&mut self, i: usize) {
        let slot = &mut self.agents[i];
        slot.incarnation += 1;
        let seed = self
            .config
            .seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add((i as u64) << 20 | slot.incarnation);
        match Agent::new(
            slot.spec.clone(),
            slot.incarnation,
            seed,
            self.net.clone(),
            self.clock,
            self.obs.clone(),
            slot.rings.clone(),
        ) {
            Ok(agent) => slot.task = Some(tokio::spawn(agent.run())),
            Err(e) => self
                .obs
                .fault(self.clock.now_us(), format!("agent {i}: {e}")),
        }
    }

    fn crash_agent(&mut self, i: usize) {
        if let Some(t) = self.agents[i].task.take() {
            t.abort();
            self.net.down(Endpoint::Agent(i));
            self.fault(format!("crash agent {i}"));
        }
    }

    /// The slots of the voters, as far as the schedule knows.
    fn voters(&self) -> Vec<usize> {
        (0..self.servers.len())
            .filter(|&i| self.servers[i].role == Role::Voter)
            .collect()
    }

    /// The operator's change of this round: with fewer than 4 voters (or 4, at random) it
    /// adds a server (a new, empty one, or one that has not joined yet); otherwise it removes
    /// a voter that does not lead.
    async fn membership_change(&mut self) {
        if self.operator.is_some() {
            return;
        }
        let voters = self.voters();
        let add = voters.len() < 4 || (voters.len() < 5 && self.membership_rng.random_bool(0.5));
        let change = if add {
            let joining = self.servers.iter().position(|s| s.role == Role::Joining);
            let i = match joining {
                Some(i) => i,
                None if self.servers.len() < SERVERS_MAX => {
                    let id = self.servers.len() as NodeId + 1;
                    self.servers.push(ServerSlot {
                        id,
                        role: Role::Joining,
                        disk: SimDisk::new(),
                        incarnation: 0,
                        running: None,
                        restart_at_us: None,
                    });
                    self.fault(format!("start server {id} (empty, not a member yet)"));
                    let i = self.servers.len() - 1;
                    if let Err(e) = self.start_server(i).await {
                        self.fault(format!("server {id} does not start: {e}"));
                        return;
                    }
                    i
                }
                None => return,
            };
            if self.servers[i].running.is_none() {
                self.restart_server(i).await;
            }
            Change::Add(self.servers[i].id)
        } else {
            let leader = self.leader();
            let others: Vec<usize> = voters.into_iter().filter(|&i| Some(i) != leader).collect();
            if others.is_empty() {
                return;
            }
            let i = others[self.membership_rng.random_range(0..others.len())];
            Change::Remove(self.servers[i].id)
        };
        let ask: Vec<NodeId> = self.voters().iter().map(|&i| self.servers[i].id).collect();
        self.operator_incarnation += 1;
        self.fault(format!("operator: {change:?}, asking {ask:?}"));
        let task = tokio::spawn(operator::run(
            self.net.clone(),
            self.operator_incarnation,
            change,
            ask,
        ));
        self.operator = Some((change, task));
    }

    /// Takes the operator's result once its command ended.
    async fn operator_finished(&mut self) {
        if !self.operator.as_ref().is_some_and(|(_, t)| t.is_finished()) {
            return;
        }
        let Some((change, task)) = self.operator.take() else {
            return;
        };
        let outcome = task.await.unwrap_or(Outcome::GaveUp);
        self.fault(format!("operator: {change:?} -> {outcome:?}"));
        match outcome {
            Outcome::Done(voters) => {
                self.membership_done += 1;
                self.reconcile(&voters);
            }
            Outcome::Refused(_) | Outcome::GaveUp => self.membership_failed += 1,
        }
    }

    /// Makes the schedule's roles those of `voters` (as the leader reported them): a voter
    /// no longer among them is retired (stopped for good, as an operator stops a removed
    /// server), a joining server among them is a voter.
    fn reconcile(&mut self, voters: &[NodeId]) {
        for i in 0..self.servers.len() {
            let id = self.servers[i].id;
            let was = self.servers[i].role;
            let role = match was {
                _ if voters.contains(&id) => Role::Voter,
                Role::Voter | Role::Retired => Role::Retired,
                Role::Joining => Role::Joining,
            };
            if role == was {
                continue;
            }
            self.servers[i].role = role;
            if role == Role::Retired {
                self.servers[i].restart_at_us = None;
                if let Some(server) = self.servers[i].running.take() {
                    Self::power_off(server.crash());
                }
                self.fault(format!("server {id} retired: no longer a voter"));
            } else {
                self.fault(format!("server {id} is a voter"));
            }
        }
    }

    fn leader(&self) -> Option<usize> {
        self.servers
            .iter()
            .position(|s| s.running.as_ref().is_some_and(|r| r.is_leading()))
    }

    async fn setup(&mut self) -> Result<(), SimError> {
        let n = self.config.servers;
        for id in 1..=n as NodeId {
            self.servers.push(ServerSlot {
                id,
                role: Role::Voter,
                disk: SimDisk::new(),
                incarnation: 0,
                running: None,
                restart_at_us: None,
            });
        }
        for i in 0..n {
            self.start_server(i).await?;
        }
        let members: BTreeMap<NodeId, String> = (1..=n as NodeId)
            .map(|id| (id, format!("sim:{id}")))
            .collect();
        let first = self.servers[0]
            .running
            .as_ref()
            .map(|s| s.consensus().clone());
        if let Some(c) = first {
            c.initialize_with(members)
                .await
                .map_err(|source| SimError::Consensus { server: 1, source })?;
        }
        let mut waited_ms = 0;
        let leader = loop {
            if let Some(l) = self.leader() {
                break l;
            }
            if waited_ms > 10_000 {
                return Err(SimError::Setup("no leader within 10 s".into()));
            }
            tokio::time::sleep(Duration::from_millis(STEP_MS)).await;
            waited_ms += STEP_MS;
        };
        let c = self.servers[leader]
            .running
            .as_ref()
            .map(|s| s.consensus().clone())
            .ok_or_else(|| SimError::Setup("leader vanished".into()))?;
        for (name, width, start) in self.config.sequences.clone() {
            let n = SequenceName::new(&name)
                .map_err(|e| SimError::Config(format!("sequence {name}: {e}")))?;
            c.create_sequence(&n, width, start)
                .await
                .map_err(|e| SimError::Setup(format!("create {name}: {e}")))?;
            self.obs.sequence(&name, width, start);
        }
        let names: Vec<String> = self.config.sequences.iter().map(|s| s.0.clone()).collect();
        let mut consumer = 0;
        for index in 0..self.config.agents {
            let consumers = (0..self.config.consumers_per_agent)
                .map(|k| {
                    consumer += 1;
                    Consumer {
                        id: consumer,
                        sequence: (index + k) % names.len(),
                    }
                })
                .collect();
            self.agents.push(AgentSlot {
                spec: AgentSpec {
                    index,
                    sequences: names.clone(),
                    consumers,
                    consume_every_us: self.rng.random_range(5_000..=20_000),
                    // 2-byte sequences have small raise windows (a leader
                    // change may lose at most 255 ids), so they are consumed
                    // slowly: a raise per window, each one Raft entry.
                    take_max: self
                        .config
                        .sequences
                        .iter()
                        .map(|(_, w, _)| {
                            if *w == Width::W2 {
                                4
                            } else {
                                self.rng.random_range(1..=40)
                            }
                        })
                        .collect(),
                    servers: (1..=n as NodeId).collect(),
                    pair: None,
                },
                incarnation: 0,
                task: None,
                rings: Rings::default(),
            });
            if !(self.config.pairs && index == 0) {
                self.start_agent(index); // Agent 0 of a pair starts in `start_pair`.
            }
        }
        if self.config.pairs {
            self.start_pair();
        }
        Ok(())
    }

    /// Gives agent 0 a backup (one more agent, with no consumers of its own) and moves
    /// agent 0's consumers into an application that reads both agents' rings.
    fn start_pair(&mut self) {
        let (primary, backup) = (0, self.agents.len());
        let spec = AgentSpec {
            index: backup,
            consumers: Vec::new(),
            pair: Some(PairSpec {
                role: PairRole::Backup,
                peer: primary,
                stats: self.pair_stats.clone(),
            }),
            ..self.agents[primary].spec.clone()
        };
        let p = &mut self.agents[primary];
        let consumers = std::mem::take(&mut p.spec.consumers);
        p.spec.pair = Some(PairSpec {
            role: PairRole::Primary,
            peer: backup,
            stats: self.pair_stats.clone(),
        });
        let backup_rings = Rings::default();
        let app = PairApp::new(
            consumers,
            [p.rings.clone(), backup_rings.clone()],
            spec.sequences.clone(),
            p.spec.consume_every_us,
            p.spec.take_max.clone(),
            self.config.seed ^ 0x7061_6972_0000_0000,
            self.clock,
            self.obs.clone(),
            self.pair_stats.clone(),
        );
        self.agents.push(AgentSlot {
            spec,
            incarnation: 0,
            task: None,
            rings: backup_rings,
        });
        self.start_agent(primary);
        self.start_agent(backup);
        self.pair_app = Some(tokio::spawn(app.run()));
    }

    /// One schedule step: restarts after disk failures, invariant ticks.
    async fn step(&mut self) {
        tokio::time::sleep(Duration::from_millis(STEP_MS)).await;
        self.operator_finished().await;
        let now = self.now_us();
        for i in 0..self.servers.len() {
            let failed = self.servers[i]
                .running
                .as_ref()
                .is_some_and(|s| s.consensus_stopped() || self.servers[i].disk.is_dead());
            if failed {
                self.crash_server(i, "disk failed mid-write; Raft stopped");
                let delay = self.rng.random_range(50_000..500_000);
                self.servers[i].restart_at_us = Some(now + delay);
            }
            if self.servers[i].running.is_none()
                && self.servers[i].restart_at_us.is_some_and(|t| now >= t)
            {
                self.restart_server(i).await;
            }
        }
        self.obs.tick(self.now_us());
    }

    async fn chaos_action(&mut self) {
        let n = self.servers.len();
        match self.rng.random_range(0..10) {
            0 | 1 => {
                let i = self.rng.random_range(0..n);
                if self.servers[i].running.is_some() {
                    self.crash_server(i, "scheduled");
                } else if self.servers[i].role != Role::Retired {
                    self.restart_server(i).await;
                }
            }
            2 => {
                if self.config.restart_all && self.rng.random_bool(1.0 / 3.0) {
                    self.restart_all_servers().await;
                } else if let Some(l) = self.leader() {
                    if self.rng.random_bool(0.5) {
                        self.crash_server(l, "scheduled, the leader");
                    } else {
                        self.stop_server_gracefully(l);
                    }
                }
            }
            3 => {
                let groups = self.rng.random_range(2..=3);
                let mut desc = Vec::new();
                for s in 0..n {
                    let g = self.rng.random_range(0..groups);
                    self.net.set_group(Endpoint::Server(s as NodeId + 1), g);
                    desc.push(format!("s{}:{g}", s + 1));
                }
                for a in 0..self.agents.len() {
                    let g = self.rng.random_range(0..groups);
                    self.net.set_group(Endpoint::Agent(a), g);
                    desc.push(format!("a{a}:{g}"));
                }
                self.fault(format!("partition {}", desc.join(" ")));
            }
            4 => {
                if let Some(l) = self.leader() {
                    self.net.heal();
                    self.net.set_group(Endpoint::Server(l as NodeId + 1), 1);
                    self.fault(format!("isolate leader {}", l + 1));
                }
            }
            5 => {
                self.net.heal();
                self.fault("heal".into());
            }
            6 => {
                let max_delay = self.rng.random_range(1_000..=50_000);
                let f = Faults {
                    drop: self.rng.random_range(0.0..0.3),
                    duplicate: self.rng.random_range(0.0..0.2),
                    corrupt: self.rng.random_range(0.0..0.1),
                    delay_us_min: 100,
                    delay_us_max: max_delay,
                };
                self.net.set_faults(f);
                self.fault(format!(
                    "network drop {:.2} duplicate {:.2} corrupt {:.2} delay 0.1..{} ms",
                    f.drop,
                    f.duplicate,
                    f.corrupt,
                    max_delay / 1000
                ));
            }
            7 => {
                let a = self.rng.random_range(0..self.agents.len());
                if self.agents[a].task.is_some() {
                    self.crash_agent(a);
                } else {
                    self.fault(format!("restart agent {a}"));
                    self.start_agent(a);
                }
            }
            _ => {
                let i = self.rng.random_range(0..n);
                if self.servers[i].running.is_some() {
                    let writes = self.rng.random_range(0..40);
                    self.servers[i].disk.fail_after_writes(writes);
                    let id = self.servers[i].id;
                    self.fault(format!("disk of server {id} fails after {writes} writes"));
                }
            }
        }
    }

    /// Crashes every running server at once; each comes back within 10 to 120 ms, before
    /// any election timeout (150 ms) fires, so that the old leader is restored in its term.
    /// Two times in three it first waits (up to 500 ms, in 1 ms steps) for the leader to
    /// have a ceiling raise in its log, not applied yet: the restored leader then finds an
    /// entry of its own term in its log that its ready read need not cover.
    async fn restart_all_servers(&mut self) {
        if self.rng.random_bool(2.0 / 3.0) {
            let end = self.now_us() + 500_000;
            while self.now_us() < end
                && !self
                    .servers
                    .iter()
                    .any(|s| s.running.as_ref().is_some_and(Server::raise_in_log))
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let now = self.now_us();
        self.restart_alls += 1;
        self.fault("restart all servers".into());
        for i in 0..self.servers.len() {
            if self.servers[i].running.is_some() {
                self.crash_server(i, "restart-all");
                let delay = self.rng.random_range(10_000..120_000);
                self.servers[i].restart_at_us = Some(now + delay);
            }
        }
    }

    async fn calm(&mut self) {
        self.net.heal();
        self.net.set_faults(Faults::CALM);
        if self.config.membership_changes {
            self.settle_membership().await;
        }
        // Half the calm periods leave a minority of the voters out (down, or cut off from
        // everyone else): a majority connected must still make progress.
        let members = self.voters();
        let n = members.len();
        let mut out = if self.rng.random_bool(0.5) {
            self.rng.random_range(0..=(n - 1) / 2)
        } else {
            0
        };
        if self.config.membership_changes && !self.membership_settled {
            // A change still in its joint phase needs a majority of both voter sets, which
            // leaving out a minority of their union can break: nobody is left out.
            out = 0;
        }
        let mut order = members;
        order.shuffle(&mut self.rng);
        let mut left_out = Vec::new();
        for (k, &i) in order.iter().enumerate() {
            let id = self.servers[i].id;
            if k < out && self.rng.random_bool(0.5) {
                if self.servers[i].running.is_some() {
                    self.crash_server(i, "left out of the calm majority");
                }
                self.servers[i].restart_at_us = None;
                left_out.push(format!("{id} down"));
                continue;
            }
            if self.servers[i].running.is_none() {
                self.restart_server(i).await;
            }
            if k < out {
                self.net.set_group(Endpoint::Server(id), 1);
                left_out.push(format!("{id} cut off"));
            }
        }
        for i in 0..self.servers.len() {
            if self.servers[i].role == Role::Joining && self.servers[i].running.is_none() {
                self.restart_server(i).await;
            }
        }
        for a in 0..self.agents.len() {
            if self.agents[a].task.is_none() {
                self.start_agent(a);
            }
        }
        self.fault(format!(
            "calm: network healed, agents up, servers up except [{}]",
            left_out.join(", ")
        ));
        self.obs.calm(self.now_us(), true);
        let end = self.now_us() + self.config.calm_ms * 1000;
        while self.now_us() < end && !self.obs.failed() {
            self.step().await;
        }
        self.obs.calm(self.now_us(), false);
    }

    /// Before a calm period of a run with membership changes: every server that is not
    /// retired is brought up, the operator's command ends (the network is healed), and the
    /// voters are read back from the leader's Raft, since an answer lost to the chaos leaves
    /// the schedule's roles behind the cluster's. Bounded: 15 s of simulated time.
    async fn settle_membership(&mut self) {
        for i in 0..self.servers.len() {
            if self.servers[i].role != Role::Retired && self.servers[i].running.is_none() {
                self.restart_server(i).await;
            }
        }
        let end = self.now_us() + 15_000_000;
        let settled = |w: &World| {
            let sets = w
                .leader()
                .and_then(|l| w.servers[l].running.as_ref())
                .map(Server::voter_sets)?;
            (w.operator.is_none() && sets.len() == 1).then_some(sets)
        };
        while settled(self).is_none() && self.now_us() < end && !self.obs.failed() {
            self.step().await;
        }
        self.membership_settled = false;
        if let Some(sets) = settled(self) {
            let voters: Vec<NodeId> = sets.iter().flatten().copied().collect();
            self.reconcile(&voters);
            self.membership_settled = true;
        }
    }

    async fn simulate(&mut self) -> Result<(), SimError> {
        self.setup().await?;
        for _ in 0..self.config.rounds {
            let (lo, hi) = self.config.chaos_ms;
            let end = self.now_us() + self.rng.random_range(lo..=hi) * 1000;
            let mut next_action = self.now_us();
            let mut change_at = self.config.membership_changes.then(|| {
                let now = self.now_us();
                now + self.membership_rng.random_range(0..=end - now)
            });
            while self.now_us() < end && !self.obs.failed() {
                if change_at.is_some_and(|t| self.now_us() >= t) {
                    change_at = None;
                    self.membership_change().await;
                }
                if self.now_us() >= next_action {
                    self.chaos_action().await;
                    next_action = self.now_us() + self.rng.random_range(20_000..400_000);
                }
                self.step().await;
            }
            if self.obs.failed() {
                break;
            }
            self.calm().await;
            if self.obs.failed() {
                break;
            }
        }
        Ok(())
    }

    fn shutdown(&mut self) {
        if let Some((_, task)) = self.operator.take() {
            task.abort();
        }
        if let Some(task) = self.pair_app.take() {
            task.abort();
        }
        for a in 0..self.agents.len() {
            if let Some(t) = self.agents[a].task.take() {
                t.abort();
            }
        }
        for i in 0..self.servers.len() {
            if let Some(s) = self.servers[i].running.take() {
                let node = s.crash();
                let raft = node.raft().clone();
                drop(node);
                tokio::spawn(async move {
                    let _ = raft.shutdown().await;
                });
            }
        }
    }

    fn report(&self) -> Report {
        Report {
            config: self.config.clone(),
            violations: self.obs.violations(),
            seen: self.obs.seen(),
            net: self.net.stats(),
            crashes: self.crashes,
            lost_writes: self.lost_writes,
            sim_ms: self.now_us() / 1000,
            membership_done: self.membership_done,
            membership_failed: self.membership_failed,
            pair: *self.pair_stats.lock().unwrap_or_else(|p| p.into_inner()),
            restart_alls: self.restart_alls,
            rewarms: self
                .server_stats
                .iter()
                .map(|s| s.rewarms.load(std::sync::atomic::Ordering::Relaxed))
                .sum(),
        }
    }
}
