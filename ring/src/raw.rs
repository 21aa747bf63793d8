//! The take/refill protocol on a [`Header`] and its slots, wherever they live (a shared mapping,
//! or the heap in tests and loom models). No syscalls here: this module runs under miri and loom.
//!
//! # Algorithm
//!
//! A single-producer ring in the style of Lamport's ("Proving the correctness of multiprocess
//! programs", 1977), whose slots hold *blocks* `(first, count)` of consecutive ids, read with a
//! seqlock (Boehm, "Can seqlocks get along with programming language memory models?", MSPC
//! 2012), and claimed by consumers with one CAS on a packed cursor.
//!
//! * `head` = `block_index << 20 | offset`. Consumers only CAS it forward; it never decreases.
//! * `tail` = number of blocks published (producer only; informational for consumers).
//! * Block `b` lives in slot `b % capacity`, whose `stamp` is `b + 1` once it is published.
//!
//! **take(n)**: load `head = (b, off)`; read slot `b % cap`: `s1 = stamp` (Acquire), the three
//! fields (Relaxed atomics, so no data race even against a concurrent writer), an Acquire fence,
//! `s2 = stamp`. If `s1 != b + 1` the block is not published yet (empty; this includes the
//! "empty but advanced" state `(b, 0)` after the previous block was finished) or our `head` is
//! stale (the slot was recycled): reload `head`; if it did not move, the ring is empty. Otherwise
//! `k = min(n, count - off)` and CAS `head` from `(b, off)` to `(b, off + k)`, or `(b + 1, 0)` when
//! that finishes the block. Success hands out `first + off .. first + off + k`. A failed CAS that
//! leaves `head` in the same block retries at once with the slot values already read.
//!
//! **push(first, count)** for block `b = tail`: allowed when `b < capacity` or `head`'s block
//! index `> b - capacity`, i.e. the slot's previous block `b - capacity` was claimed to its end.
//! Write `stamp = 0`, Release fence, the fields, then `stamp = b + 1` (Release), `tail = b + 1`.
//!
//! # Why it is sound
//!
//! * **No id twice.** Every successful CAS moves `head` from exactly the value the consumer read,
//!   so the claimed ranges `[(b, off), (b, off + k))` are disjoint. The values read from the slot
//!   are those of block `b`: the producer rewrites slot `b % cap` only after it loaded (Acquire) a
//!   `head` past block `b`, which in `head`'s modification order comes after our successful CAS
//!   (AcqRel; later CASes are RMWs and continue its release sequence), so our reads happen-before
//!   the rewrite. The seqlock check (`s1 == s2 == b + 1`) rejects torn reads on its own as well.
//!   The producer pushes only increasing, disjoint blocks (checked), so distinct `(b, off)` are
//!   distinct ids.
//! * **Per-consumer increasing order.** `head` only increases and ids increase with `(b, off)`.
//! * **A consumer killed anywhere wedges nothing.** A consumer holds no lock and owns no slot: if
//!   it dies before its CAS nothing changed; if after, `head` already moved on and the ids it
//!   claimed are simply lost (never handed to anyone else). The producer waits only on `head`,
//!   which any live consumer advances. (A Vyukov MPMC queue instead has per-slot sequence numbers
//!   a consumer must release after claiming, and wedges if it dies in between.)
//! * **Lock-free.** A failed CAS means another consumer's CAS succeeded.
//! * **No ABA.** `head` only increases and its 44-bit block index cannot wrap: the producer
//!   refuses to publish block index [`BLOCKS_MAX`]` - 1` or beyond (2^44 - 1 blocks, ~203 days at
//!   one block per microsecond; blocks are lease-sized, so in practice never), after which the
//!   agent must create a new ring. The stamp `b + 1` never wraps either.

use crate::layout::{BLOCK_IDS_MAX, BLOCKS_MAX, Header, OFFSET_BITS, OFFSET_MASK, Slot};
use crate::sync::{AtomicU64, Ordering, fence};

/// A range of consecutive ids `first .. first + count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IdRange {
    /// First id.
    pub first: u128,
    /// Number of ids, at least 1.
    pub count: u64,
}

