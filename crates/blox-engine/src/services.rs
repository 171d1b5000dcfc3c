//! `game` (the DataModel) and its services.
//!
//! `game` is the root of the instance tree ([`crate::instance`]); the services scripts parent
//! things to (Workspace, Players, ServerScriptService, ReplicatedStorage, ...) are instances
//! under it from the start, as on Roblox. Services with behaviour of their own that no script
//! parents anything to (DataStoreService, RunService, HttpService, ...) are host objects that
//! `GetService` creates on first use and returns afterwards; those Blox does not implement in
//! depth yet still exist as plain objects, because libraries fetch them at load time. The
//! members `game`, Players and Player add to the tree's generic ones are served here.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use blox_datastore::{DataStoreContext, DataStoreService, codec};
use blox_scheduler::{Scheduler, Signal};
use mlua::{
    AnyUserData, Function, IntoLuaMulti, Lua, MetaMethod, MultiValue, UserData, UserDataFields,
    UserDataMethods, Value,
};
use rbx_dom_weak::types::{Ref, Variant};

use crate::instance::Tree;

/// Services that are instances in the tree, present from the start as on Roblox.
pub const TREE_SERVICES: &[&str] = &[
    "Workspace",
    "Players",
    "Lighting",
    "ReplicatedFirst",
    "ReplicatedStorage",
    "ServerScriptService",
    "ServerStorage",
    "StarterGui",
    "StarterPack",
    "StarterPlayer",
    "Teams",
    "SoundService",
    "Chat",
    "TestService",
];

/// Services implemented as host objects of their own, created on first use.
const HOST_SERVICES: &[&str] = &[
    "DataStoreService",
    "RunService",
    "HttpService",
    "MessagingService",
    "MemoryStoreService",
    "MarketplaceService",
    "CollectionService",
    "TweenService",
    "PhysicsService",
    "TextService",
    "LocalizationService",
    "BadgeService",
    "GroupService",
    "PolicyService",
    "AnalyticsService",
    "Debris",
    "ContentProvider",
    "TeleportService",
    "LogService",
    "ScriptContext",
];

/// Identity of the running server, as scripts read it from `game`.
#[derive(Debug, Clone)]
pub struct ServerIdentity {
    /// `game.PlaceId`: shared by every server of a place.
    pub place_id: i64,
    /// `game.GameId`: the universe; DataStore rows belong to it.
    pub game_id: i64,
    /// `game.JobId`: unique to this server process.
    pub job_id: String,
}

/// What `game` and its services hold beyond the instance tree.
pub struct GameState {
    identity: ServerIdentity,
    datastore: Rc<DataStoreContext>,
    host_services: RefCell<HashMap<&'static str, AnyUserData>>,
    close_callbacks: RefCell<Vec<Function>>,
    player_added: Signal,
    player_removing: Signal,
    /// The `PlayerRemoving` handler threads of users who left, and when they left.
    leaving: RefCell<HashMap<i64, (Vec<mlua::Thread>, Duration)>>,
}

/// How long a user's next session waits for the last one's `PlayerRemoving` handlers.
const LEAVING_GRACE: Duration = Duration::from_secs(30);

impl GameState {
    /// The state of a server with `identity`, storing data through `datastore`.
    pub fn new(identity: ServerIdentity, datastore: Rc<DataStoreContext>) -> Rc<Self> {
        Rc::new(Self {
            identity,
            datastore,
            host_services: RefCell::default(),
            close_callbacks: RefCell::default(),
            player_added: Signal::default(),
            player_removing: Signal::default(),
            leaving: RefCell::default(),
        })
    }

    /// The state installed in `lua`'s VM.
    pub fn of(lua: &Lua) -> Rc<GameState> {
        lua.app_data_ref::<Rc<GameState>>()
            .map(|state| Rc::clone(&state))
            .expect("the engine installs a GameState in every VM")
    }

    /// Makes `service` what `GetService(name)` returns (a host service the engine was
    /// given, such as a connected MessagingService).
    pub fn provide_service(&self, name: &'static str, service: AnyUserData) {
        self.host_services.borrow_mut().insert(name, service);
    }

    /// Whether `user_id` may start a session: the `PlayerRemoving` handlers of their last
    /// session here have finished (they save what the next session loads), or 30 seconds
    /// have passed since it ended.
    pub fn may_join(&self, lua: &Lua, user_id: i64) -> bool {
        let mut leaving = self.leaving.borrow_mut();
        let Some((threads, left)) = leaving.get(&user_id) else {
            return true;
        };
        let finished = threads.iter().all(|thread| {
            matches!(
                thread.status(),
                mlua::thread::ThreadStatus::Finished | mlua::thread::ThreadStatus::Error
            )
        });
        let waited = Scheduler::of(lua).now().saturating_sub(*left);
        if finished || waited >= LEAVING_GRACE {
            leaving.remove(&user_id);
            return true;
        }
        false
    }

