//! Simulated time: tokio's clock, paused and advanced by the runtime only
//! when every task is idle (`start_paused`), read as microseconds since the
//! start of the run — the `now_us` every `unid-core` state machine takes.

/// The run's clock.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    start: tokio::time::Instant,
}

impl Clock {
    /// A clock reading 0 now.
    pub fn new() -> Clock {
        Clock {
            start: tokio::time::Instant::now(),
        }
    }

    /// Microseconds since the start.
    pub fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::new()
    }
}

impl Clock {
    /// The instant `us` microseconds after the start.
    pub fn at(&self, us: u64) -> tokio::time::Instant {
        self.start + std::time::Duration::from_micros(us)
    }
}