impl IdRange {
    /// The last id (`first + count - 1`; no overflow even when it is `u128::MAX`).
    pub fn last(&self) -> u128 {
        self.first + u128::from(self.count.max(1) - 1)
    }
}

/// Outcome of [`RingRef::take`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// Ids claimed by this call.
    Got(IdRange),
    /// Nothing published beyond `head`.
    Empty,
    /// A published slot is inconsistent with `head` (count 0 or too large, or offset past it):
    /// the file was written by something that does not follow the protocol.
    Corrupt,
}

/// Outcome of [`ProducerCore::push`] when the arguments are valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushError {
    /// `first` is below the end of the previous block.
    NotIncreasing {
        /// Smallest acceptable first id.
        next_min: u128,
    },
    /// `count == 0`, or `first + count - 1` exceeds the width's largest id.
    OutOfRange,
    /// The ring published its last possible block index.
    Exhausted,
}

/// A view of a ring: its header and slots. `slots.len()` is a nonzero power of two.
///
/// With a seal (`layout`, "The seal file"): a consumer's view reads its slots from the seal
/// (`slots` are the seal's) and checks `head` against the seal's `floor`; the producer's view
/// writes every slot to both (`mirror`) and raises `floor` to what it sees of `head`.
#[derive(Clone, Copy)]
pub struct RingRef<'a> {
    header: &'a Header,
    slots: &'a [Slot],
    /// Producer only: a second copy of the slots written with every push (the ring file's slots
    /// when `slots` are the seal's). Same length as `slots`.
    mirror: Option<&'a [Slot]>,
    /// The seal's `floor`: `head` below it was rewound.
    floor: Option<&'a AtomicU64>,
}

impl<'a> RingRef<'a> {
    /// A view of `header` and `slots`.
    ///
    /// # Panics
    /// If `slots.len()` is not a nonzero power of two.
    pub fn new(header: &'a Header, slots: &'a [Slot]) -> Self {
        assert!(
            slots.len().is_power_of_two(),
            "slot count must be a power of two"
        );
        RingRef {
            header,
            slots,
            mirror: None,
            floor: None,
        }
    }

    /// The same view with a seal: `mirror` (producer: the other copy of the slots, same
    /// length) and `floor`.
    ///
    /// # Panics
    /// If `mirror` has another length than the slots.
    pub fn with_seal(self, mirror: Option<&'a [Slot]>, floor: &'a AtomicU64) -> Self {
        assert!(mirror.is_none_or(|m| m.len() == self.slots.len()));
        RingRef {
            mirror,
            floor: Some(floor),
            ..self
        }
    }

    /// A view without the power-of-two check, for callers that validated `slots.len()` already.
    ///
    /// # Safety
    /// `slots.len()` must be a nonzero power of two ([`RingRef::take`] indexes unchecked).
    #[inline]
    #[cfg_attr(loom, allow(dead_code))] // used by the mmap side only
    pub(crate) unsafe fn new_unchecked(header: &'a Header, slots: &'a [Slot]) -> Self {
        debug_assert!(slots.len().is_power_of_two());
        RingRef {
            header,
            slots,
            mirror: None,
            floor: None,
        }
    }

