//! Real gRPC (tonic client and server) through an outbound → inbound proxy pair: unary,
//! server streaming, bidirectional streaming, error statuses in a trailers-only answer and
//! after data, and `request_total` classifying each call by its `grpc-status`.

mod support;

use std::pin::Pin;

use ferrule_proto::v1::discovery_client::DiscoveryClient;
use ferrule_proto::v1::discovery_server::{Discovery as DiscoveryApi, DiscoveryServer};
use ferrule_proto::v1::registry_client::RegistryClient;
use ferrule_proto::v1::registry_server::{Registry, RegistryServer};
use ferrule_proto::v1::{
    AnnounceProxyRequest, DeregisterRequest, DeregisterResponse, DiscoveryUpdate, Endpoint,
    KeepAliveRequest, KeepAliveResponse, LookupRequest, LookupResponse, RegisterRequest,
    RegisterResponse, WatchRequest,
};
use futures::{Stream, StreamExt};
use support::*;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Answers every call from its input alone, so the test can check what came back.
struct Fake;

#[tonic::async_trait]
impl Registry for Fake {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let req = req.into_inner();
        let endpoint = req
            .endpoint
            .ok_or_else(|| Status::invalid_argument("endpoint is required"))?;
        Ok(Response::new(RegisterResponse {
            lease_id: i64::from(endpoint.port),
            ttl_seconds: req.ttl_seconds,
            revision: 1,
        }))
    }

    type KeepAliveStream = BoxStream<KeepAliveResponse>;

    async fn keep_alive(
        &self,
        req: Request<Streaming<KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let answers = req.into_inner().map(|r| {
            r.map(|r| KeepAliveResponse {
                lease_id: r.lease_id,
                found: true,
                ttl_seconds: 10,
            })
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn deregister(
        &self,
        _req: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        Ok(Response::new(DeregisterResponse {}))
    }

    async fn announce_proxy(
        &self,
        _req: Request<AnnounceProxyRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

#[tonic::async_trait]
impl DiscoveryApi for Fake {
    type WatchStream = BoxStream<DiscoveryUpdate>;

    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = req.into_inner().service;
        // "missing" streams one update, then fails in the trailers.
        let fail = service == "missing";
        let updates = (1..=3).map_while(move |version| match (fail, version) {
            (true, 2) => Some(Err(Status::not_found("no such service"))),
            (true, 3) => None,
            _ => Some(Ok(DiscoveryUpdate {
                service: service.clone(),
                version,
                kind: None,
            })),
        });
        Ok(Response::new(Box::pin(futures::stream::iter(updates))))
    }

    async fn lookup(
        &self,
        _req: Request<LookupRequest>,
    ) -> Result<Response<LookupResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

async fn grpc_backend() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RegistryServer::new(Fake))
            .add_service(DiscoveryServer::new(Fake))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

#[tokio::test]
async fn grpc_unary_streaming_and_errors_through_pair() -> anyhow::Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let app = grpc_backend().await;
        let server = server_proxy("registry", app, &[]).await;
        let client = client_proxy(
            vec![("registry", vec![meshed_endpoint("registry", &server)])],
            &[],
        )
        .await;
        let url = format!("http://{}", client.addrs.upstream("registry").unwrap());
        let channel = tonic::transport::Endpoint::from_shared(url)?
            .connect()
            .await?;
        let mut registry = RegistryClient::new(channel.clone());
        let mut discovery = DiscoveryClient::new(channel);

        // Unary.
        let rsp = registry
            .register(RegisterRequest {
                endpoint: Some(Endpoint {
                    port: 4242,
                    ..Default::default()
                }),
                ttl_seconds: 7,
            })
            .await?
            .into_inner();
        assert_eq!((rsp.lease_id, rsp.ttl_seconds), (4242, 7));

        // An error status travels in trailers (a trailers-only response).
        let status = registry
            .register(RegisterRequest {
                endpoint: None,
                ttl_seconds: 7,
            })
            .await
            .expect_err("the server refuses a missing endpoint");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "endpoint is required");

        // Server streaming.
        let updates: Vec<DiscoveryUpdate> = discovery
            .watch(WatchRequest {
                service: "user".into(),
                namespace: String::new(),
                proxy: None,
            })
            .await?
            .into_inner()
            .map(|u| u.expect("update"))
            .collect()
            .await;
        assert_eq!(
            updates.iter().map(|u| u.version).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert!(updates.iter().all(|u| u.service == "user"));

        // Bidirectional streaming: each answer arrives before the next request is sent.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut answers = registry
            .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        for lease_id in [11, 12, 13] {
            tx.send(KeepAliveRequest { lease_id }).await?;
            let answer = answers.message().await?.expect("an answer per request");
            assert_eq!(answer.lease_id, lease_id);
        }
        drop(tx);
        assert!(answers.message().await?.is_none());

        // A stream that fails after data: the status arrives in trailers.
        let mut failing = discovery
            .watch(WatchRequest {
                service: "missing".into(),
                namespace: String::new(),
                proxy: None,
            })
            .await?
            .into_inner();
        assert_eq!(failing.message().await?.map(|u| u.version), Some(1));
        let status = failing.message().await.expect_err("the stream fails");
        assert_eq!(status.code(), tonic::Code::NotFound);

        // Classification follows grpc-status, in the head or in trailers.
        let (_, metrics) = admin_get(&client, "/metrics").await?;
        let count = |classification: &str| {
            let series = format!(
                r#"request_total{{direction="outbound",target_service="registry",status_code="200",classification="{classification}"}} "#
            );
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(&series))
                .map(|v| v.trim().to_string())
        };
        assert_eq!(count("success").as_deref(), Some("3"), "{metrics}");
        assert_eq!(count("failure").as_deref(), Some("2"), "{metrics}");

        client.shutdown().await;
        server.shutdown().await;
        Ok::<_, anyhow::Error>(())
    })
    .await?
}
