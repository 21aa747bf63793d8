//! The ring's memory layout: `#[repr(C)]`, little-endian, identical in every process that maps it.
//!
//! ```text
//! offset  size  field           encoding
//! ------  ----  --------------  ---------------------------------------------------------------
//!      0     8  magic           u64 = MAGIC (the bytes "UNIDRING" read as a little-endian u64)
//!      8     4  version         u32 = LAYOUT_VERSION (1)
//!     12     1  width           u8 id width in bytes: 2, 4, 8 or 16
//!     13     3  (zero)
//!     16     8  capacity        u64 slot count, a power of two in [CAPACITY_MIN, CAPACITY_MAX]
//!     24     4  header_size     u32 = HEADER_SIZE (384): byte offset of slot 0
//!     28     4  slot_size       u32 = SLOT_SIZE (32)
//!     32     8  file_size       u64 = HEADER_SIZE + capacity * SLOT_SIZE
//!     40     4  agent_pid       u32 pid of the agent (producer) process, as the agent sees it
//!     44     4  flags           u32 bit 0 = FLAG_CLOSED (producer gone on purpose); others zero
//!     48     8  heartbeat_ms    u64 CLOCK_MONOTONIC milliseconds of the agent's last heartbeat
//!     56     8  seal_nonce      u64 the nonce of this ring's seal file (see below), never 0
//!     64    64  (zero, reserved)
//!    128     8  head            u64 consumer cursor: block index << 20 | offset in block
//!    136   120  (padding: head alone on its 128-byte pair of cache lines)
//!    256     8  tail            u64 blocks published so far (written by the producer only)
//!    264     4  wake_seq        u32 futex word, bumped by the producer when it wakes waiters
//!    268     4  waiters         u32 consumers registered as (about to be) asleep on wake_seq
//!    272   112  (padding)
//!    384  32*c  slots[capacity]
//!
//! slot (32 bytes, slot i holds block b with b % capacity == i):
//!      0     8  stamp           u64 0 = empty or being written; b + 1 = holds block b (Release)
//!      8     8  first_lo        u64 low 64 bits of the block's first id
//!     16     8  first_hi        u64 high 64 bits of the block's first id (0 unless width 16)
//!     24     8  count           u64 ids in the block, 1 ..= BLOCK_IDS_MAX
//! ```
//!
//! # The seal file
//!
//! Consumers need write access to the ring file (the CAS on `head`), so nothing in it can be
//! trusted against a consumer that writes outside the protocol. Beside `NAME` the producer
//! keeps `.NAME.seal` (a name no sequence can have), which consumers open **read-only** (mode
//! 0600 or 0640: only the agent's user may write it) and map `PROT_READ`:
//!
//! ```text
//! offset  size  field           encoding
//! ------  ----  --------------  ---------------------------------------------------------------
//!      0     8  magic           u64 = SEAL_MAGIC (the bytes "UNIDSEAL" as a little-endian u64)
//!      8     4  version         u32 = LAYOUT_VERSION (1)
//!     12     4  (zero)
//!     16     8  nonce           u64 = the ring file's seal_nonce (they belong together), never 0
//!     24     8  capacity        u64 = the ring's capacity
//!     32     8  floor           u64 the largest `head` the producer has seen: a `head` below it
//!                               was rewound (consumers report Corrupt instead of taking)
//!     40    88  (zero, reserved)
//!    128  32*c  slots[capacity] the same slots as in the ring file, written by the producer in
//!                               the same order; Rust consumers read these, never the ring's
//! ```
//!
//! Every field, reserved ones included, is an atomic, so a process that reads the header while
//! another writes it has no data race, whatever the other process does.
//! The layout is fixed for x86-64 and aarch64, where `CachePadded` aligns to 128 bytes; the
//! compile-time assertions below refuse to build it anywhere the layout would differ.

use crate::sync::{AtomicU8, AtomicU32, AtomicU64};
use crossbeam_utils::CachePadded;

