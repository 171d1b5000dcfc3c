//! Point reads that arrive together share one statement.
//!
//! Under load a game server reads many keys at once (players joining, 64 coroutines each
//! loading a profile), and each point read costs the database far more for its statement than
//! for its row: on PostgreSQL one statement reading eight keys costs about as much server CPU as
//! two statements reading one (measured with pgbench on the benchmark machine; BENCHMARKS.md,
//! session 7). So a backend lets only a few read statements be in flight at once; a read that
//! arrives while they all are waits, and when one finishes, every read that queued meanwhile
//! goes out together in the next statement. Nothing is held back to make a batch: a read that
//! finds a free slot goes at once, alone, with the single-key statement. Batches grow only as
//! fast as the database falls behind, so a quiet server pays one uncontended lock per read.
//!
//! There is no batching task: the read whose statement finishes hands its slot and the queued
//! reads to the first of them, whose own call then runs the batch and answers the others. A
//! batch's statement reads each key with the same primary-key lookup as the single read, so a
//! batch sees what a read of each of its keys, started when the batch's statement did, would
//! see: a read never misses a write that returned before the read was called.
//!
//! A reader that gives up (its future dropped) while it leads a batch hands the batch on
//! instead of abandoning the reads that queued behind it.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use super::{BackendError, Entry, EntryKey};

/// The most keys one statement reads.
const MAX_BATCH: usize = 128;

/// Coalesces one backend's point reads; see the module documentation.
#[derive(Debug)]
pub struct ReadBatcher {
    state: Mutex<State>,
    /// The most read statements in flight at once.
    in_flight_limit: usize,
    /// Point reads answered so far.
    reads: AtomicU64,
    /// Statements that answered them.
    statements: AtomicU64,
}

/// How a backend's point reads were served: `reads / statements` is the mean batch size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadStatistics {
    /// Point reads answered (a failed statement's reads included).
    pub reads: u64,
    /// Read statements that answered them.
    pub statements: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Reads waiting for a slot, oldest first.
    queued: Vec<Queued>,
    /// Read statements running now.
    in_flight: usize,
}

#[derive(Debug)]
struct Queued {
    key: EntryKey,
    turn: oneshot::Sender<Turn>,
}

/// What a queued read is told when its wait ends.
#[derive(Debug)]
enum Turn {
    /// Another read's batch read this key.
    Answered(Result<Option<Entry>, BackendError>),
    /// This read now holds a slot and leads a batch of itself and these reads.
    Lead(Vec<Queued>),
}

/// How a read proceeds once [`ReadBatcher::enter`] returns.
#[derive(Debug)]
pub enum Entered<'a> {
    /// The key was read in another read's batch.
    Answered(Result<Option<Entry>, BackendError>),
    /// The caller holds a slot: it must read the batch's keys and [`Batch::finish`] it.
    Lead(Batch<'a>),
}

/// Keys one read statement must read, led by the read that runs it. Dropping it unfinished
/// hands its slot and its queued reads on.
#[derive(Debug)]
pub struct Batch<'a> {
    batcher: &'a ReadBatcher,
    own: Cow<'a, EntryKey>,
    /// The other reads of the batch; empty once answered.
    others: Vec<Queued>,
}

impl ReadBatcher {
    /// A batcher that lets `in_flight_limit` read statements (at least one) run at once.
    pub fn new(in_flight_limit: usize) -> Self {
        Self {
            state: Mutex::default(),
            in_flight_limit: in_flight_limit.max(1),
            reads: AtomicU64::new(0),
            statements: AtomicU64::new(0),
        }
    }

    /// The read limit for a backend whose reads may use up to `connections` connections: one
    /// statement per core of this machine, as more at once only queue for a core, and fewer,
    /// larger batches cost the database less per key.
    pub fn for_connections(connections: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self::new(cores.min(connections))
    }

    /// Starts a read of `key`: leads a batch at once when a slot is free, else waits until
    /// another read's batch answers it or hands it the lead.
    pub async fn enter<'a>(&'a self, key: &'a EntryKey) -> Entered<'a> {
        let turn = {
            let mut state = self.lock();
            if state.in_flight < self.in_flight_limit {
                state.in_flight += 1;
                return Entered::Lead(Batch {
                    batcher: self,
                    own: Cow::Borrowed(key),
                    others: Vec::new(),
                });
            }
            let (turn, waiting) = oneshot::channel();
            state.queued.push(Queued {
                key: key.clone(),
                turn,
            });
            waiting
        };
        match turn.await {
            Ok(Turn::Answered(result)) => Entered::Answered(result),
            Ok(Turn::Lead(others)) => Entered::Lead(Batch {
                batcher: self,
                own: Cow::Borrowed(key),
                others,
            }),
            // Only a batcher dropped with reads queued drops their senders, and a batcher lives
            // as long as its backend, which every read borrows.
            Err(_) => unreachable!("a queued read outlived its backend"),
        }
    }

