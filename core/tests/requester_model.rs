//! Model test of the requester against a simulated cluster and a lossy
//! network: responses are lost, duplicated, delayed and reordered; servers
//! die, come back, lag behind on the current epoch and redirect to stale
//! leaders; partitioned old leaders keep answering with their old epoch.
//!
//! Checked: every request ends with exactly one outcome; a response is
//! accepted only for an outstanding seq and only if its epoch is at least the
//! highest epoch of a leader's answer (not a redirect) delivered before it;
//! duplicates are never accepted; a request is given up only after
//! `attempts_max` transmissions or its deadline; the same seeds give the same
//! trace.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use unid_core::{Disposition, Error, Event, Reply, Requester, RequesterConfig, Response};
use unid_proto::{Epoch, SeqNo};

const MS: u64 = 1000;
const SERVERS: usize = 3;

fn config() -> RequesterConfig {
    RequesterConfig {
        requests_max: 8,
        servers_max: 4,
        rto_initial_ms: 10,
        rto_max_ms: 80,
        jitter_percent: 30,
        attempts_max: 6,
        request_timeout_ms: 400,
        silent_timeouts_max: 2,
    }
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1 + i as u8], 7000))
}

#[derive(Clone, Debug)]
enum Act {
    Send,
    Step { ms: u64 },
    Elect { leader: usize },
    Catch { server: usize },
    Kill { server: usize, refuse: bool },
    Revive { server: usize },
    Ready { ready: bool },
    Stale { pick: usize, back: u64 },
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        6 => Just(Act::Send),
        6 => (1..60u64).prop_map(|ms| Act::Step { ms }),
        1 => (0..SERVERS).prop_map(|leader| Act::Elect { leader }),
        2 => (0..SERVERS).prop_map(|server| Act::Catch { server }),
        1 => (0..SERVERS, any::<bool>()).prop_map(|(server, refuse)| Act::Kill { server, refuse }),
        2 => (0..SERVERS).prop_map(|server| Act::Revive { server }),
        1 => any::<bool>().prop_map(|ready| Act::Ready { ready }),
        2 => (any::<usize>(), 0..3u64).prop_map(|(pick, back)| Act::Stale { pick, back }),
    ]
}

#[derive(Clone, Copy, Debug)]
struct Server {
    /// The epoch this server knows.
    epoch: Epoch,
    /// Who it believes leads.
    leader: Option<usize>,
    dead: bool,
    /// A dead server's host refuses datagrams (send error) or drops them.
    refuse: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    Failed,
}

#[derive(PartialEq, Eq, Debug)]
enum Trace {
    Transmit(SeqNo, SocketAddr, u32, u64),
    Outcome(SeqNo, Outcome, u64),
}

struct Sim {
    r: Requester<u64, u64>,
    rng: SmallRng,
    net: SmallRng,
    servers: [Server; SERVERS],
    epoch: Epoch,
    leader_ready: bool,
    now_us: u64,
    /// `(deliver_at_us, order, from, response)`
    flight: Vec<(u64, u64, usize, Response<u64>)>,
    order: u64,
    sent_at: BTreeMap<SeqNo, u64>,
    transmits: BTreeMap<SeqNo, u32>,
    outcomes: BTreeMap<SeqNo, Outcome>,
    max_delivered_epoch: Epoch,
    loss_percent: u32,
    dup_percent: u32,
    trace: Vec<Trace>,
    accepted: u64,
}

impl Sim {
    fn new(seed: u64, loss_percent: u32, dup_percent: u32) -> Sim {
        let servers: Vec<_> = (0..SERVERS).map(addr).collect();
        let server = Server {
            epoch: 1,
            leader: Some(0),
            dead: false,
            refuse: false,
        };
        Sim {
            r: Requester::new(config(), &servers, 1, 0).unwrap(),
            rng: SmallRng::seed_from_u64(seed),
            net: SmallRng::seed_from_u64(seed ^ 0x5eed),
            servers: [server; SERVERS],
            epoch: 1,
            leader_ready: true,
            now_us: 0,
            flight: Vec::new(),
            order: 0,
            sent_at: BTreeMap::new(),
            transmits: BTreeMap::new(),
            outcomes: BTreeMap::new(),
            max_delivered_epoch: 0,
            loss_percent,
            dup_percent,
            trace: Vec::new(),
            accepted: 0,
        }
    }