/// `"UNIDRING"` as a little-endian `u64`: the first 8 bytes of every ring file.
pub const MAGIC: u64 = u64::from_le_bytes(*b"UNIDRING");
/// `"UNIDSEAL"` as a little-endian `u64`: the first 8 bytes of every seal file.
pub const SEAL_MAGIC: u64 = u64::from_le_bytes(*b"UNIDSEAL");
/// Byte offset of slot 0 in the seal file (size of [`SealHeader`]).
pub const SEAL_HEADER_SIZE: usize = 128;
/// Layout version this crate reads and writes. Bumped on any incompatible layout change.
pub const LAYOUT_VERSION: u32 = 1;
/// Byte offset of slot 0 (size of [`Header`]).
pub const HEADER_SIZE: usize = 384;
/// Size of one [`Slot`] in bytes.
pub const SLOT_SIZE: usize = 32;
/// Byte offset of the `head` cursor.
pub const HEAD_OFFSET: usize = 128;
/// Byte offset of the `tail` counter.
pub const TAIL_OFFSET: usize = 256;
/// Byte offset of the futex word `wake_seq`.
pub const WAKE_SEQ_OFFSET: usize = 264;
/// Byte offset of the `waiters` counter.
pub const WAITERS_OFFSET: usize = 268;
/// `flags` bit set by the producer when it is dropped: no more ids will come.
pub const FLAG_CLOSED: u32 = 1;

/// Bits of `head` holding the offset within the current block.
pub const OFFSET_BITS: u32 = 20;
/// Mask of the offset bits of `head`.
pub const OFFSET_MASK: u64 = (1 << OFFSET_BITS) - 1;
/// Most ids in one slot (the producer splits larger blocks): 2^20.
pub const BLOCK_IDS_MAX: u64 = 1 << OFFSET_BITS;
/// Bits of `head` holding the block index (44): at most 2^44 - 1 blocks in a ring's life.
pub const BLOCK_INDEX_BITS: u32 = 64 - OFFSET_BITS;
/// The producer publishes blocks with index below this, so `head`'s block index (at most one
/// more than the last block) never exceeds 2^44 - 1 and never wraps.
pub const BLOCKS_MAX: u64 = (1 << BLOCK_INDEX_BITS) - 1;
/// Smallest ring capacity (slots).
pub const CAPACITY_MIN: u64 = 2;
/// Largest ring capacity (slots): 2^24, a 512 MiB file.
pub const CAPACITY_MAX: u64 = 1 << 24;

/// The identity line: written once before the file is renamed into place, then only
/// `agent_pid`, `flags` and `heartbeat_ms` change.
#[repr(C)]
pub struct Ident {
    /// [`MAGIC`].
    pub magic: AtomicU64,
    /// [`LAYOUT_VERSION`].
    pub version: AtomicU32,
    /// Id width in bytes: 2, 4, 8 or 16.
    pub width: AtomicU8,
    _pad: [AtomicU8; 3],
    /// Number of slots, a power of two.
    pub capacity: AtomicU64,
    /// [`HEADER_SIZE`].
    pub header_size: AtomicU32,
    /// [`SLOT_SIZE`].
    pub slot_size: AtomicU32,
    /// Total file size in bytes.
    pub file_size: AtomicU64,
    /// Agent (producer) pid.
    pub agent_pid: AtomicU32,
    /// Bit 0: [`FLAG_CLOSED`].
    pub flags: AtomicU32,
    /// CLOCK_MONOTONIC milliseconds of the producer's last heartbeat (0: never).
    pub heartbeat_ms: AtomicU64,
    /// The nonce of this ring's seal file ([`SealHeader::nonce`]).
    pub seal_nonce: AtomicU64,
    _reserved: [AtomicU64; 8],
}

/// The seal file's header: written by the producer only, mapped read-only by consumers.
#[repr(C)]
pub struct SealHeader {
    /// [`SEAL_MAGIC`].
    pub magic: AtomicU64,
    /// [`LAYOUT_VERSION`].
    pub version: AtomicU32,
    _pad: AtomicU32,
    /// Equal to the ring file's [`Ident::seal_nonce`]; never 0.
    pub nonce: AtomicU64,
    /// The ring's capacity.
    pub capacity: AtomicU64,
    /// The largest `head` the producer has seen; `head` below it was rewound.
    pub floor: AtomicU64,
    _reserved: [AtomicU64; 11],
}

