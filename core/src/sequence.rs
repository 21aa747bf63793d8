//! Sequences: how many ids a width has left, carving blocks without ever
//! crossing a bound, and the caps that keep small widths' losses small.
//!
//! # Exhaustion
//!
//! Ids never wrap. Every issued id is below [`Width::limit`] (the all-ones
//! value is reserved). A request that would cross the limit is granted what
//! remains; the next one gets [`Error::Exhausted`]. [`carve`] is the one place
//! that rule is written.
//!
//! # Small widths
//!
//! Ids are lost in two places, never repeated:
//!
//! - **Leader change**: a new leader starts at the committed ceiling, so the
//!   ids between the old leader's `next` and that ceiling are lost. The
//!   allocator keeps `ceiling - next <= window` (a raise is sized from `next`),
//!   so one leader change loses at most one window.
//! - **Agent restart**: the blocks an agent held (and replies it never
//!   received) are lost: at most one block each.
//!
//! Configured windows and blocks suit 8- and 16-byte sequences, but a 2-byte
//! sequence has only 65,535 values. So the allocator and the agent's sizer
//! clamp every window to [`window_ids_cap`] = `limit / 256` and every block to
//! [`block_ids_cap`] = `limit / 1024`:
//!
//! | width | window cap | block cap | loss per leader change | loss per block held |
//! |---|---|---|---|---|
//! | 2 bytes | 255 | 63 | ≤ 255 ids (0.39 % of the space) | ≤ 63 ids (0.10 %) |
//! | 4 bytes | 16,777,215 | 4,194,303 | ≤ 0.39 % | ≤ 0.10 % |
//! | 8, 16 bytes | config | config | ≤ `window_ids_max` | ≤ `block_ids_max` |
//!
//! Why these divisors: a 2-byte sequence is for low-volume uses where losing
//! ids matters far more than consensus traffic. A window of 255 ids (raised
//! every ~128 ids, at half a window of headroom) means at most ~512 raises
//! over the whole life of the sequence, which is nothing for Raft; in return
//! 100 leader changes lose at most 39 % of the space rather than 100 % at a
//! 1,024-id window. For 4 bytes the caps sit above any sensible configured
//! value, so they only bite on 2-byte sequences in practice.

use unid_proto::{Block, Id, Width};

use crate::Error;

/// A window is at most `limit / WINDOW_SPACE_DIVISOR` ids of its width.
pub const WINDOW_SPACE_DIVISOR: u128 = 256;

/// A block is at most `limit / BLOCK_SPACE_DIVISOR` ids of its width.
pub const BLOCK_SPACE_DIVISOR: u128 = 1024;

const _: () = assert!(BLOCK_SPACE_DIVISOR > WINDOW_SPACE_DIVISOR);
// Even the smallest width has room for a non-empty block and window.
const _: () = assert!(u16::MAX as u128 / BLOCK_SPACE_DIVISOR >= 1);

/// How many ids remain at or above `next` in `width` (0 when exhausted).
pub fn ids_left(width: Width, next: Id) -> u128 {
    width.limit().saturating_sub(next)
}

/// The largest window (ids per ceiling raise) any leader uses for `width`:
/// `limit / 256`, saturated to `u64`. Bounds the ids one leader change can
/// lose (see the module docs).
pub fn window_ids_cap(width: Width) -> u64 {
    saturate_u64(width.limit() / WINDOW_SPACE_DIVISOR)
}

/// The largest block granted for `width`: `limit / 1024`, saturated to `u64`.
/// Bounds the ids one lost block can take with it.
pub fn block_ids_cap(width: Width) -> u64 {
    saturate_u64(width.limit() / BLOCK_SPACE_DIVISOR)
}

/// `value` as a `u64`, or `u64::MAX` if it is larger.
pub fn saturate_u64(value: u128) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

