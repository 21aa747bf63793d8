//! One simulated agent and its consumers: the product's agent state machine
//! ([`unid_agent::machine::Machine`], the code `unid agent` runs: registration, leader
//! tracking, the epoch rule, retransmission, block sizing and every check on a grant) over
//! the simulated network, with consumers taking ids from a simulated ring (the blocks the
//! machine told it to write, in order) in place of the shared-memory one.
//!
//! A consumer outlives its agent: when the agent crashes (losing the ids it held) and
//! restarts, the same consumers take ids from the new incarnation, so the `increasing`
//! invariant covers agent restarts.
//!
//! An agent may be one side of a primary/backup pair ([`PairSpec`]): its machine then
//! exchanges real heartbeats (`unid_agent::pair::Beat`, keyed) with its peer over the
//! simulated network on [`pair_addr`], learns of a crashed peer from the refused send
//! (the fast signal) or from silence (the slow one, e.g. a partition), and takes over.
//! A pair's consumers are not the agent's: they are an application of their own
//! ([`crate::app::PairApp`]) that reads both agents' rings, as the client library does.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use unid_agent::machine::{
    Machine, MachineConfig, Output, PairSetup, RequesterConfig, SizingConfig,
};
use unid_agent::{PairConfig, PairRole, PeerLoss};
use unid_proto::{Id, NodeId, SequenceName};

use crate::app::PairStats;
use crate::clock::Clock;
use crate::invariants::Observer;
use crate::net::{
    Datagram, Endpoint, Net, PAIR_PORT, agent_addr, endpoint_of, key, pair_addr, server_addr,
};

/// How many blocks an agent keeps ahead of its consumers (the agent's `blocks_ahead`).
pub const BLOCKS_AHEAD: u32 = 2;

/// One consumer: a stable id and the sequence (ring index) it takes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Consumer {
    /// Unique across the run.
    pub id: usize,
    /// Index into the agent's sequences.
    pub sequence: usize,
}

/// How an agent behaves.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    /// Its index (its address is [`agent_addr`]).
    pub index: usize,
    /// The sequences it serves.
    pub sequences: Vec<String>,
    /// Its consumers.
    pub consumers: Vec<Consumer>,
    /// Consumers take ids this often, in microseconds.
    pub consume_every_us: u64,
    /// Most ids one consumer takes at a time, per sequence.
    pub take_max: Vec<u64>,
    /// The servers.
    pub servers: Vec<NodeId>,
    /// The pair it is a side of, if any.
    pub pair: Option<PairSpec>,
}

/// One side of a primary/backup pair of agents.
#[derive(Clone, Debug)]
pub struct PairSpec {
    /// This side's role.
    pub role: PairRole,
    /// The other side's agent index.
    pub peer: usize,
    /// Where its takeovers are counted (shared with the pair's application).
    pub stats: Arc<Mutex<PairStats>>,
}

/// The pair's heartbeat interval in the simulation, ms (the agent's default).
pub const PAIR_HEARTBEAT_MS: u64 = 10;
/// The pair's dead time in the simulation, ms (the agent's default).
pub const PAIR_DEAD_MS: u64 = 100;

/// The wall clock a paired agent reports at simulated time 0, µs (its `active_since`).
const WALL_CLOCK_BASE_US: u64 = 1_700_000_000_000_000;

/// A simulated ring: the blocks written, in order, and how many ids were taken.
#[derive(Debug, Default)]
pub struct Ring {
    /// Blocks `(first, count)` not yet taken, oldest first.
    pub blocks: VecDeque<(Id, u64)>,
    /// Ids taken from it in all (what the agent measures its rate from).
    pub taken: u128,
}

impl Ring {
    /// Takes up to `max` ids from the oldest block, as one `take_range` of the real ring:
    /// `(first, count)`, or `None` while it is empty.
    pub fn take(&mut self, max: u64) -> Option<(Id, u64)> {
        let front = self.blocks.front_mut()?;
        let (first, n) = (front.0, max.min(front.1));
        front.0 += Id::from(n);
        front.1 -= n;
        if front.1 == 0 {
            self.blocks.pop_front();
        }
        self.taken += u128::from(n);
        Some((first, n))
    }
}

