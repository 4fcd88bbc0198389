//! One request through a no-op inner service with a valid token.
//!
//! Each variant sends a request through its stack and drives the response
//! future to completion without a runtime hop (every inner future is ready at
//! once), so the figure is the per-request cost of the middleware:
//!
//! - `bare`: the inner service alone;
//! - `tower_http_bearer`: tower-http's `AddAuthorization::bearer`, a static
//!   header clone (the floor);
//! - `tower_retry_bearer`: tower's `Retry` (a policy that clones the request
//!   and retries a 401 once) around `AddAuthorization`: what a generic
//!   "retry once and add a header" stack costs;
//! - `ours/*`: `AuthRefreshLayer` with replay off, with replay on and an
//!   empty body, with replay on and off and a 1 KiB body (of known length,
//!   and streamed in one chunk of unknown length), and with the JSON body
//!   rule added to the detector (a 200 JSON answer is then peeked);
//! - `mutex_layer` / `rwlock_layer`: straightforward layers written here as
//!   baselines (lock, check the expiry against the clock, clone the header);
//! - `middle`: `middle` 0.5's client-credentials authorizer,
//!   `authorization_header()` plus inserting it, as its client does;
//! - `aliri_tokens`: `TokenWatcher::token()` plus building the header from
//!   the borrowed token, as its middleware does.

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use futures::FutureExt;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, StreamBody};
use tower::{Layer, Service, ServiceExt};
use tower_auth_refresh::{
    AuthRefreshLayer, ExpiryDetectorExt, JsonBodyRule, Token, TokenHandle, Unauthorized,
    token_source_fn,
};

const JSON_OK: &str = r#"{"code":0,"msg":"ok","data":{"id":42,"name":"widget","price":1999}}"#;

fn token_string() -> String {
    "a".repeat(900)
}

/// The inner service: drains the request body, answers 200 with a short
/// JSON body.
#[derive(Clone, Copy)]
struct Noop;

impl<B> Service<Request<B>> for Noop
where
    B: Body + Send + Unpin + 'static,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let mut body = request.into_body();
        let mut drained = 0usize;
        while let Some(Some(Ok(frame))) = body.frame().now_or_never() {
            if let Some(data) = frame.data_ref() {
                drained += bytes::Buf::remaining(data);
            }
        }
        black_box(drained);
        Box::pin(async {
            let mut response = Response::new(Full::new(Bytes::from_static(JSON_OK.as_bytes())));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok(response)
        })
    }
}

/// Sends one request and reads the whole response, all without a runtime
/// hop; panics if anything would have waited.
fn send<S, B>(service: &mut S, body: B)
where
    S: Service<Request<B>>,
    S::Response: IntoBody,
    S::Error: std::fmt::Debug,
{
    let request = Request::builder()
        .uri("http://api.test/v1/items")
        .body(body)
        .unwrap();
    let response = service
        .ready()
        .now_or_never()
        .expect("ready")
        .unwrap()
        .call(request)
        .now_or_never()
        .expect("response")
        .unwrap();
    black_box(response.drain());
}

/// A 1 KiB body of unknown length in one chunk, as a streamed upload
/// sends it (no size hint, so replay keeps it).
fn streamed(chunk: &Bytes) -> Streamed {
    StreamBody::new(futures::stream::iter(vec![Ok(Frame::data(chunk.clone()))]))
}

type Streamed =
    StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// Reads a response body to the end without waiting.
trait IntoBody {
    fn drain(self) -> usize;
}

impl<B: Body + Unpin> IntoBody for Response<B> {
    fn drain(self) -> usize {
        let mut body = self.into_body();
        let mut total = 0;
        while let Some(Some(Ok(frame))) = body.frame().now_or_never() {
            if let Some(data) = frame.data_ref() {
                total += bytes::Buf::remaining(data);
            }
        }
        total
    }
}

fn handle() -> TokenHandle {
    TokenHandle::builder(token_source_fn(|_| async {
        Ok::<_, Infallible>(
            Token::bearer(token_string()).with_expires_in(Duration::from_secs(3600)),
        )
    }))
    .initial_token(Token::bearer(token_string()).with_expires_in(Duration::from_secs(3600)))
    .build()
}

/// A layer that keeps the token behind a `Mutex` and checks its expiry
/// against the clock on every request.
#[derive(Clone)]
struct LockedAuth<S, L> {
    inner: S,
    cell: Arc<L>,
}

