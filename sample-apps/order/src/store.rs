//! The order service's own database (SQLite or PostgreSQL, see `shop-db`): `orders` and
//! their `order_items`, and their migrations.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use shop_db::{Database, DatabaseUrl, DbError, Migration, Row, Statement};

/// Schema changes in order; the database records how many have been applied.
const MIGRATIONS: &[Migration] = &[
    Migration::portable(
        "CREATE TABLE orders (
            id          TEXT PRIMARY KEY,
            user_id     TEXT NOT NULL,
            status      TEXT NOT NULL,
            total_cents BIGINT NOT NULL,
            payment_id  TEXT
        );
        CREATE INDEX orders_by_user ON orders (user_id);
        CREATE TABLE order_items (
            order_id         TEXT NOT NULL REFERENCES orders (id),
            position         INTEGER NOT NULL,
            sku              TEXT NOT NULL,
            quantity         BIGINT NOT NULL,
            unit_price_cents BIGINT NOT NULL,
            PRIMARY KEY (order_id, position)
        );",
    ),
    // A user's orders are listed in the order they were placed, `ORDER BY rowid`: SQLite
    // numbers every row in its hidden `rowid`; PostgreSQL, which has none, gets a column of
    // that name numbered the same way, so the queries are the same on both.
    Migration {
        sqlite: "-- rowid is built in",
        postgres: "ALTER TABLE orders ADD COLUMN rowid BIGINT GENERATED ALWAYS AS IDENTITY",
    },
];

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

    fn parse(s: &str) -> Result<Self, DbError> {
        match s {
            "pending" => Ok(Self::Pending),
            "paid" => Ok(Self::Paid),
            "payment_failed" => Ok(Self::PaymentFailed),
            other => Err(DbError::Column(format!("unknown order status {other:?}"))),
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

    /// Connects (retrying for up to `wait` while the server is unreachable) and applies
    /// pending migrations.
    pub async fn prepare(&self, wait: Duration) -> Result<(), DbError> {
        self.db.prepare(wait, &[]).await.map(drop)
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), DbError> {
        self.db.ping().await
    }

    /// Stores a new order with its items.
    pub async fn insert(&self, order: Order) -> Result<(), DbError> {
        let mut statements = vec![Statement::new(
            "INSERT INTO orders (id, user_id, status, total_cents, payment_id)
             VALUES ($1, $2, $3, $4, $5)",
            vec![
                order.id.clone().into(),
                order.user_id.into(),
                order.status.as_str().into(),
                order.total_cents.into(),
                order.payment_id.into(),
            ],
        )];
        for (position, item) in (0_i64..).zip(order.items) {
            statements.push(Statement::new(
                "INSERT INTO order_items (order_id, position, sku, quantity, unit_price_cents)
                 VALUES ($1, $2, $3, $4, $5)",
                vec![
                    order.id.clone().into(),
                    position.into(),
                    item.sku.into(),
                    item.quantity.into(),
                    item.unit_price_cents.into(),
                ],
            ));
        }
        self.db.atomically(statements).await.map(drop)
    }

    /// Records how an order's payment ended.
    pub async fn settle(
        &self,
        id: String,
        status: OrderStatus,
        payment_id: Option<String>,
    ) -> Result<(), DbError> {
        self.db
            .execute(
                "UPDATE orders SET status = $2, payment_id = $3 WHERE id = $1",
                vec![id.into(), status.as_str().into(), payment_id.into()],
            )
            .await
            .map(drop)
    }

    pub async fn order(&self, id: String) -> Result<Option<Order>, DbError> {
        let Some(row) = self
            .db
            .query_opt(
                "SELECT id, user_id, status, total_cents, payment_id FROM orders WHERE id = $1",
                vec![id.into()],
            )
            .await?
        else {
            return Ok(None);
        };
        let mut order = order_from_row(&row)?;
        order.items = self.items(&order.id).await?;
        Ok(Some(order))
    }

    /// The user's orders, oldest first.
    pub async fn orders_of(&self, user_id: String) -> Result<Vec<Order>, DbError> {
        let rows = self
            .db
            .query(
                "SELECT id, user_id, status, total_cents, payment_id FROM orders
                 WHERE user_id = $1 ORDER BY rowid",
                vec![user_id.into()],
            )
            .await?;
        let mut orders = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut order = order_from_row(row)?;
            order.items = self.items(&order.id).await?;
            orders.push(order);
        }
        Ok(orders)
    }

    async fn items(&self, order_id: &str) -> Result<Vec<Item>, DbError> {
        self.db
            .query(
                "SELECT sku, quantity, unit_price_cents FROM order_items
                 WHERE order_id = $1 ORDER BY position",
                vec![order_id.into()],
            )
            .await?
            .iter()
            .map(|row| {
                Ok(Item {
                    sku: row.text(0)?,
                    quantity: row.int(1)?,
                    unit_price_cents: row.int(2)?,
                })
            })
            .collect()
    }
}

/// An order without its items, which `items` adds.
fn order_from_row(row: &Row) -> Result<Order, DbError> {
    Ok(Order {
        id: row.text(0)?,
        user_id: row.text(1)?,
        status: OrderStatus::parse(&row.text(2)?)?,
        total_cents: row.int(3)?,
        payment_id: row.opt_text(4)?,
        items: Vec::new(),
    })
}
