//! The transport behind MessagingService: messages published on one Blox server reach every
//! server of the same universe that shares the database, the publisher included.
//!
//! Servers already share a database, so that is the message bus too; nothing else has to be
//! deployed. PostgreSQL delivers with `NOTIFY`/`LISTEN` on one channel (a push, typically
//! within a millisecond; the payload carries universe, topic, data and send time). SQLite has
//! no notifications between processes, so messages go into a table that every listening
//! server polls every 50 ms and that is trimmed of messages older than a minute. Delivery is
//! best effort and unordered across servers, as Roblox documents for MessagingService.
//!
//! A bus costs nothing until it is used: its pool connects on the first publish, and a server
//! starts listening (the PostgreSQL `LISTEN` connection, the SQLite poll) only when it first
//! subscribes ([`Bus::listen`]), so games that never use MessagingService pay for none of it.

use std::path::Path;
use std::str::FromStr as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use tokio::sync::{OnceCell, mpsc};

/// The PostgreSQL notification channel every Blox server listens on.
const CHANNEL: &str = "blox_messages";
/// How often a SQLite server looks for new messages.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long a SQLite message stays in the table for slow pollers.
const KEEP_MESSAGES_MS: i64 = 60_000;

/// One message on the bus.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The universe whose servers receive it.
    pub universe: i64,
    /// The topic subscribers listen to.
    pub topic: String,
    /// The message's value, as JSON text.
    pub data: String,
    /// When it was published (Unix milliseconds).
    pub sent_ms: i64,
}

impl Message {
    /// A message for `universe` on `topic`, sent now.
    pub fn new(universe: i64, topic: String, data: String) -> Self {
        let sent_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_millis() as i64);
        Self {
            universe,
            topic,
            data,
            sent_ms,
        }
    }

    fn to_json(&self) -> String {
        serde_json::json!({
            "universe": self.universe,
            "topic": self.topic,
            "data": self.data,
            "sent": self.sent_ms,
        })
        .to_string()
    }

    fn from_json(text: &str) -> Option<Self> {
        let value: serde_json::Value = serde_json::from_str(text).ok()?;
        Some(Self {
            universe: value["universe"].as_i64()?,
            topic: value["topic"].as_str()?.to_owned(),
            data: value["data"].as_str()?.to_owned(),
            sent_ms: value["sent"].as_i64()?,
        })
    }
}

/// A failure of the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The database URL is neither SQLite nor PostgreSQL.
    #[error("invalid database URL {0:?} for messaging")]
    InvalidUrl(String),
    /// The database refused or could not be reached.
    #[error("messaging database error")]
    Database(#[from] sqlx::Error),
}

/// Publishes messages, and delivers the universe's messages once told to listen.
#[async_trait]
pub trait Bus: Send + Sync + std::fmt::Debug {
    /// Sends `message` to every listening server of its universe.
    async fn publish(&self, message: &Message) -> Result<(), BusError>;

    /// Starts delivering the universe's messages to the receiver [`open`] returned. Only the
    /// first call does anything.
    async fn listen(&self) -> Result<(), BusError>;
}

/// The bus of the database at `url` (the same URL as the DataStore's) for `universe`, and the
/// receiver its messages arrive on once [`Bus::listen`] has been called. Connects nothing yet.
pub fn open(
    url: &str,
    universe: i64,
) -> Result<(Arc<dyn Bus>, mpsc::UnboundedReceiver<Message>), BusError> {
    let (deliver, received) = mpsc::unbounded_channel();
    let deliver = Mutex::new(Some(deliver));
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let pool = PgPoolOptions::new().max_connections(2).connect_lazy(url)?;
        return Ok((
            Arc::new(PostgresBus {
                pool,
                universe,
                deliver,
            }),
            received,
        ));
    }
    let path = url
        .strip_prefix("sqlite://")
        .or(url.strip_prefix("sqlite:"))
        .filter(|path| !path.is_empty())
        .ok_or_else(|| BusError::InvalidUrl(url.to_owned()))?;
    let connect = SqliteConnectOptions::from_str("sqlite:")?
        .filename(Path::new(path))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(2)
        .connect_lazy_with(connect);
    Ok((
        Arc::new(SqliteBus {
            pool,
            universe,
            table: OnceCell::new(),
            deliver,
        }),
        received,
    ))
}

/// Takes the delivery end out of its slot: `Some` on the first call only.
fn take_delivery(
    slot: &Mutex<Option<mpsc::UnboundedSender<Message>>>,
) -> Option<mpsc::UnboundedSender<Message>> {
    slot.lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take()
}

