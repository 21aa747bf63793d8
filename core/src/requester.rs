//! The agent's request state machine: sequence numbers, retransmission with
//! backoff and jitter, leader guess, redirects, epochs and a bound on
//! everything. No sockets: quinn-style, the caller moves datagrams and time.
//!
//! # Driving it
//!
//! ```text
//! send(now, request) -> seq            queue a new request (at most requests_max outstanding)
//! poll_transmit(now) -> Transmit       until None: encode and send each datagram
//! handle_response(now, from, resp)     for every decoded response datagram
//! handle_send_error(now, destination)  when the OS reports a send refused/unreachable
//! poll_timeout() -> Option<now_us>     arm a timer for this time
//! handle_timeout(now, rng)             when it fires (the only use of randomness)
//! poll_event() -> Event                until None: completed replies and failures
//! ```
//!
//! After any `send` / `handle_*` call, call `poll_transmit`, `poll_event` and
//! `poll_timeout` again. Given the same calls and the same rng seed, the
//! outputs are the same.
//!
//! # Rules
//!
//! - **Seq**: each request gets the next [`SeqNo`] (starting at `first_seq >=
//!   1`, increasing, never 0). A retransmission reuses it, so the server's
//!   [`ReplyCache`](crate::ReplyCache) answers with the same grant.
//! - **Backoff**: transmission `k` (1-based) waits `min(rto_initial_ms ·
//!   2^(k−1), rto_max_ms)`, shortened by a random `0..=jitter_percent` %
//!   drawn when the previous timer fired (so the first wait is unjittered).
//! - **Leader guess**: every transmission goes to the current guess. It moves
//!   to a server that answered `Done` or `TryLater`, to the leader named in a
//!   redirect (only if it is a known server, and only if the redirect answers
//!   the request's latest transmission), and rotates to the next known server
//!   when the guess was silent for `silent_timeouts_max` consecutive
//!   retransmission timeouts, when a send to it fails, or when it redirects
//!   to a leader it does not know or we do not know.
//! - **Epochs**: a response whose epoch is below the highest epoch seen is
//!   dropped ([`Disposition::StaleEpoch`]). Only answers from a leader
//!   (`Done`, `TryLater`) to an outstanding request raise the highest epoch;
//!   a redirect does not, nor does a datagram that answers no outstanding
//!   request (a spoofed `epoch = 2^64-1` would make every later answer
//!   stale). A
//!   server that is not the leader may be in a higher term than any leader
//!   (a partitioned server's failed elections raise its term), and if its
//!   redirect counted, every answer of the real, lower-term leader would be
//!   dropped for as long as no leader reaches that term — forever if that
//!   server stays down (found by the simulator, `sim/`).
//! - **Exactly one outcome per seq**: the first accepted `Done` completes the
//!   request; later responses for that seq (duplicates, replies to earlier
//!   transmissions) find no request and are dropped
//!   ([`Disposition::UnknownSeq`]), as are responses to seqs never sent.
//! - **Giving up**: a request fails with [`Error::AttemptsExhausted`] once
//!   `attempts_max` transmissions went unanswered (the last one's timer
//!   expired, or a send error was reported for it), or with
//!   [`Error::DeadlineExceeded`] `request_timeout_ms` after it was sent.
//! - **Bounds**: `requests_max` outstanding requests (counting outcomes not
//!   yet taken with `poll_event`), `servers_max` servers, `attempts_max`
//!   transmissions and `request_timeout_ms` per request.
//!
//! # Restarts
//!
//! Seqs must not repeat across incarnations of an agent with the same node
//! id, or a server's reply cache could return a block already used: pass a
//! `first_seq` above every seq the previous incarnation used, e.g. wall-clock
//! microseconds at start-up (read by the caller, not here).

use std::collections::VecDeque;
use std::net::SocketAddr;

use rand::Rng;
use unid_proto::{Epoch, SeqNo};

use crate::Error;

