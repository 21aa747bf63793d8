//! One simulated agent and its consumers: the product's agent state machine
//! ([`unid_agent::machine::Machine`], the code `unid agent` runs: registration, leader
//! tracking, the epoch rule, retransmission, block sizing and every check on a grant) over
//! the simulated network, with consumers taking ids from a simulated ring (the blocks the
//! machine told it to write, in order) in place of the shared-memory one.
//!
//! A consumer outlives its agent: when the agent crashes (losing the ids it held) and
//! restarts, the same consumers take ids from the new incarnation, so the `increasing`
//! invariant covers agent restarts.

use std::collections::VecDeque;
use std::net::SocketAddr;

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use unid_agent::machine::{Machine, MachineConfig, Output, RequesterConfig, SizingConfig};
use unid_proto::{Id, NodeId, SequenceName};

use crate::clock::Clock;
use crate::invariants::Observer;
use crate::net::{Datagram, Endpoint, Net, agent_addr, key, server_addr};

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
}

/// A simulated ring: the blocks written, in order, and how many ids were taken.
#[derive(Default)]
struct Ring {
    blocks: VecDeque<(Id, u64)>,
    taken: u128,
}

/// A running agent incarnation.
pub struct Agent {
    spec: AgentSpec,
    incarnation: u64,
    machine: Machine,
    rings: Vec<Ring>,
    next_consume_us: u64,
    rng: SmallRng,
    net: Net,
    clock: Clock,
    obs: Observer,
}

impl Agent {
    /// A new incarnation of the agent `spec`, seeded by `seed`.
    pub fn new(
        spec: AgentSpec,
        incarnation: u64,
        seed: u64,
        net: Net,
        clock: Clock,
        obs: Observer,
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
            pair: None,
        };
        let machine = Machine::new(config, now, rng.random())
            .map_err(|e| crate::SimError::Config(format!("agent {}: {e}", spec.index)))?;
        Ok(Agent {
            next_consume_us: now + spec.consume_every_us,
            rings: spec.sequences.iter().map(|_| Ring::default()).collect(),
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
                        self.machine.handle_datagram(now, d.from, &d.bytes);
                    }
                    None => return,
                },
                _ = sleep => {
                    let now = self.clock.now_us();
                    if now >= self.next_consume_us {
                        self.consume(now);
                        self.next_consume_us = now + self.spec.consume_every_us;
                    }
                    self.machine.handle_timeout(now);
                }
            }
        }
    }

    /// Performs what the machine asks: ring writes, then datagrams.
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
                    } => self.rings[index].blocks.push_back((first, count)),
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
            if !busy {
                return;
            }
        }
    }

    /// Every consumer takes a few ids from its ring, as `Client::next_n` would; the machine
    /// is told how many were taken (it measures the rate and refills from that).
    fn consume(&mut self, now: u64) {
        for c in self.spec.consumers.clone() {
            let want = self
                .rng
                .random_range(1..=self.spec.take_max[c.sequence].max(1));
            let ring = &mut self.rings[c.sequence];
            let Some(front) = ring.blocks.front_mut() else {
                continue;
            };
            let (first, k) = (front.0, want.min(front.1));
            front.0 += Id::from(k);
            front.1 -= k;
            if front.1 == 0 {
                ring.blocks.pop_front();
            }
            ring.taken += u128::from(k);
            let name = self.spec.sequences[c.sequence].clone();
            self.obs.consumed(now, c.id, &name, first, k);
        }
        for (i, ring) in self.rings.iter().enumerate() {
            self.machine.handle_ring_taken(now, i, ring.taken);
        }
    }
}
