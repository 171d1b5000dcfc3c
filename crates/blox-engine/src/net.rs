//! The game's side of connected clients (`blox serve`): players joining and leaving,
//! RemoteEvent and RemoteFunction traffic, and the player state their client shows.
//!
//! The engine does not know sockets. The host gives it a [`ClientLink`] that delivers text to
//! a user's connection, and feeds it what clients send through [`join`], [`leave`] and
//! [`receive`]; everything runs on the VM thread. Messages are JSON objects with a `type`:
//!
//! - client to server: `FireServer {remote, args}` and `InvokeServer {id, remote, args}`,
//!   where `remote` is the remote's full name (`ReplicatedStorage.Remotes.Buy`);
//! - server to client: `OnClientEvent {remote, args}`, `InvokeResult {id, ok, results |
//!   error}`, and `State {attributes, leaderstats}` whenever the player's attributes or
//!   leaderstats values change.
//!
//! Arguments follow Roblox's rules for remotes: what JSON can carry goes through (nil,
//! booleans, numbers, strings, arrays and string-keyed tables), an Instance travels as
//! `{"$instance": "Full.Name"}`, a datatype as `{"$datatype": {"Vector3": [1, 2, 3]}}` (the
//! rojo-rbx serde form of the value), and what cannot cross (functions, threads) arrives as
//! nil.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use blox_datastore::codec::{self, Stored};
use mlua::{Lua, MultiValue, Value};
use rbx_dom_weak::types::{Ref, Variant};

use crate::instance::{Instance, Tree, class_is_a};
use crate::services;

/// Where the game's messages to clients go.
pub trait ClientLink {
    /// Delivers `message` (a JSON text) to the connection of `user_id`, if it has one.
    fn send(&self, user_id: i64, message: String);
    /// Closes the connection of `user_id` with `reason` (a `Kick`).
    fn disconnect(&self, user_id: i64, reason: &str);
}

struct Net {
    link: Rc<dyn ClientLink>,
    /// The last state sent to each player, to send only changes.
    sent_states: RefCell<HashMap<i64, String>>,
    /// The tree's change count at the last replication: an unchanged tree needs no new states.
    replicated_at: Cell<Option<u64>>,
}

/// Connects the game to clients through `link`.
pub fn install(lua: &Lua, link: Rc<dyn ClientLink>) {
    lua.set_app_data(Rc::new(Net {
        link,
        sent_states: RefCell::default(),
        replicated_at: Cell::new(None),
    }));
}

fn net(lua: &Lua) -> Option<Rc<Net>> {
    lua.app_data_ref::<Rc<Net>>().map(|net| Rc::clone(&net))
}

fn error(message: impl Into<String>) -> mlua::Error {
    mlua::Error::RuntimeError(message.into())
}

/// A client of `user_id` joined: a Player appears and `PlayerAdded` fires.
pub fn join(lua: &Lua, user_id: i64, name: &str) -> mlua::Result<()> {
    services::add_player(lua, user_id, name, name)?;
    Ok(())
}

/// The client of `user_id` left: `PlayerRemoving` fires and the Player goes.
pub fn leave(lua: &Lua, user_id: i64) -> mlua::Result<()> {
    if let Some(net) = net(lua) {
        net.sent_states.borrow_mut().remove(&user_id);
    }
    match player_of(lua, user_id) {
        Some(player) => services::remove_player(lua, player),
        None => Ok(()),
    }
}

/// Closes the connection of a kicked player.
pub(crate) fn kicked(lua: &Lua, player: Ref, reason: &str) {
    if let (Some(net), Some(user_id)) = (net(lua), user_id_of(&Tree::of(lua), player)) {
        net.link.disconnect(user_id, reason);
    }
}

fn user_id_of(tree: &Tree, player: Ref) -> Option<i64> {
    match tree.property(player, "UserId") {
        Some(Variant::Int64(id)) => Some(id),
        _ => None,
    }
}

