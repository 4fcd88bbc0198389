//! Token lifetimes the refresh schedule must survive: tokens that arrive
//! already expired, and a proactive refresh refused by back-off.
//!
//! Time is paused; the upstream is an in-process tower service that
//! records the `Authorization` of each request.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::Issuer;
use http_body_util::Full;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_auth_refresh::{
    AuthRefreshLayer, BoxError, RefreshContext, ReplayBody, Token, TokenHandle, token_source_fn,
};

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

/// A source whose tokens are expired on arrival: `expires_in: 0` on odd
/// calls, an absolute expiry a minute behind the local clock on even ones.
fn expired_on_arrival(calls: &Arc<AtomicUsize>) -> impl tower_auth_refresh::TokenSource {
    let counter = calls.clone();
    token_source_fn(move |_cx: RefreshContext| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            let token = Token::bearer(format!("tok-{n}"));
            Ok::<_, BoxError>(if n % 2 == 1 {
                token.with_expires_in(Duration::ZERO)
            } else {
                token.with_expires_at(SystemTime::now() - Duration::from_secs(60))
            })
        }
    })
}

#[tokio::test(start_paused = true)]
async fn tokens_expired_on_arrival_do_not_cost_a_token_call_per_request() {
    let calls = Arc::new(AtomicUsize::new(0));
    let handle = TokenHandle::builder(expired_on_arrival(&calls))
        .no_refresh_ahead()
        .min_validity(Duration::ZERO)
        .build();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(recording_upstream(seen.clone()));

    // 50 requests, one every 100 ms (5 s).
    for _ in 0..50 {
        let response = service
            .clone()
            .oneshot(http::Request::new(Full::default()))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Each expired token is used for one back-off step, at least 1 s,
    // doubling from the default 500 ms (±10 %): used 1 s, ~1 s, ~2 s, so
    // the 4th token arrives between 3.5 s and 4.9 s and lasts past 5 s.
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert_eq!(seen.lock().unwrap().len(), 50);
    assert_eq!(handle.stats().failures, 0);
}

#[tokio::test(start_paused = true)]
async fn a_proactive_refresh_refused_by_back_off_is_claimed_again_after_it() {
    // Call 1 gives a 100 s token, call 2 (a manual refresh) fails, then
    // tokens come again.
    let upstream_calls = Arc::new(AtomicUsize::new(0));
    let counter = upstream_calls.clone();
    let issuer = Issuer::detached().lifetime(Duration::from_secs(100));
    let inner = issuer.source();
    let handle = TokenHandle::builder(token_source_fn(move |cx: RefreshContext| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        let fetch = tower_auth_refresh::TokenSource::fetch(&inner, cx);
        async move {
            if n == 2 {
                return Err::<Token, BoxError>("token endpoint down".into());
            }
            fetch.await
        }
    }))
    .refresh_ahead(Duration::from_secs(60))
    .backoff(Duration::from_secs(20), Duration::from_secs(20))
    .build();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(recording_upstream(seen.clone()));
    let send = || async {
        let response = service
            .clone()
            .oneshot(http::Request::new(Full::default()))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    };

    send().await;
    // While tok-1 is fresh, a manual refresh fails: back-off for 18-22 s.
    tokio::time::sleep(Duration::from_secs(45)).await;
    handle.refresh_now().await.unwrap_err();

    // tok-1 enters its refresh-ahead window (at 45-50 s of its 100 s), the
    // back-off refuses the proactive refresh; once the window has passed, a
    // request claims it again, long before tok-1 expires (99 s).
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        send().await;
    }

    assert_eq!(upstream_calls.load(Ordering::SeqCst), 3);
    assert_eq!(issuer.calls(), 2);
    let stats = handle.stats();
    assert_eq!(
        (stats.waited_first_token, stats.waited),
        (1, 0),
        "only the very first request waited, for the first token"
    );
    assert_eq!(seen.lock().unwrap().last().unwrap(), "Bearer tok-2");
}

/// Tokens that arrive with a few milliseconds to live (`expires_in` of
/// 1 ms or 10 ms, an absolute expiry a moment ahead through clock skew)
/// get the same floor as tokens that arrive expired.
#[tokio::test(start_paused = true)]
async fn near_zero_lifetimes_do_not_cost_a_token_call_per_request() {
    for (name, life) in [
        ("1 ms", Duration::from_millis(1)),
        ("10 ms", Duration::from_millis(10)),
        ("50 ms", Duration::from_millis(50)),
        ("99 ms", Duration::from_millis(99)),
    ] {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let handle = TokenHandle::builder(token_source_fn(move |_cx: RefreshContext| {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            async move { Ok::<_, BoxError>(Token::bearer(format!("tok-{n}")).with_expires_in(life)) }
        }))
        .build();
        // 50 requests, 5 ms apart: 250 ms, inside the first floor (1 s).
        for _ in 0..50 {
            handle.valid_token().await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "lifetime {name}");
    }
}

/// A short lifetime above the floor is honoured as given: a 300 ms token is
/// not used past its expiry.
#[tokio::test(start_paused = true)]
async fn a_short_lifetime_above_the_floor_is_honoured() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let handle = TokenHandle::builder(token_source_fn(move |_cx: RefreshContext| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            Ok::<_, BoxError>(
                Token::bearer(format!("tok-{n}")).with_expires_in(Duration::from_millis(300)),
            )
        }
    }))
    .no_refresh_ahead()
    .build();
    handle.valid_token().await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!handle.status().valid);
    handle.valid_token().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
