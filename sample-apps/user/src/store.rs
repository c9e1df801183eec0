//! The user service's own database (SQLite or PostgreSQL, see `shop-db`): the `users` table,
//! its migrations and its demo seed.

use std::time::Duration;

use serde::Serialize;
use shop_db::{Database, DatabaseUrl, DbError, Migration, Row, Statement};

/// Schema changes in order; the database records how many have been applied.
const MIGRATIONS: &[Migration] = &[Migration::portable(
    "CREATE TABLE users (
        user_id       TEXT PRIMARY KEY,
        username      TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        name          TEXT NOT NULL,
        email         TEXT NOT NULL,
        age           INTEGER NOT NULL
    )",
)];

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

#[derive(Clone)]
pub(crate) struct Store {
    db: Database,
}

impl Store {
    /// The database at `url`; nothing is connected until [`Store::prepare`].
    pub fn new(url: &DatabaseUrl) -> Result<Self, DbError> {
        Ok(Self {
            db: Database::new(url, MIGRATIONS)?,
        })
    }

    pub fn url(&self) -> &DatabaseUrl {
        self.db.url()
    }

    /// Connects (retrying for up to `wait` while the server is unreachable), applies pending
    /// migrations and adds missing demo users; existing rows (and changed passwords) are kept.
    pub async fn prepare(&self, wait: Duration) -> Result<(), DbError> {
        let seed: Vec<Statement> = SEED
            .iter()
            .map(|&(user_id, username, password_hash, name, email, age)| {
                Statement::new(
                    "INSERT INTO users (user_id, username, password_hash, name, email, age)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT DO NOTHING",
                    vec![
                        user_id.into(),
                        username.into(),
                        password_hash.into(),
                        name.into(),
                        email.into(),
                        age.into(),
                    ],
                )
            })
            .collect();
        let added = self.db.prepare(wait, &seed).await?;
        for (&(user_id, username, ..), added) in SEED.iter().zip(added) {
            if added == 1 {
                tracing::info!(user_id, username, "seeded demo user");
            }
        }
        Ok(())
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), DbError> {
        self.db.ping().await
    }

    pub async fn user(&self, user_id: String) -> Result<Option<User>, DbError> {
        self.db
            .query_opt(
                "SELECT user_id, name, email, age FROM users WHERE user_id = $1",
                vec![user_id.into()],
            )
            .await?
            .map(|row| user_from_row(&row))
            .transpose()
    }

    /// At most `limit` users whose id sorts after `after`, in id order.
    pub async fn users_after(&self, after: String, limit: u32) -> Result<Vec<User>, DbError> {
        self.db
            .query(
                "SELECT user_id, name, email, age FROM users
                 WHERE user_id > $1 ORDER BY user_id LIMIT $2",
                vec![after.into(), limit.into()],
            )
            .await?
            .iter()
            .map(user_from_row)
            .collect()
    }

    /// The user with this username and their password hash (a PHC string).
    pub async fn credentials(&self, username: String) -> Result<Option<(User, String)>, DbError> {
        self.db
            .query_opt(
                "SELECT user_id, name, email, age, password_hash FROM users WHERE username = $1",
                vec![username.into()],
            )
            .await?
            .map(|row| Ok((user_from_row(&row)?, row.text(4)?)))
            .transpose()
    }
}

fn user_from_row(row: &Row) -> Result<User, DbError> {
    Ok(User {
        user_id: row.text(0)?,
        name: row.text(1)?,
        email: row.text(2)?,
        age: row.int(3)?,
    })
}
