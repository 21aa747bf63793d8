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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_not_above_the_last_id_fails() {
        let mut i = Increasing::default();
        assert_eq!(i.consumed(1, "s", 10, 5), Ok(()));
        assert!(i.consumed(1, "s", 14, 1).is_err());
        assert_eq!(i.consumed(1, "s", 15, 1), Ok(()));
        assert_eq!(i.consumed(2, "s", 1, 1), Ok(()), "another consumer");
        assert!(i.consumed(2, "s", 5, 0).is_err(), "empty");
    }
}
