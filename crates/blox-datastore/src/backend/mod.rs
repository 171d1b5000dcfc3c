//! Storage backends: where DataStore entries live.
//!
//! A backend offers three primitives, and every DataStore operation is built from them:
//! a read, an unconditional write (SetAsync: the last writer wins, as on Roblox) and a
//! compare-and-set write that only succeeds if the key is still at the version that was read.
//! Read-modify-write operations (UpdateAsync, IncrementAsync, RemoveAsync) are optimistic
//! loops over read + compare-and-set: no transaction or row lock is ever held while Luau code
//! (an UpdateAsync transform) runs, and servers racing on one key serialize on the version
//! check, so nothing is lost or overwritten, on one server or many.
//!
//! Reads and unconditional writes that arrive while the database is busy share statements
//! ([`batch`]): under load the database pays per statement, not per row.
//!
//! There are two implementations, SQLite (embedded, the default) and PostgreSQL (shared by
//! many servers). sqlx's `AnyPool` is not used: it has no common ground for the two dialects'
//! upserts and types. One conformance suite (`tests/conformance.rs`) runs against both.

pub mod batch;
pub mod connections;
pub mod postgres;
mod readers;
pub mod sqlite;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row as _;

pub use postgres::PostgresBackend;
pub use sqlite::{SqliteBackend, SqliteSync};

/// The kind of store a key belongs to; part of every key's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i16)]
pub enum StoreKind {
    /// A `DataStore` (GetDataStore, GetGlobalDataStore).
    Standard = 0,
    /// An `OrderedDataStore`: integer values, no versions, sorted listings.
    Ordered = 1,
}

/// The full identity of one entry. Every row belongs to a universe (a game), so two games
/// sharing a database never see each other's data. `store`, `scope` and `key` are in
/// [`stored_text`] form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EntryKey {
    /// The universe (`game.GameId`).
    pub universe: i64,
    /// Which kind of store.
    pub kind: StoreKind,
    /// The data store's name.
    pub store: String,
    /// The scope ("global" unless given).
    pub scope: String,
    /// The key within the scope.
    pub key: String,
}

impl EntryKey {
    /// Key `name` of the standard store "S", scope "global", universe 1: the key unit tests
    /// read and write when only the name matters.
    #[cfg(test)]
    pub(crate) fn named(name: &str) -> Self {
        Self {
            universe: 1,
            kind: StoreKind::Standard,
            store: "S".to_owned(),
            scope: "global".to_owned(),
            key: name.to_owned(),
        }
    }

    /// The order in which a batch of writes takes its rows' locks: the primary key's.
    pub fn lock_order(&self, other: &Self) -> std::cmp::Ordering {
        self.lock_tuple().cmp(&other.lock_tuple())
    }

    /// The primary key's columns, compared in [`EntryKey::lock_order`].
    fn lock_tuple(&self) -> (i64, i16, &str, &str, &str) {
        (
            self.universe,
            self.kind as i16,
            &self.store,
            &self.scope,
            &self.key,
        )
    }
}

/// The character that starts an escape in stored names, scopes and keys.
const ESCAPE: char = '\u{1}';

/// The form in which a store name, scope or key is stored. PostgreSQL's `text` cannot hold
/// NUL, which a Luau string may contain; both backends store the same escaped form, so they
/// agree on every key. NUL becomes U+0001 U+0001 and U+0001 becomes U+0001 U+0002; every
/// other string is stored unchanged. The mapping is injective and keeps byte order (NUL <
/// U+0001 < every other character), so listings stay in the order of the original keys.
pub fn stored_text(text: &str) -> String {
    if !text.contains(['\0', ESCAPE]) {
        return text.to_owned();
    }
    let mut stored = String::with_capacity(text.len() + 4);
    for c in text.chars() {
        match c {
            '\0' => stored.extend([ESCAPE, '\u{1}']),
            ESCAPE => stored.extend([ESCAPE, '\u{2}']),
            other => stored.push(other),
        }
    }
    stored
}

/// The original text of a [`stored_text`] form.
pub fn unescape_stored_text(stored: &str) -> String {
    let mut text = String::with_capacity(stored.len());
    let mut chars = stored.chars();
    while let Some(c) = chars.next() {
        match (c, c == ESCAPE) {
            (_, true) => match chars.next() {
                Some('\u{1}') => text.push('\0'),
                Some('\u{2}') | None => text.push(ESCAPE),
                Some(other) => text.extend([ESCAPE, other]),
            },
            (c, false) => text.push(c),
        }
    }
    text
}

/// The smallest string above every string that starts with `prefix`, or `None` when there
/// is none (an empty prefix, or one made only of U+10FFFF): the exclusive end of a prefix
/// range in code-point order, which is byte order for UTF-8.
pub fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match last {
            '\u{D7FF}' => Some('\u{E000}'),
            c => char::from_u32(c as u32 + 1),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// Service metadata of one version of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    /// Rises by one with every write of the key, removals included.
    pub seq: i64,
    /// When the object was created (Unix milliseconds).
    pub created_ms: i64,
    /// When this version was written (Unix milliseconds).
    pub updated_ms: i64,
}

/// The stored state of a key.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The value as stored JSON text.
    pub value: String,
    /// The user ids as a JSON array.
    pub user_ids: String,
    /// The user metadata as a JSON object.
    pub metadata: String,
    /// The latest version's service metadata.
    pub version: Version,
    /// True when the latest version is a removal tombstone.
    pub deleted: bool,
}

