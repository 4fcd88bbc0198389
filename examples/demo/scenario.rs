//! The demo's scenario, shared by `examples/demo/main.rs` and the tests:
//! an embedded token endpoint, an embedded upstream API that rejects
//! expired tokens in two ways (401 on `/v1/*`, HTTP 200
//! `{"code":40003,"msg":"token过期"}` on `/v2/*`), and many requests from
//! concurrent tasks through `AuthRefreshLayer` over a hyper-util client.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::{
    AuthRefreshLayer, BoxError, ExpiryDetectorExt, JsonBodyRule, RefreshContext, RefreshStats,
    Token, TokenHandle, Unauthorized, token_source_fn,
};

/// How big a run is.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub token_lifetime: Duration,
    pub tasks: usize,
    pub requests_per_task: usize,
    /// Pause between two requests of one task.
    pub pace: Duration,
    /// How often `progress` is called.
    pub report_every: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            token_lifetime: Duration::from_secs(2),
            tasks: 100,
            requests_per_task: 10,
            pace: Duration::from_millis(1000),
            report_every: Duration::from_secs(2),
        }
    }
}

/// Where the embedded servers listen.
#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    pub token_endpoint: SocketAddr,
    pub api: SocketAddr,
}

/// A progress line's figures.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub elapsed: Duration,
    pub ok: u64,
    pub generation: u64,
    pub refreshes: u64,
}

/// What a run did.
#[derive(Debug)]
pub struct Outcome {
    pub elapsed: Duration,
    pub ok: u64,
    pub failed: u64,
    pub issued: usize,
    pub stats: RefreshStats,
    /// Every token the endpoint issued (for the secrets test).
    pub tokens: Vec<String>,
    /// The handle, for its status and `Debug`.
    pub handle: TokenHandle,
}

/// Tokens the token endpoint has issued, with their issue time.
struct Issued {
    tokens: Mutex<HashMap<String, Instant>>,
    count: AtomicUsize,
    lifetime: Duration,
}

impl Issued {
    fn is_valid(&self, token: &str) -> bool {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens
            .get(token)
            .is_some_and(|at| at.elapsed() < self.lifetime)
    }
}

async fn issue_token(State(issued): State<Arc<Issued>>) -> Json<serde_json::Value> {
    let n = issued.count.fetch_add(1, Ordering::SeqCst) + 1;
    let token = format!("demo-token-{n}-{:016x}", fastrand::u64(..));
    issued
        .tokens
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(token.clone(), Instant::now());
    Json(serde_json::json!({ "access_token": token, "token_type": "Bearer" }))
}

fn bearer(headers: &HeaderMap) -> &str {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
}

async fn v1_orders(State(issued): State<Arc<Issued>>, headers: HeaderMap, body: Bytes) -> Response {
    if !issued.is_valid(bearer(&headers)) {
        return (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Bearer error=\"invalid_token\"")],
        )
            .into_response();
    }
    let echoed =
        serde_json::from_slice::<serde_json::Value>(&body).unwrap_or(serde_json::Value::Null);
    Json(serde_json::json!({ "code": 0, "data": { "accepted": echoed } })).into_response()
}

async fn v2_profile(State(issued): State<Arc<Issued>>, headers: HeaderMap) -> Response {
    if !issued.is_valid(bearer(&headers)) {
        return Json(serde_json::json!({ "code": 40003, "msg": "token过期", "data": null }))
            .into_response();
    }
    Json(serde_json::json!({ "code": 0, "data": { "name": "demo" } })).into_response()
}

async fn serve(router: axum::Router) -> Result<SocketAddr, BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router).await {
            eprintln!("server stopped: {err}");
        }
    });
    Ok(addr)
}

/// Starts the servers, calls `started` with their addresses, sends the
/// requests, calls `progress` every `settings.report_every`.
pub async fn run(
    settings: Settings,
    started: impl FnOnce(Addresses),
    progress: impl Fn(Progress),
) -> Result<Outcome, BoxError> {
    let issued = Arc::new(Issued {
        tokens: Mutex::default(),
        count: AtomicUsize::new(0),
        lifetime: settings.token_lifetime,
    });
    let token_addr = serve(
        axum::Router::new()
            .route("/token", post(issue_token))
            .with_state(issued.clone()),
    )
    .await?;
    let api_addr = serve(
        axum::Router::new()
            .route("/v1/orders", post(v1_orders).get(v1_orders))
            .route("/v2/profile", get(v2_profile))
            .with_state(issued.clone()),
    )
    .await?;
    started(Addresses {
        token_endpoint: token_addr,
        api: api_addr,
    });

    // The token source: a plain POST to the token endpoint, over its own client.
    let token_client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let token_url = format!("http://{token_addr}/token");
    let source = token_source_fn(move |_cx: RefreshContext| {
        let client = token_client.clone();
        let url = token_url.clone();
        async move {
            let request = http::Request::post(url).body(Full::default())?;
            let body = client
                .request(request)
                .await?
                .into_body()
                .collect()
                .await?
                .to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body)?;
            let access = json["access_token"]
                .as_str()
                .ok_or("no access_token in response")?;
            Ok::<_, BoxError>(Token::bearer(access))
        }
    });
    let handle = TokenHandle::builder(source)
        .min_token_age(settings.token_lifetime / 4)
        .build();
    let layer = AuthRefreshLayer::new(handle.clone())
        .detector(Unauthorized::new().or(JsonBodyRule::default_rules()));
    let client = ServiceBuilder::new()
        .layer(layer)
        .service(Client::builder(TokioExecutor::new()).build_http());

    let started = Instant::now();
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(settings.tasks);
    for task in 0..settings.tasks {
        let client = client.clone();
        let (ok, failed) = (ok.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            // Spread the tasks over the first pace interval.
            let offset = settings.pace.mul_f64(task as f64 / settings.tasks as f64);
            tokio::time::sleep(offset).await;
            for i in 0..settings.requests_per_task {
                let request = match (task + i) % 3 {
                    0 => http::Request::get(format!("http://{api_addr}/v2/profile"))
                        .body(Full::default()),
                    1 => http::Request::get(format!("http://{api_addr}/v1/orders"))
                        .body(Full::default()),
                    _ => http::Request::post(format!("http://{api_addr}/v1/orders"))
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(format!(
                            r#"{{"task":{task},"item":{i}}}"#
                        )))),
                };
                let outcome = match request {
                    Ok(request) => client.clone().oneshot(request).await,
                    Err(err) => Err(err.into()),
                };
                let good = match outcome {
                    Ok(response) if response.status().is_success() => {
                        let body = response.into_body().collect().await.map(|b| b.to_bytes());
                        body.is_ok_and(|b| b.starts_with(br#"{"code":0"#))
                    }
                    Ok(_) | Err(_) => false,
                };
                if good { &ok } else { &failed }.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(settings.pace).await;
            }
        }));
    }
    let mut ticker = tokio::time::interval(settings.report_every);
    ticker.tick().await;
    let all = futures::future::join_all(tasks);
    tokio::pin!(all);
    loop {
        tokio::select! {
            _ = &mut all => break,
            _ = ticker.tick() => progress(Progress {
                elapsed: started.elapsed(),
                ok: ok.load(Ordering::Relaxed),
                generation: handle.status().generation,
                refreshes: handle.stats().refreshes,
            }),
        }
    }
    let tokens = issued
        .tokens
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .cloned()
        .collect();
    Ok(Outcome {
        elapsed: started.elapsed(),
        ok: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        issued: issued.count.load(Ordering::SeqCst),
        stats: handle.stats(),
        tokens,
        handle,
    })
}
