//! The unid shared-memory id ring: one producer (the agent) keeps a file-backed ring of id blocks
//! full; any number of consumer processes and threads on the host map it and take ids with a
//! few atomic operations and no syscall.
//!
//! * Algorithm, soundness argument and references: [`raw`].
//! * File layout with every offset and encoding: [`layout`].
//! * Guarantees, tests and how to run them under miri and loom: `ring/README.md`.
//!
//! ```no_run
//! use unid_ring::{Consumer, Producer, ProducerOptions};
//! # fn main() -> Result<(), unid_ring::RingError> {
//! let dir = std::path::Path::new("/dev/shm/unid");
//! let mut producer = Producer::create(dir, "orders", &ProducerOptions::new(8))?;
//! producer.push(1_000, 500)?; // ids 1000..1500
//! let consumer = Consumer::open(dir, "orders")?;
//! let id = consumer.try_take()?;
//! let batch = consumer.try_take_range(64)?; // up to 64 consecutive ids
//! assert!(batch.first > id);
//! # Ok(()) }
//! ```
#![warn(unsafe_op_in_unsafe_fn)]

pub mod layout;
pub mod raw;
mod sync;

#[cfg(not(loom))]
mod error;
#[cfg(not(loom))]
pub mod secure;
#[cfg(not(loom))]
mod shm;

#[cfg(not(loom))]
pub use error::RingError;
pub use raw::IdRange;
#[cfg(not(loom))]
pub use shm::monotonic_ms;

#[cfg(not(loom))]
pub use ring::*;

#[cfg(not(loom))]
mod ring {
    use crate::error::RingError;
    use crate::layout::{
        self, CAPACITY_MAX, CAPACITY_MIN, FLAG_CLOSED, HEADER_SIZE, LAYOUT_VERSION, MAGIC,
        SLOT_SIZE,
    };
    use crate::raw::{IdRange, ProducerCore, PushError, RingRef, Take};
    use crate::shm::{self, Mapping};
    use crate::sync::Ordering;
    use std::fs::{File, OpenOptions};
    use std::io;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    use std::path::{Path, PathBuf};
    use std::sync::atomic::AtomicU64 as StdAtomicU64;
    use std::time::{Duration, Instant};

    /// Default directory of ring files: one file per sequence, named after it.
    pub const DEFAULT_DIR: &str = "/dev/shm/unid";

    fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RingError + 'a {
        move |source| RingError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    fn ring_path(dir: &Path, name: &str) -> Result<PathBuf, RingError> {
        let bad = name.is_empty()
            || name.len() > 200
            || name.starts_with('.')
            || name.bytes().any(|b| b == b'/' || b == 0);
        if bad {
            return Err(RingError::InvalidName {
                name: name.to_owned(),
            });
        }
        Ok(dir.join(name))
    }

    /// How the agent creates a ring.
    #[derive(Clone, Debug)]
    pub struct ProducerOptions {
        /// Id width in bytes: 2, 4, 8 or 16.
        pub width: u8,
        /// Slots (blocks in flight), a power of two in `2..=2^24`. Default 1024.
        pub capacity: u64,
        /// File mode: `0o600` (agent's user only, the default) or `0o660` (and `group`).
        pub mode: u32,
        /// Group to give the file (with mode `0o660`); `None` keeps the agent's group.
        pub group: Option<u32>,
    }

    impl ProducerOptions {
        /// Defaults for a `width`-byte sequence: 1024 slots, mode 0600.
        pub fn new(width: u8) -> Self {
            ProducerOptions {
                width,
                capacity: 1024,
                mode: 0o600,
                group: None,
            }
        }
    }

    static TEMP_SEQ: StdAtomicU64 = StdAtomicU64::new(0);

    /// The agent's end of a ring. Dropping it marks the ring closed: consumers drain what is left
    /// and then get [`RingError::Closed`]. The file stays (a new agent replaces it atomically).
    pub struct Producer {
        map: Mapping,
        core: ProducerCore,
        path: PathBuf,
        width: u8,
    }

