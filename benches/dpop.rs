//! The per-request cost of a DPoP proof (feature `dpop`).
//!
//! One request through `AuthRefreshLayer` over a no-op inner service with a
//! valid token, driven to completion without a runtime hop:
//!
//! - `layer/bearer`: the layer without DPoP (the path every non-DPoP user
//!   takes: the proof code is a `None` check there);
//! - `layer/dpop_es256`: the same layer with `.dpop(key)`: `Authorization:
//!   DPoP`, and a fresh ES256 proof with `ath` and a nonce on each request;
//! - `proof/es256`, `proof/eddsa`: `DpopKey::proof` alone.

use std::convert::Infallible;
use std::hint::black_box;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use futures::FutureExt;
use http::header::HeaderValue;
use http::{Method, Request, Response, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};
use tower_auth_refresh::dpop::{DPOP_NONCE, DpopKey};
use tower_auth_refresh::oauth2::SigningKey;
use tower_auth_refresh::{AuthRefreshLayer, Token, TokenHandle, token_source_fn};

const URL: &str = "http://api.test/v1/items?page=2";

fn token_string() -> String {
    "a".repeat(900)
}

/// Answers 200 with an empty body, and a `DPoP-Nonce` as a DPoP server does.
#[derive(Clone, Copy)]
struct Noop;

impl<B: Body + Send + 'static> Service<Request<B>> for Noop {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        black_box(request);
        let mut response = Response::new(Full::new(Bytes::new()));
        response
            .headers_mut()
            .insert(DPOP_NONCE, HeaderValue::from_static("server-nonce-1"));
        std::future::ready(Ok(response))
    }
}

fn handle() -> TokenHandle {
    let token = || Token::new(token_string(), "DPoP").with_expires_in(Duration::from_secs(3600));
    TokenHandle::builder(token_source_fn(move |_| async move {
        Ok::<_, Infallible>(token())
    }))
    .initial_token(token())
    .build()
}

/// Sends one request and reads the response, without a runtime hop.
fn send<S, B>(service: &mut S)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body + Unpin,
{
    let request = Request::builder().uri(URL).body(Full::default()).unwrap();
    let response = service
        .ready()
        .now_or_never()
        .expect("ready")
        .unwrap()
        .call(request)
        .now_or_never()
        .expect("response")
        .unwrap();
    let mut body = response.into_body();
    while let Some(Some(Ok(frame))) = body.frame().now_or_never() {
        black_box(frame);
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("dpop");
    // The tokio runtime is only there for the handle's timers.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();

    let mut bearer = AuthRefreshLayer::new(handle()).layer(Noop);
    group.bench_function("layer/bearer", |b| b.iter(|| send(&mut bearer)));

    let mut dpop = AuthRefreshLayer::new(handle())
        .dpop(DpopKey::generate().unwrap())
        .layer(Noop);
    group.bench_function("layer/dpop_es256", |b| b.iter(|| send(&mut dpop)));

    let uri: Uri = URL.parse().unwrap();
    let token = token_string();
    let es256 = DpopKey::generate().unwrap();
    group.bench_function("proof/es256", |b| {
        b.iter(|| black_box(es256.proof(&Method::GET, &uri, Some(&token)).unwrap()))
    });
    let eddsa = DpopKey::from_signing_key(SigningKey::generate_ed25519().unwrap());
    group.bench_function("proof/eddsa", |b| {
        b.iter(|| black_box(eddsa.proof(&Method::GET, &uri, Some(&token)).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