    fn respond(&mut self, s: usize, seq: SeqNo) {
        let server = self.servers[s];
        if server.dead {
            if server.refuse {
                self.r.handle_send_error(self.now_us, addr(s));
            }
            return;
        }
        let reply = match server.leader {
            // The current leader, or a partitioned old one that still thinks
            // it leads (it answers with its old epoch).
            Some(l) if l == s => {
                if server.epoch == self.epoch && !self.leader_ready {
                    Reply::TryLater
                } else {
                    Reply::Done(seq * 1_000_000 + self.net.random_range(0..1_000_000))
                }
            }
            other => Reply::Redirect {
                leader: other.map(addr),
            },
        };
        let response = Response {
            reply_to: seq,
            epoch: server.epoch,
            reply,
        };
        self.emit(s, response);
    }

    fn emit(&mut self, s: usize, response: Response<u64>) {
        if self.net.random_range(0..100) < self.loss_percent {
            return;
        }
        let copies = if self.net.random_range(0..100) < self.dup_percent {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self.net.random_range(0..30 * MS);
            self.order += 1;
            self.flight
                .push((self.now_us + delay, self.order, s, response.clone()));
        }
    }

    /// Sends what the requester wants sent, takes its events.
    fn pump(&mut self) {
        while let Some(t) = self.r.poll_transmit(self.now_us) {
            assert!(
                !self.outcomes.contains_key(&t.seq),
                "transmit of a finished seq"
            );
            assert!(
                self.sent_at.contains_key(&t.seq),
                "transmit of a seq never sent"
            );
            assert_eq!(t.request, t.seq * 7, "request body carried");
            let n = self.transmits.entry(t.seq).or_default();
            *n += 1;
            assert_eq!(t.attempt, *n);
            assert!(t.attempt <= config().attempts_max);
            let s = (0..SERVERS)
                .find(|&i| addr(i) == t.destination)
                .expect("a known server");
            self.trace.push(Trace::Transmit(
                t.seq,
                t.destination,
                t.attempt,
                self.now_us,
            ));
            self.respond(s, t.seq);
        }
        while let Some(e) = self.r.poll_event() {
            let (seq, outcome) = match e {
                Event::Completed { seq, payload, .. } => {
                    assert_eq!(payload / 1_000_000, seq, "payload of another seq");
                    (seq, Outcome::Done)
                }
                Event::Failed { seq, error } => {
                    match error {
                        Error::AttemptsExhausted { seq: s, attempts } => {
                            assert_eq!(s, seq);
                            assert_eq!(attempts, config().attempts_max);
                            assert_eq!(self.transmits.get(&seq), Some(&attempts));
                        }
                        Error::DeadlineExceeded { seq: s, waited_ms } => {
                            assert_eq!(s, seq);
                            assert!(self.now_us >= self.sent_at[&seq] + waited_ms * MS);
                        }
                        other => panic!("unexpected failure {other}"),
                    }
                    (seq, Outcome::Failed)
                }
            };
            assert!(
                self.outcomes.insert(seq, outcome).is_none(),
                "two outcomes for {seq}"
            );
            self.trace.push(Trace::Outcome(seq, outcome, self.now_us));
        }
    }

    fn deliver(&mut self, response: Response<u64>, s: usize) {
        let seq = response.reply_to;
        let epoch = response.epoch;
        let finished = self.outcomes.contains_key(&seq);
        let is_done = matches!(response.reply, Reply::Done(_));
        // Only a leader's answer raises the epoch (see the requester docs).
        let is_redirect = matches!(response.reply, Reply::Redirect { .. });
        let d = self.r.handle_response(self.now_us, addr(s), response);
        if d == Disposition::Accepted {
            assert!(is_done);
            assert!(!finished, "accepted a response for a finished seq");
            assert!(epoch >= self.max_delivered_epoch, "accepted a stale epoch");
            self.accepted += 1;
        }
        if finished {
            assert!(
                matches!(d, Disposition::UnknownSeq | Disposition::StaleEpoch),
                "{d:?}"
            );
        }
        if epoch < self.max_delivered_epoch {
            assert_eq!(d, Disposition::StaleEpoch);
        }
        // ... and only an answer to an outstanding request (not one to a finished or unknown
        // seq: issue 12, a forged `epoch = 2^64-1` must not make every real answer stale).
        if !is_redirect && matches!(d, Disposition::Accepted | Disposition::TryLater) {
            self.max_delivered_epoch = self.max_delivered_epoch.max(epoch);
        }
        self.pump();
    }

    /// Advances time to `until_us`, firing timers and delivering datagrams in
    /// time order.
    fn step_to(&mut self, until_us: u64) {
        loop {
            let timer = self.r.poll_timeout();
            let arrival = self.flight.iter().map(|f| (f.0, f.1)).min();
            let next = timer.into_iter().chain(arrival.map(|a| a.0)).min();
            match next {
                Some(t) if t <= until_us => {
                    self.now_us = self.now_us.max(t);
                    if let Some((at, order)) = arrival
                        && at <= self.now_us
                    {
                        let i = self
                            .flight
                            .iter()
                            .position(|f| f.0 == at && f.1 == order)
                            .unwrap();
                        let (_, _, s, response) = self.flight.remove(i);
                        self.deliver(response, s);
                    }
                    if self.r.poll_timeout().is_some_and(|t| t <= self.now_us) {
                        self.r.handle_timeout(self.now_us, &mut self.rng);
                        self.pump();
                    }
                }
                _ => break,
            }
        }
        self.now_us = self.now_us.max(until_us);
    }

