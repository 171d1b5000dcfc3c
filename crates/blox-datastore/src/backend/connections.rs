//! A bounded set of database connections that statements borrow one at a time: both backends
//! hand out their connections from these, SQLite as one writer and four readers, PostgreSQL
//! as one set sized to the machine.
//!
//! Not sqlx's pool: it pings every connection that comes back to it, unconditionally, and by
//! default every one it hands out. For SQLite a ping is a round trip to the connection's
//! worker thread; for PostgreSQL a round trip to the server, as costly as the point read it
//! follows (measured: raw reads through the pool at about half the rate of reads through
//! connections held directly, BENCHMARKS.md session 5). Instead, a connection proves itself by
//! the statement it ran: the backend passes each statement's result through
//! [`Lease::checked`], and a connection that was used and did not end on a success (an error,
//! or a statement abandoned halfway) is closed instead of going back; the next borrower of its
//! slot opens a fresh one. A connection that sat idle longer than the set's ping interval is
//! pinged before it is handed out, so the ones a database restart broke while idle are
//! replaced before any request uses them.
//!
//! Like a pool, a set opens connections as they are needed (one at once, so a bad address or
//! password is reported at start) and can close the ones that idled too long: many servers on
//! one PostgreSQL then hold connections for their load, not for their size.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::{ConnectOptions as _, Connection};
use tokio::sync::{Semaphore, SemaphorePermit};

/// How a [`ConnectionSet`] keeps its connections.
#[derive(Debug, Clone, Copy)]
pub struct SetLimits {
    /// The most connections open at once.
    pub size: usize,
    /// How long a statement waits for a connection before failing, as a pool's acquire
    /// timeout; also the limit on opening a connection and on a ping.
    pub timeout: Duration,
    /// A connection idle for longer than this is pinged before it is handed out; `None` for a
    /// database that cannot drop a connection (an embedded one).
    pub ping_after_idle: Option<Duration>,
    /// A connection idle for longer than this is closed when another one comes back; `None`
    /// keeps every connection once opened.
    pub close_after_idle: Option<Duration>,
}

/// Up to [`SetLimits::size`] connections made from one set of options.
#[derive(Debug)]
pub struct ConnectionSet<C: Connection> {
    shared: Arc<Shared<C>>,
}

impl<C: Connection> Clone for ConnectionSet<C> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

#[derive(Debug)]
struct Shared<C: Connection> {
    options: C::Options,
    /// Idle connections with the time each came back, the most recent last. Fewer than the
    /// free permits while some slots have no connection open: their next borrower opens one.
    idle: Mutex<Vec<(C, Instant)>>,
    /// One permit per slot; waiters are served in order.
    available: Semaphore,
    limits: SetLimits,
}

/// A connection borrowed from a [`ConnectionSet`], back in the set when dropped if its last
/// use succeeded.
#[derive(Debug)]
pub struct Lease<'a, C: Connection> {
    connection: Option<C>,
    /// False from the moment the connection is borrowed mutably (a statement starts) until
    /// [`Lease::checked`] sees that statement succeed.
    clean: bool,
    set: &'a Shared<C>,
    _permit: SemaphorePermit<'a>,
}

impl<C: Connection> ConnectionSet<C> {
    /// A set within `limits`, with one connection opened at once: a database that cannot be
    /// reached fails here, not at the first request.
    pub async fn connect(options: C::Options, limits: SetLimits) -> Result<Self, sqlx::Error> {
        let shared = Shared::empty(options, limits);
        if limits.size > 0 {
            let first = shared.open().await?;
            shared.lock_idle().push((first, Instant::now()));
        }
        Ok(Self {
            shared: Arc::new(shared),
        })
    }

    /// An empty set with the same options and limits, whose connections open when first
    /// borrowed: a socket belongs to the Tokio runtime it is opened in, so a set made for one
    /// VM and first used from the VM's thread is driven by the VM's own runtime.
    pub fn sibling(&self) -> Self {
        let set = &*self.shared;
        Self {
            shared: Arc::new(Shared::empty(set.options.clone(), set.limits)),
        }
    }

    /// A working connection, waiting for one to come back when all are out: an idle one
    /// (pinged first if it idled too long, replaced if the ping fails) or a new one.
    pub async fn acquire(&self) -> Result<Lease<'_, C>, sqlx::Error> {
        let set = &*self.shared;
        let permit = tokio::time::timeout(set.limits.timeout, set.available.acquire())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let idle = set.lock_idle().pop();
        let connection = match idle {
            Some((mut connection, since)) => {
                let stale = set
                    .limits
                    .ping_after_idle
                    .is_some_and(|limit| since.elapsed() > limit);
                if stale && !set.answers(&mut connection).await {
                    drop(connection);
                    set.open().await?
                } else {
                    connection
                }
            }
            None => set.open().await?,
        };
        Ok(Lease {
            connection: Some(connection),
            clean: true,
            set,
            _permit: permit,
        })
    }

    /// How many connections are open: the idle ones and one per lease (a slot whose
    /// connection was closed holds neither).
    #[cfg(test)]
    fn open_connections(&self) -> usize {
        let set = &*self.shared;
        let lent = set.limits.size - set.available.available_permits();
        set.lock_idle().len() + lent
    }
}

