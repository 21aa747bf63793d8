//! The server's reply cache: a retransmitted request gets the reply already
//! sent, not a new block.
//!
//! # State machine
//!
//! Keyed by agent ([`NodeId`]) and request sequence number ([`SeqNo`]):
//!
//! ```text
//! lookup(now, agent, seq) ─┬─ Hit(reply)  seq is cached: send this reply again
//!                          ├─ Miss        seq not seen: handle it, then insert(now, agent, seq, reply)
//!                          ├─ Forgotten   seq is older than every kept seq of a full agent
//!                          └─ Invalid     seq 0 (never sent; drop it)
//! ```
//!
//! Bounds (TigerBeetle: a limit on everything):
//!
//! - per agent, the `replies_per_agent_max` highest seqs are kept; inserting
//!   past that evicts the lowest seq and remembers it as the agent's floor;
//! - at most `agents_max` agents; a new agent beyond that evicts the least
//!   recently seen one;
//! - an agent not seen (no lookup, no insert) for `lease_ms` is forgotten.
//!
//! Memory is therefore at most `agents_max × replies_per_agent_max` replies.
//!
//! # What `Forgotten` means
//!
//! The reply for that seq, if there was one, was evicted. Handling it as new
//! is safe — the agent's [`Requester`](crate::Requester) accepts one reply per
//! seq and drops the rest, so at worst a block is wasted, never repeated — and
//! it keeps a request that was merely delayed alive. A server may also drop it.
//! Either way it is counted.
//!
//! # Agent restarts
//!
//! A cache hit returns a reply sent earlier. If an agent restarted and reused
//! a `(node id, seq)` it used before, the hit would hand it a block it already
//! used. The requester therefore starts each incarnation at a caller-chosen
//! `first_seq` above any seq of the previous one (see
//! [`Requester::new`](crate::Requester::new)); with a lease of `lease_ms` the
//! old entries are also gone once the agent was down that long.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use unid_proto::{NodeId, SeqNo};

use crate::Error;

/// The most agents a cache may be configured for.
pub const AGENTS_MAX_LIMIT: usize = 1 << 20;

/// The most replies per agent a cache may be configured for.
pub const REPLIES_PER_AGENT_MAX_LIMIT: usize = 1 << 12;

/// The longest lease accepted, in milliseconds (one day).
pub const LEASE_MS_MAX: u64 = 24 * 60 * 60 * 1000;

/// Configuration of a [`ReplyCache`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplyCacheConfig {
    /// Most agents remembered (`1..=AGENTS_MAX_LIMIT`).
    pub agents_max: usize,
    /// Most replies kept per agent, its highest seqs
    /// (`1..=REPLIES_PER_AGENT_MAX_LIMIT`). At least the agent's
    /// `requests_max` so every outstanding request's reply is kept.
    pub replies_per_agent_max: usize,
    /// An agent not seen for this long is forgotten, in milliseconds
    /// (`1..=LEASE_MS_MAX`). Longer than the agent's request deadline.
    pub lease_ms: u64,
}

impl ReplyCacheConfig {
    /// Defaults: 65,536 agents, 64 replies each, 60 s lease.
    pub const DEFAULT: ReplyCacheConfig = ReplyCacheConfig {
        agents_max: 1 << 16,
        replies_per_agent_max: 64,
        lease_ms: 60_000,
    };

    /// Checks every bound.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field, reason| Err(Error::InvalidConfig { field, reason });
        if !(1..=AGENTS_MAX_LIMIT).contains(&self.agents_max) {
            return bad("agents_max", "must be in 1..=AGENTS_MAX_LIMIT");
        }
        if !(1..=REPLIES_PER_AGENT_MAX_LIMIT).contains(&self.replies_per_agent_max) {
            return bad(
                "replies_per_agent_max",
                "must be in 1..=REPLIES_PER_AGENT_MAX_LIMIT",
            );
        }
        if !(1..=LEASE_MS_MAX).contains(&self.lease_ms) {
            return bad("lease_ms", "must be in 1..=LEASE_MS_MAX");
        }
        Ok(())
    }
}

impl Default for ReplyCacheConfig {
    fn default() -> Self {
        ReplyCacheConfig::DEFAULT
    }
}

