//! Tests across real `blox` processes: persistence across restarts, durability under
//! `kill -9`, atomic read-modify-write between servers racing on one key, and how bad
//! configuration is reported. Each runs against a SQLite file and a PostgreSQL schema.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Output, Stdio};

use blox_testkit::{Scratch, TestDatabase};

fn blox_command(url: &str, game_id: i64, script: &str) -> (Command, tempfile::TempDir) {
    let folder = tempfile::tempdir().expect("temp folder");
    let path = folder.path().join("main.server.luau");
    std::fs::write(&path, script).expect("script written");
    let mut command = Command::new(env!("CARGO_BIN_EXE_blox"));
    command
        .arg("run")
        .arg(&path)
        .env("BLOX_DATABASE_URL", url)
        .env("BLOX_GAME_ID", game_id.to_string())
        .current_dir(folder.path());
    (command, folder)
}

fn run_blox(url: &str, game_id: i64, script: &str) -> Output {
    let (mut command, _folder) = blox_command(url, game_id, script);
    let output = command.output().expect("blox runs");
    assert!(
        output.status.success(),
        "blox failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

const SAVE: &str = r#"
local DataStoreService = game:GetService("DataStoreService")
local playerDataStore = DataStoreService:GetDataStore("PlayerData")
local player = { UserId = 123456 }
local success, errorMessage = pcall(function()
    playerDataStore:SetAsync(tostring(player.UserId), {Money = 1500, SpeedLevel = 2, CarryLevel = 1, RebirthCount = 1})
end)
assert(success, errorMessage)
local ok, err = pcall(function()
    DataStoreService:GetDataStore("TestStore"):SetAsync("player_123", {Money = 500, Level = 3})
end)
assert(ok, err)
print("job", game.JobId)
"#;

const LOAD: &str = r#"
local DataStoreService = game:GetService("DataStoreService")
local playerDataStore = DataStoreService:GetDataStore("PlayerData")
local player = { UserId = 123456 }
local success, data = pcall(function()
    return playerDataStore:GetAsync(tostring(player.UserId))
end)
assert(success, data)
print("player", data.Money, data.SpeedLevel, data.CarryLevel, data.RebirthCount)
local value = DataStoreService:GetDataStore("TestStore"):GetAsync("player_123")
print("test", value.Money, value.Level)
print("job", game.JobId)
"#;

fn persists_across_restart(database: TestDatabase) {
    let scratch = Scratch::new(database, "restart");
    let saved = stdout(&run_blox(&scratch.url, 7, SAVE));
    let loaded = stdout(&run_blox(&scratch.url, 7, LOAD));
    assert!(loaded.contains("player 1500 2 1 1"), "{loaded}");
    assert!(loaded.contains("test 500 3"), "{loaded}");
    let job = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("job "))
            .map(str::to_owned)
    };
    assert_ne!(job(&saved), job(&loaded), "every process has its own JobId");

    // Another game on the same database sees none of it.
    let other = stdout(&run_blox(
        &scratch.url,
        8,
        r#"print("other", game:GetService("DataStoreService"):GetDataStore("TestStore"):GetAsync("player_123"))"#,
    ));
    assert!(other.contains("other nil"), "{other}");
}

fn kill_after_set_loses_nothing(database: TestDatabase) {
    let scratch = Scratch::new(database, "kill");
    let (mut command, _folder) = blox_command(
        &scratch.url,
        7,
        r#"
        game:GetService("DataStoreService"):GetDataStore("Durable"):SetAsync("key", { Coins = 42 })
        print("saved")
        task.wait(600)
        "#,
    );
    let mut child = command.stdout(Stdio::piped()).spawn().expect("blox starts");
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let first = lines.next().expect("a line").expect("readable");
    assert_eq!(first, "saved");
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let loaded = stdout(&run_blox(
        &scratch.url,
        7,
        r#"print("coins", game:GetService("DataStoreService"):GetDataStore("Durable"):GetAsync("key").Coins)"#,
    ));
    assert!(loaded.contains("coins 42"), "{loaded}");
}

const SERVERS: usize = 4;
const ROUNDS: usize = 60;