impl SealHeader {
    /// A zeroed seal header (as in a fresh file), for in-memory rings.
    pub fn new() -> Self {
        SealHeader {
            magic: AtomicU64::new(0),
            version: AtomicU32::new(0),
            _pad: AtomicU32::new(0),
            nonce: AtomicU64::new(0),
            capacity: AtomicU64::new(0),
            floor: AtomicU64::new(0),
            _reserved: core::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Default for SealHeader {
    fn default() -> Self {
        Self::new()
    }
}

/// File size of a seal for `capacity` slots.
pub const fn seal_file_size(capacity: u64) -> usize {
    SEAL_HEADER_SIZE + capacity as usize * SLOT_SIZE
}

/// The producer's line: `tail` and the sleep/wake words.
#[repr(C)]
pub struct ProducerLine {
    /// Blocks published so far; block `tail - 1` is the newest.
    pub tail: AtomicU64,
    /// Futex word (shared, not `FUTEX_PRIVATE`): the producer bumps it before `FUTEX_WAKE`.
    pub wake_seq: AtomicU32,
    /// Consumers between "registered to sleep" and "woke up". A consumer killed while asleep
    /// leaves it one too high forever: the producer then makes a useless `FUTEX_WAKE` per push.
    pub waiters: AtomicU32,
}

/// The ring header at offset 0 of the file. Head and tail each sit on their own 128-byte
/// `CachePadded` block: on x86-64 the spatial prefetcher pulls cache lines in pairs, so 64-byte
/// padding would still let producer and consumers false-share (crossbeam's reasoning).
#[repr(C)]
pub struct Header {
    /// Identity, geometry and liveness.
    pub ident: CachePadded<Ident>,
    /// Consumer cursor: `block_index << OFFSET_BITS | offset`. Only ever increases (CAS).
    /// `(b, off)` means ids `off..count` of block `b` are still to be taken; `(b, 0)` with block
    /// `b` not yet published is the "empty but advanced" state and reads as empty.
    pub head: CachePadded<AtomicU64>,
    /// Producer-written counters.
    pub producer: CachePadded<ProducerLine>,
}

/// One slot: a block of `count` consecutive ids starting at `first_hi << 64 | first_lo`.
#[repr(C)]
pub struct Slot {
    /// `0`: empty or being written; `b + 1`: holds block `b`. Written last, with Release.
    pub stamp: AtomicU64,
    /// Low 64 bits of the first id.
    pub first_lo: AtomicU64,
    /// High 64 bits of the first id.
    pub first_hi: AtomicU64,
    /// Number of ids, `1..=BLOCK_IDS_MAX`.
    pub count: AtomicU64,
}

impl Slot {
    /// An empty slot (stamp 0), as in a zero-filled file.
    pub fn new() -> Self {
        Slot {
            stamp: AtomicU64::new(0),
            first_lo: AtomicU64::new(0),
            first_hi: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl Default for Slot {
    fn default() -> Self {
        Self::new()
    }
}

impl Header {
    /// A header as the producer initialises it (for in-memory rings: tests and models).
    pub fn new(width: u8, capacity: u64) -> Self {
        Header {
            ident: CachePadded::new(Ident {
                magic: AtomicU64::new(MAGIC),
                version: AtomicU32::new(LAYOUT_VERSION),
                width: AtomicU8::new(width),
                _pad: core::array::from_fn(|_| AtomicU8::new(0)),
                capacity: AtomicU64::new(capacity),
                header_size: AtomicU32::new(HEADER_SIZE as u32),
                slot_size: AtomicU32::new(SLOT_SIZE as u32),
                file_size: AtomicU64::new(file_size(capacity) as u64),
                agent_pid: AtomicU32::new(0),
                flags: AtomicU32::new(0),
                heartbeat_ms: AtomicU64::new(0),
                seal_nonce: AtomicU64::new(0),
                _reserved: core::array::from_fn(|_| AtomicU64::new(0)),
            }),
            head: CachePadded::new(AtomicU64::new(0)),
            producer: CachePadded::new(ProducerLine {
                tail: AtomicU64::new(0),
                wake_seq: AtomicU32::new(0),
                waiters: AtomicU32::new(0),
            }),
        }
    }
}

/// File size of a ring with `capacity` slots. `capacity <= CAPACITY_MAX`, so no overflow.
pub const fn file_size(capacity: u64) -> usize {
    HEADER_SIZE + capacity as usize * SLOT_SIZE
}

/// Whether `width` is a supported id width.
pub const fn width_ok(width: u8) -> bool {
    matches!(width, 2 | 4 | 8 | 16)
}

/// Largest id of a `width`-byte sequence.
pub const fn id_max(width: u8) -> u128 {
    if width >= 16 {
        u128::MAX
    } else {
        (1u128 << (8 * width as u32)) - 1
    }
}

// Layout assertions. loom's atomics carry model state and are larger, so only real builds check.
#[cfg(not(loom))]
mod asserts {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};
    const _: () = assert!(
        size_of::<CachePadded<u64>>() == 128,
        "layout needs 128-byte CachePadded"
    );
    const _: () = assert!(
        cfg!(target_endian = "little"),
        "the file layout is little-endian"
    );
    const _: () = assert!(size_of::<Ident>() == 128);
    const _: () = assert!(offset_of!(Ident, magic) == 0);
    const _: () = assert!(offset_of!(Ident, version) == 8);
    const _: () = assert!(offset_of!(Ident, width) == 12);
    const _: () = assert!(offset_of!(Ident, capacity) == 16);
    const _: () = assert!(offset_of!(Ident, header_size) == 24);
    const _: () = assert!(offset_of!(Ident, slot_size) == 28);
    const _: () = assert!(offset_of!(Ident, file_size) == 32);
    const _: () = assert!(offset_of!(Ident, agent_pid) == 40);
    const _: () = assert!(offset_of!(Ident, flags) == 44);
    const _: () = assert!(offset_of!(Ident, heartbeat_ms) == 48);
    const _: () = assert!(offset_of!(Ident, seal_nonce) == 56);
    const _: () = assert!(size_of::<SealHeader>() == SEAL_HEADER_SIZE);
    const _: () = assert!(offset_of!(SealHeader, nonce) == 16);
    const _: () = assert!(offset_of!(SealHeader, capacity) == 24);
    const _: () = assert!(offset_of!(SealHeader, floor) == 32);
    const _: () = assert!(SEAL_HEADER_SIZE % align_of::<Slot>() == 0);
    const _: () = assert!(size_of::<ProducerLine>() == 16);
    const _: () = assert!(offset_of!(ProducerLine, tail) == 0);
    const _: () = assert!(offset_of!(ProducerLine, wake_seq) == WAKE_SEQ_OFFSET - TAIL_OFFSET);
    const _: () = assert!(offset_of!(ProducerLine, waiters) == WAITERS_OFFSET - TAIL_OFFSET);
    const _: () = assert!(size_of::<Header>() == HEADER_SIZE);
    const _: () = assert!(align_of::<Header>() == 128);
    const _: () = assert!(offset_of!(Header, ident) == 0);
    const _: () = assert!(offset_of!(Header, head) == HEAD_OFFSET);
    const _: () = assert!(offset_of!(Header, producer) == TAIL_OFFSET);
    const _: () = assert!(size_of::<Slot>() == SLOT_SIZE);
    const _: () = assert!(align_of::<Slot>() == 8);
    const _: () = assert!(offset_of!(Slot, stamp) == 0);
    const _: () = assert!(offset_of!(Slot, first_lo) == 8);
    const _: () = assert!(offset_of!(Slot, first_hi) == 16);
    const _: () = assert!(offset_of!(Slot, count) == 24);
    const _: () = assert!(HEADER_SIZE % align_of::<Slot>() == 0);
    const _: () = assert!(size_of::<AtomicU64>() == 8 && align_of::<AtomicU64>() == 8);
    const _: () = assert!(BLOCKS_MAX + 1 == 1 << BLOCK_INDEX_BITS);
    const _: () = assert!(CAPACITY_MAX.is_power_of_two() && CAPACITY_MIN.is_power_of_two());
}
