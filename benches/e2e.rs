//! End to end: a real hyper-util client on this thread, a real hyper server
//! on another, loopback, a 900-byte token.
//!
//! Each stack sends the same requests; two figures per stack and case:
//!
//! - `e2e_cpu/...`: the client thread's CPU time per request (thread CPU
//!   time, not wall time: the server's work and waiting do not count). The
//!   overhead of a stack is its figure minus `bare`'s from the same run.
//! - `e2e_wall/...`: wall time per request; its inverse is the throughput.
//!
//! Stacks:
//! - `bare`: the hyper-util client alone;
//! - `tower_http_bearer`: tower-http's `AddAuthorization::bearer`;
//! - `tower_retry_bearer`: tower's `Retry` with a policy that clones the
//!   request and retries a 401 once, around `AddAuthorization` (a generic
//!   "retry once and add a header" stack);
//! - `middle`: `middle` 0.5's client-credentials authorizer (its first token
//!   fetched from this server's token endpoint), in a small tower service
//!   doing what its `HttpClient::execute` does: take
//!   `authorization_header()` (an error when the last refresh failed) and
//!   insert it unless the request has one;
//! - `aliri_tokens`: `aliri_tokens` 0.3's `TokenWatcher` over a constant
//!   token source, in a small tower service doing what `aliri_reqwest`'s
//!   `AccessTokenMiddleware` does: unless the request has an
//!   `Authorization` header, build `bearer <token>` from the borrowed token
//!   and insert it;
//! - `ours`: `AuthRefreshLayer` with the default detector;
//! - `ours_json`: `AuthRefreshLayer` with `Unauthorized` or the JSON body
//!   rule, on a 67-byte JSON success (peeked by the rule);
//! - `tenants_1` / `tenants_1000`: `AuthRoutingLayer` over a `TokenRegistry`,
//!   requests spread round-robin over 1 or 1,000 tenants, each with its own
//!   token.
//!
//! The two peers refresh their token in the background before it expires
//! and attach a header; that is all they do. They do not look at the
//! response: a token the server rejects (revoked, rotated, clock skew) comes
//! back to the caller as a 401, with no refresh and no replay of the
//! request. `ours` does both, so its figure includes the detector and the
//! replayable body; the peers' figures are what attaching alone costs.
//!
//! Cases: GET and a 4 KiB POST, with 1 and 32 requests in flight
//! (`ours_json` and the tenant stacks: GET with 32 in flight).
//!
//! Every stack is measured the same way. Cases run one after the other,
//! each through every stack in turn, so that the figures a ratio compares
//! are seconds apart. For each case a stack is built afresh around its own
//! client from `client()` (no other pool alive; the stack is dropped after
//! its turn), warmed up with the same `WARM_UP` requests to the same server
//! with the same bodies, then checked once before it is measured:
//!
//! - its answer is the server's JSON success, content type and body intact;
//! - in one round of `AUDIT_ROUND` requests the server saw an
//!   `Authorization` header on every request (none for `bare`) and as many
//!   distinct values as the stack has tokens: 1, or 1,000 for
//!   `tenants_1000`;
//! - our layers' handles did not refresh, retry or wait once warm (and, after
//!   the measurement, still had not);
//! - `ours_json` takes a JSON "token expired" success for an expired token,
//!   so its rule does read the bodies it is measured on.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use cpu_time::ThreadTime;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use futures::StreamExt;
use futures::future::{Either, MapErr, Ready, TryFutureExt};
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::retry::{Policy, RetryLayer};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_auth_refresh::{
    AuthRefreshLayer, AuthRoutingLayer, BoxError, ExpiryDetectorExt, JsonBodyRule, MemoryStore,
    Origin, ReplayBody, Tenant, Token, TokenHandle, TokenRegistry, Unauthorized, token_source_fn,
};
use tower_http::auth::AddAuthorizationLayer;

