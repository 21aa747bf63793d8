//! **Grants respect the committed ceilings**, the rule the uniqueness
//! argument rests on (see `unid-consensus`'s crate docs):
//!
//! 1. a leader of term `t` grants only below a ceiling it knows is committed
//!    in `t`: read with `ready_state` when it became leader, or the answer
//!    of a raise it committed itself;
//! 2. every grant of term `t` is at or above every ceiling committed by the
//!    leader of any earlier term — checked both ways: when the grant
//!    happens (against earlier terms' commits seen so far) and when a commit
//!    is seen (against later terms' grants made so far), since a deposed
//!    leader's commit may be observed after a newer leader started.

use std::collections::BTreeMap;

use unid_proto::Id;

/// Per sequence: the start, the highest ceiling committed per term, the
/// ceiling each term's leader knows, and the lowest grant per term.
#[derive(Debug, Default)]
pub struct Ceilings {
    start: BTreeMap<String, Id>,
    committed: BTreeMap<String, BTreeMap<u64, Id>>,
    known: BTreeMap<(String, u64), Id>,
    lowest_grant: BTreeMap<String, BTreeMap<u64, Id>>,
}

impl Ceilings {
    /// A sequence created with ceiling `start`.
    pub fn created(&mut self, sequence: &str, start: Id) {
        self.start.insert(sequence.to_owned(), start);
    }

    /// The leader of `term` read `ceiling` with `ready_state`.
    pub fn known(&mut self, sequence: &str, term: u64, ceiling: Id) {
        let k = self.known.entry((sequence.to_owned(), term)).or_insert(0);
        *k = (*k).max(ceiling);
    }

    /// The leader of `term` committed `ceiling`.
    pub fn committed(&mut self, sequence: &str, term: u64, ceiling: Id) -> Result<(), String> {
        self.known(sequence, term, ceiling);
        let c = self
            .committed
            .entry(sequence.to_owned())
            .or_default()
            .entry(term)
            .or_insert(0);
        *c = (*c).max(ceiling);
        if let Some(grants) = self.lowest_grant.get(sequence) {
            for (&t, &low) in grants.range(term + 1..) {
                if low < ceiling {
                    return Err(format!(
                        "{sequence}: term {term} committed ceiling {ceiling}, but term {t} \
                         already granted from {low}, below it"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks and records a grant of `first .. first + count` in `term`.
    pub fn granted(
        &mut self,
        sequence: &str,
        term: u64,
        first: Id,
        count: u64,
    ) -> Result<(), String> {
        let end = first.saturating_add(Id::from(count));
        let known = self.known.get(&(sequence.to_owned(), term)).copied();
        match known {
            None => {
                return Err(format!(
                    "{sequence}: term {term} granted {first}+{count} with no ceiling read or \
                     committed in its term"
                ));
            }
            Some(k) if end > k => {
                return Err(format!(
                    "{sequence}: term {term} granted {first}+{count}, above the ceiling {k} it \
                     knows is committed"
                ));
            }
            Some(_) => {}
        }
        if let Some(commits) = self.committed.get(sequence)
            && let Some((&t, &c)) = commits.range(..term).max_by_key(|(_, c)| **c)
            && first < c
        {
            return Err(format!(
                "{sequence}: term {term} granted {first}+{count}, below ceiling {c} committed \
                 in earlier term {t}"
            ));
        }
        let low = self
            .lowest_grant
            .entry(sequence.to_owned())
            .or_default()
            .entry(term)
            .or_insert(first);
        *low = (*low).min(first);
        Ok(())
    }
}
