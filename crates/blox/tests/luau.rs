//! Luau behaviour tests: every `tests/luau/*.luau` script runs through the real runtime against
//! a real SQLite file and a real PostgreSQL schema. A script passes when its main chunk and
//! every thread it started finish without error within the time limit.
//!
//! Scripts run without request budgets (as a self-hoster's server with `--request-budgets
//! off`), so their timing does not depend on Roblox's throttling; a script opts into server
//! settings with leading `-- blox-test: ...` lines: `roblox-budgets` for Roblox's budgets and
//! queues, `keep-all-versions` to keep every version, `hand-edited-row` to find a row that
//! Blox did not write (key `edited` of the store `HandEdited`, holding text that is not JSON)
//! before it starts.

use std::time::Duration;

use blox::Host;
use blox_datastore::backend::{EntryKey, OpenOptions, StoreKind, Write};
use blox_datastore::budget::Throttling;
use blox_engine::ServerIdentity;
use blox_testkit::{Scratch, TestDatabase};

const TIME_LIMIT: Duration = Duration::from_secs(120);
const GAME_ID: i64 = 2002;

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
    if directives.contains(&"hand-edited-row") {
        let key = EntryKey {
            universe: GAME_ID,
            kind: StoreKind::Standard,
            store: "HandEdited".to_owned(),
            scope: "global".to_owned(),
            key: "edited".to_owned(),
        };
        let row = Write {
            value: r#"{"Money":"#.to_owned(),
            user_ids: "[]".to_owned(),
            metadata: "{}".to_owned(),
            deleted: false,
            now_ms: 1_000,
        };
        host.database_runtime()
            .block_on(host.backend().write(&key, &row))
            .expect("the row is written");
    }
    let identity = ServerIdentity {
        place_id: 1001,
        game_id: GAME_ID,
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