fn servers_racing_on_one_key_lose_nothing(database: TestDatabase) {
    let scratch = Scratch::new(database, "race");
    // The servers start together on a fresh database, so they also race on migrations.
    let script = format!(
        r#"
        local store = game:GetService("DataStoreService"):GetDataStore("Race")
        local done = 0
        for _ = 1, {ROUNDS} do
            task.spawn(function()
                store:IncrementAsync("incremented", 1)
                store:UpdateAsync("updated", function(current)
                    return (current or 0) + 1
                end)
                done += 1
            end)
        end
        while done < {ROUNDS} do
            task.wait()
        end
        "#
    );
    let children: Vec<_> = (0..SERVERS)
        .map(|_| {
            let (mut command, folder) = blox_command(&scratch.url, 7, &script);
            let child = command
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("blox starts");
            (child, folder)
        })
        .collect();
    for (child, _folder) in children {
        let output = child.wait_with_output().expect("blox ends");
        assert!(
            output.status.success(),
            "a server failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let totals = stdout(&run_blox(
        &scratch.url,
        7,
        r#"
        local store = game:GetService("DataStoreService"):GetDataStore("Race")
        print("totals", store:GetAsync("incremented"), store:GetAsync("updated"))
        "#,
    ));
    let expected = SERVERS * ROUNDS;
    assert!(
        totals.contains(&format!("totals {expected} {expected}")),
        "expected {expected} each: {totals}"
    );
}

fn another_servers_write_shows_up_after_the_cache_window(database: TestDatabase) {
    let scratch = Scratch::new(database, "cache");
    run_blox(
        &scratch.url,
        7,
        r#"game:GetService("DataStoreService"):GetDataStore("Shared"):SetAsync("k", "old")"#,
    );
    let (mut command, _folder) = blox_command(
        &scratch.url,
        7,
        r#"
        local store = game:GetService("DataStoreService"):GetDataStore("Shared")
        print("first", (store:GetAsync("k")))
        task.wait(2)
        print("cached", (store:GetAsync("k")))
        task.wait(2.5)
        print("fresh", (store:GetAsync("k")))
        "#,
    );
    let mut reader = command.stdout(Stdio::piped()).spawn().expect("blox starts");
    let mut lines = BufReader::new(reader.stdout.take().expect("piped")).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "first old");
    run_blox(
        &scratch.url,
        7,
        r#"game:GetService("DataStoreService"):GetDataStore("Shared"):SetAsync("k", "new")"#,
    );
    assert_eq!(
        lines.next().unwrap().unwrap(),
        "cached old",
        "within 4 s the read is cached"
    );
    assert_eq!(
        lines.next().unwrap().unwrap(),
        "fresh new",
        "after 4 s the write shows"
    );
    assert!(reader.wait().unwrap().success());
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $name() { super::$name(super::TestDatabase::Sqlite); })*
        }
        mod postgres {
            $(#[test] fn $name() { super::$name(super::TestDatabase::Postgres); })*
        }
    };
}

on_both_backends!(
    persists_across_restart,
    kill_after_set_loses_nothing,
    servers_racing_on_one_key_lose_nothing,
    another_servers_write_shows_up_after_the_cache_window,
);

fn assert_clean_failure(url: &str, expected: &str) {
    let (mut command, _folder) = blox_command(url, 1, "print('never runs')");
    let output = command.output().expect("blox runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "blox should fail for {url}");
    assert_eq!(stderr.lines().count(), 1, "one line on stderr: {stderr}");
    assert!(
        stderr.starts_with("blox: ") && stderr.contains(expected),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked") && stdout(&output).is_empty());
}

#[test]
fn bad_configuration_is_one_clear_line() {
    assert_clean_failure("postgres://postgres@127.0.0.1:1/test", "Connection refused");
    assert_clean_failure("mysql://localhost/db", "invalid database URL");
    assert_clean_failure(
        "postgres://postgres@127.0.0.1:5432/test?sslmode=bogus",
        "invalid database URL",
    );
    let folder = tempfile::tempdir().unwrap();
    let file = folder.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    assert_clean_failure(
        &format!("sqlite://{}/datastore.sqlite3", file.display()),
        "cannot use the database file",
    );
}

#[test]
fn exit_status_follows_the_main_chunk() {
    let scratch = Scratch::new(TestDatabase::Sqlite, "exit");
    let (mut failing, _a) = blox_command(
        &scratch.url,
        1,
        "task.spawn(function() task.wait(0.05) print('spawned finished') end)\nlocal function explode() error('main failed') end\nexplode()",
    );
    let output = failing.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("main.server.luau:2: main failed"),
        "{stderr}"
    );
    assert!(
        stderr.contains("Stack Begin") && stderr.contains("explode"),
        "{stderr}"
    );
    assert!(
        stdout(&output).contains("spawned finished"),
        "other threads run on"
    );

    let (mut syntax, _b) = blox_command(&scratch.url, 1, "local = 1");
    let output = syntax.output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("main.server.luau:1"));

    let (mut spawned_error, _c) = blox_command(
        &scratch.url,
        1,
        "task.spawn(function() error('only a spawned thread') end)\nprint('main done')",
    );
    let output = spawned_error.output().unwrap();
    assert!(
        output.status.success(),
        "an error in a spawned thread does not fail the run"
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("only a spawned thread"));
}

