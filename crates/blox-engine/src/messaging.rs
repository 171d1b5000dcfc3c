//! `MessagingService`: `PublishAsync` and `SubscribeAsync` between the servers of a universe.
//!
//! Publishing hands the message to the bus (`blox-messaging`) on the database runtime and
//! yields until it is sent. What arrives is queued by the bus and delivered on the VM thread
//! once a frame: each subscription's callback runs in a thread of its own with Roblox's
//! `{Data = value, Sent = seconds}` table. Roblox's limits apply: topics of 80 characters,
//! messages of 1 kB once serialized, and per-server rates that grow with the player count.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use blox_datastore::codec;
use blox_messaging::{Bus, BusError, Message};
use blox_scheduler::{Scheduler, Signal};
use mlua::{IntoLuaMulti, Lua, MetaMethod, UserData, UserDataFields, UserDataMethods, Value};
use tokio::sync::mpsc;

/// The longest topic name.
const TOPIC_LIMIT: usize = 80;
/// The largest serialized message.
const MESSAGE_LIMIT: usize = 1024;

/// What the host gives the engine to reach other servers.
pub struct MessagingLink {
    /// Sends messages.
    pub bus: Arc<dyn Bus>,
    /// Receives the universe's messages, published here or elsewhere.
    pub inbox: mpsc::UnboundedReceiver<Message>,
    /// Where publishing runs (the database runtime).
    pub runtime: tokio::runtime::Handle,
    /// The universe (`game.GameId`).
    pub universe: i64,
}

/// `game:GetService("MessagingService")`.
pub struct MessagingService {
    bus: Arc<dyn Bus>,
    inbox: RefCell<mpsc::UnboundedReceiver<Message>>,
    runtime: tokio::runtime::Handle,
    universe: i64,
    topics: RefCell<HashMap<String, Signal>>,
    /// Publishes left this minute and when the window started.
    published: Cell<(u32, Duration)>,
}

impl MessagingService {
    /// The service over `link`.
    pub fn new(link: MessagingLink) -> Self {
        Self {
            bus: link.bus,
            inbox: RefCell::new(link.inbox),
            runtime: link.runtime,
            universe: link.universe,
            topics: RefCell::default(),
            published: Cell::new((0, Duration::ZERO)),
        }
    }

    /// Runs `work` with the bus on the database runtime and waits for it, turning a bus
    /// failure into an error for the script (the cause is logged).
    async fn on_bus<F, W>(&self, api: &'static str, work: W) -> mlua::Result<()>
    where
        F: Future<Output = Result<(), BusError>> + Send + 'static,
        W: FnOnce(Arc<dyn Bus>) -> F,
    {
        match self.runtime.spawn(work(Arc::clone(&self.bus))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(failure)) => {
                tracing::error!(api, error = %failure, "the message bus failed");
                Err(error(format!(
                    "{api} failed: the message bus is unavailable"
                )))
            }
            Err(_) => Err(error(format!("{api} failed: the server is shutting down"))),
        }
    }

    /// Runs the callbacks of every message that arrived since the last frame.
    pub fn deliver(&self, lua: &Lua) -> mlua::Result<()> {
        loop {
            let next = self.inbox.borrow_mut().try_recv();
            let Ok(message) = next else {
                return Ok(());
            };
            let signal = self.topics.borrow().get(&message.topic).cloned();
            let Some(signal) = signal.filter(Signal::is_observed) else {
                continue;
            };
            let data = match codec::decode(&message.data) {
                Ok(stored) => codec::to_lua(lua, &stored)?,
                Err(_) => Value::Nil,
            };
            let payload = lua.create_table()?;
            payload.raw_set("Data", data)?;
            payload.raw_set("Sent", message.sent_ms as f64 / 1000.0)?;
            signal.fire(lua, payload.into_lua_multi(lua)?)?;
        }
    }
}

fn error(message: impl Into<String>) -> mlua::Error {
    mlua::Error::RuntimeError(message.into())
}

fn players(lua: &Lua) -> u32 {
    let tree = crate::Tree::of(lua);
    tree.find_child(tree.game(), "Players")
        .map_or(0, |players| tree.children(players).len() as u32)
}

fn topic_argument(topic: Value) -> mlua::Result<String> {
    let topic = match topic {
        Value::String(topic) => topic.to_str()?.to_owned(),
        Value::Nil => return Err(error("Argument 1 missing or nil")),
        other => {
            return Err(error(format!(
                "Unable to cast {} to string",
                other.type_name()
            )));
        }
    };
    if topic.is_empty() || topic.len() > TOPIC_LIMIT {
        return Err(error(format!(
            "Topic must be 1 to {TOPIC_LIMIT} characters, got {}",
            topic.len()
        )));
    }
    Ok(topic)
}

impl UserData for MessagingService {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "Instance");
        fields.add_field("Name", "MessagingService");
        fields.add_field("ClassName", "MessagingService");
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_async_method(
            "PublishAsync",
            |lua, service, (topic, message): (Value, Value)| async move {
                let topic = topic_argument(topic)?;
                let data = codec::encode(&lua, &message).map_err(|e| error(e.to_string()))?;
                if data.len() > MESSAGE_LIMIT {
                    return Err(error(format!(
                        "Message size {} exceeds the {MESSAGE_LIMIT} byte limit",
                        data.len()
                    )));
                }
                // Roblox allows 150 + 60 × players messages a minute per server.
                let now = Scheduler::of(&lua).now();
                let (mut sent, mut window) = service.published.get();
                if now.saturating_sub(window) >= Duration::from_secs(60) {
                    (sent, window) = (0, now);
                }
                if sent >= 150 + 60 * players(&lua) {
                    return Err(error(
                        "PublishAsync request was throttled: too many messages this minute",
                    ));
                }
                service.published.set((sent + 1, window));
                blox_scheduler::yield_now().await;
                let message = Message::new(service.universe, topic, data);
                service
                    .on_bus("PublishAsync", move |bus| async move {
                        bus.publish(&message).await
                    })
                    .await
            },
        );
        methods.add_async_method(
            "SubscribeAsync",
            |lua, service, (topic, callback): (Value, Value)| async move {
                let topic = topic_argument(topic)?;
                let Value::Function(callback) = callback else {
                    return Err(error("Argument 2 missing or nil"));
                };
                let subscribed = service
                    .topics
                    .borrow()
                    .values()
                    .filter(|signal| signal.is_observed())
                    .count() as u32;
                let limit = 20 + 8 * players(&lua);
                if subscribed >= limit && !service.topics.borrow().contains_key(&topic) {
                    return Err(error(format!(
                        "SubscribeAsync: a server may subscribe to at most {limit} topics"
                    )));
                }
                blox_scheduler::yield_now().await;
                // The first subscription makes this server a listener on the bus.
                service
                    .on_bus("SubscribeAsync", |bus| async move { bus.listen().await })
                    .await?;
                let signal = service
                    .topics
                    .borrow_mut()
                    .entry(topic)
                    .or_default()
                    .clone();
                Ok(signal.connect(callback))
            },
        );
        methods.add_method("IsA", |_, _, class: String| {
            Ok(class == "MessagingService" || class == "Instance")
        });
        methods.add_meta_method(MetaMethod::ToString, |_, _, ()| Ok("MessagingService"));
    }
}

/// Delivers the service's messages once a frame.
pub(crate) fn drive(service: mlua::AnyUserData, scheduler: &Scheduler) {
    scheduler.on_frame(move |lua, _| service.borrow::<MessagingService>()?.deliver(lua));
}
