//! The `blox` command: runs Roblox server scripts with a persistent DataStoreService.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use blox::{DEFAULT_DATABASE_URL, Host};
use blox_datastore::backend::{OpenOptions, SqliteSync};
use blox_datastore::budget::Throttling;
use blox_engine::ServerIdentity;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a Luau file as a server Script until every thread has finished.
    Run {
        /// The script, e.g. `game.server.luau`.
        script: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Args)]
struct ServerArgs {
    /// Where DataStore data lives: `sqlite://PATH` or `postgres://USER@HOST/DB`.
    #[arg(long, env = "BLOX_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    database_url: String,
    /// `game.PlaceId`, shared by every server of the place.
    #[arg(long, env = "BLOX_PLACE_ID", default_value_t = 1)]
    place_id: i64,
    /// `game.GameId`: the universe whose data the server reads and writes.
    #[arg(long, env = "BLOX_GAME_ID", default_value_t = 1)]
    game_id: i64,
    /// SQLite durability: `normal` survives a crash, `full` also a power loss.
    #[arg(long, env = "BLOX_SQLITE_SYNC", default_value = "normal")]
    sqlite_sync: SqliteSync,
    /// Connections in the PostgreSQL pool.
    #[arg(long, env = "BLOX_POSTGRES_POOL_SIZE", default_value_t = 8)]
    postgres_pool_size: u32,
    /// Keep every superseded DataStore version for 30 days, not only Roblox's hourly backups.
    #[arg(long, env = "BLOX_KEEP_ALL_VERSIONS")]
    keep_all_versions: bool,
    /// DataStore request budgets: `1` is Roblox's, a factor scales them, `off` removes them.
    #[arg(long, env = "BLOX_REQUEST_BUDGETS", default_value = "1")]
    request_budgets: Throttling,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BLOX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("blox: {}", describe(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, leaving out causes the text already holds (sqlx
/// repeats the database's message in its own).
fn describe(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let Command::Run { script, server } = cli.command;
    let place = blox_place::load(&script)?;
    let options = OpenOptions {
        postgres_pool_size: server.postgres_pool_size,
        sqlite_sync: server.sqlite_sync,
        keep_all_versions: server.keep_all_versions,
        ..OpenOptions::default()
    };
    let host = Host::open(&server.database_url, &options)?.with_throttling(server.request_budgets);
    let identity = ServerIdentity {
        place_id: server.place_id,
        game_id: server.game_id,
        job_id: blox_engine::new_guid().to_lowercase(),
    };
    let outcome = host.run_place(identity, &place, shutdown_signal())?;
    host.shutdown(Duration::from_secs(10));
    Ok(if outcome.main_error.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Completes on the first SIGINT or SIGTERM; a second one ends the process at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    tracing::info!("shutting down: running BindToClose callbacks (signal again to force)");
    std::thread::spawn(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        if let Ok(runtime) = runtime {
            runtime.block_on(wait_for_signal());
            std::process::exit(130);
        }
    });
}

async fn wait_for_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
