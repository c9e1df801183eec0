//! Header rules of a proxy hop: hop-by-hop headers, upgrades, and the mesh's own headers.
//!
//! Between two ferrule proxies an HTTP/1 request travels as HTTP/2 with
//! [`ORIG_PROTO`] naming its original version (linkerd's `l5d-orig-proto`); the inbound proxy
//! strips it before the app sees the request. Whether a request came from a meshed peer is
//! connection state (`context::ConnMeta::peer_identity`), never a header a client could send.

use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Request, Version};

/// The HTTP version a request had before the outbound proxy upgraded it to HTTP/2. A
/// `HeaderName`, not a string: a lookup by string parses the name first, on every request.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("ferrule-orig-proto");
/// The only value of [`ORIG_PROTO`] this proxy writes.
pub const ORIG_PROTO_HTTP1: &str = "HTTP/1.1";
/// The client's identity as its mutual TLS certificate proved it, set by the inbound proxy for
/// the app; any value a client sent is removed first, so an app can trust it.
pub const CLIENT_ID: HeaderName = HeaderName::from_static("ferrule-client-id");
/// gRPC's status, in a trailers-only response's head or in the trailers.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// gRPC's error message, next to [`GRPC_STATUS`].
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1). A static, not a
/// const: it is read for every header of every message.
static HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::TRAILER,
    header::UPGRADE,
];

/// True for an HTTP/1 request that asks to switch protocols (WebSocket) or to tunnel
/// (`CONNECT`): both end as a byte stream spliced between the two connections.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    if req.method() == Method::CONNECT {
        return true;
    }
    req.version() <= Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers, including those the `Connection` header names. `TE: trailers`
/// stays (gRPC needs it). When `keep_upgrade` is set, `Connection` and `Upgrade` stay so the
/// next hop sees the upgrade request or its `101` answer.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of them: one pass over the few names a message has is cheaper
    // than a hashed lookup for each of the eight names (this runs twice per request per hop).
    let (mut hop, mut te) = (false, false);
    for name in headers.keys() {
        hop |= HOP_BY_HOP.contains(name);
        te |= name == header::TE;
    }
    if !hop {
        // Every gRPC request carries `te: trailers` and nothing else of the kind: it stays
        // as it is, without the removals below.
        let trailers_only = || {
            let mut values = headers.get_all(header::TE).iter();
            values
                .next()
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"))
                && values.next().is_none()
        };
        if !te || trailers_only() {
            return;
        }
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        if keep_upgrade && (name == header::CONNECTION || name == header::UPGRADE) {
            continue;
        }
        headers.remove(name);
    }
    // Every `TE` line counts: `TE: gzip` then `TE: trailers` is the list `gzip, trailers`.
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, http::HeaderValue::from_static("trailers"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert(header::TE, "trailers, deflate".parse().unwrap());
        h.insert("x-end-to-end", "1".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key(header::CONNECTION));
        assert!(!h.contains_key("keep-alive"));
        assert!(!h.contains_key("x-private"));
        assert_eq!(h[header::TE], "trailers");
        assert!(h.contains_key("x-end-to-end"));

        // Only a `Connection` header names others: without one, those stay.
        let mut h = HeaderMap::new();
        h.insert("x-private", "1".parse().unwrap());
        h.insert(header::HOST, "user".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn te_keeps_only_trailers() {
        let te = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::TE, v.parse().unwrap());
            }
            h.insert(header::CONTENT_TYPE, "application/grpc".parse().unwrap());
            strip_hop_by_hop(&mut h, false);
            assert_eq!(h[header::CONTENT_TYPE], "application/grpc");
            h.get_all(header::TE)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(te(&["trailers"]), ["trailers"]);
        assert_eq!(te(&["Trailers"]), ["Trailers"]);
        assert_eq!(te(&["gzip, trailers"]), ["trailers"]);
        assert_eq!(te(&["gzip", "trailers"]), ["trailers"]);
        assert_eq!(te(&["trailers", "trailers"]), ["trailers"]);
        assert!(te(&["gzip"]).is_empty());
    }

    #[test]
    fn detects_upgrades() {
        let ws = Request::get("/")
            .header(header::CONNECTION, "keep-alive, Upgrade")
            .header(header::UPGRADE, "websocket")
            .body(())
            .unwrap();
        assert!(is_upgrade(&ws));
        let connect = Request::connect("db:5432").body(()).unwrap();
        assert!(is_upgrade(&connect));
        let plain = Request::get("/").body(()).unwrap();
        assert!(!is_upgrade(&plain));
    }
}
