//! Roblox's read-modify-write operations, built from a backend's read and compare-and-set.
//!
//! These run on the database runtime and never touch Luau, so a whole retry loop costs the VM
//! thread nothing. UpdateAsync is the exception: its transform is Luau code, so its loop lives
//! in [`crate::service`] and calls [`Backend::write_if`] itself.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::DataStoreError;
use crate::backend::{Backend, BackendError, Entry, EntryKey, Version, Write};
use crate::codec::{self, Stored};

/// Why an operation on the database runtime failed.
#[derive(Debug, thiserror::Error)]
pub enum OperationError {
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The request itself is refused, with a message for the script.
    #[error(transparent)]
    Rejected(#[from] DataStoreError),
}

/// The current time in Unix milliseconds, the unit of every DataStore timestamp.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

/// The creation time a new version of `previous` carries: a live key keeps its creation
/// time; a new key, or one brought back after removal, is created now.
pub fn created_ms(previous: Option<&Entry>, now_ms: i64) -> i64 {
    match previous {
        Some(entry) if !entry.deleted => entry.version.created_ms,
        _ => now_ms,
    }
}

/// Reads a live key; tombstones read as absent. The value stays text, which the VM thread
/// parses straight into Luau ([`crate::codec::text_to_lua`]).
pub async fn get(backend: &dyn Backend, key: &EntryKey) -> Result<Option<Entry>, BackendError> {
    Ok(backend.read(key).await?.filter(|entry| !entry.deleted))
}

/// Adds `delta` to an integer value (a missing key counts as 0), replacing user ids and
/// metadata. Returns the new value and its version.
pub async fn increment(
    backend: &dyn Backend,
    key: &EntryKey,
    delta: i64,
    user_ids: String,
    metadata: String,
) -> Result<(i64, Version), OperationError> {
    loop {
        let previous = backend.read(key).await?;
        let current = match &previous {
            Some(entry) if !entry.deleted => match codec::decode(&entry.value)? {
                Stored::Number(n) if n.fract() == 0.0 && n.abs() < 9.2e18 => n as i64,
                _ => return Err(DataStoreError::NotNumeric.into()),
            },
            _ => 0,
        };
        let next = current.saturating_add(delta);
        let mut value = String::new();
        codec::write_number(&mut value, next as f64);
        let now_ms = now_ms();
        let write = Write {
            value,
            user_ids: user_ids.clone(),
            metadata: metadata.clone(),
            deleted: false,
            now_ms,
        };
        let expected = previous.as_ref().map(|entry| &entry.version);
        let created = created_ms(previous.as_ref(), now_ms);
        if let Some(version) = backend.write_if(key, expected, created, &write).await? {
            return Ok((next, version));
        }
    }
}

/// How often a server purges expired versions and tombstones. Every server of a database
/// does it; the deletes are idempotent, and each is one indexed range.
pub const PURGE_INTERVAL: Duration = Duration::from_secs(10 * 60);

/// Purges expired versions and tombstones now and every [`PURGE_INTERVAL`], forever. Runs on
/// the database runtime, never on the VM thread; a failure is logged and retried next time.
pub async fn purge_periodically(backend: Arc<dyn Backend>) {
    let mut ticks = tokio::time::interval(PURGE_INTERVAL);
    loop {
        ticks.tick().await;
        match backend.purge(now_ms()).await {
            Ok(purged) => tracing::debug!(purged, "purged expired DataStore versions"),
            Err(error) => tracing::warn!(%error, "purging expired DataStore versions failed"),
        }
    }
}

/// Writes a removal tombstone over a live key. Returns the value and entry from before the
/// removal, or `None` if the key was missing or already removed.
pub async fn remove(
    backend: &dyn Backend,
    key: &EntryKey,
) -> Result<Option<(Stored, Entry)>, OperationError> {
    loop {
        let Some(previous) = backend.read(key).await?.filter(|entry| !entry.deleted) else {
            return Ok(None);
        };
        let now_ms = now_ms();
        let tombstone = Write::tombstone(now_ms);
        if backend
            .write_if(key, Some(&previous.version), now_ms, &tombstone)
            .await?
            .is_some()
        {
            return Ok(Some((codec::decode(&previous.value)?, previous)));
        }
    }
}
