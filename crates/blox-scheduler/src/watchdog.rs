//! Stops runaway scripts: a thread that runs longer than its budget without yielding gets
//! Roblox's "Script timeout: exhausted allowed execution time" error.
//!
//! Luau is single-threaded, so one `while true do end` would freeze every script, timer and
//! DataStore call of the server. A watchdog OS thread watches how long the current
//! resumption has run; once it is over budget, a Luau interrupt (which costs one atomic load
//! per safepoint) raises the error in whatever Luau code is running, at every safepoint until
//! the resumption ends, so a `pcall` around the loop cannot swallow it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use mlua::{Lua, VmState};

/// Roblox's message for a script that ran too long without yielding.
pub const TIMEOUT_MESSAGE: &str = "Script timeout: exhausted allowed execution time";

/// What the VM thread and the watchdog thread share.
#[derive(Debug)]
struct Shared {
    origin: Instant,
    budget: Duration,
    /// When the current outermost resumption started (ms since `origin`, plus one); 0 when
    /// no resumption is running.
    running_since: AtomicU64,
    expired: AtomicBool,
}

/// The VM side of the watchdog: marks resumptions, owns the watchdog thread.
#[derive(Debug)]
pub(crate) struct Watchdog {
    shared: Arc<Shared>,
}

impl Watchdog {
    /// Installs the interrupt into `lua` and starts the watchdog thread.
    pub(crate) fn start(lua: &Lua, budget: Duration) -> Self {
        let shared = Arc::new(Shared {
            origin: Instant::now(),
            budget,
            running_since: AtomicU64::new(0),
            expired: AtomicBool::new(false),
        });
        let flag = Arc::clone(&shared);
        lua.set_interrupt(move |_| {
            if flag.expired.load(Ordering::Relaxed) {
                Err(mlua::Error::RuntimeError(TIMEOUT_MESSAGE.to_owned()))
            } else {
                Ok(VmState::Continue)
            }
        });
        let watched = Arc::downgrade(&shared);
        let tick = (budget / 4).clamp(Duration::from_millis(5), Duration::from_millis(250));
        std::thread::Builder::new()
            .name("blox-watchdog".to_owned())
            .spawn(move || watch(&watched, tick))
            .ok();
        Self { shared }
    }

    /// Marks the start of an outermost resumption.
    pub(crate) fn enter(&self) {
        let now = self.shared.origin.elapsed().as_millis() as u64 + 1;
        self.shared.running_since.store(now, Ordering::Relaxed);
    }

    /// Marks its end: the next resumption gets a fresh budget.
    pub(crate) fn leave(&self) {
        self.shared.running_since.store(0, Ordering::Relaxed);
        self.shared.expired.store(false, Ordering::Relaxed);
    }
}

fn watch(shared: &Weak<Shared>, tick: Duration) {
    while let Some(shared) = shared.upgrade() {
        let since = shared.running_since.load(Ordering::Relaxed);
        if since != 0 {
            let now = shared.origin.elapsed().as_millis() as u64 + 1;
            if now.saturating_sub(since) > shared.budget.as_millis() as u64 {
                shared.expired.store(true, Ordering::Relaxed);
            }
        }
        drop(shared);
        std::thread::sleep(tick);
    }
}
