//! The nemesis: a seeded schedule of faults, one at a time. Every `--every-ms` ± 25 % the
//! next kind of the `--nemesis` list (in order, cycling) starts, and is healed a quarter to
//! half an interval later (a killed process restarted from its data, rules removed, the
//! clock set back); none starts in the last 2 s of the issuing, and whatever is active is
//! healed when the issuing ends. The same seed gives the same times, kinds and targets;
//! which server leads at that moment depends on the run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};

use crate::cluster::Cluster;
use crate::fleet::Fleet;
use crate::partition::Rules;
use crate::proxy::{Proxy, ProxyFaults};
use crate::wire;

/// No fault this close to the end of the issuing: its effect could not be measured.
pub const FAULT_MARGIN: Duration = Duration::from_secs(2);

/// The datagram faults of a `proxy` burst.
pub const PROXY_BURST: ProxyFaults = ProxyFaults {
    drop: 0.10,
    duplicate: 0.05,
    reorder: 0.05,
    delay: 0.20,
    delay_ms: 30,
    corrupt: 0.01,
};

/// How far a clock jumps.
pub const CLOCK_JUMP: &str = "-1h";

/// The kinds of fault (`--nemesis a,b,c` or `all`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// No faults (alone).
    None,
    /// Every kind below, in this order.
    All,
    /// SIGKILL the leader; restart it from its data dir.
    KillLeader,
    /// SIGTERM the leader (it hands off, sends `LeaderChange`); restart it.
    TermLeader,
    /// SIGKILL a follower; restart it.
    KillFollower,
    /// SIGKILL a real agent; restart it (same ring dir and socket). Needs `--real-agents`.
    KillAgent,
    /// SIGKILL every server and real agent; restart them all from their data.
    RestartAll,
    /// Cut the leader off from the other servers and from every client (iptables, root).
    PartitionLeader,
    /// Split the servers: the leader with a minority on one side, the majority on the other;
    /// clients still reach every server (iptables, root).
    PartitionSplit,
    /// Cut a real agent off from the servers (iptables, root; needs `--real-agents`).
    PartitionAgent,
    /// A burst of datagram faults in the proxy (needs `--proxy`).
    Proxy,
    /// Shift a clock back an hour: alternately restart a real agent with its wall clock an
    /// hour behind (a lower incarnation than its last run), and set the leader's wall clock
    /// back while it runs (libfaketime; heals by setting it right again).
    ClockJump,
}

impl Kind {
    /// Every fault kind, the order of `all`.
    pub const EVERY: [Kind; 10] = [
        Kind::KillLeader,
        Kind::KillFollower,
        Kind::KillAgent,
        Kind::TermLeader,
        Kind::PartitionLeader,
        Kind::PartitionSplit,
        Kind::PartitionAgent,
        Kind::Proxy,
        Kind::ClockJump,
        Kind::RestartAll,
    ];

    /// The flag's spelling.
    pub fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }

    /// Whether it changes the leader (its failover is timed and checked).
    pub fn is_failover(self) -> bool {
        matches!(
            self,
            Kind::KillLeader
                | Kind::TermLeader
                | Kind::RestartAll
                | Kind::PartitionLeader
                | Kind::PartitionSplit
        )
    }

    /// Whether it needs the partition rules.
    pub fn needs_rules(self) -> bool {
        matches!(
            self,
            Kind::PartitionLeader | Kind::PartitionSplit | Kind::PartitionAgent
        )
    }
}

/// Expands `all` and drops `none`.
pub fn expand(kinds: &[Kind]) -> Vec<Kind> {
    let mut out = Vec::new();
    for k in kinds {
        match k {
            Kind::None => {}
            Kind::All => out.extend(Kind::EVERY),
            k => out.push(*k),
        }
    }
    out
}

/// One fault as it happened.
#[derive(Clone, Debug)]
pub struct Fault {
    /// Its kind.
    pub kind: Kind,
    /// When it started, µs since the run started.
    pub t_us: u64,
    /// What it hit (`server 2`, `agent 0`, `servers [1] vs [2, 3]`).
    pub target: String,
    /// The leader's term when it started (0: unknown).
    pub term: u64,
    /// The leader's address as the agents see it, for a failover (the first grant from
    /// another address is the new leader's).
    pub old_leader: Option<SocketAddr>,
    /// When it was healed.
    pub healed_us: Option<u64>,
    /// Why it did not run, if it did not.
    pub skipped: Option<String>,
    /// Real agents it killed (SIGKILL), and when (µs since the start).
    pub agents_killed: Vec<(usize, u64)>,
}