struct Cached {
    header: HeaderValue,
    expires_at: Instant,
}

trait ReadCached: Send + Sync {
    fn header(&self) -> Option<HeaderValue>;
}

impl ReadCached for Mutex<Cached> {
    fn header(&self) -> Option<HeaderValue> {
        let cached = self.lock().unwrap();
        (Instant::now() < cached.expires_at).then(|| cached.header.clone())
    }
}

impl ReadCached for RwLock<Cached> {
    fn header(&self) -> Option<HeaderValue> {
        let cached = self.read().unwrap();
        (Instant::now() < cached.expires_at).then(|| cached.header.clone())
    }
}

impl<S, L, B> Service<Request<B>> for LockedAuth<S, L>
where
    S: Service<Request<B>>,
    L: ReadCached,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> S::Future {
        if let Some(header) = self.cell.header() {
            request.headers_mut().insert(AUTHORIZATION, header);
        }
        self.inner.call(request)
    }
}

fn cached() -> Cached {
    let mut header = HeaderValue::from_str(&format!("Bearer {}", token_string())).unwrap();
    header.set_sensitive(true);
    Cached {
        header,
        expires_at: Instant::now() + Duration::from_secs(3600),
    }
}

/// A service that inserts whatever header `make` returns.
#[derive(Clone)]
struct WithHeader<S, F> {
    inner: S,
    make: F,
}

impl<S, F, B> Service<Request<B>> for WithHeader<S, F>
where
    S: Service<Request<B>>,
    F: Fn() -> HeaderValue,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> S::Future {
        request.headers_mut().insert(AUTHORIZATION, (self.make)());
        self.inner.call(request)
    }
}

/// Retries a 401 once, cloning the request before it is sent: a generic
/// "retry once and add a header" stack.
#[derive(Clone)]
struct RetryUnauthorizedOnce {
    left: usize,
}

impl<Res, E> tower::retry::Policy<Request<Full<Bytes>>, Response<Res>, E>
    for RetryUnauthorizedOnce
{
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _: &mut Request<Full<Bytes>>,
        result: &mut Result<Response<Res>, E>,
    ) -> Option<Self::Future> {
        match result {
            Ok(response)
                if response.status() == http::StatusCode::UNAUTHORIZED && self.left > 0 =>
            {
                self.left -= 1;
                Some(std::future::ready(()))
            }
            _ => None,
        }
    }

    fn clone_request(&mut self, request: &Request<Full<Bytes>>) -> Option<Request<Full<Bytes>>> {
        let mut clone = Request::new(request.body().clone());
        *clone.method_mut() = request.method().clone();
        *clone.uri_mut() = request.uri().clone();
        *clone.version_mut() = request.version();
        *clone.headers_mut() = request.headers().clone();
        Some(clone)
    }
}

