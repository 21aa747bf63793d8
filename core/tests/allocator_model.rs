//! Model test of the leader allocator under random histories of several
//! leaders and a model of Raft commit.
//!
//! The model: the replicated state holds one committed ceiling per sequence,
//! applied with max semantics. Leaders of increasing terms become ready (in
//! the real system: `ready_ceilings` returns, after the term's first entry is
//! applied) and are built from the committed ceilings at that moment. A raise
//! proposed by a leader of term `t` commits only if no leader of a higher
//! term has become ready yet; otherwise it fails. Commit
//! and failure reports reach the proposing leader late, twice, or never.
//! Every leader, deposed or not (a partitioned old leader), keeps taking
//! grant requests and answers them from the ceilings it saw committed.
//!
//! Checked: no two grants overlap anywhere; every grant is inside its width
//! and below the replicated committed ceiling; each leader's grants of a
//! sequence are increasing; exhaustion is only reported when nothing is left;
//! each leader change skips at most one window of ids (the small-width loss
//! bound of `unid_core::sequence`).

use proptest::prelude::*;
use unid_core::{AllocatorConfig, CommittedCeiling, Error, LeaderAllocator, Raise};
use unid_proto::{Block, Id, SequenceName, Width};

const MS: u64 = 1000;

#[derive(Clone, Debug)]
enum Op {
    Elect,
    Grant {
        leader: usize,
        seq: usize,
        want: u64,
    },
    Poll {
        leader: usize,
    },
    PollFor {
        leader: usize,
        seq: usize,
    },
    Commit {
        pick: usize,
    },
    Deliver {
        pick: usize,
        twice: bool,
    },
    Lose {
        pick: usize,
    },
    Advance {
        ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Elect),
        8 => (any::<usize>(), any::<usize>(), 1..2000u64)
            .prop_map(|(leader, seq, want)| Op::Grant { leader, seq, want }),
        2 => any::<usize>().prop_map(|leader| Op::Poll { leader }),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(leader, seq)| Op::PollFor { leader, seq }),
        4 => any::<usize>().prop_map(|pick| Op::Commit { pick }),
        4 => (any::<usize>(), any::<bool>()).prop_map(|(pick, twice)| Op::Deliver { pick, twice }),
        1 => any::<usize>().prop_map(|pick| Op::Lose { pick }),
        3 => (0..200u64).prop_map(|ms| Op::Advance { ms }),
    ]
}

fn config() -> AllocatorConfig {
    AllocatorConfig {
        raise_lead_ms: 50,
        rate_tau_ms: 100,
        window_ids_min: 16,
        window_ids_max: 4000,
        block_ids_max: 700,
        raise_retry_ms: 1,
        sequences_max: 4,
    }
}

struct Leader {
    alloc: LeaderAllocator,
    term: u64,
    /// End of this leader's last grant, per sequence.
    last_end: Vec<Option<Id>>,
}

struct Proposal {
    leader: usize,
    term: u64,
    raise: Raise,
}

struct Report {
    leader: usize,
    raise: Raise,
    committed: bool,
}

struct Model {
    names: Vec<SequenceName>,
    widths: Vec<Width>,
    /// The replicated committed ceiling per sequence.
    committed: Vec<Id>,
    leaders: Vec<Leader>,
    highest_term: u64,
    proposals: Vec<Proposal>,
    reports: Vec<Report>,
    grants: Vec<Vec<Block>>,
    now_us: u64,
}

impl Model {
    fn new(starts: &[(Width, Id)]) -> Model {
        let names = (0..starts.len())
            .map(|i| SequenceName::new(&format!("s{i}")).unwrap())
            .collect();
        Model {
            names,
            widths: starts.iter().map(|s| s.0).collect(),
            committed: starts.iter().map(|s| s.1).collect(),
            leaders: Vec::new(),
            highest_term: 0,
            proposals: Vec::new(),
            reports: Vec::new(),
            grants: vec![Vec::new(); starts.len()],
            now_us: 0,
        }
    }

