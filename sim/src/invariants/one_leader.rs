//! **At most one leader per term**, as the servers themselves report it
//! (each server's leader watch naming itself).

use std::collections::BTreeMap;

use unid_proto::NodeId;

/// The leader seen for each term.
#[derive(Debug, Default)]
pub struct OneLeader {
    leaders: BTreeMap<u64, NodeId>,
}

impl OneLeader {
    /// Checks and records that `server` believes it leads `term`.
    pub fn leader(&mut self, server: NodeId, term: u64) -> Result<(), String> {
        match self.leaders.get(&term) {
            Some(&other) if other != server => Err(format!(
                "servers {other} and {server} both lead term {term}"
            )),
            Some(_) => Ok(()),
            None => {
                self.leaders.insert(term, server);
                Ok(())
            }
        }
    }

    /// How many terms had a leader.
    pub fn terms(&self) -> u64 {
        self.leaders.len() as u64
    }
}
