//! The frame-driven Luau thread scheduler behind `task`, `wait`, signals and every yielding
//! engine call.
//!
//! Every Luau thread the engine runs is an mlua [`AsyncThread`] polled by this executor on the
//! VM thread. A thread parks by awaiting a Rust future (a timer, a signal, a database call on
//! another runtime); the future's waker puts the thread back on the ready queue. Wakers are
//! `Send`, so a database runtime on other OS threads can wake a Luau thread without ever
//! touching the VM.
//!
//! Why our own executor instead of spawning each thread on a Tokio `LocalSet`: Roblox resumes a
//! thread given to `task.spawn` *immediately*, before `task.spawn` returns, and adopts threads
//! that scripts resume by hand with `coroutine.resume`. Both need to poll a thread
//! synchronously, on demand, which a general-purpose executor does not offer.
//!
//! Timers (`task.wait`, `task.delay`) and frame hooks (RunService's Heartbeat and friends) run
//! on 60 Hz frames measured by a [`Clock`], so tests can drive time with a [`ManualClock`].

mod answers;
mod clock;
mod library;
mod signal;
mod watchdog;

pub use answers::{AnswerGuard, FAST_ANSWER, MAX_POLL};
pub use clock::{Clock, ManualClock, RealClock};
pub use library::install;
pub use signal::{Signal, SignalConnection};
pub use watchdog::TIMEOUT_MESSAGE;

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::ffi::c_void;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::Stream;
use mlua::thread::{AsyncThread, ThreadStatus};
use mlua::{Function, Lua, MultiValue, Thread};
use rustc_hash::FxHashMap;
use tokio::sync::{Notify, oneshot};

/// Time between two frames: Roblox steps its world at 60 Hz.
pub const FRAME: Duration = Duration::from_nanos(16_666_667);

/// Identifies one scheduled thread; never reused within a scheduler.
type TaskId = u64;

/// An error that ended a Luau thread, as printed to the console.
#[derive(Debug, Clone)]
pub struct ThreadError {
    /// The error message, as `pcall` would return it.
    pub message: String,
    /// The Luau stack traceback of the failed thread.
    pub traceback: String,
    /// The thread that failed, when the error ended one.
    pub thread: Option<Thread>,
}

/// The part of the scheduler that wakers on other OS threads touch.
#[derive(Default)]
struct ReadyQueue {
    ids: Mutex<Vec<TaskId>>,
    notify: Notify,
}

struct TaskWaker {
    id: TaskId,
    queued: AtomicBool,
    queue: Arc<ReadyQueue>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.queue
                .ids
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(self.id);
            self.queue.notify.notify_one();
        }
    }
}

struct Task {
    thread: Thread,
    stream: Option<Pin<Box<AsyncThread<MultiValue>>>>,
    waker: Arc<TaskWaker>,
}

enum TimerAction {
    Wake(oneshot::Sender<Duration>),
    Resume(Thread, MultiValue),
}

impl TimerAction {
    fn is_abandoned(&self) -> bool {
        match self {
            TimerAction::Wake(sender) => sender.is_closed(),
            TimerAction::Resume(..) => false,
        }
    }
}

type FrameHook = Rc<dyn Fn(&Lua, Duration) -> mlua::Result<()>>;