    fn apply(&mut self, act: Act) {
        match act {
            Act::Send => {
                let seq_guess = self.sent_at.keys().next_back().map_or(1, |s| s + 1);
                match self.r.send(self.now_us, seq_guess * 7) {
                    Ok(seq) => {
                        assert_eq!(seq, seq_guess, "seqs increase by one from first_seq");
                        self.sent_at.insert(seq, self.now_us);
                    }
                    Err(Error::TooManyOutstanding { max }) => {
                        assert_eq!(self.r.outstanding(), max);
                    }
                    Err(e) => panic!("{e}"),
                }
                self.pump();
            }
            Act::Step { ms } => self.step_to(self.now_us + ms * MS),
            Act::Elect { leader } => {
                self.epoch += 1;
                self.servers[leader].epoch = self.epoch;
                self.servers[leader].leader = Some(leader);
            }
            Act::Catch { server } => {
                let current = (0..SERVERS).find(|&i| {
                    self.servers[i].epoch == self.epoch && self.servers[i].leader == Some(i)
                });
                self.servers[server].epoch = self.epoch;
                self.servers[server].leader = current;
            }
            Act::Kill { server, refuse } => {
                self.servers[server].dead = true;
                self.servers[server].refuse = refuse;
            }
            Act::Revive { server } => self.servers[server].dead = false,
            Act::Ready { ready } => self.leader_ready = ready,
            Act::Stale { pick, back } => {
                // A forged-looking but authentic old response: an old
                // leader's grant for an outstanding or finished seq.
                if let Some(&seq) = self.sent_at.keys().nth(pick % self.sent_at.len().max(1)) {
                    let epoch = self.max_delivered_epoch.saturating_sub(1 + back);
                    let response = Response {
                        reply_to: seq,
                        epoch,
                        reply: Reply::Done(seq * 1_000_000 + 999_999),
                    };
                    let s = pick % SERVERS;
                    self.deliver(response, s);
                }
            }
        }
    }

    /// Heals everything and runs past every deadline: every request must
    /// have ended, exactly once.
    fn finish(&mut self) {
        let deadline = self.now_us + config().request_timeout_ms * MS + 100 * MS;
        self.step_to(deadline);
        assert_eq!(self.r.poll_timeout(), None);
        assert_eq!(self.r.outstanding(), 0);
        for seq in self.sent_at.keys() {
            assert!(self.outcomes.contains_key(seq), "seq {seq} never ended");
        }
        assert_eq!(self.outcomes.len(), self.sent_at.len());
    }
}

fn run(seed: u64, loss: u32, dup: u32, acts: &[Act]) -> Sim {
    let mut sim = Sim::new(seed, loss, dup);
    for act in acts {
        sim.apply(act.clone());
    }
    sim.finish();
    sim
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn lossy_network_and_changing_leaders(
        seed in any::<u64>(),
        loss in 0..60u32,
        dup in 0..50u32,
        acts in prop::collection::vec(act(), 1..120),
    ) {
        run(seed, loss, dup, &acts);
    }
}

#[test]
fn same_seeds_same_trace() {
    let mut rng = SmallRng::seed_from_u64(42);
    let acts: Vec<Act> = (0..300)
        .map(|_| match rng.random_range(0..10) {
            0..=3 => Act::Send,
            4..=7 => Act::Step {
                ms: rng.random_range(1..60),
            },
            8 => Act::Elect {
                leader: rng.random_range(0..SERVERS),
            },
            _ => Act::Catch {
                server: rng.random_range(0..SERVERS),
            },
        })
        .collect();
    let a = run(7, 20, 20, &acts);
    let b = run(7, 20, 20, &acts);
    assert_eq!(a.trace, b.trace);
    assert!(a.accepted > 10, "the history made progress: {}", a.accepted);
    let c = run(8, 20, 20, &acts);
    assert_ne!(a.trace, c.trace);
}

#[test]
fn healthy_network_completes_everything() {
    let mut acts = Vec::new();
    for _ in 0..50 {
        acts.push(Act::Send);
        acts.push(Act::Step { ms: 5 });
    }
    let sim = run(1, 0, 0, &acts);
    assert!(sim.outcomes.values().all(|o| *o == Outcome::Done));
    assert_eq!(sim.accepted, 50);
}
