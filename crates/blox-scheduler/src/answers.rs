//! Answers the VM thread expects soon: while one is outstanding, the VM thread polls its own
//! runtime for a short while before it goes to sleep.
//!
//! A database answer that arrives on a socket of the VM's own runtime reaches the waiting
//! Luau thread without passing any other thread, but only if the VM thread is awake to see it:
//! asleep, its wake-up costs as much as the hop it saved. On the virtual machines Blox is
//! measured on, a sleeping vCPU halts and waking it costs 20-40 µs, while a PostgreSQL point
//! read answers within tens of microseconds (BENCHMARKS.md, session 12: PostgreSQL GetAsync at
//! 8 coroutines from 0.63-0.73 to 0.85-0.90 of raw sqlx in the A/B of the VM's own
//! connections together with this polling, neither alone gaining).
//!
//! Polling burns the core, so it is bounded twice: never past [`MAX_POLL`], and only while
//! answers have lately come well within it. The scheduler keeps a running mean of how long it
//! waited for something to become ready whenever answers were outstanding; once that mean
//! passes [`FAST_ANSWER`] (writes that wait for a commit's flush, a database far away) it
//! sleeps at once, and polls again when the waits shorten. Measured (session 12): with the
//! mean held to [`MAX_POLL`] itself, SetAsync at 8 coroutines, whose answers come every
//! 0.1-0.3 ms, kept polling and spent 64-70 µs of CPU per call against 36-40 µs without; held
//! to half of it, 38-41 µs, with GetAsync's gain kept.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

/// The longest the VM thread polls for an expected answer before it sleeps.
pub const MAX_POLL: Duration = Duration::from_micros(100);

/// The VM thread polls only while its waits for answers lately took no longer than this on
/// average.
pub const FAST_ANSWER: Duration = Duration::from_micros(50);

/// Answers outstanding and how long they have lately taken.
#[derive(Debug, Default)]
pub(crate) struct ExpectedAnswers {
    outstanding: Rc<Cell<usize>>,
    /// Running mean of the waits while answers were outstanding, in nanoseconds; each wait
    /// weighs one eighth.
    typical_wait_nanos: Cell<u64>,
}

/// Marks one answer as expected until dropped; see [`crate::Scheduler::expect_answer`].
#[must_use = "the answer is no longer expected once the guard drops"]
#[derive(Debug)]
pub struct AnswerGuard {
    outstanding: Rc<Cell<usize>>,
}

impl Drop for AnswerGuard {
    fn drop(&mut self) {
        self.outstanding.set(self.outstanding.get() - 1);
    }
}

impl ExpectedAnswers {
    pub(crate) fn expect(&self) -> AnswerGuard {
        self.outstanding.set(self.outstanding.get() + 1);
        AnswerGuard {
            outstanding: Rc::clone(&self.outstanding),
        }
    }

    /// Whether any answer is outstanding.
    pub(crate) fn any(&self) -> bool {
        self.outstanding.get() > 0
    }

    /// How long to poll before sleeping now: [`MAX_POLL`] while answers lately came within
    /// [`FAST_ANSWER`], nothing otherwise.
    pub(crate) fn poll_budget(&self) -> Duration {
        let typical = Duration::from_nanos(self.typical_wait_nanos.get());
        if typical <= FAST_ANSWER {
            MAX_POLL
        } else {
            Duration::ZERO
        }
    }

    /// Records one wait, polled or slept, that ended when something became ready.
    pub(crate) fn record_wait(&self, waited: Duration) {
        let waited = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        let typical = self.typical_wait_nanos.get();
        self.typical_wait_nanos
            .set(typical - typical / 8 + waited / 8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_count_the_outstanding_answers() {
        let answers = ExpectedAnswers::default();
        assert!(!answers.any());
        let first = answers.expect();
        let second = answers.expect();
        drop(first);
        assert!(answers.any());
        drop(second);
        assert!(!answers.any());
    }

    #[test]
    fn polls_while_answers_come_fast_and_sleeps_once_they_are_slow() {
        let answers = ExpectedAnswers::default();
        assert_eq!(
            answers.poll_budget(),
            MAX_POLL,
            "nothing known: try polling"
        );
        for _ in 0..20 {
            answers.record_wait(Duration::from_micros(40));
        }
        assert_eq!(answers.poll_budget(), MAX_POLL);
        for _ in 0..20 {
            answers.record_wait(Duration::from_micros(700));
        }
        assert_eq!(
            answers.poll_budget(),
            Duration::ZERO,
            "commits: sleep at once"
        );
        for _ in 0..40 {
            answers.record_wait(Duration::from_micros(40));
        }
        assert_eq!(answers.poll_budget(), MAX_POLL, "fast again: poll again");
    }

    #[test]
    fn one_slow_wait_does_not_stop_the_polling() {
        let answers = ExpectedAnswers::default();
        for _ in 0..20 {
            answers.record_wait(Duration::from_micros(10));
        }
        answers.record_wait(Duration::from_micros(300));
        assert_eq!(answers.poll_budget(), MAX_POLL);
    }
}