/// The scheduler of one Luau VM. Lives on the VM thread; reach it from Rust callbacks with
/// [`Scheduler::of`].
///
/// Its maps hash with Fx rather than SipHash: they are looked up several times per resumption,
/// keyed by ids and pointers that no script chooses.
pub struct Scheduler {
    clock: Rc<dyn Clock>,
    queue: Arc<ReadyQueue>,
    next_id: Cell<TaskId>,
    tasks: RefCell<FxHashMap<TaskId, Task>>,
    task_of_thread: RefCell<FxHashMap<*const c_void, TaskId>>,
    deferred: RefCell<VecDeque<(Thread, MultiValue)>>,
    /// The threads of the resumption cycle in progress that a deadline left unresumed.
    cycle: RefCell<VecDeque<TaskId>>,
    timers: RefCell<BinaryHeap<Reverse<(Duration, u64)>>>,
    timer_actions: RefCell<FxHashMap<u64, TimerAction>>,
    frame_hooks: RefCell<Vec<FrameHook>>,
    last_frame: Cell<Duration>,
    errors: RefCell<Vec<ThreadError>>,
    traceback: Function,
    watchdog: RefCell<Option<watchdog::Watchdog>>,
    /// How many polls are running inside each other (task.spawn resumes at once).
    poll_depth: Cell<usize>,
    /// What to run when a thread is stopped while it awaits a Rust future, by thread.
    stop_hooks: RefCell<FxHashMap<*const c_void, Vec<(u64, StopHook)>>>,
    /// Answers expected soon, which the VM thread briefly polls for before it sleeps.
    answers: answers::ExpectedAnswers,
}

type StopHook = Box<dyn FnOnce()>;

/// Keeps a hook given to [`Scheduler::on_stop`] registered; dropping it unregisters the hook.
#[must_use = "the hook is unregistered when the guard drops"]
pub struct StopGuard {
    scheduler: std::rc::Weak<Scheduler>,
    thread: *const c_void,
    id: u64,
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        let Some(scheduler) = self.scheduler.upgrade() else {
            return;
        };
        let mut hooks = scheduler.stop_hooks.borrow_mut();
        if let Some(registered) = hooks.get_mut(&self.thread) {
            registered.retain(|(id, _)| *id != self.id);
            if registered.is_empty() {
                hooks.remove(&self.thread);
            }
        }
    }
}

impl Scheduler {
    /// Creates the scheduler for `lua`, installs it as app data, and installs the `task`
    /// library and the coroutine adapters (see [`install`]).
    pub fn attach(lua: &Lua, clock: Rc<dyn Clock>) -> mlua::Result<Rc<Scheduler>> {
        let debug: mlua::Table = lua.globals().get("debug")?;
        let scheduler = Rc::new(Scheduler {
            last_frame: Cell::new(clock.now()),
            clock,
            queue: Arc::default(),
            next_id: Cell::new(1),
            tasks: RefCell::default(),
            task_of_thread: RefCell::default(),
            deferred: RefCell::default(),
            cycle: RefCell::default(),
            timers: RefCell::default(),
            timer_actions: RefCell::default(),
            frame_hooks: RefCell::default(),
            errors: RefCell::default(),
            traceback: debug.get("traceback")?,
            watchdog: RefCell::default(),
            poll_depth: Cell::new(0),
            stop_hooks: RefCell::default(),
            answers: answers::ExpectedAnswers::default(),
        });
        lua.set_app_data(Rc::clone(&scheduler));
        install(lua)?;
        Ok(scheduler)
    }

    /// The scheduler attached to `lua`.
    ///
    /// # Panics
    /// When no scheduler was attached: every engine VM attaches one before running code.
    pub fn of(lua: &Lua) -> Rc<Scheduler> {
        Rc::clone(
            &lua.app_data_ref::<Rc<Scheduler>>()
                .expect("a scheduler is attached to every Blox VM"),
        )
    }

    /// Kills any thread that runs longer than `budget` without yielding, with Roblox's
    /// "Script timeout" error.
    pub fn limit_execution_time(&self, lua: &Lua, budget: Duration) {
        *self.watchdog.borrow_mut() = Some(watchdog::Watchdog::start(lua, budget));
    }

    /// The scheduler's clock reading.
    pub fn now(&self) -> Duration {
        self.clock.now()
    }

    /// Starts `thread` with `args` now, running it until it first yields, like `task.spawn`.
    pub fn spawn(&self, thread: Thread, args: MultiValue) -> mlua::Result<()> {
        let id = self.register(thread.clone(), thread.into_async(args)?);
        self.poll_task(id);
        Ok(())
    }

