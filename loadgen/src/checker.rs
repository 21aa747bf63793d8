//! The grant checker: given every block the simulated agents received, finds ids granted
//! twice, ids outside the width, agents whose blocks went down, and requests never answered;
//! given every id the ring consumers took, ids taken twice (among them and with the
//! simulated agents' blocks), ids outside the width and consumers whose ids went down; given
//! the failovers, blocks granted after a new leader took over that are not above every block
//! granted before; and it counts the ids lost (granted and never used, or never granted).
//!
//! It knows nothing about sockets or servers; `main` feeds it what the agents recorded.

use std::net::SocketAddr;

use unid_proto::{Id, Width};

/// Most violations kept with their description (the count goes on).
pub const VIOLATIONS_KEPT_MAX: usize = 32;

/// One block an agent received.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The simulated agent (index within this run).
    pub agent: u32,
    /// The request's sequence number (a retransmit keeps it).
    pub seq: u64,
    /// The first id of the block.
    pub first: Id,
    /// How many ids.
    pub count: u64,
    /// The width the grant said.
    pub width: Width,
    /// When it arrived, in microseconds since the run started.
    pub t_us: u64,
    /// The leader epoch in its header.
    pub epoch: u64,
    /// The server it came from.
    pub from: SocketAddr,
    /// The end of the highest block this agent had received when it first sent the request:
    /// the block must start at or above it.
    pub floor: Id,
    /// When the request was first sent, in microseconds since the run started.
    pub sent_us: u64,
}

/// A run of consecutive ids one ring consumer received, in the order received.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Run {
    /// The consumer (index within this run).
    pub consumer: u32,
    /// The first id.
    pub first: Id,
    /// How many consecutive ids.
    pub count: u64,
    /// When the first of them arrived, in microseconds since the run started.
    pub t_us: u64,
}

impl Run {
    /// One past the last id.
    pub fn end(&self) -> Id {
        self.first.saturating_add(Id::from(self.count))
    }
}

/// A leader change the nemesis caused.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Failover {
    /// When the old leader was killed, stopped or cut off (µs since the start).
    pub fault_us: u64,
    /// When the first grant by another server (the new leader) arrived, if one did.
    pub new_first_grant_us: Option<u64>,
}

impl Grant {
    /// One past the last id (saturating: a malformed count cannot overflow here).
    pub fn end(&self) -> Id {
        self.first.saturating_add(Id::from(self.count))
    }
}

/// A request with no grant and no final error when the run ended.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Unanswered {
    /// The agent.
    pub agent: u32,
    /// The request's sequence number.
    pub seq: u64,
    /// When it was first sent, in microseconds since the run started.
    pub sent_us: u64,
}

/// What the checker found.
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    /// Distinct grants checked (a retransmit answered twice with the same block counts once).
    pub grants: u64,
    /// Ids in those grants.
    pub ids: Id,
    /// How many violations.
    pub violations: u64,
    /// The first [`VIOLATIONS_KEPT_MAX`] violations, described.
    pub described: Vec<String>,
}

impl Verdict {
    /// No violation.
    pub fn passed(&self) -> bool {
        self.violations == 0
    }

    /// Adds `other`'s violations (with their descriptions, up to the limit) to this one.
    pub fn merge_violations(&mut self, other: &Verdict) {
        self.violations += other.violations;
        for d in &other.described {
            if self.described.len() < VIOLATIONS_KEPT_MAX {
                self.described.push(d.clone());
            }
        }
    }

    fn violation(&mut self, text: String) {
        self.violations += 1;
        if self.described.len() < VIOLATIONS_KEPT_MAX {
            self.described.push(text);
        }
    }
}