/// What a fault needs to act.
pub struct Ctx<'a> {
    /// The servers.
    pub cluster: &'a mut Cluster,
    /// The real agents.
    pub fleet: Option<&'a mut Fleet>,
    /// The proxy, and the faults it runs with outside bursts.
    pub proxy: Option<(&'a Proxy, ProxyFaults)>,
    /// The partition rules (None: partitions unavailable, and why).
    pub rules: Result<&'a mut Rules, String>,
    /// Each server's address as the agents see it (the proxy front, else its own).
    pub seen_addr: &'a dyn Fn(u64) -> SocketAddr,
    /// The servers run under libfaketime.
    pub server_clocks: bool,
    /// Problems worth reporting (restart failures).
    pub notes: &'a mut Vec<String>,
}

/// What to undo at the heal.
enum Undo {
    Restart(Vec<u64>),
    RestartAgent(usize),
    RestartAgentClock(usize),
    Rules,
    Proxy,
    ServerClock(u64),
    RestartEverything(Vec<u64>, Vec<usize>),
}

/// The schedule and its record.
pub struct Nemesis {
    kinds: Vec<Kind>,
    next_kind: usize,
    rng: SmallRng,
    every_ms: u64,
    start: Instant,
    next_at: Option<Instant>,
    active: Option<(Instant, Undo, usize)>,
    clock_jumps: u32,
    /// Every fault started (or skipped), in order.
    pub faults: Vec<Fault>,
}

impl Nemesis {
    /// A schedule of `kinds` (expanded) every `every_ms`, seeded.
    pub fn new(kinds: Vec<Kind>, seed: u64, every_ms: u64, start: Instant) -> Nemesis {
        let mut rng = SmallRng::seed_from_u64(seed);
        let first = (!kinds.is_empty()).then(|| start + jitter(&mut rng, every_ms));
        Nemesis {
            kinds,
            next_kind: 0,
            rng,
            every_ms,
            start,
            next_at: first,
            active: None,
            clock_jumps: 0,
            faults: Vec::new(),
        }
    }

    fn t_us(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_micros() as u64
    }

    /// Starts and heals faults when due.
    pub fn tick(&mut self, now: Instant, stop_issuing_at: Instant, ctx: &mut Ctx<'_>) {
        if let Some((at, _, _)) = &self.active
            && (now >= *at || now >= stop_issuing_at)
        {
            self.heal(now, ctx);
        }
        let Some(at) = self.next_at else { return };
        if now < at || self.active.is_some() {
            return;
        }
        if now + FAULT_MARGIN >= stop_issuing_at {
            self.next_at = None;
            return;
        }
        let kind = self.kinds[self.next_kind % self.kinds.len()];
        match self.begin(kind, now, ctx) {
            Some(()) => {
                self.next_kind += 1;
                self.next_at = Some(now + jitter(&mut self.rng, self.every_ms));
            }
            // No leader right now: try again shortly.
            None => self.next_at = Some(now + Duration::from_millis(500)),
        }
    }