    /// The reads answered so far and the statements that answered them.
    pub fn statistics(&self) -> ReadStatistics {
        ReadStatistics {
            reads: self.reads.load(Ordering::Relaxed),
            statements: self.statements.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent between statements, so a panic elsewhere while holding the
        // lock leaves nothing half-done.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Gives up a slot: the oldest queued reads, up to a batch, get it, led by the oldest
    /// one still waiting.
    fn release(&self, mut returned: Vec<Queued>) {
        let mut state = self.lock();
        if !returned.is_empty() {
            returned.append(&mut state.queued);
            state.queued = returned;
        }
        while !state.queued.is_empty() {
            let take = state.queued.len().min(MAX_BATCH);
            let mut batch: Vec<Queued> = state.queued.drain(..take).collect();
            let leader = batch.remove(0);
            match leader.turn.send(Turn::Lead(batch)) {
                Ok(()) => return,
                Err(Turn::Lead(batch)) => {
                    let rest = std::mem::replace(&mut state.queued, batch);
                    state.queued.extend(rest);
                }
                Err(Turn::Answered(_)) => unreachable!("a lead was sent"),
            }
        }
        state.in_flight -= 1;
    }
}

impl Batch<'_> {
    /// The keys to read, the leader's first; [`Batch::finish`] takes their entries in this
    /// order.
    pub fn keys(&self) -> impl Iterator<Item = &EntryKey> {
        std::iter::once(self.own.as_ref()).chain(self.others.iter().map(|queued| &queued.key))
    }

    /// How many keys the batch reads (never none: it holds its leader's).
    pub fn key_count(&self) -> usize {
        1 + self.others.len()
    }

    /// Answers the batch's reads from what its statement returned (one entry per key, in
    /// [`Batch::keys`] order), gives up the slot and returns the leader's own answer. A failed
    /// statement fails every read of the batch.
    pub fn finish(
        mut self,
        read: Result<Vec<Option<Entry>>, sqlx::Error>,
    ) -> Result<Option<Entry>, BackendError> {
        let others = std::mem::take(&mut self.others);
        let batcher = self.batcher;
        batcher.statements.fetch_add(1, Ordering::Relaxed);
        batcher
            .reads
            .fetch_add(1 + others.len() as u64, Ordering::Relaxed);
        match read {
            Ok(entries) => {
                debug_assert_eq!(entries.len(), 1 + others.len());
                let mut entries = entries.into_iter();
                let own = entries.next().flatten();
                for (queued, entry) in others.into_iter().zip(entries) {
                    let _ = queued.turn.send(Turn::Answered(Ok(entry)));
                }
                Ok(own)
            }
            Err(error) if others.is_empty() => Err(error.into()),
            Err(error) => {
                let shared = Arc::new(error);
                for queued in others {
                    let failed = BackendError::BatchedRead(Arc::clone(&shared));
                    let _ = queued.turn.send(Turn::Answered(Err(failed)));
                }
                Err(BackendError::BatchedRead(shared))
            }
        }
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.batcher.release(std::mem::take(&mut self.others));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{StoreKind, Version};

    fn key(name: &str) -> EntryKey {
        EntryKey {
            universe: 1,
            kind: StoreKind::Standard,
            store: "S".to_owned(),
            scope: "global".to_owned(),
            key: name.to_owned(),
        }
    }

    fn entry(text: &str) -> Entry {
        Entry {
            value: text.to_owned(),
            user_ids: "[]".to_owned(),
            metadata: "{}".to_owned(),
            version: Version {
                seq: 1,
                created_ms: 0,
                updated_ms: 0,
            },
            deleted: false,
        }
    }

    fn lead(entered: Entered<'_>) -> Batch<'_> {
        match entered {
            Entered::Lead(batch) => batch,
            Entered::Answered(_) => panic!("expected to lead"),
        }
    }

    /// Drives a future one poll, returning it if it is still pending.
    async fn poll_once<F: std::future::Future + Unpin>(future: &mut F) -> Option<F::Output> {
        std::future::poll_fn(|context| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut *future).poll(context) {
                std::task::Poll::Ready(output) => Some(output),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }

    #[tokio::test]
    async fn a_read_with_a_free_slot_goes_at_once_and_alone() {
        let batcher = ReadBatcher::new(1);
        let only = key("a");
        let batch = lead(batcher.enter(&only).await);
        assert_eq!(batch.keys().collect::<Vec<_>>(), [&only]);
        let answer = batch.finish(Ok(vec![Some(entry("1"))])).unwrap();
        assert_eq!(answer.unwrap().value, "1");
        assert_eq!(batcher.lock().in_flight, 0);
    }

    #[tokio::test]
    async fn reads_queued_behind_a_statement_go_together_and_each_gets_its_own_row() {
        let batcher = ReadBatcher::new(1);
        let (first, second, third) = (key("a"), key("b"), key("c"));
        let running = lead(batcher.enter(&first).await);
        let mut second_read = Box::pin(batcher.enter(&second));
        let mut third_read = Box::pin(batcher.enter(&third));
        assert!(poll_once(&mut second_read).await.is_none());
        assert!(poll_once(&mut third_read).await.is_none());
        running.finish(Ok(vec![None])).unwrap();

        let batch = lead(second_read.await);
        assert_eq!(batch.keys().collect::<Vec<_>>(), [&second, &third]);
        let own = batch.finish(Ok(vec![Some(entry("b")), None])).unwrap();
        assert_eq!(own.unwrap().value, "b");
        match third_read.await {
            Entered::Answered(Ok(None)) => {}
            other => panic!("expected an empty answer, got {other:?}"),
        }
        assert_eq!(batcher.lock().in_flight, 0);
        assert_eq!(
            batcher.statistics(),
            ReadStatistics {
                reads: 3,
                statements: 2
            }
        );
    }

    #[tokio::test]
    async fn a_failed_statement_fails_every_read_of_its_batch() {
        let batcher = ReadBatcher::new(1);
        let (first, second, third) = (key("a"), key("b"), key("c"));
        let running = lead(batcher.enter(&first).await);
        let mut second_read = Box::pin(batcher.enter(&second));
        let mut third_read = Box::pin(batcher.enter(&third));
        assert!(poll_once(&mut second_read).await.is_none());
        assert!(poll_once(&mut third_read).await.is_none());
        let alone = running.finish(Err(sqlx::Error::PoolTimedOut));
        assert!(matches!(alone, Err(BackendError::Database(_))));

        let batch = lead(second_read.await);
        assert_eq!(batch.key_count(), 2);
        let own = batch.finish(Err(sqlx::Error::PoolTimedOut));
        assert!(matches!(own, Err(BackendError::BatchedRead(_))));
        match third_read.await {
            Entered::Answered(Err(BackendError::BatchedRead(_))) => {}
            other => panic!("expected the batch's failure, got {other:?}"),
        }
        assert_eq!(batcher.lock().in_flight, 0);
    }

    #[tokio::test]
    async fn a_leader_dropped_unfinished_hands_its_batch_on() {
        let batcher = ReadBatcher::new(1);
        let (first, second, third) = (key("a"), key("b"), key("c"));
        let running = lead(batcher.enter(&first).await);
        let mut second_read = Box::pin(batcher.enter(&second));
        let mut third_read = Box::pin(batcher.enter(&third));
        assert!(poll_once(&mut second_read).await.is_none());
        assert!(poll_once(&mut third_read).await.is_none());
        drop(running);

        let abandoned = lead(second_read.await);
        assert_eq!(abandoned.key_count(), 2);
        drop(abandoned);
        let batch = lead(third_read.await);
        assert_eq!(batch.keys().collect::<Vec<_>>(), [&third]);
        batch.finish(Ok(vec![None])).unwrap();
        assert_eq!(batcher.lock().in_flight, 0);
    }

    #[tokio::test]
    async fn a_reader_that_gives_up_leaves_its_place_to_the_next() {
        let batcher = ReadBatcher::new(1);
        let (first, second, third) = (key("a"), key("b"), key("c"));
        let running = lead(batcher.enter(&first).await);
        let mut gave_up = Box::pin(batcher.enter(&second));
        let mut waiting = Box::pin(batcher.enter(&third));
        assert!(poll_once(&mut gave_up).await.is_none());
        assert!(poll_once(&mut waiting).await.is_none());
        drop(gave_up);
        drop(running);

        let batch = lead(waiting.await);
        assert_eq!(batch.keys().collect::<Vec<_>>(), [&third]);
        drop(batch);
        assert_eq!(batcher.lock().in_flight, 0);
    }
}
