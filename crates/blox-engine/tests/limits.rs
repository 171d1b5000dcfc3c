//! Runaway scripts meet limits instead of taking the server down: a script that allocates
//! without end gets Luau's catchable memory error, and the game goes on.

use std::rc::Rc;
use std::sync::Arc;

use blox_datastore::DataStoreContext;
use blox_datastore::backend::{self, OpenOptions};
use blox_datastore::budget::Throttling;
use blox_engine::{Engine, ServerIdentity};
use blox_scheduler::RealClock;

#[test]
fn a_script_that_allocates_without_end_gets_a_memory_error() {
    let folder = tempfile::tempdir().unwrap();
    let database = tokio::runtime::Runtime::new().unwrap();
    let url = format!(
        "sqlite://{}",
        folder.path().join("limits.sqlite3").display()
    );
    let backend = database
        .block_on(backend::open(&url, &OpenOptions::default()))
        .unwrap();
    let vm = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    vm.block_on(async {
        let context = DataStoreContext::new(
            Arc::clone(&backend),
            database.handle().clone(),
            3,
            Throttling::Off,
        );
        let identity = ServerIdentity {
            place_id: 1,
            game_id: 3,
            job_id: blox_engine::new_guid(),
        };
        let engine = Engine::new(identity, context, Rc::new(RealClock::new())).unwrap();
        engine.set_memory_limit(64 << 20).unwrap();
        engine
            .start_script(
                "hog.server.luau",
                br#"
                local ok, err = pcall(function()
                    local hoard = {}
                    for i = 1, 1e9 do
                        hoard[i] = string.rep("x", 1000) .. i
                    end
                end)
                shared.caught = not ok and string.find(tostring(err), "memory") ~= nil
                task.wait(0.05)
                local after = {}
                for i = 1, 1000 do
                    after[i] = i
                end
                shared.survived = #after == 1000
                "#,
            )
            .unwrap();
        engine.run_until_idle().await;
        let shared: mlua::Table = engine.lua().globals().get("shared").unwrap();
        assert!(
            shared.get::<bool>("caught").unwrap(),
            "the memory error is catchable"
        );
        assert!(
            shared.get::<bool>("survived").unwrap(),
            "the script goes on afterwards"
        );
    });
}
