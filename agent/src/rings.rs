//! The ring writer: one shared-memory ring `Producer` per sequence, created when the
//! machine asks ([`Output::OpenRing`](crate::machine::Output)), the blocks it wrote that
//! do not fit the ring's free slots yet (held, in order), and what consumers took (for the
//! machine's rate measurement).

use std::collections::VecDeque;
use std::path::PathBuf;

use unid_proto::{SequenceName, Width};
use unid_ring::{Producer, ProducerOptions, RingError};

use crate::AgentConfig;

/// One sequence's ring.
struct Ring {
    name: SequenceName,
    producer: Option<Producer>,
    /// Written ids not yet in the ring, in increasing order.
    held: VecDeque<(u128, u64)>,
    /// Ids pushed into the ring since start.
    pushed: u128,
}

/// Every sequence's ring, indexed as the machine's sequences.
pub(crate) struct Rings {
    dir: PathBuf,
    capacity: u64,
    mode: u32,
    rings: Vec<Ring>,
}

impl Rings {
    pub(crate) fn new(config: &AgentConfig) -> Rings {
        Rings {
            dir: config.ring_dir.clone(),
            capacity: config.ring_capacity,
            mode: config.ring_mode,
            rings: config
                .sequences
                .iter()
                .map(|name| Ring {
                    name: name.clone(),
                    producer: None,
                    held: VecDeque::new(),
                    pushed: 0,
                })
                .collect(),
        }
    }

    /// Creates ring `index` for ids of `width`, or says why it cannot.
    pub(crate) fn open(&mut self, index: usize, width: Width) -> Result<(), String> {
        let r = &mut self.rings[index];
        if r.producer.is_some() {
            return Ok(());
        }
        let mut opts = ProducerOptions::new(width.bytes());
        opts.capacity = self.capacity;
        opts.mode = self.mode;
        match Producer::create(&self.dir, r.name.as_str(), &opts) {
            Ok(p) => {
                tracing::info!(sequence = %r.name, path = %p.path().display(), width = width.bytes(), "ring created");
                r.producer = Some(p);
                Ok(())
            }
            Err(RingError::InUse { pid, .. }) => {
                Err(format!("another agent (pid {pid}) serves this ring"))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Appends `first..first + count` to ring `index` (held until slots free), then pushes
    /// what fits. Calls `refused` with the ids of each block the ring refuses.
    pub(crate) fn write(
        &mut self,
        index: usize,
        first: u128,
        count: u64,
        refused: &mut impl FnMut(u64),
    ) {
        self.rings[index].held.push_back((first, count));
        self.push(index, refused);
    }

    /// Marks ring `index` alive, moves held ids into it as slots allow, and returns the
    /// ids consumers took from it so far (pushed minus still there); `None` without a ring.
    pub(crate) fn service(&mut self, index: usize, refused: &mut impl FnMut(u64)) -> Option<u128> {
        let r = &self.rings[index];
        let p = r.producer.as_ref()?;
        p.heartbeat_now();
        let taken = r.pushed - u128::from(p.ids_available());
        self.push(index, refused);
        Some(taken)
    }

    fn push(&mut self, index: usize, refused: &mut impl FnMut(u64)) {
        let r = &mut self.rings[index];
        let Some(p) = &mut r.producer else {
            return;
        };
        while let Some(&(first, count)) = r.held.front() {
            match p.push(first, count) {
                Ok(n) if n == count => {
                    r.held.pop_front();
                    r.pushed += u128::from(n);
                }
                Ok(n) => {
                    if n > 0 {
                        r.held[0] = (first + u128::from(n), count - n);
                        r.pushed += u128::from(n);
                    }
                    break;
                }
                Err(e) => {
                    // Never retried: dropping the block loses ids, never repeats them.
                    tracing::error!(sequence = %r.name, "ring refused block {first}+{count}: {e}");
                    r.held.pop_front();
                    refused(count);
                }
            }
        }
    }

    /// Ids in ring `index`, not yet taken.
    pub(crate) fn ring_ids(&self, index: usize) -> u64 {
        self.rings[index]
            .producer
            .as_ref()
            .map_or(0, |p| p.ids_available())
    }

    /// Ids written to ring `index` but not in it yet (slots full).
    pub(crate) fn held_ids(&self, index: usize) -> u64 {
        self.rings[index]
            .held
            .iter()
            .fold(0u64, |a, (_, c)| a.saturating_add(*c))
    }

    /// Ids pushed into ring `index` since start.
    pub(crate) fn pushed(&self, index: usize) -> u128 {
        self.rings[index].pushed
    }

    /// Drops every producer: marks the rings closed (consumers drain them).
    pub(crate) fn close(&mut self) {
        for r in &mut self.rings {
            r.producer = None;
        }
    }
}