    /// Tells the request budgets how many players are in the game: they scale with it.
    fn count_players(&self, lua: &Lua) {
        let tree = Tree::of(lua);
        let players = tree
            .find_child(tree.game(), "Players")
            .map_or(0, |players| tree.children(players).len());
        self.datastore.set_player_count(players as u32);
    }

    /// `game.JobId`.
    pub fn job_id(&self) -> &str {
        &self.identity.job_id
    }

    /// The callbacks registered with `game:BindToClose`, in registration order.
    pub fn close_callbacks(&self) -> Vec<Function> {
        self.close_callbacks.borrow().clone()
    }

    /// `Players.PlayerAdded`.
    pub fn player_added(&self) -> &Signal {
        &self.player_added
    }

    /// `Players.PlayerRemoving`.
    pub fn player_removing(&self) -> &Signal {
        &self.player_removing
    }

    /// A service by name: the tree's instance or a host object; `None` for unknown names.
    pub fn service(&self, lua: &Lua, name: &str) -> mlua::Result<Option<Value>> {
        let tree = Tree::of(lua);
        if TREE_SERVICES.contains(&name) {
            let found = tree.find_child(tree.game(), name);
            return Ok(match found {
                Some(service) => Some(tree.value(lua, service)?),
                None => None,
            });
        }
        let Some(&name) = HOST_SERVICES.iter().find(|known| **known == name) else {
            return Ok(None);
        };
        if let Some(service) = self.host_services.borrow().get(name) {
            return Ok(Some(Value::UserData(service.clone())));
        }
        let service = match name {
            "DataStoreService" => {
                lua.create_userdata(DataStoreService::new(Rc::clone(&self.datastore)))?
            }
            "RunService" => lua.create_userdata(RunService::default())?,
            "HttpService" => lua.create_userdata(HttpService)?,
            other => lua.create_userdata(PlainService(other))?,
        };
        self.host_services
            .borrow_mut()
            .insert(name, service.clone());
        Ok(Some(Value::UserData(service)))
    }
}

fn invalid_member(member: &Value, class: &str, name: &str) -> mlua::Error {
    mlua::Error::RuntimeError(format!(
        "{} is not a valid member of {class} \"{name}\"",
        member.to_string().unwrap_or_default()
    ))
}

