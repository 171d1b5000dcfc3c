//! Running a place's code: Scripts start when the place loads, ModuleScripts run once, on
//! their first `require`, and every later `require` gets the same value.
//!
//! Each chunk gets an environment of its own (reads fall through to the shared globals) with
//! `script` set to its instance and a `require` bound to it, so string requires resolve
//! relative to the requiring script, as Roblox's require-by-string does. A module runs in a
//! thread of its own; `require` waits for it, yielding, so a module may yield while it loads
//! (a DataStore call at load time), and concurrent requires of one module run it once.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use blox_scheduler::Scheduler;
use mlua::{Function, Lua, MultiValue, Table, Thread, Value};
use rbx_dom_weak::types::{Ref, Variant};

use crate::instance::{Instance, Tree};

/// Roblox's message when `require` gets something that is not a ModuleScript.
const INVALID_ARGUMENT: &str = "Attempted to call require with invalid argument(s).";
/// Roblox's message when the module failed while loading.
const MODULE_FAILED: &str = "Requested module experienced an error while loading";
/// Roblox's message when a module returns zero or several values.
const NOT_ONE_VALUE: &str = "Module code did not return exactly one value";
/// Roblox's message for a require cycle.
const RECURSIVE: &str = "Requested module was required recursively";

/// Where a module is in its life.
enum ModuleState {
    Loading,
    Loaded(Value),
    Failed,
}

/// The modules of one VM, and which loading module waits on which (to catch cycles).
#[derive(Default)]
struct Modules {
    states: RefCell<HashMap<Ref, ModuleState>>,
    waits: RefCell<HashMap<Ref, Ref>>,
}

/// Sets up the module registry of a new VM. (App data is only set while nothing reads it,
/// at start-up, never lazily from a `require` that may run inside another borrow.)
pub fn install(lua: &Lua) {
    lua.set_app_data(Rc::new(Modules::default()));
    lua.set_app_data(Aliases(HashMap::new()));
}

fn modules(lua: &Lua) -> Rc<Modules> {
    lua.app_data_ref::<Rc<Modules>>()
        .map(|modules| Rc::clone(&modules))
        .expect("the engine installs the module registry in every VM")
}

fn error(message: impl Into<String>) -> mlua::Error {
    mlua::Error::RuntimeError(message.into())
}

/// Whether a Script should run: not `Disabled`, not `Enabled = false`.
fn enabled(tree: &Tree, script: Ref) -> bool {
    !matches!(tree.property(script, "Disabled"), Some(Variant::Bool(true)))
        && !matches!(tree.property(script, "Enabled"), Some(Variant::Bool(false)))
}

/// The Scripts that run when a place loads: those in ServerScriptService and Workspace, in
/// tree order.
pub fn server_scripts(tree: &Tree) -> Vec<Ref> {
    ["ServerScriptService", "Workspace"]
        .iter()
        .filter_map(|service| tree.find_child(tree.game(), service))
        .flat_map(|service| tree.descendants(service))
        .filter(|instance| tree.class(*instance) == "Script" && enabled(tree, *instance))
        .collect()
}

/// The environment of the chunk of `script`: its own globals over the shared ones, with
/// `script` and a `require` bound to it.
pub fn environment(lua: &Lua, script: Ref) -> mlua::Result<Table> {
    let environment = lua.create_table()?;
    let fall_through = lua.create_table()?;
    fall_through.raw_set("__index", lua.globals())?;
    environment.set_metatable(Some(fall_through))?;
    let tree = Tree::of(lua);
    environment.raw_set("script", tree.value(lua, script)?)?;
    environment.raw_set("require", require_for(lua, script)?)?;
    // Built-in libraries stay read-only underneath, so Luau's fast paths for them hold. Luau
    // resolves a chunk's global reads once, at load, against the shared globals rather than
    // this table, and only for names it finds there: the names set here must not exist in the
    // shared globals, or scripts would read those instead.
    environment.set_safeenv(true);
    Ok(environment)
}

/// Compiles the `Source` of `script` with its own environment, named `chunk_name`.
pub fn compile(lua: &Lua, script: Ref, chunk_name: &str) -> mlua::Result<Function> {
    let source = match Tree::of(lua).property(script, "Source") {
        Some(Variant::String(source)) => source,
        _ => String::new(),
    };
    lua.load(source)
        .set_name(chunk_name)
        .set_environment(environment(lua, script)?)
        .into_function()
}

/// The name Roblox gives a chunk in errors and tracebacks: the script's full name.
pub fn chunk_name(tree: &Tree, script: Ref) -> String {
    format!("={}", tree.full_name(script))
}

