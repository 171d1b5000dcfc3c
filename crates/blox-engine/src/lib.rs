//! The Blox engine: one sandboxed Luau VM with Roblox's server globals (`game`, `Enum`,
//! `DateTime`, `Instance`, `task`, `print`/`warn`) and the scheduler that runs its threads.
//!
//! [`Engine`] is the single entry point. It lives on one OS thread (Luau is single-threaded)
//! and is driven by a Tokio current-thread runtime on that thread; database work goes to the
//! separate runtime inside the [`DataStoreContext`] it is given.

mod cframe;
mod datatypes;
mod datetime;
mod enums;
pub mod instance;
mod messaging;
pub mod net;
mod palette;
mod reflection;
mod scripts;
mod services;

use std::hash::{BuildHasher, Hasher};
use std::io::Write as _;
use std::rc::Rc;
use std::time::Duration;

use blox_datastore::DataStoreContext;
use blox_scheduler::{Clock, Scheduler, ThreadError};
use mlua::chunk::Compiler;
use mlua::thread::ThreadStatus;
use mlua::{
    AnyUserData, Function, Lua, LuaOptions, MultiValue, ObjectLike as _, StdLib, Thread, Value,
};

pub use instance::{Instance, Tree};
pub use messaging::MessagingLink;
pub use rbx_dom_weak::types::Ref;
pub use services::{GameState, ServerIdentity};

/// How long a thread may run without yielding before it is stopped with Roblox's "Script
/// timeout" error (Roblox's default).
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(10);

/// How much memory the VM's Luau heap may take by default: a script that allocates without
/// end gets Luau's catchable "not enough memory" error instead of taking the process down.
pub const MEMORY_LIMIT: usize = 2 << 30;

/// How long `game:BindToClose` callbacks may run on shutdown, as on Roblox.
pub const CLOSE_DEADLINE: Duration = Duration::from_secs(30);

/// Globals whose fields change while scripts run. Luau resolves a chain such as `os.clock`
/// when a chunk loads and keeps the result; for these roots it looks the fields up on every
/// read instead, so `_G.Config` set by another script and `workspace.Part` replaced later are
/// seen as they are now.
const MUTABLE_GLOBALS: [&str; 6] = ["_G", "shared", "game", "Game", "workspace", "Workspace"];

/// Why the engine could not set up a VM or start a script.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The script does not compile.
    #[error("{0}")]
    Syntax(String),
    /// The VM itself failed (out of memory, broken setup).
    #[error("Luau error: {0}")]
    Lua(String),
}

impl From<mlua::Error> for EngineError {
    fn from(error: mlua::Error) -> Self {
        EngineError::Lua(blox_scheduler::error_message(&error))
    }
}

/// One Luau VM with Roblox's server environment.
pub struct Engine {
    lua: Lua,
    scheduler: Rc<Scheduler>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("scheduler", &self.scheduler)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Builds the VM: globals, services, scheduler, then seals the global environment.
    pub fn new(
        identity: ServerIdentity,
        datastore: Rc<DataStoreContext>,
        clock: Rc<dyn Clock>,
    ) -> Result<Self, EngineError> {
        let lua = Lua::new_with(StdLib::ALL_SAFE, LuaOptions::default())?;
        let scheduler = Scheduler::attach(&lua, clock)?;
        scheduler.limit_execution_time(&lua, SCRIPT_TIMEOUT);
        lua.set_memory_limit(MEMORY_LIMIT)?;
        let tree = Tree::install(&lua, services::TREE_SERVICES)?;
        let sweeping = Rc::clone(&tree);
        scheduler.on_frame(move |_, _| {
            sweeping.sweep();
            Ok(())
        });
        let state = GameState::new(identity, datastore);
        lua.set_app_data(Rc::clone(&state));
        lua.set_app_data(instance::Members(Rc::new(services::class_members)));
        scripts::install(&lua);
        let game = tree.handle(&lua, tree.game())?;
        services::drive_frames(&state, &scheduler);
        install_globals(&lua, &game)?;
        lua.sandbox(true)?;
        // The sandbox freezes every table in the globals. Roblox's `shared` and `_G` are
        // tables every script may write, so they are added after it.
        let globals = lua.globals();
        globals.set_readonly(false);
        globals.set("shared", lua.create_table()?)?;
        globals.set("_G", lua.create_table()?)?;
        globals.set_readonly(true);
        // Unfreezing cleared the flag that lets Luau resolve global reads (`os.clock`,
        // `task.wait`) once, when a chunk loads; without it every such read walks the
        // environment's metatables at run time, about 25 ns each.
        globals.set_safeenv(true);
        lua.set_compiler(Compiler::new().set_mutable_globals(MUTABLE_GLOBALS));
        Ok(Self { lua, scheduler })
    }

