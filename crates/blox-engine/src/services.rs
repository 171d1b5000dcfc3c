//! `game` (the DataModel) and its services.
//!
//! Each object is host userdata whose `typeof` is "Instance", with Roblox's `Name`,
//! `ClassName`, `IsA` and error for unknown members. `GetService` creates a service on first
//! use and returns the same object afterwards. Services that Blox does not implement in depth
//! yet still exist as plain instances, because libraries fetch them at load time.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use blox_datastore::{DataStoreContext, DataStoreService};
use blox_scheduler::{Scheduler, Signal};
use mlua::{
    AnyUserData, Function, IntoLuaMulti, Lua, MetaMethod, UserData, UserDataFields,
    UserDataMethods, Value,
};

/// Every service `GetService` knows. Names outside this list raise Roblox's error.
const SERVICES: &[&str] = &[
    "DataStoreService",
    "RunService",
    "Players",
    "HttpService",
    "Workspace",
    "ServerScriptService",
    "ServerStorage",
    "ReplicatedStorage",
    "ReplicatedFirst",
    "Lighting",
    "StarterGui",
    "StarterPack",
    "StarterPlayer",
    "Teams",
    "SoundService",
    "Chat",
    "TestService",
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

/// `game`.
pub struct DataModel {
    identity: ServerIdentity,
    datastore: Rc<DataStoreContext>,
    services: RefCell<HashMap<&'static str, AnyUserData>>,
    close_callbacks: RefCell<Vec<Function>>,
}

impl DataModel {
    /// The DataModel of a server with `identity`, storing data through `datastore`.
    pub fn new(identity: ServerIdentity, datastore: Rc<DataStoreContext>) -> Self {
        Self {
            identity,
            datastore,
            services: RefCell::default(),
            close_callbacks: RefCell::default(),
        }
    }

    /// The callbacks registered with `game:BindToClose`, in registration order.
    pub fn close_callbacks(&self) -> Vec<Function> {
        self.close_callbacks.borrow().clone()
    }

    fn service(&self, lua: &Lua, name: &str) -> mlua::Result<Option<AnyUserData>> {
        let Some(&name) = SERVICES.iter().find(|known| **known == name) else {
            return Ok(None);
        };
        if let Some(service) = self.services.borrow().get(name) {
            return Ok(Some(service.clone()));
        }
        let service = match name {
            "DataStoreService" => {
                lua.create_userdata(DataStoreService::new(Rc::clone(&self.datastore)))?
            }
            "RunService" => lua.create_userdata(RunService::default())?,
            "Players" => lua.create_userdata(Players::default())?,
            "HttpService" => lua.create_userdata(HttpService)?,
            other => lua.create_userdata(PlainService(other))?,
        };
        self.services.borrow_mut().insert(name, service.clone());
        Ok(Some(service))
    }
}

fn invalid_member(member: &Value, class: &str, name: &str) -> mlua::Error {
    mlua::Error::RuntimeError(format!(
        "{} is not a valid member of {class} \"{name}\"",
        member.to_string().unwrap_or_default()
    ))
}

impl UserData for DataModel {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "Instance");
        fields.add_field("Name", "Game");
        fields.add_field("ClassName", "DataModel");
        fields.add_field_method_get("PlaceId", |_, game| Ok(game.identity.place_id));
        fields.add_field_method_get("GameId", |_, game| Ok(game.identity.game_id));
        fields.add_field_method_get("JobId", |_, game| Ok(game.identity.job_id.clone()));
        fields.add_field("CreatorId", 0);
        fields.add_field("PlaceVersion", 0);
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("GetService", |lua, game, name: String| {
            game.service(lua, &name)?.ok_or_else(|| {
                mlua::Error::RuntimeError(format!("'{name}' is not a valid Service name"))
            })
        });
        methods.add_method("FindService", |lua, game, name: String| {
            game.service(lua, &name)
        });
        methods.add_method("BindToClose", |_, game, callback: Function| {
            game.close_callbacks.borrow_mut().push(callback);
            Ok(())
        });
        methods.add_method("IsA", |_, _, class: String| {
            Ok(class == "DataModel" || class == "ServiceProvider" || class == "Instance")
        });
        methods.add_meta_method(MetaMethod::ToString, |_, _, ()| Ok("Game"));
        methods.add_meta_method(MetaMethod::Index, |lua, game, member: Value| {
            let name = member.to_string().unwrap_or_default();
            match game.service(lua, &name)? {
                Some(service) => Ok(service),
                None => Err(invalid_member(&member, "DataModel", "Game")),
            }
        });
    }
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

/// `Players`. A single-script run has no players; the events exist for scripts to connect.
#[derive(Default)]
pub struct Players {
    player_added: Signal,
    player_removing: Signal,
}

impl UserData for Players {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "Instance");
        fields.add_field("Name", "Players");
        fields.add_field("ClassName", "Players");
        fields.add_field("MaxPlayers", 50);
        fields.add_field("LocalPlayer", Value::Nil);
        fields.add_field_method_get("PlayerAdded", |_, players| Ok(players.player_added.clone()));
        fields.add_field_method_get("PlayerRemoving", |_, players| {
            Ok(players.player_removing.clone())
        });
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("GetPlayers", |lua, _, ()| lua.create_table());
        methods.add_method("GetPlayerByUserId", |_, _, _: Value| Ok(Value::Nil));
        add_service_methods(methods, |_| "Players");
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
        add_service_methods(methods, |_| "HttpService");
    }
}

/// Fires RunService's frame events on every frame of `scheduler`, once a script has asked for
/// RunService.
pub fn drive_frames(game: &AnyUserData, scheduler: &Scheduler) {
    let game = game.clone();
    let started = scheduler.now();
    scheduler.on_frame(move |lua, delta| {
        let data_model = game.borrow::<DataModel>()?;
        let run_service = data_model.services.borrow().get("RunService").cloned();
        if let Some(run_service) = run_service {
            let elapsed = Scheduler::of(lua).now().saturating_sub(started);
            run_service
                .borrow::<RunService>()?
                .step(lua, elapsed, delta)?;
        }
        Ok(())
    });
}