/// `require` as seen from `requirer`'s code.
fn require_for(lua: &Lua, requirer: Ref) -> mlua::Result<Function> {
    lua.create_async_function(move |lua, target: Value| async move {
        let module = match &target {
            Value::String(path) => resolve(&lua, requirer, &path.to_str()?)?,
            other => Instance::from_value(other)
                .filter(|module| Tree::of(&lua).class(*module) == "ModuleScript")
                .ok_or_else(|| error(INVALID_ARGUMENT))?,
        };
        require(&lua, requirer, module).await
    })
}

/// The `.luaurc` aliases of the loaded place: alias name to the names leading from `game`.
pub struct Aliases(pub HashMap<String, Vec<String>>);

/// Finds the ModuleScript a string require names, relative to `requirer`: `./` starts at its
/// parent, `../` one level up, `@self/` at the script itself, `@Alias/` at the instance a
/// `.luaurc` alias names.
fn resolve(lua: &Lua, requirer: Ref, path: &str) -> mlua::Result<Ref> {
    let tree = Tree::of(lua);
    let not_found = || {
        error(format!(
            "Attempted to require \"{path}\", which does not exist"
        ))
    };
    let (mut at, rest) = if let Some(rest) = path.strip_prefix("@self/") {
        (requirer, rest)
    } else if let Some(rest) = path.strip_prefix("./") {
        (tree.parent(requirer), rest)
    } else if path.starts_with("../") {
        (tree.parent(requirer), path)
    } else if let Some(aliased) = path.strip_prefix('@') {
        let (alias, rest) = aliased.split_once('/').unwrap_or((aliased, ""));
        let names = lua
            .app_data_ref::<Aliases>()
            .and_then(|aliases| aliases.0.get(alias).cloned())
            .ok_or_else(|| {
                error(format!(
                    "Attempted to require \"{path}\": no alias named @{alias}"
                ))
            })?;
        let start = names
            .iter()
            .try_fold(tree.game(), |at, name| tree.find_child(at, name))
            .ok_or_else(not_found)?;
        (start, rest)
    } else {
        return Err(error(format!(
            "Attempted to require \"{path}\": paths must start with ./, ../, @self/ or an @alias/"
        )));
    };
    for segment in rest.split('/').filter(|segment| !segment.is_empty()) {
        at = match segment {
            "." => at,
            ".." => tree.parent(at),
            name => tree.find_child(at, name).ok_or_else(not_found)?,
        };
        if at.is_none() {
            return Err(not_found());
        }
    }
    if tree.class(at) != "ModuleScript" {
        return Err(not_found());
    }
    Ok(at)
}

/// Runs `module` once and returns its value; waits while another thread loads it.
async fn require(lua: &Lua, requirer: Ref, module: Ref) -> mlua::Result<Value> {
    let modules = modules(lua);
    loop {
        let loading = match modules.states.borrow().get(&module) {
            Some(ModuleState::Loaded(value)) => return Ok(value.clone()),
            Some(ModuleState::Failed) => return Err(error(MODULE_FAILED)),
            Some(ModuleState::Loading) => true,
            None => false,
        };
        if !loading {
            break;
        }
        // Following what each loading module waits on from `module` must not lead back to
        // the requirer, or neither would ever finish.
        let mut next = Some(module);
        while let Some(at) = next {
            if at == requirer {
                return Err(error(RECURSIVE));
            }
            next = modules.waits.borrow().get(&at).copied();
        }
        modules.waits.borrow_mut().insert(requirer, module);
        Scheduler::of(lua).sleep(Duration::ZERO).await;
        modules.waits.borrow_mut().remove(&requirer);
    }
    modules
        .states
        .borrow_mut()
        .insert(module, ModuleState::Loading);
    let tree = Tree::of(lua);
    let outcome = async {
        let chunk = compile(lua, module, &chunk_name(&tree, module))?;
        let thread: Thread = lua.create_thread(chunk)?;
        modules.waits.borrow_mut().insert(requirer, module);
        let results: MultiValue = thread.into_async(())?.await?;
        modules.waits.borrow_mut().remove(&requirer);
        let mut results = results.into_iter();
        match (results.next(), results.next()) {
            (Some(value), None) => Ok(value),
            _ => Err(error(NOT_ONE_VALUE)),
        }
    }
    .await;
    match outcome {
        Ok(value) => {
            modules
                .states
                .borrow_mut()
                .insert(module, ModuleState::Loaded(value.clone()));
            Ok(value)
        }
        Err(failure) => {
            modules.waits.borrow_mut().remove(&requirer);
            modules
                .states
                .borrow_mut()
                .insert(module, ModuleState::Failed);
            let message = blox_scheduler::error_message(&failure);
            if message == NOT_ONE_VALUE {
                return Err(failure);
            }
            let warn: Function = lua.globals().get("warn")?;
            warn.call::<()>(message)?;
            Err(error(MODULE_FAILED))
        }
    }
}
