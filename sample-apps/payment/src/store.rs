//! The payment service's own database (SQLite or PostgreSQL, see `shop-db`): the `payments`
//! table and its migrations.
//!
//! Idempotency rests on the database: the idempotency key is UNIQUE, so two racing charges with
//! one key store one payment.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shop_db::{Database, DatabaseUrl, DbError, Migration, Row};
use shop_proto::payment::v1::{CreatePaymentRequest, Payment, PaymentStatus};

/// Schema changes in order; the database records how many have been applied.
const MIGRATIONS: &[Migration] = &[Migration::portable(
    "CREATE TABLE payments (
        payment_id      TEXT PRIMARY KEY,
        idempotency_key TEXT NOT NULL UNIQUE,
        order_id        TEXT NOT NULL,
        user_id         TEXT NOT NULL,
        amount_cents    BIGINT NOT NULL,
        currency        TEXT NOT NULL,
        status          TEXT NOT NULL, -- the proto enum name, e.g. PAYMENT_STATUS_SUCCEEDED
        created_at      BIGINT NOT NULL
    )",
)];

/// What `create` did.
pub(crate) enum Created {
    /// A new payment was stored.
    New(Payment),
    /// A payment with this idempotency key already existed; here it is, unchanged.
    Existing(Payment),
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

    /// Stores a succeeded payment for `request`, unless its idempotency key is taken.
    pub async fn create(&self, request: CreatePaymentRequest) -> Result<Created, DbError> {
        let inserted = self
            .db
            .execute(
                "INSERT INTO payments (payment_id, idempotency_key, order_id, user_id,
                                       amount_cents, currency, status, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (idempotency_key) DO NOTHING",
                vec![
                    uuid::Uuid::new_v4().to_string().into(),
                    request.idempotency_key.clone().into(),
                    request.order_id.into(),
                    request.user_id.into(),
                    request.amount_cents.into(),
                    request.currency.into(),
                    PaymentStatus::Succeeded.as_str_name().into(),
                    unix_now().into(),
                ],
            )
            .await?;
        // Payments are never changed or deleted, so the row read here is the one that won.
        let payment = self
            .db
            .query_opt(
                "SELECT payment_id, idempotency_key, order_id, user_id, amount_cents, currency,
                        status, created_at
                 FROM payments WHERE idempotency_key = $1",
                vec![request.idempotency_key.clone().into()],
            )
            .await?
            .ok_or_else(|| {
                DbError::Column(format!(
                    "payment {:?} vanished after it was stored",
                    request.idempotency_key
                ))
            })
            .and_then(|row| payment_from_row(&row))?;
        Ok(if inserted == 1 {
            Created::New(payment)
        } else {
            Created::Existing(payment)
        })
    }

    pub async fn payment(&self, payment_id: String) -> Result<Option<Payment>, DbError> {
        self.db
            .query_opt(
                "SELECT payment_id, idempotency_key, order_id, user_id, amount_cents, currency,
                        status, created_at
                 FROM payments WHERE payment_id = $1",
                vec![payment_id.into()],
            )
            .await?
            .map(|row| payment_from_row(&row))
            .transpose()
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs().try_into().unwrap_or(i64::MAX))
}

fn payment_from_row(row: &Row) -> Result<Payment, DbError> {
    let status = row.text(6)?;
    Ok(Payment {
        payment_id: row.text(0)?,
        idempotency_key: row.text(1)?,
        order_id: row.text(2)?,
        user_id: row.text(3)?,
        amount_cents: row.int(4)?,
        currency: row.text(5)?,
        status: PaymentStatus::from_str_name(&status).unwrap_or_default() as i32,
        created_at: row.int(7)?,
    })
}