const JSON_OK: &str = r#"{"code":0,"msg":"ok","data":{"id":42,"name":"widget","price":1999}}"#;
/// What the JSON rule reads as an expired token.
const JSON_EXPIRED: &str = r#"{"code":1,"msg":"Token expired"}"#;
const POST_BYTES: usize = 4096;
const TOKEN_BYTES: usize = 900;
const TENANTS: usize = 1000;
/// Requests before each case is measured.
const WARM_UP: u64 = 2000;
/// Requests of the set-up round whose `Authorization` values the server
/// counts: at least one per tenant.
const AUDIT_ROUND: u64 = TENANTS as u64;

const ITEMS_PATH: &str = "/v1/items";
const EXPIRED_PATH: &str = "/v1/expired";
const TOKEN_PATH: &str = "/token";

fn token_string() -> String {
    "a".repeat(TOKEN_BYTES)
}

/// A tenant's own token, as long as everybody else's.
fn tenant_token(tenant: &str) -> String {
    let mut token = format!("{tenant}-");
    token.push_str(&"a".repeat(TOKEN_BYTES.saturating_sub(token.len())));
    token
}

/// The upstream: a hyper server on its own thread and runtime, answering
/// every request (after draining its body) with a short JSON success; also
/// a token endpoint (for `middle`) and a JSON "token expired" answer (to
/// check that the JSON rule reads bodies).
fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("server runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(answer);
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        addr
    })
}

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = match request.uri().path() {
        TOKEN_PATH => Bytes::from(
            serde_json::json!({
                "access_token": token_string(),
                "token_type": "bearer",
                "expires_in": 3600
            })
            .to_string(),
        ),
        EXPIRED_PATH => Bytes::from_static(JSON_EXPIRED.as_bytes()),
        _ => {
            AUDIT.note(request.headers());
            Bytes::from_static(JSON_OK.as_bytes())
        }
    };
    let _ = request.into_body().collect().await;
    let mut response = Response::new(Full::new(body));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// What the server saw while recording (set-up rounds only; one atomic
/// load per request otherwise).
static AUDIT: LazyLock<Audit> = LazyLock::new(Audit::default);

#[derive(Default)]
struct Audit {
    recording: AtomicBool,
    seen: Mutex<Seen>,
}

#[derive(Default, Debug)]
struct Seen {
    requests: usize,
    without_authorization: usize,
    authorizations: HashSet<HeaderValue>,
}

impl Audit {
    fn note(&self, headers: &HeaderMap) {
        if !self.recording.load(Ordering::SeqCst) {
            return;
        }
        let mut seen = self.seen.lock().expect("audit lock");
        seen.requests += 1;
        match headers.get(AUTHORIZATION) {
            Some(value) => {
                seen.authorizations.insert(value.clone());
            }
            None => seen.without_authorization += 1,
        }
    }

    fn start(&self) {
        *self.seen.lock().expect("audit lock") = Seen::default();
        self.recording.store(true, Ordering::SeqCst);
    }

    fn stop(&self) -> Seen {
        self.recording.store(false, Ordering::SeqCst);
        std::mem::take(&mut *self.seen.lock().expect("audit lock"))
    }
}

fn client<B>() -> Client<HttpConnector, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build(connector)
}

fn ours_client() -> Client<HttpConnector, ReplayBody<Full<Bytes>>> {
    client()
}

fn handle() -> TokenHandle {
    TokenHandle::builder(token_source_fn(|_| async {
        Ok::<_, Infallible>(
            Token::bearer(token_string()).with_expires_in(Duration::from_secs(3600)),
        )
    }))
    .build()
}

/// Retries a 401 once, cloning the request before it is sent (what a
/// generic retry stack does).
#[derive(Clone)]
struct RetryUnauthorizedOnce {
    left: usize,
}

