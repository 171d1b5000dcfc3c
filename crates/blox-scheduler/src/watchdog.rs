//! Stops runaway scripts: a thread that runs longer than its budget without yielding gets
//! Roblox's "Script timeout: exhausted allowed execution time" error.
//!
//! Luau is single-threaded, so one `while true do end` would freeze every script, timer and
//! DataStore call of the server. A watchdog OS thread watches how long the current
//! resumption has run; once it is over budget, a Luau interrupt raises the error in whatever
//! Luau code is running, at every safepoint until the resumption ends, so a `pcall` around
//! the loop cannot swallow it.
//!
//! Luau calls the interrupt at every loop back edge and call, so it must cost next to
//! nothing. mlua's `set_interrupt` wraps its callback in mlua's error machinery, which
//! measured ~4.5 ns per safepoint, doubling the cost of a tight loop; the interrupt here is
//! a plain C function that reads the running resumption's flag through a thread-local and
//! raises only once the flag is set.

use std::cell::RefCell;
use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use mlua::{Lua, ffi};

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
        install_interrupt(lua);
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
        WATCHED.with_borrow_mut(|watched| {
            if !watched
                .as_ref()
                .is_some_and(|watched| Arc::ptr_eq(watched, &self.shared))
            {
                *watched = Some(Arc::clone(&self.shared));
            }
        });
        let now = self.shared.origin.elapsed().as_millis() as u64 + 1;
        self.shared.running_since.store(now, Ordering::Relaxed);
    }

    /// Marks its end: the next resumption gets a fresh budget.
    pub(crate) fn leave(&self) {
        self.shared.running_since.store(0, Ordering::Relaxed);
        self.shared.expired.store(false, Ordering::Relaxed);
    }
}

impl Drop for Watchdog {
    /// Lets go of the thread-local's reference, so the watchdog thread ends with its VM.
    fn drop(&mut self) {
        // At thread exit the thread-local may already be gone; then there is nothing to drop.
        let _ = WATCHED.try_with(|watched| {
            let mut watched = watched.borrow_mut();
            if watched
                .as_ref()
                .is_some_and(|watched| Arc::ptr_eq(watched, &self.shared))
            {
                *watched = None;
            }
        });
    }
}

thread_local! {
    /// The watchdog of the VM whose resumption last started on this thread: the one whose
    /// Luau code the interrupt can be running.
    static WATCHED: RefCell<Option<Arc<Shared>>> = const { RefCell::new(None) };
}

/// Makes every safepoint of `lua` call [`interrupt`].
#[allow(unsafe_code)]
fn install_interrupt(lua: &Lua) {
    // SAFETY: the callbacks belong to the VM's global state, which outlives `lua`'s handle;
    // mlua sets no interrupt of its own unless asked to, and clears this one when the VM
    // closes.
    lua.exec_raw_lua(|raw| unsafe {
        (*ffi::lua_callbacks(raw.state())).interrupt = Some(interrupt);
    });
}

/// Raises the timeout error at a safepoint once the running resumption is over budget.
#[allow(unsafe_code)]
unsafe extern "C-unwind" fn interrupt(state: *mut ffi::lua_State, gc: c_int) {
    // A garbage-collection step calls the interrupt too, where an error cannot be raised.
    // Nothing here may panic: a panic cannot unwind through Luau's frames.
    let expired = gc < 0
        && WATCHED
            .try_with(|watched| {
                watched.try_borrow().is_ok_and(|watched| {
                    watched
                        .as_ref()
                        .is_some_and(|watched| watched.expired.load(Ordering::Relaxed))
                })
            })
            .unwrap_or(false);
    if expired {
        // SAFETY: Luau calls the interrupt at a safepoint of code running on `state`, where
        // raising an error is allowed; the error unwinds through this frame, which owns
        // nothing that needs dropping.
        unsafe {
            ffi::lua_pushlstring(
                state,
                TIMEOUT_MESSAGE.as_ptr().cast(),
                TIMEOUT_MESSAGE.len(),
            );
            ffi::lua_error(state);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_watchdog_leaves_nothing_alive_behind_it() {
        let lua = Lua::new();
        let watchdog = Watchdog::start(&lua, Duration::from_secs(10));
        let shared = Arc::downgrade(&watchdog.shared);
        watchdog.enter();
        watchdog.leave();
        drop(watchdog);
        // The watchdog thread holds the state for an instant on each tick; wait that out.
        let deadline = Instant::now() + Duration::from_secs(2);
        while shared.upgrade().is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            shared.upgrade().is_none(),
            "the thread-local still holds the watchdog's state, so its thread never ends"
        );
    }
}
