//! The payment service's own SQLite database: the `payments` table and its migrations.
//!
//! rusqlite is synchronous, so every query runs on tokio's blocking pool behind one connection.
//! Idempotency rests on the database: the idempotency key is UNIQUE, so two racing charges with
//! one key store one payment.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use shop_proto::payment::v1::{CreatePaymentRequest, Payment, PaymentStatus};

/// How long a statement waits for another connection's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema changes in order; `PRAGMA user_version` records how many have been applied.
const MIGRATIONS: &[&str] = &["CREATE TABLE payments (
        payment_id      TEXT PRIMARY KEY,
        idempotency_key TEXT NOT NULL UNIQUE,
        order_id        TEXT NOT NULL,
        user_id         TEXT NOT NULL,
        amount_cents    INTEGER NOT NULL,
        currency        TEXT NOT NULL,
        status          TEXT NOT NULL, -- the proto enum name, e.g. PAYMENT_STATUS_SUCCEEDED
        created_at      INTEGER NOT NULL
    )"];

const COLUMNS: &str =
    "payment_id, idempotency_key, order_id, user_id, amount_cents, currency, status, created_at";

/// A query that could not run.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("payment database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("payment database task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What `create` did.
pub(crate) enum Created {
    /// A new payment was stored.
    New(Payment),
    /// A payment with this idempotency key already existed; here it is, unchanged.
    Existing(Payment),
}

#[derive(Clone)]
pub(crate) struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl Store {
    /// Opens the database file and applies pending migrations.
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        let mut conn = Connection::open(path)?;
        // Replicas may share the file: wait for another process's write instead of failing.
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `query` on the blocking pool with the connection.
    async fn call<T, F>(&self, query: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        let result = tokio::task::spawn_blocking(move || {
            // Statements and transactions are atomic in SQLite, so a lock poisoned by a panic
            // still guards a consistent database.
            let mut conn = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            query(&mut conn)
        })
        .await?;
        Ok(result?)
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.call(|conn| conn.query_row("SELECT 1", [], |_| Ok(())))
            .await
    }

    /// Stores a succeeded payment for `request`, unless its idempotency key is taken.
    pub async fn create(&self, request: CreatePaymentRequest) -> Result<Created, StoreError> {
        self.call(move |conn| {
            let tx = conn.transaction()?;
            let inserted = tx.execute(
                "INSERT INTO payments (payment_id, idempotency_key, order_id, user_id,
                                       amount_cents, currency, status, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (idempotency_key) DO NOTHING",
                params![
                    uuid::Uuid::new_v4().to_string(),
                    request.idempotency_key,
                    request.order_id,
                    request.user_id,
                    request.amount_cents,
                    request.currency,
                    PaymentStatus::Succeeded.as_str_name(),
                    unix_now(),
                ],
            )?;
            let payment = tx.query_row(
                &format!("SELECT {COLUMNS} FROM payments WHERE idempotency_key = ?1"),
                [&request.idempotency_key],
                payment_from_row,
            )?;
            tx.commit()?;
            Ok(if inserted == 1 {
                Created::New(payment)
            } else {
                Created::Existing(payment)
            })
        })
        .await
    }

    pub async fn payment(&self, payment_id: String) -> Result<Option<Payment>, StoreError> {
        self.call(move |conn| {
            conn.query_row(
                &format!("SELECT {COLUMNS} FROM payments WHERE payment_id = ?1"),
                [payment_id],
                payment_from_row,
            )
            .optional()
        })
        .await
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs().try_into().unwrap_or(i64::MAX))
}

fn payment_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Payment> {
    let status: String = row.get(6)?;
    Ok(Payment {
        payment_id: row.get(0)?,
        idempotency_key: row.get(1)?,
        order_id: row.get(2)?,
        user_id: row.get(3)?,
        amount_cents: row.get(4)?,
        currency: row.get(5)?,
        status: PaymentStatus::from_str_name(&status).unwrap_or_default() as i32,
        created_at: row.get(7)?,
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
