//! A fleet against an authorization server that revokes the access token
//! of a refresh token when it rotates it (as django-oauth-toolkit does):
//! one handle's refresh kills the token the others adopted moments ago.
//! With default settings no request may fail: a handle whose young token is
//! rejected reads the store and retries with the newer token there.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use common::client;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use secrecy::ExposeSecret;
use tower::{Layer, ServiceExt};
use tower_auth_refresh::{
    AuthRefreshLayer, BoxError, MemoryStore, RefreshContext, Token, TokenHandle, token_source_fn,
};

const LIFETIME: Duration = Duration::from_secs(4);

#[derive(Default)]
struct Ledger {
    serial: u64,
    /// access token → expiry; removed when revoked.
    access: HashMap<String, Instant>,
    /// refresh token → (its access token, used?)
    refresh: HashMap<String, (String, bool)>,
    rotations: u64,
    reused: u64,
    revoked_rejections: u64,
}

type Shared = Arc<Mutex<Ledger>>;

fn issue(ledger: &mut Ledger) -> serde_json::Value {
    ledger.serial += 1;
    let n = ledger.serial;
    let (access, refresh) = (format!("at-{n}"), format!("rt-{n}"));
    ledger
        .access
        .insert(access.clone(), Instant::now() + LIFETIME);
    ledger
        .refresh
        .insert(refresh.clone(), (access.clone(), false));
    serde_json::json!({
        "access_token": access,
        "refresh_token": refresh,
        "expires_in_ms": LIFETIME.as_millis() as u64,
    })
}

async fn token(State(ledger): State<Shared>, Json(body): Json<serde_json::Value>) -> Response {
    let mut ledger = ledger.lock().unwrap();
    match body["refresh_token"].as_str() {
        None => Json(issue(&mut ledger)).into_response(),
        Some(presented) => match ledger.refresh.get(presented).cloned() {
            Some((access, false)) => {
                ledger
                    .refresh
                    .insert(presented.to_owned(), (access.clone(), true));
                // Rotation revokes the access token of the old refresh token.
                ledger.access.remove(&access);
                ledger.rotations += 1;
                Json(issue(&mut ledger)).into_response()
            }
            _ => {
                ledger.reused += 1;
                (
                    StatusCode::BAD_REQUEST,
                    Json(serde_json::json!({"error": "invalid_grant"})),
                )
                    .into_response()
            }
        },
    }
}

async fn work(State(ledger): State<Shared>, headers: HeaderMap) -> Response {
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let mut ledger = ledger.lock().unwrap();
    let valid = ledger
        .access
        .get(presented)
        .is_some_and(|until| Instant::now() < *until);
    if valid {
        return (StatusCode::OK, "ok").into_response();
    }
    ledger.revoked_rejections += 1;
    (
        StatusCode::UNAUTHORIZED,
        [("www-authenticate", "Bearer error=\"invalid_token\"")],
        "invalid",
    )
        .into_response()
}

/// A password grant for the first token, the refresh grant after that.
fn source(token_url: String) -> impl tower_auth_refresh::TokenSource {
    token_source_fn(move |cx: RefreshContext| {
        let url = token_url.clone();
        let refresh = cx
            .previous
            .as_ref()
            .and_then(|t| t.refresh_token())
            .map(|rt| rt.expose_secret().to_owned());
        async move {
            let body = match refresh {
                Some(rt) => serde_json::json!({"grant_type": "refresh_token", "refresh_token": rt}),
                None => serde_json::json!({"grant_type": "password"}),
            };
            let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
            let request = http::Request::post(url)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))?;
            let response = client.request(request).await?;
            let status = response.status();
            let bytes = response.into_body().collect().await?.to_bytes();
            if !status.is_success() {
                return Err::<Token, BoxError>(format!("token endpoint: {status}").into());
            }
            let answer: serde_json::Value = serde_json::from_slice(&bytes)?;
            Ok(
                Token::bearer(answer["access_token"].as_str().unwrap_or_default())
                    .with_refresh_token(answer["refresh_token"].as_str().unwrap_or_default())
                    .with_expires_in(Duration::from_millis(
                        answer["expires_in_ms"].as_u64().unwrap_or_default(),
                    )),
            )
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_handles_on_one_store_lose_no_request_to_revoked_tokens() {
    let ledger = Shared::default();
    let app = axum::Router::new()
        .route("/token", post(token))
        .route("/work", get(work))
        .with_state(ledger.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    // Three handles (three processes of a fleet) on one store, default settings.
    let store = MemoryStore::new();
    let handles: Vec<TokenHandle> = (0..3)
        .map(|_| {
            TokenHandle::builder(source(format!("http://{addr}/token")))
                .store(store.clone(), "api")
                .build()
        })
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for handle in &handles {
        for _ in 0..2 {
            let service = AuthRefreshLayer::new(handle.clone()).layer(client());
            let url = format!("http://{addr}/work");
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let request = http::Request::get(&url).body(Full::default()).unwrap();
                    match service.clone().oneshot(request).await {
                        Ok(response) if response.status() == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed)
                        }
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
    }
    // Three token lifetimes: every handle sees its token revoked by another's
    // rotation several times.
    tokio::time::sleep(LIFETIME * 3).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }

    let ledger = ledger.lock().unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "ok {ok}, failed {failed}, rotations {}, rejections {}",
        ledger.rotations, ledger.revoked_rejections
    );
    assert!(
        ledger.rotations >= 4,
        "tokens were rotated: {}",
        ledger.rotations
    );
    assert!(
        ledger.revoked_rejections > 0,
        "revoked tokens were presented"
    );
    assert_eq!(ledger.reused, 0, "no refresh token was presented twice");
    assert!(ok > 100);
    assert_eq!(failed, 0);
}
