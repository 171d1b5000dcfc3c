//! Runaway scripts meet limits instead of taking the server down: a script that allocates
//! without end gets Luau's catchable memory error, and the game goes on.

mod common;

use common::with_engine;

#[test]
fn a_script_that_allocates_without_end_gets_a_memory_error() {
    with_engine(async |engine| {
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