/// The most outstanding requests a requester may be configured for.
pub const REQUESTS_MAX_LIMIT: usize = 4096;
/// The most servers a requester may be configured for.
pub const SERVERS_MAX_LIMIT: usize = 64;
/// The most transmissions per request a requester may be configured for.
pub const ATTEMPTS_MAX_LIMIT: u32 = 64;
/// The longest retransmission timeout accepted, in milliseconds.
pub const RTO_MS_MAX: u64 = 60_000;
/// The longest request deadline accepted, in milliseconds.
pub const REQUEST_TIMEOUT_MS_MAX: u64 = 600_000;
/// The most jitter accepted, in percent of a retransmission timeout.
pub const JITTER_PERCENT_MAX: u8 = 90;

/// Configuration of a [`Requester`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequesterConfig {
    /// Most requests outstanding at once, including outcomes not yet taken
    /// with [`Requester::poll_event`] (`1..=REQUESTS_MAX_LIMIT`).
    pub requests_max: usize,
    /// Most servers known (`1..=SERVERS_MAX_LIMIT`).
    pub servers_max: usize,
    /// First retransmission timeout, in milliseconds (`1..=rto_max_ms`).
    pub rto_initial_ms: u64,
    /// Largest retransmission timeout, in milliseconds (`..=RTO_MS_MAX`).
    pub rto_max_ms: u64,
    /// Each timeout after the first is shortened by a random 0 to this many
    /// percent (`..=JITTER_PERCENT_MAX`), so agents that lost the same
    /// server do not retransmit in lockstep.
    pub jitter_percent: u8,
    /// Most transmissions of one request (`1..=ATTEMPTS_MAX_LIMIT`).
    pub attempts_max: u32,
    /// A request fails this long after [`Requester::send`], in milliseconds
    /// (`1..=REQUEST_TIMEOUT_MS_MAX`).
    pub request_timeout_ms: u64,
    /// Rotate to the next server after this many consecutive retransmission
    /// timeouts of requests sent to the current one (`>= 1`).
    pub silent_timeouts_max: u32,
}

impl RequesterConfig {
    /// Defaults: 16 outstanding, 16 servers, timeouts 10 ms doubling to
    /// 1 s with 25 % jitter, 10 attempts, 5 s deadline, rotate after 2
    /// silent timeouts.
    pub const DEFAULT: RequesterConfig = RequesterConfig {
        requests_max: 16,
        servers_max: 16,
        rto_initial_ms: 10,
        rto_max_ms: 1000,
        jitter_percent: 25,
        attempts_max: 10,
        request_timeout_ms: 5000,
        silent_timeouts_max: 2,
    };

    /// Checks every bound.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field, reason| Err(Error::InvalidConfig { field, reason });
        if !(1..=REQUESTS_MAX_LIMIT).contains(&self.requests_max) {
            return bad("requests_max", "must be in 1..=REQUESTS_MAX_LIMIT");
        }
        if !(1..=SERVERS_MAX_LIMIT).contains(&self.servers_max) {
            return bad("servers_max", "must be in 1..=SERVERS_MAX_LIMIT");
        }
        if self.rto_initial_ms == 0 {
            return bad("rto_initial_ms", "must be at least 1");
        }
        if !(self.rto_initial_ms..=RTO_MS_MAX).contains(&self.rto_max_ms) {
            return bad("rto_max_ms", "must be in rto_initial_ms..=RTO_MS_MAX");
        }
        if self.jitter_percent > JITTER_PERCENT_MAX {
            return bad("jitter_percent", "must be at most JITTER_PERCENT_MAX");
        }
        if !(1..=ATTEMPTS_MAX_LIMIT).contains(&self.attempts_max) {
            return bad("attempts_max", "must be in 1..=ATTEMPTS_MAX_LIMIT");
        }
        if !(1..=REQUEST_TIMEOUT_MS_MAX).contains(&self.request_timeout_ms) {
            return bad(
                "request_timeout_ms",
                "must be in 1..=REQUEST_TIMEOUT_MS_MAX",
            );
        }
        if self.silent_timeouts_max == 0 {
            return bad("silent_timeouts_max", "must be at least 1");
        }
        Ok(())
    }

    /// The retransmission timeout after transmission `attempt` (1-based; 0
    /// is taken as 1), before jitter, in microseconds.
    pub fn rto_us(&self, attempt: u32) -> u64 {
        let shift = attempt.saturating_sub(1).min(63);
        let ms = self.rto_initial_ms.checked_shl(shift).unwrap_or(u64::MAX);
        let ms = if ms >> shift != self.rto_initial_ms {
            u64::MAX
        } else {
            ms
        };
        ms.min(self.rto_max_ms) * 1000
    }
}