/// The members of `game`, Players and Player that the tree does not know itself.
pub fn class_members(
    lua: &Lua,
    instance: Ref,
    class: &str,
    member: &str,
) -> mlua::Result<Option<Value>> {
    let state = GameState::of(lua);
    let tree = Tree::of(lua);
    let method = |name: &'static str,
                  body: fn(&Lua, Ref, MultiValue) -> mlua::Result<MultiValue>|
     -> mlua::Result<Option<Value>> {
        Ok(Some(Value::Function(tree.method(lua, name, body)?)))
    };
    match (class, member) {
        ("DataModel", "PlaceId") => Ok(Some(Value::Number(state.identity.place_id as f64))),
        ("DataModel", "GameId") => Ok(Some(Value::Number(state.identity.game_id as f64))),
        ("DataModel", "JobId") => Ok(Some(Value::String(
            lua.create_string(&state.identity.job_id)?,
        ))),
        ("DataModel", "CreatorId" | "PlaceVersion") => Ok(Some(Value::Number(0.0))),
        ("DataModel", "GetService") => method("GetService", |lua, _, args| {
            let name = service_name(lua, args)?;
            match GameState::of(lua).service(lua, &name)? {
                Some(service) => service.into_lua_multi(lua),
                None => Err(mlua::Error::RuntimeError(format!(
                    "'{name}' is not a valid Service name"
                ))),
            }
        }),
        ("DataModel", "FindService") => method("FindService", |lua, _, args| {
            let name = service_name(lua, args)?;
            GameState::of(lua).service(lua, &name)?.into_lua_multi(lua)
        }),
        ("DataModel", "BindToClose") => method("BindToClose", |lua, _, args| {
            let Some(Value::Function(callback)) = args.into_iter().next() else {
                return Err(mlua::Error::RuntimeError(
                    "BindToClose expects a function".to_owned(),
                ));
            };
            GameState::of(lua)
                .close_callbacks
                .borrow_mut()
                .push(callback);
            Ok(MultiValue::new())
        }),
        ("DataModel", name) if HOST_SERVICES.contains(&name) => state.service(lua, name),
        ("Players", "PlayerAdded") => Ok(Some(Value::UserData(
            lua.create_userdata(state.player_added.clone())?,
        ))),
        ("Players", "PlayerRemoving") => Ok(Some(Value::UserData(
            lua.create_userdata(state.player_removing.clone())?,
        ))),
        ("Players", "MaxPlayers") => Ok(Some(Value::Number(50.0))),
        ("Players", "LocalPlayer") => Ok(Some(Value::Nil)),
        ("Players", "GetPlayers") => method("GetPlayers", |lua, players, _| {
            let tree = Tree::of(lua);
            let mut found = tree.children(players);
            found.retain(|child| tree.class(*child) == "Player");
            tree.sequence(lua, found)?.into_lua_multi(lua)
        }),
        ("Players", "GetPlayerByUserId") => method("GetPlayerByUserId", |lua, players, args| {
            let user_id: f64 = match args.into_iter().next() {
                Some(Value::Integer(n)) => n as f64,
                Some(Value::Number(n)) => n,
                _ => return Value::Nil.into_lua_multi(lua),
            };
            let tree = Tree::of(lua);
            let found = tree.children(players).into_iter().find(|child| {
                tree.class(*child) == "Player"
                    && matches!(tree.property(*child, "UserId"), Some(Variant::Int64(id)) if id as f64 == user_id)
            });
            tree.value(lua, found.unwrap_or_else(Ref::none))?
                .into_lua_multi(lua)
        }),
        ("Player", "UserId") => Ok(Some(match tree.property(instance, "UserId") {
            Some(Variant::Int64(id)) => Value::Number(id as f64),
            _ => Value::Number(0.0),
        })),
        ("Player", "DisplayName") => Ok(Some(match tree.property(instance, "DisplayName") {
            Some(Variant::String(name)) => Value::String(lua.create_string(name)?),
            _ => Value::String(lua.create_string(tree.name(instance))?),
        })),
        ("Player", "Kick") => method("Kick", |lua, player, args| {
            let reason = match args.into_iter().next() {
                Some(Value::String(text)) => text.to_string_lossy(),
                _ => String::new(),
            };
            remove_player(lua, player)?;
            crate::net::kicked(lua, player, &reason);
            Ok(MultiValue::new())
        }),
        _ => Ok(None),
    }
}

fn service_name(lua: &Lua, args: MultiValue) -> mlua::Result<String> {
    match args.into_iter().next() {
        Some(Value::String(name)) => Ok(name.to_str()?.to_owned()),
        Some(other) => Ok(lua
            .coerce_string(other)?
            .map(|name| name.to_string_lossy())
            .unwrap_or_default()),
        None => Err(mlua::Error::RuntimeError(
            "Argument 1 missing or nil".to_owned(),
        )),
    }
}

/// Adds a Player for `user_id` under Players and fires `PlayerAdded`.
pub fn add_player(lua: &Lua, user_id: i64, name: &str, display_name: &str) -> mlua::Result<Ref> {
    let tree = Tree::of(lua);
    let players = tree
        .find_child(tree.game(), "Players")
        .expect("Players is created with the tree");
    let player = tree.create("Player", name);
    tree.set_property_quietly(player, "UserId", Variant::Int64(user_id));
    tree.set_property_quietly(
        player,
        "DisplayName",
        Variant::String(display_name.to_owned()),
    );
    tree.set_parent(lua, player, players)?;
    let state = GameState::of(lua);
    state.count_players(lua);
    let value = tree.handle(lua, player)?;
    state.player_added.fire(lua, value.into_lua_multi(lua)?)?;
    Ok(player)
}

/// Fires `PlayerRemoving` for `player`, then takes it out of Players.
pub fn remove_player(lua: &Lua, player: Ref) -> mlua::Result<()> {
    let tree = Tree::of(lua);
    if tree.parent(player).is_none() {
        return Ok(());
    }
    let value = tree.handle(lua, player)?;
    let state = GameState::of(lua);
    let handlers = state
        .player_removing
        .fire_tracked(lua, value.into_lua_multi(lua)?)?;
    if let Some(Variant::Int64(user_id)) = tree.property(player, "UserId") {
        let now = Scheduler::of(lua).now();
        state.leaving.borrow_mut().insert(user_id, (handlers, now));
    }
    tree.set_parent(lua, player, Ref::none())?;
    state.count_players(lua);
    Ok(())
}

/// A service that exists for scripts to fetch but has no members of its own yet.
struct PlainService(&'static str);

impl UserData for PlainService {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "Instance");
        fields.add_field_method_get("Name", |_, service| Ok(service.0));
        fields.add_field_method_get("ClassName", |_, service| Ok(service.0));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        add_service_methods(methods, |service| service.0);
    }
}

