//! The exporter: a bounded queue of finished spans and one task that sends them to an OTLP
//! collector in batches, over gRPC (`TraceService/Export`) or HTTP (`POST /v1/traces`,
//! protobuf).
//!
//! A dead or slow collector costs spans, never memory or request latency: spans enter the
//! queue with `try_send` ([`super::tracer::Span`]'s drop), so a full queue drops the span and
//! counts it (`trace_spans_dropped_total{reason="queue_full"}`); an export that fails or takes
//! longer than [`EXPORT_TIMEOUT`] drops its batch, counted as `export_failed`. The queue's
//! bound is the memory the exporter may hold.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, span, status};
use prost::Message;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use crate::metrics::TraceMetrics;
use crate::tracer::{Shared, SpanData, SpanKind, Status, Tracer, Value};

/// The most spans sent in one export.
pub const MAX_BATCH: usize = 512;
/// How long a batch waits for more spans before it is sent.
pub const BATCH_DELAY: Duration = Duration::from_millis(500);
/// How long one export may take before its batch is given up.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// How spans reach the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// OTLP/gRPC (the collector's port 4317).
    #[default]
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318, path `/v1/traces`).
    HttpProtobuf,
}

impl std::str::FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grpc" => Ok(Protocol::Grpc),
            "http" | "http/protobuf" => Ok(Protocol::HttpProtobuf),
            other => Err(format!(
                "unknown OTLP protocol {other:?}: expected grpc or http/protobuf"
            )),
        }
    }
}

/// Where and how spans are exported.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// The collector: `http://host:4317` for gRPC, `http://host:4318` (or a full
    /// `.../v1/traces` URL) for HTTP.
    pub endpoint: String,
    pub protocol: Protocol,
    /// The share of new traces sampled, 0 to 1.
    pub sample_ratio: f64,
    /// The most finished spans held for export.
    pub queue_size: usize,
    /// `service.name` and any other resource attributes of this process.
    pub resource: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("--otlp-endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
}

/// Starts the export task (on the current Tokio runtime) and returns the tracer feeding it.
/// The task ends, after sending what is queued, once every clone of the tracer is gone.
pub fn start(config: ExportConfig, metrics: TraceMetrics) -> Result<Tracer, ExportError> {
    let sink = Sink::new(&config)?;
    let capacity = config.queue_size.max(1);
    metrics.set_capacity(capacity);
    let (tx, rx) = mpsc::channel(capacity);
    let resource = Resource {
        attributes: config
            .resource
            .iter()
            .map(|(k, v)| key_value(k, &Value::Str(v.clone())))
            .collect(),
        ..Resource::default()
    };
    tokio::spawn(run(rx, sink, resource, metrics.clone()));
    Ok(Tracer(Some(Arc::new(Shared::new(
        config.sample_ratio,
        tx,
        metrics,
    )))))
}

// One sink per process, owned by the export task: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Sink {
    Grpc(TraceServiceClient<Channel>),
    Http {
        client: Client<HttpConnector, Full<Bytes>>,
        uri: http::Uri,
    },
}

impl Sink {
    fn new(config: &ExportConfig) -> Result<Self, ExportError> {
        let invalid = |reason: String| ExportError::Endpoint {
            endpoint: config.endpoint.clone(),
            reason,
        };
        let uri: http::Uri = config
            .endpoint
            .parse()
            .map_err(|e| invalid(format!("not a URL: {e}")))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(invalid(
                "expected http://host:port (TLS to the collector is not supported)".into(),
            ));
        }
        Ok(match config.protocol {
            Protocol::Grpc => {
                let channel = Endpoint::from_shared(config.endpoint.clone())
                    .map_err(|e| invalid(e.to_string()))?
                    .connect_timeout(Duration::from_secs(2))
                    .timeout(EXPORT_TIMEOUT)
                    .connect_lazy();
                Sink::Grpc(TraceServiceClient::new(channel))
            }
            Protocol::HttpProtobuf => {
                let uri = if uri.path().ends_with("/v1/traces") {
                    uri
                } else {
                    let base = config.endpoint.trim_end_matches('/');
                    format!("{base}/v1/traces")
                        .parse()
                        .map_err(|e| invalid(format!("not a URL: {e}")))?
                };
                let mut connector = HttpConnector::new();
                connector.set_connect_timeout(Some(Duration::from_secs(2)));
                Sink::Http {
                    client: Client::builder(TokioExecutor::new()).build(connector),
                    uri,
                }
            }
        })
    }

    async fn export(&mut self, request: ExportTraceServiceRequest) -> Result<(), String> {
        match self {
            Sink::Grpc(client) => client
                .export(request)
                .await
                .map(drop)
                .map_err(|status| status.to_string()),
            Sink::Http { client, uri } => {
                let req = http::Request::post(uri.clone())
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(Full::new(Bytes::from(request.encode_to_vec())))
                    .map_err(|e| e.to_string())?;
                let rsp = client.request(req).await.map_err(|e| e.to_string())?;
                let status = rsp.status();
                // Read to the end so the connection can be reused.
                let _ = rsp.into_body().collect().await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(format!("collector answered {status}"))
                }
            }
        }
    }
}