    fn elect(&mut self) {
        // The ids the outgoing leader had not granted below the committed
        // ceiling are lost: at most one window per sequence.
        if let Some(prev) = self.leaders.last() {
            for (si, name) in self.names.iter().enumerate() {
                let next = prev.alloc.sequence(name).unwrap().next;
                let lost = self.committed[si] - next;
                let window_max = config().window_ids_max_for(self.widths[si]) as u128;
                assert!(
                    lost <= window_max,
                    "leader change loses {lost} > {window_max} ids"
                );
            }
        }
        self.highest_term += 1;
        let ceilings = (0..self.names.len()).map(|i| CommittedCeiling {
            sequence: self.names[i].clone(),
            width: self.widths[i],
            ceiling: self.committed[i],
        });
        let alloc = LeaderAllocator::new(config(), self.now_us, ceilings).unwrap();
        // A new leader grants nothing until its first raise commits.
        for name in &self.names {
            let v = alloc.sequence(name).unwrap();
            assert!(!v.ready && v.next == v.committed_ceiling);
        }
        self.leaders.push(Leader {
            alloc,
            term: self.highest_term,
            last_end: vec![None; self.names.len()],
        });
    }

    fn seq_index(&self, name: &SequenceName) -> usize {
        self.names.iter().position(|n| n == name).unwrap()
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Elect => self.elect(),
            Op::Advance { ms } => self.now_us += ms * MS,
            Op::Grant { leader, seq, want } => {
                let li = leader % self.leaders.len();
                let si = seq % self.names.len();
                let width = self.widths[si];
                let l = &mut self.leaders[li];
                match l.alloc.grant(self.now_us, &self.names[si], want) {
                    Ok(b) => {
                        assert!(b.count() >= 1 && b.count() <= want);
                        assert!(b.end() <= width.limit(), "outside the width");
                        assert!(b.end() <= self.committed[si], "above the committed ceiling");
                        if let Some(end) = l.last_end[si] {
                            assert!(b.first() >= end, "a leader's grants must increase");
                        }
                        l.last_end[si] = Some(b.end());
                        self.grants[si].push(b);
                    }
                    Err(Error::Exhausted) => {
                        assert_eq!(l.alloc.ids_left(&self.names[si]), Some(0));
                    }
                    Err(Error::NotReady) => {
                        assert!(!l.alloc.sequence(&self.names[si]).unwrap().ready);
                    }
                    Err(Error::AwaitingRaise) => {
                        assert_eq!(l.alloc.headroom_ids(&self.names[si]), Some(0));
                    }
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            Op::Poll { leader } => {
                let li = leader % self.leaders.len();
                let l = &mut self.leaders[li];
                while let Some(raise) = l.alloc.poll_raise(self.now_us) {
                    let si = self
                        .names
                        .iter()
                        .position(|n| *n == raise.sequence)
                        .unwrap();
                    assert!(raise.ceiling <= self.widths[si].limit());
                    self.proposals.push(Proposal {
                        leader: li,
                        term: l.term,
                        raise,
                    });
                }
            }
            Op::PollFor { leader, seq } => {
                let li = leader % self.leaders.len();
                let si = seq % self.names.len();
                let l = &mut self.leaders[li];
                if let Some(raise) = l.alloc.poll_raise_for(self.now_us, &self.names[si]) {
                    assert_eq!(raise.sequence, self.names[si]);
                    assert!(raise.ceiling <= self.widths[si].limit());
                    self.proposals.push(Proposal {
                        leader: li,
                        term: l.term,
                        raise,
                    });
                }
            }
            Op::Commit { pick } => {
                if self.proposals.is_empty() {
                    return;
                }
                let p = self.proposals.remove(pick % self.proposals.len());
                let committed = p.term == self.highest_term;
                if committed {
                    let si = self.seq_index(&p.raise.sequence);
                    self.committed[si] = self.committed[si].max(p.raise.ceiling);
                }
                self.reports.push(Report {
                    leader: p.leader,
                    raise: p.raise,
                    committed,
                });
            }
            Op::Deliver { pick, twice } => {
                if self.reports.is_empty() {
                    return;
                }
                let r = self.reports.remove(pick % self.reports.len());
                let l = &mut self.leaders[r.leader];
                for _ in 0..if twice { 2 } else { 1 } {
                    if r.committed {
                        l.alloc
                            .on_raise_committed(&r.raise.sequence, r.raise.ceiling)
                            .unwrap();
                    } else {
                        l.alloc
                            .on_raise_failed(self.now_us, &r.raise.sequence, r.raise.ceiling)
                            .unwrap();
                    }
                }
            }
            Op::Lose { pick } => {
                if !self.reports.is_empty() {
                    let at = pick % self.reports.len();
                    self.reports.remove(at);
                }
            }
        }
    }

    fn check_no_overlap(&self) {
        for (si, grants) in self.grants.iter().enumerate() {
            let mut sorted = grants.clone();
            sorted.sort_by_key(|b| b.first());
            for pair in sorted.windows(2) {
                assert!(
                    !pair[0].overlaps(&pair[1]),
                    "seq {si}: {:?} overlaps {:?}",
                    pair[0],
                    pair[1]
                );
            }
        }
    }
}

fn starts() -> impl Strategy<Value = Vec<(Width, Id)>> {
    (0..2000u128, 0..100_000u128, 0..u64::MAX as u128).prop_map(|(a, b, c)| {
        vec![
            // A 2-byte sequence that the history can exhaust.
            (Width::W2, Width::W2.limit() - 3000 - a),
            // A 4-byte one close to its limit.
            (Width::W4, Width::W4.limit() - 20_000 - b),
            // An 8-byte one anywhere.
            (Width::W8, c),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn no_id_is_granted_twice(starts in starts(), ops in prop::collection::vec(op(), 1..300)) {
        let mut m = Model::new(&starts);
        m.elect();
        for op in ops {
            m.apply(op);
        }
        m.check_no_overlap();
    }

    /// Same, but leaders change often and most reports arrive: more
    /// deposed-but-granting leaders with live ceilings.
    #[test]
    fn no_id_is_granted_twice_under_churn(
        starts in starts(),
        rounds in prop::collection::vec(prop::collection::vec(op(), 1..30), 1..20),
    ) {
        let mut m = Model::new(&starts);
        for round in rounds {
            m.elect();
            // Give the new leader its first raise most of the time.
            m.apply(Op::Poll { leader: m.leaders.len() - 1 });
            for op in round {
                m.apply(op);
                m.apply(Op::Commit { pick: 0 });
                m.apply(Op::Deliver { pick: 0, twice: false });
            }
        }
        m.check_no_overlap();
    }
}

/// Without leader changes and with prompt commits, one leader drains every
/// sequence completely: nothing lost, nothing repeated.
#[test]
fn one_leader_with_prompt_commits_loses_nothing() {
    let starts = [(Width::W2, 1), (Width::W4, Width::W4.limit() - 50_000)];
    let mut m = Model::new(&starts);
    m.elect();
    let mut exhausted = [false; 2];
    while !exhausted.iter().all(|e| *e) {
        m.apply(Op::Advance { ms: 1 });
        m.apply(Op::Poll { leader: 0 });
        while !m.proposals.is_empty() {
            m.apply(Op::Commit { pick: 0 });
            m.apply(Op::Deliver {
                pick: 0,
                twice: false,
            });
        }
        for (si, done) in exhausted.iter_mut().enumerate() {
            m.apply(Op::Grant {
                leader: 0,
                seq: si,
                want: 500,
            });
            *done = m.leaders[0].alloc.ids_left(&m.names[si]) == Some(0);
        }
    }
    m.check_no_overlap();
    for (si, (width, start)) in starts.iter().enumerate() {
        let total: u128 = m.grants[si].iter().map(|b| b.count() as u128).sum();
        assert_eq!(total, width.limit() - start);
    }
}
