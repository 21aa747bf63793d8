//! Value types shared by every crate: widths, ids, blocks, names and the
//! identifiers carried in every datagram header.
//!
//! These types hold no I/O and no policy; they only make invalid values
//! unrepresentable (a width is one of 2, 4, 8 or 16 bytes; a block is never
//! empty and never crosses its width's limit; a sequence name is short and
//! printable).

use core::fmt;

/// An id. Every width is carried as `u128` on the wire and in the core; the
/// width says which values are legal.
pub type Id = u128;

/// A node in a cluster: a server or an agent. `0` means "unknown / none".
pub type NodeId = u64;

/// A leader epoch: the Raft term of the leader that produced a message.
/// Epochs only increase; a response from an older epoch than one already seen
/// is never used.
pub type Epoch = u64;

/// A per-sender datagram sequence number. `0` is never sent (it means "none"
/// in `reply_to`), so the first datagram a sender sends has sequence `1`.
pub type SeqNo = u64;

/// A cluster's identity: random, chosen once when the cluster is created and
/// replicated to every server, carried in every datagram's header so that a
/// node can tell answers of its own cluster from another's (two clusters
/// sharing one UDP address, an agent pointed at the wrong one). `0` means
/// "not known yet" (a node's first contact, an admin tool).
pub type ClusterId = u64;

/// The width of a sequence: how many bytes an id of it takes.
///
/// The all-ones value of every width (`0xFFFF` for two bytes) is *reserved*:
/// it is never issued, so that an exclusive upper bound ([`Width::limit`])
/// always fits in the width itself and a `u128` never overflows. A 2-byte
/// sequence starting at 1 therefore issues 65,534 ids: `1..=0xFFFE`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Width {
    /// 2 bytes (`u16`).
    W2 = 2,
    /// 4 bytes (`u32`).
    W4 = 4,
    /// 8 bytes (`u64`).
    W8 = 8,
    /// 16 bytes (`u128`).
    W16 = 16,
}

impl Width {
    /// Every width, smallest first.
    pub const ALL: [Width; 4] = [Width::W2, Width::W4, Width::W8, Width::W16];

    /// The width with this many bytes, or `None` if it is not 2, 4, 8 or 16.
    pub const fn from_bytes(bytes: u8) -> Option<Width> {
        match bytes {
            2 => Some(Width::W2),
            4 => Some(Width::W4),
            8 => Some(Width::W8),
            16 => Some(Width::W16),
            _ => None,
        }
    }

    /// How many bytes an id of this width takes.
    pub const fn bytes(self) -> u8 {
        self as u8
    }

    /// The exclusive upper bound of ids of this width: `2^(8*bytes) - 1`.
    /// Every issued id is `< limit()`; the limit itself is reserved.
    pub const fn limit(self) -> Id {
        match self {
            Width::W2 => u16::MAX as Id,
            Width::W4 => u32::MAX as Id,
            Width::W8 => u64::MAX as Id,
            Width::W16 => u128::MAX,
        }
    }

    /// Whether `id` is a value this width may issue.
    pub const fn contains(self, id: Id) -> bool {
        id < self.limit()
    }
}

impl fmt::Display for Width {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.bytes())
    }
}

/// A block of consecutive ids `first .. first + count`, granted to one agent.
///
/// Invariants (checked by [`Block::new`]): `count >= 1` and the block ends at
/// or below the width's limit, so `first + count` never overflows.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Block {
    first: Id,
    count: u64,
}

impl Block {
    /// A block of `count` ids starting at `first`, or `None` if it is empty or
    /// would reach the `width`'s reserved limit.
    pub fn new(first: Id, count: u64, width: Width) -> Option<Block> {
        if count == 0 {
            return None;
        }
        let end = first.checked_add(count as Id)?;
        if end > width.limit() {
            return None;
        }
        Some(Block { first, count })
    }

    /// The first id of the block.
    pub const fn first(&self) -> Id {
        self.first
    }

    /// How many ids the block holds (at least one).
    pub const fn count(&self) -> u64 {
        self.count
    }