    /// Heals what is active (also called at the end).
    pub fn heal(&mut self, now: Instant, ctx: &mut Ctx<'_>) {
        let Some((_, undo, i)) = self.active.take() else {
            return;
        };
        let mut fail = |what: String, e: anyhow::Error| {
            let n = format!("heal of {what} failed: {e:#}");
            eprintln!("loadgen: {n}");
            ctx.notes.push(n);
        };
        match undo {
            Undo::Restart(ids) => {
                for id in ids {
                    if let Err(e) = ctx.cluster.start(id, false) {
                        fail(format!("server {id}"), e);
                    }
                }
            }
            Undo::RestartAgent(a) | Undo::RestartAgentClock(a) => {
                if let Some(f) = ctx.fleet.as_deref_mut() {
                    if f.kill9(a) {
                        let t = now.saturating_duration_since(self.start).as_micros() as u64;
                        self.faults[i].agents_killed.push((a, t));
                    }
                    if let Err(e) = f.start(a, None) {
                        fail(format!("agent {a}"), e);
                    }
                }
            }
            Undo::Rules => {
                if let Ok(r) = ctx.rules.as_deref_mut()
                    && let Err(e) = r.clear()
                {
                    fail("the partition".into(), e);
                }
            }
            Undo::Proxy => {
                if let Some((p, base)) = ctx.proxy {
                    p.set_faults(base);
                }
            }
            Undo::ServerClock(id) => {
                if let Err(e) = ctx.cluster.jump_clock(id, "+0") {
                    fail(format!("server {id}'s clock"), e);
                }
            }
            Undo::RestartEverything(ids, agents) => {
                for id in ids {
                    if let Err(e) = ctx.cluster.start(id, false) {
                        fail(format!("server {id}"), e);
                    }
                }
                if let Some(f) = ctx.fleet.as_deref_mut() {
                    for a in agents {
                        if let Err(e) = f.start(a, None) {
                            fail(format!("agent {a}"), e);
                        }
                    }
                }
            }
        }
        let t = self.t_us(now);
        self.faults[i].healed_us = Some(t);
        eprintln!(
            "loadgen: healed {} ({}) at {:.3} s",
            self.faults[i].kind.name(),
            self.faults[i].target,
            t as f64 / 1e6
        );
    }

    fn down(&mut self) -> Duration {
        Duration::from_millis(self.rng.random_range(self.every_ms / 4..=self.every_ms / 2))
    }

    fn skip(&mut self, kind: Kind, now: Instant, why: String) {
        eprintln!("loadgen: nemesis {} SKIPPED: {why}", kind.name());
        let t_us = self.t_us(now);
        self.faults.push(Fault {
            kind,
            t_us,
            target: "-".into(),
            term: 0,
            old_leader: None,
            healed_us: None,
            skipped: Some(why),
            agents_killed: Vec::new(),
        });
    }

