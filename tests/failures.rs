//! Failed refreshes: timeouts, back-off, tokens kept, typed errors, and
//! the rules that stop refresh storms.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Upstream, client, get};
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::{
    AuthRefreshLayer, BoxError, ReauthorizationRequired, RefreshContext, RefreshFailed,
    RefreshTimedOut, RetrySkipped, SkipReason, Token, TokenHandle, token_source_fn,
};

/// A token source that fails while `failing` is set, counting calls.
#[derive(Clone, Default)]
struct Flaky {
    calls: Arc<AtomicUsize>,
    failing: Arc<AtomicBool>,
}

impl Flaky {
    fn source(
        &self,
        upstream: Option<Upstream>,
        lifetime: Option<Duration>,
    ) -> impl tower_auth_refresh::TokenSource {
        let this = self.clone();
        token_source_fn(move |_cx: RefreshContext| {
            let this = this.clone();
            let upstream = upstream.clone();
            async move {
                let n = this.calls.fetch_add(1, Ordering::SeqCst) + 1;
                if this.failing.load(Ordering::SeqCst) {
                    return Err::<Token, BoxError>("token endpoint unavailable".into());
                }
                let name = format!("flaky-{n}");
                if let Some(upstream) = upstream {
                    upstream.accept(&name);
                }
                let token = Token::bearer(name);
                Ok(match lifetime {
                    Some(l) => token.with_expires_in(l),
                    None => token,
                })
            }
        })
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_token_source_times_out_with_a_typed_error() {
    let source = token_source_fn(|_cx: RefreshContext| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok::<_, BoxError>(Token::bearer("late"))
    });
    let handle = TokenHandle::builder(source)
        .refresh_timeout(Duration::from_secs(5))
        .build();
    let err = handle.refresh_now().await.unwrap_err();
    let timeout = err
        .downcast_ref::<RefreshTimedOut>()
        .expect("typed timeout");
    assert_eq!(timeout.after(), Duration::from_secs(5));
    assert_eq!(handle.stats().failures, 1);
}

#[tokio::test]
async fn requests_in_the_backoff_window_fail_fast_without_calling_the_source() {
    let upstream = Upstream::start().await;
    let flaky = Flaky::default();
    flaky.failing.store(true, Ordering::SeqCst);
    let handle = TokenHandle::builder(flaky.source(Some(upstream.clone()), None))
        .backoff(Duration::from_secs(60), Duration::from_secs(120))
        .build();
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(client());

    for _ in 0..20 {
        let err = service
            .clone()
            .oneshot(get(&upstream.url("/a")))
            .await
            .unwrap_err();
        assert!(err.downcast_ref::<RefreshFailed>().is_some(), "{err}");
    }
    assert_eq!(
        flaky.calls(),
        1,
        "one call, then the back-off window answers"
    );
    assert!(
        upstream.seen().is_empty(),
        "no request was sent without a token"
    );
    let status = handle.status();
    assert_eq!(status.consecutive_failures, 1);
    assert!(status.backoff_remaining.unwrap() > Duration::from_secs(50));
    assert!(
        status
            .last_error
            .unwrap()
            .contains("token endpoint unavailable")
    );

    // A manual refresh ignores the window; once the endpoint works, so do requests.
    flaky.failing.store(false, Ordering::SeqCst);
    handle.refresh_now().await.unwrap();
    let response = service
        .clone()
        .oneshot(get(&upstream.url("/a")))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(handle.status().consecutive_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn the_backoff_window_grows_with_each_failure() {
    let flaky = Flaky::default();
    flaky.failing.store(true, Ordering::SeqCst);
    let handle = TokenHandle::builder(flaky.source(None, None))
        .backoff(Duration::from_secs(1), Duration::from_secs(8))
        .build();
    let mut windows = Vec::new();
    for _ in 0..5 {
        // A request-style wait: fails, then we look at the window and sleep past it.
        let _ = handle.refresh_now().await.unwrap_err();
        let window = handle.status().backoff_remaining.unwrap();
        windows.push(window);
        tokio::time::sleep(window + Duration::from_millis(1)).await;
    }
    assert_eq!(flaky.calls(), 5);
    assert!(
        windows[1] > windows[0] && windows[2] > windows[1],
        "{windows:?}"
    );
    assert!(
        windows.iter().all(|w| *w <= Duration::from_millis(8800)),
        "{windows:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_proactive_refresh_keeps_the_valid_token() {
    let flaky = Flaky::default();
    let handle = TokenHandle::builder(flaky.source(None, Some(Duration::from_secs(100))))
        .refresh_ahead(Duration::from_secs(30))
        .backoff(Duration::from_secs(5), Duration::from_secs(5))
        .build();
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(tower::service_fn(|_req: http::Request<_>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                bytes::Bytes,
            >::new()))
        }));
    let call = |svc: &_| {
        let svc: tower_auth_refresh::AuthRefresh<_> = Clone::clone(svc);
        svc.oneshot(http::Request::new(
            http_body_util::Empty::<bytes::Bytes>::new(),
        ))
    };
    call(&service).await.unwrap();
    flaky.failing.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(75)).await; // inside the refresh-ahead window
    for _ in 0..10 {
        call(&service).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // 10 s of traffic with a 5 s back-off: the first stale request, then one per window.
    let calls = flaky.calls();
    assert!((2..=4).contains(&calls), "calls = {calls}");
    let status = handle.status();
    assert!(status.valid);
    assert_eq!(status.generation, 1);
    assert!(status.consecutive_failures >= 1);
    let stats = handle.stats();
    assert_eq!(
        (stats.waited_first_token, stats.waited),
        (1, 0),
        "only the first request waited, for the first token"
    );
}

#[tokio::test]
async fn a_fresh_token_rejected_at_once_is_not_refreshed_again() {
    let upstream = Upstream::start().await;
    let issuer = common::Issuer::new(&upstream);
    let handle = TokenHandle::builder(issuer.source())
        .min_token_age(Duration::from_secs(60))
        .build();
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(client());
    for _ in 0..10 {
        let response = service
            .clone()
            .oneshot(get(&upstream.url("/always-401")))
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "the upstream's answer is returned");
        assert_eq!(
            response
                .extensions()
                .get::<RetrySkipped>()
                .map(|m| m.reason),
            Some(SkipReason::TokenTooFresh)
        );
    }
    assert_eq!(issuer.calls(), 1, "no refresh loop on a permission problem");
    assert_eq!(upstream.seen().len(), 10, "no retry loop either");
    assert_eq!(handle.stats().skipped_retries, 10);
}

