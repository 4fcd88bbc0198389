//! The main demo: an embedded token endpoint issuing 2-second tokens, an
//! embedded upstream API that rejects expired tokens in two ways (401 on
//! `/v1/*`, HTTP 200 `{"code":40003,"msg":"token过期"}` on `/v2/*`), and
//! 1,000 requests from 100 tasks through `AuthRefreshLayer` over a
//! hyper-util client.
//!
//! ```text
//! cargo run --example demo
//! ```
//!
//! The token endpoint does not say when its tokens expire, so every refresh
//! here is driven by the upstream's answers: detection, single-flight
//! refresh and replay. The last line is machine-readable:
//! `summary requests=… ok=… failed=… refreshes=… retries=… waited=…`.

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
    AuthRefreshLayer, BoxError, ExpiryDetectorExt, JsonBodyRule, RefreshContext, Token,
    TokenHandle, Unauthorized, token_source_fn,
};

const TOKEN_LIFETIME: Duration = Duration::from_secs(2);
const TASKS: usize = 100;
const REQUESTS_PER_TASK: usize = 10;
const PACE: Duration = Duration::from_millis(1000);

/// Tokens the token endpoint has issued, with their issue time.
#[derive(Default)]
struct Issued {
    tokens: Mutex<HashMap<String, Instant>>,
    count: AtomicUsize,
}

impl Issued {
    fn is_valid(&self, token: &str) -> bool {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens
            .get(token)
            .is_some_and(|at| at.elapsed() < TOKEN_LIFETIME)
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

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let issued = Arc::new(Issued::default());
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
    println!(
        "token endpoint  http://{token_addr}/token  (tokens live {TOKEN_LIFETIME:?}, expiry not announced)"
    );
    println!("upstream API    http://{api_addr}  (/v1: 401 when expired, /v2: 200 + code 40003)");

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
        .min_token_age(Duration::from_millis(500))
        .build();
    let layer = AuthRefreshLayer::new(handle.clone())
        .detector(Unauthorized::new().or(JsonBodyRule::default_rules()));
    let client = ServiceBuilder::new()
        .layer(layer)
        .service(Client::builder(TokioExecutor::new()).build_http());

    println!(
        "sending {} requests from {TASKS} tasks …",
        TASKS * REQUESTS_PER_TASK
    );
    let started = Instant::now();
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(TASKS);
    for task in 0..TASKS {
        let client = client.clone();
        let (ok, failed) = (ok.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            // Spread the tasks over the first pace interval.
            tokio::time::sleep(PACE.mul_f64(task as f64 / TASKS as f64)).await;
            for i in 0..REQUESTS_PER_TASK {
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
                tokio::time::sleep(PACE).await;
            }
        }));
    }
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    ticker.tick().await;
    let all = futures::future::join_all(tasks);
    tokio::pin!(all);
    loop {
        tokio::select! {
            _ = &mut all => break,
            _ = ticker.tick() => {
                let s = handle.status();
                println!(
                    "  t={:>4.1}s  ok={:<4} token generation {}  refreshes so far {}",
                    started.elapsed().as_secs_f64(), ok.load(Ordering::Relaxed), s.generation, handle.stats().refreshes,
                );
            }
        }
    }
    let elapsed = started.elapsed();
    let stats = handle.stats();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let issued_count = issued.count.load(Ordering::SeqCst);
    println!();
    println!("finished in {:.1} s", elapsed.as_secs_f64());
    println!("  requests answered ok      {ok}");
    println!("  requests failed           {failed}");
    println!(
        "  tokens issued by endpoint {issued_count}  (~{:.1} token lifetimes elapsed)",
        elapsed.as_secs_f64() / TOKEN_LIFETIME.as_secs_f64()
    );
    println!(
        "  refreshes by the layer    {}  (one per expiry, shared by every waiting request)",
        stats.refreshes
    );
    println!(
        "  requests replayed         {}  (rejected by 401 or code 40003, sent again with the new token)",
        stats.retries
    );
    println!("  requests that waited      {}", stats.waited);
    println!(
        "summary requests={} ok={ok} failed={failed} refreshes={} retries={} waited={}",
        ok + failed,
        stats.refreshes,
        stats.retries,
        stats.waited
    );
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