/// An agent's rings, one per sequence, shared with the applications that read them (a
/// pair's consumers read both agents'). They outlive a crash, as the shared-memory files
/// do (consumers may drain what a dead agent left); a new incarnation starts them empty
/// (its new ring files replace the old ones, whose ids are lost, never repeated).
#[derive(Clone, Debug, Default)]
pub struct Rings(Arc<Mutex<Vec<Ring>>>);

impl Rings {
    /// Locks the rings.
    pub fn lock(&self) -> MutexGuard<'_, Vec<Ring>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running agent incarnation.
pub struct Agent {
    spec: AgentSpec,
    incarnation: u64,
    machine: Machine,
    rings: Rings,
    /// The machine's takeovers already counted in the pair's stats.
    takeovers: u64,
    next_consume_us: u64,
    rng: SmallRng,
    net: Net,
    clock: Clock,
    obs: Observer,
}

impl Agent {
    /// A new incarnation of the agent `spec`, seeded by `seed`, writing to `rings`
    /// (emptied: a new incarnation's ring files are new).
    pub fn new(
        spec: AgentSpec,
        incarnation: u64,
        seed: u64,
        net: Net,
        clock: Clock,
        obs: Observer,
        rings: Rings,
    ) -> Result<Agent, crate::SimError> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let now = clock.now_us();
        let mut servers: Vec<SocketAddr> = spec.servers.iter().map(|&s| server_addr(s)).collect();
        servers.shuffle(&mut rng);
        let sequences = spec
            .sequences
            .iter()
            .map(|n| SequenceName::new(n))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| crate::SimError::Config(format!("sequence name: {e}")))?;
        let config = MachineConfig {
            servers,
            sequences,
            name: format!("sim-agent-{}", spec.index),
            // Seqs never repeat across incarnations (see the requester's docs).
            incarnation: (incarnation << 32) + 1,
            key: Some(key()),
            cluster: None,
            sizing: SizingConfig::DEFAULT,
            blocks_ahead: BLOCKS_AHEAD,
            requester: RequesterConfig::DEFAULT,
            pair: spec.pair.as_ref().map(|p| {
                let listen = pair_addr(spec.index);
                // A backup is given its primary; a primary learns its backup from the beats.
                let peer = (p.role == PairRole::Backup).then(|| pair_addr(p.peer));
                let mut config = PairConfig::new(p.role, listen, peer);
                config.heartbeat_ms = PAIR_HEARTBEAT_MS;
                config.dead_ms = PAIR_DEAD_MS;
                PairSetup {
                    config,
                    listen,
                    ring_dir: PathBuf::from(format!("/dev/shm/unid-sim-agent-{}", spec.index)),
                }
            }),
        };
        let machine = Machine::new(config, now, rng.random())
            .map_err(|e| crate::SimError::Config(format!("agent {}: {e}", spec.index)))?;
        *rings.lock() = spec.sequences.iter().map(|_| Ring::default()).collect();
        Ok(Agent {
            next_consume_us: now + spec.consume_every_us,
            rings,
            takeovers: 0,
            spec,
            incarnation,
            machine,
            rng,
            net,
            clock,
            obs,
        })
    }

    /// Runs until aborted.
    pub async fn run(mut self) {
        let (tx, mut inbox) = mpsc::unbounded_channel();
        self.net.agent_up(self.spec.index, self.incarnation, tx);
        let now = self.clock.now_us();
        self.set_wall_clock(now);
        self.machine.handle_timeout(now);
        loop {
            let now = self.clock.now_us();
            self.drive(now);
            let wake = self
                .machine
                .poll_timeout()
                .map_or(self.next_consume_us, |t| t.min(self.next_consume_us));
            let sleep = tokio::time::sleep_until(self.clock.at(wake.max(now)));
            tokio::select! {
                biased;
                d = inbox.recv() => match d {
                    Some(d) => {
                        let now = self.clock.now_us();
                        if d.to.port() == PAIR_PORT {
                            // Judged at the next pairing tick (every heartbeat interval).
                            self.machine.handle_pair_datagram(now, d.from, &d.bytes);
                        } else {
                            self.machine.handle_datagram(now, d.from, &d.bytes);
                        }
                    }
                    None => return,
                },
                _ = sleep => {
                    let now = self.clock.now_us();
                    if now >= self.next_consume_us {
                        self.consume(now);
                        self.next_consume_us = now + self.spec.consume_every_us;
                    }
                    self.set_wall_clock(now);
                    self.machine.handle_timeout(now);
                }
            }
        }
    }

    /// A paired agent reports the wall clock (its `active_since` in heartbeats), as the
    /// real driver does each tick; an unpaired one needs none (its incarnation is given).
    fn set_wall_clock(&mut self, now: u64) {
        if self.spec.pair.is_some() {
            self.machine.set_wall_clock_us(WALL_CLOCK_BASE_US + now);
        }
    }

    /// Performs what the machine asks: ring writes, then datagrams, then heartbeats.
    fn drive(&mut self, now: u64) {
        loop {
            let mut busy = false;
            while let Some(o) = self.machine.poll_output() {
                busy = true;
                match o {
                    Output::OpenRing { index, .. } => {
                        self.machine.handle_ring_opened(now, index, Ok(()));
                    }
                    Output::Write {
                        index,
                        first,
                        count,
                    } => self.rings.lock()[index].blocks.push_back((first, count)),
                    Output::PairFile { .. } => {}
                }
            }
            while let Some(t) = self.machine.poll_transmit(now) {
                busy = true;
                self.net.send(
                    Endpoint::Agent(self.spec.index),
                    self.incarnation,
                    Datagram {
                        from: agent_addr(self.spec.index),
                        to: t.to,
                        bytes: t.bytes,
                    },
                );
            }
            while let Some(t) = self.machine.poll_pair_transmit() {
                busy = true;
                let me = Endpoint::Agent(self.spec.index);
                // A real connected socket learns of a dead peer from the ICMP answer to
                // this send (the fast signal); behind a partition it learns nothing.
                let refused = endpoint_of(t.to).is_some_and(|to| self.net.refused(me, to));
                self.net.send(
                    me,
                    self.incarnation,
                    Datagram {
                        from: pair_addr(self.spec.index),
                        to: t.to,
                        bytes: t.bytes,
                    },
                );
                self.machine.handle_pair_sent(Ok(()));
                if refused {
                    self.machine.handle_pair_error(PeerLoss::Refused);
                }
            }
            if !busy {
                self.count_takeovers();
                return;
            }
        }
    }

    /// Adds the machine's new takeovers to the pair's stats.
    fn count_takeovers(&mut self) {
        let Some(p) = &self.spec.pair else {
            return;
        };
        let now = self.machine.counters().takeovers;
        if now > self.takeovers {
            let mut stats = p.stats.lock().unwrap_or_else(|e| e.into_inner());
            stats.takeovers += now - self.takeovers;
            if p.role == PairRole::Backup {
                stats.backup_takeovers += now - self.takeovers;
            }
            drop(stats);
            self.takeovers = now;
        }
    }

    /// Every consumer takes a few ids from its ring, as `Client::next_n` would; the machine
    /// is told how many were taken (it measures the rate and refills from that).
    fn consume(&mut self, now: u64) {
        for c in self.spec.consumers.clone() {
            let want = self
                .rng
                .random_range(1..=self.spec.take_max[c.sequence].max(1));
            let Some((first, k)) = self.rings.lock()[c.sequence].take(want) else {
                continue;
            };
            let name = self.spec.sequences[c.sequence].clone();
            self.obs.consumed(now, c.id, &name, first, k);
        }
        // Also what a pair's application took from these rings.
        let taken: Vec<u128> = self.rings.lock().iter().map(|r| r.taken).collect();
        for (i, t) in taken.into_iter().enumerate() {
            self.machine.handle_ring_taken(now, i, t);
        }
    }
}