    /// The VM, for embedding and tests.
    pub fn lua(&self) -> &Lua {
        &self.lua
    }

    /// The scheduler driving the VM's threads.
    pub fn scheduler(&self) -> &Rc<Scheduler> {
        &self.scheduler
    }

    /// Compiles `source` as a chunk named `name` outside the tree (no `script`; `require` takes
    /// ModuleScript instances) and starts it at once. Returns its main thread.
    pub fn start_script(&self, name: &str, source: &[u8]) -> Result<Thread, EngineError> {
        let chunk = self
            .lua
            .load(source)
            .set_name(format!("@{name}"))
            .set_environment(scripts::environment(&self.lua, Ref::none())?)
            .into_function()
            .map_err(|error| EngineError::Syntax(blox_scheduler::error_message(&error)))?;
        let thread = self.lua.create_thread(chunk)?;
        self.scheduler.spawn(thread.clone(), MultiValue::new())?;
        Ok(thread)
    }

    /// Connects `MessagingService` to the other servers of the universe through `link`.
    /// Without it, the service exists but has no members.
    pub fn connect_messaging(&self, link: MessagingLink) -> Result<(), EngineError> {
        let service = self
            .lua
            .create_userdata(messaging::MessagingService::new(link))?;
        GameState::of(&self.lua).provide_service("MessagingService", service.clone());
        messaging::drive(service, &self.scheduler);
        Ok(())
    }

    /// Mounts `place` into the tree and starts its server Scripts (those in
    /// ServerScriptService and Workspace). Returns each Script's main thread.
    pub fn load_place(&self, place: &blox_place::Place) -> Result<Vec<Thread>, EngineError> {
        let tree = Tree::of(&self.lua);
        tree.mount(&place.dom);
        self.lua
            .set_app_data(scripts::Aliases(place.aliases.iter().cloned().collect()));
        let mut threads = Vec::new();
        for script in scripts::server_scripts(&tree) {
            let chunk_name = if place.single_script {
                format!("@{}", place.name)
            } else {
                scripts::chunk_name(&tree, script)
            };
            let chunk = scripts::compile(&self.lua, script, &chunk_name)
                .map_err(|error| EngineError::Syntax(blox_scheduler::error_message(&error)))?;
            let thread = self.lua.create_thread(chunk)?;
            threads.push(thread);
        }
        for thread in &threads {
            self.scheduler.spawn(thread.clone(), MultiValue::new())?;
        }
        Ok(threads)
    }

    /// Sets how many bytes the Luau heap may take (see [`MEMORY_LIMIT`]).
    pub fn set_memory_limit(&self, bytes: usize) -> Result<(), EngineError> {
        self.lua.set_memory_limit(bytes)?;
        Ok(())
    }

    /// Adds a player (as a client joining): a Player under Players, then `PlayerAdded`.
    pub fn add_player(&self, user_id: i64, name: &str) -> Result<Ref, EngineError> {
        Ok(services::add_player(&self.lua, user_id, name, name)?)
    }

    /// Removes a player (as a client leaving): `PlayerRemoving`, then out of Players.
    pub fn remove_player(&self, user_id: i64) -> Result<(), EngineError> {
        if let Some(player) = self.player(user_id) {
            services::remove_player(&self.lua, player)?;
        }
        Ok(())
    }

    /// The Player of `user_id`, if that user is in the game.
    pub fn player(&self, user_id: i64) -> Option<Ref> {
        let tree = Tree::of(&self.lua);
        let players = tree.find_child(tree.game(), "Players")?;
        tree.children(players).into_iter().find(|child| {
            tree.property(*child, "UserId") == Some(rbx_dom_weak::types::Variant::Int64(user_id))
        })
    }

    /// Every player in the game.
    pub fn players(&self) -> Vec<Ref> {
        let tree = Tree::of(&self.lua);
        tree.find_child(tree.game(), "Players")
            .map(|players| tree.children(players))
            .unwrap_or_default()
    }

    /// Runs threads, timers and frames until no thread is left running or waiting.
    pub async fn run_until_idle(&self) {
        self.scheduler.run_until_idle(&self.lua).await;
    }

