//! Requests that arrive together share one round trip: point reads one statement
//! (PostgreSQL's; SQLite's run side by side on reader threads, `readers.rs`), writes one
//! multi-row upsert (both backends).
//!
//! Under load a game server reads and writes many keys at once (players joining, 64
//! coroutines each loading or saving a profile), and each request costs the database far more
//! for its statement than for its row. Measured with pgbench on the benchmark machine
//! (BENCHMARKS.md, session 7): one PostgreSQL statement reading 8 keys ran at 76% of the rate of
//! one reading a single key, so 6× the keys per second; one upsert of 4 rows at 87% of the rate
//! of a single-row upsert, 3.5× the rows, while 4 single-row upserts in one transaction gained
//! 14%. So a backend lets only a few read statements, and a few write statements, be in
//! flight at once; a request that arrives while they all are waits, and when one finishes,
//! the requests that queued meanwhile go out together in the next one. Nothing is held back
//! to make a batch: a request that finds a free slot goes at once, alone, with the same
//! statement it would run without batching, and is not even copied (only a request that
//! queues needs a copy of its own). Batches grow only as fast as the database falls behind,
//! so a quiet server pays one uncontended lock per request.
//!
//! There is no batching task: the request whose statement finishes hands its slot and the
//! queued requests to the first of them, whose own call then runs the batch and answers the
//! others. That leader gathers more when it starts: the VM thread resumes the callers a batch
//! answered before the next leader, and the requests they make at once join the next
//! statement instead of waiting for a slot to free again (for PostgreSQL writes, a commit's
//! flush later; SetAsync from 8 coroutines sent 2.6 rows per flush that way, and raw sqlx's
//! eight connections 3.1). With several slots a leader takes only its share of those, so the
//! batches in flight together stay alike: taking them all left a slot to one coroutine's
//! requests, one row per statement (BENCHMARKS.md, session 14). Each request of a batch runs
//! as it would alone (a batched read looks its key up by primary key; a batched write is the
//! same upsert, row by row), and a batch starts after each of its requests was made, so a
//! read never misses a write that returned before the read was called, and a write is
//! durable before its call returns.
//!
//! A caller that gives up (its future dropped) while it leads a batch, or after it was handed
//! a slot but before it took it, hands the slot and the batch on instead of abandoning the
//! requests that queued behind it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use super::BackendError;

/// The most requests one batch carries.
const MAX_BATCH: usize = 128;

/// Coalesces one backend's requests of one kind (`T`, answered with `A`); see the module
/// documentation.
#[derive(Debug)]
pub struct Batcher<T, A> {
    state: Mutex<State<T, A>>,
    /// The most batches in flight at once.
    in_flight_limit: usize,
    /// What this batcher and the ones made from it by [`Batcher::sibling`] served so far.
    served: Arc<Served>,
}

/// Requests answered so far, and the batches that answered them.
#[derive(Debug, Default)]
struct Served {
    requests: AtomicU64,
    batches: AtomicU64,
}

/// How a backend's requests of one kind were served: `requests / batches` is the mean batch
/// size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStatistics {
    /// Requests answered (a failed batch's requests included).
    pub requests: u64,
    /// Batches (statements or transactions) that answered them.
    pub batches: u64,
}

#[derive(Debug)]
struct State<T, A> {
    /// Requests waiting for a slot, oldest first.
    queued: VecDeque<Queued<T, A>>,
    /// Batches running now.
    in_flight: usize,
}

#[derive(Debug)]
struct Queued<T, A> {
    request: T,
    turn: oneshot::Sender<Turn<T, A>>,
}

/// What a queued request is told when its wait ends.
#[derive(Debug)]
enum Turn<T, A> {
    /// Another request's batch answered this one.
    Answered(Result<A, BackendError>),
    /// This request (handed back) now holds a slot and leads a batch of itself, these
    /// requests (queued when the slot was handed on) and, when it starts, its share of those
    /// queued since ([`Batcher::gather`]).
    Lead(T, Vec<Queued<T, A>>),
}

/// A queued request's wait for its [`Turn`]. A caller that gives up after it was handed a
/// slot, before it took it, hands the slot on: dropping the turn unread would lose the slot
/// for good, and the requests queued behind it would wait forever.
struct AwaitedTurn<'a, T, A> {
    batcher: &'a Batcher<T, A>,
    turn: oneshot::Receiver<Turn<T, A>>,
}