#[tokio::test]
async fn a_retry_that_is_rejected_again_is_returned_not_looped() {
    let upstream = Upstream::start().await;
    let issuer = common::Issuer::new(&upstream);
    let handle = TokenHandle::builder(issuer.source())
        .min_token_age(Duration::ZERO)
        .build();
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(client());
    let response = service
        .clone()
        .oneshot(get(&upstream.url("/always-401")))
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        upstream.seen().len(),
        2,
        "first attempt and exactly one retry"
    );
    assert_eq!(issuer.calls(), 2);
}

#[tokio::test]
async fn reauthorization_required_reaches_the_caller_unchanged() {
    let source = token_source_fn(|_cx: RefreshContext| async {
        Err::<Token, BoxError>(Box::new(ReauthorizationRequired::new(
            "refresh token expired",
        )))
    });
    let handle = TokenHandle::new(source);
    let upstream = Upstream::start().await;
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(client());
    let err = service.oneshot(get(&upstream.url("/a"))).await.unwrap_err();
    let reauth = err
        .downcast_ref::<ReauthorizationRequired>()
        .expect("typed");
    assert_eq!(reauth.reason(), "refresh token expired");
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn a_panicking_token_source_is_contained() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let source = token_source_fn(move |_cx: RefreshContext| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                panic!("bug in token source");
            }
            Ok::<_, BoxError>(Token::bearer("after-panic"))
        }
    });
    let handle = TokenHandle::builder(source)
        .backoff(Duration::from_millis(1), Duration::from_millis(1))
        .build();
    let err = handle.refresh_now().await.unwrap_err();
    assert!(
        err.downcast_ref::<RefreshFailed>()
            .unwrap()
            .to_string()
            .contains("panicked")
    );
    let token = handle.refresh_now().await.unwrap();
    assert_eq!(
        secrecy::ExposeSecret::expose_secret(token.access_token()),
        "after-panic"
    );
}

#[tokio::test]
async fn a_dropped_caller_does_not_cancel_the_refresh() {
    let upstream = Upstream::start().await;
    let issuer = common::Issuer::new(&upstream).delay(Duration::from_millis(50));
    let handle = TokenHandle::new(issuer.source());
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(client());
    let request = service.clone().oneshot(get(&upstream.url("/a")));
    // Give up on the request while its token is being fetched.
    let _ = tokio::time::timeout(Duration::from_millis(10), request)
        .await
        .unwrap_err();
    // The refresh goes on without its caller (on the crate's own runtime).
    for _ in 0..500 {
        if handle.status().generation == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        handle.status().generation,
        1,
        "the refresh completed and was stored"
    );
    let response = service.oneshot(get(&upstream.url("/a"))).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(issuer.calls(), 1);
}
