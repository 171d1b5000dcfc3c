//! The PostgreSQL backend: the production store, shared by every server of a game.
//!
//! One [`ConnectionSet`] sized to the machine (measured on 2 cores: 4 to 8 connections serve
//! 64 concurrent clients faster than 64 connections would) for each VM's calls, opened on the
//! VM's own runtime ([`crate::backend::Backend::lane`], `attached.rs` says why), and one
//! shared set on the database runtime for background work. Servers racing on one key are
//! serialized by the compare-and-set statements, never by locks held across a round trip.
//! Migrations take sqlx's advisory lock, so servers that start together apply them once.

use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions as _, Connection as _, Row as _};

use super::batch::{BatchStatistics, Entered};
use super::connections::{ConnectionSet, Lease, SetLimits};
use super::{
    Backend, BackendError, Entry, EntryKey, OpenOptions, ReadBatch, ReadBatcher, Statements,
    WriteBatcher, WriteRequest, bind_key, entry_from_row, sql_backend, upsert_on_conflict,
};

/// Reads the rows of several keys, bound by [`bind_keys`]: the columns of [`Statements::read`],
/// then the key's position among those bound (from 0); no row for a key never written, one
/// row for each time a key is bound.
///
/// The key columns arrive as five arrays; each key is looked up on its own, by primary key,
/// whatever the planner knows of the table. The arrays' text takes the columns' collation
/// explicitly.
#[doc(hidden)]
pub const READ_MANY: &str = "SELECT e.value, e.user_ids, e.metadata, e.version_seq, e.created_ms, \
           e.updated_ms, e.deleted, q.position - 1 \
           FROM unnest($1::int8[], $2::int2[], $3::text[], $4::text[], $5::text[]) \
           WITH ORDINALITY AS q(universe_id, store_kind, store_name, scope, entry_key, position) \
           CROSS JOIN LATERAL (SELECT value, user_ids, metadata, version_seq, created_ms, \
           updated_ms, deleted FROM blox_entries b WHERE b.universe_id = q.universe_id \
           AND b.store_kind = q.store_kind AND b.store_name = q.store_name COLLATE \"C\" \
           AND b.scope = q.scope COLLATE \"C\" AND b.entry_key = q.entry_key COLLATE \"C\") e";