fn player_of(lua: &Lua, user_id: i64) -> Option<Ref> {
    let tree = Tree::of(lua);
    let players = tree.find_child(tree.game(), "Players")?;
    tree.children(players)
        .into_iter()
        .find(|child| user_id_of(&tree, *child) == Some(user_id))
}

/// The instance at a full name such as `ReplicatedStorage.Remotes.Buy`.
fn find_path(tree: &Tree, path: &str) -> Option<Ref> {
    path.split('.')
        .try_fold(tree.game(), |at, name| tree.find_child(at, name))
}

fn object_field<'a>(fields: &'a [(String, Stored)], name: &str) -> Option<&'a Stored> {
    fields
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value)
}

/// Handles one message from the client of `user_id`. A malformed message is dropped with a
/// warning, as Roblox drops bad remote traffic; it never stops the game.
pub fn receive(lua: &Lua, user_id: i64, message: &str) -> mlua::Result<()> {
    let Some(player) = player_of(lua, user_id) else {
        return Ok(());
    };
    let Ok(Stored::Object(fields)) = codec::decode(message) else {
        tracing::warn!(user_id, "dropped a message that is not a JSON object");
        return Ok(());
    };
    let text = |name| match object_field(&fields, name) {
        Some(Stored::String(text)) => Some(text.clone()),
        _ => None,
    };
    let tree = Tree::of(lua);
    let Some(remote) = text("remote").and_then(|path| find_path(&tree, &path)) else {
        tracing::warn!(user_id, "dropped a message for an unknown remote");
        return Ok(());
    };
    let mut args = vec![Value::UserData(tree.handle(lua, player)?)];
    if let Some(Stored::Array(items)) = object_field(&fields, "args") {
        for item in items {
            args.push(from_wire(lua, &tree, item)?);
        }
    }
    let args = MultiValue::from_iter(args);
    match (text("type").as_deref(), tree.class(remote).as_str()) {
        (Some("FireServer"), "RemoteEvent") => tree.fire_event(lua, remote, args),
        (Some("InvokeServer"), "RemoteFunction") => {
            let id = match object_field(&fields, "id") {
                Some(Stored::Number(id)) => *id,
                _ => 0.0,
            };
            invoke(lua, user_id, remote, id, args)
        }
        _ => {
            tracing::warn!(user_id, "dropped a message of an unknown type");
            Ok(())
        }
    }
}

/// Runs `OnServerInvoke` in a thread of its own and sends its results back.
fn invoke(lua: &Lua, user_id: i64, remote: Ref, id: f64, args: MultiValue) -> mlua::Result<()> {
    let callback = Tree::of(lua).callback(remote);
    let runner = lua.create_async_function(move |lua, args: MultiValue| {
        let callback = callback.clone();
        async move {
            let outcome = match callback {
                Some(callback) => {
                    let thread = lua.create_thread(callback)?;
                    thread.into_async::<MultiValue>(args)?.await
                }
                None => Err(error("OnServerInvoke is not set")),
            };
            let reply = match outcome {
                Ok(results) => format!(
                    r#"{{"type":"InvokeResult","id":{id},"ok":true,"results":{}}}"#,
                    to_wire_list(lua.clone(), results)?
                ),
                Err(failure) => format!(
                    r#"{{"type":"InvokeResult","id":{id},"ok":false,"error":{}}}"#,
                    json_string(&blox_scheduler::error_message(&failure))
                ),
            };
            if let Some(net) = net(&lua) {
                net.link.send(user_id, reply);
            }
            Ok(())
        }
    })?;
    let thread = lua.create_thread(runner)?;
    blox_scheduler::Scheduler::of(lua).spawn(thread, args)
}

