//! The user service's own SQLite database: the `users` table, its migrations and its demo seed.
//!
//! rusqlite is synchronous, so every query runs on tokio's blocking pool behind one connection
//! (SQLite serialises writers anyway, and this service mostly reads).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

/// How long a statement waits for another connection's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema changes in order; `PRAGMA user_version` records how many have been applied.
const MIGRATIONS: &[&str] = &["CREATE TABLE users (
        user_id       TEXT PRIMARY KEY,
        username      TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        name          TEXT NOT NULL,
        email         TEXT NOT NULL,
        age           INTEGER NOT NULL
    )"];

/// Demo users created on first start: (user_id, username, argon2id hash of the password, name,
/// email, age). The passwords are "wonderland", "builder" and "christmas" (see the README);
/// shipping hashes keeps start-up fast and plaintext out of the database code.
const SEED: &[(&str, &str, &str, &str, &str, i32)] = &[
    (
        "123",
        "alice",
        "$argon2id$v=19$m=19456,t=2,p=1$eJu9jGRbpekdP1e/mWMDpQ$rv/UxCxMrN9iQ5hVN9MzKMxKhbgIwDUy0UUw3i/cZgY",
        "Alice Liddell",
        "alice@example.com",
        28,
    ),
    (
        "124",
        "bob",
        "$argon2id$v=19$m=19456,t=2,p=1$hj0SSNSNWEOlJpVCI9abvA$kmK98NiQLvC8ewKbHja7PjMKhq+8O8troumDmz997lw",
        "Bob Builder",
        "bob@example.com",
        36,
    ),
    (
        "125",
        "carol",
        "$argon2id$v=19$m=19456,t=2,p=1$sCOyuv/zgAOsMc10UYY11Q$W2Hun3cYDBdVnbQSbgp9MKVaEthdHApW/twjbCg7LpE",
        "Carol Singer",
        "carol@example.com",
        41,
    ),
];

/// A user as other services and the HTTP API see it (no credentials).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct User {
    pub user_id: String,
    pub name: String,
    pub email: String,
    pub age: i32,
}

impl From<User> for shop_proto::user::v1::User {
    fn from(user: User) -> Self {
        Self {
            user_id: user.user_id,
            name: user.name,
            email: user.email,
            age: user.age,
        }
    }
}

/// A query that could not run.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("user database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("user database task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

#[derive(Clone)]
pub(crate) struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl Store {
    /// Opens the database file, applies pending migrations and adds missing demo users.
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        let mut conn = Connection::open(path)?;
        // Replicas may share the file: wait for another process's write instead of failing.
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        migrate(&mut conn)?;
        seed(&conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `query` on the blocking pool with the connection.
    async fn call<T, F>(&self, query: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        let result = tokio::task::spawn_blocking(move || {
            // A panic while holding the lock cannot leave SQLite half-written: each statement
            // is atomic, so a poisoned lock is still safe to use.
            let conn = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            query(&conn)
        })
        .await?;
        Ok(result?)
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.call(|conn| conn.query_row("SELECT 1", [], |_| Ok(())))
            .await
    }

    pub async fn user(&self, user_id: String) -> Result<Option<User>, StoreError> {
        self.call(move |conn| {
            conn.query_row(
                "SELECT user_id, name, email, age FROM users WHERE user_id = ?1",
                [user_id],
                user_from_row,
            )
            .optional()
        })
        .await
    }

    /// At most `limit` users whose id sorts after `after`, in id order.
    pub async fn users_after(&self, after: String, limit: u32) -> Result<Vec<User>, StoreError> {
        self.call(move |conn| {
            conn.prepare_cached(
                "SELECT user_id, name, email, age FROM users
                 WHERE user_id > ?1 ORDER BY user_id LIMIT ?2",
            )?
            .query_map(params![after, limit], user_from_row)?
            .collect()
        })
        .await
    }

    /// The user with this username and their password hash (a PHC string).
    pub async fn credentials(
        &self,
        username: String,
    ) -> Result<Option<(User, String)>, StoreError> {
        self.call(move |conn| {
            conn.query_row(
                "SELECT user_id, name, email, age, password_hash FROM users WHERE username = ?1",
                [username],
                |row| Ok((user_from_row(row)?, row.get(4)?)),
            )
            .optional()
        })
        .await
    }
}

fn user_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        user_id: row.get(0)?,
        name: row.get(1)?,
        email: row.get(2)?,
        age: row.get(3)?,
    })
}

/// Applies the migrations not applied yet. The transaction takes the write lock before reading
/// the version, so two processes starting on one file migrate it once.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let applied: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
    for migration in MIGRATIONS.iter().skip(applied.try_into().unwrap_or(0)) {
        tx.execute_batch(migration)?;
    }
    tx.pragma_update(None, "user_version", MIGRATIONS.len() as i64)?;
    tx.commit()
}

/// Adds the demo users that are missing; existing rows (and changed passwords) are kept.
fn seed(conn: &Connection) -> rusqlite::Result<()> {
    for &(user_id, username, password_hash, name, email, age) in SEED {
        let added = conn.execute(
            "INSERT INTO users (user_id, username, password_hash, name, email, age)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT DO NOTHING",
            params![user_id, username, password_hash, name, email, age],
        )?;
        if added == 1 {
            tracing::info!(user_id, username, "seeded demo user");
        }
    }
    Ok(())
}
