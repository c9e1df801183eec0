//! The order service's own SQLite database: `orders` and their `order_items`, and their
//! migrations.
//!
//! rusqlite is synchronous, so every query runs on tokio's blocking pool behind one connection.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

/// How long a statement waits for another connection's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema changes in order; `PRAGMA user_version` records how many have been applied.
const MIGRATIONS: &[&str] = &["CREATE TABLE orders (
        id          TEXT PRIMARY KEY,
        user_id     TEXT NOT NULL,
        status      TEXT NOT NULL,
        total_cents INTEGER NOT NULL,
        payment_id  TEXT
    );
    CREATE INDEX orders_by_user ON orders (user_id);
    CREATE TABLE order_items (
        order_id         TEXT NOT NULL REFERENCES orders (id),
        position         INTEGER NOT NULL,
        sku              TEXT NOT NULL,
        quantity         INTEGER NOT NULL,
        unit_price_cents INTEGER NOT NULL,
        PRIMARY KEY (order_id, position)
    );"];

/// Where an order is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OrderStatus {
    /// Stored, payment not settled yet.
    Pending,
    Paid,
    /// The payment service refused or could not be reached.
    PaymentFailed,
}

impl OrderStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Paid => "paid",
            Self::PaymentFailed => "payment_failed",
        }
    }

    fn parse(s: &str) -> rusqlite::Result<Self> {
        match s {
            "pending" => Ok(Self::Pending),
            "paid" => Ok(Self::Paid),
            "payment_failed" => Ok(Self::PaymentFailed),
            other => Err(rusqlite::Error::InvalidColumnType(
                2,
                format!("status {other:?}"),
                rusqlite::types::Type::Text,
            )),
        }
    }
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Item {
    pub sku: String,
    pub quantity: u32,
    pub unit_price_cents: i64,
}

/// An order as the HTTP API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Order {
    pub id: String,
    pub status: OrderStatus,
    pub total_cents: i64,
    pub user_id: String,
    pub items: Vec<Item>,
    pub payment_id: Option<String>,
}

/// A query that could not run.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("order database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("order database task: {0}")]
    Task(#[from] tokio::task::JoinError),
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
        conn.pragma_update(None, "foreign_keys", true)?;
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

    /// Stores a new order with its items.
    pub async fn insert(&self, order: Order) -> Result<(), StoreError> {
        self.call(move |conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO orders (id, user_id, status, total_cents, payment_id)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    order.id,
                    order.user_id,
                    order.status.as_str(),
                    order.total_cents,
                    order.payment_id
                ],
            )?;
            for (position, item) in (0_i64..).zip(&order.items) {
                tx.execute(
                    "INSERT INTO order_items (order_id, position, sku, quantity, unit_price_cents)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        order.id,
                        position,
                        item.sku,
                        item.quantity,
                        item.unit_price_cents
                    ],
                )?;
            }
            tx.commit()
        })
        .await
    }

    /// Records how an order's payment ended.
    pub async fn settle(
        &self,
        id: String,
        status: OrderStatus,
        payment_id: Option<String>,
    ) -> Result<(), StoreError> {
        self.call(move |conn| {
            conn.execute(
                "UPDATE orders SET status = ?2, payment_id = ?3 WHERE id = ?1",
                params![id, status.as_str(), payment_id],
            )
            .map(drop)
        })
        .await
    }

    pub async fn order(&self, id: String) -> Result<Option<Order>, StoreError> {
        self.call(move |conn| {
            let Some(mut order) = conn
                .query_row(
                    "SELECT id, user_id, status, total_cents, payment_id FROM orders WHERE id = ?1",
                    [id],
                    order_from_row,
                )
                .optional()?
            else {
                return Ok(None);
            };
            order.items = items(conn, &order.id)?;
            Ok(Some(order))
        })
        .await
    }

    /// The user's orders, oldest first.
    pub async fn orders_of(&self, user_id: String) -> Result<Vec<Order>, StoreError> {
        self.call(move |conn| {
            let mut orders = conn
                .prepare_cached(
                    "SELECT id, user_id, status, total_cents, payment_id FROM orders
                     WHERE user_id = ?1 ORDER BY rowid",
                )?
                .query_map([user_id], order_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            for order in &mut orders {
                order.items = items(conn, &order.id)?;
            }
            Ok(orders)
        })
        .await
    }
}

/// An order without its items, which `items` adds.
fn order_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Order> {
    Ok(Order {
        id: row.get(0)?,
        user_id: row.get(1)?,
        status: OrderStatus::parse(&row.get::<_, String>(2)?)?,
        total_cents: row.get(3)?,
        payment_id: row.get(4)?,
        items: Vec::new(),
    })
}

fn items(conn: &Connection, order_id: &str) -> rusqlite::Result<Vec<Item>> {
    conn.prepare_cached(
        "SELECT sku, quantity, unit_price_cents FROM order_items
         WHERE order_id = ?1 ORDER BY position",
    )?
    .query_map([order_id], |row| {
        Ok(Item {
            sku: row.get(0)?,
            quantity: row.get(1)?,
            unit_price_cents: row.get(2)?,
        })
    })?
    .collect()
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
