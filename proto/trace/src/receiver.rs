//! A small OTLP receiver that keeps the last traces in memory: the dev mesh's collector when
//! the user runs none, and the tests' collector.
//!
//! It speaks real OTLP/gRPC (`opentelemetry.proto.collector.trace.v1.TraceService/Export`,
//! the `opentelemetry-proto` crate's generated server) on one port; on the other it takes
//! OTLP/HTTP (`POST /v1/traces`, protobuf) and answers reads over HTTP/JSON:
//! `GET /traces` lists the kept traces, newest first; `GET /traces/<trace id>` gives one
//! trace's spans in start order. It keeps at most `max_traces` traces (the oldest is forgotten
//! first) of at most [`MAX_SPANS_PER_TRACE`] spans each, so its memory is bounded whatever it
//! is sent.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{span, status};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// The most spans kept of one trace.
pub const MAX_SPANS_PER_TRACE: usize = 1_000;

/// One received span, as the JSON API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct StoredSpan {
    pub trace_id: String,
    pub span_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_span_id: Option<String>,
    /// The resource's `service.name`.
    pub service: String,
    pub name: String,
    /// `server`, `client`, `internal`, `producer`, `consumer` or `unspecified`.
    pub kind: &'static str,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    /// `ok`, `error` or `unset`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub status_message: String,
    pub attributes: BTreeMap<String, serde_json::Value>,
}

/// One trace, summarised for the list.
#[derive(Debug, Clone, Serialize)]
pub struct TraceSummary {
    pub trace_id: String,
    /// The service and name of the root span (the earliest span when the root is missing).
    pub root_service: String,
    pub root_name: String,
    pub start_unix_nano: u64,
    pub duration_nano: u64,
    pub spans: usize,
    pub errors: usize,
    pub services: Vec<String>,
}

#[derive(Default)]
struct Kept {
    order: VecDeque<String>,
    traces: HashMap<String, Vec<StoredSpan>>,
}

/// The traces kept. Cheap to clone; clones share them.
#[derive(Clone)]
pub struct Store {
    kept: Arc<Mutex<Kept>>,
    max_traces: usize,
}

