//! The fault matrix: a real token endpoint on 127.0.0.1 misbehaving in each
//! way below, hit through the whole layer by 1, 100 and 1,000 concurrent
//! requests against a real upstream.
//!
//! | endpoint behaviour            | error the callers get         |
//! |-------------------------------|-------------------------------|
//! | connection refused            | `RefreshFailed`               |
//! | 500                           | `RefreshFailed`               |
//! | 429 with `Retry-After`        | `RefreshFailed`               |
//! | slower than the refresh timeout | `RefreshTimedOut`           |
//! | garbage body                  | `RefreshFailed`               |
//! | `invalid_grant`               | `ReauthorizationRequired`     |
//! | 200 with an empty token       | `RefreshFailed`               |
//!
//! Each cell (behaviour × {1, 100, 1,000}) asserts, in four waves:
//! 1. all N requests wait for one token-endpoint call and each gets the
//!    typed error: nothing panics, nothing is sent without a token;
//! 2. N more requests inside the back-off window fail fast: no call;
//! 3. after the window, N more requests make exactly one call, and the
//!    next window is longer than the first;
//! 4. once the endpoint has recovered and the window has passed, all N
//!    requests succeed with exactly one more call.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use common::{HttpClient, Upstream, client, get};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::{
    AuthRefresh, AuthRefreshLayer, BoxError, ReauthorizationRequired, RefreshContext,
    RefreshFailed, RefreshTimedOut, Token, TokenHandle, TokenSource, token_source_fn,
};

const BACKOFF_MIN: Duration = Duration::from_millis(400);
const REFRESH_TIMEOUT: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Fault {
    Healthy = 0,
    Refused,
    ServerError,
    TooManyRequests,
    Slow,
    Garbage,
    InvalidGrant,
    EmptyToken,
}

impl Fault {
    fn from_u8(value: u8) -> Self {
        [
            Self::Healthy,
            Self::Refused,
            Self::ServerError,
            Self::TooManyRequests,
            Self::Slow,
            Self::Garbage,
            Self::InvalidGrant,
            Self::EmptyToken,
        ][value as usize]
    }
}

/// What the token endpoint shares with its handlers and the token source.
struct EndpointState {
    fault: AtomicU8,
    calls: AtomicUsize,
    upstream: Upstream,
}

/// A real token endpoint (`POST /token`) whose behaviour can be switched.
#[derive(Clone)]
struct Endpoint {
    state: Arc<EndpointState>,
    url: String,
    refused_url: String,
}

impl Endpoint {
    async fn start(upstream: &Upstream) -> Self {
        let state = Arc::new(EndpointState {
            fault: AtomicU8::new(Fault::Healthy as u8),
            calls: AtomicUsize::new(0),
            upstream: upstream.clone(),
        });
        let app = axum::Router::new()
            .route("/token", post(token))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        // A port nobody listens on: bound, noted, closed.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let refused_url = format!("http://{}/token", closed.local_addr().unwrap());
        drop(closed);
        Self {
            state,
            url: format!("http://{addr}/token"),
            refused_url,
        }
    }

    fn set(&self, fault: Fault) {
        self.state.fault.store(fault as u8, Ordering::SeqCst);
    }

    fn fault(&self) -> Fault {
        Fault::from_u8(self.state.fault.load(Ordering::SeqCst))
    }

