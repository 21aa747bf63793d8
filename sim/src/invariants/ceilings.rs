//! **Grants respect the committed ceilings**, the rule the uniqueness
//! argument rests on (see `unid-consensus`'s crate docs):
//!
//! 1. a leader grants only below a ceiling it knows is committed in its own
//!    leadership: read with `ready_state` when it became leader, or the
//!    answer of a raise it committed itself;
//! 2. every grant of a leader is at or above every ceiling committed by any
//!    earlier leader — checked both ways: when the grant happens (against
//!    earlier leaders' commits seen so far) and when a commit is seen
//!    (against later leaders' grants made so far), since a deposed leader's
//!    commit may be observed after a newer leader started.
//!
//! A leader is identified as openraft does, by `(term, node id)`, and
//! "earlier" is that order: openraft 0.9 may elect two leaders in one term
//! (see [`super::one_leader`]); the greater node id is the later one.

use std::collections::BTreeMap;

use unid_proto::{Id, NodeId};

/// A leader: openraft's leader id `(term, node id)`, in its order.
pub type LeaderKey = (u64, NodeId);

/// Per sequence: the highest ceiling committed per leader, the ceiling each
/// leader knows, and the lowest grant per leader.
#[derive(Debug, Default)]
pub struct Ceilings {
    committed: BTreeMap<String, BTreeMap<LeaderKey, Id>>,
    known: BTreeMap<(String, LeaderKey), Id>,
    lowest_grant: BTreeMap<String, BTreeMap<LeaderKey, Id>>,
}

impl Ceilings {
    /// The leader `leader` read `ceiling` with `ready_state`.
    pub fn known(&mut self, sequence: &str, leader: LeaderKey, ceiling: Id) {
        let k = self.known.entry((sequence.to_owned(), leader)).or_insert(0);
        *k = (*k).max(ceiling);
    }

    /// The leader `leader` committed `ceiling`.
    pub fn committed(
        &mut self,
        sequence: &str,
        leader: LeaderKey,
        ceiling: Id,
    ) -> Result<(), String> {
        self.known(sequence, leader, ceiling);
        let c = self
            .committed
            .entry(sequence.to_owned())
            .or_default()
            .entry(leader)
            .or_insert(0);
        *c = (*c).max(ceiling);
        if let Some(grants) = self.lowest_grant.get(sequence) {
            let later = (
                std::ops::Bound::Excluded(leader),
                std::ops::Bound::Unbounded,
            );
            for (&l, &low) in grants.range(later) {
                if low < ceiling {
                    return Err(format!(
                        "{sequence}: leader {leader:?} committed ceiling {ceiling}, but later \
                         leader {l:?} already granted from {low}, below it"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks and records a grant of `first .. first + count` by `leader`.
    pub fn granted(
        &mut self,
        sequence: &str,
        leader: LeaderKey,
        first: Id,
        count: u64,
    ) -> Result<(), String> {
        let end = first.saturating_add(Id::from(count));
        match self.known.get(&(sequence.to_owned(), leader)).copied() {
            None => {
                return Err(format!(
                    "{sequence}: leader {leader:?} granted {first}+{count} with no ceiling read \
                     or committed in its leadership"
                ));
            }
            Some(k) if end > k => {
                return Err(format!(
                    "{sequence}: leader {leader:?} granted {first}+{count}, above the ceiling \
                     {k} it knows is committed"
                ));
            }
            Some(_) => {}
        }
        if let Some(commits) = self.committed.get(sequence)
            && let Some((&l, &c)) = commits.range(..leader).max_by_key(|(_, c)| **c)
            && first < c
        {
            return Err(format!(
                "{sequence}: leader {leader:?} granted {first}+{count}, below ceiling {c} \
                 committed by earlier leader {l:?}"
            ));
        }
        let low = self
            .lowest_grant
            .entry(sequence.to_owned())
            .or_default()
            .entry(leader)
            .or_insert(first);
        *low = (*low).min(first);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_below_an_earlier_commit_or_above_its_own_fails() {
        let mut c = Ceilings::default();
        c.known("s", (1, 1), 100);
        assert_eq!(c.granted("s", (1, 1), 1, 99), Ok(()));
        assert!(c.granted("s", (1, 1), 100, 1).is_err(), "above its ceiling");
        assert_eq!(c.committed("s", (1, 1), 200), Ok(()));
        c.known("s", (2, 3), 150);
        assert!(c.granted("s", (2, 3), 150, 1).is_err(), "below (1,1)'s 200");
        assert!(c.granted("s", (2, 2), 1, 1).is_err(), "no ceiling known");
    }

    #[test]
    fn a_late_commit_below_a_later_grant_fails() {
        let mut c = Ceilings::default();
        c.known("s", (4, 2), 100);
        assert_eq!(c.granted("s", (4, 2), 50, 10), Ok(()));
        assert!(
            c.committed("s", (4, 1), 60).is_err(),
            "(4,1) precedes (4,2)"
        );
        assert_eq!(c.committed("s", (5, 1), 60), Ok(()), "a later leader");
    }
}
