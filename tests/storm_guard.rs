//! The storm guard (`min_token_age`) against short tokens, and a rejected
//! token while another refresh is in flight.
//!
//! Time is paused; the upstream is an in-process tower service that
//! accepts the tokens it is told are valid.

mod common;

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::Issuer;
use http::StatusCode;
use http_body_util::Full;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_auth_refresh::{AuthRefreshLayer, ReplayBody, RetrySkipped, SkipReason, TokenHandle};

type Upstream = tower::util::BoxCloneService<
    http::Request<ReplayBody<Full<Bytes>>>,
    http::Response<Full<Bytes>>,
    Infallible,
>;

#[derive(Clone, Default)]
struct Api {
    revoked: Arc<Mutex<HashSet<String>>>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Api {
    fn revoke(&self, token: &str) {
        self.revoked
            .lock()
            .unwrap()
            .insert(format!("Bearer {token}"));
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    fn service(&self) -> Upstream {
        let api = self.clone();
        tower::util::BoxCloneService::new(service_fn(
            move |req: http::Request<ReplayBody<Full<Bytes>>>| {
                let api = api.clone();
                async move {
                    let auth = req.headers()["authorization"].to_str().unwrap().to_owned();
                    let ok = !api.revoked.lock().unwrap().contains(&auth);
                    api.seen.lock().unwrap().push(auth);
                    let status = if ok {
                        StatusCode::OK
                    } else {
                        StatusCode::UNAUTHORIZED
                    };
                    let mut response = http::Response::new(Full::new(Bytes::from_static(b"")));
                    *response.status_mut() = status;
                    Ok::<_, Infallible>(response)
                }
            },
        ))
    }
}

#[tokio::test(start_paused = true)]
async fn the_guard_lasts_at_most_a_quarter_of_a_short_tokens_life() {
    // 2 s tokens with the default guard (5 s): the guard is 0.5 s for them.
    let issuer = Issuer::detached().lifetime(Duration::from_secs(2));
    let handle = TokenHandle::builder(issuer.source())
        .no_refresh_ahead()
        .build();
    let api = Api::default();
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(api.service());
    let send = || service.clone().oneshot(http::Request::new(Full::default()));

    assert_eq!(send().await.unwrap().status(), 200);
    // Revoked at 0.6 s of age: past the guard, so refreshed and retried.
    tokio::time::sleep(Duration::from_millis(600)).await;
    api.revoke("tok-1");
    assert_eq!(send().await.unwrap().status(), 200);
    // Revoked at once: inside the guard, the upstream's answer comes back.
    api.revoke("tok-2");
    let response = send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        response
            .extensions()
            .get::<RetrySkipped>()
            .map(|m| m.reason),
        Some(SkipReason::TokenTooFresh)
    );

    assert_eq!(issuer.calls(), 2);
    let stats = handle.stats();
    assert_eq!((stats.retries, stats.skipped_retries), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_rejected_token_is_not_handed_out_while_a_proactive_refresh_is_in_flight() {
    // 100 s tokens, refreshed ahead from ~50 s; each token call takes 10 s.
    let issuer = Issuer::detached()
        .lifetime(Duration::from_secs(100))
        .delay(Duration::from_secs(10));
    let handle = TokenHandle::builder(issuer.source()).build();
    let api = Api::default();
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(api.service());
    let send = || service.clone().oneshot(http::Request::new(Full::default()));

    assert_eq!(send().await.unwrap().status(), 200);
    // In the refresh-ahead window: this request starts the (slow) refresh.
    tokio::time::sleep(Duration::from_secs(55)).await;
    assert_eq!(send().await.unwrap().status(), 200);
    assert!(handle.status().refreshing);

    // tok-1 is revoked; a request sees it rejected and joins the refresh.
    api.revoke("tok-1");
    let rejected = tokio::spawn(send());
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A new request now waits for the refresh instead of sending tok-1.
    let next = tokio::spawn(send());
    assert_eq!(rejected.await.unwrap().unwrap().status(), 200);
    assert_eq!(next.await.unwrap().unwrap().status(), 200);

    let seen = api.seen();
    assert_eq!(
        seen,
        ["tok-1", "tok-1", "tok-1", "tok-2", "tok-2"].map(|t| format!("Bearer {t}")),
        "tok-1 went out once after it was rejected"
    );
    assert_eq!(issuer.calls(), 2);
}
