//! The SQLite backend: the zero-set-up default, one file under the working directory.
//!
//! WAL journal, so readers never block the writer. One writer connection: SQLite allows one
//! writer at a time anyway, and a single connection avoids its lock back-off (measured: same
//! throughput as four writers, without their 130 ms p99.9). Point reads (every GetAsync, and
//! the read before each UpdateAsync and IncrementAsync) run on four reader threads of Blox's
//! own, each with a read-only connection, which answer with the finished entry
//! ([`super::readers`]: through sqlx the row's handling cost the awaiting VM thread more than
//! the Luau call did). Listings and version reads get four sqlx connections of their own. The
//! writer and those readers are Blox's own [`ConnectionSet`]s, not sqlx pools. Writes that
//! arrive together share one multi-row upsert ([`super::batch`]). `synchronous=NORMAL`
//! survives a process crash (`kill -9` loses nothing that was acknowledged); `FULL` also
//! survives power loss. Several processes may share the file: the busy timeout makes their
//! writers queue for the lock, and the compare-and-set writes keep read-modify-write
//! operations exact.

use std::fmt::Write as _;
use std::path::Path;
use std::str::FromStr as _;
use std::sync::Arc;

use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions,
    SqliteSynchronous,
};

use super::batch::BatchStatistics;
use super::connections::{ConnectionSet, Lease, SetLimits};
use super::readers::Readers;
use super::{
    BackendError, Entry, EntryKey, OpenOptions, Statements, WriteBatcher, WriteRequest,
    sql_backend, upsert_on_conflict,
};
use crate::codec;

/// Reading connections per server: enough for the two cores of a small machine to keep busy.
const READERS: usize = 4;

/// SQLite's durability setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SqliteSync {
    /// Survives a process crash; a power loss may lose the last transactions.
    #[default]
    Normal,
    /// Survives a power loss too, at a cost in write throughput.
    Full,
}

impl std::str::FromStr for SqliteSync {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "normal" => Ok(Self::Normal),
            "full" => Ok(Self::Full),
            other => Err(format!("expected normal or full, got {other:?}")),
        }
    }
}

