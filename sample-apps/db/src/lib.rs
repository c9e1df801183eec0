//! The sample shop's database layer: each app's store runs the same SQL on SQLite or on
//! PostgreSQL, picked by its `--database-url` (`sqlite://PATH` or `postgres://...`).
//!
//! A store declares its schema as a list of [`Migration`]s and writes its queries once, with
//! PostgreSQL's `$1, $2...` placeholders (rewritten to SQLite's `?1, ?2...`) and values as
//! [`Value`]s (integers and text, what the shop stores). [`Database::prepare`] connects, applies
//! the pending migrations (once, however many replicas start together) and inserts seed rows;
//! against PostgreSQL it retries while the server cannot be reached, for a bounded time, saying
//! so in the log. After that, a server that goes away makes queries fail with an error that
//! [`DbError::is_unavailable`] recognises (an app answers 503), and the pool connects again on
//! its own once the server is back.
//!
//! This is shop code, not mesh code: nothing here knows about Ferrule. In the mesh the
//! PostgreSQL URL simply names the sidecar's local port for the database.

mod postgres;
mod sqlite;
#[cfg(feature = "test-server")]
pub mod test_server;
mod url;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

pub use url::DatabaseUrl;

/// Pause between two connection attempts while a database is not reachable at start.
const RETRY_EVERY: Duration = Duration::from_millis(500);

/// One schema change. Most are the same SQL on both backends ([`Migration::portable`]); where
/// the dialects differ, each gets its own text for the same change.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

impl Migration {
    /// The same SQL on both backends.
    pub const fn portable(sql: &'static str) -> Self {
        Self {
            sqlite: sql,
            postgres: sql,
        }
    }
}

/// A value bound to a placeholder or read from a column: the shop only stores integers and
/// text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}

impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Self::Int(v.into())
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Self::Int(v.into())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Self::Text(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Self::Text(v.to_string())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Self::Null, Into::into)
    }
}

/// One row of a result, its columns in `SELECT` order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row(Vec<Value>);

impl Row {
    fn column(&self, i: usize) -> Result<&Value, DbError> {
        self.0
            .get(i)
            .ok_or_else(|| DbError::Column(format!("no column {i} in a row of {}", self.0.len())))
    }

    /// Column `i` as text; an error when it is NULL or a number.
    pub fn text(&self, i: usize) -> Result<String, DbError> {
        match self.column(i)? {
            Value::Text(s) => Ok(s.clone()),
            other => Err(DbError::Column(format!(
                "column {i} is {other:?}, not text"
            ))),
        }
    }

    /// Column `i` as text, `None` for NULL.
    pub fn opt_text(&self, i: usize) -> Result<Option<String>, DbError> {
        match self.column(i)? {
            Value::Null => Ok(None),
            _ => self.text(i).map(Some),
        }
    }

    /// Column `i` as an integer of type `T`; an error when it is NULL, text, or out of `T`'s
    /// range.
    pub fn int<T: TryFrom<i64>>(&self, i: usize) -> Result<T, DbError> {
        match self.column(i)? {
            Value::Int(n) => T::try_from(*n).map_err(|_| {
                DbError::Column(format!(
                    "column {i} holds {n}, out of range for {}",
                    std::any::type_name::<T>()
                ))
            }),
            other => Err(DbError::Column(format!(
                "column {i} is {other:?}, not an integer"
            ))),
        }
    }
}

/// A statement and the values of its placeholders, for [`Database::atomically`] and seeds.
#[derive(Debug, Clone)]
pub struct Statement {
    pub sql: &'static str,
    pub params: Vec<Value>,
}

impl Statement {
    pub fn new(sql: &'static str, params: Vec<Value>) -> Self {
        Self { sql, params }
    }
}

/// What went wrong with the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The server cannot be reached, or went away: the caller should answer "try again later".
    #[error("database {url} unavailable: {reason}")]
    Unavailable { url: String, reason: String },
    /// [`Database::prepare`] has not finished yet.
    #[error("database {url} not ready yet: still connecting and migrating")]
    NotReady { url: String },
    /// The database's schema is newer than this build: an older binary must not touch it.
    #[error(
        "database {url} has schema version {found}, newer than the {known} this build knows: \
         it was migrated by a newer version of the app; run that version (or a newer one)"
    )]
    NewerSchema { url: String, found: i64, known: i64 },
    /// A statement failed (a bug, or a constraint).
    #[error("database {url}: {reason}")]
    Query { url: String, reason: String },
    /// A column did not hold what the store expected.
    #[error("unexpected database column: {0}")]
    Column(String),
}

