//! `blox-bench`: DataStore calls from Luau against raw sqlx, in one run, on one database.
//!
//! For each operation (GetAsync, SetAsync, UpdateAsync, IncrementAsync) and each concurrency,
//! it runs the calls from that many Luau coroutines through the real engine, then runs the
//! same SQL statements from as many Tokio tasks with raw sqlx, on connections set up as
//! Blox's backends set up theirs (Blox's own connection sets: SQLite's four readers and one
//! writer, PostgreSQL's one set), for the same time. The ratio of the two rates is the cost of
//! everything Blox adds (Luau, the codec, validation, the scheduler, the hop between
//! runtimes). While the Luau load runs, a Luau thread measures how late `task.wait()` resumes,
//! the timer lag scripts would feel.
//! GetAsync runs with `UseCache = false`: the point is the database path, not cache hits.
//! The raw side writes the current time as Blox does (a constant timestamp would let
//! PostgreSQL skip work a real write does), and on PostgreSQL every round, and every listing
//! run after seeding, starts from a vacuumed table: without it, on a server with autovacuum
//! off, dead rows pile up from run to run and every round is slower than the one before,
//! whichever side runs it, and index-only scans visit the table for every row.
//!
//! Two more measurements on request: `--listing-sizes` pages through stores of those sizes
//! (ListKeysAsync, ListVersionsAsync, GetSortedAsync), to show a page costs the same deep in
//! a large store as in a small one; `--layers` measures what the request budgets and the read
//! cache add to a GetAsync that reaches the database.

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use blox::Host;
use blox_datastore::DataStoreContext;
use blox_datastore::backend::batch::BatchStatistics;
use blox_datastore::backend::connections::ConnectionSet;
use blox_datastore::backend::{
    EntryKey, OpenOptions, Statements, StoreKind, Write, postgres, sqlite,
};
use blox_datastore::budget::Throttling;
use blox_datastore::operations::now_ms;
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
    /// Store sizes for the listing benchmark (ListKeysAsync, ListVersionsAsync and
    /// GetSortedAsync pages deep in large stores), e.g. `10000,1000000`; none by default.
    #[arg(long, value_delimiter = ',')]
    listing_sizes: Vec<usize>,
    /// Measure the cost of the request-budget and read-cache layers on GetAsync at these
    /// concurrencies (e.g. `64`), instead of the Luau/sqlx table.
    #[arg(long, value_delimiter = ',')]
    layers: Vec<usize>,
    /// Alternating Luau and sqlx measurements per cell; the table reports the medians, so
    /// drift on a shared machine hits both sides alike.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// PostgreSQL connections (both sides).
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
#[derive(Debug, Clone, Default)]
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