/// The statements of the PostgreSQL dialect.
#[doc(hidden)]
pub const STATEMENTS: Statements = Statements {
    read: "SELECT value, user_ids, metadata, version_seq, created_ms, updated_ms, deleted \
           FROM blox_entries WHERE universe_id = $1 AND store_kind = $2 AND store_name = $3 \
           AND scope = $4 AND entry_key = $5",
    write: concat!(
        "INSERT INTO blox_entries (universe_id, store_kind, store_name, scope, entry_key, \
            value, user_ids, metadata, version_seq, created_ms, updated_ms, deleted, keep_versions) \
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1, $9, $9, $10, $11) ",
        upsert_on_conflict!(),
        " RETURNING version_seq, created_ms, updated_ms"
    ),
    // `write` for writes with distinct keys bound as ten arrays, in their order.
    write_many: concat!(
        "INSERT INTO blox_entries (universe_id, store_kind, store_name, scope, entry_key, \
            value, user_ids, metadata, version_seq, created_ms, updated_ms, deleted, keep_versions) \
            SELECT q.universe_id, q.store_kind, q.store_name, q.scope, q.entry_key, q.value, \
            q.user_ids, q.metadata, 1, q.now_ms, q.now_ms, q.deleted, $11 \
            FROM unnest($1::int8[], $2::int2[], $3::text[], $4::text[], $5::text[], $6::text[], \
            $7::text[], $8::text[], $9::int8[], $10::bool[]) WITH ORDINALITY AS q(universe_id, \
            store_kind, store_name, scope, entry_key, value, user_ids, metadata, now_ms, deleted, \
            position) ORDER BY q.position ",
        upsert_on_conflict!(),
        " RETURNING universe_id, store_kind, store_name, scope, entry_key, version_seq, \
            created_ms, updated_ms"
    ),
    insert_if_absent: "INSERT INTO blox_entries (universe_id, store_kind, store_name, scope, \
            entry_key, value, user_ids, metadata, version_seq, created_ms, updated_ms, deleted, \
            keep_versions) \
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1, $9, $10, $11, $12) \
            ON CONFLICT DO NOTHING",
    update_if_seq: "UPDATE blox_entries SET value = $6, user_ids = $7, metadata = $8, \
            version_seq = $10, created_ms = $11, updated_ms = $12, deleted = $13, \
            keep_versions = $14 \
            WHERE universe_id = $1 AND store_kind = $2 AND store_name = $3 AND scope = $4 \
            AND entry_key = $5 AND version_seq = $9",
    read_version: "SELECT value, user_ids, metadata, version_seq, created_ms, updated_ms, deleted \
            FROM blox_versions WHERE universe_id = $1 AND store_kind = $2 AND store_name = $3 \
            AND scope = $4 AND entry_key = $5 AND version_seq = $6",
    read_version_at: "SELECT value, user_ids, metadata, version_seq, created_ms, updated_ms, deleted \
            FROM blox_versions WHERE universe_id = $1 AND store_kind = $2 AND store_name = $3 \
            AND scope = $4 AND entry_key = $5 AND updated_ms <= $6 \
            ORDER BY version_seq DESC LIMIT 1",
    list_versions_ascending: "SELECT version_seq, created_ms, updated_ms, deleted \
            FROM blox_versions WHERE universe_id = $1 AND store_kind = $2 AND store_name = $3 \
            AND scope = $4 AND entry_key = $5 AND version_seq > $6 AND version_seq < $7 \
            AND updated_ms >= $8 AND updated_ms <= $9 ORDER BY version_seq LIMIT $10",
    list_versions_descending: "SELECT version_seq, created_ms, updated_ms, deleted \
            FROM blox_versions WHERE universe_id = $1 AND store_kind = $2 AND store_name = $3 \
            AND scope = $4 AND entry_key = $5 AND version_seq > $6 AND version_seq < $7 \
            AND updated_ms >= $8 AND updated_ms <= $9 \
            ORDER BY version_seq DESC LIMIT $10",
    remove_version: "DELETE FROM blox_versions WHERE universe_id = $1 AND store_kind = $2 AND store_name = $3 \
            AND scope = $4 AND entry_key = $5 AND version_seq = $6",
    erase_latest_version: "UPDATE blox_entries SET value = 'null', user_ids = '[]', \
            metadata = '{}', deleted = TRUE WHERE universe_id = $1 AND store_kind = $2 AND store_name = $3 \
            AND scope = $4 AND entry_key = $5 AND version_seq = $6",
    // A batch of writes holds several rows' locks at once (its versions' too, through the
    // trigger), so a purge that waited for one of them while holding another could close a
    // cycle; both purges leave locked rows for the next run.
    purge_versions: "DELETE FROM blox_versions WHERE (universe_id, store_kind, store_name, \
            scope, entry_key, version_seq) IN (SELECT universe_id, store_kind, store_name, scope, \
            entry_key, version_seq FROM blox_versions WHERE expires_ms < $1 \
            FOR UPDATE SKIP LOCKED)",
    purge_tombstones: "DELETE FROM blox_entries WHERE (universe_id, store_kind, store_name, \
            scope, entry_key) IN (SELECT universe_id, store_kind, store_name, scope, entry_key \
            FROM blox_entries WHERE tombstone_ms < $1 FOR UPDATE SKIP LOCKED)",
    delete: "DELETE FROM blox_entries WHERE universe_id = $1 AND store_kind = $2 AND store_name = $3 \
            AND scope = $4 AND entry_key = $5 \
            RETURNING value, user_ids, metadata, version_seq, created_ms, updated_ms, deleted",
    sorted_ascending: "SELECT entry_key, sort_value FROM blox_entries \
            WHERE store_kind = 1 AND universe_id = $1 AND store_name = $2 AND scope = $3 \
            AND sort_value >= $4 AND sort_value <= $5 AND (sort_value, entry_key) > ($6, $7) \
            ORDER BY sort_value, entry_key LIMIT $8",
    sorted_descending: "SELECT entry_key, sort_value FROM blox_entries \
            WHERE store_kind = 1 AND universe_id = $1 AND store_name = $2 AND scope = $3 \
            AND sort_value >= $4 AND sort_value <= $5 AND (sort_value, entry_key) < ($6, $7) \
            ORDER BY sort_value DESC, entry_key DESC LIMIT $8",
    list_keys_in_scope: "SELECT scope, entry_key FROM blox_entries \
            WHERE universe_id = $1 AND store_kind = $2 AND store_name = $3 \
            AND scope = $4 AND entry_key >= $5 AND entry_key < $6 \
            AND (NOT $7 OR NOT deleted) ORDER BY entry_key LIMIT $8",
    list_keys_across_scopes: "SELECT scope, entry_key FROM blox_entries \
            WHERE universe_id = $1 AND store_kind = $2 AND store_name = $3 \
            AND scope >= $4 AND scope < $5 \
            AND (NOT $6 OR NOT deleted) ORDER BY scope, entry_key LIMIT $7",
    list_stores: "SELECT store_name, MIN(created_ms), MAX(updated_ms) FROM blox_entries \
            WHERE universe_id = $1 AND store_kind = $2 AND store_name >= $3 \
            AND store_name < $4 AND store_name > $5 \
            AND store_name <> '' AND NOT deleted \
            GROUP BY store_name ORDER BY store_name LIMIT $6",
};

