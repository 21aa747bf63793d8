//! One simulated server: the product's server, run unchanged. The real [`ConsensusNode`]
//! (openraft + the redb store on a [`SimDisk`](crate::disk::SimDisk)), the real server state
//! machine ([`unid_machine::Server`]) and the engine's own consensus driver
//! ([`unid_engine::driver::Driver`]); only the I/O under them is simulated: datagrams come
//! from and go to the simulated network as real encoded bytes (CRC32 and the cluster MAC
//! included), and time is the simulated clock.
//!
//! The engine's UDP shards are replaced by one task that hands every datagram to the machine
//! and sends its answer back, as a shard does.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use unid_consensus::ConsensusNode;
use unid_core::AllocatorConfig;
use unid_engine::driver::{Driver, Outbox, StopMode, lock};
use unid_machine::server::{Config, Probe, Transmit};
use unid_proto::{Id, NodeId};

use crate::clock::Clock;
use crate::invariants::Observer;
use crate::net::{Datagram, Endpoint, Net, endpoint_of, key, server_addr};

/// An agent not heard from for this long is forgotten.
pub const LEASE_MS: u32 = 10_000;
/// Most agents one server holds.
pub const AGENTS_MAX: usize = 1024;

/// The machine's decisions, reported to the invariant checker.
struct Observe(Observer);

impl Probe for Observe {
    fn leader(&self, now_us: u64, server: NodeId, term: u64) {
        self.0.leader(now_us, server, term);
    }
    fn ready(&self, now_us: u64, server: NodeId, term: u64, ceilings: &[(String, Id)]) {
        self.0.ready(now_us, server, term, ceilings);
    }
    fn committed(&self, now_us: u64, server: NodeId, term: u64, sequence: &str, ceiling: Id) {
        self.0.committed(now_us, server, term, sequence, ceiling);
    }
    fn granted(
        &self,
        now_us: u64,
        server: NodeId,
        term: u64,
        sequence: &str,
        first: Id,
        count: u64,
    ) {
        self.0.granted(now_us, server, term, sequence, first, count);
    }
}

/// The driver's way to the simulated network.
struct SimOutbox {
    net: Net,
    id: NodeId,
    incarnation: u64,
}

impl Outbox for SimOutbox {
    async fn send(&self, t: Transmit) {
        send(&self.net, (self.id, self.incarnation), t);
    }

    /// As the engine's TCP check, on the simulated network: the new server is up and on this
    /// server's side (no wait: the operator retries).
    async fn raft_reachable(&self, raft: std::net::SocketAddr) -> bool {
        endpoint_of(raft).is_some_and(|to| self.net.reachable(Endpoint::Server(self.id), to))
    }
}

/// Sends a datagram of server `id` (incarnation `inc`) into the simulated network.
fn send(net: &Net, (id, inc): (NodeId, u64), t: Transmit) {
    let d = Datagram {
        from: server_addr(id),
        to: t.to,
        bytes: t.datagram,
    };
    net.send(Endpoint::Server(id), inc, d);
}

/// A running server incarnation: the driver's task and the datagram task; aborting them
/// stops it.
#[derive(Debug)]
pub struct Server {
    consensus: Arc<ConsensusNode>,
    machine: Arc<Mutex<unid_machine::Server>>,
    net: Net,
    id: NodeId,
    incarnation: u64,
    tasks: JoinSet<()>,
    /// Held so that the driver's stop watch stays open (a crash aborts the tasks instead).
    _stop: watch::Sender<StopMode>,
}

