//! Hosting a Blox server: the database runtime, the storage backend and script runs.
//!
//! Two runtimes, on purpose. The Luau VM is single-threaded, so it runs on the calling thread
//! under a Tokio current-thread runtime. A separate multi-thread runtime owns the database
//! connections and runs their I/O drivers, so the VM never blocks on I/O and a connection
//! outlives any VM. A DataStore call's work is spawned onto that runtime (SQLite) or polled by
//! the calling Luau thread with that runtime entered (PostgreSQL, where it saves two
//! cross-thread wake-ups per call); `blox_datastore`'s `attached` module says why.

use std::future::Future;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use blox_datastore::backend::{self, Backend, BackendError, OpenOptions};
use blox_datastore::budget::Throttling;
use blox_datastore::{DataStoreContext, operations};
use blox_engine::{CLOSE_DEADLINE, Engine, EngineError, MessagingLink, ServerIdentity};
use blox_place::Place;

mod serve;
use blox_scheduler::{RealClock, ThreadError};

pub use blox_datastore::backend::DEFAULT_DATABASE_URL;

/// Why a server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A Tokio runtime could not be built.
    #[error("cannot start the runtime")]
    Runtime(#[from] std::io::Error),
    /// The database could not be opened or migrated.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The Luau VM could not be set up, or the script does not compile.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The MessagingService bus could not be opened.
    #[error(transparent)]
    Messaging(#[from] blox_messaging::BusError),
}

/// How a script run ended.
#[derive(Debug)]
pub struct ScriptOutcome {
    /// The error that ended a Script's main chunk, the first if several failed.
    pub main_error: Option<ThreadError>,
    /// Every error that ended a thread, the main chunk's included.
    pub thread_errors: Vec<ThreadError>,
    /// How many Scripts the place started.
    pub scripts_started: usize,
}

impl ScriptOutcome {
    fn of(engine: &Engine, scripts: &[mlua::Thread]) -> Self {
        Self {
            main_error: scripts.iter().find_map(|script| engine.failure_of(script)),
            thread_errors: engine.scheduler().errors(),
            scripts_started: scripts.len(),
        }
    }
}

/// An open database and the runtime that serves it.
pub struct Host {
    database: tokio::runtime::Runtime,
    backend: Arc<dyn Backend>,
    throttling: Throttling,
    memory_limit: usize,
    url: String,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("backend", &self.backend)
            .finish()
    }
}

impl Host {
    /// Starts the database runtime, opens (and migrates) the database at `url`, and starts
    /// the task that purges expired versions and tombstones beside it.
    pub fn open(url: &str, options: &OpenOptions) -> Result<Self, HostError> {
        let database = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("blox-db")
            .enable_all()
            .build()?;
        let backend = database.block_on(backend::open(url, options))?;
        database.spawn(operations::purge_periodically(Arc::clone(&backend)));
        Ok(Self {
            database,
            backend,
            throttling: Throttling::default(),
            memory_limit: blox_engine::MEMORY_LIMIT,
            url: url.to_owned(),
        })
    }

    /// Sets how many bytes each server's Luau heap may take ([`blox_engine::MEMORY_LIMIT`] by
    /// default).
    pub fn with_memory_limit(mut self, bytes: usize) -> Self {
        self.memory_limit = bytes;
        self
    }

    /// Sets the DataStore request budgets of the servers this host runs (Roblox's by default).
    pub fn with_throttling(mut self, throttling: Throttling) -> Self {
        self.throttling = throttling;
        self
    }

    /// The storage backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The database runtime, for work that must run beside the database connections.
    pub fn database_runtime(&self) -> &tokio::runtime::Runtime {
        &self.database
    }

    /// Runs `place`'s server Scripts until every thread has finished (or `stop` completes),
    /// then runs the `game:BindToClose` callbacks for up to 30 seconds.
    pub fn run_place(
        &self,
        identity: ServerIdentity,
        place: &Place,
        stop: impl Future<Output = ()>,
    ) -> Result<ScriptOutcome, HostError> {
        let messaging = self.messaging(identity.game_id)?;
        let vm = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        vm.block_on(async {
            let engine = self.engine(identity, messaging)?;
            let scripts = engine.load_place(place)?;
            engine.scheduler().run_until(engine.lua(), stop).await;
            engine.close(CLOSE_DEADLINE).await?;
            Ok(ScriptOutcome::of(&engine, &scripts))
        })
    }

    /// Serves `place` on `listener` until `stop` completes: clients join over WebSocket as
    /// players (see [`serve`]). On stop it refuses new players, fires `PlayerRemoving` for
    /// everyone, waits for the `BindToClose` callbacks (30 s at most) and closes the sockets.
    /// `page` is served at `/` when given.
    pub fn serve(
        &self,
        identity: ServerIdentity,
        place: &Place,
        listener: std::net::TcpListener,
        page: Option<PathBuf>,
        stop: impl Future<Output = ()>,
    ) -> Result<ScriptOutcome, HostError> {
        let endpoint = Rc::new(serve::Endpoint::start(
            &self.database,
            listener,
            identity.job_id.clone(),
            page,
        )?);
        let messaging = self.messaging(identity.game_id)?;
        let vm = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let outcome = vm.block_on(async {
            let engine = self.engine(identity, messaging)?;
            endpoint.attach(engine.lua(), engine.scheduler());
            let scripts = engine.load_place(place)?;
            engine.scheduler().serve_until(engine.lua(), stop).await;
            endpoint.stop_accepting();
            engine.close(CLOSE_DEADLINE).await?;
            Ok::<_, HostError>(ScriptOutcome::of(&engine, &scripts))
        });
        endpoint.shut_down();
        outcome
    }

    /// A VM for the server `identity` on the host's database and message bus.
    fn engine(
        &self,
        identity: ServerIdentity,
        messaging: MessagingLink,
    ) -> Result<Engine, HostError> {
        let context = DataStoreContext::new(
            Arc::clone(&self.backend),
            self.database.handle().clone(),
            identity.game_id,
            self.throttling,
        );
        let engine = Engine::new(identity, context, Rc::new(RealClock::new()))?;
        engine.set_memory_limit(self.memory_limit)?;
        engine.connect_messaging(messaging)?;
        Ok(engine)
    }

    /// The MessagingService bus of `universe` on the host's database (it connects on first
    /// use, on the database runtime).
    fn messaging(&self, universe: i64) -> Result<MessagingLink, HostError> {
        let _runtime = self.database.enter();
        let (bus, inbox) = blox_messaging::open(&self.url, universe)?;
        Ok(MessagingLink {
            bus,
            inbox,
            runtime: self.database.handle().clone(),
            universe,
        })
    }

    /// Lets in-flight database work finish (up to `deadline`) and closes the runtime.
    pub fn shutdown(self, deadline: Duration) {
        self.database.shutdown_timeout(deadline);
    }
}
