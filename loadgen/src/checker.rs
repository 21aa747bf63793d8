//! The grant checker: given every block the simulated agents received, finds ids granted
//! twice, ids outside the width, agents whose blocks went down, and requests never answered.
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
        }
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
