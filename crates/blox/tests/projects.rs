//! Rojo projects through the real host: every server Script starts, ModuleScripts load on
//! `require` (by instance and by string), and the project's own assertions pass.

use std::time::Duration;

use blox::Host;
use blox_datastore::backend::OpenOptions;
use blox_engine::ServerIdentity;
use blox_testkit::{Scratch, TestDatabase};

#[test]
fn the_modules_project_runs_its_scripts_and_modules() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/projects/modules");
    let place = blox_place::load(&path).expect("the project loads");
    let scratch = Scratch::new(TestDatabase::Sqlite, "modules_project");
    let host = Host::open(&scratch.url, &OpenOptions::default()).expect("database opens");
    let identity = ServerIdentity {
        place_id: 1,
        game_id: 1,
        job_id: blox_engine::new_guid(),
    };
    let outcome = host
        .run_place(identity, &place, async {
            tokio::time::sleep(Duration::from_secs(60)).await;
        })
        .expect("the place runs");
    let errors: Vec<String> = outcome
        .thread_errors
        .iter()
        .map(|error| format!("{}\n{}", error.message, error.traceback))
        .collect();
    assert!(errors.is_empty(), "{}", errors.join("\n\n"));
    assert_eq!(
        outcome.scripts_started, 2,
        "main and Workspace.Spinner; not the disabled one"
    );
    host.shutdown(Duration::from_secs(5));
}