/// A string above every stored name, scope and key: 13 × U+10FFFF (52 bytes), while stored
/// text holds at most 12 U+10FFFF in a row (names, scopes and keys are at most 50 bytes, and
/// the escape never produces U+10FFFF). It closes open ranges, so every listing statement is
/// a plain index range.
pub const BEYOND_EVERY_KEY: &str = "\u{10FFFF}\u{10FFFF}\u{10FFFF}\u{10FFFF}\u{10FFFF}\u{10FFFF}\u{10FFFF}\u{10FFFF}\u{10FFFF}\u{10FFFF}\u{10FFFF}\u{10FFFF}\u{10FFFF}";

/// The smallest stored string above `text`: stored text never holds NUL, so nothing lies
/// between `text` and `text` + U+0001.
pub fn successor(text: &str) -> String {
    format!("{text}\u{1}")
}

/// Which scopes a key listing covers.
#[derive(Debug, Clone, PartialEq)]
pub enum ScopeRange {
    /// One scope, with keys in `[key_from, key_to)`.
    Exactly(String),
    /// Every scope in `[from, to)` (`None`: no end), all keys.
    Between {
        /// Lowest scope (inclusive).
        from: String,
        /// End of the range (exclusive).
        to: Option<String>,
    },
}

/// One page request of `ListKeysAsync`: keys of one store in (scope, key) byte order, after
/// an exclusive cursor. All text is in [`stored_text`] form.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyListing {
    /// The universe.
    pub universe: i64,
    /// The kind of store.
    pub kind: StoreKind,
    /// The store's name.
    pub store: String,
    /// The scopes listed.
    pub scopes: ScopeRange,
    /// Lowest key listed (inclusive), with [`ScopeRange::Exactly`].
    pub key_from: String,
    /// End of the key range (exclusive; `None`: no end), with [`ScopeRange::Exactly`].
    pub key_to: Option<String>,
    /// Only keys after this (scope, key) are listed; ("", "") for the start.
    pub after: (String, String),
    /// Leave out keys whose latest version is a removal tombstone.
    pub exclude_deleted: bool,
    /// The most keys to return.
    pub limit: i64,
}

/// One page request of `ListDataStoresAsync`: names of stores that hold a live key, in byte
/// order, within a name range, after an exclusive cursor. Names are in [`stored_text`] form.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreListing {
    /// The universe.
    pub universe: i64,
    /// The kind of store.
    pub kind: StoreKind,
    /// Lowest name listed (inclusive).
    pub name_from: String,
    /// End of the name range (exclusive); `None` for no end.
    pub name_to: Option<String>,
    /// Only stores named after this are listed.
    pub after: String,
    /// The most stores to return.
    pub limit: i64,
}

/// One store of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreSummary {
    /// The store's name, in [`stored_text`] form.
    pub name: String,
    /// The earliest creation time of its live keys (Unix milliseconds).
    pub created_ms: i64,
    /// The latest update time of its live keys (Unix milliseconds).
    pub updated_ms: i64,
}

/// One page request of `ListVersionsAsync`: the versions of one key, by sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionListing {
    /// The key whose versions are listed.
    pub key: EntryKey,
    /// Newest first instead of oldest first.
    pub descending: bool,
    /// Only versions written at or after this time (Unix milliseconds).
    pub min_ms: i64,
    /// Only versions written at or before this time (Unix milliseconds).
    pub max_ms: i64,
    /// Only versions after this sequence in the listing's order (the cursor).
    pub after_seq: Option<i64>,
    /// The most versions to return.
    pub limit: i64,
}

/// One page request of `GetSortedAsync`: an ordered store's entries by value, then key.
#[derive(Debug, Clone, PartialEq)]
pub struct SortedListing {
    /// The universe.
    pub universe: i64,
    /// The ordered store's name, in [`stored_text`] form.
    pub store: String,
    /// The scope, in [`stored_text`] form.
    pub scope: String,
    /// Highest values first instead of lowest first.
    pub descending: bool,
    /// The lowest value listed (inclusive).
    pub min_value: i64,
    /// The highest value listed (inclusive).
    pub max_value: i64,
    /// Only entries after this (value, key) in the listing's order; `None` for the start.
    pub after: Option<(i64, String)>,
    /// The most entries to return.
    pub limit: i64,
}

/// One version of a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionSummary {
    /// The version's service metadata.
    pub version: Version,
    /// True when the version is a removal tombstone.
    pub deleted: bool,
}

/// One unconditional write waiting in a [`batch::Batcher`].
#[derive(Debug, Clone)]
pub struct WriteRequest {
    /// The key written.
    pub key: EntryKey,
    /// What is written.
    pub write: Write,
}

/// The point reads of one backend, batched.
pub type ReadBatcher = batch::Batcher<EntryKey, Option<Entry>>;
/// Point reads that go to the database in one statement.
pub type ReadBatch<'a> = batch::Batch<'a, EntryKey, Option<Entry>>;
/// The unconditional writes of one backend, batched.
pub type WriteBatcher = batch::Batcher<WriteRequest, Version>;
/// Unconditional writes that go to the database together.
pub type WriteBatch<'a> = batch::Batch<'a, WriteRequest, Version>;

/// What a write stores.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    /// The value as JSON text.
    pub value: String,
    /// The user ids as a JSON array.
    pub user_ids: String,
    /// The user metadata as a JSON object.
    pub metadata: String,
    /// True to write a removal tombstone.
    pub deleted: bool,
    /// The time of the write (Unix milliseconds).
    pub now_ms: i64,
}

