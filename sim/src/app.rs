//! The application of a primary/backup pair of agents: consumers that read both agents'
//! rings as the client library's pair mode does (`unid::Unid::take_pair`): ids from the
//! ring used last, the other ring at once when that one is empty, and every id not above
//! the last one returned discarded (the other agent's blocks may be older). It never
//! crashes: it is the application that outlives its agents, so the `unique` and
//! `increasing` invariants cover takeovers, both-active spells after partitions, and each
//! agent's restarts.

use std::sync::{Arc, Mutex};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use unid_proto::Id;

use crate::agent::{Consumer, Rings};
use crate::clock::Clock;
use crate::invariants::Observer;

/// What a pair's consumers did, over the run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PairStats {
    /// Ids returned to consumers.
    pub taken: u128,
    /// Of those, taken from the backup's ring.
    pub from_backup: u128,
    /// Times a consumer moved from one agent's ring to the other's.
    pub switches: u64,
    /// Ids discarded because they were not above the consumer's last.
    pub discarded: u128,
    /// Times an agent of the pair became active after standing by (its machine's count).
    pub takeovers: u64,
    /// Of those, by the backup (the primary crashed or was cut off).
    pub backup_takeovers: u64,
}

/// One consumer of the pair and where it is.
struct PairConsumer {
    consumer: Consumer,
    /// The ring used last: 0 the primary's, 1 the backup's.
    current: usize,
    /// The last id returned.
    last: Option<Id>,
}

/// The consumers of one pair.
pub struct PairApp {
    consumers: Vec<PairConsumer>,
    /// The primary's rings, then the backup's.
    rings: [Rings; 2],
    sequences: Vec<String>,
    consume_every_us: u64,
    take_max: Vec<u64>,
    rng: SmallRng,
    clock: Clock,
    obs: Observer,
    stats: Arc<Mutex<PairStats>>,
}

impl PairApp {
    /// The application whose `consumers` take from `rings` (the primary's, then the
    /// backup's), one sequence each (an index into `sequences`), every `consume_every_us`,
    /// at most `take_max[sequence]` ids at a time; it counts into `stats`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        consumers: Vec<Consumer>,
        rings: [Rings; 2],
        sequences: Vec<String>,
        consume_every_us: u64,
        take_max: Vec<u64>,
        seed: u64,
        clock: Clock,
        obs: Observer,
        stats: Arc<Mutex<PairStats>>,
    ) -> PairApp {
        PairApp {
            consumers: consumers
                .into_iter()
                .map(|consumer| PairConsumer {
                    consumer,
                    current: 0,
                    last: None,
                })
                .collect(),
            rings,
            sequences,
            consume_every_us,
            take_max,
            rng: SmallRng::seed_from_u64(seed),
            clock,
            obs,
            stats,
        }
    }

    /// Runs until aborted.
    pub async fn run(mut self) {
        loop {
            let at = self.clock.now_us() + self.consume_every_us;
            tokio::time::sleep_until(self.clock.at(at)).await;
            let now = self.clock.now_us();
            for c in 0..self.consumers.len() {
                self.take(now, c);
            }
        }
    }

    /// Consumer `c` takes a few ids, if either ring has any above its last.
    fn take(&mut self, now: u64, c: usize) {
        let seq = self.consumers[c].consumer.sequence;
        let want = self.rng.random_range(1..=self.take_max[seq].max(1));
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.consumers[c].current;
        for k in [current, 1 - current] {
            let last = self.consumers[c].last;
            let mut rings = self.rings[k].lock();
            let Some(ring) = rings.get_mut(seq) else {
                continue; // That agent has not started yet.
            };
            // Not above the last id returned: discarded, as the client does.
            while let (Some(&(first, count)), Some(last)) = (ring.blocks.front(), last) {
                if first > last {
                    break;
                }
                let stale = (last - first + 1).min(Id::from(count)) as u64;
                ring.take(stale);
                stats.discarded += u128::from(stale);
            }
            let Some((first, n)) = ring.take(want) else {
                continue;
            };
            drop(rings);
            let pc = &mut self.consumers[c];
            if k != pc.current {
                pc.current = k;
                stats.switches += 1;
            }
            pc.last = Some(first + Id::from(n) - 1);
            stats.taken += u128::from(n);
            if k == 1 {
                stats.from_backup += u128::from(n);
            }
            let id = pc.consumer.id;
            drop(stats);
            self.obs.consumed(now, id, &self.sequences[seq], first, n);
            return;
        }
    }
}
