//! Services of the API that later issues implement. Until then they answer UNIMPLEMENTED with
//! a message saying so, never a made-up answer.

use ferrule_proto::v1::{
    CertifyRequest, CertifyResponse, ConfigRequest, ConfigSnapshot, config_server::Config,
    identity_server::Identity,
};
use tonic::{Request, Response, Status, Streaming};

pub struct ConfigStub;
pub struct IdentityStub;

#[tonic::async_trait]
impl Config for ConfigStub {
    type WatchStream = futures::stream::Empty<Result<ConfigSnapshot, Status>>;

    async fn watch(
        &self,
        _: Request<Streaming<ConfigRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented(
            "ferrule.v1.Config is not implemented yet (configuration centre: issue #5)",
        ))
    }
}

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