impl<E> Policy<Request<Full<Bytes>>, Response<Incoming>, E> for RetryUnauthorizedOnce {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _: &mut Request<Full<Bytes>>,
        result: &mut Result<Response<Incoming>, E>,
    ) -> Option<Self::Future> {
        match result {
            Ok(response) if response.status() == StatusCode::UNAUTHORIZED && self.left > 0 => {
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

/// The peers' request path as a tower service around the client: `attach`
/// edits the request's headers (or fails the request) before it is sent.
#[derive(Clone)]
struct AttachHeader<S, F> {
    inner: S,
    attach: F,
}

type AttachFuture<S, R> = Either<
    Ready<Result<<S as Service<R>>::Response, BoxError>>,
    MapErr<<S as Service<R>>::Future, fn(<S as Service<R>>::Error) -> BoxError>,
>;

impl<S, F, B> Service<Request<B>> for AttachHeader<S, F>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
    F: Fn(&mut HeaderMap) -> Result<(), BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = AttachFuture<S, Request<B>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        match (self.attach)(request.headers_mut()) {
            Ok(()) => Either::Right(self.inner.call(request).map_err(Into::into as fn(_) -> _)),
            Err(error) => Either::Left(futures::future::ready(Err(error))),
        }
    }
}

/// `middle`'s client-credentials authorizer, its first token from this
/// server's token endpoint.
fn middle_stack(runtime: &tokio::runtime::Runtime) -> (impl ClientStack + use<>, Expect) {
    use middle::Authorizer;
    let token_endpoint = format!("http://{}{TOKEN_PATH}", server())
        .parse()
        .expect("token endpoint url");
    let authorizer = runtime
        .block_on(
            middle::BasicClientCredentialAuthorizer::basic_builder(
                "bench",
                "secret",
                token_endpoint,
            )
            .build(),
        )
        .expect("middle's authorizer fetched its first token");
    let service = AttachHeader {
        inner: client::<Full<Bytes>>(),
        // As `middle::HttpClient::execute`.
        attach: move |headers: &mut HeaderMap| {
            let header = authorizer.authorization_header()?;
            if !headers.contains_key(AUTHORIZATION) {
                headers.insert(AUTHORIZATION, Arc::unwrap_or_clone(header));
            }
            Ok(())
        },
    };
    (service, Expect::headers(1))
}

/// `aliri_tokens`' watcher over a constant token valid for an hour (as
/// long as everybody else's).
fn aliri_stack(runtime: &tokio::runtime::Runtime) -> (impl ClientStack + use<>, Expect) {
    let watcher = runtime
        .block_on(aliri_tokens::TokenWatcher::spawn_from_token_source(
            aliri_tokens::sources::ConstTokenSource::new(token_string())
                .with_token_valid_for(aliri_clock::DurationSecs(3600)),
            aliri_tokens::jitter::NullJitter,
            aliri_tokens::backoff::ErrorBackoffConfig::default(),
        ))
        .expect("aliri's watcher got its first token");
    let service = AttachHeader {
        inner: client::<Full<Bytes>>(),
        // As `aliri_reqwest::AccessTokenMiddleware::handle`.
        attach: move |headers: &mut HeaderMap| {
            headers.entry(AUTHORIZATION).or_insert_with(|| {
                let token = watcher.token();
                let token = token.access_token().as_str();
                let mut value = BytesMut::with_capacity(token.len() + 7);
                value.put_slice(b"bearer ");
                value.put_slice(token.as_bytes());
                let mut value =
                    HeaderValue::from_maybe_shared(value).expect("only valid header bytes");
                value.set_sensitive(true);
                value
            });
            Ok(())
        },
    };
    (service, Expect::headers(1))
}

fn registry() -> TokenRegistry {
    TokenRegistry::builder(MemoryStore::new(), |tenant: &str| {
        let token = tenant_token(tenant);
        token_source_fn(move |_| {
            let token = token.clone();
            async move {
                Ok::<_, Infallible>(Token::bearer(token).with_expires_in(Duration::from_secs(3600)))
            }
        })
    })
    .build()
}

#[derive(Clone, Copy)]
struct Case {
    post: bool,
    in_flight: usize,
}

impl Case {
    fn name(self) -> String {
        format!(
            "{}_c{}",
            if self.post { "post4k" } else { "get" },
            self.in_flight
        )
    }
}

const ALL: [Case; 4] = [
    Case {
        post: false,
        in_flight: 1,
    },
    Case {
        post: false,
        in_flight: 32,
    },
    Case {
        post: true,
        in_flight: 1,
    },
    Case {
        post: true,
        in_flight: 32,
    },
];
const GET32: [Case; 1] = [Case {
    post: false,
    in_flight: 32,
}];

// NOTE: never inlined: `benches/callgrind_e2e.sh` counts its calls, one
// per request.
#[inline(never)]
fn request(case: Case, uri: &str, n: usize, tenants: usize) -> Request<Full<Bytes>> {
    static PAYLOAD: OnceLock<Bytes> = OnceLock::new();
    let mut builder = Request::builder().uri(uri);
    if tenants > 0 {
        builder = builder.extension(tenant(n % tenants));
    }
    let body = if case.post {
        builder = builder.method(Method::POST);
        Full::new(
            PAYLOAD
                .get_or_init(|| Bytes::from(vec![b'x'; POST_BYTES]))
                .clone(),
        )
    } else {
        Full::default()
    };
    builder.body(body).expect("request")
}

fn tenant(i: usize) -> Tenant {
    static ALL_TENANTS: OnceLock<Vec<Tenant>> = OnceLock::new();
    ALL_TENANTS.get_or_init(|| {
        (0..TENANTS)
            .map(|i| Tenant::new(format!("seller-{i}")))
            .collect()
    })[i]
        .clone()
}

/// Sends `iters` requests through `service`, `case.in_flight` at a time,
/// reading every response to the end.
async fn drive<S, B>(service: S, case: Case, uri: &str, tenants: usize, iters: u64)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let counter = AtomicUsize::new(0);
    futures::stream::iter(0..iters)
        .map(|_| {
            let service = service.clone();
            let n = counter.fetch_add(1, Ordering::Relaxed);
            async move {
                let response = service
                    .oneshot(request(case, uri, n, tenants))
                    .await
                    .expect("response");
                assert_eq!(response.status(), StatusCode::OK);
                response.into_body().collect().await.expect("body");
            }
        })
        .buffer_unordered(case.in_flight)
        .collect::<()>()
        .await;
}