    /// One past the last id of the block.
    pub const fn end(&self) -> Id {
        // Cannot overflow: checked in `new`.
        self.first + self.count as Id
    }

    /// Whether the two blocks share at least one id.
    pub const fn overlaps(&self, other: &Block) -> bool {
        self.first < other.end() && other.first < self.end()
    }
}

/// The longest sequence name, in bytes.
pub const SEQUENCE_NAME_BYTES_MAX: usize = 64;

/// A sequence name: 1 to 64 bytes of `[A-Za-z0-9_.-]`, starting with a letter
/// or digit. Short and printable so that it fits a datagram, a file name (the
/// ring file is named after it) and a log line unescaped.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SequenceName(String);

/// Why a string is not a valid [`SequenceName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("sequence name is empty")]
    Empty,
    /// The name is longer than [`SEQUENCE_NAME_BYTES_MAX`] bytes.
    #[error("sequence name is {len} bytes, more than the {SEQUENCE_NAME_BYTES_MAX} allowed")]
    TooLong {
        /// The length found.
        len: usize,
    },
    /// The name has a character outside `[A-Za-z0-9_.-]`, or starts with `.`,
    /// `-` or `_`.
    #[error("sequence name has a character outside [A-Za-z0-9_.-] or starts with '.', '-' or '_'")]
    BadCharacter,
}

impl SequenceName {
    /// Checks `name` and wraps it.
    pub fn new(name: &str) -> Result<SequenceName, NameError> {
        SequenceName::check(name)?;
        Ok(SequenceName(name.to_owned()))
    }

    /// Checks `name` against the rules without copying it (the decoder uses
    /// this to hand out names borrowed from a datagram).
    pub fn check(name: &str) -> Result<(), NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > SEQUENCE_NAME_BYTES_MAX {
            return Err(NameError::TooLong { len: name.len() });
        }
        let bytes = name.as_bytes();
        if !bytes[0].is_ascii_alphanumeric()
            || !bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            return Err(NameError::BadCharacter);
        }
        Ok(())
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SequenceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl core::str::FromStr for SequenceName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SequenceName::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn width_limits_reserve_all_ones() {
        assert_eq!(Width::W2.limit(), 0xFFFF);
        assert!(Width::W2.contains(0xFFFE));
        assert!(!Width::W2.contains(0xFFFF));
        assert!(!Width::W16.contains(u128::MAX));
        for w in Width::ALL {
            assert_eq!(Width::from_bytes(w.bytes()), Some(w));
        }
        for b in [0u8, 1, 3, 5, 7, 9, 15, 17, 32, 255] {
            assert_eq!(Width::from_bytes(b), None);
        }
    }

    #[test]
    fn block_never_reaches_limit() {
        assert!(Block::new(0xFFFE, 1, Width::W2).is_some());
        assert!(Block::new(0xFFFE, 2, Width::W2).is_none());
        assert!(Block::new(5, 0, Width::W8).is_none());
        assert!(Block::new(u128::MAX - 1, 1, Width::W16).is_some());
        assert!(Block::new(u128::MAX, 1, Width::W16).is_none());
        let a = Block::new(10, 5, Width::W4).unwrap();
        let b = Block::new(14, 1, Width::W4).unwrap();
        let c = Block::new(15, 1, Width::W4).unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c) && !c.overlaps(&a));
    }

    #[test]
    fn names() {
        assert!(SequenceName::new("orders").is_ok());
        assert!(SequenceName::new("a.b-c_9").is_ok());
        assert_eq!(SequenceName::new(""), Err(NameError::Empty));
        assert_eq!(SequenceName::new("-x"), Err(NameError::BadCharacter));
        assert_eq!(SequenceName::new("a/b"), Err(NameError::BadCharacter));
        assert_eq!(SequenceName::new("ü"), Err(NameError::BadCharacter));
        let long = "a".repeat(65);
        assert_eq!(
            SequenceName::new(&long),
            Err(NameError::TooLong { len: 65 })
        );
        assert!(SequenceName::new(&long[..64]).is_ok());
    }
}