    /// The header.
    pub fn header(&self) -> &'a Header {
        self.header
    }

    /// Slot count.
    pub fn capacity(&self) -> u64 {
        self.slots.len() as u64
    }

    #[inline]
    fn slot(&self, block: u64) -> &'a Slot {
        let idx = (block & (self.slots.len() as u64 - 1)) as usize;
        debug_assert!(idx < self.slots.len());
        // SAFETY: `slots.len()` is a nonzero power of two (asserted in `new`, promised by the
        // caller of `new_unchecked`), so `block & (len - 1) <= len - 1 < len`: in bounds.
        unsafe { self.slots.get_unchecked(idx) }
    }

    /// Claims up to `max` (>= 1) ids from the ring. Lock-free; never blocks, never makes a syscall.
    #[inline]
    pub fn take(&self, max: u64) -> Take {
        self.take_from(self.header.head.load(Ordering::Acquire), max)
            .0
    }

    /// [`RingRef::take`] starting from a *guess* of `head` instead of loading it, e.g. the value
    /// this thread's last successful CAS stored. Any guess is safe: nothing is claimed unless the
    /// CAS from exactly the guessed value succeeds (proving it was the real `head`), and `Empty`
    /// or `Corrupt` are only reported for a freshly loaded `head`. Returns the outcome and the
    /// next guess. (A per-thread guess in `Consumer`, to skip loading the contended `head` line,
    /// measured no better than the load on the 2-core test machine, so `Consumer` uses `take`.)
    #[inline]
    pub fn take_from(&self, guess: u64, max: u64) -> (Take, u64) {
        debug_assert!(max >= 1);
        let max = max.max(1);
        let head_cell = &*self.header.head;
        let mut head = guess;
        loop {
            if let Some(floor) = self.floor
                && head < floor.load(Ordering::Acquire)
            {
                // Below what the producer saw: a stale guess, or a rewound `head`.
                let now = head_cell.load(Ordering::Acquire);
                if now == head {
                    return (Take::Corrupt, head);
                }
                head = now;
                continue;
            }
            let block = head >> OFFSET_BITS;
            let off = head & OFFSET_MASK;
            let slot = self.slot(block);
            let s1 = slot.stamp.load(Ordering::Acquire);
            if s1 != block + 1 {
                // Not published yet, or our `head` is stale and the slot was recycled.
                let now = head_cell.load(Ordering::Acquire);
                if now == head {
                    return (Take::Empty, head);
                }
                head = now;
                continue;
            }
            let lo = slot.first_lo.load(Ordering::Relaxed);
            let hi = slot.first_hi.load(Ordering::Relaxed);
            let count = slot.count.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            let s2 = slot.stamp.load(Ordering::Relaxed);
            if s2 != s1 {
                // Torn read: the producer recycled the slot, so `head` moved on.
                head = head_cell.load(Ordering::Acquire);
                continue;
            }
            if count == 0 || count > BLOCK_IDS_MAX || off >= count {
                // Consistent stamp but impossible content. Re-check that `head` did not move
                // (then the read was merely stale) before calling it corrupt.
                let now = head_cell.load(Ordering::Acquire);
                if now == head {
                    return (Take::Corrupt, head);
                }
                head = now;
                continue;
            }
            // CAS, retrying without re-reading the slot while `head` stays in this block: what we
            // read is block `block`'s content, and a successful CAS from `(block, _)` proves the
            // slot was not recycled before it (the argument in the module docs). A short retry
            // keeps the contended line from being stolen between the failed CAS and the next.
            let mut off = off;
            loop {
                let k = max.min(count - off);
                let next = if off + k == count {
                    (block + 1) << OFFSET_BITS
                } else {
                    head + k
                };
                match head_cell.compare_exchange(head, next, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => {
                        let first = (u128::from(hi) << 64 | u128::from(lo)) + u128::from(off);
                        return (Take::Got(IdRange { first, count: k }), next);
                    }
                    Err(now) => {
                        head = now;
                        off = now & OFFSET_MASK;
                        if now >> OFFSET_BITS != block || off >= count {
                            break; // another block (or an impossible offset): re-read
                        }
                    }
                }
            }
        }
    }
}

impl RingRef<'_> {
    /// Consumer side of the sleep protocol: registers in `waiters` (SeqCst, pairs with
    /// [`ProducerCore::waiters_present`]) and returns the `wake_seq` value to sleep on. The caller
    /// must re-check the ring after this, sleep only if it is still empty, and call
    /// [`RingRef::unregister_waiter`] afterwards.
    pub fn register_waiter(&self) -> u32 {
        let p = &self.header.producer;
        p.waiters.fetch_add(1, Ordering::SeqCst);
        // The re-check's stamp load is only Acquire: without this fence the C++ model lets it
        // read the old stamp while the producer's fenced load of `waiters` reads 0 (the loom
        // model `no_lost_wakeup` fails without it). With a SeqCst fence on both sides, the one
        // later in the SeqCst order sees the other side's write. (On x86 `lock xadd` is already a
        // full barrier; the fence is on the sleep path only.)
        fence(Ordering::SeqCst);
        p.wake_seq.load(Ordering::SeqCst)
    }

    /// Undoes [`RingRef::register_waiter`].
    pub fn unregister_waiter(&self) {
        self.header.producer.waiters.fetch_sub(1, Ordering::SeqCst);
    }

    /// Current `wake_seq` (a changed value means the producer woke sleepers).
    pub fn wake_seq(&self) -> u32 {
        self.header.producer.wake_seq.load(Ordering::Acquire)
    }
}