/// What a stack must show at set-up.
struct Expect {
    /// Distinct `Authorization` values the server sees in one round of
    /// `AUDIT_ROUND` requests (0: the stack sends none).
    authorizations: usize,
    /// The layer's token handles: no refresh, retry or wait once warm.
    handles: Box<dyn Fn() -> Vec<TokenHandle>>,
}

impl Expect {
    fn no_header() -> Self {
        Self::headers(0)
    }

    fn headers(authorizations: usize) -> Self {
        Expect {
            authorizations,
            handles: Box::new(Vec::new),
        }
    }

    fn handles(mut self, handles: impl Fn() -> Vec<TokenHandle> + 'static) -> Self {
        self.handles = Box::new(handles);
        self
    }

    /// Refreshes, retries and waits, summed over the handles.
    fn counts(&self) -> Counts {
        let mut sum = Counts::default();
        for stats in (self.handles)().iter().map(TokenHandle::stats) {
            sum.refreshes += stats.refreshes;
            sum.retries += stats.retries;
            sum.waited += stats.waited;
        }
        sum
    }
}

#[derive(Default, Debug, PartialEq, Eq, Clone, Copy)]
struct Counts {
    refreshes: u64,
    retries: u64,
    waited: u64,
}

impl std::ops::Sub for Counts {
    type Output = Counts;

