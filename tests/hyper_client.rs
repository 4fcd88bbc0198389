//! The README's composition: `AuthRefreshLayer` over a hyper-util legacy
//! client, against a real upstream on 127.0.0.1, across expiries.

mod common;

use std::time::{Duration, SystemTime};

use common::{Issuer, Upstream, body_text, client, get};
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::{AuthRefreshLayer, RefreshReason, Token, TokenHandle};

#[tokio::test]
async fn a_token_past_its_expiry_is_replaced_and_a_revoked_one_refreshed_and_retried() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream).lifetime(Duration::from_secs(3600));
    let handle = TokenHandle::builder(issuer.source())
        .min_token_age(Duration::ZERO)
        .build();
    handle
        .set_token(
            Token::bearer("stale").with_expires_at(SystemTime::now() - Duration::from_secs(1)),
        )
        .unwrap();
    let client = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(client());

    // The installed token is past its expiry: a new one goes out instead.
    let response = client
        .clone()
        .oneshot(get(&upstream.url("/orders")))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(body_text(response).await, "ok tok-1 ");

    // The upstream drops the token early: its 401 brings a refresh and one
    // retry with the new token.
    upstream.revoke_all();
    let response = client.oneshot(get(&upstream.url("/orders"))).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(body_text(response).await, "ok tok-2 ");

    let sent: Vec<_> = upstream
        .seen()
        .into_iter()
        .map(|s| s.authorization)
        .collect();
    assert_eq!(
        sent,
        ["tok-1", "tok-1", "tok-2"].map(|t| Some(format!("Bearer {t}"))),
        "the stale token never went out"
    );
    assert_eq!(
        *issuer.reasons.lock().unwrap(),
        vec![RefreshReason::Expired, RefreshReason::Rejected]
    );
    let stats = handle.stats();
    assert_eq!((stats.refreshes, stats.retries), (2, 1));
    assert_eq!(handle.status().generation, 3, "stale, tok-1, tok-2");
}