impl Default for RequesterConfig {
    fn default() -> Self {
        RequesterConfig::DEFAULT
    }
}

/// A datagram to send: the request `seq` to `destination`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit<Q> {
    /// The request's sequence number (the same on every retransmission).
    pub seq: SeqNo,
    /// Where to send it.
    pub destination: SocketAddr,
    /// Which transmission this is, from 1.
    pub attempt: u32,
    /// The request body, as given to [`Requester::send`].
    pub request: Q,
}

/// What a server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply<P> {
    /// A final answer (a grant, or an application error such as an exhausted
    /// sequence): completes the request.
    Done(P),
    /// The server is the leader but cannot answer yet (not ready, waiting
    /// for a raise): keep retransmitting to it on the backoff schedule.
    TryLater,
    /// The server is not the leader; `leader` is who it thinks is, if known.
    Redirect {
        /// The leader's address, if the server knows it.
        leader: Option<SocketAddr>,
    },
}

/// A decoded response datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response<P> {
    /// The seq of the request this answers.
    pub reply_to: SeqNo,
    /// The epoch (Raft term) of the server that produced it.
    pub epoch: Epoch,
    /// The answer.
    pub reply: Reply<P>,
}

/// An outcome of a request, taken with [`Requester::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<P> {
    /// The request got a final answer.
    Completed {
        /// The request's seq.
        seq: SeqNo,
        /// The answering server's epoch.
        epoch: Epoch,
        /// The answering server.
        from: SocketAddr,
        /// The answer.
        payload: P,
    },
    /// The request was given up.
    Failed {
        /// The request's seq.
        seq: SeqNo,
        /// Why: [`Error::AttemptsExhausted`] or [`Error::DeadlineExceeded`].
        error: Error,
    },
}

/// What [`Requester::handle_response`] did with a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Completed its request ([`Event::Completed`] queued).
    Accepted,
    /// A [`Reply::TryLater`] for an outstanding request: noted.
    TryLater,
    /// A redirect answering the request's latest transmission: the leader
    /// guess moved and the request is retransmitted now (if attempts remain).
    Redirected,
    /// A redirect answering an older transmission: dropped.
    StaleRedirect,
    /// Its epoch is below the highest seen: dropped.
    StaleEpoch,
    /// No outstanding request has that seq, or it was never sent to that
    /// server (a duplicate, a finished request, a seq never sent): dropped.
    UnknownSeq,
    /// Not from a known server: dropped.
    UnknownSource,
}

/// Counters kept by a [`Requester`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequesterStats {
    /// Requests queued with `send`.
    pub requests: u64,
    /// Datagrams handed out by `poll_transmit`, first transmissions included.
    pub transmits: u64,
    /// Of those, retransmissions.
    pub retransmits: u64,
    /// Responses that completed a request.
    pub accepted: u64,
    /// `TryLater` responses.
    pub try_later: u64,
    /// Redirects acted on.
    pub redirects: u64,
    /// Redirects dropped (stale) or naming an unknown leader.
    pub redirects_ignored: u64,
    /// Responses dropped for a stale epoch.
    pub stale_epoch: u64,
    /// Responses dropped for an unknown seq.
    pub unknown_seq: u64,
    /// Responses dropped for an unknown source.
    pub unknown_source: u64,
    /// Retransmission timeouts.
    pub timeouts: u64,
    /// Send errors reported.
    pub send_errors: u64,
    /// Leader-guess rotations.
    pub rotations: u64,
    /// Requests given up.
    pub failed: u64,
}