    impl Producer {
        /// Creates (or atomically replaces) the ring file `dir/name`: the file is built under a
        /// temporary name and renamed into place, so no consumer ever maps a half-initialised
        /// ring. Creates `dir` if missing. Consumers of a replaced ring keep their old mapping
        /// and see its agent as dead or closed, then reopen. Refuses ([`RingError::InUse`]) to
        /// replace a ring whose agent is another live process (not closed, heartbeat fresh, pid
        /// present); this check is advisory (two agents starting at the same instant both pass).
        pub fn create(
            dir: &Path,
            name: &str,
            opts: &ProducerOptions,
        ) -> Result<Producer, RingError> {
            if !layout::width_ok(opts.width) {
                return Err(RingError::InvalidConfig {
                    reason: "width must be 2, 4, 8 or 16",
                });
            }
            if !opts.capacity.is_power_of_two()
                || !(CAPACITY_MIN..=CAPACITY_MAX).contains(&opts.capacity)
            {
                return Err(RingError::InvalidConfig {
                    reason: "capacity must be a power of two in 2..=2^24",
                });
            }
            if opts.mode != 0o600 && opts.mode != 0o660 {
                return Err(RingError::InvalidConfig {
                    reason: "mode must be 0o600 or 0o660",
                });
            }
            let path = ring_path(dir, name)?;
            crate::secure::secure_dir_for_agent(dir, opts.group, opts.mode == 0o660)?;
            // One agent per ring: refuse to replace a ring another live agent still serves.
            if let Ok(existing) = Consumer::open(dir, name) {
                let pid = existing
                    .map
                    .header()
                    .ident
                    .agent_pid
                    .load(Ordering::Relaxed);
                if pid != std::process::id() && existing.check_agent().is_ok() {
                    return Err(RingError::InUse { path, pid });
                }
            }
            let tmp = dir.join(format!(
                ".{name}.tmp.{}.{}",
                std::process::id(),
                TEMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            let result = Self::build(&tmp, &path, opts);
            if result.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            result
        }

        fn build(tmp: &Path, path: &Path, opts: &ProducerOptions) -> Result<Producer, RingError> {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(opts.mode)
                .custom_flags(libc::O_CLOEXEC)
                .open(tmp)
                .map_err(io_err("create", tmp))?;
            // The umask may have cleared bits of `mode`: set it exactly.
            file.set_permissions(std::fs::Permissions::from_mode(opts.mode))
                .map_err(io_err("fchmod", tmp))?;
            if let Some(gid) = opts.group {
                std::os::unix::fs::fchown(&file, None, Some(gid)).map_err(io_err("fchown", tmp))?;
            }
            let len = layout::file_size(opts.capacity);
            file.set_len(len as u64).map_err(io_err("ftruncate", tmp))?;
            let mut map = Mapping::map(&file, len).map_err(io_err("mmap", tmp))?;
            map.set_capacity(opts.capacity as usize);
            // The file is zero-filled: a valid empty ring. Write the identity fields.
            let id = &map.header().ident;
            id.version.store(LAYOUT_VERSION, Ordering::Relaxed);
            id.width.store(opts.width, Ordering::Relaxed);
            id.capacity.store(opts.capacity, Ordering::Relaxed);
            id.header_size.store(HEADER_SIZE as u32, Ordering::Relaxed);
            id.slot_size.store(SLOT_SIZE as u32, Ordering::Relaxed);
            id.file_size.store(len as u64, Ordering::Relaxed);
            id.agent_pid.store(std::process::id(), Ordering::Relaxed);
            id.heartbeat_ms
                .store(shm::monotonic_ms(), Ordering::Relaxed);
            id.magic.store(MAGIC, Ordering::Release);
            // rename(2) is atomic: consumers see the old file or this complete one.
            std::fs::rename(tmp, path).map_err(io_err("rename", path))?;
            Ok(Producer {
                map,
                core: ProducerCore::new(opts.capacity, layout::id_max(opts.width)),
                path: path.to_path_buf(),
                width: opts.width,
            })
        }

        fn ring(&self) -> RingRef<'_> {
            self.map.ring()
        }

        /// Publishes ids `first .. first + count` (split into blocks of at most 2^20 ids) as far as
        /// free slots allow, and wakes sleeping consumers if any. Returns the number of ids
        /// accepted: `count` when all fit, 0 when the ring is full; push the rest
        /// (`first + accepted ..`) later. Ids must increase: `first` at least the end of the
        /// previous push.
        pub fn push(&mut self, first: u128, count: u64) -> Result<u64, RingError> {
            let ring = self.map.ring();
            let accepted = self.core.push(&ring, first, count).map_err(|e| match e {
                PushError::NotIncreasing { next_min } => {
                    RingError::NotIncreasing { first, next_min }
                }
                PushError::OutOfRange => RingError::OutOfRange {
                    first,
                    count,
                    width: self.width,
                },
                PushError::Exhausted => RingError::Exhausted,
            })?;
            if accepted > 0 && ProducerCore::waiters_present(&ring) {
                ProducerCore::bump_wake_seq(&ring);
                shm::futex_wake_all(&ring.header().producer.wake_seq);
            }
            Ok(accepted)
        }

        /// Slots free right now (each takes a block of up to 2^20 ids).
        pub fn free_slots(&self) -> u64 {
            self.core.free_slots(&self.ring())
        }

        /// Ids published and not yet taken (for refill decisions).
        pub fn ids_available(&self) -> u64 {
            self.core.ids_available(&self.ring())
        }

        /// Records liveness: `now_ms` on the [`monotonic_ms`](crate::monotonic_ms) clock. Call it
        /// well within consumers' `agent_stale_ms` (e.g. every 100 ms for the 5 s default).
        pub fn heartbeat(&self, now_ms: u64) {
            self.ring()
                .header()
                .ident
                .heartbeat_ms
                .store(now_ms, Ordering::Release);
        }

        /// [`Producer::heartbeat`] with the current time.
        pub fn heartbeat_now(&self) {
            self.heartbeat(shm::monotonic_ms());
        }

        /// Path of the ring file.
        pub fn path(&self) -> &Path {
            &self.path
        }

        /// Slots in the ring.
        pub fn capacity(&self) -> u64 {
            self.ring().capacity()
        }
    }

