//! What the engine's tests share: a real SQLite database on its own runtime, and engines
//! (VMs) on it, each a server of the same game.

// Cargo compiles this module into each test file, and not every file uses every helper.
#![allow(dead_code)]

use std::rc::Rc;
use std::sync::Arc;

use blox_datastore::DataStoreContext;
use blox_datastore::backend::{self, Backend, OpenOptions};
use blox_datastore::budget::Throttling;
use blox_engine::{Engine, ServerIdentity};
use blox_scheduler::{Clock, RealClock};

/// The game every test server belongs to.
pub const GAME_ID: i64 = 7;

/// A temporary SQLite database and the runtime that serves it.
pub struct Database {
    runtime: tokio::runtime::Runtime,
    backend: Arc<dyn Backend>,
    _folder: tempfile::TempDir,
}

impl Database {
    pub fn new() -> Self {
        let folder = tempfile::tempdir().expect("a temporary folder");
        let runtime = tokio::runtime::Runtime::new().expect("a database runtime");
        let url = format!(
            "sqlite://{}",
            folder.path().join("engine.sqlite3").display()
        );
        let backend = runtime
            .block_on(backend::open(&url, &OpenOptions::default()))
            .expect("the database opens");
        Self {
            runtime,
            backend,
            _folder: folder,
        }
    }

    /// A server of the game on this database, its time kept by `clock`.
    pub fn engine(&self, clock: Rc<dyn Clock>) -> Engine {
        let context = DataStoreContext::new(
            Arc::clone(&self.backend),
            self.runtime.handle().clone(),
            GAME_ID,
            Throttling::Off,
        );
        let identity = ServerIdentity {
            place_id: 1,
            game_id: GAME_ID,
            job_id: blox_engine::new_guid(),
        };
        Engine::new(identity, context, clock).expect("the engine starts")
    }
}

/// Runs `test` on a fresh database, on a VM thread's own runtime (where engines live).
pub fn on_vm_thread(test: impl AsyncFnOnce(&Database)) {
    let database = Database::new();
    let vm = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a VM runtime");
    vm.block_on(test(&database));
}

/// Runs `test` with one real-time server, on the VM thread's own runtime.
pub fn with_engine(test: impl AsyncFnOnce(&Engine)) {
    on_vm_thread(async |database| {
        let engine = database.engine(Rc::new(RealClock::new()));
        test(&engine).await;
    });
}