impl<C: Connection> Shared<C> {
    /// A set with every slot free and no connection open yet.
    fn empty(options: C::Options, limits: SetLimits) -> Self {
        Self {
            options,
            idle: Mutex::new(Vec::with_capacity(limits.size)),
            available: Semaphore::new(limits.size),
            limits,
        }
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<(C, Instant)>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes `connection` back, closing the idle ones that waited past the close limit.
    fn take_back(&self, connection: C) {
        let now = Instant::now();
        let mut idle = self.lock_idle();
        if let Some(limit) = self.limits.close_after_idle {
            idle.retain(|(_, since)| now.duration_since(*since) <= limit);
        }
        idle.push((connection, now));
    }

    /// Whether `connection` answers a ping within the set's timeout: a server that vanished
    /// without closing the socket would otherwise hold the request until TCP gives up.
    async fn answers(&self, connection: &mut C) -> bool {
        matches!(
            tokio::time::timeout(self.limits.timeout, connection.ping()).await,
            Ok(Ok(()))
        )
    }

    /// A new connection for a slot that has none.
    async fn open(&self) -> Result<C, sqlx::Error> {
        tokio::time::timeout(self.limits.timeout, self.options.connect())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
    }
}

impl<C: Connection> Lease<'_, C> {
    /// Passes a statement's `result` through, noting whether the connection is fit to go
    /// back to the set: after an error it is closed instead, whatever the error was (a broken
    /// connection and a refused statement look alike from here, and reconnecting is cheap
    /// next to a failed request).
    pub fn checked<T>(&mut self, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        self.clean = result.is_ok();
        result
    }
}

impl<C: Connection> std::ops::Deref for Lease<'_, C> {
    type Target = C;

    fn deref(&self) -> &C {
        self.connection
            .as_ref()
            .expect("a lease holds its connection until dropped")
    }
}

impl<C: Connection> std::ops::DerefMut for Lease<'_, C> {
    fn deref_mut(&mut self) -> &mut C {
        self.clean = false;
        self.connection
            .as_mut()
            .expect("a lease holds its connection until dropped")
    }
}

impl<C: Connection> Drop for Lease<'_, C> {
    fn drop(&mut self) {
        // The permit is a field, released after this body: the connection is idle again (or
        // closed, its slot free to reconnect) before anyone may take it.
        if let Some(connection) = self.connection.take()
            && self.clean
        {
            self.set.take_back(connection);
        }
    }
}

#[cfg(test)]
mod tests {
    use sqlx::SqliteConnection;
    use sqlx::sqlite::SqliteConnectOptions;

    use super::*;

    /// Limits for a set of `size` that never pings or closes an idle connection.
    fn limits(size: usize) -> SetLimits {
        SetLimits {
            size,
            timeout: Duration::from_millis(50),
            ping_after_idle: None,
            close_after_idle: None,
        }
    }

    /// A set of `size` connections to a database file in a fresh folder, removed with it.
    async fn scratch_set(size: usize) -> (tempfile::TempDir, ConnectionSet<SqliteConnection>) {
        scratch_set_within(limits(size)).await
    }

    async fn scratch_set_within(
        limits: SetLimits,
    ) -> (tempfile::TempDir, ConnectionSet<SqliteConnection>) {
        let folder = tempfile::tempdir().unwrap();
        let options = SqliteConnectOptions::new()
            .filename(folder.path().join("test.sqlite3"))
            .create_if_missing(true);
        let set = ConnectionSet::connect(options, limits).await.unwrap();
        (folder, set)
    }

    /// Marks the connection of `lease` with a temporary table, which only it can see.
    async fn mark(lease: &mut Lease<'_, SqliteConnection>) {
        let done = sqlx::query("CREATE TEMP TABLE marker (x)")
            .execute(&mut **lease)
            .await;
        lease.checked(done).unwrap();
    }