#[derive(Clone, Debug)]
struct Pending<Q> {
    seq: SeqNo,
    request: Q,
    deadline_us: u64,
    /// Transmissions made so far.
    attempts: u32,
    /// The server index of the latest transmission.
    sent_to: Option<usize>,
    /// Bit `i` set: transmitted to server `i` at least once. Responses from
    /// other servers are not answers to this request.
    sent_mask: u64,
    /// Waiting for `poll_transmit`.
    due: bool,
    /// When the latest transmission times out (meaningful if sent and not due).
    timer_us: u64,
    /// Jitter for the next timeout, in percent.
    jitter_percent: u8,
}

/// The agent's request state machine. See the module docs.
#[derive(Clone, Debug)]
pub struct Requester<Q, P> {
    config: RequesterConfig,
    servers: Vec<SocketAddr>,
    /// Index into `servers` of the leader guess.
    leader: usize,
    /// Consecutive timeouts of requests sent to the leader guess.
    silent: u32,
    /// Ascending by seq.
    pending: VecDeque<Pending<Q>>,
    /// `None` once every seq is used.
    next_seq: Option<SeqNo>,
    highest_epoch: Epoch,
    events: VecDeque<Event<P>>,
    now_us: u64,
    stats: RequesterStats,
}

impl<Q: Clone, P> Requester<Q, P> {
    /// A requester for `servers` (the first is the initial leader guess;
    /// shuffle them first to spread agents), numbering requests from
    /// `first_seq` (`>= 1`; see the module docs on restarts).
    pub fn new(
        config: RequesterConfig,
        servers: &[SocketAddr],
        first_seq: SeqNo,
        now_us: u64,
    ) -> Result<Requester<Q, P>, Error> {
        config.validate()?;
        let bad = |field, reason| Err(Error::InvalidConfig { field, reason });
        if servers.is_empty() {
            return bad("servers", "must not be empty");
        }
        const _: () = assert!(SERVERS_MAX_LIMIT <= u64::BITS as usize); // `sent_mask`
        if servers.len() > config.servers_max {
            return bad("servers", "must be at most servers_max");
        }
        if servers
            .iter()
            .enumerate()
            .any(|(i, a)| servers[..i].contains(a))
        {
            return bad("servers", "must not repeat an address");
        }
        if first_seq == 0 {
            return bad("first_seq", "must be at least 1");
        }
        Ok(Requester {
            servers: servers.to_vec(),
            leader: 0,
            silent: 0,
            pending: VecDeque::with_capacity(config.requests_max),
            next_seq: Some(first_seq),
            highest_epoch: 0,
            events: VecDeque::with_capacity(config.requests_max),
            now_us,
            stats: RequesterStats::default(),
            config,
        })
    }

    /// A requester for `servers` (the first is the leader guess) that continues this one:
    /// the same configuration, seqs above every seq this one handed out, and this one's
    /// highest epoch, so the epoch filter survives a leader switch (the rule stays here,
    /// not in a caller's copy). Nothing outstanding moves over: the caller sends again what
    /// it still needs, under new seqs (answers to the old ones are then dropped as unknown).
    pub fn continue_with(
        &self,
        servers: &[SocketAddr],
        now_us: u64,
    ) -> Result<Requester<Q, P>, Error> {
        let first_seq = self.next_seq.ok_or(Error::SeqNoExhausted)?;
        let mut next = Requester::new(self.config.clone(), servers, first_seq, now_us)?;
        next.highest_epoch = self.highest_epoch;
        next.now_us = next.now_us.max(self.now_us);
        Ok(next)
    }

    /// The configuration.
    pub fn config(&self) -> &RequesterConfig {
        &self.config
    }

    /// The counters.
    pub fn stats(&self) -> &RequesterStats {
        &self.stats
    }

    /// The current leader guess.
    pub fn leader(&self) -> SocketAddr {
        self.servers[self.leader]
    }

    /// The highest epoch seen in a leader's response (`Done` or
    /// `TryLater`; redirects do not count, see the module docs).
    pub fn highest_epoch(&self) -> Epoch {
        self.highest_epoch
    }

    /// Requests outstanding plus outcomes not yet taken.
    pub fn outstanding(&self) -> usize {
        self.pending.len() + self.events.len()
    }

