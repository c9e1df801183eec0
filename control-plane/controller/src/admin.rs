//! `ferrule.v1.Admin`: what the CLI needs: reads of services, endpoints and proxies, and the
//! config writes, history and rollback of the configuration centre ([`crate::config`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ferrule_proto::names::{ServiceRef, namespace_or_default, qualified};
use ferrule_proto::v1::{
    ApplyConfigRequest, ApplyConfigResponse, ConfigHistoryRequest, ConfigHistoryResponse,
    DeleteConfigRequest, DeleteConfigResponse, Endpoint, GetConfigRequest, GetConfigResponse,
    ListEndpointsRequest, ListEndpointsResponse, ListProxiesRequest, ListProxiesResponse,
    ListServicesRequest, ListServicesResponse, ListUnreadableRequest, ListUnreadableResponse,
    ProxyStatus, RollbackConfigRequest, ServiceSummary, UnreadableKey, admin_server::Admin,
};
use ferrule_store::Store;
use prost::Message;
use tonic::{Request, Response, Status};

use crate::config::ConfigStore;
use crate::keys;
use crate::registry::{read_stored_endpoint, store_status};

pub struct AdminService {
    store: Arc<dyn Store>,
    config: ConfigStore,
}

impl AdminService {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            config: ConfigStore::new(store.clone()),
            store,
        }
    }
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
        let mut services: BTreeMap<(String, String), (u32, BTreeSet<String>)> = BTreeMap::new();
        for kv in &listing.kvs {
            let Ok(ep) = Endpoint::decode(kv.value.as_slice()) else {
                continue;
            };
            let namespace = namespace_or_default(&ep.namespace).to_string();
            let entry = services.entry((namespace, ep.service)).or_default();
            entry.0 += 1;
            entry.1.insert(ep.port_name);
        }
        let services = services
            .into_iter()
            .map(
                |((namespace, service), (endpoints, ports))| ServiceSummary {
                    name: qualified(&namespace, &service),
                    endpoints,
                    ports: ports.into_iter().filter(|p| !p.is_empty()).collect(),
                    namespace,
                },
            )
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
        let service = ServiceRef::parse(&request.into_inner().service)
            .map_err(|e| Status::invalid_argument(format!("service: {e}")))?;
        if !service.port_name.is_empty() {
            return Err(Status::invalid_argument(
                "service: name a service (`name` or `name.namespace`), not a port",
            ));
        }
        let listing = self
            .store
            .list(
                &keys::service_prefix(&service.namespace, &service.service),
                None,
            )
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
        request: Request<ApplyConfigRequest>,
    ) -> Result<Response<ApplyConfigResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(
            self.config.apply(req.resources, req.dry_run).await?,
        ))
    }

    async fn get_config(
        &self,
        request: Request<GetConfigRequest>,
    ) -> Result<Response<GetConfigResponse>, Status> {
        let req = request.into_inner();
        let (resources, unreadable, version) = self
            .config
            .get_all(&req.kind, &req.namespace, &req.name)
            .await?;
        Ok(Response::new(GetConfigResponse {
            resources,
            version,
            unreadable,
        }))
    }

    async fn delete_config(
        &self,
        request: Request<DeleteConfigRequest>,
    ) -> Result<Response<DeleteConfigResponse>, Status> {
        let req = request.into_inner();
        let version = self
            .config
            .delete(&req.kind, &req.namespace, &req.name)
            .await?;
        Ok(Response::new(DeleteConfigResponse { version }))
    }

    async fn config_history(
        &self,
        request: Request<ConfigHistoryRequest>,
    ) -> Result<Response<ConfigHistoryResponse>, Status> {
        let req = request.into_inner();
        let changes = self
            .config
            .history(&req.kind, &req.namespace, &req.name)
            .await?;
        Ok(Response::new(ConfigHistoryResponse { changes }))
    }

    async fn rollback_config(
        &self,
        request: Request<RollbackConfigRequest>,
    ) -> Result<Response<ApplyConfigResponse>, Status> {
        let to = request.into_inner().to_version;
        if to <= 0 {
            return Err(Status::invalid_argument(
                "to_version: must be a config version (> 0)",
            ));
        }
        Ok(Response::new(self.config.rollback(to).await?))
    }

    async fn list_unreadable(
        &self,
        _: Request<ListUnreadableRequest>,
    ) -> Result<Response<ListUnreadableResponse>, Status> {
        let config = self.config.unreadable().await?;
        let listing = self
            .store
            .list(keys::REGISTRY, None)
            .await
            .map_err(store_status)?;
        let registry = listing
            .kvs
            .iter()
            .filter_map(|kv| {
                let reason = read_stored_endpoint(&kv.value).err()?;
                Some(UnreadableKey {
                    key: kv.key.clone(),
                    reason,
                    revision: kv.mod_revision,
                })
            })
            .collect();
        Ok(Response::new(ListUnreadableResponse { config, registry }))
    }
}
