//! Races between the application and the refresh machinery, against a real
//! upstream on 127.0.0.1:
//!
//! * `set_token` / `clear` while a refresh is in flight (the token source is
//!   held on a semaphore, so the interleaving is fixed, not left to timing);
//! * `set_token` / `clear` between sending a request and its rejection;
//! * callers dropped while the refresh they joined is in flight;
//! * a multi-threaded mix of requests, `set_token`, `clear` and
//!   `refresh_now`, checking that generations only grow and add up.
//!
//! A panicking token source and a single dropped caller are covered in
//! `tests/failures.rs`.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Issuer, Upstream, body_text, client, get};
use secrecy::ExposeSecret;
use tokio::sync::Semaphore;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::{
    AuthRefreshLayer, BoxError, RefreshContext, RefreshReason, Token, TokenHandle, token_source_fn,
};

/// A token source whose calls are held until the test lets them through.
#[derive(Clone)]
struct Gated {
    calls: Arc<AtomicUsize>,
    reasons: Arc<Mutex<Vec<RefreshReason>>>,
    release: Arc<Semaphore>,
    upstream: Upstream,
}

impl Gated {
    fn new(upstream: &Upstream) -> Self {
        Self {
            calls: Arc::default(),
            reasons: Arc::default(),
            release: Arc::new(Semaphore::new(0)),
            upstream: upstream.clone(),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Lets one held call return its token.
    fn release_one(&self) {
        self.release.add_permits(1);
    }

    fn source(&self) -> impl tower_auth_refresh::TokenSource {
        let this = self.clone();
        token_source_fn(move |cx: RefreshContext| {
            let this = this.clone();
            async move {
                let n = this.calls.fetch_add(1, Ordering::SeqCst) + 1;
                this.reasons.lock().unwrap().push(cx.reason);
                this.release.acquire().await.unwrap().forget();
                let name = format!("src-{n}");
                this.upstream.accept(&name);
                Ok::<_, BoxError>(Token::bearer(name))
            }
        })
    }
}

/// Waits (at most 5 s) until `done` holds.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn access(handle: &TokenHandle) -> String {
    handle
        .token()
        .map(|t| t.access_token().expose_secret().to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn set_token_during_a_refresh_serves_requests_at_once_and_the_refresh_lands_after() {
    let upstream = Upstream::start().await;
    let gated = Gated::new(&upstream);
    let handle = TokenHandle::new(gated.source());
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(client());

    // A first request starts the initial fetch, which is held.
    let waiting = tokio::spawn(service.clone().oneshot(get(&upstream.url("/a"))));
    wait_until("the fetch started", || gated.calls() == 1).await;
    assert!(handle.status().refreshing);

    // The application pastes a token meanwhile: requests use it at once.
    upstream.accept("pasted");
    handle.set_token(Token::bearer("pasted")).unwrap();
    assert_eq!(handle.status().generation, 1);
    let response = service
        .clone()
        .oneshot(get(&upstream.url("/b")))
        .await
        .unwrap();
    assert_eq!(body_text(response).await, "ok pasted ");

    // The fetch that was already running installs its token last.
    gated.release_one();
    let response = waiting.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(handle.status().generation, 2);
    assert!(!handle.status().refreshing);
    assert_eq!(access(&handle), "src-1");
    let response = service.oneshot(get(&upstream.url("/c"))).await.unwrap();
    assert_eq!(body_text(response).await, "ok src-1 ");
    assert_eq!(gated.calls(), 1, "no second fetch");
    let stats = handle.stats();
    assert_eq!(
        (stats.refreshes, stats.failures, stats.waited_first_token),
        (1, 0, 1)
    );
    let seen: Vec<_> = upstream
        .seen()
        .into_iter()
        .map(|s| (s.path, s.authorization.unwrap()))
        .collect();
    assert!(seen.contains(&("/b".into(), "Bearer pasted".into())));
    assert!(seen.contains(&("/a".into(), "Bearer src-1".into())));
    assert!(upstream.seen().iter().all(|s| s.accepted));
}

#[tokio::test]
async fn clear_during_a_refresh_makes_requests_join_it_not_start_another() {
    let upstream = Upstream::start().await;
    let gated = Gated::new(&upstream);
    upstream.accept("pasted");
    let handle = TokenHandle::builder(gated.source())
        .initial_token(Token::bearer("pasted"))
        .build();
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(client());
    assert_eq!(handle.status().generation, 1);

    let manual = tokio::spawn({
        let handle = handle.clone();
        async move { handle.refresh_now().await }
    });
    wait_until("the refresh started", || gated.calls() == 1).await;
    handle.clear();
    assert!(!handle.status().has_token);

    let requests: Vec<_> = (0..10)
        .map(|i| {
            tokio::spawn(
                service
                    .clone()
                    .oneshot(get(&upstream.url(&format!("/r{i}")))),
            )
        })
        .collect();
    // No token after `clear()`: the requests wait for a first one.
    wait_until("every request waits", || {
        handle.stats().waited_first_token == 10
    })
    .await;
    assert_eq!(upstream.seen().len(), 0, "nothing is sent without a token");
    assert_eq!(
        gated.calls(),
        1,
        "the requests joined the refresh in flight"
    );

    gated.release_one();
    let token = manual.await.unwrap().unwrap();
    assert_eq!(token.access_token().expose_secret(), "src-1");
    for request in requests {
        let response = request.await.unwrap().unwrap();
        assert_eq!(body_text(response).await, "ok src-1 ");
    }
    assert_eq!(gated.calls(), 1);
    assert_eq!(
        handle.status().generation,
        3,
        "pasted (1), clear (2), refreshed (3)"
    );
    assert_eq!(handle.stats().refreshes, 1);
}

#[tokio::test]
async fn set_token_between_send_and_rejection_is_used_for_the_retry_without_a_refresh() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream);
    let handle = TokenHandle::builder(issuer.source())
        .min_token_age(Duration::ZERO)
        .build();
    handle.refresh_now().await.unwrap();
    upstream.revoke_all(); // tok-1 will be rejected
    upstream.accept("pasted");

    // The token is replaced while the first attempt is on its way.
    let first = Arc::new(AtomicBool::new(true));
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .map_request({
            let handle = handle.clone();
            move |request: http::Request<_>| {
                if first.swap(false, Ordering::SeqCst) {
                    handle.set_token(Token::bearer("pasted")).unwrap();
                }
                request
            }
        })
        .service(client());
    let response = service.oneshot(get(&upstream.url("/a"))).await.unwrap();
    assert_eq!(body_text(response).await, "ok pasted ");
    let seen: Vec<_> = upstream
        .seen()
        .into_iter()
        .map(|s| s.authorization.unwrap())
        .collect();
    assert_eq!(seen, ["Bearer tok-1", "Bearer pasted"]);
    assert_eq!(
        issuer.calls(),
        1,
        "the newer generation was used, no refresh"
    );
    assert_eq!(handle.stats().retries, 1);
    assert_eq!(handle.status().generation, 2);
}

#[tokio::test]
async fn clear_between_send_and_rejection_refreshes_once_for_the_retry() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream);
    let handle = TokenHandle::builder(issuer.source())
        .min_token_age(Duration::ZERO)
        .build();
    handle.refresh_now().await.unwrap();
    upstream.revoke_all();

    let first = Arc::new(AtomicBool::new(true));
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .map_request({
            let handle = handle.clone();
            move |request: http::Request<_>| {
                if first.swap(false, Ordering::SeqCst) {
                    handle.clear();
                }
                request
            }
        })
        .service(client());
    let response = service.oneshot(get(&upstream.url("/a"))).await.unwrap();
    assert_eq!(body_text(response).await, "ok tok-2 ");
    assert_eq!(issuer.calls(), 2);
    assert_eq!(
        *issuer.reasons.lock().unwrap(),
        [RefreshReason::Manual, RefreshReason::Rejected]
    );
    assert_eq!(handle.status().generation, 3, "tok-1, clear, tok-2");
}

