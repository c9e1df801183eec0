//! The unmodified shop in a cluster of network namespaces (`ferrule_harness::netns_cluster`),
//! every pod behind a transparent sidecar whose rules the real `ferrule-proxy init` wrote.
//!
//! Pods: `user`, `payment`, `order` (the sample apps with their usual flags: order calls
//! `http://user:50051` and `http://payment:50053`, names the pods' hosts files give service
//! VIPs), `tcp` (a raw TCP app: an echo port, a server-speaks-first port and a port its init
//! skips) and `client`, from which the walkthrough runs with curl and bash. etcd and the
//! controller run in the node namespace. The apps know nothing of the mesh: they dial names,
//! iptables hands the connections to their sidecars, the sidecars map VIPs to services through
//! the controller and send to the pods' addresses, where the peer's rules hand them to its
//! sidecar's one inbound listener. Needs root, iproute2, iptables, setpriv, etcd, curl, bash.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, ensure};
use ferrule_harness::binary;
use ferrule_harness::netns::curl_in;
use ferrule_harness::netns_cluster::{Cluster, Pod};
use serde_json::Value;

const SERVICES: [(&str, Ipv4Addr); 4] = [
    ("user", Ipv4Addr::new(10, 96, 0, 11)),
    ("payment", Ipv4Addr::new(10, 96, 0, 12)),
    ("order", Ipv4Addr::new(10, 96, 0, 13)),
    ("tcp", Ipv4Addr::new(10, 96, 0, 14)),
];

/// The port of the `tcp` pod that its init skips: reached directly, never through a proxy.
const SKIPPED_PORT: &str = "9100";

fn vip(service: &str) -> String {
    let (_, ip) = SERVICES.iter().find(|(s, _)| *s == service).unwrap();
    ip.to_string()
}

/// The sidecar flags of a pod fronting `service`'s `ports` (NAME=127.0.0.1:PORT).
fn meshed(controller: &str, service: &str, ports: &[&str]) -> Vec<String> {
    let mut args = vec![
        format!("--controller={controller}"),
        format!("--service={service}"),
        format!("--label=ferrule.io/service-ip={}", vip(service)),
    ];
    args.extend(ports.iter().map(|p| format!("--app-port={p}")));
    args
}