    fn sub(self, earlier: Counts) -> Counts {
        Counts {
            refreshes: self.refreshes.saturating_sub(earlier.refreshes),
            retries: self.retries.saturating_sub(earlier.retries),
            waited: self.waited.saturating_sub(earlier.waited),
        }
    }
}

fn assert_warm(name: &str, when: &str, counts: Counts) {
    assert_eq!(
        counts,
        Counts::default(),
        "{name}: refreshes, retries and waits {when}"
    );
}

/// One request's response as the layer hands it back: the server's JSON
/// success, content type and body intact.
async fn check_response<S, B>(name: &str, service: S, uri: &str, tenants: usize)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let response = service
        .oneshot(request(GET32[0], uri, 0, tenants))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK, "{name}");
    assert_eq!(
        response.headers().get(CONTENT_TYPE),
        Some(&HeaderValue::from_static("application/json")),
        "{name}: the JSON success has the JSON content type"
    );
    let body = response.into_body().collect().await.expect("body");
    assert_eq!(body.to_bytes(), JSON_OK.as_bytes(), "{name}: body intact");
}

/// Measures one stack in one case: a fresh stack (its own pool), warmed
/// up, checked, then measured, then dropped (its connections closed).
fn run<S, B>(
    c: &mut Criterion,
    runtime: &tokio::runtime::Runtime,
    name: &str,
    case: Case,
    tenants: usize,
    (service, expect): (S, Expect),
) where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let uri = format!("http://{}{ITEMS_PATH}", server());
    // Warm the pool and the tokens (every tenant's) before measuring.
    runtime.block_on(drive(service.clone(), case, &uri, tenants, WARM_UP));

    // Set-up checks, once warm.
    let before = expect.counts();
    runtime.block_on(check_response(name, service.clone(), &uri, tenants));
    AUDIT.start();
    runtime.block_on(drive(service.clone(), case, &uri, tenants, AUDIT_ROUND));
    let seen = AUDIT.stop();
    assert_eq!(seen.requests, AUDIT_ROUND as usize, "{name}: server saw");
    assert_eq!(
        seen.authorizations.len(),
        expect.authorizations,
        "{name}: distinct Authorization values"
    );
    let without = if expect.authorizations == 0 {
        seen.requests
    } else {
        0
    };
    assert_eq!(seen.without_authorization, without, "{name}: no header");
    assert_warm(name, "once warm", expect.counts() - before);

    let before = expect.counts();
    c.benchmark_group("e2e_cpu")
        .bench_function(BenchmarkId::new(name, case.name()), |b| {
            b.iter_custom(|iters| {
                let start = ThreadTime::now();
                runtime.block_on(drive(service.clone(), case, &uri, tenants, iters));
                start.elapsed()
            })
        });
    c.benchmark_group("e2e_wall")
        .bench_function(BenchmarkId::new(name, case.name()), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                runtime.block_on(drive(service.clone(), case, &uri, tenants, iters));
                start.elapsed()
            })
        });
    assert_warm(name, "while measured", expect.counts() - before);
}

fn tower_http_stack() -> (impl ClientStack, Expect) {
    let service = ServiceBuilder::new()
        .layer(AddAuthorizationLayer::bearer(&token_string()))
        .service(client::<Full<Bytes>>());
    (service, Expect::headers(1))
}

fn tower_retry_stack() -> (impl ClientStack, Expect) {
    let service = ServiceBuilder::new()
        .layer(RetryLayer::new(RetryUnauthorizedOnce { left: 1 }))
        .layer(AddAuthorizationLayer::bearer(&token_string()))
        .service(client::<Full<Bytes>>());
    (service, Expect::headers(1))
}

fn ours_stack() -> (impl ClientStack, Expect) {
    let handle = handle();
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(ours_client());
    (
        service,
        Expect::headers(1).handles(move || vec![handle.clone()]),
    )
}

