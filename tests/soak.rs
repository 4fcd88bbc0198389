//! Soak: a bounded run (60 s by default, `SOAK_SECS` to change) of 50
//! concurrent tasks through the layer with 200 ms tokens, against a real
//! upstream that answers a token past its expiry at random with a 401 or
//! with HTTP 200 `{"code":40003,"msg":"token过期"}`.
//!
//! Asserts: no failed request; refreshes within 10 % of the number of token
//! lifetimes that passed; resident memory flat after warm-up (peak RSS is
//! printed). Opt-in locally, run by `.ci/run`:
//!
//! ```text
//! cargo test --all-features --test soak -- --ignored --nocapture
//! ```

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use bytes::Bytes;
use common::{body_text, client, post};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::{
    AuthRefreshLayer, BoxError, ExpiryDetectorExt, JsonBodyRule, RefreshContext, Token,
    TokenHandle, Unauthorized, token_source_fn,
};

const LIFETIME: Duration = Duration::from_millis(200);
const TASKS: usize = 50;

/// Tokens issued, with the instant each one stops being accepted.
#[derive(Default)]
struct Tokens {
    expiry: Mutex<HashMap<String, Instant>>,
    issued: AtomicUsize,
    rejected: AtomicU64,
}

impl Tokens {
    fn issue(&self) -> String {
        let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let token = format!("soak-{n}-{:012x}", fastrand::u64(..1 << 48));
        let mut expiry = self.expiry.lock().unwrap();
        let now = Instant::now();
        expiry.retain(|_, until| *until + Duration::from_secs(1) > now);
        expiry.insert(token.clone(), now + LIFETIME);
        token
    }

    fn is_valid(&self, token: &str) -> bool {
        let expiry = self.expiry.lock().unwrap();
        expiry
            .get(token)
            .is_some_and(|until| Instant::now() < *until)
    }
}

async fn api(State(tokens): State<Arc<Tokens>>, headers: HeaderMap, body: Bytes) -> Response {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if tokens.is_valid(token) {
        let mut answer = b"ok ".to_vec();
        answer.extend_from_slice(&body);
        return (StatusCode::OK, answer).into_response();
    }
    tokens.rejected.fetch_add(1, Ordering::Relaxed);
    if fastrand::bool() {
        (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Bearer error=\"invalid_token\"")],
        )
            .into_response()
    } else {
        Json(serde_json::json!({ "code": 40003, "msg": "token过期", "data": null })).into_response()
    }
}

/// Resident set size and its peak, in KiB, from /proc/self/status.
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a 60-second soak; run with --ignored (.ci/run does)"]
async fn fifty_tasks_across_hundreds_of_token_lifetimes_never_fail() {
    let seconds: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let run_for = Duration::from_secs(seconds);

    let tokens = Arc::new(Tokens::default());
    let app = axum::Router::new()
        .route("/{*path}", any(api))
        .with_state(tokens.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let issuer = tokens.clone();
    let handle = TokenHandle::builder(token_source_fn(move |_cx: RefreshContext| {
        let token = issuer.issue();
        async move { Ok::<_, BoxError>(Token::bearer(token).with_expires_in(LIFETIME)) }
    }))
    .refresh_ahead(Duration::from_millis(10))
    .min_validity(Duration::from_millis(2))
    .min_token_age(Duration::from_millis(50))
    .build();
    let layer = AuthRefreshLayer::new(handle.clone())
        .detector(Unauthorized::new().or(JsonBodyRule::default_rules()));
    let service = ServiceBuilder::new().layer(layer).service(client());

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let service = service.clone();
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let body = format!(r#"{{"task":{task},"i":{i}}}"#);
                    let path = if i % 2 == 0 {
                        "/v1/orders"
                    } else {
                        "/v2/orders"
                    };
                    let request = post(&format!("http://{addr}{path}"), body.clone());
                    let good = match service.clone().oneshot(request).await {
                        Ok(response) if response.status() == StatusCode::OK => {
                            body_text(response).await == format!("ok {body}")
                        }
                        Ok(_) | Err(_) => false,
                    };
                    if good { &ok } else { &failed }.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect();

    // Warm up, then watch memory until the end.
    let warm_up = (run_for / 6).min(Duration::from_secs(10));
    tokio::time::sleep(warm_up).await;
    let (rss_after_warm_up, _) = rss_kib();
    tokio::time::sleep(run_for.saturating_sub(warm_up)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("no task panics");
    }
    let elapsed = started.elapsed();
    let (rss_end, rss_peak) = rss_kib();

    let stats = handle.stats();
    let lifetimes = elapsed.as_secs_f64() / LIFETIME.as_secs_f64();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "soak: {:.1} s, requests ok={ok} failed={failed}, token lifetimes {lifetimes:.0}, \
         refreshes {} (issued {}), upstream rejections {}, retries {}, waited {}, \
         rss after warm-up {} KiB, at the end {} KiB, peak {} KiB",
        elapsed.as_secs_f64(),
        stats.refreshes,
        tokens.issued.load(Ordering::SeqCst),
        tokens.rejected.load(Ordering::Relaxed),
        stats.retries,
        stats.waited,
        rss_after_warm_up,
        rss_end,
        rss_peak,
    );
    assert!(ok > 0);
    assert_eq!(failed, 0, "no request fails");
    let deviation = (stats.refreshes as f64 - lifetimes).abs() / lifetimes;
    assert!(
        deviation <= 0.10,
        "refreshes {} vs {lifetimes:.0} token lifetimes ({:.1} % off)",
        stats.refreshes,
        deviation * 100.0
    );
    assert!(
        rss_end <= rss_after_warm_up + 32 * 1024,
        "memory grew from {rss_after_warm_up} KiB to {rss_end} KiB"
    );
}
