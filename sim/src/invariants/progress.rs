//! **Progress**: once a majority of servers is up and the network between
//! them and the agents is healthy (a *calm* period of the fault schedule),
//! some block is granted within a bound. Agents consume continuously, so a
//! live cluster is always asked for blocks.

/// The current calm period, if any, and whether it saw a grant.
#[derive(Debug)]
pub struct Progress {
    bound_us: u64,
    calm_since_us: Option<u64>,
    granted_in_calm: bool,
    /// The longest wait from a calm start to its first grant.
    recovery_us_max: u64,
}

impl Progress {
    /// Progress must happen within `bound_us` of a calm period's start.
    pub fn new(bound_us: u64) -> Progress {
        Progress {
            bound_us,
            calm_since_us: None,
            granted_in_calm: false,
            recovery_us_max: 0,
        }
    }

    /// A calm period starts (`calm`) or ends.
    pub fn calm(&mut self, now_us: u64, calm: bool) {
        self.calm_since_us = calm.then_some(now_us);
        self.granted_in_calm = false;
    }

    /// A block was granted.
    pub fn granted(&mut self, now_us: u64) {
        if let Some(since) = self.calm_since_us
            && !self.granted_in_calm
        {
            self.granted_in_calm = true;
            self.recovery_us_max = self.recovery_us_max.max(now_us - since);
        }
    }

    /// The longest wait so far from a calm start to its first grant, in
    /// microseconds.
    pub fn recovery_us_max(&self) -> u64 {
        self.recovery_us_max
    }

    /// Checks the bound at `now_us`.
    pub fn check(&mut self, now_us: u64) -> Result<(), String> {
        match self.calm_since_us {
            Some(since) if !self.granted_in_calm && now_us >= since + self.bound_us => {
                // Report once per calm period.
                self.granted_in_calm = true;
                Err(format!(
                    "no grant within {} ms of the network healing with a majority up \
                     (calm since {:.3} ms)",
                    self.bound_us / 1000,
                    since as f64 / 1000.0
                ))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_calm_period_without_a_grant_fails_once() {
        let mut p = Progress::new(1_000);
        assert_eq!(p.check(5_000), Ok(()), "not calm: no bound");
        p.calm(10_000, true);
        assert_eq!(p.check(10_999), Ok(()));
        assert!(p.check(11_000).is_err());
        assert_eq!(p.check(12_000), Ok(()), "reported once");
        p.calm(20_000, true);
        p.granted(20_500);
        assert_eq!(p.check(30_000), Ok(()));
        assert_eq!(p.recovery_us_max(), 500);
    }
}
