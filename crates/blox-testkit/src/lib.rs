//! Test databases for Blox's suites: a fresh SQLite file or a fresh PostgreSQL schema per
//! test, removed afterwards.
//!
//! Tests run against real databases, never mocks. PostgreSQL must be reachable (`.ci/run`
//! starts or installs it); when it is not, the tests fail rather than skip.

use std::path::PathBuf;

/// The PostgreSQL server the tests use; `.ci/run` makes sure it is up.
pub fn postgres_url() -> String {
    std::env::var("BLOX_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Which backend a test runs against.
#[derive(Debug, Clone, Copy)]
pub enum TestDatabase {
    /// A SQLite file in a temporary folder.
    Sqlite,
    /// A schema of its own on the test PostgreSQL server.
    Postgres,
}

/// A database that exists for one test.
#[derive(Debug)]
pub struct Scratch {
    /// The URL a `blox` process or a `Host` opens.
    pub url: String,
    _folder: Option<tempfile::TempDir>,
    schema: Option<String>,
}

impl Scratch {
    /// Creates a fresh database for the test called `name`.
    pub fn new(kind: TestDatabase, name: &str) -> Self {
        match kind {
            TestDatabase::Sqlite => {
                let folder = tempfile::tempdir().expect("temp folder");
                let path: PathBuf = folder.path().join("datastore.sqlite3");
                Self {
                    url: format!("sqlite://{}", path.display()),
                    _folder: Some(folder),
                    schema: None,
                }
            }
            TestDatabase::Postgres => {
                let schema = format!(
                    "blox_test_{}_{}_{}",
                    name.replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .subsec_nanos()
                );
                psql(&format!("CREATE SCHEMA \"{schema}\""));
                Self {
                    url: format!("{}?options=-c%20search_path%3D{schema}", postgres_url()),
                    _folder: None,
                    schema: Some(schema),
                }
            }
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(schema) = &self.schema {
            psql(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"));
        }
    }
}

/// Runs one statement on the test server; panics if the server is not there, so a missing
/// PostgreSQL fails the suite instead of skipping it. Runs on a thread of its own, so it works
/// from inside a Tokio runtime as well as outside one.
pub fn psql(statement: &str) {
    let statement = statement.to_owned();
    let outcome = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| error.to_string())?;
        runtime.block_on(async {
            use sqlx::Connection as _;
            let mut connection =
                sqlx::PgConnection::connect(&postgres_url())
                    .await
                    .map_err(|error| {
                        format!("PostgreSQL at {} is required: {error}", postgres_url())
                    })?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement.clone()))
                .execute(&mut connection)
                .await
                .map_err(|error| format!("{statement}: {error}"))?;
            Ok::<(), String>(())
        })
    })
    .join();
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(message)) => panic!("{message}"),
        Err(_) => panic!("the PostgreSQL helper thread panicked"),
    }
}
