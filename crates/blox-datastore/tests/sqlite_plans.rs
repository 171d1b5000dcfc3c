//! SQLite's query plans for the statements that compare the store kind as `+?2` (see
//! `backend::sqlite::STATEMENTS`): the expression keeps SQLite from re-preparing them on every
//! execution, and these tests make sure it does not cost the primary-key search.

use blox_datastore::backend::{OpenOptions, SqliteBackend, sqlite};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};

async fn plan(pool: &SqlitePool, statement: &str) -> String {
    let rows: Vec<(i64, i64, i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "EXPLAIN QUERY PLAN {statement}"
    )))
    .fetch_all(pool)
    .await
    .expect("the statement prepares");
    rows.into_iter()
        .map(|row| row.3)
        .collect::<Vec<_>>()
        .join("; ")
}

#[tokio::test]
async fn statements_on_keys_and_stores_search_the_primary_key() {
    let folder = tempfile::tempdir().expect("scratch folder");
    let path = folder.path().join("plans.sqlite3");
    SqliteBackend::open(&path, &OpenOptions::default())
        .await
        .expect("the database opens and migrates");
    let pool = SqlitePool::connect_with(SqliteConnectOptions::new().filename(&path))
        .await
        .expect("a second connection");
    let statements = &sqlite::STATEMENTS;
    let whole_key =
        "PRIMARY KEY (universe_id=? AND store_kind=? AND store_name=? AND scope=? AND entry_key=?";
    let store_prefix = "PRIMARY KEY (universe_id=? AND store_kind=? AND store_name";
    for (name, statement, expected) in [
        ("read", statements.read, whole_key),
        ("update_if_seq", statements.update_if_seq, whole_key),
        ("read_version", statements.read_version, whole_key),
        ("read_version_at", statements.read_version_at, whole_key),
        (
            "list_versions_ascending",
            statements.list_versions_ascending,
            whole_key,
        ),
        (
            "list_versions_descending",
            statements.list_versions_descending,
            whole_key,
        ),
        ("remove_version", statements.remove_version, whole_key),
        (
            "erase_latest_version",
            statements.erase_latest_version,
            whole_key,
        ),
        ("delete", statements.delete, whole_key),
        (
            "list_keys_in_scope",
            statements.list_keys_in_scope,
            store_prefix,
        ),
        (
            "list_keys_across_scopes",
            statements.list_keys_across_scopes,
            store_prefix,
        ),
        ("list_stores", statements.list_stores, store_prefix),
    ] {
        assert!(
            statement.contains("store_kind = +?2"),
            "{name}: {statement}"
        );
        let plan = plan(&pool, statement).await;
        assert!(plan.contains(expected), "{name}: {plan}");
    }
}