    /// Queues `request` at `now_us` and returns its seq. It goes out with the
    /// next [`poll_transmit`](Self::poll_transmit).
    /// [`Error::TooManyOutstanding`] at `requests_max`.
    pub fn send(&mut self, now_us: u64, request: Q) -> Result<SeqNo, Error> {
        let now_us = self.tick(now_us);
        if self.outstanding() >= self.config.requests_max {
            return Err(Error::TooManyOutstanding {
                max: self.config.requests_max,
            });
        }
        let seq = self.next_seq.ok_or(Error::SeqNoExhausted)?;
        assert!(seq >= 1);
        assert!(self.pending.back().is_none_or(|p| p.seq < seq));
        self.next_seq = seq.checked_add(1);
        self.pending.push_back(Pending {
            seq,
            request,
            deadline_us: now_us.saturating_add(self.config.request_timeout_ms * 1000),
            attempts: 0,
            sent_to: None,
            sent_mask: 0,
            due: true,
            timer_us: 0,
            jitter_percent: 0,
        });
        self.stats.requests += 1;
        Ok(seq)
    }

    /// The next datagram to send, if any: the lowest-seq request due for a
    /// (re)transmission, to the current leader guess.
    pub fn poll_transmit(&mut self, now_us: u64) -> Option<Transmit<Q>> {
        let now_us = self.tick(now_us);
        let leader = self.leader;
        let destination = self.servers[leader];
        let config = &self.config;
        let p = self.pending.iter_mut().find(|p| p.due)?;
        assert!(p.attempts < config.attempts_max);
        p.attempts += 1;
        p.due = false;
        p.sent_to = Some(leader);
        p.sent_mask |= 1 << leader;
        let rto_us = config.rto_us(p.attempts);
        let jitter_us = rto_us / 100 * u64::from(p.jitter_percent);
        p.timer_us = now_us.saturating_add(rto_us - jitter_us);
        debug_assert!(p.timer_us > now_us);
        self.stats.transmits += 1;
        if p.attempts > 1 {
            self.stats.retransmits += 1;
        }
        Some(Transmit {
            seq: p.seq,
            destination,
            attempt: p.attempts,
            request: p.request.clone(),
        })
    }

    /// Handles a response datagram from `from` at `now_us`. See
    /// [`Disposition`] for what can happen to it.
    pub fn handle_response(
        &mut self,
        now_us: u64,
        from: SocketAddr,
        response: Response<P>,
    ) -> Disposition {
        self.tick(now_us);
        let Some(source) = self.servers.iter().position(|a| *a == from) else {
            self.stats.unknown_source += 1;
            return Disposition::UnknownSource;
        };
        if response.epoch < self.highest_epoch {
            self.stats.stale_epoch += 1;
            return Disposition::StaleEpoch;
        }
        let bit = 1u64 << source;
        let Some(at) = self
            .pending
            .iter()
            .position(|p| p.seq == response.reply_to && p.sent_mask & bit != 0)
        else {
            // Raises nothing: a datagram that answers no request of ours (a
            // spoofed or replayed one with a huge epoch) must not make every
            // real answer stale.
            self.stats.unknown_seq += 1;
            return Disposition::UnknownSeq;
        };
        if !matches!(response.reply, Reply::Redirect { .. }) {
            self.highest_epoch = response.epoch;
        }
        if source == self.leader {
            self.silent = 0;
        }
        match response.reply {
            Reply::Done(payload) => {
                let p = self.pending.remove(at).expect("found above");
                self.set_leader(source);
                self.events.push_back(Event::Completed {
                    seq: p.seq,
                    epoch: response.epoch,
                    from,
                    payload,
                });
                self.stats.accepted += 1;
                debug_assert!(self.outstanding() <= self.config.requests_max);
                Disposition::Accepted
            }
            Reply::TryLater => {
                self.set_leader(source);
                self.stats.try_later += 1;
                Disposition::TryLater
            }
            Reply::Redirect { leader } => {
                let p = &self.pending[at];
                if p.due || p.sent_to != Some(source) {
                    self.stats.redirects_ignored += 1;
                    return Disposition::StaleRedirect;
                }
                match leader.and_then(|a| self.servers.iter().position(|s| *s == a)) {
                    Some(named) if named != source => {
                        self.set_leader(named);
                        self.stats.redirects += 1;
                    }
                    _ => {
                        // Unknown, none, or itself: try the next server.
                        if source == self.leader {
                            self.rotate();
                        }
                        self.stats.redirects_ignored += 1;
                    }
                }
                self.retransmit_now(at);
                Disposition::Redirected
            }
        }
    }