#[tokio::test]
async fn callers_dropped_while_their_refresh_is_in_flight_do_not_cancel_it() {
    let upstream = Upstream::start().await;
    let gated = Gated::new(&upstream);
    let handle = TokenHandle::builder(gated.source())
        .min_token_age(Duration::ZERO)
        .build();
    gated.release_one();
    handle.refresh_now().await.unwrap();
    upstream.revoke_all(); // src-1 is now rejected
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(client());

    // A hundred requests are rejected and join one held refresh …
    let requests: Vec<_> = (0..100)
        .map(|i| {
            tokio::spawn(
                service
                    .clone()
                    .oneshot(get(&upstream.url(&format!("/r{i}")))),
            )
        })
        .collect();
    wait_until("every first attempt was rejected", || {
        upstream.rejected() == 100
    })
    .await;
    wait_until("the refresh started", || gated.calls() == 2).await;
    // … and every caller gives up.
    for request in &requests {
        request.abort();
    }
    for request in requests {
        assert!(request.await.unwrap_err().is_cancelled());
    }

    gated.release_one();
    wait_until("the refresh was stored", || handle.status().generation == 2).await;
    assert_eq!(access(&handle), "src-2");
    let response = service.oneshot(get(&upstream.url("/after"))).await.unwrap();
    assert_eq!(body_text(response).await, "ok src-2 ");
    assert_eq!(gated.calls(), 2, "the next request needed no new fetch");
    assert_eq!(
        *gated.reasons.lock().unwrap(),
        [RefreshReason::Manual, RefreshReason::Rejected]
    );
    assert_eq!(upstream.seen().len(), 101, "no retry of a dropped request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_set_token_clear_and_refresh_now_mixed_keep_the_manager_consistent() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream).delay(Duration::from_millis(1));
    let handle = TokenHandle::builder(issuer.source())
        .min_token_age(Duration::ZERO)
        .build();
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(client());
    let done = Arc::new(AtomicBool::new(false));

    // Generations seen by a watcher only ever grow.
    let watcher = tokio::spawn({
        let handle = handle.clone();
        let done = done.clone();
        async move {
            let mut last = 0;
            let mut samples = 0u32;
            while !done.load(Ordering::SeqCst) {
                let status = handle.status();
                if status.has_token {
                    assert!(
                        status.generation >= last,
                        "{} after {last}",
                        status.generation
                    );
                    last = status.generation;
                    samples += 1;
                }
                tokio::task::yield_now().await;
            }
            samples
        }
    });

    let requests: Vec<_> = (0..8)
        .map(|task| {
            let service = service.clone();
            let url = upstream.url(&format!("/t{task}"));
            tokio::spawn(async move {
                for _ in 0..40 {
                    let response = service.clone().oneshot(get(&url)).await.unwrap();
                    assert_eq!(response.status(), 200);
                }
            })
        })
        .collect();

    let sets = Arc::new(AtomicU64::new(0));
    let clears = Arc::new(AtomicU64::new(0));
    let chaos = tokio::spawn({
        let handle = handle.clone();
        let upstream = upstream.clone();
        let (sets, clears) = (sets.clone(), clears.clone());
        async move {
            for i in 0..120u32 {
                match i % 3 {
                    0 => {
                        let name = format!("pasted-{i}");
                        upstream.accept(&name);
                        handle.set_token(Token::bearer(name)).unwrap();
                        sets.fetch_add(1, Ordering::SeqCst);
                    }
                    1 => {
                        handle.clear();
                        clears.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {
                        handle.refresh_now().await.unwrap();
                    }
                }
                tokio::task::yield_now().await;
            }
        }
    });

    tokio::time::timeout(Duration::from_secs(30), async {
        chaos.await.unwrap();
        for request in requests {
            request.await.unwrap();
        }
    })
    .await
    .expect("the mix finishes");
    handle.refresh_now().await.unwrap();
    done.store(true, Ordering::SeqCst);
    assert!(watcher.await.unwrap() > 0);

    let stats = handle.stats();
    let status = handle.status();
    assert_eq!(stats.failures, 0);
    assert_eq!(stats.refreshes as usize, issuer.calls());
    assert!(
        (1..=81).contains(&issuer.calls()),
        "at most one fetch per refresh_now (40 + 1) and per clear (40): {}",
        issuer.calls()
    );
    assert_eq!(
        status.generation,
        sets.load(Ordering::SeqCst) + clears.load(Ordering::SeqCst) + stats.refreshes,
        "every install and every clear took one generation"
    );
    assert!(status.valid && !status.refreshing);
    assert_eq!(
        upstream.rejected(),
        0,
        "no request went out without a valid token"
    );
    assert_eq!(upstream.seen().len(), 8 * 40);
}
