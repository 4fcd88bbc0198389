//! The composition of `examples/axum_gateway.rs`: an axum server that
//! forwards `/a/*` and `/b/*` to two real upstreams through one hyper-util
//! client behind an `AuthRoutingLayer`, each upstream with its own token and
//! detector, and reports each token's status on `/auth/status`.

mod common;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{any, get};
use bytes::Bytes;
use common::{Issuer, Upstream, body_text};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;
use tower::{Layer, ServiceExt};
use tower_auth_refresh::{
    AuthRefreshLayer, AuthRouting, AuthRoutingLayer, ExpiryDetectorExt, JsonBodyRule, Origin,
    ReplayBody, TokenHandle, Unauthorized,
};

#[derive(Clone)]
struct Gateway {
    client: AuthRouting<Client<HttpConnector, ReplayBody<Body>>>,
    a: (Origin, TokenHandle),
    b: (Origin, TokenHandle),
}

impl Gateway {
    fn new(a: (Origin, TokenHandle), b: (Origin, TokenHandle)) -> Self {
        let routing = AuthRoutingLayer::new()
            .origin(a.0.clone(), AuthRefreshLayer::new(a.1.clone()))
            .origin(
                b.0.clone(),
                AuthRefreshLayer::new(b.1.clone())
                    .detector(Unauthorized::new().or(JsonBodyRule::default_rules())),
            );
        let client = routing.layer(Client::builder(TokioExecutor::new()).build_http());
        Self { client, a, b }
    }

    fn router(self) -> Router {
        Router::new()
            .route(
                "/a/{*rest}",
                any(|State(gw): State<Self>, request: Request| async move {
                    let origin = gw.a.0.clone();
                    gw.forward(origin, "/a", request).await
                }),
            )
            .route(
                "/b/{*rest}",
                any(|State(gw): State<Self>, request: Request| async move {
                    let origin = gw.b.0.clone();
                    gw.forward(origin, "/b", request).await
                }),
            )
            .route(
                "/auth/status",
                get(|State(gw): State<Self>| async move {
                    Json(serde_json::json!({
                        "a": { "status": gw.a.1.status(), "stats": gw.a.1.stats() },
                        "b": { "status": gw.b.1.status(), "stats": gw.b.1.stats() },
                    }))
                }),
            )
            .with_state(self)
    }

    async fn forward(self, origin: Origin, prefix: &str, request: Request) -> Response {
        let (mut parts, body) = request.into_parts();
        let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let rest = path_and_query
            .strip_prefix(prefix)
            .unwrap_or(path_and_query);
        let uri = format!("http://{}:{}{rest}", origin.host(), origin.port());
        parts.uri = uri.parse::<Uri>().unwrap();
        for name in [header::AUTHORIZATION, header::COOKIE, header::HOST] {
            parts.headers.remove(name);
        }
        match self.client.oneshot(Request::from_parts(parts, body)).await {
            Ok(response) => response.map(Body::new),
            Err(err) => (StatusCode::BAD_GATEWAY, err.to_string()).into_response(),
        }
    }
}

struct Setup {
    gateway: String,
    a: Upstream,
    b: Upstream,
    issuer_a: Issuer,
    issuer_b: Issuer,
    caller: Client<HttpConnector, Full<Bytes>>,
}

async fn setup() -> Setup {
    let a = Upstream::start().await;
    let b = Upstream::start().await;
    let issuer_a = Issuer::new(&a).prefix("a");
    let issuer_b = Issuer::new(&b).prefix("b");
    let handle = |issuer: &Issuer| {
        TokenHandle::builder(issuer.source())
            .min_token_age(Duration::ZERO)
            .build()
    };
    let origin = |upstream: &Upstream| Origin::parse(&upstream.url("/")).unwrap();
    let gateway = Gateway::new(
        (origin(&a), handle(&issuer_a)),
        (origin(&b), handle(&issuer_b)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, gateway.router()).await.unwrap() });
    Setup {
        gateway: format!("http://{addr}"),
        a,
        b,
        issuer_a,
        issuer_b,
        caller: Client::builder(TokioExecutor::new()).build_http(),
    }
}

impl Setup {
    async fn call(&self, method: &str, path: &str, body: &'static str) -> (StatusCode, String) {
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.gateway))
            .header(header::AUTHORIZATION, "Bearer caller-credential")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let response = self.caller.request(request).await.unwrap();
        (response.status(), body_text(response).await)
    }
}

#[tokio::test]
async fn each_upstream_gets_its_own_refreshed_token_through_the_gateway() {
    let s = std::sync::Arc::new(setup().await);
    assert_eq!(
        s.call("GET", "/a/orders", "").await,
        (StatusCode::OK, "ok a-1 ".into())
    );
    assert_eq!(
        s.call("GET", "/b/json/items?page=2", "").await,
        (StatusCode::OK, "ok b-1 ".into())
    );

    // Both upstreams drop their tokens: A answers 401, B a 200 with
    // `{"code":40003}`. Twenty requests at once through the gateway.
    s.a.revoke_all();
    s.b.revoke_all();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let path = if i % 2 == 0 {
                "/a/orders"
            } else {
                "/b/json/items"
            };
            (i, s.call("GET", path, "").await)
        }));
    }
    for task in tasks {
        let (i, answer) = task.await.unwrap();
        let want = if i % 2 == 0 { "ok a-2 " } else { "ok b-2 " };
        assert_eq!(answer, (StatusCode::OK, want.to_owned()));
    }
    assert_eq!(
        (s.issuer_a.calls(), s.issuer_b.calls()),
        (2, 2),
        "one refresh per upstream"
    );

    // Tokens never crossed, and the caller's own credential never went on.
    let a_seen = s.a.seen();
    let b_seen = s.b.seen();
    assert!(a_seen.iter().all(|seen| {
        seen.authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer a-"))
    }));
    assert!(b_seen.iter().all(|seen| {
        seen.authorization
            .as_deref()
            .is_some_and(|b| b.starts_with("Bearer b-"))
    }));
    assert!(
        b_seen
            .iter()
            .any(|seen| seen.query.as_deref() == Some("page=2")),
        "the query is forwarded"
    );

    let (status, body) = s.call("GET", "/auth/status", "").await;
    assert_eq!(status, StatusCode::OK);
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    for name in ["a", "b"] {
        assert_eq!(report[name]["status"]["generation"], 2, "{body}");
        assert_eq!(report[name]["status"]["valid"], true, "{body}");
        assert_eq!(report[name]["stats"]["refreshes"], 2, "{body}");
    }
    for token in ["a-1", "a-2", "b-1", "b-2", "refresh-"] {
        assert!(!body.contains(token), "no secret in the status: {body}");
    }
}

#[tokio::test]
async fn a_request_body_and_method_are_forwarded_with_the_token() {
    let s = setup().await;
    assert_eq!(
        s.call("POST", "/a/orders", r#"{"item":"tea"}"#).await,
        (StatusCode::OK, r#"ok a-1 {"item":"tea"}"#.into())
    );
    let seen = s.a.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/orders");
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer a-1"));
    assert_eq!(s.issuer_b.calls(), 0, "B's token is not fetched for A");
}