/// The statements of the SQLite dialect.
///
/// The store kind is compared as `+?2`, not `?2`: with a bare parameter SQLite's planner checks
/// its bound value against the ordered index's `WHERE store_kind = 1` and then marks the
/// statement as depending on that value, so every execution re-prepared the statement (a
/// quarter of the reader threads' time in a GetAsync benchmark). Statements that want that
/// index say `store_kind = 1` themselves.
#[doc(hidden)]
pub const STATEMENTS: Statements = Statements {
    read: "SELECT value, user_ids, metadata, version_seq, created_ms, updated_ms, deleted \
           FROM blox_entries WHERE universe_id = ?1 AND store_kind = +?2 AND store_name = ?3 \
           AND scope = ?4 AND entry_key = ?5",
    write: concat!(
        "INSERT INTO blox_entries (universe_id, store_kind, store_name, scope, entry_key, \
            value, user_ids, metadata, version_seq, created_ms, updated_ms, deleted, keep_versions) \
            VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 1, ?9, ?9, ?10, ?11) ",
        upsert_on_conflict!(),
        " RETURNING version_seq, created_ms, updated_ms"
    ),
    // `write` for a JSON array of [universe, kind, store, scope, key, value, user_ids,
    // metadata, now_ms, deleted] arrays with distinct keys, in their order.
    write_many: concat!(
        "INSERT INTO blox_entries (universe_id, store_kind, store_name, scope, \
            entry_key, value, user_ids, metadata, version_seq, created_ms, updated_ms, deleted, \
            keep_versions) \
            SELECT q.value ->> 0, q.value ->> 1, q.value ->> 2, q.value ->> 3, q.value ->> 4, \
            q.value ->> 5, q.value ->> 6, q.value ->> 7, 1, q.value ->> 8, q.value ->> 8, \
            q.value ->> 9, ?2 FROM json_each(?1) AS q WHERE true ORDER BY q.key ",
        upsert_on_conflict!(),
        " RETURNING universe_id, store_kind, store_name, scope, entry_key, version_seq, \
            created_ms, updated_ms"
    ),
    insert_if_absent: "INSERT INTO blox_entries (universe_id, store_kind, store_name, scope, \
            entry_key, value, user_ids, metadata, version_seq, created_ms, updated_ms, deleted, \
            keep_versions) \
            VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 1, ?9, ?10, ?11, ?12) \
            ON CONFLICT DO NOTHING",
    update_if_seq: "UPDATE blox_entries SET value = ?6, user_ids = ?7, metadata = ?8, \
            version_seq = ?10, created_ms = ?11, updated_ms = ?12, deleted = ?13, \
            keep_versions = ?14 \
            WHERE universe_id = ?1 AND store_kind = +?2 AND store_name = ?3 AND scope = ?4 \
            AND entry_key = ?5 AND version_seq = ?9",
    read_version: "SELECT value, user_ids, metadata, version_seq, created_ms, updated_ms, deleted \
            FROM blox_versions WHERE universe_id = ?1 AND store_kind = +?2 AND store_name = ?3 \
            AND scope = ?4 AND entry_key = ?5 AND version_seq = ?6",
    read_version_at: "SELECT value, user_ids, metadata, version_seq, created_ms, updated_ms, deleted \
            FROM blox_versions WHERE universe_id = ?1 AND store_kind = +?2 AND store_name = ?3 \
            AND scope = ?4 AND entry_key = ?5 AND updated_ms <= ?6 \
            ORDER BY version_seq DESC LIMIT 1",
    list_versions_ascending: "SELECT version_seq, created_ms, updated_ms, deleted \
            FROM blox_versions WHERE universe_id = ?1 AND store_kind = +?2 AND store_name = ?3 \
            AND scope = ?4 AND entry_key = ?5 AND version_seq > ?6 AND version_seq < ?7 \
            AND updated_ms >= ?8 AND updated_ms <= ?9 ORDER BY version_seq LIMIT ?10",
    list_versions_descending: "SELECT version_seq, created_ms, updated_ms, deleted \
            FROM blox_versions WHERE universe_id = ?1 AND store_kind = +?2 AND store_name = ?3 \
            AND scope = ?4 AND entry_key = ?5 AND version_seq > ?6 AND version_seq < ?7 \
            AND updated_ms >= ?8 AND updated_ms <= ?9 \
            ORDER BY version_seq DESC LIMIT ?10",
    remove_version: "DELETE FROM blox_versions WHERE universe_id = ?1 AND store_kind = +?2 AND store_name = ?3 \
            AND scope = ?4 AND entry_key = ?5 AND version_seq = ?6",
    erase_latest_version: "UPDATE blox_entries SET value = 'null', user_ids = '[]', \
            metadata = '{}', deleted = 1 WHERE universe_id = ?1 AND store_kind = +?2 AND store_name = ?3 \
            AND scope = ?4 AND entry_key = ?5 AND version_seq = ?6",
    purge_versions: "DELETE FROM blox_versions WHERE expires_ms < ?1",
    purge_tombstones: "DELETE FROM blox_entries WHERE deleted = 1 AND updated_ms < ?1",
    delete: "DELETE FROM blox_entries WHERE universe_id = ?1 AND store_kind = +?2 AND store_name = ?3 \
            AND scope = ?4 AND entry_key = ?5 \
            RETURNING value, user_ids, metadata, version_seq, created_ms, updated_ms, deleted",
    sorted_ascending: "SELECT entry_key, CAST(value AS INTEGER) FROM blox_entries \
            WHERE store_kind = 1 AND universe_id = ?1 AND store_name = ?2 AND scope = ?3 \
            AND CAST(value AS INTEGER) >= ?4 AND CAST(value AS INTEGER) <= ?5 \
            AND (CAST(value AS INTEGER), entry_key) > (?6, ?7) \
            ORDER BY CAST(value AS INTEGER), entry_key LIMIT ?8",
    sorted_descending: "SELECT entry_key, CAST(value AS INTEGER) FROM blox_entries \
            WHERE store_kind = 1 AND universe_id = ?1 AND store_name = ?2 AND scope = ?3 \
            AND CAST(value AS INTEGER) >= ?4 AND CAST(value AS INTEGER) <= ?5 \
            AND (CAST(value AS INTEGER), entry_key) < (?6, ?7) \
            ORDER BY CAST(value AS INTEGER) DESC, entry_key DESC LIMIT ?8",
    list_keys_in_scope: "SELECT scope, entry_key FROM blox_entries \
            WHERE universe_id = ?1 AND store_kind = +?2 AND store_name = ?3 \
            AND scope = ?4 AND entry_key >= ?5 AND entry_key < ?6 \
            AND (NOT ?7 OR NOT deleted) ORDER BY entry_key LIMIT ?8",
    list_keys_across_scopes: "SELECT scope, entry_key FROM blox_entries \
            WHERE universe_id = ?1 AND store_kind = +?2 AND store_name = ?3 \
            AND scope >= ?4 AND scope < ?5 \
            AND (NOT ?6 OR NOT deleted) ORDER BY scope, entry_key LIMIT ?7",
    list_stores: "SELECT store_name, MIN(created_ms), MAX(updated_ms) FROM blox_entries \
            WHERE universe_id = ?1 AND store_kind = +?2 AND store_name >= ?3 \
            AND store_name < ?4 AND store_name > ?5 \
            AND store_name <> '' AND NOT deleted \
            GROUP BY store_name ORDER BY store_name LIMIT ?6",
};

/// How Blox keeps its SQLite connections: `size` at most, `timeout` to get one. An embedded
/// database cannot drop a connection, and reopening one loses its statement cache: nothing is
/// pinged, nothing closed.
pub fn set_limits(size: usize, timeout: std::time::Duration) -> SetLimits {
    SetLimits {
        size,
        timeout,
        ping_after_idle: None,
        close_after_idle: None,
    }
}