/// Entries in a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PostgresBackend {
    connections: ConnectionSet<PgConnection>,
    /// Point reads that arrive together share a statement.
    reads: Arc<ReadBatcher>,
    /// Unconditional writes that arrive together share a statement.
    writes: Arc<WriteBatcher>,
    /// Every write asks to keep the version it supersedes ([`OpenOptions::keep_all_versions`]).
    keep_all_versions: bool,
}

/// How Blox keeps its PostgreSQL connections: `size` at most, `timeout` to get one.
///
/// A connection idle for over a second is pinged before it is handed out: under load none
/// idles that long, while after a server restart the idle ones, broken by it, are found and
/// replaced before any request uses them. One idle for ten minutes (sqlx's pool default) is
/// closed, so a quiet server holds few of the database's connections.
pub fn set_limits(size: usize, timeout: Duration) -> SetLimits {
    SetLimits {
        size,
        timeout,
        ping_after_idle: Some(Duration::from_secs(1)),
        close_after_idle: Some(Duration::from_secs(10 * 60)),
    }
}

/// How Blox's sessions connect to `url`: as the URL says, with PostgreSQL's plan cache set to
/// reuse one generic plan per statement unless the URL's `options` choose otherwise.
///
/// Under PostgreSQL's default (`plan_cache_mode = auto`) the batched statements, whose keys
/// arrive as arrays, are planned afresh on every execution: a custom plan that knows the
/// arrays' length always looks cheaper than the generic one, which assumes ten elements. Every
/// statement Blox runs finds its rows through the primary key or an index range whatever its
/// parameters, so the generic plan is the plan a custom one would choose, without the planning
/// (BENCHMARKS.md, session 9).
pub fn connect_options(url: &str) -> Result<PgConnectOptions, BackendError> {
    let connect = PgConnectOptions::from_str(url).map_err(|error| BackendError::InvalidUrl {
        url: url.to_owned(),
        reason: error.to_string(),
    })?;
    let chosen = connect.get_options().is_some_and(sets_plan_cache_mode);
    Ok(if chosen {
        connect
    } else {
        connect.options([("plan_cache_mode", "force_generic_plan")])
    })
}

/// Whether a session's command-line `options` (`-c name=value`, `-cname=value` or
/// `--name=value`, names with `-` or `_`) set `plan_cache_mode`.
fn sets_plan_cache_mode(options: &str) -> bool {
    let mut tokens = options.split_whitespace();
    while let Some(token) = tokens.next() {
        let setting = match token {
            "-c" => tokens.next().unwrap_or_default(),
            _ => match token
                .strip_prefix("--")
                .or_else(|| token.strip_prefix("-c"))
            {
                Some(setting) => setting,
                None => continue,
            },
        };
        let name = setting.split('=').next().unwrap_or_default();
        if name
            .replace('-', "_")
            .eq_ignore_ascii_case("plan_cache_mode")
        {
            return true;
        }
    }
    false
}