/// The producer's private state (lives in the agent's memory, not in the ring).
pub struct ProducerCore {
    /// Next block index to publish (= `tail`).
    next_block: u64,
    /// Last observed block index of `head` (a lower bound of the real one).
    head_block_seen: u64,
    /// Last id pushed (`None`: nothing pushed yet); the next block must start above it.
    last_id: Option<u128>,
    /// Ids pushed before block `b`, stored at `b % capacity` (for `ids_available`).
    ids_before: Vec<u128>,
    /// Ids pushed in total.
    ids_total: u128,
    /// Largest id of the ring's width.
    id_max: u128,
}

impl ProducerCore {
    /// State for a fresh ring (`tail == 0`, `head == 0`) of `capacity` slots and ids up to `id_max`.
    pub fn new(capacity: u64, id_max: u128) -> Self {
        ProducerCore {
            next_block: 0,
            head_block_seen: 0,
            last_id: None,
            ids_before: vec![0; capacity as usize],
            ids_total: 0,
            id_max,
        }
    }

    /// Whether block `b`'s slot is free (its previous occupant was claimed to the end),
    /// re-reading `head` only when the cached value says no.
    fn slot_free(&mut self, ring: &RingRef<'_>, b: u64) -> bool {
        let cap = ring.capacity();
        if b < cap || self.head_block_seen > b - cap {
            return true;
        }
        self.head_block_seen = Self::observe_head(ring) >> OFFSET_BITS;
        self.head_block_seen > b - cap
    }

    /// Loads `head` and raises the seal's `floor` to it (the producer is the only writer of
    /// `floor`). Returns the value loaded.
    pub fn observe_head(ring: &RingRef<'_>) -> u64 {
        let head = ring.header.head.load(Ordering::Acquire);
        if let Some(floor) = ring.floor
            && head > floor.load(Ordering::Relaxed)
        {
            floor.store(head, Ordering::Release);
        }
        head
    }

    /// Publishes ids `first .. first + count`, split into blocks of at most [`BLOCK_IDS_MAX`],
    /// as far as free slots allow. Returns how many ids were accepted (a whole prefix: the caller
    /// pushes `first + accepted` later); 0 when the ring is full.
    pub fn push(&mut self, ring: &RingRef<'_>, first: u128, count: u64) -> Result<u64, PushError> {
        if count == 0 {
            return Err(PushError::OutOfRange);
        }
        if let Some(last) = self.last_id {
            if last >= self.id_max {
                return Err(PushError::OutOfRange); // the width's last id was pushed
            }
            if first <= last {
                return Err(PushError::NotIncreasing { next_min: last + 1 });
            }
        }
        match first.checked_add(u128::from(count) - 1) {
            Some(last) if last <= self.id_max => {}
            _ => return Err(PushError::OutOfRange),
        }
        let mut accepted = 0u64;
        while accepted < count {
            let b = self.next_block;
            if b >= BLOCKS_MAX - 1 {
                if accepted == 0 {
                    return Err(PushError::Exhausted);
                }
                break;
            }
            if !self.slot_free(ring, b) {
                break;
            }
            let n = (count - accepted).min(BLOCK_IDS_MAX);
            let start = first + u128::from(accepted);
            let idx = (b & (ring.capacity() - 1)) as usize;
            let mirror = ring.mirror.and_then(|m| m.get(idx));
            for slot in std::iter::once(ring.slot(b)).chain(mirror) {
                slot.stamp.store(0, Ordering::Relaxed);
                fence(Ordering::Release);
                slot.first_lo.store(start as u64, Ordering::Relaxed);
                slot.first_hi.store((start >> 64) as u64, Ordering::Relaxed);
                slot.count.store(n, Ordering::Relaxed);
                slot.stamp.store(b + 1, Ordering::Release);
            }
            self.ids_before[(b % ring.capacity()) as usize] = self.ids_total;
            self.ids_total += u128::from(n);
            self.next_block = b + 1;
            ring.header.producer.tail.store(b + 1, Ordering::Release);
            accepted += n;
            self.last_id = Some(start + u128::from(n - 1));
        }
        Ok(accepted)
    }

