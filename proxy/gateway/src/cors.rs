//! CORS: the gateway answers preflight requests itself and adds the CORS headers to every
//! response, its own errors included (a browser script can then read why a call failed).
//!
//! Built on tower-http's `CorsLayer` from the `cors` section. With a `cors` section every
//! `OPTIONS` request is answered by the gateway as a preflight; without one, no CORS headers
//! are added and `OPTIONS` goes to the backend like any method.

use http::{HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer};

use super::config::{ConfigError, Cors, GatewayConfig};

/// The layer for `cors` (validated already; errors here name the field).
pub fn layer(config: &GatewayConfig, cors: &Cors) -> Result<CorsLayer, ConfigError> {
    let bad = |field: String, message: String| config.invalid(format!("cors.{field}"), message);
    let origins = if cors.allow_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let list = cors
            .allow_origins
            .iter()
            .enumerate()
            .map(|(i, o)| {
                HeaderValue::from_str(o)
                    .map_err(|e| bad(format!("allowOrigins[{i}]"), e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(list)
    };
    let methods = if cors.allow_methods.iter().any(|m| m == "*") {
        AllowMethods::any()
    } else {
        let list = cors
            .allow_methods
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Method::from_bytes(m.as_bytes())
                    .map_err(|e| bad(format!("allowMethods[{i}]"), e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        AllowMethods::list(list)
    };
    let headers = if cors.allow_headers.iter().any(|h| h == "*") {
        AllowHeaders::any()
    } else {
        let list = cors
            .allow_headers
            .iter()
            .enumerate()
            .map(|(i, h)| {
                HeaderName::from_bytes(h.as_bytes())
                    .map_err(|e| bad(format!("allowHeaders[{i}]"), e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        AllowHeaders::list(list)
    };
    let mut layer = CorsLayer::new()
        .allow_origin(origins)
        .allow_methods(methods)
        .allow_headers(headers);
    if let Some(max_age) = cors.max_age {
        layer = layer.max_age(max_age);
    }
    Ok(layer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrule_proxy_core::body::{self, BoxBody};
    use http::{Request, Response, header};
    use std::convert::Infallible;
    use std::path::Path;
    use tower::{Layer, ServiceExt};

    fn cors(yaml: &str) -> CorsLayer {
        let c = GatewayConfig::parse(
            &format!(
                "cors: {yaml}\nroutes: [{{name: r, pathPrefix: /, service: web, public: true}}]"
            ),
            Path::new("gateway.yaml"),
        )
        .unwrap();
        layer(&c, c.cors.as_ref().unwrap()).unwrap()
    }

    async fn call(layer: &CorsLayer, req: Request<BoxBody>) -> Response<BoxBody> {
        let backend = tower::service_fn(|_req: Request<BoxBody>| async {
            Ok::<_, Infallible>(Response::new(body::full("backend")))
        });
        layer.layer(backend).oneshot(req).await.unwrap()
    }

    fn preflight(origin: &str) -> Request<BoxBody> {
        Request::options("/api/users")
            .header(header::ORIGIN, origin)
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .header(header::ACCESS_CONTROL_REQUEST_HEADERS, "authorization")
            .body(body::empty())
            .unwrap()
    }

    #[tokio::test]
    async fn preflight_is_answered_by_the_gateway() {
        let l = cors(
            "{allowOrigins: ['*'], allowMethods: [GET, POST], allowHeaders: [authorization, content-type], maxAge: 10m}",
        );
        let rsp = call(&l, preflight("https://shop.example")).await;
        assert!(rsp.status().is_success());
        let h = rsp.headers();
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_METHODS], "GET,POST");
        assert_eq!(
            h[header::ACCESS_CONTROL_ALLOW_HEADERS],
            "authorization,content-type"
        );
        assert_eq!(h[header::ACCESS_CONTROL_MAX_AGE], "600");
    }

    #[tokio::test]
    async fn origin_lists_allow_only_their_origins() {
        let l = cors("{allowOrigins: ['https://shop.example'], allowMethods: [GET]}");
        let rsp = call(&l, preflight("https://shop.example")).await;
        assert_eq!(
            rsp.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://shop.example"
        );
        let rsp = call(&l, preflight("https://evil.example")).await;
        assert!(
            !rsp.headers()
                .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        );
        // Actual requests reach the backend and get the header too.
        let get = Request::get("/")
            .header(header::ORIGIN, "https://shop.example")
            .body(body::empty())
            .unwrap();
        let rsp = call(&l, get).await;
        assert_eq!(
            rsp.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://shop.example"
        );
    }
}