/// `RemoteEvent:FireClient(player, ...)`.
pub(crate) fn fire_client(
    lua: &Lua,
    remote: Ref,
    player: Ref,
    args: MultiValue,
) -> mlua::Result<()> {
    let tree = Tree::of(lua);
    let (Some(net), Some(user_id)) = (net(lua), user_id_of(&tree, player)) else {
        return Ok(());
    };
    let message = format!(
        r#"{{"type":"OnClientEvent","remote":{},"args":{}}}"#,
        json_string(&tree.full_name(remote)),
        to_wire_list(lua.clone(), args)?
    );
    net.link.send(user_id, message);
    Ok(())
}

/// `RemoteEvent:FireAllClients(...)`.
pub(crate) fn fire_all_clients(lua: &Lua, remote: Ref, args: MultiValue) -> mlua::Result<()> {
    let tree = Tree::of(lua);
    let Some(players) = tree.find_child(tree.game(), "Players") else {
        return Ok(());
    };
    for player in tree.children(players) {
        fire_client(lua, remote, player, args.clone())?;
    }
    Ok(())
}

/// Sends each player whose attributes or leaderstats changed since the last call its new
/// state. Called once a frame; a frame in which the tree did not change costs nothing.
pub fn replicate(lua: &Lua) -> mlua::Result<()> {
    let Some(net) = net(lua) else {
        return Ok(());
    };
    let tree = Tree::of(lua);
    if net.replicated_at.replace(Some(tree.changes())) == Some(tree.changes()) {
        return Ok(());
    }
    let Some(players) = tree.find_child(tree.game(), "Players") else {
        return Ok(());
    };
    for player in tree.children(players) {
        let Some(user_id) = user_id_of(&tree, player) else {
            continue;
        };
        let state = player_state(&tree, player);
        let mut sent = net.sent_states.borrow_mut();
        if sent.get(&user_id) != Some(&state) {
            sent.insert(user_id, state.clone());
            drop(sent);
            net.link.send(user_id, state);
        }
    }
    Ok(())
}

/// The `State` message of `player`: its attributes and its leaderstats values.
fn player_state(tree: &Tree, player: Ref) -> String {
    let mut attributes = serde_json::Map::new();
    if let Some(Variant::Attributes(all)) = tree.property(player, "Attributes") {
        for (name, value) in all.iter() {
            attributes.insert(name.clone(), variant_json(tree, value));
        }
    }
    let mut leaderstats = serde_json::Map::new();
    if let Some(folder) = tree.find_child(player, "leaderstats") {
        for stat in tree.children(folder) {
            if class_is_a(&tree.class(stat), "ValueBase") {
                let value = tree
                    .property(stat, "Value")
                    .map_or(serde_json::Value::Null, |value| variant_json(tree, &value));
                leaderstats.insert(tree.name(stat), value);
            }
        }
    }
    serde_json::json!({
        "type": "State",
        "attributes": attributes,
        "leaderstats": leaderstats,
    })
    .to_string()
}

fn variant_json(tree: &Tree, value: &Variant) -> serde_json::Value {
    match value {
        Variant::String(text) => serde_json::Value::from(text.as_str()),
        Variant::Bool(b) => serde_json::Value::from(*b),
        Variant::Int64(n) => serde_json::Value::from(*n),
        Variant::Int32(n) => serde_json::Value::from(*n),
        Variant::Float64(n) => number_json(*n),
        Variant::Float32(n) => number_json(f64::from(*n)),
        Variant::Ref(r) if r.is_some() => serde_json::json!({ "$instance": tree.full_name(*r) }),
        Variant::Ref(_) => serde_json::Value::Null,
        other => datatype_json(other),
    }
}

/// A Luau number as JSON: integers without a fraction, as Luau prints them.
fn number_json(n: f64) -> serde_json::Value {
    if n.fract() == 0.0 && n.abs() <= 9_007_199_254_740_992.0 {
        serde_json::Value::from(n as i64)
    } else {
        serde_json::Value::from(n)
    }
}