    /// Calls that reached the endpoint, or were refused on the way to it.
    fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// A token source that makes one HTTP call to the endpoint per fetch and
    /// reads an RFC 6749 answer.
    fn source(&self) -> impl TokenSource {
        let endpoint = self.clone();
        let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        token_source_fn(move |_cx: RefreshContext| {
            let endpoint = endpoint.clone();
            let http = http.clone();
            async move {
                let url = if endpoint.fault() == Fault::Refused {
                    endpoint.state.calls.fetch_add(1, Ordering::SeqCst);
                    endpoint.refused_url.clone()
                } else {
                    endpoint.url.clone()
                };
                let request = http::Request::post(url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(Full::new(Bytes::from_static(
                        b"grant_type=client_credentials",
                    )))?;
                let response = http.request(request).await?;
                let status = response.status();
                let body = response.into_body().collect().await?.to_bytes();
                let json: serde_json::Value = serde_json::from_slice(&body)?;
                if status == StatusCode::BAD_REQUEST && json["error"] == "invalid_grant" {
                    return Err(ReauthorizationRequired::new("the grant was rejected").into());
                }
                if !status.is_success() {
                    return Err(format!("token endpoint answered {status}").into());
                }
                let access = json["access_token"]
                    .as_str()
                    .ok_or("no access_token in the answer")?;
                Ok::<_, BoxError>(Token::bearer(access).with_expires_in(Duration::from_secs(600)))
            }
        })
    }
}

async fn token(State(state): State<Arc<EndpointState>>) -> Response {
    let n = state.calls.fetch_add(1, Ordering::SeqCst) + 1;
    match Fault::from_u8(state.fault.load(Ordering::SeqCst)) {
        Fault::Healthy | Fault::Refused => {
            let access = format!("matrix-token-{n}");
            state.upstream.accept(&access);
            Json(serde_json::json!({
                "access_token": access, "token_type": "Bearer", "expires_in": 600
            }))
            .into_response()
        }
        Fault::ServerError => (StatusCode::INTERNAL_SERVER_ERROR, "{}").into_response(),
        Fault::TooManyRequests => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            r#"{"error":"slow_down"}"#,
        )
            .into_response(),
        Fault::Slow => {
            tokio::time::sleep(REFRESH_TIMEOUT * 10).await;
            Json(serde_json::json!({ "access_token": "too-late" })).into_response()
        }
        Fault::Garbage => (StatusCode::OK, "<html>502 Bad Gateway</html>").into_response(),
        Fault::InvalidGrant => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": "invalid_grant" })),
        )
            .into_response(),
        Fault::EmptyToken => Json(serde_json::json!({
            "access_token": "", "token_type": "Bearer", "expires_in": 600
        }))
        .into_response(),
    }
}

type Layered = AuthRefresh<HttpClient>;

