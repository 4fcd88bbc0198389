//! TokenHandle: status at a glance, refresh now, set, clear, counters.

mod common;

use std::time::Duration;

use common::{Issuer, Upstream, client, get};
use secrecy::ExposeSecret;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::{AuthRefreshLayer, RefreshReason, Token, TokenHandle};

#[tokio::test(start_paused = true)]
async fn status_describes_the_token_without_secrets() {
    let issuer = Issuer::detached().lifetime(Duration::from_secs(300));
    let handle = TokenHandle::builder(issuer.source())
        .refresh_ahead(Duration::from_secs(60))
        .build();
    let empty = handle.status();
    assert!(!empty.has_token && !empty.valid && empty.should_refresh);
    assert_eq!(empty.generation, 0);

    handle.refresh_now().await.unwrap();
    let status = handle.status();
    assert!(status.has_token && status.valid && !status.should_refresh);
    assert_eq!(status.generation, 1);
    assert!(status.expires_in.unwrap() > Duration::from_secs(299));
    assert!(status.last_refresh_at.is_some() && status.last_refresh_duration.is_some());
    assert_eq!(status.consecutive_failures, 0);

    tokio::time::sleep(Duration::from_secs(250)).await;
    let late = handle.status();
    assert!(
        late.valid && late.should_refresh,
        "inside the refresh-ahead window"
    );
    assert!(late.expires_in.unwrap() <= Duration::from_secs(50));

    let json = serde_json::to_value(handle.status()).unwrap();
    assert_eq!(json["generation"], 1);
    assert!(json["expires_in_ms"].as_u64().unwrap() <= 50_000);
}

#[tokio::test]
async fn set_token_and_clear_change_what_requests_carry() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream);
    let handle = TokenHandle::new(issuer.source());
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(client());

    upstream.accept("pasted");
    handle.set_token(Token::bearer("pasted")).unwrap();
    assert_eq!(handle.status().generation, 1);
    service
        .clone()
        .oneshot(get(&upstream.url("/a")))
        .await
        .unwrap();
    assert_eq!(
        upstream.seen()[0].authorization.as_deref(),
        Some("Bearer pasted")
    );
    assert_eq!(issuer.calls(), 0);

    handle.clear();
    assert!(!handle.status().has_token);
    service
        .clone()
        .oneshot(get(&upstream.url("/a")))
        .await
        .unwrap();
    assert_eq!(issuer.calls(), 1);
    assert_eq!(issuer.reasons.lock().unwrap()[0], RefreshReason::Initial);
    assert_eq!(
        upstream.seen()[1].authorization.as_deref(),
        Some("Bearer tok-1")
    );
    assert!(handle.status().generation > 1);

    assert!(handle.set_token(Token::bearer("bad\r\nheader")).is_err());
    assert_eq!(
        handle.token().unwrap().access_token().expose_secret(),
        "tok-1"
    );
}

#[tokio::test]
async fn counters_add_up() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream);
    let handle = TokenHandle::builder(issuer.source())
        .min_token_age(Duration::ZERO)
        .build();
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(client());
    service
        .clone()
        .oneshot(get(&upstream.url("/a")))
        .await
        .unwrap();
    upstream.revoke_all();
    service
        .clone()
        .oneshot(get(&upstream.url("/b")))
        .await
        .unwrap();
    service
        .clone()
        .oneshot(get(&upstream.url("/c")))
        .await
        .unwrap();
    let stats = handle.stats();
    assert_eq!(stats.refreshes, 2);
    assert_eq!(stats.retries, 1);
    assert_eq!((stats.waited_first_token, stats.waited), (1, 0));
    assert_eq!(stats.failures, 0);
    assert_eq!(stats.skipped_retries, 0);
    assert_eq!(issuer.reasons.lock().unwrap()[1], RefreshReason::Rejected);
}

#[tokio::test]
async fn refresh_now_joins_a_refresh_in_flight() {
    let issuer = Issuer::detached().delay(Duration::from_millis(30));
    let handle = TokenHandle::new(issuer.source());
    let (a, b) = tokio::join!(handle.refresh_now(), handle.refresh_now());
    assert_eq!(a.unwrap(), b.unwrap());
    assert_eq!(issuer.calls(), 1);
}
