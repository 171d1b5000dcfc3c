//! `blox serve`: a long-running game server that clients join over WebSocket.
//!
//! The HTTP side (axum) runs on the database runtime's workers; the game runs on the VM
//! thread, as for `blox run`. They meet in two channels: connections hand what clients do
//! (join, send, leave) to the VM through one unbounded queue that the VM drains every frame,
//! and the VM answers each connection through that connection's own queue. Nothing on the VM
//! thread ever waits on a socket.
//!
//! Endpoints: `GET /health` (status, JobId, player count), `GET /ws?userId=N&name=X` (join as
//! that player; one live connection per user id, a newer one replaces the older, as a second
//! Roblox login does), and `GET /` serving the project's `web/index.html` when it has one.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use blox_engine::net::{self, ClientLink};
use tokio::sync::{mpsc, watch};

/// What a connection tells the game.
enum Inbound {
    Join {
        user_id: i64,
        name: String,
        connection: u64,
        outbound: mpsc::UnboundedSender<Outbound>,
    },
    Message {
        user_id: i64,
        connection: u64,
        text: String,
    },
    Leave {
        user_id: i64,
        connection: u64,
    },
}

/// What the game tells a connection.
enum Outbound {
    Text(String),
    Close(String),
}

/// Roblox's message when the same account joins from somewhere else.
const REPLACED: &str = "Same account launched experience from different device. Reconnect if you prefer to use this device.";

#[derive(Clone)]
struct App {
    inbound: mpsc::UnboundedSender<Inbound>,
    players: Arc<AtomicUsize>,
    accepting: Arc<AtomicBool>,
    next_connection: Arc<AtomicU64>,
    job_id: String,
    page: Option<PathBuf>,
}

/// The HTTP side of a server, running until its shutdown is signalled.
pub(crate) struct Endpoint {
    inbound: RefCell<mpsc::UnboundedReceiver<Inbound>>,
    players: Arc<AtomicUsize>,
    accepting: Arc<AtomicBool>,
    shutdown: watch::Sender<bool>,
}

impl Endpoint {
    /// Starts serving on `listener`, on `runtime`.
    pub(crate) fn start(
        runtime: &tokio::runtime::Runtime,
        listener: std::net::TcpListener,
        job_id: String,
        page: Option<PathBuf>,
    ) -> std::io::Result<Self> {
        let (inbound, receiver) = mpsc::unbounded_channel();
        let (shutdown, mut stopped) = watch::channel(false);
        let app = App {
            inbound,
            players: Arc::default(),
            accepting: Arc::new(AtomicBool::new(true)),
            next_connection: Arc::default(),
            job_id,
            page,
        };
        let endpoint = Endpoint {
            inbound: RefCell::new(receiver),
            players: Arc::clone(&app.players),
            accepting: Arc::clone(&app.accepting),
            shutdown,
        };
        let router = Router::new()
            .route("/health", get(health))
            .route("/ws", get(connect))
            .route("/", get(page_handler))
            .with_state(app);
        listener.set_nonblocking(true)?;
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        runtime.spawn(async move {
            let stop = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            if let Err(error) = axum::serve(listener, router)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::error!(%error, "the HTTP endpoint failed");
            }
        });
        Ok(endpoint)
    }

    /// Connects the game in `lua` to the endpoint's clients: their traffic is handled once a
    /// frame, and player state goes out after it.
    pub(crate) fn attach(self: &Rc<Self>, lua: &mlua::Lua, scheduler: &blox_scheduler::Scheduler) {
        let links = Rc::new(Links::default());
        net::install(lua, Rc::clone(&links) as Rc<dyn ClientLink>);
        let endpoint = Rc::clone(self);
        scheduler.on_frame(move |lua, _| {
            loop {
                let next = endpoint.inbound.borrow_mut().try_recv();
                let Ok(inbound) = next else { break };
                links.handle(lua, inbound)?;
            }
            links.admit(lua)?;
            net::replicate(lua)?;
            endpoint
                .players
                .store(links.connections.borrow().len(), Ordering::Relaxed);
            Ok(())
        });
    }

    /// Refuses new players from now on (the server is shutting down).
    pub(crate) fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::Relaxed);
    }

    /// Stops the HTTP side; open sockets close as their queues drop.
    pub(crate) fn shut_down(&self) {
        let _ = self.shutdown.send(true);
    }
}

/// The live connection of each user, on the VM thread.
#[derive(Default)]
struct Links {
    connections: RefCell<HashMap<i64, (u64, mpsc::UnboundedSender<Outbound>)>>,
    /// Users connected whose player waits for their last session's `PlayerRemoving`
    /// handlers (see [`blox_engine::GameState::may_join`]).
    waiting: RefCell<Vec<(i64, String)>>,
}

impl Links {
    fn current(&self, user_id: i64, connection: u64) -> bool {
        self.connections
            .borrow()
            .get(&user_id)
            .is_some_and(|(live, _)| *live == connection)
    }

