//! A simulated disk for redb: writes land in a volatile image, `sync_data`
//! makes them durable, and a crash keeps only what was synced (plus, if
//! asked, a random subset of the unsynced writes: a disk may have written
//! any of them, in any order, before power was lost).
//!
//! The real store ([`unid_consensus::store::open_with_backend`]) runs on it,
//! so the redb commit protocol, its recovery after a torn commit, and the
//! store's fsync discipline are what is tested, not a model of them.
//!
//! A disk can also be armed to **fail mid-transaction**: after `n` more
//! writes every operation fails, as when the process dies in the middle of
//! a commit. The store turns the error into an openraft storage error, Raft
//! stops (fail-stop), and the simulator then crashes and restarts the
//! server from what was synced.

use std::sync::{Arc, Mutex, MutexGuard};

use rand::Rng;

/// Largest disk image, in bytes: a bound on what a run can write.
pub const DISK_BYTES_MAX: u64 = 256 << 20;

#[derive(Debug)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct State {
    /// What reads see: every write so far.
    current: Vec<u8>,
    /// What survives a crash: the image at the last `sync_data`.
    durable: Vec<u8>,
    /// Writes and resizes since the last sync, in order.
    pending: Vec<Op>,
    /// Set by a crash (or an armed failure): every later operation fails.
    dead: bool,
    /// Writes left before the disk fails, if armed.
    fail_after_writes: Option<u64>,
    /// Counters.
    stats: DiskStats,
}

/// Counters of one disk (one server incarnation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Writes.
    pub writes: u64,
    /// `sync_data` calls.
    pub syncs: u64,
    /// Unsynced writes lost at the crash that ended this disk.
    pub lost_writes: u64,
    /// Unsynced writes that survived that crash (torn commit).
    pub kept_writes: u64,
}

/// One server's disk, shared between the redb database and the simulator.
#[derive(Clone, Debug, Default)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
}

/// Resizes `image` to `len`, zero-filling. Grows by allocating zeroed
/// memory and copying (`Vec::resize` fills byte by byte, which is slow in
/// the debug builds the tests run).
fn set_len(image: &mut Vec<u8>, len: usize) {
    if len <= image.len() {
        image.truncate(len);
    } else {
        let mut grown = vec![0u8; len];
        grown[..image.len()].copy_from_slice(image);
        *image = grown;
    }
}

fn apply(image: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write { offset, data } => {
            let end = *offset as usize + data.len();
            if image.len() < end {
                set_len(image, end);
            }
            image[*offset as usize..end].copy_from_slice(data);
        }
        Op::SetLen(len) => set_len(image, *len as usize),
    }
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The power goes out: this disk is dead for good (its database gets an
    /// error on every later call) and a new disk is returned holding what
    /// was synced, plus each unsynced write with probability 1/2 if `torn`.
    pub fn crash<R: Rng>(&self, rng: &mut R, torn: bool) -> SimDisk {
        let mut s = self.lock();
        s.dead = true;
        let mut image = s.durable.clone();
        let pending = std::mem::take(&mut s.pending);
        for op in &pending {
            if torn && rng.random_bool(0.5) {
                apply(&mut image, op);
                s.stats.kept_writes += 1;
            } else {
                s.stats.lost_writes += 1;
            }
        }
        SimDisk {
            state: Arc::new(Mutex::new(State {
                current: image.clone(),
                durable: image,
                ..State::default()
            })),
        }
    }

    /// Arms a failure: after `writes` more writes, every operation fails.
    pub fn fail_after_writes(&self, writes: u64) {
        self.lock().fail_after_writes = Some(writes);
    }

    /// Whether this disk has failed or crashed.
    pub fn is_dead(&self) -> bool {
        self.lock().dead
    }

    /// This disk's counters.
    pub fn stats(&self) -> DiskStats {
        self.lock().stats
    }

    /// Unsynced operations pending (lost on a crash).
    pub fn unsynced_ops(&self) -> usize {
        self.lock().pending.len()
    }
}