impl Write {
    /// A removal tombstone written at `now_ms`.
    pub fn tombstone(now_ms: i64) -> Self {
        Self {
            value: "null".to_owned(),
            user_ids: "[]".to_owned(),
            metadata: "{}".to_owned(),
            deleted: true,
            now_ms,
        }
    }
}

/// A failure of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The database URL is neither `sqlite:` nor `postgres://`, or does not parse.
    #[error("invalid database URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The SQLite file's folder cannot be created or locked.
    #[error("cannot use the database file {path}")]
    File {
        /// The path involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The database cannot be reached or rejected a statement.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// The statement or transaction this request shared with others ([`batch`]) failed;
    /// every request of the batch shares its error.
    #[error("database error")]
    Batched(#[source] Arc<sqlx::Error>),
    /// A SQLite reader thread's connection could not open, prepare its statement or read a
    /// row.
    #[error("database error")]
    Reader(#[source] rusqlite::Error),
    /// A SQLite reader thread could not be started.
    #[error("cannot start a SQLite reader thread")]
    ReaderThread(#[source] std::io::Error),
    /// Every SQLite reader thread stopped before answering (none could prepare its statement
    /// again, or one panicked while holding the request).
    #[error("the SQLite reader threads stopped")]
    ReadersStopped,
    /// The schema migrations failed.
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Where entries are stored. Implementations are cheap to share across tasks.
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug {
    /// The current row of `key`, tombstones included; `None` if it was never written.
    async fn read(&self, key: &EntryKey) -> Result<Option<Entry>, BackendError>;

    /// A copy of this backend for one VM, whose calls the VM thread polls on the VM's own
    /// runtime: it shares the database and the statistics but has connections of its own,
    /// opened where first used, so the VM's runtime drives their sockets and answers reach
    /// the VM thread without passing a database worker (PostgreSQL). `None` where the
    /// connections are not sockets of a runtime and any thread may poll them: SQLite's each
    /// run on a worker thread of their own, so every VM shares the one backend.
    fn lane(&self) -> Option<Arc<dyn Backend>>;

    /// How this backend's point reads ([`Backend::read`]) shared statements so far.
    fn read_statistics(&self) -> batch::BatchStatistics;

    /// How this backend's unconditional writes ([`Backend::write`]) shared statements so far.
    fn write_statistics(&self) -> batch::BatchStatistics;

    /// Writes unconditionally; the last writer wins. Returns the new version.
    async fn write(&self, key: &EntryKey, write: &Write) -> Result<Version, BackendError>;

    /// Writes only if the key is still at `expected` (`None`: the key has no row). Returns
    /// the new version, or `None` when another writer got there first. `created_ms` is the
    /// creation time the new version carries.
    async fn write_if(
        &self,
        key: &EntryKey,
        expected: Option<&Version>,
        created_ms: i64,
        write: &Write,
    ) -> Result<Option<Version>, BackendError>;

    /// One page of (scope, key) pairs, in byte order. Served by the primary key, so a page
    /// costs the same wherever the cursor is.
    async fn list_keys(&self, listing: &KeyListing) -> Result<Vec<(String, String)>, BackendError>;

    /// One page of the stores holding at least one live key, by name. The global store
    /// (`GetGlobalDataStore`, whose name is empty) is never listed.
    async fn list_stores(&self, listing: &StoreListing) -> Result<Vec<StoreSummary>, BackendError>;

    /// The version `seq` of `key` (the latest or a retained one), tombstones included.
    async fn read_version(&self, key: &EntryKey, seq: i64) -> Result<Option<Entry>, BackendError>;

    /// The version of `key` that was current at `at_ms`, among the versions still kept.
    async fn read_version_at(
        &self,
        key: &EntryKey,
        at_ms: i64,
    ) -> Result<Option<Entry>, BackendError>;

    /// One page of the versions of a key: the retained ones and the latest.
    async fn list_versions(
        &self,
        listing: &VersionListing,
    ) -> Result<Vec<VersionSummary>, BackendError>;

    /// Deletes version `seq` of `key` for good. The latest version cannot leave the key
    /// without a latest version, so it becomes a tombstone with the same sequence instead.
    async fn remove_version(&self, key: &EntryKey, seq: i64) -> Result<(), BackendError>;

    /// Deletes `key` for good (an ordered store's RemoveAsync). Returns what it held.
    async fn delete(&self, key: &EntryKey) -> Result<Option<Entry>, BackendError>;

    /// One page of an ordered store's entries as (key, value), served by an index on
    /// (value, key), so a page costs the same at any rank.
    async fn list_sorted(
        &self,
        listing: &SortedListing,
    ) -> Result<Vec<(String, i64)>, BackendError>;

    /// Deletes retained versions that expired before `now_ms`, and keys removed more than
    /// [`RETENTION_MS`] before it. Returns how many rows went.
    async fn purge(&self, now_ms: i64) -> Result<u64, BackendError>;
}

/// How long a superseded version, or a removed key's tombstone, is kept: 30 days.
pub const RETENTION_MS: i64 = 30 * 24 * 60 * 60 * 1000;

/// How to open a backend.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// PostgreSQL connections per server; size it to the machine, not to the coroutines.
    pub postgres_pool_size: u32,
    /// A PostgreSQL schema to create and use instead of the default search path.
    pub postgres_schema: Option<String>,
    /// SQLite's `synchronous` setting.
    pub sqlite_sync: SqliteSync,
    /// How long to wait for a connection or a lock before failing.
    pub timeout: Duration,
    /// Keep every superseded version (for 30 days), not only the first write of each UTC
    /// hour's predecessor as Roblox does.
    pub keep_all_versions: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            postgres_pool_size: 8,
            postgres_schema: None,
            sqlite_sync: SqliteSync::Normal,
            timeout: Duration::from_secs(10),
            keep_all_versions: false,
        }
    }
}

/// The database used when none is configured: a SQLite file under the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://.blox/datastore.sqlite3";

/// Opens the backend a URL names (`sqlite://path` or `postgres://...`) and applies its
/// migrations.
pub async fn open(url: &str, options: &OpenOptions) -> Result<Arc<dyn Backend>, BackendError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresBackend::open(url, options).await?))
    } else if let Some(path) = url
        .strip_prefix("sqlite://")
        .or(url.strip_prefix("sqlite:"))
    {
        if path.is_empty() {
            return Err(BackendError::InvalidUrl {
                url: url.to_owned(),
                reason: "no file path after sqlite://".to_owned(),
            });
        }
        Ok(Arc::new(SqliteBackend::open(path.as_ref(), options).await?))
    } else {
        Err(BackendError::InvalidUrl {
            url: url.to_owned(),
            reason: "expected sqlite://PATH or postgres://...".to_owned(),
        })
    }
}