impl DbError {
    /// True when the database could not be reached (answer 503 / UNAVAILABLE), as opposed to a
    /// statement that failed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::NotReady { .. })
    }
}

enum Backend {
    Sqlite(sqlite::Sqlite),
    Postgres(postgres::Postgres),
}

struct Inner {
    url: DatabaseUrl,
    backend: Backend,
    migrations: &'static [Migration],
    prepared: AtomicBool,
}

/// An app's database: a connection pool over one backend. Cheap to clone.
#[derive(Clone)]
pub struct Database {
    inner: Arc<Inner>,
}

impl Database {
    /// The database at `url` with the schema `migrations`. Nothing is connected yet: see
    /// [`Database::prepare`]. Must run inside a tokio runtime.
    pub fn new(url: &DatabaseUrl, migrations: &'static [Migration]) -> Result<Self, DbError> {
        let backend = match url {
            DatabaseUrl::Sqlite(path) => Backend::Sqlite(sqlite::Sqlite::new(url, path.clone())),
            DatabaseUrl::Postgres { config, .. } => {
                Backend::Postgres(postgres::Postgres::new(url, config)?)
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                url: url.clone(),
                backend,
                migrations,
                prepared: AtomicBool::new(false),
            }),
        })
    }

    pub fn url(&self) -> &DatabaseUrl {
        &self.inner.url
    }

    /// Connects, applies the pending migrations and runs `seed` (statements that must be
    /// idempotent, such as `INSERT ... ON CONFLICT DO NOTHING`); returns the rows each seed
    /// statement changed. While the server cannot be reached it tries again, logging why, for
    /// up to `wait`. Safe to run again, and from several processes at once.
    pub async fn prepare(&self, wait: Duration, seed: &[Statement]) -> Result<Vec<u64>, DbError> {
        let deadline = Instant::now() + wait;
        let mut attempt = 1_u32;
        loop {
            let result = match &self.inner.backend {
                Backend::Sqlite(db) => db.prepare(self.inner.migrations, seed).await,
                Backend::Postgres(db) => db.prepare(self.inner.migrations, seed).await,
            };
            match result {
                Ok(changed) => {
                    self.inner.prepared.store(true, Ordering::Release);
                    return Ok(changed);
                }
                Err(error) if error.is_unavailable() && Instant::now() < deadline => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    tracing::warn!(
                        %error,
                        attempt,
                        retrying_for = ?Duration::from_secs(left.as_secs()),
                        "database not reachable yet; retrying"
                    );
                    attempt += 1;
                    tokio::time::sleep(RETRY_EVERY.min(left)).await;
                }
                Err(error) if error.is_unavailable() => {
                    return Err(DbError::Unavailable {
                        url: self.inner.url.to_string(),
                        reason: format!(
                            "still unreachable after {attempt} attempts in {wait:?} \
                             (--database-wait): {error}"
                        ),
                    });
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn ready(&self) -> Result<(), DbError> {
        if self.inner.prepared.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(DbError::NotReady {
                url: self.inner.url.to_string(),
            })
        }
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), DbError> {
        self.query("SELECT 1", Vec::new()).await.map(drop)
    }

    /// All rows `sql` returns.
    pub async fn query(&self, sql: &'static str, params: Vec<Value>) -> Result<Vec<Row>, DbError> {
        self.ready()?;
        match &self.inner.backend {
            Backend::Sqlite(db) => db.query(sql, params).await,
            Backend::Postgres(db) => db.query(sql, params).await,
        }
    }

    /// The first row `sql` returns, if any.
    pub async fn query_opt(
        &self,
        sql: &'static str,
        params: Vec<Value>,
    ) -> Result<Option<Row>, DbError> {
        Ok(self.query(sql, params).await?.into_iter().next())
    }

    /// Runs `sql`; returns how many rows it changed.
    pub async fn execute(&self, sql: &'static str, params: Vec<Value>) -> Result<u64, DbError> {
        Ok(self
            .atomically(vec![Statement::new(sql, params)])
            .await?
            .into_iter()
            .sum())
    }

    /// Runs `statements` in one transaction: all or none. Returns how many rows each changed.
    pub async fn atomically(&self, statements: Vec<Statement>) -> Result<Vec<u64>, DbError> {
        self.ready()?;
        match &self.inner.backend {
            Backend::Sqlite(db) => db.atomically(statements).await,
            Backend::Postgres(db) => db.atomically(statements).await,
        }
    }
}