    fn handle(&self, lua: &mlua::Lua, inbound: Inbound) -> mlua::Result<()> {
        match inbound {
            Inbound::Join {
                user_id,
                name,
                connection,
                outbound,
            } => {
                if self.connections.borrow().contains_key(&user_id) {
                    self.disconnect(user_id, REPLACED);
                    net::leave(lua, user_id)?;
                }
                let joined = serde_json::json!({
                    "type": "Joined",
                    "userId": user_id,
                    "name": name,
                    "jobId": blox_engine::GameState::of(lua).job_id(),
                });
                let _ = outbound.send(Outbound::Text(joined.to_string()));
                self.connections
                    .borrow_mut()
                    .insert(user_id, (connection, outbound));
                self.waiting
                    .borrow_mut()
                    .retain(|(waiting, _)| *waiting != user_id);
                self.waiting.borrow_mut().push((user_id, name));
                self.admit(lua)
            }
            Inbound::Message {
                user_id,
                connection,
                text,
            } if self.current(user_id, connection) => net::receive(lua, user_id, &text),
            Inbound::Leave {
                user_id,
                connection,
            } if self.current(user_id, connection) => {
                self.connections.borrow_mut().remove(&user_id);
                self.waiting
                    .borrow_mut()
                    .retain(|(waiting, _)| *waiting != user_id);
                tracing::info!(user_id, "player left");
                net::leave(lua, user_id)
            }
            _ => Ok(()),
        }
    }
}

impl Links {
    /// Turns the waiting users whose last session has finished saving into players.
    fn admit(&self, lua: &mlua::Lua) -> mlua::Result<()> {
        let state = blox_engine::GameState::of(lua);
        let ready: Vec<(i64, String)> = {
            let mut waiting = self.waiting.borrow_mut();
            let (ready, still) = waiting
                .drain(..)
                .partition(|(user_id, _)| state.may_join(lua, *user_id));
            *waiting = still;
            ready
        };
        for (user_id, name) in ready {
            if self.connections.borrow().contains_key(&user_id) {
                tracing::info!(user_id, name, "player joined");
                net::join(lua, user_id, &name)?;
            }
        }
        Ok(())
    }
}

impl ClientLink for Links {
    fn send(&self, user_id: i64, message: String) {
        if let Some((_, outbound)) = self.connections.borrow().get(&user_id) {
            let _ = outbound.send(Outbound::Text(message));
        }
    }

    fn disconnect(&self, user_id: i64, reason: &str) {
        if let Some((_, outbound)) = self.connections.borrow_mut().remove(&user_id) {
            let _ = outbound.send(Outbound::Close(reason.to_owned()));
        }
    }
}

async fn health(State(app): State<App>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": if app.accepting.load(Ordering::Relaxed) { "ok" } else { "stopping" },
        "jobId": app.job_id,
        "players": app.players.load(Ordering::Relaxed),
    }))
}

async fn page_handler(State(app): State<App>) -> Response {
    match &app.page {
        Some(path) => match tokio::fs::read_to_string(path).await {
            Ok(page) => Html(page).into_response(),
            Err(_) => StatusCode::NOT_FOUND.into_response(),
        },
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn connect(
    upgrade: WebSocketUpgrade,
    Query(params): Query<HashMap<String, String>>,
    State(app): State<App>,
) -> Response {
    let Some(user_id) = params
        .get("userId")
        .and_then(|id| id.parse::<i64>().ok())
        .filter(|id| *id > 0)
    else {
        return (StatusCode::BAD_REQUEST, "userId must be a positive integer").into_response();
    };
    if !app.accepting.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        )
            .into_response();
    }
    let name = params
        .get("name")
        .filter(|name| !name.is_empty() && name.len() <= 20)
        .cloned()
        .unwrap_or_else(|| format!("Player{user_id}"));
    upgrade.on_upgrade(move |socket| client(socket, app, user_id, name))
}

/// Carries one client's traffic both ways until either side closes.
async fn client(mut socket: WebSocket, app: App, user_id: i64, name: String) {
    let connection = app.next_connection.fetch_add(1, Ordering::Relaxed);
    let (outbound, mut replies) = mpsc::unbounded_channel();
    let joined = Inbound::Join {
        user_id,
        name,
        connection,
        outbound,
    };
    if app.inbound.send(joined).is_err() {
        return;
    }
    loop {
        tokio::select! {
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    let message = Inbound::Message { user_id, connection, text: text.to_string() };
                    if app.inbound.send(message).is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            reply = replies.recv() => match reply {
                Some(Outbound::Text(text)) => {
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                Some(Outbound::Close(reason)) => {
                    let kicked = serde_json::json!({ "type": "Kicked", "message": reason });
                    let _ = socket.send(Message::Text(kicked.to_string().into())).await;
                    let _ = socket.send(Message::Close(None)).await;
                    break;
                }
                None => break,
            },
        }
    }
    let _ = app.inbound.send(Inbound::Leave {
        user_id,
        connection,
    });
}