/// The statements one SQL dialect runs. Parameters, in order: the five key columns, then what
/// each statement names.
#[doc(hidden)]
#[derive(Debug)]
pub struct Statements {
    /// Reads a key's row. Returns value, user_ids, metadata, version_seq, created_ms,
    /// updated_ms, deleted.
    pub read: &'static str,
    /// Upserts a key (value, user_ids, metadata, now_ms, deleted), returning version_seq,
    /// created_ms, updated_ms.
    pub write: &'static str,
    /// `write` for several keys, none twice, bound by the dialect's `bind_writes`; returns the
    /// five key columns, then version_seq, created_ms, updated_ms, one row per key.
    pub write_many: &'static str,
    /// Inserts a key only if it has no row (value, user_ids, metadata, created_ms, now_ms,
    /// deleted).
    pub insert_if_absent: &'static str,
    /// Updates a key only at the expected sequence (value, user_ids, metadata, expected_seq,
    /// new_seq, created_ms, now_ms, deleted).
    pub update_if_seq: &'static str,
    /// Reads a retained superseded version (version_seq), same columns as `read`.
    pub read_version: &'static str,
    /// Reads the newest retained superseded version written at or before a time (at_ms),
    /// same columns as `read`.
    pub read_version_at: &'static str,
    /// Lists retained superseded versions by rising sequence (above_seq, below_seq, min_ms,
    /// max_ms, limit), returning version_seq, created_ms, updated_ms, deleted.
    pub list_versions_ascending: &'static str,
    /// The same, by falling sequence.
    pub list_versions_descending: &'static str,
    /// Deletes a retained superseded version (version_seq).
    pub remove_version: &'static str,
    /// Turns the latest version into a tombstone, if it is at version_seq.
    pub erase_latest_version: &'static str,
    /// Deletes every retained version that expired before a time (now_ms).
    pub purge_versions: &'static str,
    /// Deletes every key whose latest version is a tombstone written before a time (cutoff).
    pub purge_tombstones: &'static str,
    /// Deletes a key for good, returning its row (same columns as `read`).
    pub delete: &'static str,
    /// Lists an ordered store's entries by rising (value, key) (universe, store, scope,
    /// min_value, max_value, after_value, after_key, limit), returning entry_key, value.
    pub sorted_ascending: &'static str,
    /// The same, by falling (value, key), before (before_value, before_key).
    pub sorted_descending: &'static str,
    /// Lists keys of one scope (universe, kind, store, scope, key_from, key_to,
    /// exclude_deleted, limit), returning scope, entry_key.
    pub list_keys_in_scope: &'static str,
    /// Lists keys of a scope range (universe, kind, store, scope_from, scope_to,
    /// exclude_deleted, limit), returning scope, entry_key.
    pub list_keys_across_scopes: &'static str,
    /// Lists stores (universe, kind, name_from, name_to, after, limit), returning
    /// store_name, MIN(created_ms), MAX(updated_ms) over live keys.
    pub list_stores: &'static str,
}

type Arguments<DB> = <DB as sqlx::Database>::Arguments;

/// Binds the five key columns.
pub(crate) fn bind_key<'q, DB>(
    query: sqlx::query::Query<'q, DB, Arguments<DB>>,
    key: &EntryKey,
) -> sqlx::query::Query<'q, DB, Arguments<DB>>
where
    DB: sqlx::Database,
    i64: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    i16: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    String: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    query
        .bind(key.universe)
        .bind(key.kind as i16)
        .bind(key.store.clone())
        .bind(key.scope.clone())
        .bind(key.key.clone())
}

/// Binds a write's value, user ids and metadata.
fn bind_payload<'q, DB>(
    query: sqlx::query::Query<'q, DB, Arguments<DB>>,
    write: &Write,
) -> sqlx::query::Query<'q, DB, Arguments<DB>>
where
    DB: sqlx::Database,
    String: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    query
        .bind(write.value.clone())
        .bind(write.user_ids.clone())
        .bind(write.metadata.clone())
}

pub(crate) fn entry_from_row<R>(row: &R) -> Result<Entry, sqlx::Error>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    String: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    bool: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(Entry {
        value: row.try_get(0)?,
        user_ids: row.try_get(1)?,
        metadata: row.try_get(2)?,
        version: Version {
            seq: row.try_get(3)?,
            created_ms: row.try_get(4)?,
            updated_ms: row.try_get(5)?,
        },
        deleted: row.try_get(6)?,
    })
}