impl<T, A> Drop for AwaitedTurn<'_, T, A> {
    fn drop(&mut self) {
        // After `close` no turn can arrive, so one sent before is the last there is.
        self.turn.close();
        if let Ok(Turn::Lead(_, others)) = self.turn.try_recv() {
            self.batcher.release(others);
        }
    }
}

/// How a request proceeds once [`Batcher::enter`] returns.
#[derive(Debug)]
pub enum Entered<'a, T, A> {
    /// A slot was free: the caller runs its own request alone, as it would without batching,
    /// and reports through [`Slot::finish`].
    Alone(Slot<'a, T, A>),
    /// Another request's batch answered this one.
    Answered(Result<A, BackendError>),
    /// The caller holds a slot: it must run the batch's requests and [`Batch::finish`] it.
    Lead(Batch<'a, T, A>),
}

/// A slot held by a request running alone, or by a batch. Dropping it hands the slot (and
/// any requests given back to it) on.
#[derive(Debug)]
pub struct Slot<'a, T, A> {
    batcher: &'a Batcher<T, A>,
    /// Requests of an unfinished batch, queued again when the slot is released.
    returned: Vec<Queued<T, A>>,
}

/// Requests one statement or transaction must serve, led by the request that runs it.
/// Dropping it unfinished hands its slot and its queued requests on.
#[derive(Debug)]
pub struct Batch<'a, T, A> {
    slot: Slot<'a, T, A>,
    own: T,
    /// The other requests of the batch; empty once answered.
    others: Vec<Queued<T, A>>,
}

impl<T, A> Batcher<T, A> {
    /// A batcher that lets `in_flight_limit` batches (at least one) run at once.
    pub fn new(in_flight_limit: usize) -> Self {
        Self {
            state: Mutex::new(State {
                queued: VecDeque::new(),
                in_flight: 0,
            }),
            in_flight_limit: in_flight_limit.max(1),
            served: Arc::default(),
        }
    }

    /// An empty batcher with the same limit that counts into the same statistics: requests
    /// that run on other connections (another VM's) batch apart but are reported together.
    pub fn sibling(&self) -> Self {
        Self {
            served: Arc::clone(&self.served),
            ..Self::new(self.in_flight_limit)
        }
    }

    /// The limit for requests that may use up to `connections` connections: one batch per
    /// core of this machine, as more at once only queue for a core, and fewer, larger batches
    /// cost the database less per request.
    pub fn for_connections(connections: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self::new(cores.min(connections))
    }

