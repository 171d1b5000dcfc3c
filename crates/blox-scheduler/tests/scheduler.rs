//! The scheduler under a manual clock: timers, frames, defer, cancel, errors, signals and
//! threads parked on Rust futures, all stepped deterministically.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use blox_scheduler::{ManualClock, Scheduler, Signal};
use mlua::{Function, Lua, MultiValue};
use tokio::sync::oneshot;

struct Harness {
    lua: Lua,
    clock: Rc<ManualClock>,
    scheduler: Rc<Scheduler>,
}

impl Harness {
    fn new() -> Self {
        let lua = Lua::new();
        let clock = Rc::new(ManualClock::default());
        let scheduler = Scheduler::attach(&lua, clock.clone()).unwrap();
        Self {
            lua,
            clock,
            scheduler,
        }
    }

    fn start(&self, source: &str) {
        let function: Function = self.lua.load(source).into_function().unwrap();
        let thread = self.lua.create_thread(function).unwrap();
        self.scheduler.spawn(thread, MultiValue::new()).unwrap();
    }

    fn frame_after(&self, seconds: f64) {
        self.clock.advance(Duration::from_secs_f64(seconds));
        self.scheduler.step_frame(&self.lua);
    }

    fn global<T: mlua::FromLua>(&self, name: &str) -> T {
        self.lua.globals().get(name).unwrap()
    }
}

#[test]
fn task_wait_resumes_on_the_first_frame_after_its_deadline() {
    let h = Harness::new();
    h.start("waited = task.wait(1)");
    h.frame_after(0.5);
    assert_eq!(h.global::<Option<f64>>("waited"), None);
    h.frame_after(0.6);
    let waited: f64 = h.global("waited");
    assert!(
        (waited - 1.1).abs() < 1e-9,
        "returns the time actually waited: {waited}"
    );
    assert!(h.scheduler.is_idle());
}

#[test]
fn spawn_runs_at_once_and_defer_at_the_end_of_the_cycle() {
    let h = Harness::new();
    h.start(
        r#"
        log = {}
        task.defer(function() table.insert(log, "deferred") end)
        task.spawn(function() table.insert(log, "spawned") end)
        table.insert(log, "main")
        "#,
    );
    h.scheduler.run_ready();
    let log: Vec<String> = h.global("log");
    assert_eq!(log, ["spawned", "main", "deferred"]);
}

#[test]
fn delay_and_cancel() {
    let h = Harness::new();
    h.start(
        r#"
        fired = {}
        task.delay(1, function(tag) table.insert(fired, tag) end, "kept")
        local doomed = task.delay(1, function() table.insert(fired, "cancelled") end)
        task.cancel(doomed)
        local waiting = task.spawn(function() task.wait(1) table.insert(fired, "waiter") end)
        task.cancel(waiting)
        "#,
    );
    h.frame_after(2.0);
    let fired: Vec<String> = h.global("fired");
    assert_eq!(fired, ["kept"]);
    assert!(
        h.scheduler.is_idle(),
        "cancelled waits do not keep the scheduler busy"
    );
}

#[test]
fn an_error_in_a_spawned_thread_is_reported_and_others_go_on() {
    let h = Harness::new();
    h.start(
        r#"
        task.spawn(function()
            local function inner() error("kaput") end
            inner()
        end)
        survived = true
        "#,
    );
    assert!(h.global::<bool>("survived"));
    let errors = h.scheduler.errors();
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].message.ends_with("kaput"),
        "{}",
        errors[0].message
    );
    assert!(
        errors[0].traceback.contains("inner"),
        "{}",
        errors[0].traceback
    );
}

#[test]
fn errors_from_rust_reach_pcall_as_plain_strings() {
    let h = Harness::new();
    h.lua
        .globals()
        .set(
            "fail",
            h.lua
                .create_function(|_, ()| {
                    Err::<(), _>(mlua::Error::RuntimeError("502: rejected".to_owned()))
                })
                .unwrap(),
        )
        .unwrap();
    h.start(
        r#"
        local ok, err = pcall(fail)
        kind, found = type(err), string.find(err, "502") ~= nil
        local xok, xerr = xpcall(fail, function(e) return "handled " .. e end)
        handled = xerr
        "#,
    );
    assert_eq!(h.global::<String>("kind"), "string");
    assert!(h.global::<bool>("found"));
    assert_eq!(h.global::<String>("handled"), "handled 502: rejected");
}

