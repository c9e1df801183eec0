//! What an order is and how one is placed, shared by the HTTP and the gRPC API so both check,
//! store and charge alike: [`place`] validates a [`NewOrder`], checks the user with the user
//! service, stores the order as pending, charges it and stores the outcome; [`find`] reads one.
//! They fail with an [`OrderError`], which each API maps to its own status codes.

use serde::Deserialize;
use shop_db::DbError;
use shop_proto::payment::v1::CreatePaymentRequest;
use shop_proto::user::v1::GetUserRequest;

use crate::OrderApp;
use crate::store::{Item, Order, OrderStatus};
use crate::trace::TraceContext;

/// Orders are charged in this currency.
const CURRENCY: &str = "USD";

/// Why an order could not be placed or read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OrderError {
    /// The request is malformed; the text names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("order {0} not found")]
    NotFound(String),
    /// The order names a user the user service does not know.
    #[error("user {0} does not exist")]
    UnknownUser(String),
    /// The user or payment service failed.
    #[error("{} service failed ({:?}): {}", .service, .status.code(), .status.message())]
    Upstream {
        service: &'static str,
        status: tonic::Status,
    },
    #[error(transparent)]
    Store(#[from] DbError),
}

/// An order as a caller asks for it.
#[derive(Debug, Deserialize)]
pub(crate) struct NewOrder {
    pub user_id: String,
    pub items: Vec<Item>,
}

impl NewOrder {
    /// Checks the order and returns its total.
    fn total_cents(&self) -> Result<i64, OrderError> {
        let bad = |message: String| Err(OrderError::Invalid(message));
        if self.user_id.is_empty() {
            return bad("user_id must not be empty".into());
        }
        if self.items.is_empty() {
            return bad("an order needs at least one item".into());
        }
        let mut total: i64 = 0;
        for (i, item) in self.items.iter().enumerate() {
            if item.sku.is_empty() {
                return bad(format!("items[{i}].sku must not be empty"));
            }
            if item.quantity == 0 {
                return bad(format!("items[{i}].quantity must be at least 1"));
            }
            if item.unit_price_cents <= 0 {
                return bad(format!(
                    "items[{i}].unit_price_cents must be positive, got {}",
                    item.unit_price_cents
                ));
            }
            let line = item.unit_price_cents.checked_mul(item.quantity.into());
            match line.and_then(|line| total.checked_add(line)) {
                Some(sum) => total = sum,
                None => return bad("the order total is too large".into()),
            }
        }
        Ok(total)
    }
}

/// Places `new`: checks it and its user, stores it, charges it and returns it paid. A failed
/// charge leaves the order stored as `payment_failed`.
pub(crate) async fn place(
    app: &OrderApp,
    trace: &TraceContext,
    new: NewOrder,
) -> Result<Order, OrderError> {
    let total_cents = new.total_cents()?;

    let user = GetUserRequest {
        user_id: new.user_id.clone(),
    };
    match app.users.clone().get_user(trace.request(user)).await {
        Ok(_) => {}
        Err(status) if status.code() == tonic::Code::NotFound => {
            return Err(OrderError::UnknownUser(new.user_id));
        }
        Err(status) => {
            return Err(OrderError::Upstream {
                service: "user",
                status,
            });
        }
    }

    // Stored before charging, so a charge never exists without its order; the order id is
    // the idempotency key, so charging it twice cannot charge twice.
    let mut order = Order {
        id: uuid::Uuid::new_v4().to_string(),
        status: OrderStatus::Pending,
        total_cents,
        user_id: new.user_id,
        items: new.items,
        payment_id: None,
    };
    app.store.insert(order.clone()).await?;

    let charge = CreatePaymentRequest {
        idempotency_key: order.id.clone(),
        order_id: order.id.clone(),
        user_id: order.user_id.clone(),
        amount_cents: total_cents,
        currency: CURRENCY.into(),
    };
    let payment = match app
        .payments
        .clone()
        .create_payment(trace.request(charge))
        .await
    {
        Ok(response) => response
            .into_inner()
            .payment
            .ok_or_else(|| OrderError::Upstream {
                service: "payment",
                status: tonic::Status::internal("CreatePayment answered without a payment"),
            }),
        Err(status) => Err(OrderError::Upstream {
            service: "payment",
            status,
        }),
    };
    let payment = match payment {
        Ok(payment) => payment,
        Err(error) => {
            app.store
                .settle(order.id, OrderStatus::PaymentFailed, None)
                .await?;
            return Err(error);
        }
    };
    order.status = OrderStatus::Paid;
    order.payment_id = Some(payment.payment_id);
    app.store
        .settle(order.id.clone(), order.status, order.payment_id.clone())
        .await?;
    tracing::info!(order_id = %order.id, user_id = %order.user_id, total_cents, "order paid");
    Ok(order)
}

/// The order `id`.
pub(crate) async fn find(app: &OrderApp, id: String) -> Result<Order, OrderError> {
    match app.store.order(id.clone()).await? {
        Some(order) => Ok(order),
        None => Err(OrderError::NotFound(id)),
    }
}