    /// Queues `thread` to start at the end of the current resumption cycle, like `task.defer`.
    pub fn defer(&self, thread: Thread, args: MultiValue) {
        self.deferred.borrow_mut().push_back((thread, args));
    }

    /// Starts `thread` with `args` on the first frame after `delay`, like `task.delay`.
    pub fn delay(&self, delay: Duration, thread: Thread, args: MultiValue) {
        self.add_timer(delay, TimerAction::Resume(thread, args));
    }

    /// A future that completes on the first frame after `delay` with the time actually waited.
    pub fn sleep(&self, delay: Duration) -> impl Future<Output = Duration> + 'static {
        let (sender, receiver) = oneshot::channel();
        let start = self.clock.now();
        self.add_timer(delay, TimerAction::Wake(sender));
        async move {
            let fired = receiver.await.unwrap_or(start);
            fired.saturating_sub(start)
        }
    }

    /// Takes a thread that a script resumed by hand and that parked on a Rust future, so that
    /// the scheduler resumes it when the future completes (as Roblox's engine does).
    pub fn adopt(&self, thread: Thread) -> mlua::Result<()> {
        let id = self.register(thread.clone(), thread.into_async(())?);
        if let Some(task) = self.tasks.borrow().get(&id) {
            task.waker.wake_by_ref();
        }
        Ok(())
    }

    /// Runs `hook` if `thread` is stopped ([`Scheduler::cancel`]: `task.cancel`,
    /// `coroutine.close`) before the returned guard drops. A stopped thread never polls the
    /// future it was awaiting again, and mlua frees that future only when the garbage collector
    /// gets to the thread: a future whose work must not wait that long (it holds a database
    /// connection, or requests of other threads queue behind it) hands the work on here.
    pub fn on_stop(self: &Rc<Self>, thread: &Thread, hook: impl FnOnce() + 'static) -> StopGuard {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let pointer = thread.to_pointer();
        self.stop_hooks
            .borrow_mut()
            .entry(pointer)
            .or_default()
            .push((id, Box::new(hook)));
        StopGuard {
            scheduler: Rc::downgrade(self),
            thread: pointer,
            id,
        }
    }

    /// Marks an answer as expected soon until the guard drops: a Rust future whose answer
    /// comes soon (a database socket of this VM's own runtime, or a database thread that wakes
    /// the awaiting thread) holds one, so that the VM thread polls the runtime for a short
    /// while before it sleeps ([`MAX_POLL`] at most, and only while such answers have lately
    /// come within [`FAST_ANSWER`]).
    pub fn expect_answer(&self) -> AnswerGuard {
        self.answers.expect()
    }

    /// Stops `thread` wherever it is parked, like `task.cancel`, and runs the hooks given to
    /// [`Scheduler::on_stop`] for it.
    pub fn cancel(&self, thread: &Thread) {
        let pointer = thread.to_pointer();
        if let Some(id) = self.task_of_thread.borrow_mut().remove(&pointer) {
            self.tasks.borrow_mut().remove(&id);
        }
        let hooks = self.stop_hooks.borrow_mut().remove(&pointer);
        for (_, hook) in hooks.into_iter().flatten() {
            hook();
        }
        self.deferred
            .borrow_mut()
            .retain(|(deferred, _)| deferred.to_pointer() != pointer);
        self.timer_actions.borrow_mut().retain(
            |_, action| !matches!(action, TimerAction::Resume(t, _) if t.to_pointer() == pointer),
        );
    }

    /// Adds a callback run on every frame with the frame's delta time, after due timers.
    pub fn on_frame(&self, hook: impl Fn(&Lua, Duration) -> mlua::Result<()> + 'static) {
        self.frame_hooks.borrow_mut().push(Rc::new(hook));
    }

    /// Resumes every ready thread, then every deferred one, until none is left.
    pub fn run_ready(&self) {
        self.run_ready_until(Duration::MAX);
    }

    /// Like [`Scheduler::run_ready`], but returns as soon as `deadline` has passed, even in
    /// the middle of a resumption cycle (the rest of the cycle goes first next time), so a
    /// steady stream of completions (a thousand coroutines on the database) cannot hold up the
    /// next frame's timers and events by more than one resumption.
    fn run_ready_until(&self, deadline: Duration) {
        loop {
            if self.cycle.borrow().is_empty() {
                let woken = std::mem::take(
                    &mut *self
                        .queue
                        .ids
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()),
                );
                if woken.is_empty() && self.deferred.borrow().is_empty() {
                    return;
                }
                self.cycle.borrow_mut().extend(woken);
            }
            loop {
                let next = self.cycle.borrow_mut().pop_front();
                let Some(id) = next else { break };
                self.poll_task(id);
                if self.clock.now() >= deadline {
                    return;
                }
            }
            let deferred: Vec<_> = self.deferred.borrow_mut().drain(..).collect();
            for (thread, args) in deferred {
                if let Err(error) = self.spawn(thread, args) {
                    self.report(None, &error);
                }
            }
            if self.clock.now() >= deadline {
                return;
            }
        }
    }

    /// Runs one frame at the clock's current time: due timers, then the frame hooks, then every
    /// thread they made ready.
    pub fn step_frame(&self, lua: &Lua) {
        let now = self.clock.now();
        let delta = now.saturating_sub(self.last_frame.replace(now));
        let woken_before_timers = self.queued_count();
        loop {
            let due = {
                let mut timers = self.timers.borrow_mut();
                match timers.peek() {
                    Some(Reverse((deadline, _))) if *deadline <= now => {
                        timers.pop().map(|Reverse((_, seq))| seq)
                    }
                    _ => None,
                }
            };
            let Some(seq) = due else { break };
            let action = self.timer_actions.borrow_mut().remove(&seq);
            match action {
                Some(TimerAction::Wake(sender)) => {
                    let _ = sender.send(now);
                }
                Some(TimerAction::Resume(thread, args)) => {
                    if let Err(error) = self.spawn(thread, args) {
                        self.report(None, &error);
                    }
                }
                None => {}
            }
        }
        // Threads whose wait ended this frame go before the backlog of the current cycle, so
        // `task.wait` keeps time however many database answers are queued.
        let timer_woken = {
            let mut woken = self
                .queue
                .ids
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let first_timer_woken = woken_before_timers.min(woken.len());
            woken.split_off(first_timer_woken)
        };
        {
            let mut cycle = self.cycle.borrow_mut();
            for id in timer_woken.into_iter().rev() {
                cycle.push_front(id);
            }
        }
        let budget = now + FRAME / 2;
        self.run_ready_until(budget);
        let hooks: Vec<FrameHook> = self.frame_hooks.borrow().clone();
        for hook in hooks {
            if let Err(error) = hook(lua, delta) {
                self.report(None, &error);
            }
        }
        self.run_ready_until(budget);
    }

    /// How many threads were woken since the current resumption cycle was taken.
    fn queued_count(&self) -> usize {
        self.queue
            .ids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }

    /// True when no thread is running, parked on a future, deferred or waiting on a live timer.
    /// Signal connections alone do not keep the scheduler busy.
    pub fn is_idle(&self) -> bool {
        self.tasks.borrow().is_empty()
            && self.deferred.borrow().is_empty()
            && self
                .timer_actions
                .borrow()
                .values()
                .all(TimerAction::is_abandoned)
    }

    /// Drives threads, timers and frames in real time until [`Scheduler::is_idle`].
    pub async fn run_until_idle(&self, lua: &Lua) {
        self.run_until(lua, std::future::pending::<()>()).await;
    }

    /// Drives threads, timers and frames in real time until idle or until `stop` completes.
    pub async fn run_until(&self, lua: &Lua, stop: impl Future<Output = ()>) {
        self.drive(lua, stop, true).await;
    }

    /// Drives threads, timers and frames in real time until `stop` completes, idle or not: a
    /// server waiting for players keeps its frames going.
    pub async fn serve_until(&self, lua: &Lua, stop: impl Future<Output = ()>) {
        self.drive(lua, stop, false).await;
    }

    async fn drive(&self, lua: &Lua, stop: impl Future<Output = ()>, until_idle: bool) {
        tokio::pin!(stop);
        loop {
            self.run_ready_until(self.last_frame.get() + FRAME);
            if until_idle && self.is_idle() {
                return;
            }
            let next_frame = self.last_frame.get() + FRAME;
            let now = self.clock.now();
            if now >= next_frame {
                self.step_frame(lua);
                // A VM busy enough to never wait still gives its runtime a turn each frame:
                // the I/O and timer drivers of tasks that share this thread run there.
                tokio::task::yield_now().await;
                continue;
            }
            // Only a wait for an expected answer is timed: it alone decides the polling.
            let waiting_since = self.answers.any().then(std::time::Instant::now);
            if let Some(since) = waiting_since {
                let budget = self.answers.poll_budget().min(next_frame - now);
                if self.poll_runtime_for(budget).await {
                    self.answers.record_wait(since.elapsed());
                    continue;
                }
            }
            tokio::select! {
                _ = self.queue.notify.notified() => {}
                _ = tokio::time::sleep(next_frame - now) => {}
                _ = &mut stop => return,
            }
            if let Some(since) = waiting_since {
                self.answers.record_wait(since.elapsed());
            }
        }
    }

    /// Hands the runtime turn after turn (each one polls its I/O driver without sleeping)
    /// until a thread is ready or `budget` has passed; true if a thread is ready.
    async fn poll_runtime_for(&self, budget: Duration) -> bool {
        let started = std::time::Instant::now();
        while started.elapsed() < budget {
            tokio::task::yield_now().await;
            if self.queued_count() > 0 {
                return true;
            }
        }
        false
    }

    /// The errors that ended threads so far, oldest first.
    pub fn errors(&self) -> Vec<ThreadError> {
        self.errors.borrow().clone()
    }

    fn register(&self, thread: Thread, stream: AsyncThread<MultiValue>) -> TaskId {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        self.task_of_thread
            .borrow_mut()
            .insert(thread.to_pointer(), id);
        let waker = Arc::new(TaskWaker {
            id,
            queued: AtomicBool::new(false),
            queue: Arc::clone(&self.queue),
        });
        self.tasks.borrow_mut().insert(
            id,
            Task {
                thread,
                stream: Some(Box::pin(stream)),
                waker,
            },
        );
        id
    }

    fn add_timer(&self, delay: Duration, action: TimerAction) {
        let seq = self.next_id.get();
        self.next_id.set(seq + 1);
        let deadline = self.clock.now() + delay;
        self.timers.borrow_mut().push(Reverse((deadline, seq)));
        self.timer_actions.borrow_mut().insert(seq, action);
    }

    fn poll_task(&self, id: TaskId) {
        // Take the stream out so the thread can call back into the scheduler while it runs.
        let (mut stream, waker, thread) = {
            let mut tasks = self.tasks.borrow_mut();
            let Some(task) = tasks.get_mut(&id) else {
                return;
            };
            let Some(stream) = task.stream.take() else {
                return;
            };
            (stream, Arc::clone(&task.waker), task.thread.clone())
        };
        waker.queued.store(false, Ordering::Release);
        let std_waker = Waker::from(waker);
        let mut context = Context::from_waker(&std_waker);
        let depth = self.poll_depth.get();
        if depth == 0
            && let Some(watchdog) = self.watchdog.borrow().as_ref()
        {
            watchdog.enter();
        }
        self.poll_depth.set(depth + 1);
        // Tokio's cooperative budget allows a task 128 completed JoinHandles, channels or
        // timers per runtime turn; past that each reports Pending and its wake-up waits for the
        // turn to end, which a busy VM reaches only when it idles: under load, threads past the
        // 128th sat for hundreds of milliseconds. The frame deadline is this scheduler's own
        // fairness, and `drive` hands the runtime its turn every frame.
        let polled = std::pin::pin!(tokio::task::coop::unconstrained(std::future::poll_fn(
            |context| stream.as_mut().poll_next(context)
        )))
        .poll(&mut context);
        self.poll_depth.set(depth);
        if let Some(watchdog) = self.watchdog.borrow().as_ref() {
            let timed_out = matches!(&polled, Poll::Ready(Some(Err(error)))
                if error_message(error).contains(TIMEOUT_MESSAGE));
            if depth == 0 {
                watchdog.leave();
            } else if timed_out {
                // The runaway thread is dead; the thread that spawned it goes on with a
                // fresh budget instead of inheriting the timeout.
                watchdog.leave();
                watchdog.enter();
            }
        }
        match polled {
            Poll::Pending => {
                if let Some(task) = self.tasks.borrow_mut().get_mut(&id) {
                    task.stream = Some(stream);
                }
            }
            Poll::Ready(outcome) => {
                self.finish(id, &thread);
                if let Some(Err(error)) = outcome {
                    self.report(Some(&thread), &error);
                }
            }
        }
    }

    fn finish(&self, id: TaskId, thread: &Thread) {
        self.tasks.borrow_mut().remove(&id);
        let mut by_thread = self.task_of_thread.borrow_mut();
        if by_thread.get(&thread.to_pointer()) == Some(&id) {
            by_thread.remove(&thread.to_pointer());
        }
    }

    fn report(&self, thread: Option<&Thread>, error: &mlua::Error) {
        // mlua appends Luau's traceback to errors raised in Luau code; keep them apart.
        let full = error_message(error);
        let (message, traceback) = match full.split_once("\nstack traceback:\n") {
            Some((message, traceback)) => (message.to_owned(), traceback.to_owned()),
            None => {
                let traceback = match thread {
                    Some(thread) if thread.status() == ThreadStatus::Error => self
                        .traceback
                        .call::<String>(thread.clone())
                        .unwrap_or_default(),
                    _ => String::new(),
                };
                (full, traceback)
            }
        };
        eprintln!("{message}");
        if !traceback.trim().is_empty() {
            eprintln!("Stack Begin\n{}\nStack End", traceback.trim_end());
        }
        self.errors.borrow_mut().push(ThreadError {
            message,
            traceback,
            thread: thread.cloned(),
        });
    }
}

/// The message a script sees for `error`: what `pcall` returns once host errors are turned
/// into plain strings.
pub fn error_message(error: &mlua::Error) -> String {
    match error {
        mlua::Error::RuntimeError(message) | mlua::Error::MemoryError(message) => message.clone(),
        mlua::Error::CallbackError { cause, .. } => error_message(cause),
        mlua::Error::WithContext { cause, .. } => error_message(cause),
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("tasks", &self.tasks.borrow().len())
            .field("timers", &self.timer_actions.borrow().len())
            .finish_non_exhaustive()
    }
}

/// Completes on its second poll: awaiting it yields the calling Luau thread once and resumes
/// it in the same resumption cycle. Every DataStore and MessagingService call yields at least
/// once this way, even when its answer is ready at once, as on Roblox (libraries connect to
/// their own signals after such a call and would hang if it returned without yielding).
pub fn yield_now() -> impl Future<Output = ()> {
    YieldNow(false)
}

struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            std::task::Poll::Ready(())
        } else {
            self.0 = true;
            context.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    }
}
