//! **At most one leader per term** — as unid needs it: at most one server
//! *grants* in any term (reaches the ready state: `ready_state` confirmed
//! by a quorum, the allocator installed).
//!
//! Finding (seeds 9 and 34 of the first sweep): openraft 0.9 without its
//! `single-term-leader` feature (unid's configuration) may **elect** two
//! leaders in one term. Its leader id is `(term, node id)`, totally ordered,
//! and a voter that voted for `(4, 1)` grants a vote to the greater
//! `(4, 2)` too; both can collect a majority. This is openraft's documented
//! design and safe in its model (log ids carry the whole leader id, so the
//! later leader is the greater leader id, not the greater term): the
//! smaller one can never commit once the voter moved on, so it never
//! becomes ready and never grants. The strict per-term count of elected
//! leaders is therefore kept as a statistic ([`OneLeader::shared_terms`]),
//! and the invariant checks what unid's safety uses: one granting leader
//! per term, and "earlier leader" meaning a smaller `(term, node id)` (see
//! [`super::ceilings`]).

use std::collections::BTreeMap;

use unid_proto::NodeId;

/// The leaders seen for each term: elected, and ready (granting).
#[derive(Debug, Default)]
pub struct OneLeader {
    elected: BTreeMap<u64, Vec<NodeId>>,
    ready: BTreeMap<u64, NodeId>,
    shared_terms: u64,
}

impl OneLeader {
    /// `server` believes it leads `term` (openraft's committed vote for it).
    pub fn elected(&mut self, server: NodeId, term: u64) {
        let e = self.elected.entry(term).or_default();
        if !e.contains(&server) {
            e.push(server);
            if e.len() == 2 {
                self.shared_terms += 1;
            }
        }
    }

    /// Checks and records that `server`, leading `term`, became ready to
    /// grant.
    pub fn ready(&mut self, server: NodeId, term: u64) -> Result<(), String> {
        match self.ready.get(&term) {
            Some(&other) if other != server => Err(format!(
                "servers {other} and {server} both grant in term {term}"
            )),
            Some(_) => Ok(()),
            None => {
                self.ready.insert(term, server);
                Ok(())
            }
        }
    }

    /// How many terms had an elected leader.
    pub fn terms(&self) -> u64 {
        self.elected.len() as u64
    }

    /// How many terms had two or more elected leaders (openraft's
    /// `(term, node id)` leader ids allow it).
    pub fn shared_terms(&self) -> u64 {
        self.shared_terms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_granting_leaders_in_one_term_fail_two_elected_are_counted() {
        let mut o = OneLeader::default();
        o.elected(1, 4);
        o.elected(2, 4);
        assert_eq!(o.shared_terms(), 1);
        assert_eq!(o.ready(2, 4), Ok(()));
        assert_eq!(o.ready(2, 4), Ok(()));
        assert!(o.ready(1, 4).is_err());
        assert_eq!(o.ready(1, 5), Ok(()));
    }
}