/// Splits a batch of writes into rounds of distinct keys, each in lock order: a key's first
/// write goes in the first round, its second in the second, and so on, so running the rounds
/// in order applies each key's writes in the order they were made.
fn write_rounds(requests: &[&WriteRequest]) -> Vec<Vec<usize>> {
    let mut seen: std::collections::HashMap<&EntryKey, usize> =
        std::collections::HashMap::with_capacity(requests.len());
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    for (position, request) in requests.iter().enumerate() {
        let earlier = seen.entry(&request.key).or_insert(0);
        if rounds.len() <= *earlier {
            rounds.push(Vec::new());
        }
        rounds[*earlier].push(position);
        *earlier += 1;
    }
    for round in &mut rounds {
        round.sort_by(|&a, &b| requests[a].key.lock_order(&requests[b].key));
    }
    rounds
}

/// The versions a `write_many` statement returned, in the order of `writes` (distinct keys,
/// in lock order), found by each row's key.
fn versions_by_key<R>(rows: &[R], writes: &[&WriteRequest]) -> Result<Vec<Version>, sqlx::Error>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    String: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i16: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let mut versions: Vec<Option<Version>> = vec![None; writes.len()];
    for row in rows {
        let universe: i64 = row.try_get(0)?;
        let kind: i16 = row.try_get(1)?;
        let (store, scope, key): (String, String, String) =
            (row.try_get(2)?, row.try_get(3)?, row.try_get(4)?);
        let written = (universe, kind, store.as_str(), scope.as_str(), key.as_str());
        let position = writes
            .binary_search_by(|write| write.key.lock_tuple().cmp(&written))
            .map_err(|_| sqlx::Error::Protocol(format!("write_many returned {written:?}")))?;
        versions[position] = Some(Version {
            seq: row.try_get(5)?,
            created_ms: row.try_get(6)?,
            updated_ms: row.try_get(7)?,
        });
    }
    versions
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| sqlx::Error::Protocol("write_many left out a write".to_owned()))
}

fn version_from_row<R>(row: &R) -> Result<Version, sqlx::Error>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    i64: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(Version {
        seq: row.try_get(0)?,
        created_ms: row.try_get(1)?,
        updated_ms: row.try_get(2)?,
    })
}

/// A page of keys as one or two index range scans: within one scope, `scope = ? AND
/// entry_key` in a range; across scopes, first the rest of the cursor's scope, then a
/// `scope` range. The cursor is folded into the lower bound here, so no statement needs an
/// `OR` that would keep the database from seeking.
async fn list_keys_with<DB>(
    connection: &mut DB::Connection,
    statements: &Statements,
    listing: &KeyListing,
) -> Result<Vec<(String, String)>, sqlx::Error>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
    i64: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    i16: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    bool: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    String: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB> + for<'r> sqlx::Decode<'r, DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let store = |sql: &'static str| {
        sqlx::query::<DB>(sql)
            .bind(listing.universe)
            .bind(listing.kind as i16)
            .bind(listing.store.clone())
    };
    let pairs = |rows: Vec<DB::Row>| -> Result<Vec<(String, String)>, sqlx::Error> {
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    };
    let in_scope = |scope: &str, from: String, to: String, limit: i64| {
        store(statements.list_keys_in_scope)
            .bind(scope.to_owned())
            .bind(from)
            .bind(to)
            .bind(listing.exclude_deleted)
            .bind(limit)
    };
    let (after_scope, after_key) = &listing.after;
    match &listing.scopes {
        ScopeRange::Exactly(scope) => {
            let mut from = listing.key_from.clone();
            if after_scope == scope {
                from = from.max(successor(after_key));
            } else if !after_scope.is_empty() && after_scope > scope {
                return Ok(Vec::new());
            }
            let to = listing
                .key_to
                .clone()
                .unwrap_or_else(|| BEYOND_EVERY_KEY.to_owned());
            pairs(
                in_scope(scope, from, to, listing.limit)
                    .fetch_all(&mut *connection)
                    .await?,
            )
        }
        ScopeRange::Between { from, to } => {
            let to = to.clone().unwrap_or_else(|| BEYOND_EVERY_KEY.to_owned());
            let mut keys = Vec::new();
            let mut scope_from = from.clone();
            if !after_scope.is_empty() {
                if after_scope >= from && after_scope < &to {
                    let rest = in_scope(
                        after_scope,
                        successor(after_key),
                        BEYOND_EVERY_KEY.to_owned(),
                        listing.limit,
                    );
                    keys = pairs(rest.fetch_all(&mut *connection).await?)?;
                }
                scope_from = scope_from.max(successor(after_scope));
            }
            let remaining = listing.limit - keys.len() as i64;
            if remaining > 0 {
                let rows = store(statements.list_keys_across_scopes)
                    .bind(scope_from)
                    .bind(to)
                    .bind(listing.exclude_deleted)
                    .bind(remaining)
                    .fetch_all(&mut *connection)
                    .await?;
                keys.extend(pairs(rows)?);
            }
            Ok(keys)
        }
    }
}