/// Checks `grants` (any order; sorted in place) of a sequence of `width`, and the requests
/// left `unanswered`.
pub fn check(width: Width, grants: &mut [Grant], unanswered: &[Unanswered]) -> Verdict {
    let mut v = Verdict::default();
    for u in unanswered {
        v.violation(format!(
            "agent {}: request seq {} (first sent at {:.3} s) got neither a grant nor an error",
            u.agent,
            u.seq,
            u.sent_us as f64 / 1e6
        ));
    }
    grants.sort_by_key(|g| (g.first, g.count, g.agent, g.seq));
    let mut prev: Option<Grant> = None;
    let mut max_end: Id = 0;
    let mut max_end_grant: Option<Grant> = None;
    for g in grants.iter() {
        // The same answer twice (a retransmit answered from the reply cache, a duplicated
        // datagram) is one grant.
        if let Some(p) = prev
            && (p.first, p.count, p.agent, p.seq) == (g.first, g.count, g.agent, g.seq)
        {
            continue;
        }
        prev = Some(*g);
        v.grants += 1;
        v.ids = v.ids.saturating_add(Id::from(g.count));
        if g.width != width {
            v.violation(format!(
                "agent {} seq {}: grant says width {} but the sequence has width {width}",
                g.agent, g.seq, g.width
            ));
        }
        if g.count == 0 || g.end() > width.limit() {
            v.violation(format!(
                "agent {} seq {}: block {}+{} is outside width {width} (ids must be below {})",
                g.agent,
                g.seq,
                g.first,
                g.count,
                width.limit()
            ));
        }
        if g.first < g.floor {
            v.violation(format!(
                "agent {} seq {}: block {}+{} (epoch {}, from {}) is below {}, the end of a block \
                 the agent already had when it sent the request",
                g.agent, g.seq, g.first, g.count, g.epoch, g.from, g.floor
            ));
        }
        if g.first < max_end
            && let Some(o) = max_end_grant
        {
            v.violation(format!(
                "id {} granted twice: agent {} seq {} got {}+{} (epoch {}, from {}) and agent {} \
                 seq {} got {}+{} (epoch {}, from {})",
                g.first,
                o.agent,
                o.seq,
                o.first,
                o.count,
                o.epoch,
                o.from,
                g.agent,
                g.seq,
                g.first,
                g.count,
                g.epoch,
                g.from
            ));
        }
        if g.end() > max_end {
            max_end = g.end();
            max_end_grant = Some(*g);
        }
    }
    v
}

/// Checks the ring consumers' ids (`runs`, each consumer's in the order received) together
/// with the simulated agents' blocks (`grants`, as [`check`] left them: sorted by id): every
/// id inside `width`, each consumer's ids strictly increasing, no id received twice by any two
/// consumers or a consumer and a simulated agent.
pub fn check_consumers(width: Width, grants: &[Grant], runs: &[Vec<Run>]) -> Verdict {
    let mut v = Verdict::default();
    // (first, end, owner): owner < 0 is a simulated agent's block.
    let mut spans: Vec<(Id, Id, i64, u64)> = Vec::new();
    let mut prev_grant: Option<(Id, u64, u32, u64)> = None;
    for g in grants {
        let key = (g.first, g.count, g.agent, g.seq);
        if prev_grant == Some(key) {
            continue;
        }
        prev_grant = Some(key);
        spans.push((g.first, g.end(), -1 - i64::from(g.agent), g.seq));
    }
    for consumer in runs {
        let mut last: Option<Run> = None;
        for r in consumer {
            v.grants += 1;
            v.ids = v.ids.saturating_add(Id::from(r.count));
            if r.count == 0 || r.end() > width.limit() {
                v.violation(format!(
                    "consumer {}: ids {}+{} (at {:.3} s) are outside width {width} (ids must be \
                     below {})",
                    r.consumer,
                    r.first,
                    r.count,
                    r.t_us as f64 / 1e6,
                    width.limit()
                ));
            }
            if let Some(l) = last
                && r.first < l.end()
            {
                v.violation(format!(
                    "consumer {}: id {} (at {:.3} s) is not above {}, which it received before \
                     (at {:.3} s): its ids decreased",
                    r.consumer,
                    r.first,
                    r.t_us as f64 / 1e6,
                    l.end() - 1,
                    l.t_us as f64 / 1e6
                ));
            }
            last = Some(*r);
            spans.push((r.first, r.end(), i64::from(r.consumer), r.t_us));
        }
    }
    spans.sort_unstable();
    let who = |owner: i64, x: u64| {
        if owner < 0 {
            format!("simulated agent {} (request seq {x})", -1 - owner)
        } else {
            format!("consumer {owner} (at {:.3} s)", x as f64 / 1e6)
        }
    };
    let mut reach: Option<(Id, i64, u64, Id)> = None; // (end, owner, x, first)
    for &(first, end, owner, x) in &spans {
        if let Some((r_end, r_owner, r_x, r_first)) = reach
            && first < r_end
        {
            v.violation(format!(
                "id {first} received twice: by {} (ids {r_first}..{r_end}) and by {} (ids \
                 {first}..{end})",
                who(r_owner, r_x),
                who(owner, x)
            ));
        }
        if reach.is_none_or(|(r_end, ..)| end > r_end) {
            reach = Some((end, owner, x, first));
        }
    }
    v
}

