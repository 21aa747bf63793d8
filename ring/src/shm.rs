//! The operating-system side: shared mappings, futexes, the monotonic clock, pid probes.
//! Linux only (`FUTEX_WAIT` on a `MAP_SHARED` mapping, see futex(2)).

use crate::layout::{HEADER_SIZE, Header, SEAL_HEADER_SIZE, SealHeader, Slot};
use crate::raw::RingRef;
use crate::sync::AtomicU32;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::time::Duration;

/// A `MAP_SHARED`, read-write mapping of a whole ring file, unmapped on drop.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
}

// SAFETY: the mapping is plain shared memory; everything in it is accessed through atomics
// (see `layout`), so it may be used and dropped from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above: `&Mapping` only hands out `&Header`/`&[Slot]`, whose fields are all atomics.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file`, read-write and shared.
    ///
    /// The caller checked `len >= HEADER_SIZE` and, before calling [`Mapping::ring`], that
    /// `len == HEADER_SIZE + capacity * SLOT_SIZE` for the capacity passed to [`Mapping::set_capacity`].
    pub(crate) fn map(file: &File, len: usize) -> io::Result<Mapping> {
        Self::map_prot(file, len, libc::PROT_READ | libc::PROT_WRITE)
    }

    /// Maps `len` bytes of `file` read-only (a consumer's view of the seal): a stray write
    /// through it faults instead of changing the file.
    pub(crate) fn map_read_only(file: &File, len: usize) -> io::Result<Mapping> {
        Self::map_prot(file, len, libc::PROT_READ)
    }

    fn map_prot(file: &File, len: usize, prot: libc::c_int) -> io::Result<Mapping> {
        assert!(
            len >= HEADER_SIZE.min(SEAL_HEADER_SIZE),
            "a ring or seal mapping holds at least its header"
        );
        // SAFETY: a fresh mapping (addr NULL) of an open fd; the kernel picks the address and
        // checks the fd's access mode against `prot`. No existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(Mapping {
            ptr,
            len,
            capacity: 0,
        })
    }

    /// The header at offset 0.
    pub(crate) fn header(&self) -> &Header {
        debug_assert!(self.len >= HEADER_SIZE);
        // SAFETY: the mapping is page-aligned (>= align_of::<Header>() == 128), at least
        // HEADER_SIZE == size_of::<Header>() bytes long (asserted in `map`) and lives as long as
        // `self`. Every field of `Header` is an atomic (interior mutability) for which every bit
        // pattern is valid, so other processes writing it concurrently is no data race.
        unsafe { self.ptr.cast::<Header>().as_ref() }
    }

    /// The seal header at offset 0 of a seal mapping.
    ///
    /// A read-only mapping hands out `&SealHeader` too: its atomics are only ever loaded by
    /// consumers (a store would fault, and consumers never store: only the producer, through
    /// its own read-write mapping, writes the seal).
    pub(crate) fn seal_header(&self) -> &SealHeader {
        debug_assert!(self.len >= SEAL_HEADER_SIZE);
        // SAFETY: as for `header`: page-aligned, at least SEAL_HEADER_SIZE ==
        // size_of::<SealHeader>() bytes (checked by the caller before mapping; asserted in
        // `map_prot` for the smaller header), all-atomic, alive as long as `self`.
        unsafe { self.ptr.cast::<SealHeader>().as_ref() }
    }

    /// The `capacity` slots after a seal header. [`Mapping::set_seal_capacity`] must have been
    /// called.
    pub(crate) fn seal_slots(&self) -> &[Slot] {
        debug_assert!(self.capacity.is_power_of_two());
        // SAFETY: `set_seal_capacity` checked `len == SEAL_HEADER_SIZE + capacity * SLOT_SIZE`,
        // so the slots lie inside the mapping at an offset aligned for `Slot`; all-atomic.
        unsafe {
            std::slice::from_raw_parts(
                self.ptr.as_ptr().add(SEAL_HEADER_SIZE).cast::<Slot>(),
                self.capacity,
            )
        }
    }

    /// Records the slot count of a seal mapping after checking it against the length.
    pub(crate) fn set_seal_capacity(&mut self, capacity: usize) {
        assert!(capacity.is_power_of_two(), "capacity is a power of two");
        assert_eq!(
            Some(self.len),
            capacity
                .checked_mul(crate::layout::SLOT_SIZE)
                .and_then(|s| s.checked_add(SEAL_HEADER_SIZE)),
            "seal mapping length matches capacity"
        );
        self.capacity = capacity;
    }

    /// Records the slot count after the header was validated against the mapping's length.
    pub(crate) fn set_capacity(&mut self, capacity: usize) {
        assert!(capacity.is_power_of_two(), "capacity is a power of two");
        assert_eq!(
            Some(self.len),
            capacity
                .checked_mul(crate::layout::SLOT_SIZE)
                .and_then(|s| s.checked_add(HEADER_SIZE)),
            "mapping length matches capacity"
        );
        self.capacity = capacity;
    }

    /// Header and slots. [`Mapping::set_capacity`] must have been called.
    #[inline]
    pub(crate) fn ring(&self) -> RingRef<'_> {
        debug_assert!(self.capacity.is_power_of_two());
        // SAFETY: `set_capacity` checked `len == HEADER_SIZE + capacity * SLOT_SIZE`, so
        // `capacity` slots start at offset HEADER_SIZE (a multiple of align_of::<Slot>() == 8 on
        // a page-aligned base) inside the mapping; slots are all-atomic like the header.
        let slots = unsafe {
            std::slice::from_raw_parts(
                self.ptr.as_ptr().add(HEADER_SIZE).cast::<Slot>(),
                self.capacity,
            )
        };
        // SAFETY: `capacity` is a nonzero power of two (asserted in `set_capacity`; `ring` is only
        // called after it, checked by the debug_assert above and by `Producer`/`Consumer`).
        unsafe { RingRef::new_unchecked(self.header(), slots) }
    }
}

