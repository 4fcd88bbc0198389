//! Proactive refresh: a token inside its refresh-ahead window is used while
//! a background refresh replaces it, so steady traffic never waits.
//!
//! Time is paused, so the upstream here is an in-process tower service
//! (a socket would let the paused clock jump while bytes are in flight).

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::Issuer;
use http_body_util::Full;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_auth_refresh::{AuthRefreshLayer, RefreshReason, ReplayBody, TokenHandle};

type Upstream = tower::util::BoxCloneService<
    http::Request<ReplayBody<Full<Bytes>>>,
    http::Response<Full<Bytes>>,
    Infallible,
>;

fn recording_upstream(seen: Arc<Mutex<Vec<String>>>) -> Upstream {
    tower::util::BoxCloneService::new(service_fn(
        move |req: http::Request<ReplayBody<Full<Bytes>>>| {
            let seen = seen.clone();
            async move {
                let auth = req.headers()["authorization"].to_str().unwrap().to_owned();
                seen.lock().unwrap().push(auth);
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
            }
        },
    ))
}

#[tokio::test(start_paused = true)]
async fn steady_traffic_across_three_lifetimes_refreshes_three_times_and_never_waits() {
    let lifetime = Duration::from_secs(600);
    let issuer = Issuer::detached().lifetime(lifetime);
    let handle = TokenHandle::builder(issuer.source())
        .refresh_ahead(Duration::from_secs(60))
        .build();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(recording_upstream(seen.clone()));

    // One request a second for 1,500 s: the lifetimes of three tokens
    // (each is replaced ~60 s before it expires, at ~540 s of age).
    for _ in 0..1500 {
        let response = service
            .clone()
            .oneshot(http::Request::new(Full::default()))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    assert_eq!(issuer.calls(), 3);
    let stats = handle.stats();
    assert_eq!(stats.refreshes, 3);
    assert_eq!(
        (stats.waited_first_token, stats.waited),
        (1, 0),
        "only the very first request waited (for the first token)"
    );
    assert_eq!(stats.retries, 0);
    let reasons = issuer.reasons.lock().unwrap().clone();
    assert_eq!(
        reasons,
        [
            RefreshReason::Initial,
            RefreshReason::Proactive,
            RefreshReason::Proactive
        ]
    );
    let seen = seen.lock().unwrap();
    assert!(seen.iter().any(|a| a == "Bearer tok-3"));
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "tokens only move forward"
    );
}

#[tokio::test(start_paused = true)]
async fn refresh_ahead_is_capped_at_half_the_lifetime() {
    // A margin longer than the whole lifetime must not refresh on every request.
    let issuer = Issuer::detached().lifetime(Duration::from_secs(10));
    let handle = TokenHandle::builder(issuer.source())
        .refresh_ahead(Duration::from_secs(3600))
        .build();
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(recording_upstream(Arc::default()));
    for _ in 0..40 {
        service
            .clone()
            .oneshot(http::Request::new(Full::default()))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // 4 s of traffic on a 10 s token refreshed at ≥ 5 s of age: no refresh yet.
    assert_eq!(issuer.calls(), 1);
    assert!(!handle.status().should_refresh);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(handle.status().should_refresh);
}

#[tokio::test(start_paused = true)]
async fn an_expired_token_makes_requests_wait_for_the_refresh() {
    let issuer = Issuer::detached().lifetime(Duration::from_secs(60));
    let handle = TokenHandle::builder(issuer.source())
        .no_refresh_ahead()
        .build();
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(recording_upstream(Arc::default()));
    service
        .clone()
        .oneshot(http::Request::new(Full::default()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert!(!handle.status().valid);
    service
        .clone()
        .oneshot(http::Request::new(Full::default()))
        .await
        .unwrap();
    assert_eq!(issuer.calls(), 2);
    let stats = handle.stats();
    assert_eq!(
        (stats.waited_first_token, stats.waited),
        (1, 1),
        "the first request waited for the first token, the last for the expired one's refresh"
    );
    assert_eq!(issuer.reasons.lock().unwrap()[1], RefreshReason::Expired);
}