/// The rule that a new leader starts above the old one: for each failover, every grant whose
/// request was first sent after the new leader's first grant must start at or above the end
/// of every block granted (received) before the fault.
pub fn check_failovers(grants: &[Grant], failovers: &[Failover]) -> Verdict {
    let mut v = Verdict::default();
    for (i, f) in failovers.iter().enumerate() {
        let Some(new_us) = f.new_first_grant_us else {
            continue;
        };
        let Some(before) = grants
            .iter()
            .filter(|g| g.t_us < f.fault_us)
            .max_by_key(|g| g.end())
        else {
            continue;
        };
        v.grants += 1;
        for g in grants.iter().filter(|g| g.sent_us > new_us) {
            if g.first < before.end() {
                v.violation(format!(
                    "failover {} (fault at {:.3} s, new leader's first grant at {:.3} s): agent \
                     {} seq {} sent at {:.3} s got {}+{} from {}, below {}, the end of a block \
                     granted before the fault (agent {} seq {}, from {})",
                    i + 1,
                    f.fault_us as f64 / 1e6,
                    new_us as f64 / 1e6,
                    g.agent,
                    g.seq,
                    g.sent_us as f64 / 1e6,
                    g.first,
                    g.count,
                    g.from,
                    before.end(),
                    before.agent,
                    before.seq,
                    before.from
                ));
            }
        }
    }
    v
}

/// When a fault was in force, and which real agents it killed when (µs since the start).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultSpan {
    /// When it started.
    pub start_us: u64,
    /// When it was healed (`u64::MAX`: never).
    pub heal_us: u64,
    /// Real agents it killed (SIGKILL, with whatever their rings held), and when.
    pub agents_killed: Vec<(usize, u64)>,
}