/// Carves a block of up to `want` ids starting at `next`, never reaching
/// `bound` (exclusive) nor the width's limit (a `bound` above the limit is
/// treated as the limit).
///
/// - [`Error::EmptyRequest`] if `want` is 0.
/// - [`Error::Exhausted`] if `next` has reached the width's limit.
/// - [`Error::AwaitingRaise`] if `next` has reached `bound` (but not the
///   limit): more ids exist, they are just not committed yet.
/// - Otherwise a block of `min(want, bound - next, limit - next)` ids: a
///   request crossing the limit is granted what remains.
pub fn carve(width: Width, next: Id, want: u64, bound: Id) -> Result<Block, Error> {
    let bound = bound.min(width.limit());
    if want == 0 {
        return Err(Error::EmptyRequest);
    }
    if next >= width.limit() {
        return Err(Error::Exhausted);
    }
    if next >= bound {
        return Err(Error::AwaitingRaise);
    }
    let room = bound - next;
    let count = saturate_u64(room.min(want as u128));
    debug_assert!(count >= 1 && count <= want);
    let block = Block::new(next, count, width).expect("count >= 1 and end <= bound <= limit");
    debug_assert!(block.end() <= bound);
    Ok(block)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_scale_with_width() {
        assert_eq!(window_ids_cap(Width::W2), 255);
        assert_eq!(block_ids_cap(Width::W2), 63);
        assert_eq!(window_ids_cap(Width::W4), 16_777_215);
        assert_eq!(block_ids_cap(Width::W4), 4_194_303);
        assert_eq!(window_ids_cap(Width::W8), u64::MAX / 256);
        assert_eq!(window_ids_cap(Width::W16), u64::MAX);
        assert_eq!(block_ids_cap(Width::W16), u64::MAX);
        // The documented fractions of a 2-byte space.
        let space = Width::W2.limit() as f64;
        assert!(window_ids_cap(Width::W2) as f64 / space < 0.004);
        assert!(block_ids_cap(Width::W2) as f64 / space < 0.001);
    }

    #[test]
    fn carve_grants_what_remains_then_exhausted() {
        let w = Width::W2;
        let limit = w.limit();
        // Crossing the limit: granted what remains.
        let b = carve(w, limit - 3, 10, limit).unwrap();
        assert_eq!((b.first(), b.count(), b.end()), (limit - 3, 3, limit));
        // Then exhausted, whatever the request.
        assert_eq!(carve(w, limit, 1, limit), Err(Error::Exhausted));
        assert_eq!(carve(w, limit, u64::MAX, limit), Err(Error::Exhausted));
        // The last id is limit - 1, never limit.
        let b = carve(w, limit - 1, 1, limit).unwrap();
        assert_eq!(b.end(), limit);
        assert!(w.contains(b.end() - 1));
        assert!(!w.contains(b.end()));
    }

    #[test]
    fn carve_respects_bound_and_rejects_empty() {
        let w = Width::W8;
        assert_eq!(carve(w, 10, 0, 100), Err(Error::EmptyRequest));
        assert_eq!(carve(w, 100, 5, 100), Err(Error::AwaitingRaise));
        let b = carve(w, 90, 50, 100).unwrap();
        assert_eq!((b.first(), b.count()), (90, 10));
        let b = carve(w, 10, 5, 100).unwrap();
        assert_eq!((b.first(), b.count()), (10, 5));
        // A bound above the limit is the limit.
        let b = carve(Width::W2, 0xFFF0, 100, u128::MAX).unwrap();
        assert_eq!(b.end(), Width::W2.limit());
    }

    #[test]
    fn carve_w16_near_top_never_overflows() {
        let w = Width::W16;
        let b = carve(w, u128::MAX - 2, u64::MAX, w.limit()).unwrap();
        assert_eq!(b.count(), 2);
        assert_eq!(b.end(), u128::MAX);
        assert_eq!(carve(w, u128::MAX, 1, w.limit()), Err(Error::Exhausted));
        assert_eq!(ids_left(w, u128::MAX), 0);
        assert_eq!(ids_left(Width::W2, 0), 65_535);
    }
}
