//! **No id is granted twice**: every block granted, by any server in any
//! term, is disjoint from every block granted before it in its sequence.

use std::collections::BTreeMap;

use unid_proto::{Id, NodeId};

/// Every block granted so far, per sequence: first → (end, server, term).
#[derive(Debug, Default)]
pub struct Unique {
    granted: BTreeMap<String, BTreeMap<Id, (Id, NodeId, u64)>>,
}

impl Unique {
    /// Checks and records a grant of `first .. first + count`.
    pub fn granted(
        &mut self,
        sequence: &str,
        server: NodeId,
        term: u64,
        first: Id,
        count: u64,
    ) -> Result<(), String> {
        let end = first.saturating_add(Id::from(count));
        let blocks = self.granted.entry(sequence.to_owned()).or_default();
        // The block starting at or before `first`, and the first one after.
        let before = blocks.range(..=first).next_back();
        let after = blocks.range(first..).next();
        for (&f, &(e, s, t)) in before.into_iter().chain(after) {
            if f < end && first < e {
                return Err(format!(
                    "{sequence}: {first}+{count} by server {server} in term {term} overlaps \
                     {f}+{} granted by server {s} in term {t}",
                    e - f
                ));
            }
        }
        blocks.insert(first, (end, server, term));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_blocks_fail_adjacent_ones_pass() {
        let mut u = Unique::default();
        assert_eq!(u.granted("s", 1, 1, 100, 10), Ok(()));
        assert_eq!(u.granted("s", 1, 1, 110, 10), Ok(()), "adjacent above");
        assert_eq!(u.granted("s", 2, 2, 90, 10), Ok(()), "adjacent below");
        assert!(u.granted("s", 2, 2, 119, 1).is_err(), "last id of a block");
        assert!(u.granted("s", 2, 2, 95, 10).is_err(), "straddles two");
        assert!(u.granted("s", 3, 3, 50, 100).is_err(), "covers all");
        assert_eq!(u.granted("t", 3, 3, 100, 10), Ok(()), "another sequence");
    }
}