    /// Whether the connection of `lease` is the one [`mark`] marked.
    async fn is_marked(lease: &mut Lease<'_, SqliteConnection>) -> bool {
        let done = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM temp.sqlite_master WHERE name = 'marker'",
        )
        .fetch_one(&mut **lease)
        .await;
        lease.checked(done).unwrap() == 1
    }

    #[tokio::test]
    async fn waiting_longer_than_the_timeout_fails_as_a_pool_timeout_would() {
        let (_folder, writer) = scratch_set(1).await;
        let held = writer.acquire().await.unwrap();
        assert!(matches!(
            writer.acquire().await,
            Err(sqlx::Error::PoolTimedOut)
        ));
        drop(held);
        assert!(writer.acquire().await.is_ok(), "free again once released");
    }

    #[tokio::test]
    async fn each_connection_is_handed_out_once_and_comes_back_after_a_success() {
        let (_folder, readers) = scratch_set(2).await;
        let mut first = readers.acquire().await.unwrap();
        let second = readers.acquire().await.unwrap();
        assert!(
            matches!(readers.acquire().await, Err(sqlx::Error::PoolTimedOut)),
            "both connections are out"
        );
        mark(&mut first).await;
        drop(first);
        let mut again = readers.acquire().await.unwrap();
        assert!(is_marked(&mut again).await, "the same connection came back");
        drop((again, second));
    }

    #[tokio::test]
    async fn a_connection_whose_statement_failed_or_was_abandoned_is_replaced() {
        for failed in [true, false] {
            let (_folder, writer) = scratch_set(1).await;
            let mut lease = writer.acquire().await.unwrap();
            mark(&mut lease).await;
            if failed {
                let done = sqlx::query("SELECT * FROM no_such_table")
                    .execute(&mut *lease)
                    .await;
                assert!(lease.checked(done).is_err());
            } else {
                // A statement that never reported back, as when its future is dropped halfway.
                let _ = &mut *lease;
            }
            drop(lease);
            let mut next = writer.acquire().await.unwrap();
            assert!(
                !is_marked(&mut next).await,
                "a fresh connection took the slot (statement failed: {failed})"
            );
        }
    }

    #[tokio::test]
    async fn an_idle_connection_that_answers_its_ping_is_kept() {
        let always_ping = SetLimits {
            ping_after_idle: Some(Duration::ZERO),
            ..limits(1)
        };
        let (_folder, set) = scratch_set_within(always_ping).await;
        let mut lease = set.acquire().await.unwrap();
        mark(&mut lease).await;
        drop(lease);
        let mut next = set.acquire().await.unwrap();
        assert!(
            is_marked(&mut next).await,
            "pinged, answered, handed out again"
        );
    }

    #[tokio::test]
    async fn a_lease_never_used_mutably_goes_back_as_it_was() {
        let (_folder, writer) = scratch_set(1).await;
        let mut lease = writer.acquire().await.unwrap();
        mark(&mut lease).await;
        drop(lease);
        let untouched = writer.acquire().await.unwrap();
        drop(untouched);
        let mut next = writer.acquire().await.unwrap();
        assert!(is_marked(&mut next).await);
    }

    #[tokio::test]
    async fn connections_open_as_they_are_needed() {
        let (_folder, set) = scratch_set(3).await;
        assert_eq!(
            set.open_connections(),
            1,
            "one at once, to report a bad database early"
        );
        let leases = (
            set.acquire().await.unwrap(),
            set.acquire().await.unwrap(),
            set.acquire().await.unwrap(),
        );
        assert_eq!(set.open_connections(), 3);
        drop(leases);
        let _again = set.acquire().await.unwrap();
        assert_eq!(
            set.open_connections(),
            3,
            "idle ones are reused, not reopened"
        );
    }

    #[tokio::test]
    async fn connections_idle_past_the_limit_close_when_another_comes_back() {
        let close_at_once = SetLimits {
            close_after_idle: Some(Duration::ZERO),
            ..limits(3)
        };
        let (_folder, set) = scratch_set_within(close_at_once).await;
        let (first, second) = (set.acquire().await.unwrap(), set.acquire().await.unwrap());
        assert_eq!(set.open_connections(), 2);
        drop(first);
        tokio::time::sleep(Duration::from_millis(2)).await;
        drop(second);
        assert_eq!(
            set.open_connections(),
            1,
            "the one that idled was closed, the one that just came back kept"
        );
        assert!(set.acquire().await.is_ok());
    }

    #[tokio::test]
    async fn a_sibling_starts_empty_and_opens_its_own_connections() {
        let (_folder, set) = scratch_set(2).await;
        let mut lease = set.acquire().await.unwrap();
        mark(&mut lease).await;
        drop(lease);
        let sibling = set.sibling();
        assert_eq!(sibling.open_connections(), 0);
        let mut own = sibling.acquire().await.unwrap();
        assert!(!is_marked(&mut own).await, "a connection of its own");
        drop(own);
        assert_eq!(sibling.open_connections(), 1);
        assert_eq!(set.open_connections(), 1);
    }

    #[tokio::test]
    async fn a_replaced_connection_is_counted_once() {
        let (_folder, writer) = scratch_set(1).await;
        let mut lease = writer.acquire().await.unwrap();
        let _ = &mut *lease;
        drop(lease);
        assert_eq!(writer.open_connections(), 0, "closed, not yet reopened");
        let _next = writer.acquire().await.unwrap();
        assert_eq!(writer.open_connections(), 1);
    }
}
