//! `blox serve` end to end, as separate processes: the tycoon example served over HTTP and
//! WebSocket, players joining, earning and buying, leaving and rejoining, and the server
//! restarting (SIGTERM, then a new process) without losing anything; and two servers of one
//! game on one database, with messages and player data crossing between them. Runs on SQLite
//! and on PostgreSQL.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use blox_testkit::{Scratch, TestDatabase};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Server {
    child: Child,
    address: String,
}

impl Server {
    fn start(url: &str) -> Server {
        Server::start_game(url, "examples/tycoon")
    }

    fn start_game(url: &str, game: &str) -> Server {
        let game = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(game);
        let mut child = Command::new(env!("CARGO_BIN_EXE_blox"))
            .arg("serve")
            .arg(&game)
            .args(["--listen", "127.0.0.1:0"])
            .env("BLOX_DATABASE_URL", url)
            .env("BLOX_GAME_ID", "77")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("blox serve starts");
        let mut first_line = String::new();
        BufReader::new(child.stdout.take().expect("stdout is piped"))
            .read_line(&mut first_line)
            .expect("blox serve prints its address");
        let address = first_line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {first_line:?}"))
            .to_owned();
        Server { child, address }
    }

    /// SIGTERM, then waits for a clean exit.
    fn stop(mut self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success());
        let exit = self.child.wait().expect("blox serve exits");
        assert!(exit.success(), "blox serve exits 0 after SIGTERM: {exit}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

async fn join(server: &Server, user_id: i64) -> Socket {
    let url = format!(
        "ws://{}/ws?userId={user_id}&name=player{user_id}",
        server.address
    );
    let (socket, _) = tokio_tungstenite::connect_async(url).await.expect("joins");
    socket
}

/// Reads messages until a State in which the player's data has loaded and `check` holds.
async fn state_where(
    socket: &mut Socket,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .expect("the expected state arrives in time")
            .expect("the socket stays open")
            .expect("a message");
        let Message::Text(text) = message else {
            continue;
        };
        let data: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        if data["type"] == "State" && data["attributes"]["Loaded"] == true && check(&data) {
            return data;
        }
    }
}

async fn act(socket: &mut Socket, action: &str) {
    let message = serde_json::json!({
        "type": "FireServer",
        "remote": "ReplicatedStorage.Remotes.Action",
        "args": [action],
    });
    socket
        .send(Message::Text(message.to_string().into()))
        .await
        .expect("sends");
}

fn stat(state: &serde_json::Value, name: &str) -> i64 {
    state["leaderstats"][name].as_i64().unwrap_or(-1)
}

async fn play(database: TestDatabase) {
    let scratch = Scratch::new(database, "serve_tycoon");
    let server = Server::start(&scratch.url);

    let health: serde_json::Value = {
        let mut stream = tokio::net::TcpStream::connect(&server.address)
            .await
            .unwrap();
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
        serde_json::from_str(body).expect("health is JSON")
    };
    assert_eq!(health["status"], "ok");
    assert!(health["jobId"].as_str().is_some_and(|id| id.len() == 36));

    // A new player starts from the defaults, earns, and buys a speed upgrade.
    let mut socket = join(&server, 1001).await;
    let fresh = state_where(&mut socket, |_| true).await;
    assert_eq!(stat(&fresh, "Money"), 0);
    assert_eq!(stat(&fresh, "SpeedLevel"), 1);
    for _ in 0..12 {
        act(&mut socket, "earn").await;
    }
    state_where(&mut socket, |s| stat(s, "Money") == 120).await;
    act(&mut socket, "buySpeed").await;
    let bought = state_where(&mut socket, |s| stat(s, "SpeedLevel") == 2).await;
    assert_eq!(stat(&bought, "Money"), 20);
    act(&mut socket, "rebirth").await; // not enough money: the server refuses
    act(&mut socket, "earn").await;
    let earned = state_where(&mut socket, |s| stat(s, "Money") == 40).await;
    assert_eq!(stat(&earned, "RebirthCount"), 0);

    // A RemoteFunction answers through InvokeServer.
    let invoke = serde_json::json!({
        "type": "InvokeServer",
        "id": 7,
        "remote": "ReplicatedStorage.Remotes.GetPrices",
        "args": [],
    });
    socket
        .send(Message::Text(invoke.to_string().into()))
        .await
        .unwrap();
    let prices = next_of(&mut socket, "InvokeResult").await;
    assert_eq!(prices["id"], 7);
    assert_eq!(prices["ok"], true);
    assert_eq!(prices["results"][0]["speed"], 200, "{prices}");
    assert_eq!(prices["results"][0]["earn"], 20, "{prices}");

    // Garbage is dropped without hurting the game.
    socket
        .send(Message::Text("{not json".into()))
        .await
        .unwrap();
    let unknown =
        serde_json::json!({ "type": "FireServer", "remote": "Nowhere.Remote", "args": [] });
    socket
        .send(Message::Text(unknown.to_string().into()))
        .await
        .unwrap();

    // A second connection of the same user replaces the first, as a second Roblox login does.
    let mut second = join(&server, 1001).await;
    let kicked = next_of(&mut socket, "Kicked").await;
    assert!(
        kicked["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Same account launched experience")),
        "{kicked}"
    );
    let replaced = state_where(&mut second, |_| true).await;
    assert_eq!(
        stat(&replaced, "Money"),
        40,
        "saved when the first connection was replaced"
    );
    let socket = &mut second;
    let rejected =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?userId=abc", server.address)).await;
    assert!(rejected.is_err(), "a user id must be a positive integer");