    /// Starts a request: when a slot is free the caller runs it alone at once; otherwise
    /// `request` makes the owned copy that waits in the queue until another request's batch
    /// answers it or hands it the lead. Only a request that queues is copied.
    pub async fn enter(&self, request: impl FnOnce() -> T) -> Entered<'_, T, A> {
        let mut awaited = {
            let mut state = self.lock();
            if state.in_flight < self.in_flight_limit {
                state.in_flight += 1;
                return Entered::Alone(self.slot());
            }
            let (turn, waiting) = oneshot::channel();
            state.queued.push_back(Queued {
                request: request(),
                turn,
            });
            AwaitedTurn {
                batcher: self,
                turn: waiting,
            }
        };
        match (&mut awaited.turn).await {
            Ok(Turn::Answered(result)) => Entered::Answered(result),
            Ok(Turn::Lead(own, mut others)) => {
                self.gather(&mut others);
                Entered::Lead(Batch {
                    slot: self.slot(),
                    own,
                    others,
                })
            }
            // Only a batcher dropped with requests queued drops their senders, and a batcher
            // lives as long as its backend, which every request borrows.
            Err(_) => unreachable!("a queued request outlived its backend"),
        }
    }

    /// The requests answered so far and the batches that answered them.
    pub fn statistics(&self) -> BatchStatistics {
        BatchStatistics {
            requests: self.served.requests.load(Ordering::Relaxed),
            batches: self.served.batches.load(Ordering::Relaxed),
        }
    }

    fn slot(&self) -> Slot<'_, T, A> {
        Slot {
            batcher: self,
            returned: Vec::new(),
        }
    }

    /// Counts one batch of `requests` answered.
    fn answered(&self, requests: usize) {
        self.served.batches.fetch_add(1, Ordering::Relaxed);
        self.served
            .requests
            .fetch_add(requests as u64, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, State<T, A>> {
        // The state is consistent between statements, so a panic elsewhere while holding the
        // lock leaves nothing half-done.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Gives up a slot, with the requests of an unfinished batch (`returned`) first in the
    /// queue again: see [`Batcher::hand_slot`].
    fn release(&self, returned: Vec<Queued<T, A>>) {
        let mut state = self.lock();
        for queued in returned.into_iter().rev() {
            state.queued.push_front(queued);
        }
        Self::hand_slot(&mut state);
    }

    /// Adds to the batch of a leader that starts now (`others`: the requests queued when it
    /// was handed its slot) its share of the requests queued since: with one slot all of
    /// them, with two half, so that batches in flight together carry alike. The rest wait
    /// for the next slot to be handed on: requests queue only while every slot is held.
    fn gather(&self, others: &mut Vec<Queued<T, A>>) {
        let mut state = self.lock();
        let waiting = 1 + others.len() + state.queued.len();
        let share = waiting.div_ceil(self.in_flight_limit).min(MAX_BATCH);
        let take = state
            .queued
            .len()
            .min(share.saturating_sub(1 + others.len()));
        others.extend(state.queued.drain(..take));
    }

    /// Hands a slot held by the caller to the oldest queued request still waiting, with up
    /// to a batch of the requests queued behind it; with none waiting, frees the slot.
    fn hand_slot(state: &mut State<T, A>) {
        while let Some(leader) = state.queued.pop_front() {
            let take = state.queued.len().min(MAX_BATCH - 1);
            let batch = state.queued.drain(..take).collect();
            match leader.turn.send(Turn::Lead(leader.request, batch)) {
                Ok(()) => return,
                Err(Turn::Lead(_, batch)) => {
                    for queued in Vec::into_iter(batch).rev() {
                        state.queued.push_front(queued);
                    }
                }
                Err(Turn::Answered(_)) => unreachable!("a lead was sent"),
            }
        }
        state.in_flight -= 1;
    }
}

impl<T, A> Slot<'_, T, A> {
    /// Counts the lone request answered, gives up the slot and returns its answer.
    pub fn finish(self, answer: Result<A, sqlx::Error>) -> Result<A, BackendError> {
        self.batcher.answered(1);
        Ok(answer?)
    }
}

impl<T, A> Drop for Slot<'_, T, A> {
    fn drop(&mut self) {
        self.batcher.release(std::mem::take(&mut self.returned));
    }
}

impl<T, A> Batch<'_, T, A> {
    /// The requests, the leader's first; [`Batch::finish`] takes their answers in this order.
    pub fn requests(&self) -> impl Iterator<Item = &T> {
        std::iter::once(&self.own).chain(self.others.iter().map(|queued| &queued.request))
    }

    /// The leader's request, when the batch holds no other (one handed on after the others
    /// queued with it were answered or gave up).
    pub fn single(&self) -> Option<&T> {
        self.others.is_empty().then_some(&self.own)
    }

    /// How many requests the batch carries (never none: it holds its leader's).
    pub fn request_count(&self) -> usize {
        1 + self.others.len()
    }

    /// Answers the batch's requests from what its round trip returned (one answer per
    /// request, in [`Batch::requests`] order), gives up the slot and returns the leader's own
    /// answer. A failed round trip fails every request of the batch.
    pub fn finish(mut self, answers: Result<Vec<A>, sqlx::Error>) -> Result<A, BackendError> {
        let others = std::mem::take(&mut self.others);
        self.slot.batcher.answered(1 + others.len());
        match answers {
            Ok(answers) if answers.len() == 1 + others.len() => {
                let mut answers = answers.into_iter();
                let own = answers.next().expect("one answer per request");
                for (queued, answer) in others.into_iter().zip(answers) {
                    let _ = queued.turn.send(Turn::Answered(Ok(answer)));
                }
                Ok(own)
            }
            Ok(answers) => {
                let error = sqlx::Error::Protocol(format!(
                    "a batch of {} requests got {} answers",
                    1 + others.len(),
                    answers.len()
                ));
                Self::fail(others, error)
            }
            Err(error) => Self::fail(others, error),
        }
    }

    fn fail(others: Vec<Queued<T, A>>, error: sqlx::Error) -> Result<A, BackendError> {
        if others.is_empty() {
            return Err(error.into());
        }
        let shared = Arc::new(error);
        for queued in others {
            let failed = BackendError::Batched(Arc::clone(&shared));
            let _ = queued.turn.send(Turn::Answered(Err(failed)));
        }
        Err(BackendError::Batched(shared))
    }
}