/// Sends `n` concurrent requests; returns their outcomes.
async fn wave(
    service: &Layered,
    upstream: &Upstream,
    n: usize,
) -> Vec<Result<StatusCode, BoxError>> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let service = service.clone();
            let url = upstream.url(&format!("/matrix/{i}"));
            tokio::spawn(async move {
                let response = service.oneshot(get(&url)).await?;
                Ok(response.status())
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(n);
    for task in tasks {
        outcomes.push(task.await.expect("no request panics"));
    }
    outcomes
}

/// Every outcome is an error of the kind `fault` should give.
/// Inside a back-off window (`in_window`), a `RefreshFailed` says so.
fn assert_typed(outcomes: &[Result<StatusCode, BoxError>], fault: Fault, in_window: bool) {
    for outcome in outcomes {
        let err = outcome
            .as_ref()
            .expect_err("no token could be had: the request fails, it is not sent");
        let typed = match fault {
            Fault::Slow => err.downcast_ref::<RefreshTimedOut>().is_some(),
            Fault::InvalidGrant => err.downcast_ref::<ReauthorizationRequired>().is_some(),
            _ => err
                .downcast_ref::<RefreshFailed>()
                .is_some_and(|failed| failed.is_backoff() || !in_window),
        };
        assert!(typed, "{fault:?}: unexpected error {err:?}");
    }
}

async fn sleep_out_the_window(handle: &TokenHandle) {
    if let Some(left) = handle.status().backoff_remaining {
        tokio::time::sleep(left + Duration::from_millis(20)).await;
    }
}

async fn cell(fault: Fault, n: usize) {
    let upstream = Upstream::start().await;
    let endpoint = Endpoint::start(&upstream).await;
    endpoint.set(fault);
    let handle = TokenHandle::builder(endpoint.source())
        .refresh_timeout(REFRESH_TIMEOUT)
        .backoff(BACKOFF_MIN, Duration::from_secs(30))
        .min_token_age(Duration::ZERO)
        .build();
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(client());

    // 1. Everybody waits for the one fetch, which fails.
    let outcomes = wave(&service, &upstream, n).await;
    assert_eq!(endpoint.calls(), 1, "{fault:?} × {n}: one call for all");
    assert_typed(&outcomes, fault, false);
    let first_window = handle
        .status()
        .backoff_remaining
        .expect("a failed refresh opens a back-off window");

    // 2. Inside the window: fail fast, no call.
    let outcomes = wave(&service, &upstream, n).await;
    let still_open = handle.status().backoff_remaining.is_some();
    if still_open {
        assert_eq!(
            endpoint.calls(),
            1,
            "{fault:?} × {n}: no call inside the window"
        );
        assert_typed(&outcomes, fault, true);
    } else {
        assert!(endpoint.calls() <= 2, "at most one call per window");
    }

    // 3. After the window: one call again, and a longer window.
    sleep_out_the_window(&handle).await;
    let before = endpoint.calls();
    let outcomes = wave(&service, &upstream, n).await;
    assert_eq!(
        endpoint.calls(),
        before + 1,
        "{fault:?} × {n}: one call per window"
    );
    assert_typed(&outcomes, fault, false);
    let second_window = handle
        .status()
        .backoff_remaining
        .expect("the second failure opens a window too");
    assert!(
        second_window > first_window,
        "{fault:?}: the window grows ({first_window:?} then {second_window:?})"
    );
    assert_eq!(handle.status().consecutive_failures, 2);
    assert_eq!(upstream.seen().len(), 0, "nothing was sent without a token");

    // 4. The endpoint recovers: after the window, everything succeeds.
    endpoint.set(Fault::Healthy);
    sleep_out_the_window(&handle).await;
    let before = endpoint.calls();
    let outcomes = wave(&service, &upstream, n).await;
    assert_eq!(
        endpoint.calls(),
        before + 1,
        "{fault:?} × {n}: one fetch to recover"
    );
    for outcome in outcomes {
        assert_eq!(outcome.expect("recovered"), StatusCode::OK);
    }
    assert_eq!(handle.status().consecutive_failures, 0);
}

macro_rules! matrix {
    ($($name:ident: $fault:expr, $n:expr;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                cell($fault, $n).await;
            }
        )*
    };
}

matrix! {
    refused_x1: Fault::Refused, 1;
    refused_x100: Fault::Refused, 100;
    refused_x1000: Fault::Refused, 1000;
    server_error_x1: Fault::ServerError, 1;
    server_error_x100: Fault::ServerError, 100;
    server_error_x1000: Fault::ServerError, 1000;
    too_many_requests_x1: Fault::TooManyRequests, 1;
    too_many_requests_x100: Fault::TooManyRequests, 100;
    too_many_requests_x1000: Fault::TooManyRequests, 1000;
    slower_than_the_timeout_x1: Fault::Slow, 1;
    slower_than_the_timeout_x100: Fault::Slow, 100;
    slower_than_the_timeout_x1000: Fault::Slow, 1000;
    garbage_body_x1: Fault::Garbage, 1;
    garbage_body_x100: Fault::Garbage, 100;
    garbage_body_x1000: Fault::Garbage, 1000;
    invalid_grant_x1: Fault::InvalidGrant, 1;
    invalid_grant_x100: Fault::InvalidGrant, 100;
    invalid_grant_x1000: Fault::InvalidGrant, 1000;
    empty_token_x1: Fault::EmptyToken, 1;
    empty_token_x100: Fault::EmptyToken, 100;
    empty_token_x1000: Fault::EmptyToken, 1000;
}