    /// After a push: whether a consumer may be asleep and needs a `FUTEX_WAKE`. The SeqCst fence
    /// pairs with the consumer's SeqCst `waiters` increment before its last emptiness check
    /// (Dekker): either the producer sees the waiter, or the waiter sees the new block.
    pub fn waiters_present(ring: &RingRef<'_>) -> bool {
        fence(Ordering::SeqCst);
        ring.header.producer.waiters.load(Ordering::Relaxed) != 0
    }

    /// Bumps the futex word after a push that found waiters; the caller then `FUTEX_WAKE`s it.
    pub fn bump_wake_seq(ring: &RingRef<'_>) {
        ring.header
            .producer
            .wake_seq
            .fetch_add(1, Ordering::Release);
    }

    /// Slots that can be published right now without waiting for consumers.
    pub fn free_slots(&self, ring: &RingRef<'_>) -> u64 {
        let head_block = ring.header.head.load(Ordering::Acquire) >> OFFSET_BITS;
        let in_use = self.next_block - head_block.min(self.next_block);
        ring.capacity() - in_use.min(ring.capacity())
    }

    /// Ids published and not yet claimed by a consumer.
    pub fn ids_available(&self, ring: &RingRef<'_>) -> u64 {
        let head = ring.header.head.load(Ordering::Acquire);
        let (block, off) = (head >> OFFSET_BITS, head & OFFSET_MASK);
        if block >= self.next_block {
            return 0;
        }
        debug_assert!(self.next_block - block <= ring.capacity());
        let before = self.ids_before[(block % ring.capacity()) as usize];
        let left = self.ids_total - before - u128::from(off);
        u64::try_from(left).unwrap_or(u64::MAX)
    }

    /// Blocks published so far (`tail`).
    pub fn blocks_published(&self) -> u64 {
        self.next_block
    }
}

/// A ring on the heap, for unit tests, miri and loom models.
pub struct MemRing {
    header: Box<Header>,
    slots: Box<[Slot]>,
}

impl MemRing {
    /// A fresh ring of `capacity` (power of two) slots.
    pub fn new(width: u8, capacity: u64) -> Self {
        let slots: Vec<Slot> = (0..capacity).map(|_| Slot::new()).collect();
        MemRing {
            header: Box::new(Header::new(width, capacity)),
            slots: slots.into_boxed_slice(),
        }
    }

    /// A view of it.
    pub fn view(&self) -> RingRef<'_> {
        RingRef::new(&self.header, &self.slots)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::layout::id_max;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn take_single_and_batches_across_wrap() {
        let mem = MemRing::new(8, 4);
        let ring = mem.view();
        let mut p = ProducerCore::new(4, id_max(8));
        assert_eq!(ring.take(1), Take::Empty);
        let mut next = 0u128;
        let mut pushed = 0u128;
        for round in 0..20u64 {
            while pushed < next + 40 {
                let n = 3 + round % 5;
                let got = p.push(&ring, pushed, n).unwrap();
                if got == 0 {
                    break;
                }
                pushed += u128::from(got);
            }
            assert!(p.ids_available(&ring) as u128 == pushed - next);
            loop {
                match ring.take(1 + round % 4) {
                    Take::Got(r) => {
                        assert_eq!(r.first, next);
                        next = r.last() + 1;
                    }
                    Take::Empty => break,
                    Take::Corrupt => panic!("corrupt"),
                }
            }
            assert_eq!(next, pushed);
            assert_eq!(p.ids_available(&ring), 0);
            assert_eq!(p.free_slots(&ring), 4);
        }
    }

