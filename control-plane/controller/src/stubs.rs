//! Services of the API that later issues implement. Until then they answer UNIMPLEMENTED with
//! a message saying so, never a made-up answer.

use ferrule_proto::v1::{CertifyRequest, CertifyResponse, identity_server::Identity};
use tonic::{Request, Response, Status};

pub struct IdentityStub;

#[tonic::async_trait]
impl Identity for IdentityStub {
    async fn certify(
        &self,
        _: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        Err(Status::unimplemented(
            "ferrule.v1.Identity is not implemented yet (mesh CA and mTLS come in a later issue)",
        ))
    }
}