impl Server {
    /// Starts the server of `consensus` (incarnation `incarnation`, of the cluster of
    /// `servers`): its driver and its datagram task.
    pub fn start(
        consensus: Arc<ConsensusNode>,
        incarnation: u64,
        servers: &[NodeId],
        net: Net,
        clock: Clock,
        obs: Observer,
        write_timeout: Duration,
    ) -> Result<Server, crate::SimError> {
        let id = consensus.id();
        let now = clock.now_us();
        let mut machine = unid_machine::Server::new(
            Config {
                id,
                key: Some(key()),
                lease_ms: LEASE_MS,
                agents_max: AGENTS_MAX,
                replies_per_agent_max: 64,
                source_rate_per_s: 1_000_000,
                allocator: AllocatorConfig::DEFAULT,
                udp_addr: server_addr(id),
                peers: servers
                    .iter()
                    .filter(|&&s| s != id)
                    .map(|&s| (s, server_addr(s)))
                    .collect(),
                // Seqs of a restarted server stay above its earlier ones (the engine uses the
                // wall clock).
                first_seq: (incarnation << 40) + 1,
            },
            now,
        )?;
        machine.set_probe(Arc::new(Observe(obs)));
        let machine = Arc::new(Mutex::new(machine));
        let wake = Arc::new(Notify::new());
        let (inbox_tx, inbox_rx) = mpsc::unbounded_channel();
        net.server_up(id, incarnation, consensus.raft().clone(), inbox_tx);
        let sim_clock = clock;
        // A cluster id drawn from the run (deterministic), never 0.
        let cluster_id = 0x51_4d00_0000_0000 | (id << 8) | (incarnation & 0xff);
        let driver = Driver::new(
            machine.clone(),
            consensus.clone(),
            SimOutbox {
                net: net.clone(),
                id,
                incarnation,
            },
            Arc::new(move || sim_clock.now_us()),
            wake.clone(),
            write_timeout,
            Arc::new(move || cluster_id),
        );
        let (stop_tx, stop_rx) = watch::channel(StopMode::Run);
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            driver.run(stop_rx).await;
        });
        tasks.spawn(datagrams(
            machine.clone(),
            consensus.clone(),
            wake,
            inbox_rx,
            net.clone(),
            clock,
            (id, incarnation),
        ));
        Ok(Server {
            consensus,
            machine,
            net,
            id,
            incarnation,
            tasks,
            _stop: stop_tx,
        })
    }

    /// Whether Raft stopped (a storage error: the disk failed).
    pub fn consensus_stopped(&self) -> bool {
        !self.consensus.is_running()
    }

    /// The consensus node.
    pub fn consensus(&self) -> &Arc<ConsensusNode> {
        &self.consensus
    }

    /// The voter sets of the membership this server knows: one, or two while a change is in
    /// its joint phase (a majority of each is needed then).
    pub fn voter_sets(&self) -> Vec<std::collections::BTreeSet<NodeId>> {
        let m = self.consensus.raft().metrics();
        let m = m.borrow();
        m.membership_config.membership().get_joint_config().clone()
    }

    /// The machine's counters (they outlive a crash of this incarnation).
    pub fn stats(&self) -> Arc<unid_machine::server::ServerStats> {
        lock(&self.machine).stats().clone()
    }

    /// Whether this server leads with a ceiling raise outstanding whose entry is in its log
    /// and not applied yet (so a crash now leaves an entry of its term unapplied).
    pub fn raise_in_log(&self) -> bool {
        if !lock(&self.machine).raise_outstanding() {
            return false;
        }
        let m = self.consensus.raft().metrics();
        let m = m.borrow();
        m.last_log_index > m.last_applied.map(|l| l.index)
    }

    /// Whether this server leads with its allocator installed.
    pub fn is_leading(&self) -> bool {
        lock(&self.machine).is_granting()
    }

    /// Stops the server as `unid server` does on SIGTERM: as leader, it first tells every
    /// agent and server which server Raft would hand leadership to (`LeaderChange`, sent by
    /// the machine, as the engine's graceful stop does); then it goes down like a crash (the
    /// simulated Raft has no handoff RPC, so the others elect when their timers fire).
    /// Returns the successor named, if any.
    pub fn stop_gracefully(self) -> (Option<NodeId>, Arc<ConsensusNode>) {
        let successor = self.consensus.handoff_successor();
        let notices: Vec<Transmit> = {
            let mut m = lock(&self.machine);
            m.stop(true, successor);
            std::iter::from_fn(|| m.poll_transmit()).collect()
        };
        for t in notices {
            send(&self.net, (self.id, self.incarnation), t);
        }
        (successor, self.crash())
    }

    /// Crashes the server: its tasks stop at once and its endpoint goes down.
    /// The caller drops the consensus node (Raft stops) and the disk.
    pub fn crash(mut self) -> Arc<ConsensusNode> {
        self.net.down(Endpoint::Server(self.id));
        self.tasks.abort_all();
        self.consensus.clone()
    }
}

/// The datagram task: what a shard does. Every datagram goes to the machine at once (never
/// waiting on consensus); its answer goes back to the sender.
async fn datagrams(
    machine: Arc<Mutex<unid_machine::Server>>,
    consensus: Arc<ConsensusNode>,
    wake: Arc<Notify>,
    mut inbox: mpsc::UnboundedReceiver<Datagram>,
    net: Net,
    clock: Clock,
    (id, incarnation): (NodeId, u64),
) {
    while let Some(d) = inbox.recv().await {
        let now = clock.now_us();
        let reply = {
            let mut m = lock(&machine);
            let reply =
                consensus.with_state(|s| m.handle_datagram(now, d.from, &d.bytes, &s.state));
            if m.has_actions() {
                wake.notify_one();
            }
            reply
        };
        if let Some(datagram) = reply {
            let t = Transmit {
                to: d.from,
                datagram,
            };
            send(&net, (id, incarnation), t);
        }
    }
}
