//! **Ids within width**: every granted block is non-empty, starts at or
//! above its sequence's start, and ends at or below the width's limit (the
//! all-ones value is reserved and never issued).

use std::collections::BTreeMap;

use unid_proto::{Id, Width};

/// Each sequence's width and start.
#[derive(Debug, Default)]
pub struct InWidth {
    sequences: BTreeMap<String, (Width, Id)>,
}

impl InWidth {
    /// Declares a sequence.
    pub fn sequence(&mut self, name: &str, width: Width, start: Id) {
        self.sequences.insert(name.to_owned(), (width, start));
    }

    /// Checks a grant of `first .. first + count`.
    pub fn granted(&mut self, sequence: &str, first: Id, count: u64) -> Result<(), String> {
        let Some(&(width, start)) = self.sequences.get(sequence) else {
            return Err(format!("{sequence}: granted from an unknown sequence"));
        };
        if count == 0 {
            return Err(format!("{sequence}: an empty block at {first}"));
        }
        if first < start {
            return Err(format!(
                "{sequence}: {first}+{count} starts below the start {start}"
            ));
        }
        match first.checked_add(Id::from(count)) {
            Some(end) if end <= width.limit() => Ok(()),
            _ => Err(format!(
                "{sequence}: {first}+{count} passes the {width}-byte limit {}",
                width.limit()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserved_limit_and_ids_below_start_fail() {
        let mut w = InWidth::default();
        w.sequence("s", Width::W2, 10);
        assert_eq!(w.granted("s", 10, 1), Ok(()));
        assert_eq!(w.granted("s", 65_534, 1), Ok(()), "the last id: 0xFFFE");
        assert!(w.granted("s", 65_535, 1).is_err(), "0xFFFF is reserved");
        assert!(w.granted("s", 9, 1).is_err());
        assert!(w.granted("t", 10, 1).is_err());
    }
}
