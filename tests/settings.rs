//! Extreme settings neither panic nor switch a mechanism off.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::Issuer;
use tower_auth_refresh::{
    BoxError, MemoryStore, RefreshContext, Token, TokenHandle, token_source_fn,
};

#[tokio::test]
async fn durations_of_duration_max_work_with_a_store() {
    let issuer = Issuer::detached().lifetime(Duration::from_secs(600));
    let handle = TokenHandle::builder(issuer.source())
        .refresh_timeout(Duration::MAX)
        .refresh_ahead(Duration::MAX)
        .min_validity(Duration::MAX)
        .min_token_age(Duration::MAX)
        .store(MemoryStore::new(), "key")
        .build();
    handle.valid_token().await.unwrap();
    let other = TokenHandle::builder(issuer.source())
        .store(MemoryStore::new(), "key")
        .store_timing(Duration::MAX, Duration::from_millis(10), Duration::MAX)
        .build();
    other.valid_token().await.unwrap();
    assert_eq!(issuer.calls(), 2);
}

#[tokio::test]
async fn a_back_off_of_duration_max_applies() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let handle = TokenHandle::builder(token_source_fn(move |_cx: RefreshContext| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Err::<Token, BoxError>("token endpoint down".into()) }
    }))
    .backoff(Duration::MAX, Duration::MAX)
    .build();

    let first = handle.valid_token().await.unwrap_err();
    let second = handle.valid_token().await.unwrap_err();
    assert!(first.to_string().contains("token endpoint down"), "{first}");
    assert!(
        second.to_string().contains("token endpoint down"),
        "{second}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the second failed fast");
    let status = handle.status();
    assert!(status.backoff_remaining.unwrap() > Duration::from_secs(3600 * 24 * 365));
    assert_eq!(status.consecutive_failures, 1);
    assert!(!status.refreshing);
}
