//! **Each consumer's ids increase**: every range a consumer takes starts
//! above the last id it took before (per sequence), across agent restarts
//! and leader changes.

use std::collections::BTreeMap;

use unid_proto::Id;

/// The last id each consumer took, per sequence.
#[derive(Debug, Default)]
pub struct Increasing {
    last: BTreeMap<(usize, String), Id>,
}

impl Increasing {
    /// Checks and records that `consumer` took `first .. first + count`.
    pub fn consumed(
        &mut self,
        consumer: usize,
        sequence: &str,
        first: Id,
        count: u64,
    ) -> Result<(), String> {
        if count == 0 {
            return Err(format!("consumer {consumer}: an empty range at {first}"));
        }
        let last = first + Id::from(count) - 1;
        let key = (consumer, sequence.to_owned());
        if let Some(&prev) = self.last.get(&key)
            && first <= prev
        {
            return Err(format!(
                "consumer {consumer} ({sequence}): took {first}+{count} after {prev}"
            ));
        }
        self.last.insert(key, last);
        Ok(())
    }
}
