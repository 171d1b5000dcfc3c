//! `blox-bench`: DataStore calls from Luau against raw sqlx, in one run, on one database.
//!
//! For each operation (GetAsync, SetAsync, UpdateAsync, IncrementAsync) and each concurrency,
//! it runs the calls from that many Luau coroutines through the real engine, then runs the
//! same SQL statements from as many Tokio tasks with raw sqlx, on pools of the same size, for
//! the same time. The ratio of the two rates is the cost of everything Blox adds (Luau, the
//! codec, validation, the scheduler, the hop between runtimes). While the Luau load runs, a
//! Luau thread measures how late `task.wait()` resumes, the timer lag scripts would feel.
//! GetAsync runs with `UseCache = false`: the point is the database path, not cache hits.

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use blox::Host;
use blox_datastore::DataStoreContext;
use blox_datastore::backend::{
    EntryKey, OpenOptions, Statements, StoreKind, Write, postgres, sqlite,
};
use blox_datastore::budget::Throttling;
use blox_engine::{Engine, ServerIdentity};
use blox_scheduler::{FRAME, RealClock};
use clap::{Parser, ValueEnum};
use sqlx::{Database, Pool};

const UNIVERSE: i64 = 424_242;
const KEYS: usize = 1000;
const STORE: &str = "Bench";
const PLAYER: &str = r#"{"CarryLevel":1,"Inventory":["sword","shield","potion"],"Money":1500,"Name":"Builderman","RebirthCount":1,"SpeedLevel":2}"#;

#[derive(Parser)]
#[command(about)]
struct Args {
    /// The database to measure: `sqlite://PATH` or `postgres://...`.
    #[arg(
        long,
        env = "BLOX_DATABASE_URL",
        default_value = "sqlite://target/bench/bench.sqlite3"
    )]
    database_url: String,
    /// Concurrent coroutines (and raw sqlx tasks) per measurement.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,1000")]
    concurrency: Vec<usize>,
    /// Operations to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "get,set,update,increment"
    )]
    ops: Vec<Op>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Store sizes for the listing benchmark (ListKeysAsync pages deep in large stores),
    /// e.g. `10000,1000000`; none by default.
    #[arg(long, value_delimiter = ',')]
    listing_sizes: Vec<usize>,
    /// Alternating Luau and sqlx measurements per cell; the table reports the medians, so
    /// drift on a shared machine hits both sides alike.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Connections in the PostgreSQL pool (both sides).
    #[arg(long, default_value_t = 8)]
    postgres_pool_size: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum Op {
    Get,
    Set,
    Update,
    Increment,
}

impl Op {
    fn luau_call(self) -> &'static str {
        match self {
            Op::Get => "store:GetAsync(key, fromDatabase)",
            Op::Set => "store:SetAsync(key, player)",
            Op::Update => "store:UpdateAsync(key, keep)",
            Op::Increment => "store:IncrementAsync(counter, 1)",
        }
    }
}