fn add_service_methods<T: 'static, M: UserDataMethods<T>>(
    methods: &mut M,
    class: fn(&T) -> &'static str,
) {
    methods.add_method("IsA", move |_, service, name: String| {
        Ok(name == class(service) || name == "Instance")
    });
    methods.add_meta_method(MetaMethod::ToString, move |_, service, ()| {
        Ok(class(service))
    });
    methods.add_meta_method(MetaMethod::Index, move |_, service, member: Value| {
        Err::<(), _>(invalid_member(&member, class(service), class(service)))
    });
}

/// `RunService`: frame events and the environment checks scripts make.
#[derive(Default)]
pub struct RunService {
    heartbeat: Signal,
    stepped: Signal,
    pre_simulation: Signal,
    post_simulation: Signal,
}

impl RunService {
    /// Fires the frame events in Roblox's order for a frame of length `delta`.
    fn step(&self, lua: &Lua, elapsed: Duration, delta: Duration) -> mlua::Result<()> {
        let dt = delta.as_secs_f64();
        for (signal, args) in [
            (
                &self.stepped,
                (elapsed.as_secs_f64(), dt).into_lua_multi(lua)?,
            ),
            (&self.pre_simulation, dt.into_lua_multi(lua)?),
            (&self.post_simulation, dt.into_lua_multi(lua)?),
            (&self.heartbeat, dt.into_lua_multi(lua)?),
        ] {
            if signal.is_observed() {
                signal.fire(lua, args)?;
            }
        }
        Ok(())
    }
}

impl UserData for RunService {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "Instance");
        fields.add_field("Name", "RunService");
        fields.add_field("ClassName", "RunService");
        fields.add_field_method_get("Heartbeat", |_, run| Ok(run.heartbeat.clone()));
        fields.add_field_method_get("Stepped", |_, run| Ok(run.stepped.clone()));
        fields.add_field_method_get("PreSimulation", |_, run| Ok(run.pre_simulation.clone()));
        fields.add_field_method_get("PostSimulation", |_, run| Ok(run.post_simulation.clone()));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("IsServer", |_, _, ()| Ok(true));
        methods.add_method("IsClient", |_, _, ()| Ok(false));
        methods.add_method("IsStudio", |_, _, ()| Ok(false));
        methods.add_method("IsRunning", |_, _, ()| Ok(true));
        methods.add_method("IsRunMode", |_, _, ()| Ok(false));
        methods.add_method("IsEdit", |_, _, ()| Ok(false));
        add_service_methods(methods, |_| "RunService");
    }
}

/// `HttpService`. Outbound HTTP is off on Blox servers, as `HttpEnabled = false` says.
struct HttpService;

impl UserData for HttpService {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "Instance");
        fields.add_field("Name", "HttpService");
        fields.add_field("ClassName", "HttpService");
        fields.add_field("HttpEnabled", false);
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("GenerateGUID", |_, _, braces: Option<bool>| {
            let guid = crate::new_guid();
            Ok(if braces.unwrap_or(true) {
                format!("{{{guid}}}")
            } else {
                guid
            })
        });
        // Roblox's JSON rules are the DataStore's (arrays, string-key dictionaries, no mixed
        // or sparse tables), so both go through the same strict codec.
        methods.add_method("JSONEncode", |lua, _, value: Value| {
            codec::encode(lua, &value).map_err(|error| {
                let message = error.to_string();
                mlua::Error::RuntimeError(
                    if message.contains("Array") || message.contains("Dictionary") {
                        "Cannot convert mixed or non-array tables: keys must be strings".to_owned()
                    } else {
                        "Can't convert to JSON".to_owned()
                    },
                )
            })
        });
        methods.add_method("JSONDecode", |lua, _, text: mlua::LuaString| {
            let parsed = text
                .to_str()
                .ok()
                .and_then(|text| codec::decode(&text).ok())
                .ok_or_else(|| mlua::Error::RuntimeError("Can't parse JSON".to_owned()))?;
            codec::to_lua(lua, &parsed)
        });
        add_service_methods(methods, |_| "HttpService");
    }
}

/// Fires RunService's frame events on every frame of `scheduler`, once a script has asked for
/// RunService.
pub fn drive_frames(state: &Rc<GameState>, scheduler: &Scheduler) {
    let state = Rc::clone(state);
    let started = scheduler.now();
    scheduler.on_frame(move |lua, delta| {
        let run_service = state.host_services.borrow().get("RunService").cloned();
        if let Some(run_service) = run_service {
            let elapsed = Scheduler::of(lua).now().saturating_sub(started);
            run_service
                .borrow::<RunService>()?
                .step(lua, elapsed, delta)?;
        }
        Ok(())
    });
}