    /// Reports that a datagram to `destination` could not be sent (refused,
    /// unreachable). Rotates the leader guess away from it and retransmits
    /// at once every request whose latest transmission went there; a request
    /// with no attempts left fails.
    pub fn handle_send_error(&mut self, now_us: u64, destination: SocketAddr) {
        self.tick(now_us);
        self.stats.send_errors += 1;
        let Some(server) = self.servers.iter().position(|a| *a == destination) else {
            return;
        };
        if server == self.leader {
            self.rotate();
        }
        let mut at = 0;
        while at < self.pending.len() {
            let p = &self.pending[at];
            if !p.due && p.sent_to == Some(server) && self.retransmit_now(at) {
                continue; // Failed and removed: `at` is the next one.
            }
            at += 1;
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called:
    /// the earliest retransmission timer or deadline. `None` when idle.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.pending
            .iter()
            .map(|p| {
                if p.due || p.attempts == 0 {
                    p.deadline_us
                } else {
                    p.timer_us.min(p.deadline_us)
                }
            })
            .min()
    }

    /// Handles timers at `now_us`: requests past their deadline fail;
    /// requests whose latest transmission timed out are retransmitted (with
    /// jitter drawn from `rng` for their next timeout) or, with no attempts
    /// left, fail. Counts silence of the leader guess and rotates after
    /// `silent_timeouts_max`.
    pub fn handle_timeout<R: Rng + ?Sized>(&mut self, now_us: u64, rng: &mut R) {
        let now_us = self.tick(now_us);
        let mut at = 0;
        while at < self.pending.len() {
            let p = &self.pending[at];
            if now_us >= p.deadline_us {
                let error = Error::DeadlineExceeded {
                    seq: p.seq,
                    waited_ms: self.config.request_timeout_ms,
                };
                self.fail(at, error);
                continue;
            }
            if p.due || p.attempts == 0 || now_us < p.timer_us {
                at += 1;
                continue;
            }
            self.stats.timeouts += 1;
            if p.sent_to == Some(self.leader) {
                self.silent += 1;
                if self.silent >= self.config.silent_timeouts_max {
                    self.rotate();
                }
            }
            let jitter = rng.random_range(0..=self.config.jitter_percent);
            self.pending[at].jitter_percent = jitter;
            if !self.retransmit_now(at) {
                at += 1;
            }
        }
    }

    /// The next outcome, if any.
    pub fn poll_event(&mut self) -> Option<Event<P>> {
        self.events.pop_front()
    }

    /// Marks the request at `at` due for retransmission, or fails it if it
    /// has no attempts left. Returns whether it failed (and was removed).
    fn retransmit_now(&mut self, at: usize) -> bool {
        let p = &mut self.pending[at];
        if p.attempts >= self.config.attempts_max {
            let error = Error::AttemptsExhausted {
                seq: p.seq,
                attempts: p.attempts,
            };
            self.fail(at, error);
            true
        } else {
            p.due = true;
            false
        }
    }

    fn fail(&mut self, at: usize, error: Error) {
        let p = self.pending.remove(at).expect("caller checked");
        debug_assert!(matches!(
            error,
            Error::AttemptsExhausted { .. } | Error::DeadlineExceeded { .. }
        ));
        self.events.push_back(Event::Failed { seq: p.seq, error });
        self.stats.failed += 1;
    }

    fn set_leader(&mut self, server: usize) {
        assert!(server < self.servers.len());
        if server != self.leader {
            self.leader = server;
            self.silent = 0;
        }
    }

    fn rotate(&mut self) {
        self.leader = (self.leader + 1) % self.servers.len();
        self.silent = 0;
        self.stats.rotations += 1;
    }

    fn tick(&mut self, now_us: u64) -> u64 {
        self.now_us = self.now_us.max(now_us);
        self.now_us
    }
}

#[cfg(test)]
mod tests;
