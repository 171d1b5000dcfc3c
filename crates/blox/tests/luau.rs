//! Luau behaviour tests: every `tests/luau/*.luau` script runs through the real runtime against
//! a real SQLite file and a real PostgreSQL schema. A script passes when its main chunk and
//! every thread it started finish without error within the time limit.
//!
//! Scripts run without request budgets (as a self-hoster's server with `--request-budgets
//! off`), so their timing does not depend on Roblox's throttling; a script opts into server
//! settings with leading `-- blox-test: ...` lines: `roblox-budgets` for Roblox's budgets and
//! queues, `keep-all-versions` to keep every version.

use std::time::Duration;

use blox::Host;
use blox_datastore::backend::OpenOptions;
use blox_datastore::budget::Throttling;
use blox_engine::ServerIdentity;
use blox_testkit::{Scratch, TestDatabase};

const TIME_LIMIT: Duration = Duration::from_secs(120);

fn run_luau_test(name: &str, database: TestDatabase) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/luau")
        .join(format!("{name}.luau"));
    let source = std::fs::read(&path).expect("the script exists");
    let scratch = Scratch::new(database, name);
    let directives = test_directives(&source);
    let options = OpenOptions {
        keep_all_versions: directives.contains(&"keep-all-versions"),
        ..OpenOptions::default()
    };
    let throttling = if directives.contains(&"roblox-budgets") {
        Throttling::default()
    } else {
        Throttling::Off
    };
    let host = Host::open(&scratch.url, &options)
        .expect("database opens")
        .with_throttling(throttling);
    let identity = ServerIdentity {
        place_id: 1001,
        game_id: 2002,
        job_id: blox_engine::new_guid(),
    };
    let timed_out = std::rc::Rc::new(std::cell::Cell::new(false));
    let flag = std::rc::Rc::clone(&timed_out);
    let place = blox_place::load(&path).expect("the script loads");
    let outcome = host
        .run_place(identity, &place, async move {
            tokio::time::sleep(TIME_LIMIT).await;
            flag.set(true);
        })
        .expect("the script starts");
    assert_eq!(outcome.scripts_started, 1, "{name} ran as a Script");
    assert!(
        !timed_out.get(),
        "{name} did not finish within {TIME_LIMIT:?}"
    );
    let failures: Vec<String> = outcome
        .thread_errors
        .iter()
        .map(|error| format!("{}\n{}", error.message, error.traceback))
        .collect();
    assert!(
        failures.is_empty(),
        "{name} failed:\n{}",
        failures.join("\n\n")
    );
    host.shutdown(Duration::from_secs(5));
}

/// The settings named on the script's leading `-- blox-test: ...` lines.
fn test_directives(source: &[u8]) -> Vec<&str> {
    std::str::from_utf8(source)
        .unwrap_or_default()
        .lines()
        .map_while(|line| line.strip_prefix("-- blox-test:"))
        .flat_map(|names| names.split(',').map(str::trim))
        .collect()
}

include!(concat!(env!("OUT_DIR"), "/luau_tests.rs"));