    impl Drop for Producer {
        fn drop(&mut self) {
            let ring = self.map.ring();
            let h = ring.header();
            h.ident.flags.fetch_or(FLAG_CLOSED, Ordering::Release);
            h.producer.wake_seq.fetch_add(1, Ordering::Release);
            shm::futex_wake_all(&h.producer.wake_seq);
        }
    }

    /// How a consumer waits and judges the agent's liveness.
    #[derive(Clone, Debug)]
    pub struct ConsumerOptions {
        /// The agent counts as dead (when the ring is empty) once its heartbeat is older. Default 5000.
        pub agent_stale_ms: u64,
        /// Also treat the agent as dead when its pid no longer exists (checked only while
        /// waiting). Turn off when the agent runs in another pid namespace. Default true.
        pub check_pid: bool,
        /// Attempts (with growing pause hints) before sleeping on the futex. Default 64.
        pub spin_attempts: u32,
        /// Longest single futex sleep, bounding how late a dead agent is noticed. Default 50 ms.
        pub sleep_slice_ms: u64,
        /// Refuse ([`RingError::Insecure`]) a ring folder or file not owned by a trusted uid
        /// (this process's euid, root, or `agent_uid`) or writable by others, a symlinked
        /// folder or file, or an untrusted folder above it. Default true.
        pub check_owner: bool,
        /// The agent's uid when it runs as another user than this process (and not as root).
        pub agent_uid: Option<u32>,
    }

    impl Default for ConsumerOptions {
        fn default() -> Self {
            ConsumerOptions {
                agent_stale_ms: 5000,
                check_pid: true,
                spin_attempts: 64,
                sleep_slice_ms: 50,
                check_owner: true,
                agent_uid: None,
            }
        }
    }

    impl ConsumerOptions {
        /// The uids trusted to own the ring folder and file: this process's euid, root, and
        /// `agent_uid` if set.
        pub fn owners(&self) -> Vec<u32> {
            let mut v = vec![crate::secure::euid(), 0];
            v.extend(self.agent_uid);
            v
        }
    }

    /// A consumer's mapping of a ring. `Sync`: threads may share one `&Consumer`.
    pub struct Consumer {
        map: Mapping,
        path: PathBuf,
        width: u8,
        opts: ConsumerOptions,
    }

    impl Consumer {
        /// Opens `dir/name` with default options.
        pub fn open(dir: &Path, name: &str) -> Result<Consumer, RingError> {
            Self::open_with(dir, name, ConsumerOptions::default())
        }