/// A token endpoint on loopback for `middle`'s client-credentials flow.
async fn token_endpoint() -> url::Url {
    use axum::routing::post;
    let token = token_string();
    let app = axum::Router::new().route(
        "/token",
        post(move || {
            let token = token.clone();
            async move {
                axum::Json(serde_json::json!({
                    "access_token": token,
                    "token_type": "bearer",
                    "expires_in": 3600
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/token").parse().unwrap()
}

fn hot_path(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let empty = || Full::new(Bytes::new());
    let kib = Bytes::from(vec![b'x'; 1024]);

    let mut group = c.benchmark_group("hot_path");

    let mut bare = Noop;
    group.bench_function("bare", |b| b.iter(|| send(&mut bare, empty())));

    let mut floor = tower_http::auth::AddAuthorizationLayer::bearer(&token_string())
        .as_sensitive(true)
        .layer(Noop);
    group.bench_function("tower_http_bearer", |b| {
        b.iter(|| send(&mut floor, empty()))
    });

    let mut retry_floor = tower::ServiceBuilder::new()
        .layer(tower::retry::RetryLayer::new(RetryUnauthorizedOnce {
            left: 1,
        }))
        .layer(tower_http::auth::AddAuthorizationLayer::bearer(&token_string()).as_sensitive(true))
        .service(Noop);
    group.bench_function("tower_retry_bearer", |b| {
        b.iter(|| send(&mut retry_floor, empty()))
    });

    let shared = handle();
    let mut replay_off = AuthRefreshLayer::new(shared.clone())
        .max_replay_bytes(0)
        .layer(Noop);
    group.bench_function("ours/replay_off", |b| {
        b.iter(|| send(&mut replay_off, empty()))
    });

    let mut replay_on = AuthRefreshLayer::new(shared.clone()).layer(Noop);
    group.bench_function("ours/replay_on_empty_body", |b| {
        b.iter(|| send(&mut replay_on, empty()))
    });
    group.bench_function("ours/replay_on_1kib_body", |b| {
        b.iter(|| send(&mut replay_on, Full::new(kib.clone())))
    });
    group.bench_function("ours/replay_off_1kib_body", |b| {
        b.iter(|| send(&mut replay_off, Full::new(kib.clone())))
    });
    group.bench_function("ours/replay_on_streamed_1kib", |b| {
        b.iter(|| send(&mut replay_on, streamed(&kib)))
    });
    group.bench_function("ours/replay_off_streamed_1kib", |b| {
        b.iter(|| send(&mut replay_off, streamed(&kib)))
    });
    let mut floor_kib = tower_http::auth::AddAuthorizationLayer::bearer(&token_string())
        .as_sensitive(true)
        .layer(Noop);
    group.bench_function("tower_http_bearer_1kib_body", |b| {
        b.iter(|| send(&mut floor_kib, Full::new(kib.clone())))
    });

    let mut json_rule = AuthRefreshLayer::new(shared.clone())
        .detector(Unauthorized::new().or(JsonBodyRule::default_rules()))
        .layer(Noop);
    group.bench_function("ours/detector_json_rule", |b| {
        b.iter(|| send(&mut json_rule, empty()))
    });

    // A thread that uses several tokens in turn (a tenant registry): the
    // per-request cost must not depend on how many.
    for tokens in [1usize, 4, 5, 8] {
        let mut services: Vec<_> = (0..tokens)
            .map(|i| {
                let token = move || {
                    Token::bearer(format!("{i}{}", token_string()))
                        .with_expires_in(Duration::from_secs(3600))
                };
                let handle = TokenHandle::builder(token_source_fn(move |_| async move {
                    Ok::<_, Infallible>(token())
                }))
                .initial_token(token())
                .build();
                AuthRefreshLayer::new(handle).layer(Noop)
            })
            .collect();
        let mut turn = 0usize;
        group.bench_function(format!("ours/tokens_in_turn_{tokens}"), |b| {
            b.iter(|| {
                turn = (turn + 1) % tokens;
                send(&mut services[turn], empty())
            })
        });
    }

    let mut mutex = LockedAuth {
        inner: Noop,
        cell: Arc::new(Mutex::new(cached())),
    };
    group.bench_function("mutex_layer", |b| b.iter(|| send(&mut mutex, empty())));
    let mut rwlock = LockedAuth {
        inner: Noop,
        cell: Arc::new(RwLock::new(cached())),
    };
    group.bench_function("rwlock_layer", |b| b.iter(|| send(&mut rwlock, empty())));

    // Peers.
    let url = runtime.block_on(token_endpoint());
    let authorizer = runtime
        .block_on(
            middle::BasicClientCredentialAuthorizer::basic_builder("bench", "secret", url).build(),
        )
        .expect("middle authorizer fetched its first token");
    let mut middle_svc = WithHeader {
        inner: Noop,
        make: move || {
            use middle::Authorizer;
            Arc::unwrap_or_clone(authorizer.authorization_header().unwrap())
        },
    };
    group.bench_function("middle", |b| b.iter(|| send(&mut middle_svc, empty())));

    let watcher = runtime
        .block_on(aliri_tokens::TokenWatcher::spawn_from_token_source(
            aliri_tokens::sources::ConstTokenSource::new(token_string()),
            aliri_tokens::jitter::NullJitter,
            aliri_tokens::backoff::ErrorBackoffConfig::default(),
        ))
        .unwrap();
    let mut aliri_svc = WithHeader {
        inner: Noop,
        make: move || {
            let token = watcher.token();
            let mut value =
                HeaderValue::from_str(&format!("Bearer {}", token.access_token().as_str()))
                    .unwrap();
            value.set_sensitive(true);
            value
        },
    };
    group.bench_function("aliri_tokens", |b| b.iter(|| send(&mut aliri_svc, empty())));

    group.finish();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
