//! The Luau-facing side of the scheduler: the `task` library, the legacy `wait`/`spawn`/
//! `delay` globals, and adapters around `pcall`, `xpcall` and `coroutine`.
//!
//! The adapters exist for two reasons. Errors raised from Rust reach Luau as mlua error
//! userdata, but Roblox errors are plain strings that scripts search with `string.find`; the
//! adapters turn them into strings where scripts can see them. And a coroutine that a script
//! resumes by hand may park on a Rust future (a DataStore call); mlua then yields a "pending"
//! marker to the resumer, so the adapter hands such a thread to the scheduler and reports a
//! plain yield, exactly what the script would see on Roblox. `coroutine.close` of a suspended
//! thread stops it in the scheduler too, as `task.cancel` does, so nothing resumes it later and
//! the future it awaited can hand its work on ([`Scheduler::on_stop`]).

use std::time::Duration;

use mlua::{Function, Lua, MultiValue, Thread, Value};

use crate::{Scheduler, error_message};

/// Legacy `wait()` never waits less than this (Roblox's 30 Hz legacy throttle).
const LEGACY_MIN_WAIT: f64 = 0.03;

const ADAPTERS: &str = r##"
local native_pcall, native_xpcall, native_resume, native_create, native_close, native_status, adopt, stop, pending, plain = ...
local select, error, type = select, error, type

local function after_pcall(ok, ...)
    if ok then
        return true, ...
    end
    return false, plain((...))
end

local function after_resume(co, ok, ...)
    if ok then
        if select("#", ...) == 1 and (...) == pending then
            adopt(co)
            return true
        end
        return true, ...
    end
    return false, plain((...))
end

local function after_wrap(co, ok, ...)
    if ok then
        if select("#", ...) == 1 and (...) == pending then
            adopt(co)
            return
        end
        return ...
    end
    error(plain((...)), 0)
end

pcall = function(f, ...)
    return after_pcall(native_pcall(f, ...))
end

xpcall = function(f, handler, ...)
    return native_xpcall(f, function(e)
        return handler(plain(e))
    end, ...)
end

coroutine.resume = function(co, ...)
    return after_resume(co, native_resume(co, ...))
end

coroutine.close = function(co)
    if type(co) == "thread" and native_status(co) == "suspended" then
        stop(co)
    end
    return native_close(co)
end

coroutine.wrap = function(f)
    local co = native_create(f)
    return function(...)
        return after_wrap(co, native_resume(co, ...))
    end
end
"##;

/// Installs `task`, `wait`, `spawn`, `delay` and the `pcall`/`xpcall`/`coroutine` adapters
/// into `lua`'s globals. Called by [`Scheduler::attach`].
pub fn install(lua: &Lua) -> mlua::Result<()> {
    let globals = lua.globals();
    let coroutine: mlua::Table = globals.get("coroutine")?;

    let plain = lua.create_function(|lua, value: Value| {
        let out_of_memory = match &value {
            Value::Error(error) => matches!(**error, mlua::Error::MemoryError(_)),
            Value::String(message) => message.as_bytes() == b"not enough memory".as_slice(),
            _ => false,
        };
        if out_of_memory {
            // What the failed call held is garbage now; collect it before the script goes
            // on, or its next allocation would fail too (Luau has no emergency collection).
            lua.gc_collect()?;
        }
        Ok(match value {
            Value::Error(error) => Value::String(lua.create_string(error_message(&error))?),
            other => other,
        })
    })?;
    let adopt = lua.create_function(|lua, thread: Thread| Scheduler::of(lua).adopt(thread))?;
    let stop = lua.create_function(|lua, thread: Thread| {
        Scheduler::of(lua).cancel(&thread);
        Ok(())
    })?;
    let close: Function = coroutine.get("close")?;
    lua.load(ADAPTERS).set_name("=blox.adapters").call::<()>((
        globals.get::<Function>("pcall")?,
        globals.get::<Function>("xpcall")?,
        coroutine.get::<Function>("resume")?,
        coroutine.get::<Function>("create")?,
        close.clone(),
        coroutine.get::<Function>("status")?,
        adopt,
        stop,
        Lua::poll_pending(),
        plain,
    ))?;

    let task = lua.create_table()?;
    task.set(
        "spawn",
        lua.create_function(|lua, (callee, args): (Value, MultiValue)| {
            let thread = thread_of(lua, callee, "spawn")?;
            Scheduler::of(lua).spawn(thread.clone(), args)?;
            Ok(thread)
        })?,
    )?;
    task.set(
        "defer",
        lua.create_function(|lua, (callee, args): (Value, MultiValue)| {
            let thread = thread_of(lua, callee, "defer")?;
            Scheduler::of(lua).defer(thread.clone(), args);
            Ok(thread)
        })?,
    )?;
    task.set(
        "delay",
        lua.create_function(
            |lua, (seconds, callee, args): (Option<f64>, Value, MultiValue)| {
                let thread = thread_of(lua, callee, "delay")?;
                Scheduler::of(lua).delay(duration(seconds.unwrap_or(0.0)), thread.clone(), args);
                Ok(thread)
            },
        )?,
    )?;
    task.set(
        "wait",
        lua.create_async_function(|lua, seconds: Option<f64>| async move {
            let sleep = Scheduler::of(&lua).sleep(duration(seconds.unwrap_or(0.0)));
            Ok(sleep.await.as_secs_f64())
        })?,
    )?;
    task.set(
        "cancel",
        lua.create_function(move |lua, thread: Thread| {
            Scheduler::of(lua).cancel(&thread);
            if thread.status() == mlua::thread::ThreadStatus::Resumable {
                close.call::<()>(thread)?;
            }
            Ok(())
        })?,
    )?;
    task.set_readonly(true);
    globals.set("task", task)?;

    globals.set(
        "wait",
        lua.create_async_function(|lua, seconds: Option<f64>| async move {
            let scheduler = Scheduler::of(&lua);
            let seconds = seconds.unwrap_or(0.0).max(LEGACY_MIN_WAIT);
            let waited = scheduler.sleep(duration(seconds)).await;
            Ok((waited.as_secs_f64(), scheduler.now().as_secs_f64()))
        })?,
    )?;
    globals.set(
        "spawn",
        lua.create_function(|lua, callee: Value| {
            let thread = thread_of(lua, callee, "spawn")?;
            Scheduler::of(lua).delay(duration(LEGACY_MIN_WAIT), thread, MultiValue::new());
            Ok(())
        })?,
    )?;
    globals.set(
        "delay",
        lua.create_function(|lua, (seconds, callee): (Option<f64>, Value)| {
            let thread = thread_of(lua, callee, "delay")?;
            let seconds = seconds.unwrap_or(0.0).max(LEGACY_MIN_WAIT);
            Scheduler::of(lua).delay(duration(seconds), thread, MultiValue::new());
            Ok(())
        })?,
    )?;
    Ok(())
}

fn thread_of(lua: &Lua, callee: Value, function: &str) -> mlua::Result<Thread> {
    match callee {
        Value::Function(function) => lua.create_thread(function),
        Value::Thread(thread) => Ok(thread),
        other => Err(mlua::Error::RuntimeError(format!(
            "invalid argument #1 to '{function}' (function or thread expected, got {})",
            other.type_name()
        ))),
    }
}

fn duration(seconds: f64) -> Duration {
    if seconds.is_finite() && seconds > 0.0 {
        Duration::from_secs_f64(seconds)
    } else if seconds == f64::INFINITY {
        Duration::MAX / 4
    } else {
        Duration::ZERO
    }
}