    /// Shuts the game down as a Roblox server does: `PlayerRemoving` for every player still
    /// in the game, then every `game:BindToClose` callback, concurrently, waiting until they
    /// have all returned or `deadline` has passed. Other threads (a game loop) do not hold
    /// the shutdown up.
    pub async fn close(&self, deadline: Duration) -> Result<(), EngineError> {
        for player in self.players() {
            services::remove_player(&self.lua, player)?;
        }
        let mut callbacks = Vec::new();
        for callback in GameState::of(&self.lua).close_callbacks() {
            let thread = self.lua.create_thread(callback)?;
            self.scheduler.spawn(thread.clone(), MultiValue::new())?;
            callbacks.push(thread);
        }
        let scheduler = Rc::clone(&self.scheduler);
        let returned = async move {
            while callbacks.iter().any(|thread| {
                !matches!(
                    thread.status(),
                    ThreadStatus::Finished | ThreadStatus::Error
                )
            }) {
                scheduler.sleep(Duration::ZERO).await;
            }
        };
        let stop = async {
            tokio::select! {
                () = returned => {}
                () = tokio::time::sleep(deadline) => {}
            }
        };
        self.scheduler.run_until(&self.lua, stop).await;
        Ok(())
    }

    /// The error that ended `thread`, if it failed.
    pub fn failure_of(&self, thread: &Thread) -> Option<ThreadError> {
        self.scheduler
            .errors()
            .into_iter()
            .find(|error| error.thread.as_ref() == Some(thread))
    }
}

/// A random GUID in Roblox's upper-case 8-4-4-4-12 form, without braces.
pub fn new_guid() -> String {
    let random = || {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    };
    let bits = (u128::from(random()) << 64) | u128::from(random());
    let hex = format!("{bits:032X}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn write_line(out: &mut dyn std::io::Write, lua: &Lua, args: MultiValue) -> mlua::Result<()> {
    let tostring: Function = lua.globals().get("tostring")?;
    let mut line = Vec::new();
    for (index, value) in args.into_iter().enumerate() {
        if index > 0 {
            line.push(b' ');
        }
        line.extend_from_slice(&tostring.call::<mlua::LuaString>(value)?.as_bytes());
    }
    line.push(b'\n');
    // A closed console is not the script's problem.
    let _ = out.write_all(&line);
    Ok(())
}

fn install_globals(lua: &Lua, game: &AnyUserData) -> mlua::Result<()> {
    let globals = lua.globals();
    globals.set(
        "print",
        lua.create_function(|lua, args: MultiValue| {
            write_line(&mut std::io::stdout().lock(), lua, args)
        })?,
    )?;
    globals.set(
        "warn",
        lua.create_function(|lua, args: MultiValue| {
            write_line(&mut std::io::stderr().lock(), lua, args)
        })?,
    )?;
    // Roblox servers ship with loadstring disabled. `require` is no global: each chunk's own
    // environment binds it to its script (`scripts::environment`), and Luau resolves a chunk's
    // global reads against these shared globals when it loads, so a global of that name here
    // would be what every script's `require` calls.
    globals.set(
        "loadstring",
        lua.create_function(|_, _: MultiValue| {
            Err::<(), _>(mlua::Error::RuntimeError(
                "loadstring() is not available".to_owned(),
            ))
        })?,
    )?;
    globals.raw_remove("require")?;
    globals.set("game", game.clone())?;
    globals.set("Game", game.clone())?;
    let workspace: Value = game.get("Workspace")?;
    globals.set("workspace", workspace.clone())?;
    globals.set("Workspace", workspace)?;
    let instance = lua.create_table()?;
    instance.set(
        "new",
        lua.create_function(|lua, (class, parent): (String, Value)| {
            // The DataStore option classes are host objects of their own, ahead of the tree.
            if let Some(options) = blox_datastore::create_instance(lua, &class)? {
                return Ok(options);
            }
            instance::new_instance(lua, &class, parent)?.ok_or_else(|| {
                mlua::Error::RuntimeError(format!(
                    "Unable to create an Instance of type \"{class}\""
                ))
            })
        })?,
    )?;
    instance.set_readonly(true);
    globals.set("Instance", instance)?;
    enums::install(lua)?;
    datetime::install(lua)?;
    datatypes::install(lua)?;
    cframe::install(lua)?;
    palette::install(lua)?;

    // Every server gets its own random sequence, as on Roblox.
    let seed = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let math: mlua::Table = globals.get("math")?;
    math.get::<Function>("randomseed")?
        .call::<()>((seed % (1 << 31)) as f64)?;
    let _ = std::io::stdout().flush();
    Ok(())
}