/// The conflict clause of every upsert (`write`, `write_many`), the same in both dialects: the
/// new value, user ids and metadata replace the old, the version goes up by one, and a key
/// written after its removal is created anew.
macro_rules! upsert_on_conflict {
    () => {
        "ON CONFLICT (universe_id, store_kind, store_name, scope, entry_key) DO UPDATE SET \
         value = excluded.value, user_ids = excluded.user_ids, metadata = excluded.metadata, \
         version_seq = blox_entries.version_seq + 1, \
         created_ms = CASE WHEN blox_entries.deleted THEN excluded.created_ms \
         ELSE blox_entries.created_ms END, \
         updated_ms = excluded.updated_ms, deleted = excluded.deleted, \
         keep_versions = excluded.keep_versions"
    };
}
use upsert_on_conflict;

/// Implements [`Backend`] for a dialect from its [`Statements`] and the methods that do the
/// point read (PostgreSQL batches it, SQLite runs it on reader threads), report its
/// statistics, and hand out its reading and writing connections.
macro_rules! sql_backend {
    ($backend:ty, $db:ty, $statements:expr, point_read = $point_read:ident, read_statistics = $read_statistics:ident, bind_writes = $bind_writes:path, read_connection = $read:ident, write_connection = $write:ident, lane = $lane:expr) => {
        #[async_trait::async_trait]
        impl $crate::backend::Backend for $backend {
            async fn read(
                &self,
                key: &$crate::backend::EntryKey,
            ) -> Result<Option<$crate::backend::Entry>, $crate::backend::BackendError> {
                self.$point_read(key).await
            }

            fn lane(&self) -> Option<std::sync::Arc<dyn $crate::backend::Backend>> {
                ($lane)(self)
            }

            fn read_statistics(&self) -> $crate::backend::batch::BatchStatistics {
                self.$read_statistics()
            }

            fn write_statistics(&self) -> $crate::backend::batch::BatchStatistics {
                self.writes.statistics()
            }

            async fn write(
                &self,
                key: &$crate::backend::EntryKey,
                write: &$crate::backend::Write,
            ) -> Result<$crate::backend::Version, $crate::backend::BackendError> {
                let request = || $crate::backend::WriteRequest {
                    key: key.clone(),
                    write: write.clone(),
                };
                let batch = match self.writes.enter(request).await {
                    $crate::backend::batch::Entered::Alone(slot) => {
                        return slot.finish(self.write_one(key, write).await);
                    }
                    $crate::backend::batch::Entered::Answered(answer) => return answer,
                    $crate::backend::batch::Entered::Lead(batch) => batch,
                };
                let written = self.write_batch(&batch).await;
                batch.finish(written)
            }

            async fn write_if(
                &self,
                key: &$crate::backend::EntryKey,
                expected: Option<&$crate::backend::Version>,
                created_ms: i64,
                write: &$crate::backend::Write,
            ) -> Result<Option<$crate::backend::Version>, $crate::backend::BackendError> {
                let (statement, seq) = match expected {
                    None => ($statements.insert_if_absent, 1),
                    Some(version) => ($statements.update_if_seq, version.seq + 1),
                };
                let query = $crate::backend::bind_key(sqlx::query::<$db>(statement), key);
                let mut query = $crate::backend::bind_payload(query, write);
                if let Some(version) = expected {
                    query = query.bind(version.seq).bind(seq);
                }
                let mut connection = self.$write().await?;
                let done = query
                    .bind(created_ms)
                    .bind(write.now_ms)
                    .bind(write.deleted)
                    .bind(self.keep_all_versions)
                    .execute(&mut *connection)
                    .await;
                let done = connection.checked(done)?;
                Ok(
                    (done.rows_affected() == 1).then_some($crate::backend::Version {
                        seq,
                        created_ms,
                        updated_ms: write.now_ms,
                    }),
                )
            }

            async fn list_keys(
                &self,
                listing: &$crate::backend::KeyListing,
            ) -> Result<Vec<(String, String)>, $crate::backend::BackendError> {
                let mut connection = self.$read().await?;
                let done =
                    $crate::backend::list_keys_with::<$db>(&mut *connection, &$statements, listing)
                        .await;
                Ok(connection.checked(done)?)
            }

            async fn list_stores(
                &self,
                listing: &$crate::backend::StoreListing,
            ) -> Result<Vec<$crate::backend::StoreSummary>, $crate::backend::BackendError> {
                let mut connection = self.$read().await?;
                let done = sqlx::query::<$db>($statements.list_stores)
                    .bind(listing.universe)
                    .bind(listing.kind as i16)
                    .bind(listing.name_from.clone())
                    .bind(
                        listing
                            .name_to
                            .clone()
                            .unwrap_or_else(|| $crate::backend::BEYOND_EVERY_KEY.to_owned()),
                    )
                    .bind(listing.after.clone())
                    .bind(listing.limit)
                    .fetch_all(&mut *connection)
                    .await;
                let rows = connection.checked(done)?;
                let stores: Result<Vec<_>, sqlx::Error> = rows
                    .iter()
                    .map(|row| {
                        Ok($crate::backend::StoreSummary {
                            name: sqlx::Row::try_get(row, 0)?,
                            created_ms: sqlx::Row::try_get(row, 1)?,
                            updated_ms: sqlx::Row::try_get(row, 2)?,
                        })
                    })
                    .collect();
                Ok(stores?)
            }

            async fn read_version(
                &self,
                key: &$crate::backend::EntryKey,
                seq: i64,
            ) -> Result<Option<$crate::backend::Entry>, $crate::backend::BackendError> {
                self.latest_or_retained(
                    key,
                    |latest| latest.version.seq == seq,
                    $statements.read_version,
                    seq,
                )
                .await
            }

            async fn read_version_at(
                &self,
                key: &$crate::backend::EntryKey,
                at_ms: i64,
            ) -> Result<Option<$crate::backend::Entry>, $crate::backend::BackendError> {
                self.latest_or_retained(
                    key,
                    |latest| latest.version.updated_ms <= at_ms,
                    $statements.read_version_at,
                    at_ms,
                )
                .await
            }

            async fn list_versions(
                &self,
                listing: &$crate::backend::VersionListing,
            ) -> Result<Vec<$crate::backend::VersionSummary>, $crate::backend::BackendError> {
                let latest = self.read(&listing.key).await?;
                let (above, below) = $crate::backend::sequence_bounds(listing);
                let latest = latest
                    .map(|entry| $crate::backend::VersionSummary {
                        version: entry.version,
                        deleted: entry.deleted,
                    })
                    .filter(|latest| {
                        let version = &latest.version;
                        version.seq > above
                            && version.seq < below
                            && (listing.min_ms..=listing.max_ms).contains(&version.updated_ms)
                    });
                let statement = if listing.descending {
                    $statements.list_versions_descending
                } else {
                    $statements.list_versions_ascending
                };
                let mut connection = self.$read().await?;
                let done = $crate::backend::bind_key(sqlx::query::<$db>(statement), &listing.key)
                    .bind(above)
                    .bind(below)
                    .bind(listing.min_ms)
                    .bind(listing.max_ms)
                    .bind(listing.limit)
                    .fetch_all(&mut *connection)
                    .await;
                let rows = connection.checked(done)?;
                let retained: Result<Vec<_>, sqlx::Error> = rows
                    .iter()
                    .map(|row| {
                        Ok($crate::backend::VersionSummary {
                            version: $crate::backend::version_from_row(row)?,
                            deleted: sqlx::Row::try_get(row, 3)?,
                        })
                    })
                    .collect();
                Ok($crate::backend::merge_latest(retained?, latest, listing))
            }

            async fn remove_version(
                &self,
                key: &$crate::backend::EntryKey,
                seq: i64,
            ) -> Result<(), $crate::backend::BackendError> {
                let mut connection = self.$write().await?;
                for statement in [$statements.remove_version, $statements.erase_latest_version] {
                    let done = $crate::backend::bind_key(sqlx::query::<$db>(statement), key)
                        .bind(seq)
                        .execute(&mut *connection)
                        .await;
                    connection.checked(done)?;
                }
                Ok(())
            }

            async fn delete(
                &self,
                key: &$crate::backend::EntryKey,
            ) -> Result<Option<$crate::backend::Entry>, $crate::backend::BackendError> {
                let query = $crate::backend::bind_key(sqlx::query::<$db>($statements.delete), key);
                let mut connection = self.$write().await?;
                let done = query.fetch_optional(&mut *connection).await;
                let row = connection.checked(done)?;
                Ok(row
                    .as_ref()
                    .map($crate::backend::entry_from_row)
                    .transpose()?)
            }

            async fn list_sorted(
                &self,
                listing: &$crate::backend::SortedListing,
            ) -> Result<Vec<(String, i64)>, $crate::backend::BackendError> {
                let (statement, start) = if listing.descending {
                    (
                        $statements.sorted_descending,
                        (
                            listing.max_value,
                            $crate::backend::BEYOND_EVERY_KEY.to_owned(),
                        ),
                    )
                } else {
                    (
                        $statements.sorted_ascending,
                        (listing.min_value, String::new()),
                    )
                };
                let (after_value, after_key) = listing.after.clone().unwrap_or(start);
                let mut connection = self.$read().await?;
                let done = sqlx::query::<$db>(statement)
                    .bind(listing.universe)
                    .bind(listing.store.clone())
                    .bind(listing.scope.clone())
                    .bind(listing.min_value)
                    .bind(listing.max_value)
                    .bind(after_value)
                    .bind(after_key)
                    .bind(listing.limit)
                    .fetch_all(&mut *connection)
                    .await;
                let rows = connection.checked(done)?;
                let entries: Result<Vec<_>, sqlx::Error> = rows
                    .iter()
                    .map(|row| Ok((sqlx::Row::try_get(row, 0)?, sqlx::Row::try_get(row, 1)?)))
                    .collect();
                Ok(entries?)
            }

            async fn purge(&self, now_ms: i64) -> Result<u64, $crate::backend::BackendError> {
                let mut connection = self.$write().await?;
                let done = sqlx::query::<$db>($statements.purge_versions)
                    .bind(now_ms)
                    .execute(&mut *connection)
                    .await;
                let versions = connection.checked(done)?;
                let done = sqlx::query::<$db>($statements.purge_tombstones)
                    .bind(now_ms - $crate::backend::RETENTION_MS)
                    .execute(&mut *connection)
                    .await;
                let tombstones = connection.checked(done)?;
                Ok(versions.rows_affected() + tombstones.rows_affected())
            }
        }

        impl $backend {
            /// Writes one key with the single-key upsert.
            async fn write_one(
                &self,
                key: &$crate::backend::EntryKey,
                write: &$crate::backend::Write,
            ) -> Result<$crate::backend::Version, sqlx::Error> {
                let query = $crate::backend::bind_key(sqlx::query::<$db>($statements.write), key);
                let query = $crate::backend::bind_payload(query, write)
                    .bind(write.now_ms)
                    .bind(write.deleted)
                    .bind(self.keep_all_versions);
                let mut connection = self.$write().await?;
                let done = query.fetch_one(&mut *connection).await;
                let row = connection.checked(done)?;
                $crate::backend::version_from_row(&row)
            }

            /// Runs a batch's writes with one statement per round of distinct keys (a key
            /// written twice goes in two rounds, in the order of its calls), in one transaction
            /// when there are several rounds (a batch handed on with one write left, with the
            /// single-key upsert). Each statement takes its rows' locks in key order, as every
            /// batch of every server does, so two batches never wait on each other's rows in a
            /// cycle.
            async fn write_batch(
                &self,
                batch: &$crate::backend::WriteBatch<'_>,
            ) -> Result<Vec<$crate::backend::Version>, sqlx::Error> {
                if let Some(request) = batch.single() {
                    return Ok(vec![self.write_one(&request.key, &request.write).await?]);
                }
                let requests: Vec<&$crate::backend::WriteRequest> = batch.requests().collect();
                let mut connection = self.$write().await?;
                let rounds = $crate::backend::write_rounds(&requests);
                let done = async {
                    let mut versions = vec![None; requests.len()];
                    if let [round] = &rounds[..] {
                        self.upsert_round(&mut connection, &requests, round, &mut versions)
                            .await?;
                    } else {
                        let mut transaction = sqlx::Connection::begin(&mut *connection).await?;
                        for round in &rounds {
                            self.upsert_round(&mut transaction, &requests, round, &mut versions)
                                .await?;
                        }
                        transaction.commit().await?;
                    }
                    Ok(versions.into_iter().flatten().collect())
                }
                .await;
                connection.checked(done)
            }

            /// One `write_many` statement for the writes at `round`'s positions of `requests`
            /// (distinct keys, in lock order), noting each one's version at its position.
            async fn upsert_round(
                &self,
                connection: &mut <$db as sqlx::Database>::Connection,
                requests: &[&$crate::backend::WriteRequest],
                round: &[usize],
                versions: &mut [Option<$crate::backend::Version>],
            ) -> Result<(), sqlx::Error> {
                let writes: Vec<&$crate::backend::WriteRequest> =
                    round.iter().map(|&position| requests[position]).collect();
                let rows = $bind_writes(
                    sqlx::query::<$db>($statements.write_many),
                    writes.iter().copied(),
                    self.keep_all_versions,
                )
                .fetch_all(&mut *connection)
                .await?;
                let written = $crate::backend::versions_by_key(&rows, &writes)?;
                for (&position, version) in round.iter().zip(written) {
                    versions[position] = Some(version);
                }
                Ok(())
            }

            /// The latest version of `key` if `wanted` picks it, else the retained version
            /// `statement` selects with `argument` (a sequence or a time).
            async fn latest_or_retained(
                &self,
                key: &$crate::backend::EntryKey,
                wanted: impl Fn(&$crate::backend::Entry) -> bool + Send,
                statement: &'static str,
                argument: i64,
            ) -> Result<Option<$crate::backend::Entry>, $crate::backend::BackendError> {
                let latest = $crate::backend::Backend::read(self, key).await?;
                if let Some(entry) = latest.filter(|entry| wanted(entry)) {
                    return Ok(Some(entry));
                }
                let query = sqlx::query::<$db>(statement);
                let mut connection = self.$read().await?;
                let done = $crate::backend::bind_key(query, key)
                    .bind(argument)
                    .fetch_optional(&mut *connection)
                    .await;
                let row = connection.checked(done)?;
                Ok(row
                    .as_ref()
                    .map($crate::backend::entry_from_row)
                    .transpose()?)
            }
        }
    };
}

