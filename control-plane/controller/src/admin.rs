//! `ferrule.v1.Admin`: what the CLI reads (services, endpoints, proxies). Config writes arrive
//! with the configuration centre (issue #5) and answer UNIMPLEMENTED until then.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ferrule_proto::names::validate_service;
use ferrule_proto::v1::{
    ApplyConfigRequest, ApplyConfigResponse, ConfigHistoryRequest, ConfigHistoryResponse,
    DeleteConfigRequest, DeleteConfigResponse, Endpoint, GetConfigRequest, GetConfigResponse,
    ListEndpointsRequest, ListEndpointsResponse, ListProxiesRequest, ListProxiesResponse,
    ListServicesRequest, ListServicesResponse, ProxyStatus, RollbackConfigRequest, ServiceSummary,
    admin_server::Admin,
};
use ferrule_store::Store;
use prost::Message;
use tonic::{Request, Response, Status};

use crate::keys;
use crate::registry::store_status;

pub struct AdminService {
    store: Arc<dyn Store>,
}

impl AdminService {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }
}

fn config_unimplemented() -> Status {
    Status::unimplemented(
        "config resources are not implemented yet (configuration centre: issue #5)",
    )
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_services(
        &self,
        _: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        let listing = self
            .store
            .list(keys::REGISTRY, None)
            .await
            .map_err(store_status)?;
        let mut services: BTreeMap<String, (u32, BTreeSet<String>)> = BTreeMap::new();
        for kv in &listing.kvs {
            let Ok(ep) = Endpoint::decode(kv.value.as_slice()) else {
                continue;
            };
            let entry = services.entry(ep.service).or_default();
            entry.0 += 1;
            entry.1.insert(ep.port_name);
        }
        let services = services
            .into_iter()
            .map(|(name, (endpoints, ports))| ServiceSummary {
                name,
                endpoints,
                ports: ports.into_iter().filter(|p| !p.is_empty()).collect(),
            })
            .collect();
        Ok(Response::new(ListServicesResponse {
            services,
            revision: listing.revision,
        }))
    }

    async fn list_endpoints(
        &self,
        request: Request<ListEndpointsRequest>,
    ) -> Result<Response<ListEndpointsResponse>, Status> {
        let service = request.into_inner().service;
        validate_service(&service)
            .map_err(|e| Status::invalid_argument(format!("service: {e}")))?;
        let listing = self
            .store
            .list(&keys::service_prefix(&service), None)
            .await
            .map_err(store_status)?;
        let endpoints = listing
            .kvs
            .iter()
            .filter_map(|kv| Endpoint::decode(kv.value.as_slice()).ok())
            .collect();
        Ok(Response::new(ListEndpointsResponse {
            endpoints,
            revision: listing.revision,
        }))
    }

    async fn list_proxies(
        &self,
        _: Request<ListProxiesRequest>,
    ) -> Result<Response<ListProxiesResponse>, Status> {
        let listing = self
            .store
            .list(keys::PROXIES, None)
            .await
            .map_err(store_status)?;
        let proxies = listing
            .kvs
            .iter()
            .filter_map(|kv| ProxyStatus::decode(kv.value.as_slice()).ok())
            .collect();
        Ok(Response::new(ListProxiesResponse { proxies }))
    }

    async fn apply_config(
        &self,
        _: Request<ApplyConfigRequest>,
    ) -> Result<Response<ApplyConfigResponse>, Status> {
        Err(config_unimplemented())
    }

    async fn get_config(
        &self,
        _: Request<GetConfigRequest>,
    ) -> Result<Response<GetConfigResponse>, Status> {
        Err(config_unimplemented())
    }

    async fn delete_config(
        &self,
        _: Request<DeleteConfigRequest>,
    ) -> Result<Response<DeleteConfigResponse>, Status> {
        Err(config_unimplemented())
    }

    async fn config_history(
        &self,
        _: Request<ConfigHistoryRequest>,
    ) -> Result<Response<ConfigHistoryResponse>, Status> {
        Err(config_unimplemented())
    }

    async fn rollback_config(
        &self,
        _: Request<RollbackConfigRequest>,
    ) -> Result<Response<ApplyConfigResponse>, Status> {
        Err(config_unimplemented())
    }
}
