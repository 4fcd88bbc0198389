//! Single-flight refresh with generations: N concurrent failures of one
//! generation make exactly one token-source call.

mod common;

use common::{Issuer, Upstream, body_text, client, get};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_auth_refresh::{AuthRefreshLayer, TokenHandle};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_on_an_expired_token_make_one_refresh() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream);
    let handle = TokenHandle::builder(issuer.source())
        .min_token_age(std::time::Duration::ZERO)
        .build();
    handle.refresh_now().await.unwrap();
    assert_eq!(issuer.calls(), 1);
    upstream.revoke_all(); // tok-1 is now rejected by the upstream

    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(client());
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let svc = service.clone();
        let url = upstream.url(&format!("/items/{i}"));
        tasks.push(tokio::spawn(async move { svc.oneshot(get(&url)).await }));
    }
    let mut ok = 0;
    for task in tasks {
        let response = task.await.unwrap().unwrap();
        assert_eq!(response.status(), 200);
        assert!(body_text(response).await.starts_with("ok tok-2"));
        ok += 1;
    }
    assert_eq!(ok, 1000);
    assert_eq!(
        issuer.calls(),
        2,
        "one initial fetch and exactly one refresh"
    );
    let stats = handle.stats();
    assert_eq!(stats.refreshes, 2);
    assert_eq!(stats.retries as usize, upstream.rejected());
    assert_eq!(handle.status().generation, 2);
}

#[tokio::test]
async fn a_401_for_an_older_generation_retries_without_refreshing() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream);
    let handle = TokenHandle::new(issuer.source());
    let mut service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(client());

    // Generation 1 goes out on a request that the upstream will reject …
    handle.refresh_now().await.unwrap();
    upstream.revoke_all();
    // … and meanwhile the application refreshes (generation 2).
    let slow = service
        .ready()
        .await
        .unwrap()
        .call(get(&upstream.url("/a")));
    handle.refresh_now().await.unwrap();
    assert_eq!(issuer.calls(), 2);

    let response = slow.await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(body_text(response).await, "ok tok-2 ");
    assert_eq!(issuer.calls(), 2, "no extra refresh for a stale generation");
    assert_eq!(handle.stats().retries, 1);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer tok-1"));
    assert_eq!(seen[1].authorization.as_deref(), Some("Bearer tok-2"));
}

#[tokio::test]
async fn the_first_requests_wait_for_one_initial_fetch() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream).delay(std::time::Duration::from_millis(20));
    let handle = TokenHandle::new(issuer.source());
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(client());
    let responses = futures::future::join_all(
        (0..50).map(|_| service.clone().oneshot(get(&upstream.url("/x")))),
    )
    .await;
    assert!(responses.into_iter().all(|r| r.unwrap().status() == 200));
    assert_eq!(issuer.calls(), 1);
    let stats = handle.stats();
    assert_eq!((stats.waited_first_token, stats.waited), (50, 0));
    assert_eq!(
        issuer.reasons.lock().unwrap()[0],
        tower_auth_refresh::RefreshReason::Initial
    );
}