/// The exclusive sequence range a version page covers: the listing's cursor bounds it from
/// below when ascending, from above when descending.
fn sequence_bounds(listing: &VersionListing) -> (i64, i64) {
    match (listing.after_seq, listing.descending) {
        (Some(after), false) => (after, i64::MAX),
        (Some(after), true) => (0, after),
        (None, _) => (0, i64::MAX),
    }
}

/// A page of versions from the retained ones (already in order and limited) and the latest,
/// whose sequence is above every retained one: last when ascending, first when descending.
fn merge_latest(
    mut retained: Vec<VersionSummary>,
    latest: Option<VersionSummary>,
    listing: &VersionListing,
) -> Vec<VersionSummary> {
    let limit = listing.limit.max(0) as usize;
    if let Some(latest) = latest {
        if listing.descending {
            retained.insert(0, latest);
        } else {
            retained.push(latest);
        }
    }
    retained.truncate(limit);
    retained
}
use sql_backend;

#[cfg(test)]
mod tests {
    use super::{stored_text, unescape_stored_text};

    #[test]
    fn stored_text_is_reversible_and_keeps_plain_text() {
        assert_eq!(stored_text("player_1"), "player_1");
        for text in [
            "a\0b",
            "\0",
            "x\u{1}\u{1}",
            "\u{1}",
            "\u{1}\0\u{2}",
            "é\0日",
        ] {
            let stored = stored_text(text);
            assert!(!stored.contains('\0'));
            assert_eq!(unescape_stored_text(&stored), text);
        }
        assert_ne!(stored_text("a\0"), stored_text("a\u{1}"));
    }

    #[test]
    fn stored_text_keeps_byte_order() {
        let mut texts = [
            "p\0null", "player", "p\u{1}", "p", "p\0", "p\0\0", "q", "p\u{2}", "\0",
        ];
        let mut stored: Vec<String> = texts.iter().map(|t| stored_text(t)).collect();
        texts.sort();
        stored.sort();
        let back: Vec<String> = stored.iter().map(|s| unescape_stored_text(s)).collect();
        assert_eq!(back, texts);
    }
}