fn dead() -> std::io::Error {
    std::io::Error::other("simulated disk: crashed")
}

impl redb::StorageBackend for SimDisk {
    fn len(&self) -> Result<u64, std::io::Error> {
        let s = self.lock();
        if s.dead {
            return Err(dead());
        }
        Ok(s.current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let s = self.lock();
        if s.dead {
            return Err(dead());
        }
        let end = offset as usize + out.len();
        if end > s.current.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "simulated disk: read past the end",
            ));
        }
        out.copy_from_slice(&s.current[offset as usize..end]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let mut s = self.lock();
        if s.dead {
            return Err(dead());
        }
        if len > DISK_BYTES_MAX {
            return Err(std::io::Error::other("simulated disk: full"));
        }
        let op = Op::SetLen(len);
        apply(&mut s.current, &op);
        s.pending.push(op);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        let mut s = self.lock();
        if s.dead {
            return Err(dead());
        }
        let pending = std::mem::take(&mut s.pending);
        for op in &pending {
            apply(&mut s.durable, op);
        }
        s.stats.syncs += 1;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut s = self.lock();
        if s.dead {
            return Err(dead());
        }
        if let Some(n) = s.fail_after_writes.as_mut() {
            if *n == 0 {
                s.dead = true;
                return Err(dead());
            }
            *n -= 1;
        }
        if offset + data.len() as u64 > DISK_BYTES_MAX {
            return Err(std::io::Error::other("simulated disk: full"));
        }
        let op = Op::Write {
            offset,
            data: data.to_vec(),
        };
        apply(&mut s.current, &op);
        s.pending.push(op);
        s.stats.writes += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use redb::StorageBackend;

    use super::*;

    #[test]
    fn a_crash_keeps_what_was_synced_and_the_old_disk_dies() {
        let d = SimDisk::new();
        d.write(0, b"abcd").unwrap();
        d.sync_data().unwrap();
        d.write(0, b"XY").unwrap();
        d.set_len(8).unwrap();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let after = d.crash(&mut rng, false);
        assert!(d.is_dead() && d.write(0, b"z").is_err() && d.len().is_err());
        let mut out = [0u8; 4];
        after.read(0, &mut out).unwrap();
        assert_eq!(&out, b"abcd");
        assert_eq!(after.len().unwrap(), 4);
        assert_eq!(d.stats().lost_writes, 2);
    }

    #[test]
    fn an_armed_disk_fails_after_n_writes() {
        let d = SimDisk::new();
        d.fail_after_writes(2);
        d.write(0, b"a").unwrap();
        d.write(1, b"b").unwrap();
        assert!(d.write(2, b"c").is_err());
        assert!(d.is_dead() && d.sync_data().is_err());
    }

    #[test]
    fn the_real_store_recovers_after_a_torn_crash() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let mut torn = 0;
        for round in 0..20 {
            let d = SimDisk::new();
            let opened = unid_consensus::store::open_with_backend(
                d.clone(),
                unid_consensus::store::IoMode::Inline,
                "test",
            );
            assert!(opened.is_ok(), "round {round}: fresh open");
            drop(opened);
            // Fail somewhere inside later writes, then crash keeping a random
            // subset of what was not synced.
            d.fail_after_writes(rng.random_range(0..8));
            let _ = unid_consensus::store::open_with_backend(
                d.clone(),
                unid_consensus::store::IoMode::Inline,
                "test",
            );
            let after = d.crash(&mut rng, true);
            torn += d.stats().kept_writes.min(1);
            let reopened = unid_consensus::store::open_with_backend(
                after,
                unid_consensus::store::IoMode::Inline,
                "test",
            );
            assert!(reopened.is_ok(), "round {round}: {:?}", reopened.err());
        }
        assert!(torn > 0, "no round kept part of an unsynced commit");
    }
}