impl<T, A> Drop for Batch<'_, T, A> {
    /// An unfinished batch's other requests queue again, first, for the next holder of its
    /// slot (the slot is released right after this, as a field).
    fn drop(&mut self) {
        self.slot.returned = std::mem::take(&mut self.others);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Entry, EntryKey, Version};

    type ReadBatcher = Batcher<EntryKey, Option<Entry>>;

    fn key(name: &str) -> EntryKey {
        EntryKey::named(name)
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

    fn lead<'a>(
        entered: Entered<'a, EntryKey, Option<Entry>>,
    ) -> Batch<'a, EntryKey, Option<Entry>> {
        match entered {
            Entered::Lead(batch) => batch,
            other => panic!("expected to lead a batch, got {other:?}"),
        }
    }

    /// Starts a request that finds a free slot, which must not copy it.
    async fn alone(batcher: &ReadBatcher) -> Slot<'_, EntryKey, Option<Entry>> {
        match batcher
            .enter(|| panic!("a request with a free slot was copied"))
            .await
        {
            Entered::Alone(slot) => slot,
            other => panic!("expected to run alone, got {other:?}"),
        }
    }

    type Waiting<'a> = std::pin::Pin<
        Box<dyn std::future::Future<Output = Entered<'a, EntryKey, Option<Entry>>> + 'a>,
    >;

    /// Starts a read of `key` that must queue, polled once so it has.
    async fn queued<'a>(batcher: &'a ReadBatcher, key: &EntryKey) -> Waiting<'a> {
        let key = key.clone();
        let mut read: Waiting<'a> = Box::pin(batcher.enter(move || key));
        let pending = std::future::poll_fn(|context| {
            std::task::Poll::Ready(read.as_mut().poll(context).is_pending())
        })
        .await;
        assert!(pending, "a read with no free slot went at once");
        read
    }

    /// A read of "a" running alone, then reads of "b" and "c" queued behind it.
    async fn running_and_queued(
        batcher: &ReadBatcher,
    ) -> (Slot<'_, EntryKey, Option<Entry>>, Waiting<'_>, Waiting<'_>) {
        let running = alone(batcher).await;
        let second = queued(batcher, &key("b")).await;
        let third = queued(batcher, &key("c")).await;
        (running, second, third)
    }

    #[tokio::test]
    async fn a_read_with_a_free_slot_goes_at_once_and_alone() {
        let batcher = ReadBatcher::new(1);
        let slot = alone(&batcher).await;
        let answer = slot.finish(Ok(Some(entry("1")))).unwrap();
        assert_eq!(answer.unwrap().value, "1");
        assert_eq!(batcher.lock().in_flight, 0);
    }

    #[tokio::test]
    async fn reads_queued_behind_a_statement_go_together_and_each_gets_its_own_row() {
        let batcher = ReadBatcher::new(1);
        let (second, third) = (key("b"), key("c"));
        let (running, second_read, third_read) = running_and_queued(&batcher).await;
        running.finish(Ok(None)).unwrap();

        let batch = lead(second_read.await);
        assert_eq!(batch.requests().collect::<Vec<_>>(), [&second, &third]);
        let own = batch.finish(Ok(vec![Some(entry("b")), None])).unwrap();
        assert_eq!(own.unwrap().value, "b");
        match third_read.await {
            Entered::Answered(Ok(None)) => {}
            other => panic!("expected an empty answer, got {other:?}"),
        }
        assert_eq!(batcher.lock().in_flight, 0);
        assert_eq!(
            batcher.statistics(),
            BatchStatistics {
                requests: 3,
                batches: 2
            }
        );
    }

    #[tokio::test]
    async fn a_leader_gathers_the_requests_made_before_it_starts() {
        let batcher = ReadBatcher::new(1);
        let (second, third) = (key("b"), key("c"));
        let running = alone(&batcher).await;
        let second_read = queued(&batcher, &second).await;
        running.finish(Ok(None)).unwrap();
        // Made after the slot was handed on, before its new holder ran.
        let third_read = queued(&batcher, &third).await;

        let batch = lead(second_read.await);
        assert_eq!(batch.requests().collect::<Vec<_>>(), [&second, &third]);
        batch.finish(Ok(vec![None, None])).unwrap();
        assert!(matches!(third_read.await, Entered::Answered(Ok(None))));
        assert_eq!(batcher.lock().in_flight, 0);
    }

    #[tokio::test]
    async fn with_two_slots_a_starting_leader_takes_half_of_what_queued_since() {
        let batcher = ReadBatcher::new(2);
        let first = alone(&batcher).await;
        let second = alone(&batcher).await;
        let third_read = queued(&batcher, &key("c")).await;
        first.finish(Ok(None)).unwrap();
        let mut later = Vec::new();
        for name in ["d", "e", "f", "g"] {
            later.push(queued(&batcher, &key(name)).await);
        }

        let batch = lead(third_read.await);
        assert_eq!(
            batch.requests().collect::<Vec<_>>(),
            [&key("c"), &key("d"), &key("e")]
        );
        second.finish(Ok(None)).unwrap();
        let mut later = later.into_iter().skip(2);
        let next = lead(later.next().unwrap().await);
        assert_eq!(next.requests().collect::<Vec<_>>(), [&key("f"), &key("g")]);
        drop((batch, next, later));
        assert_eq!(batcher.lock().in_flight, 0);
    }

    #[tokio::test]
    async fn a_failed_statement_fails_every_read_of_its_batch() {
        let batcher = ReadBatcher::new(1);
        let (running, second_read, third_read) = running_and_queued(&batcher).await;
        let alone = running.finish(Err(sqlx::Error::PoolTimedOut));
        assert!(matches!(alone, Err(BackendError::Database(_))));

        let batch = lead(second_read.await);
        assert_eq!(batch.request_count(), 2);
        let own = batch.finish(Err(sqlx::Error::PoolTimedOut));
        assert!(matches!(own, Err(BackendError::Batched(_))));
        match third_read.await {
            Entered::Answered(Err(BackendError::Batched(_))) => {}
            other => panic!("expected the batch's failure, got {other:?}"),
        }
        assert_eq!(batcher.lock().in_flight, 0);
    }

    #[tokio::test]
    async fn a_leader_dropped_unfinished_hands_its_batch_on() {
        let batcher = ReadBatcher::new(1);
        let third = key("c");
        let (running, second_read, third_read) = running_and_queued(&batcher).await;
        drop(running);

        let abandoned = lead(second_read.await);
        assert_eq!(abandoned.request_count(), 2);
        drop(abandoned);
        let batch = lead(third_read.await);
        assert_eq!(batch.requests().collect::<Vec<_>>(), [&third]);
        batch.finish(Ok(vec![None])).unwrap();
        assert_eq!(batcher.lock().in_flight, 0);
    }

    #[tokio::test]
    async fn a_reader_that_gives_up_leaves_its_place_to_the_next() {
        let batcher = ReadBatcher::new(1);
        let third = key("c");
        let (running, gave_up, waiting) = running_and_queued(&batcher).await;
        drop(gave_up);
        drop(running);

        let batch = lead(waiting.await);
        assert_eq!(batch.requests().collect::<Vec<_>>(), [&third]);
        drop(batch);
        assert_eq!(batcher.lock().in_flight, 0);
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_after_being_handed_the_slot_hands_it_on() {
        let batcher = ReadBatcher::new(1);
        let third = key("c");
        let (running, handed, waiting) = running_and_queued(&batcher).await;
        drop(running);
        drop(handed);

        let batch = lead(waiting.await);
        assert_eq!(batch.requests().collect::<Vec<_>>(), [&third]);
        drop(batch);
        assert_eq!(batcher.lock().in_flight, 0);

        let running = alone(&batcher).await;
        let handed = queued(&batcher, &third).await;
        drop(running);
        drop(handed);
        assert_eq!(batcher.lock().in_flight, 0);
        drop(alone(&batcher).await);
    }
}
