//! Players joining and leaving a running engine: `PlayerAdded` with a Player instance that
//! scripts can give leaderstats and attributes, `GetPlayers`, `GetPlayerByUserId`,
//! `PlayerRemoving` before the player leaves the tree, and `Kick`.

mod common;

use blox_engine::Engine;
use common::with_engine;

fn shared<T: mlua::FromLua>(engine: &Engine, name: &str) -> T {
    let shared: mlua::Table = engine.lua().globals().get("shared").unwrap();
    shared.get(name).unwrap()
}

#[test]
fn players_join_get_leaderstats_and_leave() {
    with_engine(async |engine| {
        engine
            .start_script(
                "players.server.luau",
                br#"
                local Players = game:GetService("Players")
                shared.log = {}
                Players.PlayerAdded:Connect(function(player)
                    local leaderstats = Instance.new("Folder")
                    leaderstats.Name = "leaderstats"
                    local money = Instance.new("IntValue")
                    money.Name = "Money"
                    money.Value = 100
                    money.Parent = leaderstats
                    leaderstats.Parent = player
                    player:SetAttribute("Joined", true)
                    table.insert(shared.log, "added " .. player.Name .. " " .. player.UserId)
                end)
                Players.PlayerRemoving:Connect(function(player)
                    table.insert(shared.log, "removing " .. player.Name .. " " .. player.leaderstats.Money.Value
                        .. " " .. tostring(player.Parent == Players))
                end)
                "#,
            )
            .unwrap();
        engine.run_until_idle().await;
        engine.add_player(1001, "builderman").unwrap();
        engine.add_player(1002, "guest").unwrap();
        engine.run_until_idle().await;
        engine
            .start_script(
                "check.server.luau",
                br#"
                local Players = game:GetService("Players")
                assert(#Players:GetPlayers() == 2)
                local player = Players:GetPlayerByUserId(1001)
                assert(player and player:IsA("Player") and player.Name == "builderman")
                assert(player.DisplayName == "builderman" and player.UserId == 1001)
                assert(player:GetAttribute("Joined") == true)
                assert(player.leaderstats.Money.Value == 100)
                assert(player:GetFullName() == "Players.builderman")
                assert(Players:GetPlayerByUserId(5) == nil)
                local budget = game:GetService("DataStoreService"):GetRequestBudgetForRequestType(Enum.DataStoreRequestType.OnUpdate)
                assert(budget == 40, "request budgets scale with the players: " .. budget)
                player.leaderstats.Money.Value = 250
                shared.checked = true
                "#,
            )
            .unwrap();
        engine.run_until_idle().await;
        assert!(shared::<bool>(engine, "checked"));

        engine.remove_player(1001).unwrap();
        engine.run_until_idle().await;
        assert_eq!(engine.players().len(), 1);
        assert!(engine.player(1001).is_none());

        engine
            .start_script(
                "kick.server.luau",
                br#"game:GetService("Players"):GetPlayerByUserId(1002):Kick("bye")"#,
            )
            .unwrap();
        engine.run_until_idle().await;
        assert!(engine.players().is_empty());
        let log: Vec<String> = shared(engine, "log");
        assert_eq!(
            log,
            [
                "added builderman 1001",
                "added guest 1002",
                "removing builderman 250 true",
                "removing guest 100 true",
            ]
        );
    });
}

#[test]
fn closing_removes_players_then_waits_for_bind_to_close_only() {
    with_engine(async |engine| {
        engine
            .start_script(
                "close.server.luau",
                br#"
                local Players = game:GetService("Players")
                shared.log = {}
                Players.PlayerRemoving:Connect(function(player)
                    table.insert(shared.log, "removing " .. player.Name)
                end)
                game:BindToClose(function()
                    table.insert(shared.log, "closing with " .. #Players:GetPlayers() .. " players")
                    task.wait(0.1)
                    table.insert(shared.log, "saved")
                end)
                game:BindToClose(function()
                    table.insert(shared.log, "second callback")
                end)
                task.spawn(function()
                    while true do
                        task.wait(0.05)
                    end
                end)
                "#,
            )
            .unwrap();
        engine.add_player(1, "first").unwrap();
        engine.add_player(2, "second").unwrap();
        let started = std::time::Instant::now();
        engine
            .close(std::time::Duration::from_secs(20))
            .await
            .unwrap();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "a running game loop does not hold the shutdown up to its deadline"
        );
        let log: Vec<String> = shared(engine, "log");
        assert_eq!(
            log,
            [
                "removing first",
                "removing second",
                "closing with 0 players",
                "second callback",
                "saved",
            ]
        );
    });
}

#[test]
fn players_who_left_and_dropped_instances_leave_the_tree() {
    with_engine(async |engine| {
        engine
            .start_script(
                "churn.server.luau",
                br#"
                game:GetService("Players").PlayerAdded:Connect(function(player)
                    local leaderstats = Instance.new("Folder")
                    leaderstats.Name = "leaderstats"
                    Instance.new("IntValue", leaderstats).Name = "Money"
                    leaderstats.Parent = player
                end)
                for i = 1, 100 do
                    local scratch = Instance.new("Model")
                    Instance.new("Folder", scratch)
                end
                shared.kept = Instance.new("Folder")
                "#,
            )
            .unwrap();
        engine.run_until_idle().await;
        let tree = blox_engine::Tree::of(engine.lua());
        let baseline = tree.instance_count();
        for user_id in 1..=200 {
            engine.add_player(user_id, "churn").unwrap();
            engine.remove_player(user_id).unwrap();
        }
        engine.run_until_idle().await;
        for _ in 0..3 {
            engine.lua().gc_collect().unwrap();
        }
        tree.sweep();
        assert!(
            tree.instance_count() <= baseline,
            "departed players and dropped instances are freed: {} instances now, {baseline} before",
            tree.instance_count()
        );
        engine
            .start_script(
                "kept.server.luau",
                br#"assert(shared.kept.ClassName == "Folder", "a referenced parentless instance stays")"#,
            )
            .unwrap();
        engine.run_until_idle().await;
        assert!(
            engine.scheduler().errors().is_empty(),
            "{:?}",
            engine.scheduler().errors()
        );
    });
}
