//! gRPC side of the payment service: `shop.payment.v1.PaymentService`.

use shop_proto::payment::v1::payment_service_server::PaymentService;
use shop_proto::payment::v1::{
    CreatePaymentRequest, CreatePaymentResponse, GetPaymentRequest, GetPaymentResponse, Payment,
};
use tonic::{Request, Response, Status};

use crate::config::FailRate;
use shop_db::DbError;

use crate::store::{Created, Store};

/// The `PaymentService` implementation, writing the service's own database.
pub struct PaymentApi {
    store: Store,
    fail_rate: FailRate,
}

impl PaymentApi {
    pub(crate) fn new(store: Store, fail_rate: FailRate) -> Self {
        Self { store, fail_rate }
    }
}

/// UNAVAILABLE while the database cannot be reached (the caller may try again), INTERNAL for a
/// query that failed.
fn status(error: DbError) -> Status {
    if error.is_unavailable() {
        tracing::warn!(%error, "database unavailable");
        Status::unavailable(error.to_string())
    } else {
        tracing::error!(%error, "query failed");
        Status::internal(error.to_string())
    }
}

#[tonic::async_trait]
impl PaymentService for PaymentApi {
    async fn create_payment(
        &self,
        request: Request<CreatePaymentRequest>,
    ) -> Result<Response<CreatePaymentResponse>, Status> {
        let request = request.into_inner();
        validate(&request)?;
        // Fail before touching the database, so a caller's retry is always safe.
        if rand::random_bool(self.fail_rate.get()) {
            tracing::info!(order_id = %request.order_id, "injected payment failure");
            return Err(Status::unavailable(format!(
                "payment failed on purpose (PAYMENT_FAIL_RATE={})",
                self.fail_rate.get()
            )));
        }
        let payment = match self.store.create(request.clone()).await.map_err(status)? {
            Created::New(payment) => {
                tracing::info!(payment_id = %payment.payment_id, order_id = %payment.order_id, amount_cents = payment.amount_cents, "payment created");
                payment
            }
            Created::Existing(payment) if same_charge(&payment, &request) => payment,
            Created::Existing(payment) => {
                return Err(Status::failed_precondition(format!(
                    "idempotency key {:?} was already used for a different charge (payment {})",
                    request.idempotency_key, payment.payment_id
                )));
            }
        };
        Ok(Response::new(CreatePaymentResponse {
            payment: Some(payment),
        }))
    }

    async fn get_payment(
        &self,
        request: Request<GetPaymentRequest>,
    ) -> Result<Response<GetPaymentResponse>, Status> {
        let payment_id = request.into_inner().payment_id;
        if payment_id.is_empty() {
            return Err(Status::invalid_argument("payment_id is required"));
        }
        match self
            .store
            .payment(payment_id.clone())
            .await
            .map_err(status)?
        {
            Some(payment) => Ok(Response::new(GetPaymentResponse {
                payment: Some(payment),
            })),
            None => Err(Status::not_found(format!("payment {payment_id} not found"))),
        }
    }
}

fn validate(request: &CreatePaymentRequest) -> Result<(), Status> {
    let required = [
        ("idempotency_key", &request.idempotency_key),
        ("order_id", &request.order_id),
        ("user_id", &request.user_id),
    ];
    if let Some((field, _)) = required.iter().find(|(_, value)| value.is_empty()) {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    if request.amount_cents <= 0 {
        return Err(Status::invalid_argument(format!(
            "amount_cents must be positive, got {}",
            request.amount_cents
        )));
    }
    let currency = &request.currency;
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(Status::invalid_argument(format!(
            "currency must be an ISO 4217 code such as \"USD\", got {currency:?}"
        )));
    }
    Ok(())
}

/// Whether a stored payment is the charge `request` asks for.
fn same_charge(payment: &Payment, request: &CreatePaymentRequest) -> bool {
    payment.order_id == request.order_id
        && payment.user_id == request.user_id
        && payment.amount_cents == request.amount_cents
        && payment.currency == request.currency
}