/// The answer of [`ReplyCache::lookup`].
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a, R> {
    /// A retransmission: send this reply again.
    Hit(&'a R),
    /// Not seen: handle the request, then [`ReplyCache::insert`] the reply.
    Miss,
    /// Older than every kept seq of an agent whose reply list is full: its
    /// reply, if any, was evicted. See the module docs.
    Forgotten,
    /// Seq 0, which is never sent. Drop the request.
    Invalid,
}

/// Counters kept by a [`ReplyCache`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplyCacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups of seqs not seen.
    pub misses: u64,
    /// Lookups of seqs below an agent's floor.
    pub forgotten: u64,
    /// Lookups or inserts with seq 0.
    pub invalid: u64,
    /// Replies inserted.
    pub inserts: u64,
    /// Inserts of a seq already cached (the first reply is kept).
    pub inserts_duplicate: u64,
    /// Replies evicted because their agent had `replies_per_agent_max`.
    pub replies_evicted: u64,
    /// Agents evicted because there were `agents_max` (least recently seen).
    pub agents_evicted: u64,
    /// Agents forgotten because they were silent for `lease_ms`.
    pub agents_expired: u64,
}

#[derive(Debug)]
struct Agent<R> {
    last_seen_us: u64,
    /// Cached replies, ascending by seq, at most `replies_per_agent_max`.
    replies: VecDeque<(SeqNo, R)>,
    /// The highest seq evicted from `replies` (0: none).
    floor: SeqNo,
}

/// A bounded cache of replies keyed by (agent, seq). See the module docs.
#[derive(Debug)]
pub struct ReplyCache<R> {
    config: ReplyCacheConfig,
    agents: BTreeMap<NodeId, Agent<R>>,
    /// `(last_seen_us, node)` of every agent: least recently seen first.
    by_last_seen: BTreeSet<(u64, NodeId)>,
    now_us: u64,
    stats: ReplyCacheStats,
}

impl<R> ReplyCache<R> {
    /// An empty cache.
    pub fn new(config: ReplyCacheConfig) -> Result<ReplyCache<R>, Error> {
        config.validate()?;
        Ok(ReplyCache {
            config,
            agents: BTreeMap::new(),
            by_last_seen: BTreeSet::new(),
            now_us: 0,
            stats: ReplyCacheStats::default(),
        })
    }

    /// The counters.
    pub fn stats(&self) -> &ReplyCacheStats {
        &self.stats
    }

    /// How many agents are remembered.
    pub fn agents(&self) -> usize {
        self.agents.len()
    }

    /// How many replies are cached in all.
    pub fn replies(&self) -> usize {
        self.agents.values().map(|a| a.replies.len()).sum()
    }

