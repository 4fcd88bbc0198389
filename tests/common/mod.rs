//! Shared test harness: a real upstream API and a counting token source.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower_auth_refresh::{
    BoxError, RefreshContext, RefreshReason, ReplayBody, Token, TokenSource, token_source_fn,
};

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub query: Option<String>,
    pub authorization: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub accepted: bool,
}

#[derive(Default)]
pub struct UpstreamState {
    valid: Mutex<HashSet<String>>,
    pub seen: Mutex<Vec<Seen>>,
}

/// A real HTTP API on 127.0.0.1 that accepts only the tokens it was told
/// are valid. `/json/*` answers a rejected token with HTTP 200
/// `{"code":40003,"msg":"token过期"}`, every other path with 401.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub state: Arc<UpstreamState>,
}

impl Upstream {
    pub async fn start() -> Self {
        let state = Arc::new(UpstreamState::default());
        let app = Router::new()
            .route("/{*path}", any(handle))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, state }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn accept(&self, token: &str) {
        self.state.valid.lock().unwrap().insert(token.to_owned());
    }

    pub fn revoke_all(&self) {
        self.state.valid.lock().unwrap().clear();
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn rejected(&self) -> usize {
        self.seen().iter().filter(|s| !s.accepted).count()
    }
}

async fn handle(State(state): State<Arc<UpstreamState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let authorization = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let query_token = parts.uri.query().and_then(|q| {
        q.split('&')
            .find_map(|pair| pair.strip_prefix("access_token="))
            .map(str::to_owned)
    });
    let custom = parts
        .headers
        .get("x-api-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let presented = authorization
        .as_deref()
        .map(|a| a.strip_prefix("Bearer ").unwrap_or(a).to_owned())
        .or(query_token)
        .or(custom);
    let accepted = presented
        .as_deref()
        .is_some_and(|t| state.valid.lock().unwrap().contains(t));
    let path = parts.uri.path().to_owned();
    state.seen.lock().unwrap().push(Seen {
        path: path.clone(),
        query: parts.uri.query().map(str::to_owned),
        authorization,
        headers: parts.headers.clone(),
        body: body.clone(),
        accepted,
    });
    if path.starts_with("/redirect") {
        let to = parts
            .uri
            .query()
            .and_then(|q| q.strip_prefix("to="))
            .unwrap_or("/");
        return (StatusCode::FOUND, [("location", to.to_owned())], "moved").into_response();
    }
    if path.starts_with("/always-401") {
        return (StatusCode::UNAUTHORIZED, "never allowed").into_response();
    }
    if path.starts_with("/forbidden") {
        return (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Bearer error=\"insufficient_scope\"")],
            "no",
        )
            .into_response();
    }
    if accepted {
        let mut answer = format!("ok {} ", presented.unwrap_or_default()).into_bytes();
        answer.extend_from_slice(&body);
        return (StatusCode::OK, answer).into_response();
    }
    if path.starts_with("/json") {
        (
            StatusCode::OK,
            [("content-type", "application/json;charset=utf-8")],
            r#"{"code":40003,"msg":"token过期","data":null}"#,
        )
            .into_response()
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Bearer error=\"invalid_token\"")],
            "expired",
        )
            .into_response()
    }
}

/// A token source that counts its calls, names tokens `tok-1`, `tok-2` …,
/// and registers each with the upstream.
#[derive(Clone)]
pub struct Issuer {
    pub calls: Arc<AtomicUsize>,
    pub reasons: Arc<Mutex<Vec<RefreshReason>>>,
    upstream: Option<Upstream>,
    lifetime: Option<Duration>,
    delay: Duration,
    prefix: String,
}

impl Issuer {
    pub fn new(upstream: &Upstream) -> Self {
        Self {
            calls: Arc::default(),
            reasons: Arc::default(),
            upstream: Some(upstream.clone()),
            lifetime: None,
            delay: Duration::ZERO,
            prefix: "tok".into(),
        }
    }

    pub fn detached() -> Self {
        Self {
            calls: Arc::default(),
            reasons: Arc::default(),
            upstream: None,
            lifetime: None,
            delay: Duration::ZERO,
            prefix: "tok".into(),
        }
    }

    pub fn lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = Some(lifetime);
        self
    }

    /// Tokens are named `<prefix>-1`, `<prefix>-2` … (default `tok`).
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_owned();
        self
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn source(&self) -> impl TokenSource {
        let this = self.clone();
        token_source_fn(move |cx: RefreshContext| {
            let this = this.clone();
            async move {
                let n = this.calls.fetch_add(1, Ordering::SeqCst) + 1;
                this.reasons.lock().unwrap().push(cx.reason);
                if !this.delay.is_zero() {
                    tokio::time::sleep(this.delay).await;
                }
                let name = format!("{}-{n}", this.prefix);
                if let Some(upstream) = &this.upstream {
                    upstream.accept(&name);
                }
                let mut token = Token::bearer(name).with_refresh_token(format!("refresh-{n}"));
                if let Some(lifetime) = this.lifetime {
                    token = token.with_expires_in(lifetime);
                }
                Ok::<_, BoxError>(token)
            }
        })
    }
}

pub type HttpClient = Client<HttpConnector, ReplayBody<Full<Bytes>>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn get(url: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(url).body(Full::default()).unwrap()
}

pub fn post(url: &str, body: impl Into<Bytes>) -> http::Request<Full<Bytes>> {
    http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap()
}

pub async fn body_text<B>(response: http::Response<B>) -> String
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}