impl Store {
    pub fn new(max_traces: usize) -> Self {
        Self {
            kept: Arc::default(),
            max_traces: max_traces.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn add(&self, span: StoredSpan) {
        let mut kept = self.lock();
        if !kept.traces.contains_key(&span.trace_id) {
            while kept.order.len() >= self.max_traces {
                if let Some(oldest) = kept.order.pop_front() {
                    kept.traces.remove(&oldest);
                }
            }
            kept.order.push_back(span.trace_id.clone());
        }
        let spans = kept.traces.entry(span.trace_id.clone()).or_default();
        if spans.len() < MAX_SPANS_PER_TRACE {
            spans.push(span);
        }
    }

    /// The spans of `trace_id`, in start order.
    pub fn trace(&self, trace_id: &str) -> Option<Vec<StoredSpan>> {
        let mut spans = self
            .lock()
            .traces
            .get(&trace_id.to_ascii_lowercase())?
            .clone();
        spans.sort_by_key(|s| (s.start_unix_nano, s.end_unix_nano));
        Some(spans)
    }

    /// Every kept trace, newest first.
    pub fn list(&self) -> Vec<TraceSummary> {
        let kept = self.lock();
        kept.order
            .iter()
            .rev()
            .filter_map(|id| kept.traces.get(id).map(|spans| summary(id, spans)))
            .collect()
    }
}

fn summary(id: &str, spans: &[StoredSpan]) -> TraceSummary {
    let ids: std::collections::HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let start = spans.iter().map(|s| s.start_unix_nano).min().unwrap_or(0);
    let end = spans.iter().map(|s| s.end_unix_nano).max().unwrap_or(start);
    let root = spans
        .iter()
        .filter(|s| s.parent_span_id.as_deref().is_none_or(|p| !ids.contains(p)))
        .min_by_key(|s| s.start_unix_nano);
    let mut services: Vec<String> = spans.iter().map(|s| s.service.clone()).collect();
    services.sort();
    services.dedup();
    TraceSummary {
        trace_id: id.to_string(),
        root_service: root.map(|s| s.service.clone()).unwrap_or_default(),
        root_name: root.map(|s| s.name.clone()).unwrap_or_default(),
        start_unix_nano: start,
        duration_nano: end.saturating_sub(start),
        spans: spans.len(),
        errors: spans.iter().filter(|s| s.status == "error").count(),
        services,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn json_value(value: Option<&AnyValue>) -> serde_json::Value {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone().into(),
        Some(any_value::Value::IntValue(n)) => (*n).into(),
        Some(any_value::Value::BoolValue(b)) => (*b).into(),
        Some(any_value::Value::DoubleValue(d)) => (*d).into(),
        Some(other) => format!("{other:?}").into(),
        None => serde_json::Value::Null,
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, serde_json::Value> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), json_value(kv.value.as_ref())))
        .collect()
}

/// The OTLP `TraceService` keeping what it is sent in a [`Store`].
struct Collector(Store);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.ingest(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Store {
    /// Keeps the spans of one OTLP export.
    pub fn ingest(&self, request: ExportTraceServiceRequest) {
        for resource_spans in request.resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            let service = resource
                .get("service.name")
                .and_then(|v| v.as_str())
                .unwrap_or("unknown")
                .to_string();
            for scope in resource_spans.scope_spans {
                for s in scope.spans {
                    let kind = match span::SpanKind::try_from(s.kind) {
                        Ok(span::SpanKind::Server) => "server",
                        Ok(span::SpanKind::Client) => "client",
                        Ok(span::SpanKind::Internal) => "internal",
                        Ok(span::SpanKind::Producer) => "producer",
                        Ok(span::SpanKind::Consumer) => "consumer",
                        _ => "unspecified",
                    };
                    let (status, status_message) = match &s.status {
                        Some(st) if st.code == status::StatusCode::Error as i32 => {
                            ("error", st.message.clone())
                        }
                        Some(st) if st.code == status::StatusCode::Ok as i32 => {
                            ("ok", st.message.clone())
                        }
                        _ => ("unset", String::new()),
                    };
                    self.add(StoredSpan {
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: (!s.parent_span_id.is_empty())
                            .then(|| hex(&s.parent_span_id)),
                        service: service.clone(),
                        name: s.name,
                        kind,
                        start_unix_nano: s.start_time_unix_nano,
                        end_unix_nano: s.end_time_unix_nano,
                        status,
                        status_message,
                        attributes: attributes(&s.attributes),
                    });
                }
            }
        }
    }
}

/// Serves OTLP/gRPC on `listener` into `store` until `shutdown` resolves.
pub async fn serve_otlp(
    listener: TcpListener,
    store: Store,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Collector(store)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}

fn json(status: StatusCode, body: &impl Serialize) -> Response<Full<bytes::Bytes>> {
    let body = serde_json::to_vec_pretty(body).unwrap_or_default();
    let mut rsp = Response::new(Full::new(bytes::Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    rsp
}

/// The most bytes of one OTLP/HTTP export read.
const MAX_EXPORT_BYTES: usize = 16 << 20;

async fn api(store: &Store, req: Request<Incoming>) -> Response<Full<bytes::Bytes>> {
    if req.method() == Method::POST && req.uri().path() == "/v1/traces" {
        use http_body_util::BodyExt;
        use prost::Message;
        let body = http_body_util::Limited::new(req.into_body(), MAX_EXPORT_BYTES);
        let decoded = match body.collect().await {
            Ok(bytes) => ExportTraceServiceRequest::decode(bytes.to_bytes())
                .map_err(|e| format!("not an OTLP ExportTraceServiceRequest: {e}")),
            Err(e) => Err(format!("reading the body: {e}")),
        };
        return match decoded {
            Ok(request) => {
                store.ingest(request);
                let mut rsp = Response::new(Full::new(bytes::Bytes::from(
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )));
                rsp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/x-protobuf"),
                );
                rsp
            }
            Err(error) => json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({ "error": error }),
            ),
        };
    }
    let path = req.uri().path();
    if req.method() != Method::GET {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": "only GET"}),
        );
    }
    if path == "/traces" {
        return json(StatusCode::OK, &store.list());
    }
    match path.strip_prefix("/traces/") {
        Some(id) => match store.trace(id) {
            Some(spans) => json(
                StatusCode::OK,
                &serde_json::json!({"trace_id": id.to_ascii_lowercase(), "spans": spans}),
            ),
            None => json(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"error": format!("no trace {id} is kept (only the last ones are)")}),
            ),
        },
        None => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "try GET /traces or GET /traces/<trace id>"}),
        ),
    }
}

