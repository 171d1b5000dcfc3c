//! Time sources for the scheduler.
//!
//! Timers and frames read time through [`Clock`] so that tests can drive the scheduler with a
//! [`ManualClock`] and advance time deterministically. Tokio's paused clock is not an option:
//! the same process runs sqlx, whose pools time out when Tokio's clock jumps.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// A monotonic time source, measured from an arbitrary origin.
pub trait Clock {
    /// Time elapsed since the clock's origin.
    fn now(&self) -> Duration;
}

/// Wall-clock time since the clock was created.
#[derive(Debug)]
pub struct RealClock {
    origin: Instant,
}

impl RealClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for RealClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for RealClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A clock that only moves when told to, for deterministic tests.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: Cell<Duration>,
}

impl ManualClock {
    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.now.set(self.now.get() + by);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        self.now.get()
    }
}