async fn run(
    mut rx: mpsc::Receiver<SpanData>,
    mut sink: Sink,
    resource: Resource,
    metrics: TraceMetrics,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut failing = false;
    loop {
        let Some(first) = rx.recv().await else {
            return;
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len();
        metrics.dequeued(n);
        let request = to_request(&resource, batch.drain(..));
        match tokio::time::timeout(EXPORT_TIMEOUT, sink.export(request)).await {
            Ok(Ok(())) => {
                metrics.exported(n);
                if failing {
                    tracing::info!("trace export works again");
                    failing = false;
                }
            }
            Ok(Err(error)) => {
                metrics.export_failed(n);
                if !failing {
                    tracing::warn!(%error, spans = n, "trace export failed; dropping spans until it works");
                    failing = true;
                }
            }
            Err(_) => {
                metrics.export_failed(n);
                if !failing {
                    tracing::warn!(spans = n, timeout = ?EXPORT_TIMEOUT, "trace export timed out; dropping spans until it works");
                    failing = true;
                }
            }
        }
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn key_value(key: &str, value: &Value) -> KeyValue {
    let value = match value {
        Value::Str(s) => any_value::Value::StringValue(s.clone()),
        Value::Int(n) => any_value::Value::IntValue(*n),
        Value::Bool(b) => any_value::Value::BoolValue(*b),
    };
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

/// One OTLP span of a finished span.
pub fn to_proto(data: &SpanData) -> opentelemetry_proto::tonic::trace::v1::Span {
    let kind = match data.kind {
        SpanKind::Internal => span::SpanKind::Internal,
        SpanKind::Server => span::SpanKind::Server,
        SpanKind::Client => span::SpanKind::Client,
    };
    let status = match &data.status {
        Status::Unset => opentelemetry_proto::tonic::trace::v1::Status::default(),
        Status::Error(message) => opentelemetry_proto::tonic::trace::v1::Status {
            message: message.clone(),
            code: status::StatusCode::Error as i32,
        },
    };
    opentelemetry_proto::tonic::trace::v1::Span {
        trace_id: data.context.trace_id.0.to_vec(),
        span_id: data.context.span_id.0.to_vec(),
        parent_span_id: data
            .parent_span_id
            .map_or_else(Vec::new, |id| id.0.to_vec()),
        flags: u32::from(data.context.sampled),
        name: data.name.clone(),
        kind: kind as i32,
        start_time_unix_nano: nanos(data.start),
        end_time_unix_nano: nanos(data.end),
        attributes: data
            .attributes
            .iter()
            .map(|(k, v)| key_value(k, v))
            .collect(),
        status: Some(status),
        ..Default::default()
    }
}

fn to_request(
    resource: &Resource,
    spans: impl Iterator<Item = SpanData>,
) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "ferrule".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans: spans.map(|s| to_proto(&s)).collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_endpoints_are_refused_with_the_reason() {
        let config = |endpoint: &str| ExportConfig {
            endpoint: endpoint.into(),
            protocol: Protocol::Grpc,
            sample_ratio: 1.0,
            queue_size: 10,
            resource: vec![],
        };
        let err = Sink::new(&config("collector:4317")).err().unwrap();
        assert!(
            err.to_string().contains("expected http://host:port"),
            "{err}"
        );
        let err = Sink::new(&config("https://collector:4317")).err().unwrap();
        assert!(err.to_string().contains("TLS"), "{err}");
        assert!("grpcx".parse::<Protocol>().is_err());
    }

    #[tokio::test]
    async fn a_dead_collector_costs_counted_spans_not_memory() {
        // Nothing listens on this port once the listener is dropped: exports fail at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let metrics = TraceMetrics::default();
        let tracer = start(
            ExportConfig {
                endpoint: format!("http://127.0.0.1:{port}"),
                protocol: Protocol::Grpc,
                sample_ratio: 1.0,
                queue_size: 8,
                resource: vec![("service.name".into(), "test".into())],
            },
            metrics.clone(),
        )
        .unwrap();
        for _ in 0..1_000 {
            drop(tracer.start("s", SpanKind::Server, None));
            assert!(metrics.queue_len() <= 8);
        }
        let dropped = metrics.dropped_count("queue_full");
        assert!(dropped >= 1_000 - 8 - MAX_BATCH as u64, "{dropped}");
        assert_eq!(metrics.exported_count(), 0);
    }
}