/// Entries in a SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteBackend {
    readers: ConnectionSet<SqliteConnection>,
    /// Unconditional writes that arrive together share a statement.
    writes: Arc<WriteBatcher>,
    writer: ConnectionSet<SqliteConnection>,
    /// Point reads, on reader threads of Blox's own.
    point_reads: Arc<Readers>,
    /// Every write asks to keep the version it supersedes ([`OpenOptions::keep_all_versions`]).
    keep_all_versions: bool,
}

impl SqliteBackend {
    /// Opens (creating if needed) the database file at `path` and migrates it.
    pub async fn open(path: &Path, options: &OpenOptions) -> Result<Self, BackendError> {
        let file_error = |source| BackendError::File {
            path: path.to_owned(),
            source,
        };
        if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(folder).map_err(file_error)?;
        }
        let connect = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match options.sqlite_sync {
                SqliteSync::Normal => SqliteSynchronous::Normal,
                SqliteSync::Full => SqliteSynchronous::Full,
            })
            .busy_timeout(options.timeout);
        // Servers that start together on a new file race on creating it, on switching it to
        // WAL (SQLite answers "database is locked" at once there, without waiting on the busy
        // timeout) and on migrations, which sqlx does not lock for SQLite. A lock file next to
        // the database serializes the whole open.
        let lock_path = path.with_extension("open-lock");
        let lock = std::fs::File::create(&lock_path).map_err(|source| BackendError::File {
            path: lock_path.clone(),
            source,
        })?;
        // Waiting for the lock blocks; keep it off the runtime's workers, or waiters could
        // starve the holder.
        let lock = tokio::task::spawn_blocking(move || lock.lock().map(|()| lock))
            .await
            .map_err(|error| std::io::Error::other(error.to_string()))
            .and_then(|locked| locked)
            .map_err(|source| BackendError::File {
                path: lock_path,
                source,
            })?;
        // Migrations run through a pool of their own, closed at once: sqlx's migrator takes a
        // pool readily, while a borrowed connection makes `open`'s future unprovably `Send`.
        let migrations = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(connect.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&migrations)
            .await?;
        migrations.close().await;
        let writer =
            ConnectionSet::connect(connect.clone(), set_limits(1, options.timeout)).await?;
        let readers = ConnectionSet::connect(connect, set_limits(READERS, options.timeout)).await?;
        let point_reads = Readers::start(path, READERS, options.timeout, STATEMENTS.read)?;
        drop(lock);
        Ok(Self {
            readers,
            writes: Arc::new(WriteBatcher::for_connections(1)),
            writer,
            point_reads: Arc::new(point_reads),
            keep_all_versions: options.keep_all_versions,
        })
    }

    async fn read_on_reader_threads(&self, key: &EntryKey) -> Result<Option<Entry>, BackendError> {
        self.point_reads.read(key).await
    }

    fn reader_statistics(&self) -> BatchStatistics {
        self.point_reads.statistics()
    }

    async fn read_connection(&self) -> Result<Lease<'_, SqliteConnection>, sqlx::Error> {
        self.readers.acquire().await
    }

    async fn write_connection(&self) -> Result<Lease<'_, SqliteConnection>, sqlx::Error> {
        self.writer.acquire().await
    }
}

/// Writes `key`'s five columns as the first members of a JSON array, leaving it open.
fn open_key_tuple(json: &mut String, key: &EntryKey) {
    let _ = write!(json, "[{},{}", key.universe, key.kind as i16);
    for text in [&key.store, &key.scope, &key.key] {
        json.push(',');
        codec::write_string(json, text);
    }
}

/// A JSON array of one array per item, each written by `write_row` (which leaves it open),
/// for a statement to walk with `json_each`.
fn json_rows<I>(
    items: impl Iterator<Item = I>,
    capacity: usize,
    mut write_row: impl FnMut(&mut String, I),
) -> String {
    let mut json = String::with_capacity(capacity);
    json.push('[');
    for (position, item) in items.enumerate() {
        if position > 0 {
            json.push(',');
        }
        write_row(&mut json, item);
        json.push(']');
    }
    json.push(']');
    json
}

/// Binds the writes of a `write_many` statement as one JSON array of arrays, and whether to
/// keep every version.
fn bind_writes<'q, 'w>(
    query: sqlx::query::Query<'q, sqlx::Sqlite, SqliteArguments>,
    writes: impl ExactSizeIterator<Item = &'w WriteRequest>,
    keep_all_versions: bool,
) -> sqlx::query::Query<'q, sqlx::Sqlite, SqliteArguments> {
    let capacity = writes.len() * 256;
    let json = json_rows(writes, capacity, |json, request| {
        let write = &request.write;
        open_key_tuple(json, &request.key);
        for text in [&write.value, &write.user_ids, &write.metadata] {
            json.push(',');
            codec::write_string(json, text);
        }
        let _ = write!(json, ",{},{}", write.now_ms, write.deleted);
    });
    query.bind(json).bind(keep_all_versions)
}

sql_backend!(
    SqliteBackend,
    sqlx::Sqlite,
    STATEMENTS,
    point_read = read_on_reader_threads,
    read_statistics = reader_statistics,
    bind_writes = bind_writes,
    read_connection = read_connection,
    write_connection = write_connection,
    lane = |_: &SqliteBackend| None
);