fn ours_json_stack(runtime: &tokio::runtime::Runtime) -> (impl ClientStack + use<>, Expect) {
    let handle = handle();
    let service = ServiceBuilder::new()
        .layer(
            AuthRefreshLayer::new(handle.clone())
                .detector(Unauthorized::new().or(JsonBodyRule::default_rules())),
        )
        .service(ours_client());
    // The rule reads bodies on this stack: a JSON "token expired" success
    // is taken for an expired token.
    let before = handle.stats();
    let expired = format!("http://{}{EXPIRED_PATH}", server());
    runtime.block_on(drive(service.clone(), GET32[0], &expired, 0, 1));
    let probe = handle.stats().since(&before);
    assert!(
        probe.retries + probe.skipped_retries > 0,
        "ours_json: the JSON rule saw the expired answer ({probe:?})"
    );
    (
        service,
        Expect::headers(1).handles(move || vec![handle.clone()]),
    )
}

fn tenants_stack(tenants: usize) -> (impl ClientStack, Expect) {
    let origin = Origin::parse(&format!("http://{}", server())).expect("origin");
    let registry = registry();
    let handles = registry.clone();
    let service = ServiceBuilder::new()
        .layer(AuthRoutingLayer::new().tenants(origin, registry))
        .service(ours_client());
    let expect = Expect::headers(tenants).handles(move || {
        (0..tenants)
            .map(|i| handles.get(tenant(i).as_str()))
            .collect()
    });
    (service, expect)
}

/// A stack around the hyper-util client.
trait ClientStack:
    Service<Request<Full<Bytes>>, Response = Response<Self::Body>, Error = Self::Failure> + Clone
{
    type Body: http_body::Body<Error = Self::BodyError>;
    type BodyError: std::fmt::Debug;
    type Failure: std::fmt::Debug;
}

impl<S, B> ClientStack for S
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    type Body = B;
    type BodyError = B::Error;
    type Failure = S::Error;
}

/// Builds a stack with `make` and measures it on a client runtime of its
/// own.
///
/// NOTE: a fresh runtime per stack: what a stack leaves behind (a peer's
/// refresh task and its timer) must not weigh on the next stack's polls.
/// A timer left in the wheel costs every later park a wheel scan and clock
/// reads (callgrind counted ~700 instructions per request).
fn measure<S, B>(
    c: &mut Criterion,
    name: &str,
    case: Case,
    tenants: usize,
    make: impl FnOnce(&tokio::runtime::Runtime) -> (S, Expect),
) where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    // `E2E_ONLY=stack/case` (set by `benches/callgrind_e2e.sh`) builds and
    // warms only that stack: a count of instructions must not include the
    // others' set-up.
    if std::env::var("E2E_ONLY").is_ok_and(|only| only != format!("{name}/{}", case.name())) {
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let _guard = runtime.enter();
    let stack = make(&runtime);
    run(c, &runtime, name, case, tenants, stack);
}

fn e2e(c: &mut Criterion) {
    // NOTE: case by case, every stack in turn, so that the figures a ratio
    // compares are measured seconds apart, not minutes (the machine's load
    // drifts).
    for case in ALL {
        measure(c, "bare", case, 0, |_| {
            (client::<Full<Bytes>>(), Expect::no_header())
        });
        measure(c, "tower_http_bearer", case, 0, |_| tower_http_stack());
        measure(c, "tower_retry_bearer", case, 0, |_| tower_retry_stack());
        measure(c, "middle", case, 0, middle_stack);
        measure(c, "aliri_tokens", case, 0, aliri_stack);
        measure(c, "ours", case, 0, |_| ours_stack());
        if case.name() == GET32[0].name() {
            measure(c, "ours_json", case, 0, ours_json_stack);
            measure(c, "tenants_1", case, 1, |_| tenants_stack(1));
            measure(c, "tenants_1000", case, TENANTS, |_| tenants_stack(TENANTS));
        }
    }
}

criterion_group!(benches, e2e);
criterion_main!(benches);