#[test]
fn the_readme_example_remembers_across_runs() {
    let scratch = Scratch::new(TestDatabase::Sqlite, "example");
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/player_data.server.luau"),
    )
    .unwrap();
    let first = stdout(&run_blox(&scratch.url, 1, &example));
    assert!(
        first.contains("Money=0 SpeedLevel=1") && first.contains("started 1 time"),
        "{first}"
    );
    let second = stdout(&run_blox(&scratch.url, 1, &example));
    assert!(
        second.contains("Loaded Builderman: Money=500 SpeedLevel=2"),
        "{second}"
    );
    assert!(second.contains("started 2 time"), "{second}");
}

#[test]
fn sqlite_is_the_default_under_the_working_folder() {
    let folder = tempfile::tempdir().unwrap();
    let script = folder.path().join("main.server.luau");
    std::fs::write(
        &script,
        r#"print((game:GetService("DataStoreService"):GetDataStore("D"):IncrementAsync("n")))"#,
    )
    .unwrap();
    for expected in ["1", "2"] {
        let output = Command::new(env!("CARGO_BIN_EXE_blox"))
            .arg("run")
            .arg(&script)
            .env_remove("BLOX_DATABASE_URL")
            .current_dir(folder.path())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(stdout(&output).trim(), expected);
    }
    assert!(folder.path().join(".blox/datastore.sqlite3").exists());
}

#[test]
fn blox_run_takes_projects_and_place_files() {
    let scratch = Scratch::new(TestDatabase::Sqlite, "run_kinds");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let project = Command::new(env!("CARGO_BIN_EXE_blox"))
        .arg("run")
        .arg(root.join("tests/projects/modules"))
        .env("BLOX_DATABASE_URL", &scratch.url)
        .output()
        .expect("blox runs");
    assert!(
        project.status.success(),
        "{}",
        String::from_utf8_lossy(&project.stderr)
    );
    assert!(stdout(&project).contains("modules project passed"));

    // A place file as Studio saves it: a Script in ServerScriptService that requires a
    // ModuleScript in ReplicatedStorage.
    use rbx_dom_weak::types::Variant;
    use rbx_dom_weak::{InstanceBuilder, WeakDom};
    let mut place = WeakDom::new(InstanceBuilder::new("DataModel"));
    let root_ref = place.root_ref();
    let storage = place.insert(
        root_ref,
        InstanceBuilder::new("ReplicatedStorage").with_name("ReplicatedStorage"),
    );
    place.insert(
        storage,
        InstanceBuilder::new("ModuleScript")
            .with_name("Greeting")
            .with_property(
                "Source",
                Variant::String("return 'hello from a place file'".to_owned()),
            ),
    );
    let scripts = place.insert(
        root_ref,
        InstanceBuilder::new("ServerScriptService").with_name("ServerScriptService"),
    );
    place.insert(
        scripts,
        InstanceBuilder::new("Script")
            .with_name("Main")
            .with_property(
                "Source",
                Variant::String(
                    "print(require(game.ReplicatedStorage.Greeting), script:GetFullName())"
                        .to_owned(),
                ),
            ),
    );
    let folder = tempfile::tempdir().unwrap();
    let file = folder.path().join("game.rbxlx");
    let services = place.root().children().to_vec();
    rbx_xml::to_writer_default(std::fs::File::create(&file).unwrap(), &place, &services).unwrap();
    let placed = Command::new(env!("CARGO_BIN_EXE_blox"))
        .arg("run")
        .arg(&file)
        .env("BLOX_DATABASE_URL", &scratch.url)
        .output()
        .expect("blox runs");
    assert!(
        placed.status.success(),
        "{}",
        String::from_utf8_lossy(&placed.stderr)
    );
    assert!(
        stdout(&placed).contains("hello from a place file ServerScriptService.Main"),
        "{}",
        stdout(&placed)
    );

    let unknown = Command::new(env!("CARGO_BIN_EXE_blox"))
        .arg("run")
        .arg(folder.path().join("notes.md"))
        .env("BLOX_DATABASE_URL", &scratch.url)
        .output()
        .expect("blox runs");
    assert!(!unknown.status.success());
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        stderr.starts_with("blox: ") && stderr.lines().count() == 1,
        "{stderr}"
    );
}