impl PostgresBackend {
    /// Connects to `url` and migrates the database (or `options.postgres_schema`).
    pub async fn open(url: &str, options: &OpenOptions) -> Result<Self, BackendError> {
        let mut connect = connect_options(url)?;
        // One direct connection first: it reports why a server is unreachable at once, where
        // a pool would retry until its timeout and report only that.
        let mut admin = tokio::time::timeout(options.timeout, connect.connect())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
        if let Some(schema) = &options.postgres_schema {
            let create = format!(
                "CREATE SCHEMA IF NOT EXISTS \"{}\"",
                schema.replace('"', "")
            );
            sqlx::raw_sql(sqlx::AssertSqlSafe(create))
                .execute(&mut admin)
                .await?;
            connect = connect.options([("search_path", schema.as_str())]);
        }
        admin.close().await?;
        // Migrations run through a pool of their own, closed at once: sqlx's migrator takes a
        // pool readily, while a borrowed connection makes `open`'s future unprovably `Send`.
        // They take sqlx's advisory lock, so servers that start together apply them once.
        let migrations = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(options.timeout)
            .connect_with(connect.clone())
            .await?;
        sqlx::migrate!("./migrations/postgres")
            .run(&migrations)
            .await?;
        migrations.close().await;
        let limits = set_limits(options.postgres_pool_size as usize, options.timeout);
        let connections = ConnectionSet::connect(connect, limits).await?;
        Ok(Self {
            connections,
            reads: Arc::new(ReadBatcher::for_connections(limits.size)),
            writes: Arc::new(WriteBatcher::for_connections(limits.size)),
            keep_all_versions: options.keep_all_versions,
        })
    }

    /// A VM's copy: the same database, connections and batches of its own.
    fn sibling(&self) -> Self {
        Self {
            connections: self.connections.sibling(),
            reads: Arc::new(self.reads.sibling()),
            writes: Arc::new(self.writes.sibling()),
            keep_all_versions: self.keep_all_versions,
        }
    }

    /// Reads `key` alone when a read slot is free, else in the next batch: point reads that
    /// arrive together share one multi-key statement ([`super::batch`]), since every statement
    /// is a round trip.
    async fn batched_read(&self, key: &EntryKey) -> Result<Option<Entry>, BackendError> {
        let batch = match self.reads.enter(|| key.clone()).await {
            Entered::Alone(slot) => return slot.finish(self.read_one(key).await),
            Entered::Answered(answer) => return answer,
            Entered::Lead(batch) => batch,
        };
        let read = self.read_batch(&batch).await;
        batch.finish(read)
    }

    fn batched_read_statistics(&self) -> BatchStatistics {
        self.reads.statistics()
    }

    /// Reads one key with the single-key statement.
    async fn read_one(&self, key: &EntryKey) -> Result<Option<Entry>, sqlx::Error> {
        let query = bind_key(sqlx::query::<sqlx::Postgres>(STATEMENTS.read), key);
        let mut connection = self.connection().await?;
        let done = query.fetch_optional(&mut *connection).await;
        let row = connection.checked(done)?;
        row.as_ref().map(entry_from_row).transpose()
    }

    /// Reads a batch's keys in one statement (a batch handed on with one key left, with the
    /// single-key statement).
    async fn read_batch(&self, batch: &ReadBatch<'_>) -> Result<Vec<Option<Entry>>, sqlx::Error> {
        if let Some(key) = batch.single() {
            return Ok(vec![self.read_one(key).await?]);
        }
        let query = bind_keys(sqlx::query(READ_MANY), batch);
        let mut connection = self.connection().await?;
        let done = query.fetch_all(&mut *connection).await;
        let rows = connection.checked(done)?;
        entries_by_position(&rows, batch.request_count())
    }

    /// A connection for reads and writes alike: one set serves both.
    async fn connection(&self) -> Result<Lease<'_, PgConnection>, sqlx::Error> {
        self.connections.acquire().await
    }
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, PgArguments>;

/// The five key columns of several keys, as the arrays the batch statements take, borrowed
/// from the requests: sqlx encodes an argument when it is bound, so the arrays need no copies
/// of the strings.
struct KeyArrays<'k> {
    universes: Vec<i64>,
    kinds: Vec<i16>,
    stores: Vec<&'k str>,
    scopes: Vec<&'k str>,
    names: Vec<&'k str>,
}

impl<'k> KeyArrays<'k> {
    fn with_capacity(count: usize) -> Self {
        Self {
            universes: Vec::with_capacity(count),
            kinds: Vec::with_capacity(count),
            stores: Vec::with_capacity(count),
            scopes: Vec::with_capacity(count),
            names: Vec::with_capacity(count),
        }
    }

    fn push(&mut self, key: &'k EntryKey) {
        self.universes.push(key.universe);
        self.kinds.push(key.kind as i16);
        self.stores.push(&key.store);
        self.scopes.push(&key.scope);
        self.names.push(&key.key);
    }