        /// Opens `dir/name`, refusing with a typed error a file this build does not understand.
        pub fn open_with(
            dir: &Path,
            name: &str,
            opts: ConsumerOptions,
        ) -> Result<Consumer, RingError> {
            let path = ring_path(dir, name)?;
            let owners = opts.owners();
            if opts.check_owner {
                match crate::secure::check_dir(dir, &owners) {
                    Err(RingError::Io { source, .. })
                        if source.kind() == io::ErrorKind::NotFound =>
                    {
                        return Err(RingError::NotFound { path });
                    }
                    other => other?,
                }
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| match e.kind() {
                    _ if e.raw_os_error() == Some(libc::ELOOP) => RingError::Insecure {
                        path: path.clone(),
                        reason: "the ring file is a symlink".to_owned(),
                    },
                    io::ErrorKind::NotFound => RingError::NotFound { path: path.clone() },
                    io::ErrorKind::PermissionDenied => {
                        RingError::PermissionDenied { path: path.clone() }
                    }
                    _ => RingError::Io {
                        op: "open",
                        path: path.clone(),
                        source: e,
                    },
                })?;
            Self::from_file(&file, path, opts)
        }

        fn from_file(
            file: &File,
            path: PathBuf,
            opts: ConsumerOptions,
        ) -> Result<Consumer, RingError> {
            let corrupt = |reason| RingError::Corrupt {
                path: path.clone(),
                reason,
            };
            let meta = file.metadata().map_err(io_err("fstat", &path))?;
            if opts.check_owner {
                crate::secure::check_file(&path, &meta, &opts.owners())?;
            }
            let len = meta.len();
            if len < 8 {
                return Err(RingError::BadMagic {
                    path: path.clone(),
                    found: 0,
                });
            }
            if len < HEADER_SIZE as u64 {
                return Err(corrupt("shorter than the header"));
            }
            let len = usize::try_from(len).map_err(|_| corrupt("file too large"))?;
            let mut map = Mapping::map(file, len).map_err(io_err("mmap", &path))?;
            let id = &map.header().ident;
            let magic = id.magic.load(Ordering::Acquire);
            if magic != MAGIC {
                return Err(RingError::BadMagic {
                    path: path.clone(),
                    found: magic,
                });
            }
            let version = id.version.load(Ordering::Relaxed);
            if version != LAYOUT_VERSION {
                return Err(RingError::UnsupportedVersion {
                    path: path.clone(),
                    found: version,
                    supported: LAYOUT_VERSION,
                });
            }
            let width = id.width.load(Ordering::Relaxed);
            if !layout::width_ok(width) {
                return Err(corrupt("width not 2, 4, 8 or 16"));
            }
            let capacity = id.capacity.load(Ordering::Relaxed);
            if !capacity.is_power_of_two() || !(CAPACITY_MIN..=CAPACITY_MAX).contains(&capacity) {
                return Err(corrupt("capacity not a power of two in range"));
            }
            if id.header_size.load(Ordering::Relaxed) != HEADER_SIZE as u32
                || id.slot_size.load(Ordering::Relaxed) != SLOT_SIZE as u32
            {
                return Err(corrupt(
                    "header or slot size differs from this layout version",
                ));
            }
            let file_size = id.file_size.load(Ordering::Relaxed);
            if file_size != layout::file_size(capacity) as u64 || file_size != len as u64 {
                return Err(corrupt("file size does not match capacity"));
            }
            map.set_capacity(capacity as usize);
            Ok(Consumer {
                map,
                path,
                width,
                opts,
            })
        }

        /// Id width in bytes (2, 4, 8 or 16); ids are returned as `u128` whatever the width.
        pub fn width(&self) -> u8 {
            self.width
        }

        /// Path of the ring file.
        pub fn path(&self) -> &Path {
            &self.path
        }

        /// Takes one id without waiting: `WouldBlock` if the ring is empty, `Closed` or
        /// `AgentDead` if it is empty and will stay so.
        #[inline]
        pub fn try_take(&self) -> Result<u128, RingError> {
            self.try_take_range(1).map(|r| r.first)
        }

        /// Takes up to `max` consecutive ids (at least 1; never across a block boundary, so
        /// possibly fewer than `max` although more are available). `max == 0` counts as 1.
        #[inline]
        pub fn try_take_range(&self, max: u64) -> Result<IdRange, RingError> {
            let ring = self.map.ring();
            // (Starting from a per-thread guess of `head` via `RingRef::take_from` instead of a
            // load was measured: no difference beyond noise, so the simpler path stays.)
            match ring.take(max.max(1)) {
                Take::Got(r) => Ok(r),
                Take::Empty => self.empty(&ring, max),
                Take::Corrupt => Err(self.corrupt()),
            }
        }

        fn corrupt(&self) -> RingError {
            RingError::Corrupt {
                path: self.path.clone(),
                reason: "slot inconsistent with head",
            }
        }

