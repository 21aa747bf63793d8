//! One simulated agent and its consumers: the real `unid_core::Requester`
//! (retransmission, backoff, redirects, epochs) and `unid_core::Sizer`,
//! with the block bookkeeping of `agent/src/driver.rs` (`on_grant`'s
//! checks, `next_min`, blocks held in order) and consumers taking ids from
//! the held blocks in place of the shared-memory ring.
//!
//! A consumer outlives its agent: when the agent crashes (losing the ids it
//! held) and restarts, the same consumers take ids from the new
//! incarnation, so the `increasing` invariant covers agent restarts.

use std::collections::VecDeque;
use std::net::SocketAddr;

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use unid_core::{
    Disposition, Event, Reply, Requester, RequesterConfig, Response, Sizer, SizingConfig,
};
use unid_proto::{Id, NodeId, SeqNo, Width};

use crate::clock::Clock;
use crate::invariants::Observer;
use crate::net::{Code, Datagram, Endpoint, Msg, Net, agent_addr, server_addr};

/// How many blocks an agent keeps ahead of its consumers (the agent's
/// `blocks_ahead`).
pub const BLOCKS_AHEAD: u64 = 2;
/// Wait after an error answer before asking again, in microseconds.
const RETRY_US: u64 = 100_000;

#[derive(Clone, Debug)]
enum Req {
    Hello,
    Block { index: usize, count: u64 },
}

#[derive(Clone, Debug)]
enum Answer {
    Welcome {
        node_id: NodeId,
    },
    Grant {
        sequence: String,
        width: Width,
        first: Id,
        count: u64,
    },
    Error {
        code: Code,
    },
}

struct Slot {
    name: String,
    width: Option<Width>,
    sizer: Sizer,
    next_min: Id,
    held: VecDeque<(Id, u64)>,
    inflight: Option<SeqNo>,
    asked: u64,
    retry_at_us: u64,
    exhausted: bool,
}

/// One consumer: a stable id and the sequence (slot index) it takes from.
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
    /// Also apply `agent/src/driver.rs`'s own epoch filter: drop any
    /// datagram below the highest epoch seen in a leader's reply (see
    /// `SimConfig::driver_epoch_filter`).
    pub driver_epoch_filter: bool,
}