    #[test]
    fn full_ring_refuses_then_accepts_after_take() {
        let mem = MemRing::new(4, 2);
        let ring = mem.view();
        let mut p = ProducerCore::new(2, id_max(4));
        assert_eq!(p.push(&ring, 10, 5), Ok(5));
        assert_eq!(p.push(&ring, 15, 5), Ok(5));
        assert_eq!(p.free_slots(&ring), 0);
        assert_eq!(p.push(&ring, 20, 5), Ok(0));
        // Partly claiming block 0 does not free its slot...
        assert_eq!(
            ring.take(2),
            Take::Got(IdRange {
                first: 10,
                count: 2
            })
        );
        assert_eq!(p.push(&ring, 20, 5), Ok(0));
        // ...finishing it does.
        assert_eq!(
            ring.take(100),
            Take::Got(IdRange {
                first: 12,
                count: 3
            })
        );
        assert_eq!(p.push(&ring, 20, 5), Ok(5));
        assert_eq!(
            ring.take(100),
            Take::Got(IdRange {
                first: 15,
                count: 5
            })
        );
        assert_eq!(
            ring.take(100),
            Take::Got(IdRange {
                first: 20,
                count: 5
            })
        );
        // Empty but advanced: head = (3, 0), block 3 not published.
        assert_eq!(ring.take(1), Take::Empty);
        assert_eq!(p.push(&ring, 30, 1), Ok(1));
        assert_eq!(
            ring.take(8),
            Take::Got(IdRange {
                first: 30,
                count: 1
            })
        );
    }

    #[test]
    fn push_validates_and_splits() {
        let mem = MemRing::new(2, 4);
        let ring = mem.view();
        let mut p = ProducerCore::new(4, id_max(2));
        assert_eq!(p.push(&ring, 0, 0), Err(PushError::OutOfRange));
        assert_eq!(p.push(&ring, 65_535, 2), Err(PushError::OutOfRange));
        assert_eq!(p.push(&ring, 100, 10), Ok(10));
        assert_eq!(
            p.push(&ring, 105, 1),
            Err(PushError::NotIncreasing { next_min: 110 })
        );
        let mem = MemRing::new(16, 2);
        let ring = mem.view();
        let mut p = ProducerCore::new(2, id_max(16));
        let base = u128::MAX - 3 * BLOCK_IDS_MAX as u128;
        // 3 blocks' worth into 2 slots: two accepted.
        assert_eq!(
            p.push(&ring, base, 3 * BLOCK_IDS_MAX),
            Ok(2 * BLOCK_IDS_MAX)
        );
        assert_eq!(
            ring.take(u64::MAX),
            Take::Got(IdRange {
                first: base,
                count: BLOCK_IDS_MAX
            })
        );
        assert_eq!(
            p.push(&ring, base + 2 * BLOCK_IDS_MAX as u128, BLOCK_IDS_MAX),
            Ok(BLOCK_IDS_MAX)
        );
        assert_eq!(p.push(&ring, u128::MAX, 1), Ok(0));
    }

    #[test]
    fn any_guess_is_safe() {
        let mem = MemRing::new(8, 4);
        let ring = mem.view();
        let mut p = ProducerCore::new(4, id_max(8));
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = 0u128;
        let mut pushed = 0u128;
        let rounds = if cfg!(miri) { 200 } else { 5_000 };
        for _ in 0..rounds {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if rng % 3 == 0 {
                let got = p.push(&ring, pushed, 1 + rng % 5).unwrap();
                pushed += u128::from(got);
            }
            // Garbage, stale, or exact guesses: results must be exactly the next ids.
            let guess = match rng % 4 {
                0 => rng,
                1 => 0,
                2 => rng & 0xFF_FFFF,
                _ => ring.header().head.load(Ordering::Relaxed),
            };
            match ring.take_from(guess, 1 + (rng >> 40) % 4).0 {
                Take::Got(r) => {
                    assert_eq!(r.first, next);
                    next = r.last() + 1;
                }
                Take::Empty => assert_eq!(next, pushed),
                Take::Corrupt => panic!("corrupt"),
            }
        }
        assert!(next > 0);
    }

