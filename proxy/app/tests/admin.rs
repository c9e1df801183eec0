//! The admin listener: liveness, readiness, `/config` and `/metrics` that parse as
//! Prometheus text with counters matching the traffic sent.

mod support;

use ferrule_proxy::body;
use http::{Request, StatusCode};
use support::*;

fn sample<'a>(
    scrape: &'a prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<&'a prometheus_parse::Sample> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
}

fn counter(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(scrape, name, labels).map(|s| &s.value) {
        Some(prometheus_parse::Value::Counter(v)) | Some(prometheus_parse::Value::Untyped(v)) => *v,
        Some(prometheus_parse::Value::Gauge(v)) => *v,
        other => panic!("{name} {labels:?}: {other:?}"),
    }
}

async fn scrape(proxy: &ferrule_proxy::sidecar::Proxy) -> anyhow::Result<prometheus_parse::Scrape> {
    let (status, text) = admin_get(proxy, "/metrics").await?;
    assert_eq!(status, StatusCode::OK);
    let lines = text.lines().map(|l| Ok(l.to_string()));
    Ok(prometheus_parse::Scrape::parse(lines)?)
}

#[tokio::test]
async fn metrics_parse_and_count_requests() -> anyhow::Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let app = http_backend().await;
        let server = server_proxy("user", app, &[]).await;
        let client = client_proxy(
            vec![
                ("user", vec![meshed_endpoint("user", &server)]),
                ("ghost", vec![]),
            ],
            &["--access-log"],
        )
        .await;
        let upstream = client.addrs.upstream("user").unwrap();
        const N: usize = 7;
        for i in 0..N {
            let req = Request::post("/echo")
                .header("host", "user")
                .body(body::full(format!("request {i}")))?;
            let (parts, _) = http1(upstream, req).await?;
            assert_eq!(parts.status, StatusCode::OK);
        }
        let req = Request::get("/")
            .header("host", "ghost")
            .body(body::empty())?;
        let (parts, _) = http1(client.addrs.upstream("ghost").unwrap(), req).await?;
        assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);

        let out = scrape(&client).await?;
        let ok = [
            ("direction", "outbound"),
            ("target_service", "user"),
            ("status_code", "200"),
            ("classification", "success"),
        ];
        assert_eq!(counter(&out, "request_total", &ok), N as f64);
        let failed = [
            ("direction", "outbound"),
            ("target_service", "ghost"),
            ("status_code", "503"),
            ("classification", "failure"),
        ];
        assert_eq!(counter(&out, "request_total", &failed), 1.0);
        assert_eq!(
            counter(&out, "proxy_errors_total", &[("reason", "unknown_service")]),
            1.0
        );
        assert_eq!(
            counter(
                &out,
                "balancer_endpoints",
                &[("target_service", "user"), ("state", "total")]
            ),
            1.0
        );
        let latency_count = out
            .samples
            .iter()
            .find(|s| {
                s.metric == "response_latency_ms" && s.labels.get("target_service") == Some("user")
            })
            .map(|s| match &s.value {
                prometheus_parse::Value::Histogram(buckets) => {
                    buckets.last().map(|b| b.count).unwrap_or_default()
                }
                other => panic!("latency is not a histogram: {other:?}"),
            });
        assert_eq!(latency_count, Some(N as f64));
        assert!(
            counter(
                &out,
                "tcp_read_bytes_total",
                &[("direction", "outbound"), ("target_service", "user")]
            ) > 0.0
        );
        assert!(
            counter(
                &out,
                "tcp_write_bytes_total",
                &[("direction", "outbound"), ("target_service", "user")]
            ) > 0.0
        );

        let inbound = scrape(&server).await?;
        let ok_in = [
            ("direction", "inbound"),
            ("target_service", "user"),
            ("status_code", "200"),
        ];
        assert_eq!(counter(&inbound, "request_total", &ok_in), N as f64);
        // The server saw one multiplexed HTTP/2 connection from the client proxy.
        assert_eq!(
            counter(
                &inbound,
                "protocol_detect_total",
                &[("direction", "inbound"), ("result", "http2")]
            ),
            1.0
        );

        client.shutdown().await;
        server.shutdown().await;
        Ok::<_, anyhow::Error>(())
    })
    .await?
}

#[tokio::test]
async fn live_ready_and_config() -> anyhow::Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let app = http_backend().await;
        let client = client_proxy(vec![("web", vec![plain_endpoint("web", app)])], &[]).await;
        assert_eq!(admin_get(&client, "/live").await?.0, StatusCode::OK);
        // No controller and no registration: ready at once.
        assert_eq!(admin_get(&client, "/ready").await?.0, StatusCode::OK);
        let (status, text) = admin_get(&client, "/config").await?;
        assert_eq!(status, StatusCode::OK);
        let config: serde_json::Value = serde_json::from_str(&text)?;
        let upstream = client.addrs.upstream("web").unwrap().to_string();
        assert_eq!(config["listeners"]["upstreams"][0][1], upstream.as_str());
        assert_eq!(config["config"]["balancer"], "p2c-ewma");
        assert_eq!(config["ready"], true);
        let (status, _) = admin_get(&client, "/nope").await?;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = admin_get(&client, "/shutdown").await?;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        client.shutdown().await;
        Ok::<_, anyhow::Error>(())
    })
    .await?
}
