//! The layer behaves like any tower middleware: ServiceBuilder,
//! BoxCloneService, Clone, poll_ready delegation, generic bodies.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use common::{Issuer, Upstream, client, get};
use http_body_util::{BodyExt, Full};
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_auth_refresh::{AuthRefresh, AuthRefreshLayer, BoxError, ReplayBody, TokenHandle};

#[tokio::test]
async fn composes_into_a_box_clone_service() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream);
    let layer = AuthRefreshLayer::new(TokenHandle::new(issuer.source()));
    let service = ServiceBuilder::new()
        .concurrency_limit(8)
        .layer(layer)
        .service(client())
        .map_response(|r| r.map(|b| b.boxed_unsync()));
    let boxed: BoxCloneService<http::Request<Full<Bytes>>, _, BoxError> =
        BoxCloneService::new(service);
    let response = boxed
        .clone()
        .oneshot(get(&upstream.url("/a")))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// An inner service that is ready only every other poll and counts calls.
#[derive(Clone)]
struct Picky {
    polls: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    ready: bool,
}

impl Service<http::Request<ReplayBody<Full<Bytes>>>> for Picky {
    type Response = http::Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        let n = self.polls.fetch_add(1, Ordering::SeqCst);
        if n % 2 == 0 {
            cx.waker().wake_by_ref();
            Poll::Pending
        } else {
            self.ready = true;
            Poll::Ready(Ok(()))
        }
    }

    fn call(&mut self, _req: http::Request<ReplayBody<Full<Bytes>>>) -> Self::Future {
        assert!(self.ready, "called without being ready");
        self.ready = false;
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let status = if n == 0 { 401 } else { 200 };
        let response = http::Response::builder()
            .status(status)
            .body(Full::default())
            .unwrap();
        std::future::ready(Ok(response))
    }
}

#[tokio::test]
async fn poll_ready_is_delegated_and_the_retry_waits_for_readiness() {
    let issuer = Issuer::detached();
    let handle = TokenHandle::builder(issuer.source())
        .min_token_age(std::time::Duration::ZERO)
        .build();
    let picky = Picky {
        polls: Arc::default(),
        calls: Arc::default(),
        ready: false,
    };
    let mut service: AuthRefresh<Picky> =
        AuthRefreshLayer::new(handle.clone()).layer(picky.clone());
    let response = service
        .ready()
        .await
        .unwrap()
        .call(http::Request::new(Full::default()))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(picky.calls.load(Ordering::SeqCst), 2);
    assert!(
        picky.polls.load(Ordering::SeqCst) >= 4,
        "the retry polled readiness again"
    );
    assert_eq!(handle.stats().retries, 1);
    assert_eq!(service.get_ref().calls.load(Ordering::SeqCst), 2);
    let _inner: Picky = service.into_inner();
}

#[tokio::test]
async fn works_with_an_axum_router_as_the_inner_service() {
    // Generic request and response bodies: an in-process axum router.
    let issuer = Issuer::detached();
    let router = axum::Router::new().route(
        "/who",
        axum::routing::get(|headers: http::HeaderMap| async move {
            headers["authorization"].to_str().unwrap().to_owned()
        }),
    );
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(TokenHandle::new(issuer.source())))
        .map_request(|req: http::Request<ReplayBody<Full<Bytes>>>| req.map(axum::body::Body::new))
        .service(router);
    let response = service
        .oneshot(
            http::Request::get("/who")
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"Bearer tok-1");
}

/// A request waiting for a token does not hold the capacity of the
/// service below it: another request gets through meanwhile.
#[tokio::test]
async fn a_request_waiting_for_a_token_holds_no_capacity() {
    let upstream = Upstream::start().await;
    let release = Arc::new(tokio::sync::Notify::new());
    let started = Arc::new(tokio::sync::Notify::new());
    let (gate, signal) = (release.clone(), started.clone());
    let issuer = Issuer::new(&upstream);
    let inner = issuer.source();
    let handle = TokenHandle::new(tower_auth_refresh::token_source_fn(
        move |cx: tower_auth_refresh::RefreshContext| {
            let (gate, signal) = (gate.clone(), signal.clone());
            let fetch = tower_auth_refresh::TokenSource::fetch(&inner, cx);
            async move {
                signal.notify_one();
                gate.notified().await;
                fetch.await
            }
        },
    ));
    // One request at a time below the layer.
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .concurrency_limit(1)
        .service(client());

    let waiting = tokio::spawn(service.clone().oneshot(get(&upstream.url("/waits"))));
    started.notified().await;
    // The caller's own token: no refresh, straight to the upstream.
    upstream.accept("own");
    let mut own = get(&upstream.url("/own"));
    own.headers_mut()
        .insert("authorization", "Bearer own".parse().unwrap());
    let response = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        service.clone().oneshot(own),
    )
    .await
    .expect("the limit is not held by the request waiting for a token")
    .unwrap();
    assert_eq!(response.status(), 200);
    assert!(!waiting.is_finished());

    release.notify_one();
    let response = waiting.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let paths: Vec<String> = upstream.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(paths, ["/own", "/waits"]);
}
