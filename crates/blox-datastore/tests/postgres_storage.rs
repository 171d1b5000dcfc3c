//! How PostgreSQL stores entries (`migrations/postgres/0004_updates_in_place.sql`): a write that
//! changes a live entry's data updates its row in place (HOT), and the statements that look
//! rows up by the generated columns find them through their indexes.
//!
//! The tests run Blox's own statements, on a connection opened as Blox opens its own; the HOT
//! test inside a transaction it rolls back, as `pg_stat_xact_user_tables` counts that
//! transaction's updates, and how many of them were HOT, at once and for it alone. A database
//! an earlier Blox made gains the columns, with its entries' values, when it is upgraded.

use blox_datastore::backend::{self, EntryKey, OpenOptions, SortedListing, StoreKind, postgres};
use blox_testkit::{Scratch, TestDatabase};
use sqlx::{Connection as _, PgConnection};

const UNIVERSE: i64 = 7;
const STANDARD: i16 = 0;
const ORDERED: i16 = 1;
/// Two times within one UTC hour, so no write keeps a superseded version.
const CREATED_MS: i64 = 1_800_000_000_000;
const LATER_MS: i64 = CREATED_MS + 1_000;

/// A migrated scratch schema and a connection to it, set up as Blox's.
async fn migrated(name: &str) -> (Scratch, PgConnection) {
    let scratch = Scratch::new(TestDatabase::Postgres, name);
    backend::open(&scratch.url, &OpenOptions::default())
        .await
        .expect("the schema migrates");
    let connect = postgres::connect_options(&scratch.url).expect("the URL parses");
    let connection = PgConnection::connect_with(&connect)
        .await
        .expect("PostgreSQL is up");
    (scratch, connection)
}

/// Writes `value` to `key` of a store of `kind` with Blox's upsert, at `now_ms`.
async fn upsert(connection: &mut PgConnection, kind: i16, key: &str, value: &str, now_ms: i64) {
    write_row(connection, kind, key, value, now_ms, false).await;
}

/// Blox's upsert of `key`, a tombstone when `deleted`.
async fn write_row(
    connection: &mut PgConnection,
    kind: i16,
    key: &str,
    value: &str,
    now_ms: i64,
    deleted: bool,
) {
    sqlx::query(postgres::STATEMENTS.write)
        .bind(UNIVERSE)
        .bind(kind)
        .bind("Store")
        .bind("global")
        .bind(key)
        .bind(value)
        .bind("[]")
        .bind("{}")
        .bind(now_ms)
        .bind(deleted)
        .bind(false)
        .fetch_one(&mut *connection)
        .await
        .expect("the upsert runs");
}

/// The updates of `blox_entries` in the current transaction so far, and how many were HOT.
async fn updates(connection: &mut PgConnection) -> (i64, i64) {
    sqlx::query_as(
        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables \
         WHERE relid = 'blox_entries'::regclass",
    )
    .fetch_one(&mut *connection)
    .await
    .expect("the transaction's statistics")
}

#[tokio::test]
async fn writes_to_a_live_entry_update_its_row_in_place() {
    let (_scratch, mut connection) = migrated("updates_in_place").await;
    upsert(
        &mut connection,
        STANDARD,
        "player",
        "{\"Money\":1}",
        CREATED_MS,
    )
    .await;
    upsert(&mut connection, ORDERED, "score", "10", CREATED_MS).await;

    let mut transaction = connection.begin().await.unwrap();
    upsert(
        &mut transaction,
        STANDARD,
        "player",
        "{\"Money\":2}",
        LATER_MS,
    )
    .await;
    assert_eq!(updates(&mut transaction).await, (1, 1), "SetAsync's upsert");

    let compared = sqlx::query(postgres::STATEMENTS.update_if_seq)
        .bind(UNIVERSE)
        .bind(STANDARD)
        .bind("Store")
        .bind("global")
        .bind("player")
        .bind("{\"Money\":3}")
        .bind("[1]")
        .bind("{\"a\":1}")
        .bind(2_i64)
        .bind(3_i64)
        .bind(CREATED_MS)
        .bind(LATER_MS + 1)
        .bind(false)
        .bind(false)
        .execute(&mut *transaction)
        .await
        .unwrap();
    assert_eq!(compared.rows_affected(), 1);
    assert_eq!(
        updates(&mut transaction).await,
        (2, 2),
        "UpdateAsync's compare-and-set"
    );

    // An ordered entry's value is its place in the sorted index, so its row moves.
    upsert(&mut transaction, ORDERED, "score", "11", LATER_MS).await;
    assert_eq!(updates(&mut transaction).await, (3, 2), "an ordered entry");
    transaction.rollback().await.unwrap();
}

