//! Replay protection: a sliding window over a sender's sequence numbers.
//!
//! The anti-replay window of IPsec (RFC 4303 §3.4.3; the bitmap of RFC 6479)
//! and WireGuard: the receiver keeps the highest seq it accepted from a sender
//! and one bit for each of the [`REPLAY_WINDOW_BITS`] seqs below it. A seq is
//! fresh if it is above the highest, or inside the window and not yet marked;
//! everything else (seen, or older than the window) is a replay. The seq is
//! covered by the datagram's tag, so with a cluster secret a replayed datagram
//! cannot be given a fresh seq.
//!
//! `check` and `mark` are separate so that a receiver can mark a seq only once
//! the request had a lasting effect (a granted block), and leave it fresh when
//! the answer was transient (`NotReady`: a retransmission tries again).

/// How many seqs below the highest the window remembers.
pub const REPLAY_WINDOW_BITS: u64 = 1024;

const WORDS: usize = (REPLAY_WINDOW_BITS / 64) as usize;

const _: () = assert!(REPLAY_WINDOW_BITS % 64 == 0 && WORDS >= 1);

/// A sliding window of the seqs seen from one sender (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    /// The highest seq marked (0: none).
    highest: u64,
    /// Bit `i` of the window (word `i / 64`, bit `i % 64`) is set when seq
    /// `highest - i` was marked.
    bits: [u64; WORDS],
}

impl ReplayWindow {
    /// An empty window: every seq but 0 is fresh.
    pub const fn new() -> ReplayWindow {
        ReplayWindow {
            highest: 0,
            bits: [0; WORDS],
        }
    }

    /// The highest seq marked (0: none).
    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// Whether `seq` is fresh: not 0, and above the highest or inside the
    /// window and not marked.
    pub fn check(&self, seq: u64) -> bool {
        if seq == 0 {
            return false;
        }
        if seq > self.highest {
            return true;
        }
        let offset = self.highest - seq;
        offset < REPLAY_WINDOW_BITS && !self.bit(offset)
    }

    /// Marks `seq` seen. Returns whether it was fresh ([`check`](Self::check));
    /// a seq that was not is left as it was.
    pub fn mark(&mut self, seq: u64) -> bool {
        if !self.check(seq) {
            return false;
        }
        if seq > self.highest {
            self.shift(seq - self.highest);
            self.highest = seq;
        }
        let offset = self.highest - seq;
        debug_assert!(offset < REPLAY_WINDOW_BITS);
        self.bits[(offset / 64) as usize] |= 1 << (offset % 64);
        true
    }

    fn bit(&self, offset: u64) -> bool {
        debug_assert!(offset < REPLAY_WINDOW_BITS);
        self.bits[(offset / 64) as usize] & (1 << (offset % 64)) != 0
    }

    /// Moves every bit `by` offsets up (older); bits beyond the window fall off.
    fn shift(&mut self, by: u64) {
        if by >= REPLAY_WINDOW_BITS {
            self.bits = [0; WORDS];
            return;
        }
        let words = (by / 64) as usize;
        let bits = (by % 64) as u32;
        for w in (0..WORDS).rev() {
            let lo = w.checked_sub(words).map_or(0, |i| self.bits[i]);
            let below = w.checked_sub(words + 1).map_or(0, |i| self.bits[i]);
            self.bits[w] = if bits == 0 {
                lo
            } else {
                (lo << bits) | (below >> (64 - bits))
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_once_then_a_replay() {
        let mut w = ReplayWindow::new();
        assert!(!w.check(0) && !w.mark(0));
        assert!(w.mark(5));
        assert!(!w.mark(5), "the same seq twice");
        assert!(w.mark(3), "below the highest, inside the window, unseen");
        assert!(!w.check(3));
        assert!(w.mark(6));
        assert!(!w.check(5) && !w.check(3) && !w.check(6));
        assert!(w.check(4) && w.check(1) && w.check(7));
        assert_eq!(w.highest(), 6);
    }

    #[test]
    fn the_window_slides_and_forgets_what_is_older() {
        let mut w = ReplayWindow::new();
        let base = 1_000_000;
        assert!(w.mark(base));
        // Just inside, then just outside the window.
        assert!(w.check(base - (REPLAY_WINDOW_BITS - 1)));
        assert!(!w.check(base - REPLAY_WINDOW_BITS));
        // Slide by less than a word, by a word and a bit, by a whole window.
        for by in [1, 63, 64, 65, 700] {
            let before = w.highest();
            assert!(w.mark(before + by));
            assert!(
                !w.check(before),
                "slid by {by}: the old highest is still marked"
            );
            assert!(!w.check(base) || base + REPLAY_WINDOW_BITS <= w.highest() + 1);
        }
        let top = w.highest();
        assert!(w.mark(top + REPLAY_WINDOW_BITS + 5));
        assert!(!w.check(top), "now older than the window");
        assert!(w.check(top + 6) && w.mark(top + 6));
        assert!(!w.check(top + 6));
    }

    #[test]
    fn marks_keep_their_place_when_the_window_slides_across_words() {
        let marked = |s: u64| s % 3 == 0 || s % 7 == 0;
        for by in [1, 5, 63, 64, 65, 127, 128, 129, 500] {
            let mut w = ReplayWindow::new();
            for s in (1..=300).filter(|&s| marked(s)) {
                assert!(w.mark(s));
            }
            let top = 300 + by;
            assert!(w.mark(top));
            for s in 1..=300 {
                assert_eq!(w.check(s), !marked(s), "slid by {by}: seq {s}");
            }
        }
    }

    #[test]
    fn every_seq_of_a_shuffled_run_is_fresh_exactly_once() {
        // Reordered by up to 200 (less than the window): each seq fresh once.
        let mut seqs: Vec<u64> = (1..=5000).collect();
        for (i, chunk) in seqs.chunks_mut(200).enumerate() {
            if i % 2 == 0 {
                chunk.reverse();
            }
        }
        let mut w = ReplayWindow::new();
        for &s in &seqs {
            assert!(w.mark(s), "{s} first time");
        }
        for &s in &seqs {
            assert!(!w.check(s), "{s} second time");
        }
    }
}
