//! The GetAsync read cache of one DataStore object (reference §9.2).
//!
//! Roblox keeps what a `GetAsync` read for 4 seconds; a `GetAsync` inside that window is
//! answered locally. Writes through the same object replace the entry and restart the window,
//! a read from the database restarts it too, and a cache hit does not extend it. Scripts can
//! observe this (a write from another server stays invisible for up to 4 seconds), so Blox
//! reproduces it. Entries are keyed by scope and key, because an `AllScopes` object reaches
//! every scope of its store.
//!
//! Calls of one server complete in any order (a batch, a retried UpdateAsync), so an entry
//! keeps the newest version the object has seen: a state older than the cached one does not
//! replace it.

use std::cell::{Cell, RefCell};
use std::time::Duration;

use rustc_hash::FxHashMap;

/// How long a read stays fresh.
pub const CACHE_WINDOW: Duration = Duration::from_secs(4);

/// Expired entries are swept once the cache holds this many, so a long-running server that
/// reads many keys does not grow without bound.
const SWEEP_AT: usize = 4096;

/// One key's cached state, what version it is (when known), and when it stops being fresh.
type Cached<T> = (T, Option<i64>, Duration);

/// The entries of one scope, by key.
type Entries<T> = FxHashMap<String, Cached<T>>;

/// What one DataStore object has read or written recently.
///
/// Entries sit under their scope, then their key, so a lookup borrows the caller's strings
/// instead of building an owned pair for every GetAsync. They hash with Fx rather than
/// SipHash: the keys are the game's own, looked up on every call.
#[derive(Debug)]
pub struct ReadCache<T> {
    scopes: RefCell<FxHashMap<String, Entries<T>>>,
    /// Entries in all scopes, to know when to sweep.
    len: Cell<usize>,
}

impl<T> Default for ReadCache<T> {
    fn default() -> Self {
        Self {
            scopes: RefCell::default(),
            len: Cell::new(0),
        }
    }
}

impl<T: Clone> ReadCache<T> {
    /// The cached state of `scope/key` if it is still fresh at `now`.
    pub fn get(&self, scope: &str, key: &str, now: Duration) -> Option<T> {
        let scopes = self.scopes.borrow();
        let (state, _, expires) = scopes.get(scope)?.get(key)?;
        (now < *expires).then(|| state.clone())
    }

    /// Drops what is known of `scope/key`: the next read goes to the database.
    pub fn forget(&self, scope: &str, key: &str) {
        let mut scopes = self.scopes.borrow_mut();
        if let Some(entries) = scopes.get_mut(scope)
            && entries.remove(key).is_some()
        {
            self.len.set(self.len.get() - 1);
        }
    }

    /// Records the state of `scope/key` as of `now`, fresh for [`CACHE_WINDOW`], unless the
    /// cache holds a newer version of it: `seq` is the state's version sequence, when known
    /// (a missing key's state has none and always replaces the entry).
    pub fn put(&self, scope: &str, key: &str, state: T, seq: Option<i64>, now: Duration) {
        let mut scopes = self.scopes.borrow_mut();
        let fresh = (state, seq, now + CACHE_WINDOW);
        if let Some(entry) = scopes
            .get_mut(scope)
            .and_then(|entries| entries.get_mut(key))
        {
            let older = matches!((seq, entry.1), (Some(seq), Some(cached)) if seq < cached);
            if !older {
                *entry = fresh;
            }
            return;
        }
        if self.len.get() >= SWEEP_AT {
            scopes.retain(|_, entries| {
                entries.retain(|_, (_, _, expires)| now < *expires);
                !entries.is_empty()
            });
            self.len.set(scopes.values().map(FxHashMap::len).sum());
        }
        scopes
            .entry(scope.to_owned())
            .or_default()
            .insert(key.to_owned(), fresh);
        self.len.set(self.len.get() + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_after_the_window_and_writes_restart_it() {
        let cache = ReadCache::default();
        let at = Duration::from_secs;
        cache.put("global", "k", 1, None, at(10));
        assert_eq!(cache.get("global", "k", at(13)), Some(1));
        assert_eq!(cache.get("other", "k", at(13)), None);
        assert_eq!(
            cache.get("global", "k", at(14)),
            None,
            "4 seconds later it is stale"
        );
        cache.put("global", "k", 2, None, at(13));
        assert_eq!(
            cache.get("global", "k", at(16)),
            Some(2),
            "a write restarts the window"
        );
    }

    #[test]
    fn a_state_older_than_the_cached_one_does_not_replace_it() {
        let cache = ReadCache::default();
        let at = Duration::from_secs;
        cache.put("global", "k", "version 5", Some(5), at(10));
        cache.put("global", "k", "version 4", Some(4), at(11));
        assert_eq!(cache.get("global", "k", at(11)), Some("version 5"));
        assert_eq!(
            cache.get("global", "k", at(14)),
            None,
            "the older state did not restart the window either"
        );
        cache.put("global", "k", "version 6", Some(6), at(12));
        assert_eq!(cache.get("global", "k", at(12)), Some("version 6"));
        cache.put("global", "k", "removed", None, at(12));
        assert_eq!(
            cache.get("global", "k", at(12)),
            Some("removed"),
            "a state without a version always replaces"
        );
    }

    #[test]
    fn expired_entries_are_swept_as_the_cache_grows() {
        let cache = ReadCache::default();
        for i in 0..SWEEP_AT {
            cache.put("global", &i.to_string(), i, None, Duration::ZERO);
        }
        cache.put("global", "late", 0, None, CACHE_WINDOW * 2);
        assert_eq!(cache.len.get(), 1);
        assert_eq!(cache.scopes.borrow()["global"].len(), 1);
    }
}