/// The generic plan Blox's sessions run `statement` with (`plan_cache_mode =
/// force_generic_plan`), for `arguments`, with every other way to find rows turned off: the
/// scratch tables are too small for PostgreSQL to prefer an index on its own.
async fn plan(connection: &mut PgConnection, statement: &str, arguments: &str) -> String {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET enable_seqscan = off; SET enable_bitmapscan = off; \
         PREPARE planned AS {statement}"
    )))
    .execute(&mut *connection)
    .await
    .expect("the statement prepares");
    let lines: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN EXECUTE planned({arguments})"
    )))
    .fetch_all(&mut *connection)
    .await
    .expect("the statement plans");
    sqlx::raw_sql("DEALLOCATE planned")
        .execute(&mut *connection)
        .await
        .unwrap();
    lines.join("\n")
}

#[tokio::test]
async fn sorted_pages_and_the_tombstone_purge_use_their_indexes() {
    let (_scratch, mut connection) = migrated("generated_column_indexes").await;
    for (name, statement, index) in [
        (
            "sorted_ascending",
            postgres::STATEMENTS.sorted_ascending,
            "Index Only Scan using blox_entries_sorted",
        ),
        (
            "sorted_descending",
            postgres::STATEMENTS.sorted_descending,
            "Index Only Scan Backward using blox_entries_sorted",
        ),
    ] {
        let page = "7, 'Store', 'global', 0, 100, 0, '', 10";
        let plan = plan(&mut connection, statement, page).await;
        assert!(plan.contains(index), "{name}:\n{plan}");
    }
    let cutoff = LATER_MS.to_string();
    let plan = plan(
        &mut connection,
        postgres::STATEMENTS.purge_tombstones,
        &cutoff,
    )
    .await;
    assert!(
        plan.contains("using blox_entries_tombstone_age"),
        "purge_tombstones:\n{plan}"
    );
}

#[tokio::test]
async fn a_database_of_an_earlier_blox_keeps_its_entries_when_upgraded() {
    let scratch = Scratch::new(TestDatabase::Postgres, "upgrade_to_updates_in_place");
    let earlier = tempfile::tempdir().expect("scratch folder");
    let migrations = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/postgres");
    for name in ["0001_entries.sql", "0002_versions.sql", "0003_ordered.sql"] {
        std::fs::copy(migrations.join(name), earlier.path().join(name)).unwrap();
    }
    let connect = postgres::connect_options(&scratch.url).unwrap();
    let mut connection = PgConnection::connect_with(&connect).await.unwrap();
    sqlx::migrate::Migrator::new(earlier.path())
        .await
        .unwrap()
        .run(&mut connection)
        .await
        .expect("the earlier schema");
    let day = 24 * 60 * 60 * 1000;
    upsert(&mut connection, ORDERED, "a", "5", day).await;
    upsert(&mut connection, ORDERED, "b", "-3", day).await;
    write_row(&mut connection, STANDARD, "gone", "null", day, true).await;

    let upgraded = backend::open(&scratch.url, &OpenOptions::default())
        .await
        .expect("the upgrade applies");
    let page = upgraded
        .list_sorted(&SortedListing {
            universe: UNIVERSE,
            store: "Store".to_owned(),
            scope: "global".to_owned(),
            descending: false,
            min_value: i64::MIN,
            max_value: i64::MAX,
            after: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(page, [("b".to_owned(), -3), ("a".to_owned(), 5)]);
    assert_eq!(
        upgraded.purge(32 * day).await.unwrap(),
        1,
        "the old tombstone"
    );
    let gone = EntryKey {
        universe: UNIVERSE,
        kind: StoreKind::Standard,
        store: "Store".to_owned(),
        scope: "global".to_owned(),
        key: "gone".to_owned(),
    };
    assert_eq!(upgraded.read(&gone).await.unwrap(), None);
}