/// Delivers the universe's new SQLite messages every [`POLL_INTERVAL`] and trims old ones.
async fn poll_sqlite(
    pool: SqlitePool,
    universe: i64,
    mut last: i64,
    deliver: mpsc::UnboundedSender<Message>,
) {
    let mut ticks = tokio::time::interval(POLL_INTERVAL);
    let mut polls: u64 = 0;
    loop {
        ticks.tick().await;
        polls += 1;
        let rows: Result<Vec<(i64, String, String, i64)>, _> = sqlx::query_as(
            "SELECT id, topic, data, sent_ms FROM blox_messages \
             WHERE id > ?1 AND universe_id = ?2 ORDER BY id",
        )
        .bind(last)
        .bind(universe)
        .fetch_all(&pool)
        .await;
        match rows {
            Ok(rows) => {
                for (id, topic, data, sent_ms) in rows {
                    last = id;
                    let message = Message {
                        universe,
                        topic,
                        data,
                        sent_ms,
                    };
                    if deliver.send(message).is_err() {
                        return;
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "polling for messages failed"),
        }
        if polls.is_multiple_of(200) {
            let cutoff =
                Message::new(universe, String::new(), String::new()).sent_ms - KEEP_MESSAGES_MS;
            let trimmed = sqlx::query("DELETE FROM blox_messages WHERE sent_ms < ?1")
                .bind(cutoff)
                .execute(&pool)
                .await;
            if let Err(error) = trimmed {
                tracing::warn!(%error, "trimming old messages failed");
            }
        }
    }
}

#[derive(Debug)]
struct PostgresBus {
    pool: PgPool,
    universe: i64,
    deliver: Mutex<Option<mpsc::UnboundedSender<Message>>>,
}

#[async_trait]
impl Bus for PostgresBus {
    async fn publish(&self, message: &Message) -> Result<(), BusError> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(message.to_json())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn listen(&self) -> Result<(), BusError> {
        let Some(deliver) = take_delivery(&self.deliver) else {
            return Ok(());
        };
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(CHANNEL).await?;
        let universe = self.universe;
        tokio::spawn(async move {
            loop {
                match listener.recv().await {
                    Ok(notification) => {
                        let Some(message) = Message::from_json(notification.payload()) else {
                            continue;
                        };
                        if message.universe == universe && deliver.send(message).is_err() {
                            return;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "messaging listener lost its connection; reconnecting");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok(())
    }
}

#[derive(Debug)]
struct SqliteBus {
    pool: SqlitePool,
    universe: i64,
    /// Set once the messages table exists.
    table: OnceCell<()>,
    deliver: Mutex<Option<mpsc::UnboundedSender<Message>>>,
}

impl SqliteBus {
    async fn ensure_table(&self) -> Result<(), BusError> {
        self.table
            .get_or_try_init(|| async {
                sqlx::query(
                    "CREATE TABLE IF NOT EXISTS blox_messages (id INTEGER PRIMARY KEY AUTOINCREMENT, \
                     universe_id INTEGER NOT NULL, topic TEXT NOT NULL, data TEXT NOT NULL, \
                     sent_ms INTEGER NOT NULL)",
                )
                .execute(&self.pool)
                .await
                .map(drop)
            })
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Bus for SqliteBus {
    async fn publish(&self, message: &Message) -> Result<(), BusError> {
        self.ensure_table().await?;
        sqlx::query(
            "INSERT INTO blox_messages (universe_id, topic, data, sent_ms) VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(message.universe)
        .bind(&message.topic)
        .bind(&message.data)
        .bind(message.sent_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn listen(&self) -> Result<(), BusError> {
        let Some(deliver) = take_delivery(&self.deliver) else {
            return Ok(());
        };
        self.ensure_table().await?;
        let (last,): (i64,) = sqlx::query_as("SELECT COALESCE(MAX(id), 0) FROM blox_messages")
            .fetch_one(&self.pool)
            .await?;
        tokio::spawn(poll_sqlite(self.pool.clone(), self.universe, last, deliver));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blox_testkit::{Scratch, TestDatabase};

    async fn crosses_between_servers(database: TestDatabase) {
        let scratch = Scratch::new(database, "messaging");
        let (first, mut first_inbox) = open(&scratch.url, 5).unwrap();
        let (second, mut second_inbox) = open(&scratch.url, 5).unwrap();
        let (elsewhere, mut other_universe) = open(&scratch.url, 6).unwrap();
        for bus in [&first, &second, &elsewhere] {
            bus.listen().await.unwrap();
        }
        let sent = Message::new(5, "Announcements".to_owned(), r#"{"text":"hi"}"#.to_owned());
        first.publish(&sent).await.unwrap();
        for inbox in [&mut first_inbox, &mut second_inbox] {
            let received = tokio::time::timeout(Duration::from_secs(5), inbox.recv())
                .await
                .expect("delivered in time")
                .expect("the bus is open");
            assert_eq!(received, sent, "every server, the publisher included");
        }
        let leaked = tokio::time::timeout(Duration::from_millis(300), other_universe.recv()).await;
        assert!(leaked.is_err(), "another universe hears nothing");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_messages_cross_between_servers() {
        crosses_between_servers(TestDatabase::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_messages_cross_between_servers() {
        crosses_between_servers(TestDatabase::Postgres).await;
    }
}
