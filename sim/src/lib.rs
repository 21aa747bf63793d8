//! unid's deterministic simulation: one seed drives a whole cluster in one
//! process — 3 or 5 servers running the real consensus code (openraft 0.9
//! with `unid-consensus`'s redb store and state machine), the real server
//! state machine (`unid-machine`) under the engine's own consensus driver,
//! agents running the real agent state machine (`unid-agent`), and an
//! operator adding and removing servers — over a simulated network, clock and
//! disk, and checks the invariants after every event. See `sim/README.md` for
//! the design, what is real and what is simulated, and the determinism caveats.
//!
//! | module | what |
//! |---|---|
//! | [`sim`] | [`SimConfig`] from a seed, the fault schedule, [`run`] → [`Report`] |
//! | [`server`] | one server: the real `ConsensusNode`, server machine and consensus driver |
//! | [`agent`] | one agent (the real agent machine) and its consumers |
//! | [`app`] | a backup pair's application: consumers reading both agents' rings |
//! | [`operator`] | membership changes, sent as `unid cluster` sends them |
//! | [`net`] | the simulated network (an openraft network factory, datagrams) |
//! | [`disk`] | the simulated disk (a redb `StorageBackend` that loses unsynced writes) |
//! | [`clock`] | simulated time |
//! | [`invariants`] | the invariants, one per file |
//! | [`trace`] | the event trace and its digest |
//!
//! ```no_run
//! let report = unid_sim::run(unid_sim::SimConfig::from_seed(7))?;
//! if !report.ok() {
//!     eprintln!("{}\nreplay: {}", report.violations[0], report.replay_command());
//! }
//! # Ok::<(), unid_sim::SimError>(())
//! ```
#![forbid(unsafe_code)]

pub mod agent;
pub mod app;
pub mod clock;
pub mod disk;
pub mod error;
pub mod invariants;
pub mod net;
pub mod operator;
pub mod server;
pub mod sim;
pub mod trace;

pub use error::SimError;
pub use invariants::Violation;
pub use sim::{Report, SimConfig, replay_command, run};