    // Leave and come back: the data was saved on PlayerRemoving.
    socket.close(None).await.unwrap();
    drop(second);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut socket = join(&server, 1001).await;
    let back = state_where(&mut socket, |_| true).await;
    assert_eq!((stat(&back, "Money"), stat(&back, "SpeedLevel")), (40, 2));
    act(&mut socket, "earn").await;
    state_where(&mut socket, |s| stat(s, "Money") == 60).await;

    // Restart the server while the player is in the game: BindToClose saves them.
    server.stop();
    drop(socket);
    let server = Server::start(&scratch.url);
    let mut socket = join(&server, 1001).await;
    let restarted = state_where(&mut socket, |_| true).await;
    assert_eq!(
        (stat(&restarted, "Money"), stat(&restarted, "SpeedLevel")),
        (60, 2),
        "nothing lost across a restart"
    );
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_tycoon_survives_leaving_and_restarts() {
    play(TestDatabase::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tycoon_survives_leaving_and_restarts() {
    play(TestDatabase::Postgres).await;
}

/// The next message of `kind`, skipping others.
async fn next_of(socket: &mut Socket, kind: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .unwrap_or_else(|_| panic!("a {kind} message arrives in time"))
            .expect("the socket stays open")
            .expect("a message");
        let Message::Text(text) = message else {
            continue;
        };
        let data: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        if data["type"] == kind {
            return data;
        }
    }
}

async fn fire(socket: &mut Socket, remote: &str, args: serde_json::Value) {
    let message = serde_json::json!({ "type": "FireServer", "remote": remote, "args": args });
    socket
        .send(Message::Text(message.to_string().into()))
        .await
        .expect("sends");
}

async fn two_servers(database: TestDatabase) {
    let scratch = Scratch::new(database, "serve_two_servers");
    let first = Server::start_game(&scratch.url, "tests/projects/crossserver");
    let second = Server::start_game(&scratch.url, "tests/projects/crossserver");

    let mut alice = join(&first, 1).await;
    let mut bob = join(&second, 2).await;
    let alice_state = state_where(&mut alice, |_| true).await;
    let bob_state = state_where(&mut bob, |_| true).await;
    let (first_job, second_job) = (
        alice_state["attributes"]["JobId"].clone(),
        bob_state["attributes"]["JobId"].clone(),
    );
    assert!(
        first_job.is_string() && first_job != second_job,
        "each server has its own JobId"
    );

    // Datatypes cross the socket in their rojo-rbx serde form, both ways.
    assert_eq!(
        alice_state["attributes"]["Home"],
        serde_json::json!({ "$datatype": { "Vector3": [1.0, 2.0, 3.0] } })
    );
    let sent = serde_json::json!([
        { "$datatype": { "Vector3": [1.0, 2.0, 3.0] } },
        { "$datatype": { "Color3": [1.0, 0.0, 0.0] } },
        "plain",
        { "nested": { "$datatype": { "Vector2": [4.0, 5.0] } }, "places": [{ "$instance": "Workspace" }, 7] },
    ]);
    fire(&mut alice, "ReplicatedStorage.Remotes.Echo", sent.clone()).await;
    let echoed = next_of(&mut alice, "OnClientEvent").await;
    assert_eq!(echoed["remote"], "ReplicatedStorage.Remotes.Echo");
    assert_eq!(echoed["args"], sent);

    // Chat published on the first server reaches clients of both.
    fire(
        &mut alice,
        "ReplicatedStorage.Remotes.Say",
        serde_json::json!(["hello"]),
    )
    .await;
    for socket in [&mut bob, &mut alice] {
        let heard = next_of(socket, "OnClientEvent").await;
        assert_eq!(heard["remote"], "ReplicatedStorage.Remotes.Heard");
        assert_eq!(
            heard["args"],
            serde_json::json!(["player1", "hello", first_job])
        );
    }

    // Coins earned on the first server are there when the player moves to the second.
    fire(
        &mut alice,
        "ReplicatedStorage.Remotes.Earn",
        serde_json::json!([]),
    )
    .await;
    fire(
        &mut alice,
        "ReplicatedStorage.Remotes.Earn",
        serde_json::json!([]),
    )
    .await;
    state_where(&mut alice, |s| s["attributes"]["Coins"] == 2).await;
    alice.close(None).await.unwrap();
    drop(alice);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut alice = join(&second, 1).await;
    let moved = state_where(&mut alice, |_| true).await;
    assert_eq!(moved["attributes"]["Coins"], 2);
    assert_eq!(moved["attributes"]["JobId"], second_job);
    drop(alice);
    drop(bob);
    first.stop();
    second.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_two_servers_share_messages_and_data() {
    two_servers(TestDatabase::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_servers_share_messages_and_data() {
    two_servers(TestDatabase::Postgres).await;
}