    fn bind(self, query: PgQuery<'_>) -> PgQuery<'_> {
        query
            .bind(self.universes)
            .bind(self.kinds)
            .bind(self.stores)
            .bind(self.scopes)
            .bind(self.names)
    }
}

/// The entries of a [`READ_MANY`] statement's rows, placed at the positions of their keys
/// among `count` keys read.
fn entries_by_position(rows: &[PgRow], count: usize) -> Result<Vec<Option<Entry>>, sqlx::Error> {
    let mut entries: Vec<Option<Entry>> = (0..count).map(|_| None).collect();
    for row in rows {
        let position: i64 = row.try_get(7)?;
        let slot = usize::try_from(position)
            .ok()
            .and_then(|position| entries.get_mut(position))
            .ok_or_else(|| {
                sqlx::Error::Protocol(format!("read_many returned key position {position}"))
            })?;
        *slot = Some(entry_from_row(row)?);
    }
    Ok(entries)
}

/// Binds the keys of a `read_many` statement as five arrays, one per key column.
fn bind_keys<'q>(query: PgQuery<'q>, batch: &ReadBatch<'_>) -> PgQuery<'q> {
    let mut keys = KeyArrays::with_capacity(batch.request_count());
    for key in batch.requests() {
        keys.push(key);
    }
    keys.bind(query)
}

/// Binds the writes of a `write_many` statement as ten arrays, one per column, and whether to
/// keep every version.
fn bind_writes<'q, 'w>(
    query: PgQuery<'q>,
    writes: impl ExactSizeIterator<Item = &'w WriteRequest>,
    keep_all_versions: bool,
) -> PgQuery<'q> {
    let count = writes.len();
    let mut keys = KeyArrays::with_capacity(count);
    let mut values = Vec::with_capacity(count);
    let mut user_ids = Vec::with_capacity(count);
    let mut metadata = Vec::with_capacity(count);
    let mut times = Vec::with_capacity(count);
    let mut deleted = Vec::with_capacity(count);
    for WriteRequest { key, write } in writes {
        keys.push(key);
        values.push(write.value.as_str());
        user_ids.push(write.user_ids.as_str());
        metadata.push(write.metadata.as_str());
        times.push(write.now_ms);
        deleted.push(write.deleted);
    }
    keys.bind(query)
        .bind(values)
        .bind(user_ids)
        .bind(metadata)
        .bind(times)
        .bind(deleted)
        .bind(keep_all_versions)
}

sql_backend!(
    PostgresBackend,
    sqlx::Postgres,
    STATEMENTS,
    point_read = batched_read,
    read_statistics = batched_read_statistics,
    bind_writes = bind_writes,
    read_connection = connection,
    write_connection = connection,
    lane = |backend: &PostgresBackend| Some(Arc::new(backend.sibling()) as Arc<dyn Backend>)
);

#[cfg(test)]
mod tests {
    use blox_testkit::{Scratch, TestDatabase};

    use super::*;

    /// The plan cache mode a session of a backend opened on `url` runs with.
    async fn plan_cache_mode(url: &str) -> String {
        let backend = PostgresBackend::open(url, &OpenOptions::default())
            .await
            .expect("the test server");
        let mut connection = backend.connection().await.expect("a connection");
        sqlx::query_scalar("SHOW plan_cache_mode")
            .fetch_one(&mut *connection)
            .await
            .expect("SHOW")
    }

    #[test]
    fn a_plan_cache_mode_is_found_in_every_spelling_of_the_options() {
        for chosen in [
            "-c plan_cache_mode=auto",
            "-c search_path=a -cplan_cache_mode=auto",
            "--plan-cache-mode=auto",
            "-c PLAN_CACHE_MODE=auto",
        ] {
            assert!(sets_plan_cache_mode(chosen), "{chosen}");
        }
        for other in [
            "-c search_path=plan_cache_mode",
            "-c search_path=x_plan_cache_mode_y",
            "",
        ] {
            assert!(!sets_plan_cache_mode(other), "{other}");
        }
    }

    /// The scratch schema's name contains `plan_cache_mode`, as a setting's value that must not
    /// count as the setting.
    #[tokio::test]
    async fn sessions_reuse_generic_plans_unless_the_url_chooses() {
        let scratch = Scratch::new(TestDatabase::Postgres, "plan_cache_mode");
        assert_eq!(plan_cache_mode(&scratch.url).await, "force_generic_plan");
        let chosen = format!("{}%20-c%20plan_cache_mode%3Dauto", scratch.url);
        assert_eq!(plan_cache_mode(&chosen).await, "auto");
    }
}