#[test]
fn hand_resumed_threads_parked_on_rust_futures_are_adopted() {
    let h = Harness::new();
    let senders = park_on_channels(&h);
    h.start(
        r#"
        local co = coroutine.create(function() got = waitForValue() end)
        resumed = table.pack(coroutine.resume(co))
        status = coroutine.status(co)
        wrapped = coroutine.wrap(function() gotWrapped = waitForValue() end)()
        "#,
    );
    let resumed: mlua::Table = h.global("resumed");
    assert_eq!(
        resumed.get::<i64>("n").unwrap(),
        1,
        "resume returned just true"
    );
    assert!(resumed.get::<bool>(1).unwrap());
    assert_eq!(h.global::<String>("status"), "suspended");
    assert!(!h.scheduler.is_idle());
    for (value, sender) in senders.borrow_mut().drain(..).enumerate() {
        sender.send(value as i64 + 10).unwrap();
    }
    h.scheduler.run_ready();
    assert_eq!(h.global::<i64>("got"), 10);
    assert_eq!(h.global::<i64>("gotWrapped"), 11);
    assert!(h.scheduler.is_idle());
}

#[test]
fn signals_connect_once_wait_and_disconnect() {
    let h = Harness::new();
    let signal = Signal::new();
    h.lua.globals().set("signal", signal.clone()).unwrap();
    h.start(
        r#"
        hits, onces = 0, 0
        connection = signal:Connect(function(n) hits += n end)
        signal:Once(function() onces += 1 end)
        task.spawn(function() waited = signal:Wait() end)
        "#,
    );
    signal
        .fire(&h.lua, (2,).into_lua_multi_for(&h.lua))
        .unwrap();
    signal
        .fire(&h.lua, (3,).into_lua_multi_for(&h.lua))
        .unwrap();
    h.scheduler.run_ready();
    assert_eq!(h.global::<i64>("hits"), 5);
    assert_eq!(h.global::<i64>("onces"), 1);
    assert_eq!(h.global::<i64>("waited"), 2);
    h.start("connection:Disconnect() connected = connection.Connected");
    assert!(!h.global::<bool>("connected"));
    signal
        .fire(&h.lua, (100,).into_lua_multi_for(&h.lua))
        .unwrap();
    assert_eq!(h.global::<i64>("hits"), 5);
}

trait IntoArgs {
    fn into_lua_multi_for(self, lua: &Lua) -> MultiValue;
}

impl<T: mlua::IntoLuaMulti> IntoArgs for T {
    fn into_lua_multi_for(self, lua: &Lua) -> MultiValue {
        self.into_lua_multi(lua).unwrap()
    }
}

#[test]
fn frame_hooks_run_every_frame_with_the_delta() {
    let h = Harness::new();
    let deltas: Rc<RefCell<Vec<Duration>>> = Rc::default();
    let seen = Rc::clone(&deltas);
    h.scheduler.on_frame(move |_, delta| {
        seen.borrow_mut().push(delta);
        Ok(())
    });
    h.frame_after(0.016);
    h.frame_after(0.020);
    assert_eq!(
        *deltas.borrow(),
        [
            Duration::from_secs_f64(0.016),
            Duration::from_secs_f64(0.020)
        ]
    );
}

#[test]
fn a_runaway_thread_is_stopped_and_the_rest_goes_on() {
    let h = Harness::new();
    h.scheduler
        .limit_execution_time(&h.lua, Duration::from_millis(100));
    h.start(
        r#"
        task.spawn(function()
            while true do end
        end)
        task.spawn(function()
            -- pcall cannot swallow the timeout: it is raised again at the next safepoint.
            while true do
                pcall(function()
                    while true do end
                end)
            end
        end)
        survived = true
        "#,
    );
    assert!(h.global::<bool>("survived"));
    let errors = h.scheduler.errors();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors
            .iter()
            .all(|e| e.message.contains(blox_scheduler::TIMEOUT_MESSAGE))
    );

    // A later resumption gets a fresh budget.
    h.start("task.wait(1) finished = true");
    h.frame_after(1.5);
    assert!(h.global::<bool>("finished"));
}

/// Registers `stopWatched()`: parks its thread on a future with a stop hook that counts into
/// the returned cell; the guard lives as long as the future.
fn park_with_stop_hook(h: &Harness) -> Rc<Cell<u32>> {
    let stopped: Rc<Cell<u32>> = Rc::default();
    let counter = Rc::clone(&stopped);
    let watched = h
        .lua
        .create_async_function(move |lua, finish: bool| {
            let counter = Rc::clone(&counter);
            let guard = Scheduler::of(&lua).on_stop(&lua.current_thread(), move || {
                counter.set(counter.get() + 1);
            });
            async move {
                let _guard = guard;
                if !finish {
                    std::future::pending::<()>().await;
                }
                Ok(())
            }
        })
        .unwrap();
    h.lua.globals().set("stopWatched", watched).unwrap();
    stopped
}