    #[test]
    fn corrupt_slot_is_reported_not_looped() {
        let mem = MemRing::new(8, 2);
        let ring = mem.view();
        let mut p = ProducerCore::new(2, id_max(8));
        p.push(&ring, 0, 4).unwrap();
        mem.slots[0].count.store(0, Ordering::Relaxed);
        assert_eq!(ring.take(1), Take::Corrupt);
    }

    #[test]
    fn head_below_the_floor_is_corrupt() {
        let mem = MemRing::new(8, 4);
        let seal = crate::layout::SealHeader::new();
        let seal_slots: Vec<Slot> = (0..4).map(|_| Slot::new()).collect();
        let producer = mem.view().with_seal(Some(&seal_slots), &seal.floor);
        let consumer = RingRef::new(&mem.header, &seal_slots).with_seal(None, &seal.floor);
        let mut p = ProducerCore::new(4, id_max(8));
        p.push(&producer, 100, 10).unwrap();
        assert_eq!(
            consumer.take(4),
            Take::Got(IdRange {
                first: 100,
                count: 4
            })
        );
        ProducerCore::observe_head(&producer);
        assert_eq!(seal.floor.load(Ordering::Relaxed), 4);
        // A stale guess below the floor is only a guess: the real head is used.
        assert_eq!(
            consumer.take_from(0, 1).0,
            Take::Got(IdRange {
                first: 104,
                count: 1
            })
        );
        mem.header.head.store(1, Ordering::Relaxed); // rewound
        assert_eq!(consumer.take(1), Take::Corrupt);
        // The ring's own slots were written too (for readers of the plain layout).
        assert_eq!(mem.slots[0].first_lo.load(Ordering::Relaxed), 100);
    }

    /// Producer and consumer threads on a heap ring: every id once, increasing per consumer.
    fn stress(width: u8, capacity: u64, consumers: usize, total_ids: u64) {
        let mem = Arc::new(MemRing::new(width, capacity));
        let done = Arc::new(AtomicBool::new(false));
        let handles: Vec<_> = (0..consumers)
            .map(|i| {
                let mem = Arc::clone(&mem);
                let done = Arc::clone(&done);
                std::thread::spawn(move || {
                    let ring = mem.view();
                    let mut got = Vec::new();
                    loop {
                        let finished = done.load(std::sync::atomic::Ordering::Acquire);
                        match ring.take(1 + (i as u64 % 3) * 2) {
                            Take::Got(r) => {
                                got.extend((0..r.count).map(|k| r.first + u128::from(k)))
                            }
                            Take::Empty if finished => break,
                            Take::Empty => std::thread::yield_now(),
                            Take::Corrupt => panic!("corrupt"),
                        }
                    }
                    got
                })
            })
            .collect();
        let ring = mem.view();
        let mut p = ProducerCore::new(capacity, id_max(width));
        let mut next: u128 = 1;
        let end = 1 + u128::from(total_ids);
        let mut n = 1u64;
        while next < end {
            let count = n.min((end - next) as u64);
            let got = p.push(&ring, next, count).unwrap();
            next += u128::from(got);
            if got == 0 {
                std::thread::yield_now();
            }
            n = n % 7 + 1;
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        let mut all = Vec::new();
        for h in handles {
            let got = h.join().unwrap();
            assert!(got.windows(2).all(|w| w[0] < w[1]), "per-consumer order");
            all.extend(got);
        }
        all.sort_unstable();
        assert_eq!(all.len() as u64, total_ids, "every id exactly once");
        assert!(all.iter().zip(1u128..).all(|(a, b)| *a == b));
    }

    #[test]
    fn stress_threads_all_widths() {
        let total = if cfg!(miri) { 300 } else { 60_000 };
        for width in [2u8, 4, 8, 16] {
            stress(width, 8, 3, total);
        }
    }
}