/// A datatype value on the wire: `{"$datatype": <its rojo-rbx serde form>}`.
fn datatype_json(value: &Variant) -> serde_json::Value {
    serde_json::to_value(value)
        .map(|form| serde_json::json!({ "$datatype": form }))
        .unwrap_or(serde_json::Value::Null)
}

fn json_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// How deep a table sent over the wire may nest; deeper (or cyclic) parts arrive as null.
const WIRE_DEPTH: usize = 64;

/// Values as a JSON array for the wire.
fn to_wire_list(lua: Lua, values: MultiValue) -> mlua::Result<String> {
    let tree = Tree::of(&lua);
    let items: Vec<serde_json::Value> = values
        .iter()
        .map(|value| to_wire(&tree, value, 0))
        .collect();
    Ok(serde_json::Value::Array(items).to_string())
}

/// One value for the wire: tables recursively (a table with a length as an array, else its
/// string keys as an object), instances and datatypes in their tagged forms, and null for
/// what cannot cross.
fn to_wire(tree: &Tree, value: &Value, depth: usize) -> serde_json::Value {
    if let Some(instance) = Instance::from_value(value) {
        return serde_json::json!({ "$instance": tree.full_name(instance) });
    }
    if let Some(variant) = crate::datatypes::to_variant(value) {
        return datatype_json(&variant);
    }
    match value {
        Value::Boolean(b) => serde_json::Value::from(*b),
        Value::Integer(n) => number_json(*n as f64),
        Value::Number(n) => number_json(*n),
        Value::String(text) => serde_json::Value::from(text.to_string_lossy()),
        Value::Table(table) if depth < WIRE_DEPTH => {
            let length = table.raw_len();
            if length > 0 {
                let items = (1..=length)
                    .map(|i| {
                        let item = table.raw_get::<Value>(i).unwrap_or(Value::Nil);
                        to_wire(tree, &item, depth + 1)
                    })
                    .collect();
                return serde_json::Value::Array(items);
            }
            let mut object = serde_json::Map::new();
            for (key, item) in table.pairs::<Value, Value>().flatten() {
                if let Value::String(key) = key {
                    object.insert(key.to_string_lossy(), to_wire(tree, &item, depth + 1));
                }
            }
            serde_json::Value::Object(object)
        }
        _ => serde_json::Value::Null,
    }
}

/// A value from the wire, with `{"$instance": path}` resolved to the instance (nil when it
/// does not exist) and `{"$datatype": …}` to the datatype, at any depth.
fn from_wire(lua: &Lua, tree: &Tree, item: &Stored) -> mlua::Result<Value> {
    if let Stored::Object(fields) = item
        && let [(key, value)] = fields.as_slice()
    {
        match (key.as_str(), value) {
            ("$instance", Stored::String(path)) => {
                return match find_path(tree, path) {
                    Some(instance) => tree.value(lua, instance),
                    None => Ok(Value::Nil),
                };
            }
            ("$datatype", form) => {
                let variant = codec::encode(lua, &codec::to_lua(lua, form)?)
                    .ok()
                    .and_then(|json| serde_json::from_str::<Variant>(&json).ok());
                return match variant {
                    Some(variant) => {
                        Ok(crate::datatypes::from_variant(lua, &variant)?.unwrap_or(Value::Nil))
                    }
                    None => Ok(Value::Nil),
                };
            }
            _ => {}
        }
    }
    match item {
        Stored::Array(items) => {
            let table = lua.create_table_with_capacity(items.len(), 0)?;
            for (index, item) in items.iter().enumerate() {
                table.raw_set(index + 1, from_wire(lua, tree, item)?)?;
            }
            Ok(Value::Table(table))
        }
        Stored::Object(fields) => {
            let table = lua.create_table_with_capacity(0, fields.len())?;
            for (key, item) in fields {
                table.raw_set(key.as_str(), from_wire(lua, tree, item)?)?;
            }
            Ok(Value::Table(table))
        }
        other => codec::to_lua(lua, other),
    }
}