/// One counter's value on a pod's sidecar, summed over the series whose labels contain every
/// `needle`.
async fn counter(pod: &Pod, metric: &str, needles: &[&str]) -> Result<f64> {
    let reply = curl_in(&pod.ns, &["http://127.0.0.1:4191/metrics"]).await?;
    Ok(reply
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// The JSON body of a curl `-i` reply that must have `status`.
fn body(reply: &str, status: u16) -> Result<Value> {
    ensure!(
        reply.starts_with(&format!("HTTP/1.1 {status}")),
        "expected {status}, got:\n{reply}"
    );
    let (_, body) = reply
        .split_once("\r\n\r\n")
        .context("a reply without a body")?;
    serde_json::from_str(body).with_context(|| format!("not JSON: {body}"))
}

/// A bash one-liner's output inside `pod`: raw TCP through `/dev/tcp`, which resolves names
/// with the pod's hosts file.
async fn bash(cluster: &Cluster, pod: &Pod, script: &str) -> Result<String> {
    let ran = cluster.run(pod, "bash", &["-c", script]).await?;
    ensure!(
        ran.ok,
        "bash -c {script:?} in {} failed: {}",
        pod.name,
        ran.stderr
    );
    Ok(ran.stdout.trim().to_string())
}

#[tokio::test]
async fn the_shop_runs_through_transparent_proxies() -> Result<()> {
    let mut cluster = Cluster::create(&SERVICES)?;
    let controller = cluster.control_plane().await?;
    let dir = cluster.dir().to_path_buf();
    let db = |name: &str| format!("sqlite://{}", dir.join(format!("{name}.db")).display());

    let user = cluster.pod("user")?;
    let payment = cluster.pod("payment")?;
    let order = cluster.pod("order")?;
    let tcp = cluster.pod("tcp")?;
    let client = cluster.pod("client")?;

    // The init step of every pod, with the defaults but for the tcp pod's skipped port.
    let report = cluster.init(&user, &[]).await?;
    ensure!(
        report.contains("-A FERRULE_OUTPUT -m owner --uid-owner 2102 -j RETURN")
            && report.contains("-t nat -A PREROUTING -j FERRULE_INBOUND"),
        "init does not print the rules it wrote:\n{report}"
    );
    for pod in [&payment, &order, &client] {
        cluster.init(pod, &[]).await?;
    }
    cluster
        .init(&tcp, &[&format!("--skip-inbound-ports={SKIPPED_PORT}")])
        .await?;

    // The apps, unmodified, on loopback as in a pod; then their sidecars.
    cluster
        .app(
            &user,
            &binary("shop-user")?,
            &[],
            &[
                ("USER_JWT_SECRET", "netns-secret".into()),
                ("USER_DATABASE_URL", db("user")),
            ],
        )
        .await?;
    cluster
        .app(
            &payment,
            &binary("shop-payment")?,
            &[],
            &[("PAYMENT_DATABASE_URL", db("payment"))],
        )
        .await?;
    cluster
        .app(
            &order,
            &binary("shop-order")?,
            &[],
            &[
                ("ORDER_DATABASE_URL", db("order")),
                ("ORDER_USER_GRPC_ADDR", "http://user:50051".into()),
                ("ORDER_PAYMENT_GRPC_ADDR", "http://payment:50053".into()),
            ],
        )
        .await?;
    cluster
        .app(
            &tcp,
            &binary("netns-tcp-app")?,
            &[
                "--echo=0.0.0.0:7000",
                "--peer=0.0.0.0:6379",
                &format!("--peer=0.0.0.0:{SKIPPED_PORT}"),
            ],
            &[],
        )
        .await?;
    let sidecars = [
        (
            &user,
            meshed(
                &controller,
                "user",
                &["http=127.0.0.1:8001", "grpc=127.0.0.1:50051"],
            ),
        ),
        (
            &payment,
            meshed(
                &controller,
                "payment",
                &["http=127.0.0.1:8003", "grpc=127.0.0.1:50053"],
            ),
        ),
        (
            &order,
            meshed(&controller, "order", &["http=127.0.0.1:8002"]),
        ),
        (
            &tcp,
            meshed(
                &controller,
                "tcp",
                &["echo=127.0.0.1:7000", "banner=127.0.0.1:6379"],
            ),
        ),
        (&client, vec![format!("--controller={controller}")]),
    ];
    // Each sidecar gets its identity from the mesh CA with a join token of its own.
    for (pod, mut args) in sidecars {
        let token = cluster.join_token(&pod.name).await?;
        args.push(format!("--identity-token={token}"));
        args.push(format!("--service-account={}", pod.name));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cluster.sidecar(pod, &args).await?;
    }

    // The walkthrough from the client pod, by service name. The first call also waits (bounded)
    // until the controller's address index has the VIPs the sidecars declared.
    let login = r#"{"username":"alice","password":"wonderland"}"#;
    let reply = ferrule_harness::eventually(
        std::time::Duration::from_secs(20),
        "login through the mesh",
        || async {
            curl_in(
                &client.ns,
                &[
                    "-H",
                    "content-type: application/json",
                    "-d",
                    login,
                    "http://user:8001/login",
                ],
            )
            .await
            .ok()
            .filter(|r| r.starts_with("HTTP/1.1 200"))
        },
    )
    .await?;
    let token = body(&reply, 200)?["token"]
        .as_str()
        .context("login gave no token")?
        .to_string();
    let new_order =
        r#"{"user_id":"123","items":[{"sku":"book","quantity":2,"unit_price_cents":1299}]}"#;
    let reply = curl_in(
        &client.ns,
        &[
            "-H",
            "content-type: application/json",
            "-H",
            &format!("authorization: Bearer {token}"),
            "-d",
            new_order,
            "http://order:8002/orders",
        ],
    )
    .await?;
    let placed = body(&reply, 201)?;
    ensure!(
        placed["status"] == "paid" && placed["total_cents"] == 2598,
        "{placed}"
    );
    let id = placed["id"].as_str().context("an order without an id")?;
    let read = body(
        &curl_in(&client.ns, &[&format!("http://order:8002/orders/{id}")]).await?,
        200,
    )?;
    ensure!(
        read["status"] == "paid" && read["payment_id"] == placed["payment_id"],
        "{read}"
    );

    // Every hop went through the proxies, as the services the VIPs name: HTTP/1 from the
    // client, gRPC over HTTP/2 from order to user and payment, received by their inbound.
    for (pod, service) in [(&client, "user:http"), (&client, "order:http")] {
        let n = counter(
            pod,
            "request_total",
            &[
                r#"direction="outbound""#,
                &format!(r#"target_service="{service}""#),
            ],
        )
        .await?;
        ensure!(
            n >= 1.0,
            "{} sent no request to {service} through its proxy",
            pod.name
        );
    }
    for (service, grpc_port) in [("user", "user:grpc"), ("payment", "payment:grpc")] {
        let sent = counter(
            &order,
            "request_total",
            &[
                r#"direction="outbound""#,
                &format!(r#"target_service="{grpc_port}""#),
                r#"status_code="200""#,
            ],
        )
        .await?;
        ensure!(
            sent >= 1.0,
            "order sent no gRPC to {grpc_port} through its proxy"
        );
        let pod = if service == "user" { &user } else { &payment };
        let received = counter(
            pod,
            "request_total",
            &[
                r#"direction="inbound""#,
                &format!(r#"target_service="{grpc_port}""#),
            ],
        )
        .await?;
        ensure!(received >= 1.0, "{service}'s inbound saw no gRPC request");
    }
    // Between the pods it was mutual TLS: each server sidecar terminated TLS from its peers.
    for pod in [&user, &payment, &order] {
        let tls = counter(
            pod,
            "protocol_detect_total",
            &[r#"direction="inbound""#, r#"result="tls""#],
        )
        .await?;
        ensure!(
            tls >= 1.0,
            "{}'s sidecar terminated no mutual TLS",
            pod.name
        );
    }

    // Raw TCP, the client speaking first: echoed through both proxies.
    let echoed = bash(
        &cluster,
        &client,
        "exec 3<>/dev/tcp/tcp/7000; echo ping >&3; read -t 5 line <&3; echo $line",
    )
    .await?;
    ensure!(echoed == "ping", "the echo service answered {echoed:?}");
    // Server speaks first, on a default opaque port: the banner arrives well within the
    // proxies' 10 s detection timeout, and it names the inbound proxy (on loopback) as the
    // app's peer.
    let banner = bash(
        &cluster,
        &client,
        "exec 3<>/dev/tcp/tcp/6379; read -t 3 line <&3; echo $line",
    )
    .await?;
    ensure!(
        banner == "127.0.0.1",
        "the banner through the mesh was {banner:?}"
    );
    // The skipped port is reached without the tcp pod's proxy: the app sees the client pod.
    let banner = bash(
        &cluster,
        &client,
        &format!(
            "exec 3<>/dev/tcp/{}/{SKIPPED_PORT}; read -t 3 line <&3; echo $line",
            tcp.ip
        ),
    )
    .await?;
    ensure!(
        banner == client.ip.to_string(),
        "the skipped port's app saw {banner:?}, not the client pod {}",
        client.ip
    );
    let tcp_bytes = counter(
        &tcp,
        "tcp_read_bytes_total",
        &[r#"direction="inbound""#, r#"target_service="tcp:echo""#],
    )
    .await?;
    ensure!(
        tcp_bytes >= 5.0,
        "the tcp pod's inbound did not carry the echo"
    );

    // IPv6, pod to pod: ip6tables redirects both ways and the sidecars' IPv6 listeners take
    // it. The user app listens on 127.0.0.1 only, so an answer means user's sidecar took
    // the connection.
    let reply = curl_in(
        &client.ns,
        &[&format!("http://[{}]:8001/users/123", user.ip6)],
    )
    .await?;
    ensure!(body(&reply, 200)?["user_id"] == "123", "{reply}");

    // A connection made to the inbound listener's own port has no app port to go to: closed,
    // never looped back into the listener.
    let ran = cluster
        .run(
            &client,
            "curl",
            &[
                "-sS",
                "--max-time",
                "5",
                &format!("http://{}:4143/", user.ip),
            ],
        )
        .await?;
    ensure!(!ran.ok, "the inbound port itself answered: {}", ran.stdout);

    // init is idempotent: a second run leaves exactly the same rules.
    for save in ["iptables-save", "ip6tables-save"] {
        let before = cluster.nat_rules(&client, save).await?;
        ensure!(before.contains("-A OUTPUT -j FERRULE_OUTPUT"), "{before}");
        cluster.init(&client, &[]).await?;
        let after = cluster.nat_rules(&client, save).await?;
        ensure!(
            before == after,
            "{save} changed on a second init:\n{before}\n---\n{after}"
        );
    }
    // --clean removes everything init wrote, in every pod.
    for pod in [&user, &payment, &order, &tcp, &client] {
        cluster.init(pod, &["--clean"]).await?;
        for save in ["iptables-save", "ip6tables-save"] {
            let left = cluster.nat_rules(pod, save).await?;
            ensure!(
                !left.contains("FERRULE") && !left.contains("-A "),
                "{save} in {} after --clean:\n{left}",
                pod.name
            );
        }
    }
    Ok(())
}

/// `init` picks the back end that holds Ferrule's chains: rules written with
/// `--iptables-mode legacy` are found (and left unchanged) by a second run in `auto` mode,
/// which writes nothing to nft, and `--clean` removes them. Without CAP_NET_ADMIN it refuses,
/// saying what to grant.
#[tokio::test]
async fn init_follows_the_back_end_in_use_and_explains_a_missing_capability() -> Result<()> {
    let mut cluster = Cluster::create(&SERVICES)?;
    let pod = cluster.pod("legacy")?;
    cluster
        .init(&pod, &["--iptables-mode=legacy", "--disable-ipv6"])
        .await?;
    let legacy = cluster.nat_rules(&pod, "iptables-legacy-save").await?;
    ensure!(
        legacy.contains("-A PREROUTING -j FERRULE_INBOUND"),
        "{legacy}"
    );

    let report = cluster.init(&pod, &["--disable-ipv6"]).await?;
    ensure!(
        report.contains("# iptables-legacy (wrote")
            && report.contains("# -t nat -A OUTPUT -j FERRULE_OUTPUT: already there"),
        "auto mode did not follow the legacy rules:\n{report}"
    );
    ensure!(cluster.nat_rules(&pod, "iptables-legacy-save").await? == legacy);
    let nft = cluster.nat_rules(&pod, "iptables-nft-save").await?;
    ensure!(
        !nft.contains("FERRULE"),
        "auto mode wrote to nft too:\n{nft}"
    );

    cluster.init(&pod, &["--clean"]).await?;
    let left = cluster.nat_rules(&pod, "iptables-legacy-save").await?;
    ensure!(!left.contains("FERRULE") && !left.contains("-A "), "{left}");

    // As an unprivileged user: refused before touching anything, naming the capability.
    let ran = cluster
        .run(
            &pod,
            "setpriv",
            &[
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
                &binary("ferrule-proxy")?.display().to_string(),
                "init",
            ],
        )
        .await?;
    ensure!(
        !ran.ok && ran.stderr.contains("needs CAP_NET_ADMIN"),
        "init without the capability: {}",
        ran.stderr
    );
    Ok(())
}