#[test]
fn stopping_a_parked_thread_runs_its_stop_hooks_once() {
    let h = Harness::new();
    let stopped = park_with_stop_hook(&h);
    h.start(
        r#"
        cancelled = task.spawn(function() stopWatched(false) end)
        closed = coroutine.create(function() stopWatched(false) end)
        coroutine.resume(closed)
        task.spawn(function() stopWatched(true); finished = true end)
        "#,
    );
    h.frame_after(0.02);
    assert!(h.global::<bool>("finished"));
    assert_eq!(
        stopped.get(),
        0,
        "no hook runs for a running or finished call"
    );
    h.start("task.cancel(cancelled)");
    assert_eq!(stopped.get(), 1, "task.cancel runs the hook");
    h.start("assert(coroutine.close(closed)); closedStatus = coroutine.status(closed)");
    assert_eq!(stopped.get(), 2, "coroutine.close runs the hook");
    assert_eq!(h.global::<String>("closedStatus"), "dead");
    h.start("task.cancel(cancelled); coroutine.close(closed)");
    assert_eq!(stopped.get(), 2, "each hook runs once");
    assert!(h.scheduler.is_idle());
}

/// Registers `waitForValue()`, which parks the calling thread on a fresh oneshot channel, and
/// returns the senders in the order the threads parked.
fn park_on_channels(h: &Harness) -> Rc<RefCell<Vec<oneshot::Sender<i64>>>> {
    let senders: Rc<RefCell<Vec<oneshot::Sender<i64>>>> = Rc::default();
    let registry = Rc::clone(&senders);
    let wait_for_value = h
        .lua
        .create_async_function(move |_, ()| {
            let (sender, receiver) = oneshot::channel();
            registry.borrow_mut().push(sender);
            async move { Ok(receiver.await.unwrap_or(-1)) }
        })
        .unwrap();
    h.lua.globals().set("waitForValue", wait_for_value).unwrap();
    senders
}

#[test]
fn threads_parked_on_tokio_futures_all_resume_inside_one_runtime_turn() {
    // Tokio's cooperative budget lets a task complete 128 of its futures per turn; past that,
    // each poll reports Pending and its wake-up waits for the turn to end. A scheduler bound
    // by it resumes 128 of these threads and strands the rest. The check runs on a thread of
    // its own, so a scheduler that spun on them instead fails the test rather than hangs it.
    const THREADS: i64 = 300;
    let (done, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let resumed = runtime.block_on(async {
            let h = Harness::new();
            let senders = park_on_channels(&h);
            h.start(&format!(
                r#"
                resumed = 0
                for _ = 1, {THREADS} do
                    task.spawn(function()
                        waitForValue()
                        resumed += 1
                    end)
                end
                "#
            ));
            for sender in senders.borrow_mut().drain(..) {
                sender.send(1).unwrap();
            }
            h.scheduler.run_ready();
            h.global::<i64>("resumed")
        });
        done.send(resumed).unwrap();
    });
    let resumed = outcome
        .recv_timeout(Duration::from_secs(60))
        .expect("run_ready returned");
    assert_eq!(resumed, THREADS);
}

#[test]
fn threads_woken_by_their_timer_go_before_a_backlog_and_a_frame_stops_at_its_budget() {
    let h = Harness::new();
    let senders = park_on_channels(&h);
    let clock = Rc::clone(&h.clock);
    let spend = h
        .lua
        .create_function(move |_, milliseconds: u64| {
            clock.advance(Duration::from_millis(milliseconds));
            Ok(())
        })
        .unwrap();
    h.lua.globals().set("spendMilliseconds", spend).unwrap();
    h.start(
        r#"
        log = {}
        for i = 1, 100 do
            task.spawn(function()
                waitForValue()
                spendMilliseconds(1)
                table.insert(log, i)
            end)
        end
        task.spawn(function()
            task.wait()
            table.insert(log, "timer")
        end)
        "#,
    );
    for sender in senders.borrow_mut().drain(..) {
        sender.send(1).unwrap();
    }
    h.frame_after(1.0 / 60.0);
    let log: Vec<mlua::Value> = h.global("log");
    assert_eq!(
        log.first()
            .and_then(mlua::Value::as_string)
            .map(|s| s.to_string_lossy()),
        Some("timer".to_owned()),
        "the thread whose wait ended resumed first: {log:?}"
    );
    assert!(
        log.len() < 20,
        "the frame stopped near its 8 ms budget instead of running all 100 one-millisecond \
         resumptions: {} ran",
        log.len()
    );
    h.scheduler.run_ready();
    let log: Vec<mlua::Value> = h.global("log");
    assert_eq!(log.len(), 101, "the rest of the cycle ran afterwards");
    assert_eq!(
        log[1].as_integer(),
        Some(1),
        "in the order the threads were woken"
    );
}
