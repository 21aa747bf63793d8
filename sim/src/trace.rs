//! The history of a run: every event that matters (grants, commits, leader
//! changes, consumption, faults) is folded into a digest, so that two runs
//! of one seed can be compared, and printed when verbose.

use std::fmt::Write as _;

use unid_proto::{Id, NodeId};

/// One event of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A server believes it leads `term`.
    Leader {
        /// The server.
        server: NodeId,
        /// Its term.
        term: u64,
    },
    /// A leader read its ready ceilings and installed its allocator.
    Ready {
        /// The server.
        server: NodeId,
        /// Its term.
        term: u64,
    },
    /// A leader committed a ceiling raise.
    Committed {
        /// The server.
        server: NodeId,
        /// Its term.
        term: u64,
        /// The sequence.
        sequence: String,
        /// The committed ceiling.
        ceiling: Id,
    },
    /// A leader granted a block.
    Granted {
        /// The server.
        server: NodeId,
        /// Its term.
        term: u64,
        /// The sequence.
        sequence: String,
        /// The first id.
        first: Id,
        /// How many ids.
        count: u64,
    },
    /// A consumer took ids.
    Consumed {
        /// The consumer.
        consumer: usize,
        /// The first id.
        first: Id,
        /// How many ids.
        count: u64,
    },
    /// A fault or a repair the schedule applied.
    Fault(String),
}

/// The event trace of one run: a digest of all events, their count, and
/// (when verbose) the events themselves printed as they happen.
#[derive(Debug)]
pub struct Trace {
    digest: u64,
    events: u64,
    verbose: bool,
    line: String,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl Trace {
    /// An empty trace; prints every event to stderr if `verbose`.
    pub fn new(verbose: bool) -> Trace {
        Trace {
            digest: FNV_OFFSET,
            events: 0,
            verbose,
            line: String::new(),
        }
    }

    /// Records `event` at simulated time `now_us`.
    pub fn record(&mut self, now_us: u64, event: &Event) {
        self.line.clear();
        let _ = write!(self.line, "{now_us} {event:?}");
        for b in self.line.bytes() {
            self.digest = (self.digest ^ u64::from(b)).wrapping_mul(FNV_PRIME);
        }
        self.events += 1;
        if self.verbose {
            eprintln!("{:>10.3} ms  {event:?}", now_us as f64 / 1000.0);
        }
    }

    /// The digest of every event so far (FNV-1a over their text, times
    /// included).
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// How many events were recorded.
    pub fn events(&self) -> u64 {
        self.events
    }
}
