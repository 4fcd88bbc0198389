//! Injection at send time: every attempt carries the token current at that
//! moment, in the place the injector says; a caller's own token wins.

mod common;

use std::time::Duration;

use common::{Issuer, Upstream, body_text, client, get, post};
use http::header::HeaderName;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_auth_refresh::{AuthRefreshLayer, TokenHandle, TokenInjector};

async fn first_seen(injector: TokenInjector) -> common::Seen {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream);
    let handle = TokenHandle::builder(issuer.source())
        .injector(injector)
        .build();
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle))
        .service(client());
    let response = service
        .oneshot(get(&upstream.url("/p?page=2")))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    upstream.seen().remove(0)
}

#[tokio::test]
async fn bearer_is_the_default() {
    let seen = first_seen(TokenInjector::default()).await;
    assert_eq!(seen.authorization.as_deref(), Some("Bearer tok-1"));
}

#[tokio::test]
async fn raw_value_in_authorization() {
    let seen = first_seen(TokenInjector::raw()).await;
    assert_eq!(seen.authorization.as_deref(), Some("tok-1"));
}

#[tokio::test]
async fn any_named_header() {
    let seen = first_seen(TokenInjector::header(HeaderName::from_static(
        "x-api-token",
    )))
    .await;
    assert_eq!(seen.headers["x-api-token"], "tok-1");
    assert!(seen.authorization.is_none());
}

#[tokio::test]
async fn query_parameter_keeps_the_existing_query() {
    let seen = first_seen(TokenInjector::query("access_token")).await;
    assert_eq!(seen.query.as_deref(), Some("page=2&access_token=tok-1"));
    assert!(seen.authorization.is_none());
}

#[tokio::test]
async fn the_callers_explicit_token_wins_and_is_not_refreshed() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream);
    let handle = TokenHandle::new(issuer.source());
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(client());
    let mut request = get(&upstream.url("/a"));
    request
        .headers_mut()
        .insert("authorization", "Bearer mine".parse().unwrap());
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(
        response.status(),
        401,
        "the caller's token is not ours to refresh"
    );
    assert_eq!(issuer.calls(), 0);
    assert_eq!(
        upstream.seen()[0].authorization.as_deref(),
        Some("Bearer mine")
    );
}

#[tokio::test]
async fn the_retry_reads_the_token_current_when_it_is_sent() {
    // FIELD_NOTES mistake 1: a refresh happens while the first attempt is in
    // flight; the retry must carry the new token, not the old header.
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream).delay(Duration::from_millis(5));
    let handle = TokenHandle::builder(issuer.source())
        .min_token_age(Duration::ZERO)
        .build();
    let mut service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(client());
    handle.refresh_now().await.unwrap();
    upstream.revoke_all();

    let in_flight = service
        .ready()
        .await
        .unwrap()
        .call(post(&upstream.url("/orders"), r#"{"item":1}"#));
    let response = in_flight.await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(body_text(response).await, r#"ok tok-2 {"item":1}"#);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer tok-1"));
    assert_eq!(seen[1].authorization.as_deref(), Some("Bearer tok-2"));
    assert_eq!(
        seen[0].body, seen[1].body,
        "the retry replays the same body"
    );
}

#[tokio::test]
async fn a_percent_encoded_query_key_counts_as_the_callers_token() {
    // `access%5Ftoken` is `access_token` once decoded, as a server (and the
    // reqwest adapter) reads it: the caller's own token, left alone.
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream);
    let handle = TokenHandle::builder(issuer.source())
        .injector(TokenInjector::query("access_token"))
        .build();
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle))
        .service(client());
    service
        .oneshot(get(&upstream.url("/p?access%5Ftoken=mine")))
        .await
        .unwrap();
    assert_eq!(issuer.calls(), 0, "not ours to refresh");
    assert_eq!(
        upstream.seen()[0].query.as_deref(),
        Some("access%5Ftoken=mine"),
        "no second token added"
    );
}