/// mimalloc instead of the C library's allocator: values are built on the database runtime's
/// threads and freed on the VM thread, and glibc's allocator takes a lock for every such
/// cross-thread free (BENCHMARKS.md, session 6: ~11% fewer instructions per GetAsync).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    let raw = runtime.block_on(RawConnections::open(
        &args.database_url,
        args.postgres_pool_size,
    ))?;

    if !args.listing_sizes.is_empty() {
        for &size in &args.listing_sizes {
            runtime.block_on(raw.seed_listing(size))?;
        }
        runtime.block_on(raw.vacuum())?;
        // Rounds alternate between the sizes, so drift on a shared machine hits all alike.
        let mut runs = vec![Vec::new(); Listing::ALL.len() * args.listing_sizes.len()];
        for _ in 0..args.rounds.max(1) {
            for (s, &size) in args.listing_sizes.iter().enumerate() {
                for (l, &listing) in Listing::ALL.iter().enumerate() {
                    let stats = run_listing(&host, listing, size, args.seconds)?;
                    runs[l * args.listing_sizes.len() + s].push(stats);
                }
            }
        }
        println!(
            "| listing | store keys | first + next page /s | p50 ms | p99 ms | time vs smallest |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
        let mut runs = runs.into_iter();
        for listing in Listing::ALL {
            let mut smallest = None;
            for &size in &args.listing_sizes {
                let stats = median_by_rate(runs.next().unwrap_or_default(), |stats| stats.rate);
                let base = *smallest.get_or_insert(stats.rate);
                println!(
                    "| {} | {size} | {:.0} | {:.2} | {:.2} | {:.2} |",
                    listing.method(),
                    stats.rate,
                    stats.p50_ms,
                    stats.p99_ms,
                    base / stats.rate
                );
            }
        }
        return Ok(());
    }
    if !args.layers.is_empty() {
        runtime.block_on(raw.seed_layers())?;
        runtime.block_on(raw.vacuum())?;
        println!("| coroutines | bare GetAsync/s | with budgets + cache /s | ratio |");
        println!("|---:|---:|---:|---:|");
        for &concurrency in &args.layers {
            let mut bare = Vec::new();
            let mut layered = Vec::new();
            for _ in 0..args.rounds.max(1) {
                bare.push(run_layers(&host, false, concurrency, args.seconds)?);
                layered.push(run_layers(&host, true, concurrency, args.seconds)?);
            }
            let bare = median_by_rate(bare, |stats| stats.rate);
            let layered = median_by_rate(layered, |stats| stats.rate);
            println!(
                "| {concurrency} | {:.0} | {:.0} | {:.3} |",
                bare.rate,
                layered.rate,
                layered.rate / bare.rate
            );
        }
        return Ok(());
    }
    println!(
        "| op | coroutines | Luau ops/s | Luau p50 ms | Luau p99 ms | sqlx ops/s | sqlx p50 ms | sqlx p99 ms | Luau/sqlx | timer lag p99 ms | timer lag max ms | sqlx CPU µs/op | Luau CPU µs/op | VM thread µs/op | VM thread runs/op | Luau reads/statement | Luau writes/statement | sqlx thread runs/op | Luau thread runs/op | VM thread wait µs/run |"
    );
    println!(
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for &op in &args.ops {
        for &concurrency in &args.concurrency {
            let mut luau_runs = Vec::new();
            let mut sqlx_runs = Vec::new();
            let mut reads = BatchTally::default();
            let mut writes = BatchTally::default();
            for _ in 0..args.rounds.max(1) {
                runtime.block_on(raw.vacuum())?;
                sqlx_runs.push(CpuUse::of(|| {
                    runtime.block_on(raw.run(op, concurrency, args.seconds))
                })?);
                runtime.block_on(raw.vacuum())?;
                let backend = host.backend();
                let (reads_before, writes_before) =
                    (backend.read_statistics(), backend.write_statistics());
                luau_runs.push(CpuUse::of(|| {
                    run_luau(&host, op, concurrency, args.seconds)
                })?);
                reads.add_since(reads_before, backend.read_statistics());
                writes.add_since(writes_before, backend.write_statistics());
            }
            let ((luau, lag_p99, lag_max), luau_cpu) =
                median_by_rate(luau_runs, |run| run.0.0.rate);
            let (sqlx, sqlx_cpu) = median_by_rate(sqlx_runs, |run| run.0.rate);
            let luau_ops = luau.rate * luau_cpu.elapsed.as_secs_f64();
            let sqlx_ops = sqlx.rate * sqlx_cpu.elapsed.as_secs_f64();
            println!(
                "| {op:?} | {concurrency} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} | {:.2} | {} | {} | {:.2} | {:.2} | {:.0} |",
                luau.rate,
                luau.p50_ms,
                luau.p99_ms,
                sqlx.rate,
                sqlx.p50_ms,
                sqlx.p99_ms,
                luau.rate / sqlx.rate,
                lag_p99,
                lag_max,
                sqlx_cpu.process.cpu.as_secs_f64() * 1e6 / sqlx_ops,
                luau_cpu.process.cpu.as_secs_f64() * 1e6 / luau_ops,
                luau_cpu.this_thread.cpu.as_secs_f64() * 1e6 / luau_ops,
                luau_cpu.this_thread.runs as f64 / luau_ops,
                reads.mean_batch(),
                writes.mean_batch(),
                sqlx_cpu.process.runs as f64 / sqlx_ops,
                luau_cpu.process.runs as f64 / luau_ops,
                luau_cpu.this_thread.waiting.as_secs_f64() * 1e6
                    / luau_cpu.this_thread.runs.max(1) as f64,
            );
        }
    }
    host.shutdown(Duration::from_secs(5));
    Ok(())
}

/// Requests and the batches that served them, over the Luau rounds of one cell.
#[derive(Debug, Default)]
struct BatchTally {
    requests: u64,
    batches: u64,
}

impl BatchTally {
    /// Adds what a backend served between two readings of its statistics.
    fn add_since(&mut self, before: BatchStatistics, after: BatchStatistics) {
        self.requests += after.requests - before.requests;
        self.batches += after.batches - before.batches;
    }

    /// Requests per batch, or a dash for a cell that made none.
    fn mean_batch(&self) -> String {
        if self.batches == 0 {
            "-".to_owned()
        } else {
            format!("{:.1}", self.requests as f64 / self.batches as f64)
        }
    }
}

/// CPU time and scheduling during one measurement, read from Linux's per-thread scheduler
/// statistics. On a saturated machine the throughput ratio follows the CPU each call costs,
/// and CPU per call is far steadier from run to run than throughput, so the table reports
/// both.
#[derive(Debug, Clone, Copy)]
struct CpuUse {
    /// Wall-clock time of the measurement.
    elapsed: Duration,
    /// Every thread of the process, summed: its runs are the wake-ups (and preemptions) the
    /// measured calls cost, every hand-off between threads among them.
    process: SchedulerStats,
    /// The calling thread: the VM thread in a Luau measurement. Its runs are once per wake-up
    /// from idle, plus once per preemption; its waiting divided by its runs is the mean delay
    /// between being woken and running.
    this_thread: SchedulerStats,
}

impl CpuUse {
    fn of<T>(measure: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, CpuUse)> {
        let (process, this_thread, started) = (process_stats(), thread_stats(), Instant::now());
        let outcome = measure()?;
        let (this_thread_end, process_end) = (thread_stats(), process_stats());
        let used = CpuUse {
            elapsed: started.elapsed(),
            process: process_end.since(process),
            this_thread: this_thread_end.since(this_thread),
        };
        Ok((outcome, used))
    }
}

/// The scheduler statistics of every live thread of this process so far, summed.
fn process_stats() -> SchedulerStats {
    std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .map(|task| scheduler_stats(&task.path().join("schedstat")))
        .fold(SchedulerStats::default(), |total, thread| SchedulerStats {
            cpu: total.cpu + thread.cpu,
            waiting: total.waiting + thread.waiting,
            runs: total.runs + thread.runs,
        })
}

/// The calling thread's scheduler statistics so far.
fn thread_stats() -> SchedulerStats {
    scheduler_stats(std::path::Path::new("/proc/thread-self/schedstat"))
}

/// What a thread's `schedstat` file says; zeros where unreadable.
#[derive(Debug, Clone, Copy, Default)]
struct SchedulerStats {
    /// Time spent on a CPU (the first field).
    cpu: Duration,
    /// Time spent runnable, waiting for a CPU (the second field).
    waiting: Duration,
    /// Times put on a CPU (the third field).
    runs: u64,
}

impl SchedulerStats {
    /// What accrued between `earlier` and these statistics.
    fn since(self, earlier: SchedulerStats) -> SchedulerStats {
        SchedulerStats {
            cpu: self.cpu.saturating_sub(earlier.cpu),
            waiting: self.waiting.saturating_sub(earlier.waiting),
            runs: self.runs.saturating_sub(earlier.runs),
        }
    }
}

fn scheduler_stats(path: &std::path::Path) -> SchedulerStats {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let fields: Vec<u64> = text
        .split_whitespace()
        .map(|field| field.parse().unwrap_or(0))
        .collect();
    SchedulerStats {
        cpu: Duration::from_nanos(fields.first().copied().unwrap_or(0)),
        waiting: Duration::from_nanos(fields.get(1).copied().unwrap_or(0)),
        runs: fields.get(2).copied().unwrap_or(0),
    }
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
    measure_luau(
        host,
        Throttling::Off,
        STORE,
        concurrency,
        seconds,
        setup,
        op.luau_call(),
    )
}

/// Runs `call` in a loop from `concurrency` Luau coroutines on the data store `store` for
/// `seconds`, after `setup`; each coroutine has `i`, `key` and `counter` in scope. Returns the
/// call statistics and the timer lag (p99 and worst, in ms) seen meanwhile: a Luau thread
/// loops on `task.wait()` and records how much later than one frame each wait resumed.
fn measure_luau(
    host: &Host,
    throttling: Throttling,
    store: &str,
    concurrency: usize,
    seconds: f64,
    setup: &str,
    call: &str,
) -> anyhow::Result<(Stats, f64, f64)> {
    let script = format!(
        r#"
        local DataStoreService = game:GetService("DataStoreService")
        local store = DataStoreService:GetDataStore("{store}")
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
    let (elapsed, latencies, gaps) =
        run_script(host, throttling, "bench.server.luau", &script, |shared| {
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
    throttling: Throttling,
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
            throttling,
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

/// A listing measured deep in large stores.
#[derive(Debug, Clone, Copy)]
enum Listing {
    Keys,
    Versions,
    Sorted,
}

impl Listing {
    /// The method measured.
    fn method(self) -> &'static str {
        match self {
            Self::Keys => "ListKeysAsync",
            Self::Versions => "ListVersionsAsync",
            Self::Sorted => "GetSortedAsync",
        }
    }

    const ALL: [Self; 3] = [Self::Keys, Self::Versions, Self::Sorted];
}

/// Lists pages from random places of stores of `size` keys, from 8 coroutines. Each
/// operation is a first page (an index seek) plus the next page (a seek by cursor): 50 keys
/// from a random prefix; the 3 versions of a random key, 2 a page; 50 leaderboard entries
/// below a random value.
fn run_listing(host: &Host, listing: Listing, size: usize, seconds: f64) -> anyhow::Result<Stats> {
    let (store, call) = match listing {
        Listing::Keys => (
            format!("Listing{size}"),
            format!(
                r#"
                local prefix = string.sub(string.format("k%07d", math.random(0, {size} - 100)), 1, 6)
                local pages = store:ListKeysAsync(prefix, 50)
                assert(#pages:GetCurrentPage() == 50)
                pages:AdvanceToNextPageAsync()
                "#
            ),
        ),
        Listing::Versions => (
            format!("History{size}"),
            format!(
                r#"
                local pages = store:ListVersionsAsync(string.format("k%07d", math.random(0, {size} - 1)), nil, 0, 0, 2)
                assert(#pages:GetCurrentPage() == 2)
                pages:AdvanceToNextPageAsync()
                assert(#pages:GetCurrentPage() == 1)
                "#
            ),
        ),
        Listing::Sorted => (
            format!("Listing{size}"),
            format!(
                r#"
                local pages = board:GetSortedAsync(false, 50, nil, math.random(100, {size} - 1))
                assert(#pages:GetCurrentPage() == 50)
                pages:AdvanceToNextPageAsync()
                "#
            ),
        ),
    };
    let setup = format!(r#"local board = DataStoreService:GetOrderedDataStore("Board{size}")"#);
    let (stats, _, _) = measure_luau(host, Throttling::Off, &store, 8, seconds, &setup, &call)?;
    Ok(stats)
}

/// GetAsync from `concurrency` coroutines on keys no coroutine reads twice in a run, so every
/// call reaches the database: bare (no budgets, cache bypassed) or through both layers
/// (budgets too large to ever wait, cache looked up and filled).
fn run_layers(
    host: &Host,
    layered: bool,
    concurrency: usize,
    seconds: f64,
) -> anyhow::Result<Stats> {
    let (throttling, options) = if layered {
        (Throttling::Scaled(1e9), "nil")
    } else {
        (Throttling::Off, "fromDatabase")
    };
    let setup = r#"
        local fromDatabase = Instance.new("DataStoreGetOptions")
        fromDatabase.UseCache = false
        local reads = 0
    "#;
    let call = format!(
        r#"
        reads += 1
        store:GetAsync(string.format("k%07d", reads % {LAYER_KEYS}), {options})
        "#
    );
    let (stats, _, _) = measure_luau(
        host,
        throttling,
        "Listing100000",
        concurrency,
        seconds,
        setup,
        &call,
    )?;
    Ok(stats)
}

/// Keys of the store the layers benchmark reads: more than a run reads, so none repeats.
const LAYER_KEYS: usize = 100_000;

/// Connections set up as Blox's backends set up theirs (Blox's own [`ConnectionSet`]s:
/// SQLite's four readers and one writer, PostgreSQL's one set pinging connections that idled
/// over a second), used directly with sqlx.
enum RawConnections {
    Sqlite {
        readers: ConnectionSet<sqlx::SqliteConnection>,
        writer: ConnectionSet<sqlx::SqliteConnection>,
        /// Fills the stores before a run; never measured.
        seeder: Pool<sqlx::Sqlite>,
    },
    Postgres {
        connections: ConnectionSet<sqlx::PgConnection>,
        /// Fills the stores before a run; never measured.
        seeder: Pool<sqlx::Postgres>,
    },
}

impl RawConnections {
    async fn open(url: &str, pool_size: u32) -> anyhow::Result<Self> {
        use std::str::FromStr as _;
        if let Some(path) = url.strip_prefix("sqlite://") {
            let connect = sqlx::sqlite::SqliteConnectOptions::from_str("sqlite:")?
                .filename(path)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10));
            let timeout = Duration::from_secs(10);
            Ok(RawConnections::Sqlite {
                readers: ConnectionSet::connect(connect.clone(), sqlite::set_limits(4, timeout))
                    .await?,
                writer: ConnectionSet::connect(connect.clone(), sqlite::set_limits(1, timeout))
                    .await?,
                seeder: sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(connect)
                    .await?,
            })
        } else {
            let connect = postgres::connect_options(url)?;
            let timeout = Duration::from_secs(10);
            Ok(RawConnections::Postgres {
                connections: ConnectionSet::connect(
                    connect.clone(),
                    postgres::set_limits(pool_size as usize, timeout),
                )
                .await?,
                seeder: sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect_with(connect)
                    .await?,
            })
        }
    }

    /// Makes sure the stores of the listing benchmark hold `size` keys k0000000..: `Listing`
    /// (one version each), `History` (three versions each, two of them retained) and the
    /// ordered `Board` (distinct values). Rows go in in large batches and are skipped when
    /// they are already there.
    async fn seed_listing(&self, size: usize) -> anyhow::Result<()> {
        for seed in &listing_seeds(size) {
            match self {
                RawConnections::Sqlite { seeder, .. } => seed_rows(seeder, seed, size).await?,
                RawConnections::Postgres { seeder, .. } => seed_rows(seeder, seed, size).await?,
            }
        }
        Ok(())
    }

    /// Makes sure the store the layers benchmark reads holds its keys.
    async fn seed_layers(&self) -> anyhow::Result<()> {
        let seed = Seed::Entries {
            store: "Listing100000".to_owned(),
            kind: StoreKind::Standard,
            seq: 1,
        };
        match self {
            RawConnections::Sqlite { seeder, .. } => seed_rows(seeder, &seed, LAYER_KEYS).await,
            RawConnections::Postgres { seeder, .. } => seed_rows(seeder, &seed, LAYER_KEYS).await,
        }
    }

    /// Reclaims the dead rows earlier rounds left (PostgreSQL; SQLite updates in place), as
    /// autovacuum would on a server that keeps its default settings.
    async fn vacuum(&self) -> anyhow::Result<()> {
        if let RawConnections::Postgres { seeder, .. } = self {
            sqlx::query("VACUUM blox_entries, blox_versions")
                .execute(seeder)
                .await?;
        }
        Ok(())
    }

    async fn run(&self, op: Op, concurrency: usize, seconds: f64) -> anyhow::Result<Stats> {
        match self {
            RawConnections::Sqlite {
                readers, writer, ..
            } => {
                measure::<sqlx::Sqlite>(
                    op,
                    concurrency,
                    seconds,
                    readers,
                    writer,
                    &sqlite::STATEMENTS,
                )
                .await
            }
            RawConnections::Postgres { connections, .. } => {
                measure::<sqlx::Postgres>(
                    op,
                    concurrency,
                    seconds,
                    connections,
                    connections,
                    &postgres::STATEMENTS,
                )
                .await
            }
        }
    }
}

async fn measure<DB>(
    op: Op,
    concurrency: usize,
    seconds: f64,
    readers: &ConnectionSet<DB::Connection>,
    writer: &ConnectionSet<DB::Connection>,
    statements: &'static Statements,
) -> anyhow::Result<Stats>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
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
                            read::<DB>(&readers, statements, &key).await?;
                        }
                        Op::Set => {
                            let mut connection = writer.acquire().await?;
                            let row = bind_key(sqlx::query::<DB>(statements.write), &key)
                                .bind(PLAYER.to_owned())
                                .bind("[]".to_owned())
                                .bind("{}".to_owned())
                                .bind(now_ms())
                                .bind(false)
                                .bind(false)
                                .fetch_one(&mut *connection)
                                .await;
                            let row = connection.checked(row)?;
                            let _: i64 = sqlx::Row::try_get(&row, 0)?;
                        }
                        Op::Update | Op::Increment => loop {
                            let name = if op == Op::Update { &key } else { &counter };
                            let (value, seq) = read::<DB>(&readers, statements, name).await?;
                            let value = if op == Op::Update {
                                value
                            } else {
                                (value.parse::<i64>()? + 1).to_string()
                            };
                            let mut connection = writer.acquire().await?;
                            let done = bind_key(sqlx::query::<DB>(statements.update_if_seq), name)
                                .bind(value)
                                .bind("[]".to_owned())
                                .bind("{}".to_owned())
                                .bind(seq)
                                .bind(seq + 1)
                                .bind(0_i64)
                                .bind(now_ms())
                                .bind(false)
                                .bind(false)
                                .execute(&mut *connection)
                                .await;
                            if connection.checked(done)?.rows() == 1 {
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

/// Rows the benchmark seeds with raw SQL.
enum Seed {
    /// Latest versions in `blox_entries`, at sequence `seq`; ordered stores get the value
    /// `(i × 7919) mod size`, distinct for every key.
    Entries {
        store: String,
        kind: StoreKind,
        seq: i64,
    },
    /// Retained versions 1 and 2 of every key in `blox_versions`.
    Versions { store: String },
}

/// The stores of the listing benchmark at `size` keys.
fn listing_seeds(size: usize) -> [Seed; 4] {
    [
        Seed::Entries {
            store: format!("Listing{size}"),
            kind: StoreKind::Standard,
            seq: 1,
        },
        Seed::Entries {
            store: format!("History{size}"),
            kind: StoreKind::Standard,
            seq: 3,
        },
        Seed::Versions {
            store: format!("History{size}"),
        },
        Seed::Entries {
            store: format!("Board{size}"),
            kind: StoreKind::Ordered,
            seq: 1,
        },
    ]
}

async fn seed_rows<DB>(pool: &Pool<DB>, seed: &Seed, size: usize) -> anyhow::Result<()>
where
    DB: Database,
    for<'c> &'c Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments: sqlx::IntoArguments<DB>,
    i64: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    i16: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    bool: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    String: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    const BATCH: usize = 1000;
    for start in (0..size).step_by(BATCH) {
        let rows = start..(start + BATCH).min(size);
        let mut insert = match seed {
            Seed::Entries { store, kind, seq } => {
                let mut insert = sqlx::QueryBuilder::<DB>::new(
                    "INSERT INTO blox_entries (universe_id, store_kind, store_name, scope, \
                     entry_key, value, user_ids, metadata, version_seq, created_ms, updated_ms, \
                     deleted) ",
                );
                insert.push_values(rows, |mut row, i| {
                    let value = match kind {
                        StoreKind::Ordered => (i * 7919 % size).to_string(),
                        StoreKind::Standard => "1".to_owned(),
                    };
                    row.push_bind(UNIVERSE)
                        .push_bind(*kind as i16)
                        .push_bind(store.clone())
                        .push_bind("global".to_owned())
                        .push_bind(format!("k{i:07}"))
                        .push_bind(value)
                        .push_bind("[]".to_owned())
                        .push_bind("{}".to_owned())
                        .push_bind(*seq)
                        .push_bind(0_i64)
                        .push_bind(*seq)
                        .push_bind(false);
                });
                insert
            }
            Seed::Versions { store } => {
                let mut insert = sqlx::QueryBuilder::<DB>::new(
                    "INSERT INTO blox_versions (universe_id, store_kind, store_name, scope, \
                     entry_key, version_seq, value, user_ids, metadata, created_ms, updated_ms, \
                     deleted, expires_ms) ",
                );
                let versions = rows.flat_map(|i| [(i, 1_i64), (i, 2_i64)]);
                insert.push_values(versions, |mut row, (i, seq)| {
                    row.push_bind(UNIVERSE)
                        .push_bind(StoreKind::Standard as i16)
                        .push_bind(store.clone())
                        .push_bind("global".to_owned())
                        .push_bind(format!("k{i:07}"))
                        .push_bind(seq)
                        .push_bind("1".to_owned())
                        .push_bind("[]".to_owned())
                        .push_bind("{}".to_owned())
                        .push_bind(0_i64)
                        .push_bind(seq)
                        .push_bind(false)
                        .push_bind(i64::MAX);
                });
                insert
            }
        };
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
    readers: &ConnectionSet<DB::Connection>,
    statements: &Statements,
    key: &str,
) -> anyhow::Result<(String, i64)>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments: sqlx::IntoArguments<DB>,
    i64: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB> + for<'r> sqlx::Decode<'r, DB>,
    i16: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    String: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB> + for<'r> sqlx::Decode<'r, DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let mut connection = readers.acquire().await?;
    let row = bind_key(sqlx::query::<DB>(statements.read), key)
        .fetch_one(&mut *connection)
        .await;
    let row = connection.checked(row)?;
    Ok((sqlx::Row::try_get(&row, 0)?, sqlx::Row::try_get(&row, 3)?))
}
