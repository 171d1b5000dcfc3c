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
//! each a few microseconds, without a multi-key statement. A sleeping reader is woken only
//! when no reader is awake or the awake ones fall behind ([`QUEUED_PER_AWAKE_READER`]):
//! waking one for every request cost the VM thread 12% of its time at 64 coroutines.
//!
//! WAL mode gives each read a snapshot that includes every write committed before it starts,
//! so a read made after a write returned sees that write, as on sqlx's reader connections.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::{OpenFlags, OptionalExtension as _, params};
use tokio::sync::oneshot;

use super::batch::BatchStatistics;
use super::{BackendError, Entry, EntryKey, Version};

/// Requests a reader may have waiting for it before another reader is woken to share them:
/// waking a thread costs the waker a system call (12% of the VM thread's time at 64
/// coroutines when every request woke a reader), while a queued point read waits only a few
/// microseconds for the reader already awake.
const QUEUED_PER_AWAKE_READER: usize = 2;

/// One point read waiting for a reader thread.
struct Request {
    key: EntryKey,
    answer: oneshot::Sender<Result<Option<Entry>, rusqlite::Error>>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Request")
            .field("key", &self.key)
            .finish()
    }
}

/// Reader threads of one SQLite file; they finish what is queued and stop when this is
/// dropped.
#[derive(Debug)]
pub(crate) struct Readers {
    queue: Arc<Queue>,
    /// Reads answered, one statement each.
    answered: Arc<AtomicU64>,
}

/// The requests every reader takes from, and who is awake to take them.
#[derive(Debug, Default)]
struct Queue {
    state: Mutex<QueueState>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct QueueState {
    requests: VecDeque<Request>,
    /// Readers not waiting on [`Queue::wake`]: reading, or about to look at `requests`.
    awake: usize,
    /// Wake-ups sent that no reader has taken yet.
    woken: usize,
    /// Readers still running.
    running: usize,
    /// No more requests come: the readers finish what is queued and stop.
    closed: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Every change to the state is complete before the lock is let go.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `request`, waking a reader when none is awake or those awake have more than
    /// [`QUEUED_PER_AWAKE_READER`] each waiting; gives it back when no reader runs.
    fn push(&self, request: Request) -> Result<(), Request> {
        let mut state = self.lock();
        if state.running == 0 {
            return Err(request);
        }
        state.requests.push_back(request);
        let awake = state.awake + state.woken;
        let asleep = state.running.saturating_sub(awake);
        if asleep > 0 && (awake == 0 || state.requests.len() > awake * QUEUED_PER_AWAKE_READER) {
            state.woken += 1;
            self.wake.notify_one();
        }
        Ok(())
    }

    /// The next request, waiting for one; `None` once closed and empty.
    fn next(&self) -> Option<Request> {
        let mut state = self.lock();
        loop {
            if let Some(request) = state.requests.pop_front() {
                return Some(request);
            }
            if state.closed {
                return None;
            }
            state.awake -= 1;
            state = self
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.woken = state.woken.saturating_sub(1);
            state.awake += 1;
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }
}

/// Counts a reader out when its thread ends, however it ends; the last one drops what is
/// still queued, so its callers learn that no reader is left instead of waiting forever.
struct Running<'a>(&'a Queue);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.awake -= 1;
        state.running -= 1;
        if state.running == 0 {
            state.requests.clear();
        }
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
        let mut connections = Vec::with_capacity(count);
        for _ in 0..count {
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
            connections.push(connection);
        }
        let queue = Arc::new(Queue::default());
        let answered = Arc::new(AtomicU64::new(0));
        let readers = Self {
            queue: Arc::clone(&queue),
            answered: Arc::clone(&answered),
        };
        for (number, connection) in connections.into_iter().enumerate() {
            {
                let mut state = queue.lock();
                state.running += 1;
                state.awake += 1;
            }
            let (queue, answered) = (Arc::clone(&queue), Arc::clone(&answered));
            let spawned = std::thread::Builder::new()
                .name(format!("blox-sqlite-read-{number}"))
                .spawn(move || {
                    let _running = Running(&queue);
                    serve(&connection, statement, &queue, &answered);
                });
            if let Err(error) = spawned {
                let mut state = readers.queue.lock();
                state.running -= 1;
                state.awake -= 1;
                return Err(BackendError::ReaderThread(error));
            }
        }
        Ok(readers)
    }

    /// The current row of `key`, read on a reader thread.
    pub(crate) async fn read(&self, key: &EntryKey) -> Result<Option<Entry>, BackendError> {
        let (answer, answered) = oneshot::channel();
        let request = Request {
            key: key.clone(),
            answer,
        };
        self.queue
            .push(request)
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

impl Drop for Readers {
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// Answers requests until the queue closes.
fn serve(connection: &rusqlite::Connection, statement: &str, queue: &Queue, answered: &AtomicU64) {
    let Ok(mut prepared) = connection.prepare(statement) else {
        return;
    };
    while let Some(request) = queue.next() {
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

    const READ: &str = "SELECT value, user_ids, metadata, version_seq, created_ms, updated_ms, \
        deleted FROM entries WHERE universe_id = ?1 AND store_kind = ?2 AND store_name = ?3 \
        AND scope = ?4 AND entry_key = ?5";

    fn key(name: &str) -> EntryKey {
        EntryKey::named(name)
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

    fn request(
        name: &str,
    ) -> (
        Request,
        oneshot::Receiver<Result<Option<Entry>, rusqlite::Error>>,
    ) {
        let (answer, answered) = oneshot::channel();
        (
            Request {
                key: key(name),
                answer,
            },
            answered,
        )
    }

    /// A queue with `running` readers, `awake` of them not waiting.
    fn queue(running: usize, awake: usize) -> Queue {
        let queue = Queue::default();
        {
            let mut state = queue.lock();
            state.running = running;
            state.awake = awake;
        }
        queue
    }

    #[test]
    fn a_reader_is_woken_only_when_none_is_awake_or_the_awake_ones_fall_behind() {
        let queue = queue(4, 0);
        queue.push(request("a").0).unwrap();
        assert_eq!(queue.lock().woken, 1, "nobody awake: wake one");
        for (name, woken) in [("b", 1), ("c", 2), ("d", 2), ("e", 3), ("f", 3), ("g", 4)] {
            queue.push(request(name).0).unwrap();
            assert_eq!(queue.lock().woken, woken, "after {name}");
        }
        queue.push(request("h").0).unwrap();
        assert_eq!(queue.lock().woken, 4, "every reader already woken");
    }

    #[test]
    fn a_queue_without_readers_gives_requests_back_or_drops_them() {
        let stopped = queue(0, 0);
        assert!(stopped.push(request("a").0).is_err());

        let queue = queue(1, 1);
        let (queued, answered) = request("b");
        queue.push(queued).unwrap();
        drop(Running(&queue));
        assert_eq!(queue.lock().running, 0);
        assert!(
            answered.blocking_recv().is_err(),
            "the last reader's end drops what is queued"
        );
    }

    #[test]
    fn a_closed_queue_hands_out_what_it_holds_then_nothing() {
        let queue = queue(1, 1);
        queue.push(request("a").0).unwrap();
        queue.close();
        assert_eq!(queue.next().map(|request| request.key), Some(key("a")));
        assert!(queue.next().is_none());
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