/// Ids lost, counted per fault. `granted` are the blocks the servers sent (as seen on the
/// wire), each with the real agent it went to (`None`: a simulated agent or unknown); `used`
/// the spans `(first, end)` that reached a simulated agent or a consumer; `faults` in the
/// order they started.
///
/// - An id of a real agent's block that no consumer took was lost when that agent was killed
///   with it in its ring: charged to the first fault that killed the agent after the grant.
/// - Any other id granted and never used (an answer lost on the way, a request answered twice)
///   is charged to the fault in force when it was granted.
/// - An id never granted (a gap between blocks: an old leader's unused window) is charged to
///   the last fault started before the block above the gap.
///
/// What matches no fault (slot `faults.len()`: left in rings at the end, lost to the steady
/// datagram faults, before any fault) is counted apart. Returns (unused, never granted).
pub fn lost_per_fault(
    granted: &[(Grant, Option<usize>)],
    used: &mut [(Id, Id)],
    faults: &[FaultSpan],
) -> (Vec<Id>, Vec<Id>) {
    let none = faults.len();
    let mut unused = vec![0 as Id; none + 1];
    let mut never = vec![0 as Id; none + 1];
    let mut blocks: Vec<(Id, Id, u64, Option<usize>)> = granted
        .iter()
        .map(|(g, a)| (g.first, g.end(), g.t_us, *a))
        .collect();
    blocks.sort_unstable();
    blocks.dedup_by_key(|b| (b.0, b.1));
    used.sort_unstable();
    let started_before = |t: u64| faults.iter().rposition(|f| f.start_us < t);
    let mut u = 0usize;
    let mut reach: Option<Id> = None;
    for &(first, end, t, agent) in &blocks {
        if let Some(r) = reach
            && first > r
        {
            never[started_before(t).unwrap_or(none)] += first - r;
        }
        reach = Some(reach.map_or(end, |r| r.max(end)));
        // Used ids inside [first, end).
        while u < used.len() && used[u].1 <= first {
            u += 1;
        }
        let mut covered: Id = 0;
        let mut k = u;
        while k < used.len() && used[k].0 < end {
            covered += used[k].1.min(end) - used[k].0.max(first);
            k += 1;
        }
        let lost = (end - first).saturating_sub(covered);
        if lost == 0 {
            continue;
        }
        let slot = match agent {
            Some(a) => faults
                .iter()
                .enumerate()
                .filter_map(|(i, f)| {
                    f.agents_killed
                        .iter()
                        .filter(|(x, at)| *x == a && *at >= t)
                        .map(|(_, at)| (*at, i))
                        .min()
                })
                .min()
                .map_or(none, |(_, i)| i),
            None => faults
                .iter()
                .rposition(|f| f.start_us <= t && t < f.heal_us)
                .unwrap_or(none),
        };
        unused[slot] += lost;
    }
    (unused, never)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(agent: u32, seq: u64, first: Id, count: u64) -> Grant {
        Grant {
            agent,
            seq,
            first,
            count,
            width: Width::W8,
            t_us: seq * 10,
            epoch: 1,
            from: SocketAddr::from(([127, 0, 0, 1], 7400)),
            floor: 0,
            sent_us: seq * 10 - 5,
        }
    }

    fn run(consumer: u32, first: Id, count: u64, t_us: u64) -> Run {
        Run {
            consumer,
            first,
            count,
            t_us,
        }
    }

    #[test]
    fn consumers_with_disjoint_increasing_ids_pass() {
        let mut g = vec![grant(0, 1, 1, 100)];
        let _ = check(Width::W8, &mut g, &[]);
        let runs = vec![
            vec![run(0, 101, 10, 5), run(0, 200, 5, 9)],
            vec![run(1, 111, 20, 6)],
        ];
        let v = check_consumers(Width::W8, &g, &runs);
        assert!(v.passed(), "{:?}", v.described);
        assert_eq!(v.ids, 35);
    }

    #[test]
    fn an_id_taken_twice_by_consumers_or_a_consumer_and_an_agent_fails() {
        let mut g = vec![grant(0, 1, 1, 100)];
        let _ = check(Width::W8, &mut g, &[]);
        let runs = vec![
            vec![run(0, 150, 10, 5)],
            vec![run(1, 155, 1, 6)],
            vec![run(2, 90, 20, 7)],
        ];
        let v = check_consumers(Width::W8, &g, &runs);
        assert_eq!(v.violations, 2, "{:?}", v.described);
        let all = v.described.join("\n");
        assert!(
            all.contains("id 155 received twice: by consumer 0"),
            "{all}"
        );
        assert!(
            all.contains("id 90 received twice: by simulated agent 0"),
            "{all}"
        );
    }

    #[test]
    fn a_consumer_whose_ids_decrease_or_leave_the_width_fails() {
        let runs = vec![vec![
            run(0, 500, 10, 5),
            run(0, 505, 1, 6),
            run(0, 65_535, 1, 7),
        ]];
        let v = check_consumers(Width::W2, &[], &runs);
        let all = v.described.join("\n");
        assert!(
            all.contains("consumer 0: id 505 (at 0.000 s) is not above 509"),
            "{all}"
        );
        assert!(all.contains("outside width 2"), "{all}");
        // 505 is also received twice by consumer 0 itself.
        assert_eq!(v.violations, 3, "{all}");
    }

    #[test]
    fn a_grant_after_a_failover_below_an_earlier_block_fails() {
        // Before the fault at 100 µs: blocks up to 300. The new leader's first grant at 200.
        let mut before = grant(0, 1, 201, 100);
        before.t_us = 90;
        let mut first_new = grant(1, 2, 1000, 10);
        (first_new.sent_us, first_new.t_us) = (150, 200);
        // Sent before the new leader's first grant: not covered by the rule.
        let mut in_flight = grant(2, 3, 100, 10);
        (in_flight.sent_us, in_flight.t_us) = (150, 250);
        let mut ok = grant(3, 4, 301, 10);
        (ok.sent_us, ok.t_us) = (210, 260);
        let mut bad = grant(4, 5, 250, 10);
        (bad.sent_us, bad.t_us) = (220, 270);
        let grants = [before, first_new, in_flight, ok, bad];
        let f = [Failover {
            fault_us: 100,
            new_first_grant_us: Some(200),
        }];
        let v = check_failovers(&grants, &f);
        assert_eq!(v.violations, 1, "{:?}", v.described);
        assert!(
            v.described[0].contains("agent 4 seq 5 sent at 0.000 s got 250+10"),
            "{v:?}"
        );
        assert!(v.described[0].contains("below 301"), "{v:?}");
        let none = [Failover {
            fault_us: 100,
            new_first_grant_us: None,
        }];
        assert!(check_failovers(&grants, &none).passed());
    }

    #[test]
    fn lost_ids_are_charged_to_the_agent_kill_the_fault_in_force_or_before_a_gap() {
        // Fault 0 from 100 to 150 µs; fault 1 from 300 to 350, killing real agent 0 at 300.
        let faults = [
            FaultSpan {
                start_us: 100,
                heal_us: 150,
                agents_killed: vec![],
            },
            FaultSpan {
                start_us: 300,
                heal_us: 350,
                agents_killed: vec![(0, 300)],
            },
        ];
        // Real agent 0's block granted at 10: 40 unused, lost at the kill → fault 1.
        let mut a = grant(0, 1, 1, 100);
        a.t_us = 10;
        // A simulated agent's block granted at 120 (fault 0 in force), unused → fault 0; the
        // gap 101..1001 (900) before it → fault 0 too (the last started before it).
        let mut b = grant(1, 2, 1001, 10);
        b.t_us = 120;
        // Real agent 1's block at 400 (never killed), unused → no fault.
        let mut c = grant(2, 3, 1011, 10);
        c.t_us = 400;
        // A simulated agent's block at 200 (no fault in force), unused → no fault.
        let mut d = grant(3, 4, 1021, 5);
        d.t_us = 200;
        let mut used = vec![(1, 61)];
        let granted = [(a, Some(0)), (b, None), (c, Some(1)), (d, None)];
        let (unused, never) = lost_per_fault(&granted, &mut used, &faults);
        assert_eq!(unused, vec![10, 40, 15]);
        assert_eq!(never, vec![900, 0, 0]);
    }

    #[test]
    fn disjoint_blocks_pass_and_duplicate_answers_count_once() {
        let mut g = vec![
            grant(1, 2, 200, 100),
            grant(0, 1, 1, 100),
            grant(1, 1, 101, 99),
            grant(1, 1, 101, 99), // the same answer received twice
        ];
        let v = check(Width::W8, &mut g, &[]);
        assert!(v.passed(), "{:?}", v.described);
        assert_eq!(v.grants, 3);
        assert_eq!(v.ids, 299);
    }

    #[test]
    fn overlapping_blocks_across_agents_fail() {
        let mut g = vec![
            grant(0, 1, 1, 100),
            grant(1, 1, 101, 100),
            grant(2, 7, 150, 10),
        ];
        let v = check(Width::W8, &mut g, &[]);
        assert_eq!(v.violations, 1, "{:?}", v.described);
        assert!(v.described[0].contains("id 150 granted twice"), "{v:?}");
        assert!(v.described[0].contains("agent 1 seq 1"), "{v:?}");
        assert!(v.described[0].contains("agent 2 seq 7"), "{v:?}");
    }

    #[test]
    fn a_block_contained_in_an_earlier_larger_one_fails() {
        // The overlap is with the block that reaches furthest, not only the previous one.
        let mut g = vec![
            grant(0, 1, 1, 1000),
            grant(1, 1, 10, 5),
            grant(2, 1, 500, 1),
        ];
        let v = check(Width::W8, &mut g, &[]);
        assert_eq!(v.violations, 2, "{:?}", v.described);
    }

    #[test]
    fn out_of_width_wrong_width_decrease_and_unanswered_fail() {
        let mut over = grant(0, 1, 65_530, 10);
        over.width = Width::W2;
        let mut below = grant(1, 2, 10, 5);
        below.floor = 100;
        below.width = Width::W2;
        let wrong = grant(2, 3, 1000, 1); // says W8
        let mut g = vec![over, below, wrong];
        let unanswered = [Unanswered {
            agent: 3,
            seq: 9,
            sent_us: 1_500_000,
        }];
        let v = check(Width::W2, &mut g, &unanswered);
        assert_eq!(v.violations, 4, "{:?}", v.described);
        let all = v.described.join("\n");
        assert!(all.contains("outside width 2"), "{all}");
        assert!(all.contains("is below 100"), "{all}");
        assert!(all.contains("says width 8"), "{all}");
        assert!(
            all.contains("seq 9 (first sent at 1.500 s) got neither"),
            "{all}"
        );
    }
}