/// Serves the JSON API on `listener` until the task is dropped.
pub async fn serve_api(listener: TcpListener, store: Store) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let store = store.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let store = store.clone();
                async move { Ok::<_, Infallible>(api(&store, req).await) }
            });
            if let Err(error) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(%peer, %error, "trace API connection failed");
            }
        });
    }
}

/// A receiver bound on loopback ports the system picks: OTLP/gRPC and the JSON API, served
/// on the current runtime until dropped.
pub struct Receiver {
    pub otlp: SocketAddr,
    pub api: SocketAddr,
    pub store: Store,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Receiver {
    pub async fn start(
        otlp: SocketAddr,
        api: SocketAddr,
        max_traces: usize,
    ) -> std::io::Result<Self> {
        let store = Store::new(max_traces);
        let otlp_listener = TcpListener::bind(otlp).await?;
        let api_listener = TcpListener::bind(api).await?;
        let otlp = otlp_listener.local_addr()?;
        let api = api_listener.local_addr()?;
        let otlp_store = store.clone();
        let tasks = vec![
            tokio::spawn(async move {
                if let Err(error) =
                    serve_otlp(otlp_listener, otlp_store, std::future::pending()).await
                {
                    tracing::warn!(%error, "the OTLP receiver stopped");
                }
            }),
            tokio::spawn(serve_api(api_listener, store.clone())),
        ];
        Ok(Self {
            otlp,
            api,
            store,
            tasks,
        })
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{self, ExportConfig, Protocol};
    use crate::metrics::TraceMetrics;
    use crate::tracer::SpanKind;

    async fn roundtrip(protocol: Protocol) {
        let receiver = Receiver::start(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
            2,
        )
        .await
        .unwrap();
        let endpoint = match protocol {
            Protocol::Grpc => format!("http://{}", receiver.otlp),
            Protocol::HttpProtobuf => format!("http://{}", receiver.api),
        };
        let metrics = TraceMetrics::default();
        let tracer = export::start(
            ExportConfig {
                endpoint,
                protocol,
                sample_ratio: 1.0,
                queue_size: 16,
                resource: vec![("service.name".into(), "svc".into())],
            },
            metrics.clone(),
        )
        .unwrap();
        let mut root = tracer.start("root", SpanKind::Server, None);
        root.set("http.response.status_code", 200u16);
        let ctx = root.context().unwrap();
        let mut child = tracer.start("child", SpanKind::Client, Some(&ctx));
        child.set_error("boom");
        drop(child);
        drop(root);
        let id = ctx.trace_id.to_string();
        let spans = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                match receiver.store.trace(&id) {
                    Some(spans) if spans.len() == 2 => return spans,
                    _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                }
            }
        })
        .await
        .expect("both spans arrive");
        let root = spans.iter().find(|s| s.name == "root").unwrap();
        let child = spans.iter().find(|s| s.name == "child").unwrap();
        assert_eq!(root.service, "svc");
        assert_eq!(root.kind, "server");
        assert_eq!(root.parent_span_id, None);
        assert_eq!(child.parent_span_id.as_deref(), Some(root.span_id.as_str()));
        assert_eq!(child.status, "error");
        assert_eq!(root.attributes["http.response.status_code"], 200);
        assert_eq!(metrics.exported_count(), 2);
        let list = receiver.store.list();
        assert_eq!(list[0].trace_id, id);
        assert_eq!(list[0].root_name, "root");
        assert_eq!(list[0].errors, 1);
    }

    #[tokio::test]
    async fn spans_round_trip_over_otlp_grpc() {
        roundtrip(Protocol::Grpc).await;
    }

    #[tokio::test]
    async fn spans_round_trip_over_otlp_http() {
        roundtrip(Protocol::HttpProtobuf).await;
    }

    #[test]
    fn the_store_forgets_the_oldest_trace() {
        let store = Store::new(2);
        for id in ["a", "b", "c"] {
            store.add(StoredSpan {
                trace_id: id.into(),
                span_id: "1".into(),
                parent_span_id: None,
                service: "s".into(),
                name: "n".into(),
                kind: "server",
                start_unix_nano: 0,
                end_unix_nano: 1,
                status: "unset",
                status_message: String::new(),
                attributes: BTreeMap::new(),
            });
        }
        assert!(store.trace("a").is_none());
        let ids: Vec<String> = store.list().into_iter().map(|t| t.trace_id).collect();
        assert_eq!(ids, ["c", "b"]);
    }
}