    /// Starts `kind`; None if it must wait (no leader known).
    fn begin(&mut self, kind: Kind, now: Instant, ctx: &mut Ctx<'_>) -> Option<()> {
        let needs_leader =
            kind.is_failover() || kind == Kind::KillFollower || kind == Kind::ClockJump;
        let leader = if needs_leader {
            let l = leader_of(ctx.cluster);
            if l.is_none() && kind != Kind::ClockJump {
                return None;
            }
            l
        } else {
            None
        };
        let n_agents = ctx.fleet.as_ref().map_or(0, |f| f.agents.len());
        let mut killed: Vec<usize> = Vec::new();
        let (target, term, old_leader, undo) = match kind {
            Kind::None | Kind::All => return Some(()),
            Kind::KillLeader | Kind::TermLeader => {
                let (id, term) = leader?;
                if kind == Kind::KillLeader {
                    ctx.cluster.kill9(id);
                } else if !ctx.cluster.term(id, Duration::from_secs(5)) {
                    ctx.notes.push(format!(
                        "server {id} did not exit within 5 s of SIGTERM (killed)"
                    ));
                }
                (
                    format!("server {id}"),
                    term,
                    Some((ctx.seen_addr)(id)),
                    Undo::Restart(vec![id]),
                )
            }
            Kind::KillFollower => {
                let (lid, term) = leader?;
                let followers: Vec<u64> = running(ctx.cluster)
                    .into_iter()
                    .filter(|id| *id != lid)
                    .collect();
                if followers.is_empty() {
                    return None;
                }
                let id = followers[self.rng.random_range(0..followers.len())];
                ctx.cluster.kill9(id);
                (
                    format!("server {id} (leader {lid})"),
                    term,
                    None,
                    Undo::Restart(vec![id]),
                )
            }
            Kind::KillAgent | Kind::PartitionAgent if n_agents == 0 => {
                self.skip(kind, now, "no real agents (--real-agents 0)".into());
                return Some(());
            }
            Kind::KillAgent => {
                let a = self.rng.random_range(0..n_agents);
                let f = ctx.fleet.as_deref_mut().expect("agents exist");
                if f.kill9(a) {
                    killed.push(a);
                }
                (format!("agent {a}"), 0, None, Undo::RestartAgent(a))
            }
            Kind::RestartAll => {
                let term = leader.map_or(0, |l| l.1);
                let ids = running(ctx.cluster);
                for id in &ids {
                    ctx.cluster.kill9(*id);
                }
                let mut agents = Vec::new();
                if let Some(f) = ctx.fleet.as_deref_mut() {
                    for a in 0..f.agents.len() {
                        if f.kill9(a) {
                            agents.push(a);
                            killed.push(a);
                        }
                    }
                }
                let old = leader.map(|l| (ctx.seen_addr)(l.0));
                (
                    format!("servers {ids:?}, agents {agents:?}"),
                    term,
                    old,
                    Undo::RestartEverything(ids, agents),
                )
            }
            Kind::PartitionLeader | Kind::PartitionSplit | Kind::PartitionAgent => {
                let rules = match ctx.rules.as_deref_mut() {
                    Ok(r) => r,
                    Err(why) => {
                        let why = why.clone();
                        self.skip(kind, now, why);
                        return Some(());
                    }
                };
                let ports = |c: &Cluster, id: u64| {
                    let s = &c.servers[id as usize - 1];
                    (s.uid.unwrap_or(0), (s.raft.port(), s.udp.port()))
                };
                let all: Vec<u64> = ctx.cluster.servers.iter().map(|s| s.id).collect();
                let res = match kind {
                    Kind::PartitionAgent => {
                        let a = self.rng.random_range(0..n_agents);
                        let uid = ctx
                            .fleet
                            .as_ref()
                            .and_then(|f| f.agents[a].uid)
                            .unwrap_or(0);
                        rules
                            .isolate_udp(uid, None)
                            .map(|()| (format!("agent {a}"), 0, None))
                    }
                    _ => {
                        let (lid, term) = leader?;
                        // The leader's side: itself (partition-leader), or a minority.
                        let mut side = vec![lid];
                        if kind == Kind::PartitionSplit {
                            let mut others: Vec<u64> =
                                all.iter().copied().filter(|i| *i != lid).collect();
                            let extra = ((all.len() - 1) / 2).saturating_sub(1);
                            for _ in 0..extra {
                                let k = self.rng.random_range(0..others.len());
                                side.push(others.remove(k));
                            }
                        }
                        let rest: Vec<u64> =
                            all.iter().copied().filter(|i| !side.contains(i)).collect();
                        let mut r = Ok(());
                        for a in &side {
                            for b in &rest {
                                let (ua, pa) = ports(ctx.cluster, *a);
                                let (ub, pb) = ports(ctx.cluster, *b);
                                if r.is_ok() {
                                    r = rules.cut(ua, pa, ub, pb);
                                }
                            }
                        }
                        if kind == Kind::PartitionLeader && r.is_ok() {
                            let (ul, (_, udp)) = ports(ctx.cluster, lid);
                            r = rules.isolate_udp(ul, Some(udp));
                        }
                        r.map(|()| {
                            (
                                format!("servers {side:?} vs {rest:?}"),
                                term,
                                Some((ctx.seen_addr)(lid)),
                            )
                        })
                    }
                };
                match res {
                    Ok((target, term, old)) => (target, term, old, Undo::Rules),
                    Err(e) => {
                        let _ = rules.clear();
                        self.skip(kind, now, format!("{e:#}"));
                        return Some(());
                    }
                }
            }
            Kind::Proxy => match ctx.proxy {
                Some((p, _)) => {
                    p.set_faults(PROXY_BURST);
                    ("proxy (burst)".into(), 0, None, Undo::Proxy)
                }
                None => {
                    self.skip(kind, now, "no proxy (--proxy)".into());
                    return Some(());
                }
            },
            Kind::ClockJump => {
                let agent_turn = n_agents > 0 && (self.clock_jumps % 2 == 0 || !ctx.server_clocks);
                self.clock_jumps += 1;
                if agent_turn {
                    let a = self.rng.random_range(0..n_agents);
                    let f = ctx.fleet.as_deref_mut().expect("agents exist");
                    if f.kill9(a) {
                        killed.push(a);
                    }
                    if let Err(e) = f.start(a, Some(CLOCK_JUMP)) {
                        let _ = f.start(a, None);
                        self.skip(kind, now, format!("{e:#}"));
                        return Some(());
                    }
                    (
                        format!("agent {a} restarted with its clock {CLOCK_JUMP}"),
                        0,
                        None,
                        Undo::RestartAgentClock(a),
                    )
                } else if ctx.server_clocks {
                    let (id, term) = leader?;
                    if let Err(e) = ctx.cluster.jump_clock(id, CLOCK_JUMP) {
                        self.skip(kind, now, format!("{e:#}"));
                        return Some(());
                    }
                    (
                        format!("server {id}'s clock {CLOCK_JUMP} while it runs"),
                        term,
                        None,
                        Undo::ServerClock(id),
                    )
                } else {
                    self.skip(
                        kind,
                        now,
                        "no real agents and the servers are not under libfaketime".into(),
                    );
                    return Some(());
                }
            }
        };
        let t_us = self.t_us(now);
        eprintln!(
            "loadgen: nemesis {} at {:.3} s: {target}",
            kind.name(),
            t_us as f64 / 1e6
        );
        self.faults.push(Fault {
            kind,
            t_us,
            target,
            term,
            old_leader,
            healed_us: None,
            skipped: None,
            agents_killed: killed.iter().map(|a| (*a, t_us)).collect(),
        });
        let down = self.down();
        self.active = Some((now + down, undo, self.faults.len() - 1));
        Some(())
    }
}