/// Throughput and latency of one measurement.
struct Stats {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Stats {
    fn from(mut latencies: Vec<f64>, elapsed: f64) -> Self {
        latencies.sort_by(f64::total_cmp);
        Stats {
            rate: latencies.len() as f64 / elapsed,
            p50_ms: percentile(&latencies, 0.50) * 1000.0,
            p99_ms: percentile(&latencies, 0.99) * 1000.0,
        }
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(folder) = args
        .database_url
        .strip_prefix("sqlite://")
        .and_then(|path| std::path::Path::new(path).parent())
    {
        std::fs::create_dir_all(folder)?;
    }
    let options = OpenOptions {
        postgres_pool_size: args.postgres_pool_size,
        ..OpenOptions::default()
    };
    let host = Host::open(&args.database_url, &options).context("opening the database")?;
    let runtime = host.database_runtime();
    runtime.block_on(seed(&host))?;
    let raw = runtime.block_on(RawPools::open(&args.database_url, args.postgres_pool_size))?;

    println!(
        "| op | coroutines | Luau ops/s | Luau p50 ms | Luau p99 ms | sqlx ops/s | sqlx p50 ms | sqlx p99 ms | Luau/sqlx | timer lag p99 ms | timer lag max ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    if !args.listing_sizes.is_empty() {
        println!("| store keys | ListKeysAsync + next page /s | p50 ms | p99 ms |");
        println!("|---:|---:|---:|---:|");
        for &size in &args.listing_sizes {
            runtime.block_on(raw.seed_listing(size))?;
            let stats = run_listing(&host, size, args.seconds)?;
            println!(
                "| {size} | {:.0} | {:.2} | {:.2} |",
                stats.rate, stats.p50_ms, stats.p99_ms
            );
        }
        println!();
    }
    for &op in &args.ops {
        for &concurrency in &args.concurrency {
            let mut luau_runs = Vec::new();
            let mut sqlx_runs = Vec::new();
            for _ in 0..args.rounds.max(1) {
                sqlx_runs.push(runtime.block_on(raw.run(op, concurrency, args.seconds))?);
                luau_runs.push(run_luau(&host, op, concurrency, args.seconds)?);
            }
            let (luau, lag_p99, lag_max) = median_by_rate(luau_runs, |run| run.0.rate);
            let sqlx = median_by_rate(sqlx_runs, |run| run.rate);
            println!(
                "| {op:?} | {concurrency} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} |",
                luau.rate,
                luau.p50_ms,
                luau.p99_ms,
                sqlx.rate,
                sqlx.p50_ms,
                sqlx.p99_ms,
                luau.rate / sqlx.rate,
                lag_p99,
                lag_max
            );
        }
    }
    host.shutdown(Duration::from_secs(5));
    Ok(())
}

/// The run with the median rate.
fn median_by_rate<T>(mut runs: Vec<T>, rate: impl Fn(&T) -> f64) -> T {
    runs.sort_by(|a, b| rate(a).total_cmp(&rate(b)));
    runs.swap_remove(runs.len() / 2)
}

fn entry_key(key: String) -> EntryKey {
    EntryKey {
        universe: UNIVERSE,
        kind: StoreKind::Standard,
        store: STORE.to_owned(),
        scope: "global".to_owned(),
        key,
    }
}

async fn seed(host: &Host) -> anyhow::Result<()> {
    let backend = host.backend();
    for i in 0..KEYS {
        for (key, value) in [
            (format!("player_{i}"), PLAYER),
            (format!("counter_{i}"), "0"),
        ] {
            let write = Write {
                value: value.to_owned(),
                user_ids: "[]".to_owned(),
                metadata: "{}".to_owned(),
                deleted: false,
                now_ms: 0,
            };
            backend.write(&entry_key(key), &write).await?;
        }
    }
    Ok(())
}

/// Runs `op` from `concurrency` Luau coroutines for `seconds`; returns the call statistics and
/// the timer lag (p99 and worst, in ms) seen meanwhile.
fn run_luau(
    host: &Host,
    op: Op,
    concurrency: usize,
    seconds: f64,
) -> anyhow::Result<(Stats, f64, f64)> {
    let setup = r#"
        local player = { CarryLevel = 1, Inventory = { "sword", "shield", "potion" }, Money = 1500, Name = "Builderman", RebirthCount = 1, SpeedLevel = 2 }
        local function keep(value) return value end
        local fromDatabase = Instance.new("DataStoreGetOptions")
        fromDatabase.UseCache = false
    "#;
    measure_luau(host, STORE, concurrency, seconds, setup, op.luau_call())
}

/// Runs `call` in a loop from `concurrency` Luau coroutines on the data store `store` for
/// `seconds`, after `setup`; each coroutine has `i`, `key` and `counter` in scope. Returns the
/// call statistics and the timer lag (p99 and worst, in ms) seen meanwhile: a Luau thread
/// loops on `task.wait()` and records how much later than one frame each wait resumed.
fn measure_luau(
    host: &Host,
    store: &str,
    concurrency: usize,
    seconds: f64,
    setup: &str,
    call: &str,
) -> anyhow::Result<(Stats, f64, f64)> {
    let script = format!(
        r#"
        local store = game:GetService("DataStoreService"):GetDataStore("{store}")
        {setup}
        local latencies, gaps = {{}}, {{}}
        local running = {concurrency}
        local started = os.clock()
        local deadline = started + {seconds}
        for i = 1, {concurrency} do
            task.spawn(function()
                local key = "player_" .. (i % {KEYS})
                local counter = "counter_" .. (i % {KEYS})
                while os.clock() < deadline do
                    local t0 = os.clock()
                    {call}
                    latencies[#latencies + 1] = os.clock() - t0
                end
                running -= 1
            end)
        end
        while running > 0 do
            local t0 = os.clock()
            task.wait()
            gaps[#gaps + 1] = os.clock() - t0
        end
        shared.elapsed = os.clock() - started
        shared.latencies = latencies
        shared.gaps = gaps
        "#
    );
    let (elapsed, latencies, gaps) = run_script(host, "bench.server.luau", &script, |shared| {
        Ok((
            shared.get::<f64>("elapsed")?,
            shared.get::<Vec<f64>>("latencies")?,
            shared.get::<Vec<f64>>("gaps")?,
        ))
    })?;
    let mut lags: Vec<f64> = gaps
        .into_iter()
        .map(|gap| (gap - FRAME.as_secs_f64()).max(0.0) * 1000.0)
        .collect();
    lags.sort_by(f64::total_cmp);
    let worst = lags.last().copied().unwrap_or(0.0);
    Ok((
        Stats::from(latencies, elapsed),
        percentile(&lags, 0.99),
        worst,
    ))
}

/// Runs a benchmark script in a fresh engine on the host's database until it finishes, then
/// reads its results from the `shared` table.
fn run_script<T>(
    host: &Host,
    name: &str,
    script: &str,
    read: impl FnOnce(&mlua::Table) -> mlua::Result<T>,
) -> anyhow::Result<T> {
    let vm = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    vm.block_on(async {
        let context = DataStoreContext::new(
            Arc::clone(host.backend()),
            host.database_runtime().handle().clone(),
            UNIVERSE,
            Throttling::Off,
        );
        let identity = ServerIdentity {
            place_id: 1,
            game_id: UNIVERSE,
            job_id: blox_engine::new_guid(),
        };
        let engine = Engine::new(identity, context, Rc::new(RealClock::new()))?;
        let main = engine.start_script(name, script.as_bytes())?;
        engine.run_until_idle().await;
        if let Some(error) = engine.failure_of(&main) {
            anyhow::bail!("{name} failed: {}", error.message);
        }
        let shared: mlua::Table = engine
            .lua()
            .globals()
            .get("shared")
            .map_err(|error| anyhow::anyhow!("{error}"))?;
        read(&shared).map_err(|error| anyhow::anyhow!("{error}"))
    })
}

/// Lists pages from random places of a store of `size` keys, from 8 coroutines: each
/// operation is a ListKeysAsync page of 50 (a prefix seek) plus the next page (a cursor seek).
fn run_listing(host: &Host, size: usize, seconds: f64) -> anyhow::Result<Stats> {
    let call = format!(
        r#"
        local prefix = string.sub(string.format("k%07d", math.random(0, {size} - 100)), 1, 6)
        local pages = store:ListKeysAsync(prefix, 50)
        assert(#pages:GetCurrentPage() == 50)
        pages:AdvanceToNextPageAsync()
        "#
    );
    let (stats, _, _) = measure_luau(host, &format!("Listing{size}"), 8, seconds, "", &call)?;
    Ok(stats)
}

/// Pools configured as Blox's backends configure theirs, used directly with sqlx.
enum RawPools {
    Sqlite {
        readers: Pool<sqlx::Sqlite>,
        writer: Pool<sqlx::Sqlite>,
    },
    Postgres(Pool<sqlx::Postgres>),
}

impl RawPools {
    async fn open(url: &str, pool_size: u32) -> anyhow::Result<Self> {
        use std::str::FromStr as _;
        if let Some(path) = url.strip_prefix("sqlite://") {
            let connect = sqlx::sqlite::SqliteConnectOptions::from_str("sqlite:")?
                .filename(path)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10));
            let pool = |size| {
                sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(size)
                    .connect_with(connect.clone())
            };
            Ok(RawPools::Sqlite {
                readers: pool(4).await?,
                writer: pool(1).await?,
            })
        } else {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(pool_size)
                .connect(url)
                .await?;
            Ok(RawPools::Postgres(pool))
        }
    }

    /// Makes sure the store `Listing{size}` holds keys k0000000.. k{size-1}, inserting them
    /// in large batches (skipped when they are already there).
    async fn seed_listing(&self, size: usize) -> anyhow::Result<()> {
        let store = format!("Listing{size}");
        match self {
            RawPools::Sqlite { writer, .. } => seed_rows(writer, &store, size).await,
            RawPools::Postgres(pool) => seed_rows(pool, &store, size).await,
        }
    }

    async fn run(&self, op: Op, concurrency: usize, seconds: f64) -> anyhow::Result<Stats> {
        match self {
            RawPools::Sqlite { readers, writer } => {
                measure(
                    op,
                    concurrency,
                    seconds,
                    readers,
                    writer,
                    &sqlite::STATEMENTS,
                )
                .await
            }
            RawPools::Postgres(pool) => {
                measure(op, concurrency, seconds, pool, pool, &postgres::STATEMENTS).await
            }
        }
    }
}

async fn measure<DB>(
    op: Op,
    concurrency: usize,
    seconds: f64,
    readers: &Pool<DB>,
    writer: &Pool<DB>,
    statements: &'static Statements,
) -> anyhow::Result<Stats>
where
    DB: Database,
    for<'c> &'c Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments: sqlx::IntoArguments<DB>,
    i64: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB> + for<'r> sqlx::Decode<'r, DB>,
    i16: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    bool: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    String: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB> + for<'r> sqlx::Decode<'r, DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
    DB::QueryResult: RowsAffected,
{
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let done = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            let (readers, writer) = (readers.clone(), writer.clone());
            let done = Arc::clone(&done);
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let key = format!("player_{}", (i + 1) % KEYS);
                let counter = format!("counter_{}", (i + 1) % KEYS);
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    match op {
                        Op::Get => {
                            read(&readers, statements, &key).await?;
                        }
                        Op::Set => {
                            let row = bind_key(sqlx::query::<DB>(statements.write), &key)
                                .bind(PLAYER.to_owned())
                                .bind("[]".to_owned())
                                .bind("{}".to_owned())
                                .bind(0_i64)
                                .bind(false)
                                .fetch_one(&writer)
                                .await?;
                            let _: i64 = sqlx::Row::try_get(&row, 0)?;
                        }
                        Op::Update | Op::Increment => loop {
                            let name = if op == Op::Update { &key } else { &counter };
                            let (value, seq) = read(&readers, statements, name).await?;
                            let value = if op == Op::Update {
                                value
                            } else {
                                (value.parse::<i64>()? + 1).to_string()
                            };
                            let done = bind_key(sqlx::query::<DB>(statements.update_if_seq), name)
                                .bind(value)
                                .bind("[]".to_owned())
                                .bind("{}".to_owned())
                                .bind(seq)
                                .bind(seq + 1)
                                .bind(0_i64)
                                .bind(0_i64)
                                .bind(false)
                                .execute(&writer)
                                .await?;
                            if done.rows() == 1 {
                                break;
                            }
                        },
                    }
                    latencies.push(t0.elapsed().as_secs_f64());
                }
                done.fetch_add(1, Ordering::Relaxed);
                Ok::<_, anyhow::Error>(latencies)
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    Ok(Stats::from(all, started.elapsed().as_secs_f64()))
}

async fn seed_rows<DB>(pool: &Pool<DB>, store: &str, size: usize) -> anyhow::Result<()>
where
    DB: Database,
    for<'c> &'c Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'c> &'c mut <DB as Database>::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments: sqlx::IntoArguments<DB>,
    i64: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    i16: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    bool: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    String: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    const BATCH: usize = 1000;
    for start in (0..size).step_by(BATCH) {
        let mut insert = sqlx::QueryBuilder::<DB>::new(
            "INSERT INTO blox_entries (universe_id, store_kind, store_name, scope, entry_key, \
             value, user_ids, metadata, version_seq, created_ms, updated_ms, deleted) ",
        );
        insert.push_values(start..(start + BATCH).min(size), |mut row, i| {
            row.push_bind(UNIVERSE)
                .push_bind(StoreKind::Standard as i16)
                .push_bind(store.to_owned())
                .push_bind("global".to_owned())
                .push_bind(format!("k{i:07}"))
                .push_bind("1".to_owned())
                .push_bind("[]".to_owned())
                .push_bind("{}".to_owned())
                .push_bind(1_i64)
                .push_bind(0_i64)
                .push_bind(0_i64)
                .push_bind(false);
        });
        insert.push(" ON CONFLICT DO NOTHING");
        insert.build().execute(pool).await?;
    }
    Ok(())
}

/// The rows a statement changed; sqlx has no trait for it across databases.
trait RowsAffected {
    fn rows(&self) -> u64;
}

impl RowsAffected for sqlx::sqlite::SqliteQueryResult {
    fn rows(&self) -> u64 {
        self.rows_affected()
    }
}

impl RowsAffected for sqlx::postgres::PgQueryResult {
    fn rows(&self) -> u64 {
        self.rows_affected()
    }
}

fn bind_key<'q, DB>(
    query: sqlx::query::Query<'q, DB, <DB as Database>::Arguments>,
    key: &str,
) -> sqlx::query::Query<'q, DB, <DB as Database>::Arguments>
where
    DB: Database,
    i64: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    i16: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    String: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    query
        .bind(UNIVERSE)
        .bind(StoreKind::Standard as i16)
        .bind(STORE.to_owned())
        .bind("global".to_owned())
        .bind(key.to_owned())
}

async fn read<DB>(
    pool: &Pool<DB>,
    statements: &Statements,
    key: &str,
) -> anyhow::Result<(String, i64)>
where
    DB: Database,
    for<'c> &'c Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments: sqlx::IntoArguments<DB>,
    i64: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB> + for<'r> sqlx::Decode<'r, DB>,
    i16: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    String: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB> + for<'r> sqlx::Decode<'r, DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let row = bind_key(sqlx::query::<DB>(statements.read), key)
        .fetch_one(pool)
        .await?;
    Ok((sqlx::Row::try_get(&row, 0)?, sqlx::Row::try_get(&row, 3)?))
}
