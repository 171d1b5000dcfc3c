//! `OnUpdate` across servers: a write on another server reaches this server's callbacks at
//! the next once-a-minute poll, under a manual clock, while this server's own writes fire at
//! once and are not reported twice.

mod common;

use std::rc::Rc;
use std::time::Duration;

use blox_engine::Engine;
use blox_scheduler::{ManualClock, RealClock};

/// What the watching script recorded in `shared.seen`.
fn recorded<T: mlua::FromLua>(engine: &Engine) -> Vec<T> {
    let shared: mlua::Table = engine.lua().globals().get("shared").unwrap();
    shared.get("seen").unwrap()
}

fn seen(engine: &Engine) -> Vec<f64> {
    recorded(engine)
}

/// The callback values a script recorded as text (`nil` included).
fn events(engine: &Engine) -> Vec<String> {
    recorded(engine)
}

/// Starts a script on `engine` that sets key `k` of the data store `store` to `value`.
fn set_with_script(engine: &Engine, store: &str, value: i64) {
    let source = format!(
        r#"game:GetService("DataStoreService"):GetDataStore("{store}"):SetAsync("k", {value})"#
    );
    engine
        .start_script("write.server.luau", source.as_bytes())
        .unwrap();
}

/// Steps the watcher's frames (its clock standing still) until `done`, for at most `limit` of
/// real time (the database answers polls in milliseconds).
async fn frames_until(engine: &Engine, limit: Duration, done: impl Fn(&Engine) -> bool) {
    for _ in 0..limit.as_millis() / 10 {
        engine.scheduler().step_frame(engine.lua());
        if done(engine) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn other_servers_writes_reach_on_update_within_a_minute() {
    common::on_vm_thread(async |database| {
        let clock = Rc::new(ManualClock::default());
        let watcher = database.engine(clock.clone());
        let writer = database.engine(Rc::new(RealClock::new()));
        watcher
            .start_script(
                "watch.server.luau",
                br#"
                shared.seen = {}
                local store = game:GetService("DataStoreService"):GetDataStore("Watched")
                store:OnUpdate("k", function(value, info)
                    assert(typeof(info) == "Instance")
                    table.insert(shared.seen, value)
                end)
                "#,
            )
            .unwrap();
        // The first poll only records where the key stands.
        frames_until(&watcher, Duration::from_secs(1), |_| false).await;
        assert!(seen(&watcher).is_empty());

        set_with_script(&writer, "Watched", 5);
        writer.run_until_idle().await;

        clock.advance(Duration::from_secs(30));
        frames_until(&watcher, Duration::from_secs(1), |engine| {
            !seen(engine).is_empty()
        })
        .await;
        assert!(seen(&watcher).is_empty(), "not before the minute is up");

        clock.advance(Duration::from_secs(31));
        frames_until(&watcher, Duration::from_secs(10), |engine| {
            !seen(engine).is_empty()
        })
        .await;
        assert_eq!(
            seen(&watcher),
            [5.0],
            "the other server's write, after a minute"
        );

        // This server's own write fires at once, and the next poll does not repeat it.
        set_with_script(&watcher, "Watched", 6);
        frames_until(&watcher, Duration::from_secs(10), |engine| {
            seen(engine).len() == 2
        })
        .await;
        assert_eq!(seen(&watcher), [5.0, 6.0]);
        clock.advance(Duration::from_secs(61));
        frames_until(&watcher, Duration::from_secs(1), |engine| {
            seen(engine).len() > 2
        })
        .await;
        assert_eq!(
            seen(&watcher),
            [5.0, 6.0],
            "no second report of a write this server made"
        );
    });
}

/// A poll reads on the database runtime while scripts go on writing. A write this server makes
/// after the poll read its key must win over the poll's older answer: the callbacks saw the
/// write at once and must not then hear that the key went back (found in CI, where a first
/// poll that read the key as absent fired a `nil` after the script's own writes).
#[test]
fn a_poll_older_than_this_servers_own_write_reports_nothing() {
    common::on_vm_thread(async |database| {
        let watcher = database.engine(Rc::new(ManualClock::default()));
        watcher
            .start_script(
                "watch.server.luau",
                br#"
                shared.seen = {}
                game:GetService("DataStoreService"):GetDataStore("Raced"):OnUpdate("k", function(value)
                    table.insert(shared.seen, tostring(value))
                end)
                "#,
            )
            .unwrap();
        // One frame starts the first poll; the database answers it (the key is absent) well
        // within the pause, before the script below writes the key.
        watcher.scheduler().step_frame(watcher.lua());
        tokio::time::sleep(Duration::from_millis(300)).await;
        set_with_script(&watcher, "Raced", 1);
        watcher.run_until_idle().await;
        assert_eq!(events(&watcher), ["1"], "the own write fires at once");
        frames_until(&watcher, Duration::from_secs(1), |engine| {
            events(engine).len() > 1
        })
        .await;
        assert_eq!(
            events(&watcher),
            ["1"],
            "the poll's older answer is not a change"
        );
    });
}