impl Mapping {
    /// Slot count recorded by `set_capacity` / `set_seal_capacity` (0 before).
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// A consumer's view: this ring mapping's header (for `head`) with the slots and `floor`
    /// of its `seal` mapping. Both capacities must have been set and be equal.
    #[inline]
    pub(crate) fn ring_sealed<'a>(&'a self, seal: &'a Mapping) -> RingRef<'a> {
        debug_assert_eq!(self.capacity, seal.capacity);
        // SAFETY: `seal.capacity` is a nonzero power of two (asserted in `set_seal_capacity`,
        // which the consumer calls before building any view).
        let view = unsafe { RingRef::new_unchecked(self.header(), seal.seal_slots()) };
        view.with_seal(None, &seal.seal_header().floor)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` came from a successful mmap and are unmapped exactly once; no
        // reference into the mapping outlives `self` (all borrow from `&self`).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Sleeps until `word` is woken or no longer `expected`, or `timeout` passes (FUTEX_WAIT without
/// FUTEX_PRIVATE_FLAG, so wakes from other processes mapping the same file reach it). Spurious
/// returns (EINTR, EAGAIN) are fine: callers re-check.
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT reads the aligned u32 at `word` (valid for the call: we hold a
    // reference) and the timespec on our stack; it writes nothing.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes every waiter on `word` (shared futex).
pub(crate) fn futex_wake_all(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE only uses `word`'s address as a key; it reads and writes no memory.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

/// CLOCK_MONOTONIC in milliseconds: the clock of the header's `heartbeat_ms`, shared by all
/// processes of the host (same boot, same time namespace).
pub fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the valid pointer we pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0, "CLOCK_MONOTONIC is always available on Linux");
    (ts.tv_sec as u64).saturating_mul(1000) + ts.tv_nsec as u64 / 1_000_000
}

/// CLOCK_MONOTONIC in nanoseconds.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the valid pointer we pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0, "CLOCK_MONOTONIC is always available on Linux");
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

/// Whether a process with this pid exists (kill(pid, 0): ESRCH means gone; EPERM means it exists
/// but belongs to another user). Only meaningful in the agent's pid namespace.
pub(crate) fn pid_alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: signal 0 performs only the existence and permission check; nothing is delivered.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}
