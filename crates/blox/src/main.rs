//! The `blox` command: runs Roblox server code (a script, a Rojo project or a place file) with
//! a persistent DataStoreService, once (`run`) or as a server players join (`serve`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
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
    /// Runs a game until every thread has finished: its server Scripts start at once.
    Run {
        /// A script (`game.server.luau`), a Rojo project (`default.project.json`, or its
        /// folder) or a place file (`.rbxl`, `.rbxlx`).
        game: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Serves a game that players join over WebSocket, until SIGINT or SIGTERM.
    Serve {
        /// What to serve, as for `run`. A project folder's `web/index.html` is served at `/`.
        game: PathBuf,
        /// The address to listen on (port 0 picks a free port).
        #[arg(long, env = "BLOX_LISTEN", default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
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
    /// PostgreSQL connections per server.
    #[arg(long, env = "BLOX_POSTGRES_POOL_SIZE", default_value_t = 8)]
    postgres_pool_size: u32,
    /// Keep every superseded DataStore version for 30 days, not only Roblox's hourly backups.
    #[arg(long, env = "BLOX_KEEP_ALL_VERSIONS")]
    keep_all_versions: bool,
    /// DataStore request budgets: `1` is Roblox's, a factor scales them, `off` removes them.
    #[arg(long, env = "BLOX_REQUEST_BUDGETS", default_value = "1")]
    request_budgets: Throttling,
    /// How many MiB the Luau heap may take before allocations fail (catchably).
    #[arg(long, env = "BLOX_MEMORY_LIMIT_MB", default_value_t = 2048)]
    memory_limit_mb: usize,
}

/// mimalloc instead of the C library's allocator: values are built on the database runtime's
/// threads and freed on the VM thread, and glibc's allocator takes a lock for every such
/// cross-thread free (BENCHMARKS.md, session 6: ~11% fewer instructions per GetAsync).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    let (Command::Run { game, server } | Command::Serve { game, server, .. }) = &cli.command;
    let place = blox_place::load(game)?;
    let options = OpenOptions {
        postgres_pool_size: server.postgres_pool_size,
        sqlite_sync: server.sqlite_sync,
        keep_all_versions: server.keep_all_versions,
        ..OpenOptions::default()
    };
    let host = Host::open(&server.database_url, &options)?
        .with_throttling(server.request_budgets)
        .with_memory_limit(server.memory_limit_mb << 20);
    let identity = ServerIdentity {
        place_id: server.place_id,
        game_id: server.game_id,
        job_id: blox_engine::new_guid().to_lowercase(),
    };
    let code = match &cli.command {
        Command::Run { .. } => {
            let outcome = host.run_place(identity, &place, shutdown_signal())?;
            if outcome.main_error.is_some() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Serve { listen, .. } => {
            let listener = std::net::TcpListener::bind(listen)
                .with_context(|| format!("cannot listen on {listen}"))?;
            let address = listener.local_addr()?;
            println!("listening on http://{address}");
            let _ = std::io::Write::flush(&mut std::io::stdout());
            let folder = if game.is_dir() {
                Some(game.as_path())
            } else {
                game.parent()
            };
            let page = folder
                .map(|folder| folder.join("web/index.html"))
                .filter(|page| page.is_file());
            host.serve(identity, &place, listener, page, shutdown_signal())?;
            ExitCode::SUCCESS
        }
    };
    host.shutdown(Duration::from_secs(10));
    Ok(code)
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