        /// Slow path of an empty take: tells "empty for now" from "closed" and "agent dead".
        #[cold]
        fn empty(&self, ring: &RingRef<'_>, max: u64) -> Result<IdRange, RingError> {
            let id = &ring.header().ident;
            let final_state = if id.flags.load(Ordering::Acquire) & FLAG_CLOSED != 0 {
                Some(RingError::Closed)
            } else {
                let hb = id.heartbeat_ms.load(Ordering::Acquire);
                let age = shm::monotonic_ms().saturating_sub(hb);
                (age > self.opts.agent_stale_ms).then(|| RingError::AgentDead {
                    pid: id.agent_pid.load(Ordering::Relaxed),
                    heartbeat_age_ms: age,
                })
            };
            match final_state {
                None => Err(RingError::WouldBlock),
                // Ids published before the flag / last heartbeat are still handed out.
                Some(e) => match ring.take(max.max(1)) {
                    Take::Got(r) => Ok(r),
                    Take::Empty => Err(e),
                    Take::Corrupt => Err(self.corrupt()),
                },
            }
        }

        /// Whether the agent looks alive: not closed, heartbeat fresh, and (if `check_pid`) its
        /// pid exists.
        pub fn check_agent(&self) -> Result<(), RingError> {
            let id = &self.map.header().ident;
            if id.flags.load(Ordering::Acquire) & FLAG_CLOSED != 0 {
                return Err(RingError::Closed);
            }
            let pid = id.agent_pid.load(Ordering::Relaxed);
            let age = shm::monotonic_ms().saturating_sub(id.heartbeat_ms.load(Ordering::Acquire));
            if age > self.opts.agent_stale_ms || (self.opts.check_pid && !shm::pid_alive(pid)) {
                return Err(RingError::AgentDead {
                    pid,
                    heartbeat_age_ms: age,
                });
            }
            Ok(())
        }

        /// Takes one id, waiting up to `timeout` for the agent to refill an empty ring.
        pub fn take_timeout(&self, timeout: Duration) -> Result<u128, RingError> {
            self.take_range_timeout(1, timeout).map(|r| r.first)
        }

        /// Takes up to `max` ids, waiting up to `timeout` if the ring is empty: a bounded spin,
        /// then sleeps on the shared futex `wake_seq` in slices of at most `sleep_slice_ms`,
        /// checking the agent's liveness between slices. Never spins unboundedly; returns
        /// [`RingError::TimedOut`], `Closed` or `AgentDead` instead of hanging.
        pub fn take_range_timeout(
            &self,
            max: u64,
            timeout: Duration,
        ) -> Result<IdRange, RingError> {
            match self.try_take_range(max) {
                Err(RingError::WouldBlock) => {}
                other => return other,
            }
            for attempt in 0..self.opts.spin_attempts {
                for _ in 0..(1u32 << attempt.min(6)) {
                    std::hint::spin_loop();
                }
                match self.try_take_range(max) {
                    Err(RingError::WouldBlock) => {}
                    other => return other,
                }
            }
            let deadline = Instant::now() + timeout;
            let ring = self.map.ring();
            let p = &ring.header().producer;
            loop {
                // Register, then re-check: pairs with the producer's SeqCst fence before it reads
                // `waiters` (see `ProducerCore::waiters_present`), so no wake-up is lost.
                let seq = ring.register_waiter();
                let got = self.try_take_range(max);
                let now = Instant::now();
                if !matches!(got, Err(RingError::WouldBlock)) || now >= deadline {
                    ring.unregister_waiter();
                    return match got {
                        Err(RingError::WouldBlock) => Err(RingError::TimedOut),
                        other => other,
                    };
                }
                let slice =
                    (deadline - now).min(Duration::from_millis(self.opts.sleep_slice_ms.max(1)));
                shm::futex_wait(&p.wake_seq, seq, slice);
                ring.unregister_waiter();
                if ring.wake_seq() == seq && self.opts.check_pid {
                    // Slept a whole slice without a wake: is the agent still there?
                    let id = &ring.header().ident;
                    let pid = id.agent_pid.load(Ordering::Relaxed);
                    if !shm::pid_alive(pid) {
                        return match ring.take(max.max(1)) {
                            Take::Got(r) => Ok(r),
                            Take::Empty => Err(RingError::AgentDead {
                                pid,
                                heartbeat_age_ms: shm::monotonic_ms()
                                    .saturating_sub(id.heartbeat_ms.load(Ordering::Acquire)),
                            }),
                            Take::Corrupt => Err(self.corrupt()),
                        };
                    }
                }
            }
        }
    }
}