    /// Looks up the reply to `(node, seq)` at `now_us`, and marks the agent
    /// seen (a lookup renews its lease).
    pub fn lookup(&mut self, now_us: u64, node: NodeId, seq: SeqNo) -> Lookup<'_, R> {
        let now_us = self.tick(now_us);
        if seq == 0 {
            self.stats.invalid += 1;
            return Lookup::Invalid;
        }
        let replies_max = self.config.replies_per_agent_max;
        if !self.agents.contains_key(&node) {
            self.stats.misses += 1;
            return Lookup::Miss;
        }
        self.touch(node, now_us);
        let agent = self.agents.get(&node).expect("checked above");
        match agent.replies.binary_search_by_key(&seq, |(s, _)| *s) {
            Ok(i) => {
                self.stats.hits += 1;
                Lookup::Hit(&agent.replies[i].1)
            }
            Err(_) if seq <= agent.floor => {
                debug_assert!(agent.replies.len() == replies_max);
                self.stats.forgotten += 1;
                Lookup::Forgotten
            }
            Err(_) => {
                self.stats.misses += 1;
                Lookup::Miss
            }
        }
    }

    /// Caches `reply` as the answer to `(node, seq)` at `now_us`. Returns
    /// `false` (and keeps the earlier reply) if that seq is already cached or
    /// is 0. May evict the agent's lowest seq or the least recently seen
    /// agent.
    pub fn insert(&mut self, now_us: u64, node: NodeId, seq: SeqNo, reply: R) -> bool {
        let now_us = self.tick(now_us);
        if seq == 0 {
            self.stats.invalid += 1;
            return false;
        }
        if !self.agents.contains_key(&node) {
            if self.agents.len() >= self.config.agents_max {
                let &(seen, oldest) = self.by_last_seen.first().expect("agents is not empty");
                self.remove(seen, oldest);
                self.stats.agents_evicted += 1;
            }
            assert!(self.agents.len() < self.config.agents_max);
            let agent = Agent {
                last_seen_us: now_us,
                replies: VecDeque::new(),
                floor: 0,
            };
            self.agents.insert(node, agent);
            self.by_last_seen.insert((now_us, node));
        } else {
            self.touch(node, now_us);
        }
        let replies_max = self.config.replies_per_agent_max;
        let agent = self.agents.get_mut(&node).expect("inserted above");
        let at = match agent.replies.binary_search_by_key(&seq, |(s, _)| *s) {
            Ok(_) => {
                self.stats.inserts_duplicate += 1;
                return false;
            }
            Err(at) => at,
        };
        agent.replies.insert(at, (seq, reply));
        self.stats.inserts += 1;
        if agent.replies.len() > replies_max {
            let (evicted, _) = agent.replies.pop_front().expect("longer than the max");
            agent.floor = agent.floor.max(evicted);
            self.stats.replies_evicted += 1;
        }
        assert!(agent.replies.len() <= replies_max);
        debug_assert!(agent.replies.iter().all(|(s, _)| *s > agent.floor));
        debug_assert_eq!(self.agents.len(), self.by_last_seen.len());
        true
    }

    /// Forgets every agent not seen for `lease_ms` as of `now_us`. Called by
    /// [`lookup`](Self::lookup) and [`insert`](Self::insert) too.
    pub fn expire(&mut self, now_us: u64) {
        self.tick(now_us);
    }

    fn tick(&mut self, now_us: u64) -> u64 {
        self.now_us = self.now_us.max(now_us);
        let lease_us = self.config.lease_ms.saturating_mul(1000);
        // Bounded by agents_max iterations.
        while let Some(&(seen, node)) = self.by_last_seen.first() {
            if seen.saturating_add(lease_us) > self.now_us {
                break;
            }
            self.remove(seen, node);
            self.stats.agents_expired += 1;
        }
        self.now_us
    }

    fn touch(&mut self, node: NodeId, now_us: u64) {
        let agent = self.agents.get_mut(&node).expect("caller checked");
        let removed = self.by_last_seen.remove(&(agent.last_seen_us, node));
        debug_assert!(removed);
        agent.last_seen_us = now_us;
        self.by_last_seen.insert((now_us, node));
    }

    fn remove(&mut self, seen: u64, node: NodeId) {
        let removed = self.by_last_seen.remove(&(seen, node));
        assert!(removed);
        let agent = self.agents.remove(&node);
        assert!(agent.is_some_and(|a| a.last_seen_us == seen));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1000;

    fn cache(agents_max: usize, replies: usize, lease_ms: u64) -> ReplyCache<u32> {
        let config = ReplyCacheConfig {
            agents_max,
            replies_per_agent_max: replies,
            lease_ms,
        };
        ReplyCache::new(config).unwrap()
    }

    #[test]
    fn config_is_validated() {
        assert!(ReplyCacheConfig::DEFAULT.validate().is_ok());
        let mut c = ReplyCacheConfig::DEFAULT;
        c.agents_max = 0;
        assert!(matches!(
            ReplyCache::<u8>::new(c),
            Err(Error::InvalidConfig {
                field: "agents_max",
                ..
            })
        ));
        let mut c = ReplyCacheConfig::DEFAULT;
        c.replies_per_agent_max = REPLIES_PER_AGENT_MAX_LIMIT + 1;
        assert!(c.validate().is_err());
        let mut c = ReplyCacheConfig::DEFAULT;
        c.lease_ms = 0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn retransmission_gets_the_same_reply() {
        let mut c = cache(4, 4, 1000);
        assert_eq!(c.lookup(0, 7, 1), Lookup::Miss);
        assert!(c.insert(0, 7, 1, 100));
        assert_eq!(c.lookup(MS, 7, 1), Lookup::Hit(&100));
        assert_eq!(c.lookup(2 * MS, 7, 1), Lookup::Hit(&100));
        // A second insert for the same seq keeps the first reply.
        assert!(!c.insert(3 * MS, 7, 1, 999));
        assert_eq!(c.lookup(4 * MS, 7, 1), Lookup::Hit(&100));
        // Another agent's seq 1 is a different request.
        assert_eq!(c.lookup(5 * MS, 8, 1), Lookup::Miss);
        assert_eq!(c.stats().hits, 3);
        assert_eq!(c.stats().inserts_duplicate, 1);
        assert_eq!(c.lookup(5 * MS, 7, 0), Lookup::Invalid);
        assert!(!c.insert(5 * MS, 7, 0, 1));
        assert_eq!(c.stats().invalid, 2);
    }

    #[test]
    fn keeps_the_last_k_seqs_per_agent() {
        let mut c = cache(4, 3, 1000);
        for seq in 1..=5 {
            assert!(c.insert(0, 1, seq, seq as u32 * 10));
        }
        assert_eq!(c.replies(), 3);
        assert_eq!(c.stats().replies_evicted, 2);
        assert_eq!(c.lookup(0, 1, 1), Lookup::Forgotten);
        assert_eq!(c.lookup(0, 1, 2), Lookup::Forgotten);
        for seq in 3..=5 {
            assert_eq!(c.lookup(0, 1, seq), Lookup::Hit(&(seq as u32 * 10)));
        }
        assert_eq!(c.lookup(0, 1, 6), Lookup::Miss);
        // Out of order: a late lower seq above the floor is kept in order,
        // and the lowest is evicted.
        let mut c = cache(4, 3, 1000);
        for seq in [5, 3, 9] {
            c.insert(0, 1, seq, seq as u32);
        }
        c.insert(0, 1, 4, 4);
        assert_eq!(c.lookup(0, 1, 3), Lookup::Forgotten);
        assert_eq!(c.lookup(0, 1, 4), Lookup::Hit(&4));
        assert_eq!(c.lookup(0, 1, 9), Lookup::Hit(&9));
        assert_eq!(c.stats().forgotten, 1);
    }

    #[test]
    fn evicts_the_least_recently_seen_agent() {
        let mut c = cache(3, 2, 1_000_000);
        c.insert(0, 1, 1, 1);
        c.insert(MS, 2, 1, 2);
        c.insert(2 * MS, 3, 1, 3);
        // Agent 1 is seen again: agent 2 is now the least recent.
        assert_eq!(c.lookup(3 * MS, 1, 1), Lookup::Hit(&1));
        c.insert(4 * MS, 4, 1, 4);
        assert_eq!(c.agents(), 3);
        assert_eq!(c.stats().agents_evicted, 1);
        assert_eq!(c.lookup(5 * MS, 2, 1), Lookup::Miss);
        assert_eq!(c.lookup(5 * MS, 1, 1), Lookup::Hit(&1));
        assert_eq!(c.lookup(5 * MS, 3, 1), Lookup::Hit(&3));
        assert_eq!(c.lookup(5 * MS, 4, 1), Lookup::Hit(&4));
    }

    #[test]
    fn silent_agents_expire_after_the_lease() {
        let mut c = cache(8, 4, 100);
        c.insert(0, 1, 1, 1);
        c.insert(0, 2, 1, 2);
        // Agent 2 keeps being seen; agent 1 is silent.
        assert_eq!(c.lookup(60 * MS, 2, 1), Lookup::Hit(&2));
        assert_eq!(c.lookup(99 * MS, 1, 1), Lookup::Hit(&1));
        assert_eq!(c.lookup(150 * MS, 2, 1), Lookup::Hit(&2));
        // Agent 1 was last seen at 99 ms: forgotten at 99 + 100 ms.
        c.expire(199 * MS - 1);
        assert_eq!(c.agents(), 2);
        c.expire(199 * MS);
        assert_eq!(c.agents(), 1);
        assert_eq!(c.stats().agents_expired, 1);
        assert_eq!(c.lookup(200 * MS, 1, 1), Lookup::Miss);
        c.expire(250 * MS);
        assert_eq!(c.agents(), 0);
        // Time going backwards changes nothing.
        c.insert(10 * MS, 3, 1, 3);
        assert_eq!(c.lookup(0, 3, 1), Lookup::Hit(&3));
    }
}

#[cfg(test)]
mod model {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        Lookup { node: NodeId, seq: SeqNo },
        Insert { node: NodeId, seq: SeqNo },
        Advance { ms: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..8u64, 0..24u64).prop_map(|(node, seq)| Op::Lookup { node, seq }),
            4 => (0..8u64, 0..24u64).prop_map(|(node, seq)| Op::Insert { node, seq }),
            1 => (0..60u64).prop_map(|ms| Op::Advance { ms }),
        ]
    }

    proptest! {
        /// A hit is always the first reply inserted for that exact (agent,
        /// seq), and memory stays within its bounds.
        #[test]
        fn hits_are_the_first_reply_and_memory_is_bounded(
            agents_max in 1..5usize,
            replies in 1..5usize,
            ops in prop::collection::vec(op(), 1..200),
        ) {
            let config =
                ReplyCacheConfig { agents_max, replies_per_agent_max: replies, lease_ms: 100 };
            let mut cache: ReplyCache<(NodeId, SeqNo, u32)> = ReplyCache::new(config).unwrap();
            let mut first: BTreeMap<(NodeId, SeqNo), (NodeId, SeqNo, u32)> = BTreeMap::new();
            let mut now = 0;
            let mut n = 0u32;
            for op in ops {
                match op {
                    Op::Advance { ms } => now += ms * 1000,
                    Op::Lookup { node, seq } => match cache.lookup(now, node, seq) {
                        Lookup::Hit(r) => {
                            prop_assert_eq!(Some(r), first.get(&(node, seq)));
                        }
                        Lookup::Invalid => prop_assert_eq!(seq, 0),
                        Lookup::Miss | Lookup::Forgotten => {}
                    },
                    Op::Insert { node, seq } => {
                        n += 1;
                        let stored = cache.insert(now, node, seq, (node, seq, n));
                        if stored {
                            // Once forgotten, a later first reply may differ.
                            first.insert((node, seq), (node, seq, n));
                        }
                        prop_assert!(seq != 0 || !stored);
                    }
                }
                prop_assert!(cache.agents() <= agents_max);
                prop_assert!(cache.replies() <= agents_max * replies);
            }
        }
    }
}