fn jitter(rng: &mut SmallRng, mean_ms: u64) -> Duration {
    Duration::from_millis(rng.random_range(mean_ms * 3 / 4..=mean_ms * 5 / 4))
}

fn running(c: &mut Cluster) -> Vec<u64> {
    let ids: Vec<u64> = c.servers.iter().map(|s| s.id).collect();
    ids.into_iter().filter(|id| c.running(*id)).collect()
}

/// The leader (id, term) as the running servers report it: the one most of them name.
pub fn leader_of(c: &mut Cluster) -> Option<(u64, u64)> {
    let mut admin = wire::Admin::new().ok()?;
    let ids = running(c);
    let mut votes: Vec<(u64, u64)> = Vec::new();
    for id in ids {
        let addr = c.servers[id as usize - 1].udp;
        if let Some(st) = admin.status(addr, Duration::from_millis(300))
            && st.leader_id != 0
            && c.running(st.leader_id)
        {
            votes.push((st.leader_id, st.term));
        }
    }
    let best = votes
        .iter()
        .max_by_key(|(id, term)| (votes.iter().filter(|v| v.0 == *id).count(), *term))?;
    Some(*best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_expands_to_every_kind_once_and_none_to_nothing() {
        let all = expand(&[Kind::All]);
        assert_eq!(all.len(), Kind::value_variants().len() - 2);
        for k in Kind::value_variants() {
            if !matches!(k, Kind::None | Kind::All) {
                assert_eq!(all.iter().filter(|x| *x == k).count(), 1, "{k:?}");
            }
        }
        assert!(expand(&[Kind::None]).is_empty());
        assert_eq!(
            expand(&[Kind::KillAgent, Kind::None, Kind::Proxy]),
            vec![Kind::KillAgent, Kind::Proxy]
        );
        assert_eq!(Kind::PartitionSplit.name(), "partition-split");
        assert_eq!(
            Kind::from_str("clock-jump", false),
            Ok(Kind::ClockJump),
            "names parse back"
        );
    }

    #[test]
    fn the_schedule_is_the_same_for_the_same_seed() {
        let start = Instant::now();
        let a = Nemesis::new(expand(&[Kind::All]), 7, 10_000, start);
        let b = Nemesis::new(expand(&[Kind::All]), 7, 10_000, start);
        let c = Nemesis::new(expand(&[Kind::All]), 8, 10_000, start);
        assert_eq!(a.next_at, b.next_at);
        assert_ne!(a.next_at, c.next_at);
        let first = a.next_at.unwrap().duration_since(start);
        assert!(first >= Duration::from_millis(7_500) && first <= Duration::from_millis(12_500));
    }
}
