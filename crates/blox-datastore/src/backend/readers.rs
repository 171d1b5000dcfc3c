//! SQLite point reads on reader threads of Blox's own, which answer with the finished entry.
//!
//! Through sqlx, a point read costs the thread that awaits it (the VM thread) the query's
//! arguments, a command to the connection's worker thread, and then the row: its values,
//! allocated by SQLite on the worker, decoded and freed on the awaiting thread. On a slower
//! core that path, not Luau, was most of the VM thread's time per GetAsync (BENCHMARKS.md,
//! session 13: 6-7 µs per call with the database taken out, 16-19 µs with it), and batching
//! did not amortise it. Here each reader thread owns a read-only connection and the prepared
//! point-read statement; a request carries the key in and the decoded [`Entry`] out, so the
//! awaiting thread only sends a request and receives a value. Requests wait in one queue that
//! every reader takes from, so reads that arrive together run on several threads at once,
//! each a few microseconds, without a multi-key statement.
//!
//! WAL mode gives each read a snapshot that includes every write committed before it starts,
//! so a read made after a write returned sees that write, as on sqlx's reader connections.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{OpenFlags, OptionalExtension as _, params};
use tokio::sync::oneshot;

use super::batch::BatchStatistics;
use super::{BackendError, Entry, EntryKey, Version};

/// One point read waiting for a reader thread.
struct Request {
    key: EntryKey,
    answer: oneshot::Sender<Result<Option<Entry>, rusqlite::Error>>,
}

/// Reader threads of one SQLite file; they stop when this is dropped.
#[derive(Debug)]
pub(crate) struct Readers {
    requests: flume::Sender<Request>,
    /// Reads answered, one statement each.
    answered: Arc<AtomicU64>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Request")
            .field("key", &self.key)
            .finish()
    }
}

impl Readers {
    /// Opens `count` read-only connections to the (migrated) file at `path`, each preparing
    /// `statement`, and starts a thread for each.
    pub(crate) fn start(
        path: &Path,
        count: usize,
        busy_timeout: Duration,
        statement: &'static str,
    ) -> Result<Self, BackendError> {
        let (requests, queue) = flume::unbounded::<Request>();
        let answered = Arc::new(AtomicU64::new(0));
        for number in 0..count {
            let connection = rusqlite::Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(BackendError::Reader)?;
            connection
                .busy_timeout(busy_timeout)
                .map_err(BackendError::Reader)?;
            // Prepared here too, so a statement that does not prepare fails the open.
            connection
                .prepare(statement)
                .map_err(BackendError::Reader)?;
            let (queue, answered) = (queue.clone(), Arc::clone(&answered));
            std::thread::Builder::new()
                .name(format!("blox-sqlite-read-{number}"))
                .spawn(move || serve(&connection, statement, &queue, &answered))
                .map_err(BackendError::ReaderThread)?;
        }
        Ok(Self { requests, answered })
    }

    /// The current row of `key`, read on a reader thread.
    pub(crate) async fn read(&self, key: &EntryKey) -> Result<Option<Entry>, BackendError> {
        let (answer, answered) = oneshot::channel();
        let request = Request {
            key: key.clone(),
            answer,
        };
        self.requests
            .send(request)
            .map_err(|_| BackendError::ReadersStopped)?;
        answered
            .await
            .map_err(|_| BackendError::ReadersStopped)?
            .map_err(BackendError::Reader)
    }

    /// The reads answered so far; each is a statement of its own.
    pub(crate) fn statistics(&self) -> BatchStatistics {
        let answered = self.answered.load(Ordering::Relaxed);
        BatchStatistics {
            requests: answered,
            batches: answered,
        }
    }
}

/// Answers requests until every sender is gone.
fn serve(
    connection: &rusqlite::Connection,
    statement: &str,
    queue: &flume::Receiver<Request>,
    answered: &AtomicU64,
) {
    let Ok(mut prepared) = connection.prepare(statement) else {
        return;
    };
    for request in queue.iter() {
        let read = read_entry(&mut prepared, &request.key);
        answered.fetch_add(1, Ordering::Relaxed);
        let _ = request.answer.send(read);
    }
}

fn read_entry(
    statement: &mut rusqlite::Statement<'_>,
    key: &EntryKey,
) -> Result<Option<Entry>, rusqlite::Error> {
    statement
        .query_row(
            params![key.universe, key.kind as i16, key.store, key.scope, key.key],
            |row| {
                Ok(Entry {
                    value: row.get(0)?,
                    user_ids: row.get(1)?,
                    metadata: row.get(2)?,
                    version: Version {
                        seq: row.get(3)?,
                        created_ms: row.get(4)?,
                        updated_ms: row.get(5)?,
                    },
                    deleted: row.get(6)?,
                })
            },
        )
        .optional()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::StoreKind;

    const READ: &str = "SELECT value, user_ids, metadata, version_seq, created_ms, updated_ms, \
        deleted FROM entries WHERE universe_id = ?1 AND store_kind = ?2 AND store_name = ?3 \
        AND scope = ?4 AND entry_key = ?5";

    fn key(name: &str) -> EntryKey {
        EntryKey {
            universe: 1,
            kind: StoreKind::Standard,
            store: "S".to_owned(),
            scope: "global".to_owned(),
            key: name.to_owned(),
        }
    }

    fn file_with_table() -> (tempfile::TempDir, std::path::PathBuf, rusqlite::Connection) {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("readers.sqlite3");
        let writer = rusqlite::Connection::open(&path).unwrap();
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL; CREATE TABLE entries (universe_id INTEGER, \
                 store_kind INTEGER, store_name TEXT, scope TEXT, entry_key TEXT, value TEXT, \
                 user_ids TEXT, metadata TEXT, version_seq INTEGER, created_ms INTEGER, \
                 updated_ms INTEGER, deleted BOOLEAN, \
                 PRIMARY KEY (universe_id, store_kind, store_name, scope, entry_key))",
            )
            .unwrap();
        (folder, path, writer)
    }

    #[tokio::test]
    async fn every_reader_sees_what_was_committed_before_the_read() {
        let (_folder, path, writer) = file_with_table();
        let readers = Readers::start(&path, 3, Duration::from_secs(1), READ).unwrap();
        assert_eq!(readers.read(&key("k")).await.unwrap(), None);
        for seq in 1..=20_i64 {
            writer
                .execute(
                    "INSERT INTO entries VALUES (1, 0, 'S', 'global', 'k', ?1, '[]', '{}', ?2, \
                     5, ?2, false) ON CONFLICT DO UPDATE SET value = excluded.value, \
                     version_seq = excluded.version_seq, updated_ms = excluded.updated_ms",
                    params![seq.to_string(), seq],
                )
                .unwrap();
            // Reads sent together land on different threads; each must see the write.
            let (k, l, m) = (key("k"), key("k"), key("k"));
            let (first, second, third) =
                tokio::join!(readers.read(&k), readers.read(&l), readers.read(&m));
            for read in [first, second, third] {
                let entry = read.unwrap().unwrap();
                assert_eq!((entry.value, entry.version.seq), (seq.to_string(), seq));
                assert_eq!((entry.version.created_ms, entry.deleted), (5, false));
            }
        }
        assert_eq!(readers.statistics().requests, 61);
    }

    #[test]
    fn a_file_without_the_table_fails_the_start() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("empty.sqlite3");
        rusqlite::Connection::open(&path).unwrap();
        let started = Readers::start(&path, 2, Duration::from_secs(1), READ);
        assert!(matches!(started, Err(BackendError::Reader(_))));
    }
}