/// A running agent incarnation.
pub struct Agent {
    spec: AgentSpec,
    incarnation: u64,
    node_id: NodeId,
    requester: Requester<Req, Answer>,
    hello: Option<SeqNo>,
    slots: Vec<Slot>,
    next_consume_us: u64,
    /// The driver's `link.highest_epoch` (only with `driver_epoch_filter`).
    link_epoch: u64,
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
        // Seqs never repeat across incarnations (see the requester's docs).
        let first_seq = (incarnation << 32) + 1;
        let requester = Requester::new(RequesterConfig::DEFAULT, &servers, first_seq, now)?;
        let slots = spec
            .sequences
            .iter()
            .map(|name| {
                Ok(Slot {
                    name: name.clone(),
                    width: None,
                    sizer: Sizer::new(SizingConfig::DEFAULT, now)?,
                    next_min: 0,
                    held: VecDeque::new(),
                    inflight: None,
                    asked: 0,
                    retry_at_us: 0,
                    exhausted: false,
                })
            })
            .collect::<Result<Vec<_>, unid_core::Error>>()?;
        Ok(Agent {
            next_consume_us: now + spec.consume_every_us,
            link_epoch: 0,
            spec,
            incarnation,
            node_id: 0,
            requester,
            hello: None,
            slots,
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
        loop {
            let now = self.clock.now_us();
            self.step(now);
            let wake = self
                .requester
                .poll_timeout()
                .map_or(self.next_consume_us, |t| t.min(self.next_consume_us));
            let sleep = tokio::time::sleep_until(self.clock.at(wake.max(now)));
            tokio::select! {
                biased;
                d = inbox.recv() => match d {
                    Some(d) => self.on_datagram(self.clock.now_us(), d),
                    None => return,
                },
                _ = sleep => {
                    let now = self.clock.now_us();
                    if self.requester.poll_timeout().is_some_and(|t| t <= now) {
                        self.requester.handle_timeout(now, &mut self.rng);
                    }
                    if now >= self.next_consume_us {
                        self.consume(now);
                        self.next_consume_us = now + self.spec.consume_every_us;
                    }
                }
            }
        }
    }

    fn step(&mut self, now: u64) {
        while let Some(ev) = self.requester.poll_event() {
            self.on_event(now, ev);
        }
        if self.node_id == 0 {
            if self.hello.is_none() {
                self.hello = self.requester.send(now, Req::Hello).ok();
            }
        } else {
            for index in 0..self.slots.len() {
                let s = &mut self.slots[index];
                if s.inflight.is_some() || s.exhausted || now < s.retry_at_us {
                    continue;
                }
                let width = s.width.unwrap_or(Width::W8);
                let block = match s.sizer.block_ids(now, width, s.next_min) {
                    Ok(b) => b,
                    Err(_) => {
                        s.exhausted = true;
                        continue;
                    }
                };
                let have: u64 = s.held.iter().map(|b| b.1).sum();
                if have >= block.saturating_mul(BLOCKS_AHEAD) {
                    continue;
                }
                if let Ok(seq) = self.requester.send(
                    now,
                    Req::Block {
                        index,
                        count: block,
                    },
                ) {
                    let s = &mut self.slots[index];
                    s.inflight = Some(seq);
                    s.asked = block;
                }
            }
        }
        while let Some(t) = self.requester.poll_transmit(now) {
            let msg = match &t.request {
                Req::Hello => Msg::Hello {
                    incarnation: self.incarnation,
                },
                Req::Block { index, count } => Msg::BlockRequest {
                    sequence: self.slots[*index].name.clone(),
                    count: *count,
                },
            };
            let sender = match t.request {
                Req::Hello => 0,
                Req::Block { .. } => self.node_id,
            };
            self.net.send(
                Endpoint::Agent(self.spec.index),
                self.incarnation,
                Datagram {
                    from: agent_addr(self.spec.index),
                    to: t.destination,
                    sender,
                    seq: t.seq,
                    reply_to: 0,
                    epoch: self.requester.highest_epoch(),
                    msg,
                },
            );
        }
    }

    fn on_datagram(&mut self, now: u64, d: Datagram) {
        if self.spec.driver_epoch_filter {
            // As `Driver::on_datagram`: drop below the highest epoch seen;
            // only a leader's answer raises it (not a redirect: the driver
            // had raised it on every reply until db0203e).
            if d.epoch < self.link_epoch {
                return;
            }
        }
        // As the driver: only a leader's answer that the requester took (not a redirect, not
        // a datagram answering nothing) raises the driver's epoch.
        let from_leader = !matches!(d.msg, Msg::NotLeader { .. });
        let epoch = d.epoch;
        let reply = match d.msg {
            Msg::Welcome { node_id } => Reply::Done(Answer::Welcome { node_id }),
            Msg::BlockGrant {
                sequence,
                width,
                first,
                count,
            } => Reply::Done(Answer::Grant {
                sequence,
                width,
                first,
                count,
            }),
            Msg::Error {
                code: Code::NotReady,
            } => Reply::TryLater,
            Msg::Error { code } => Reply::Done(Answer::Error { code }),
            Msg::NotLeader { leader } => Reply::Redirect { leader },
            Msg::Hello { .. } | Msg::BlockRequest { .. } => return,
        };
        let response = Response {
            reply_to: d.reply_to,
            epoch: d.epoch,
            reply,
        };
        let disposition = self.requester.handle_response(now, d.from, response);
        if self.spec.driver_epoch_filter
            && from_leader
            && matches!(disposition, Disposition::Accepted | Disposition::TryLater)
        {
            self.link_epoch = self.link_epoch.max(epoch);
        }
        self.step(now);
    }

    fn slot_of(&self, seq: SeqNo) -> Option<usize> {
        self.slots.iter().position(|s| s.inflight == Some(seq))
    }

    fn on_event(&mut self, now: u64, ev: Event<Answer>) {
        match ev {
            Event::Completed { seq, payload, .. } => match payload {
                Answer::Welcome { node_id } => {
                    if self.hello == Some(seq) {
                        self.hello = None;
                        self.node_id = node_id;
                    }
                }
                Answer::Grant {
                    sequence,
                    width,
                    first,
                    count,
                } => {
                    if let Some(i) = self.slot_of(seq) {
                        self.on_grant(i, &sequence, width, first, count);
                    }
                }
                Answer::Error { code } => {
                    let Some(i) = self.slot_of(seq) else {
                        return;
                    };
                    let s = &mut self.slots[i];
                    s.inflight = None;
                    match code {
                        Code::NotRegistered => {
                            // Register again (the agent's `NotRegistered` handling).
                            self.node_id = 0;
                            self.hello = None;
                        }
                        Code::Exhausted => s.exhausted = true,
                        _ => s.retry_at_us = now + RETRY_US,
                    }
                }
            },
            Event::Failed { seq, .. } => {
                if self.hello == Some(seq) {
                    self.hello = None;
                } else if let Some(i) = self.slot_of(seq) {
                    self.slots[i].inflight = None;
                }
            }
        }
    }

    /// Mirrors the agent's `on_grant`: a grant for another sequence or
    /// width, below the previous block, or larger than asked is dropped.
    fn on_grant(&mut self, index: usize, sequence: &str, width: Width, first: Id, count: u64) {
        let s = &mut self.slots[index];
        s.inflight = None;
        let reject = sequence != s.name
            || s.width.is_some_and(|w| w != width)
            || first < s.next_min
            || count > s.asked
            || count == 0;
        if reject {
            return;
        }
        s.next_min = first + Id::from(count);
        s.width = Some(width);
        s.held.push_back((first, count));
    }

    fn consume(&mut self, now: u64) {
        for c in self.spec.consumers.clone() {
            let want = self
                .rng
                .random_range(1..=self.spec.take_max[c.sequence].max(1));
            let s = &mut self.slots[c.sequence];
            let Some(front) = s.held.front_mut() else {
                continue;
            };
            let (first, k) = (front.0, want.min(front.1));
            front.0 += Id::from(k);
            front.1 -= k;
            if front.1 == 0 {
                s.held.pop_front();
            }
            s.sizer.record_consumed(now, k);
            let name = s.name.clone();
            self.obs.consumed(now, c.id, &name, first, k);
        }
    }
}
