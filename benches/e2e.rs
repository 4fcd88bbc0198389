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
//! - `ours`: `AuthRefreshLayer` with the default detector;
//! - `ours_json`: `AuthRefreshLayer` with `Unauthorized` or the JSON body
//!   rule, on a 68-byte JSON success;
//! - `tenants_1` / `tenants_1000`: `AuthRoutingLayer` over a `TokenRegistry`,
//!   requests spread round-robin over 1 or 1,000 tenants.
//!
//! Cases: GET and a 4 KiB POST, with 1 and 32 requests in flight.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cpu_time::ThreadTime;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use futures::StreamExt;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::retry::{Policy, RetryLayer};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_auth_refresh::{
    AuthRefreshLayer, AuthRoutingLayer, ExpiryDetectorExt, JsonBodyRule, MemoryStore, Origin,
    ReplayBody, Tenant, Token, TokenHandle, TokenRegistry, Unauthorized, token_source_fn,
};
use tower_http::auth::AddAuthorizationLayer;

const JSON_OK: &str = r#"{"code":0,"msg":"ok","data":{"id":42,"name":"widget","price":1999}}"#;
const POST_BYTES: usize = 4096;

fn token_string() -> String {
    "a".repeat(900)
}

/// The upstream: a hyper server on its own thread and runtime, answering
/// every request (after draining its body) with a short JSON success.
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
    let _ = request.into_body().collect().await;
    let mut response = Response::new(Full::new(Bytes::from_static(JSON_OK.as_bytes())));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
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
    static TENANTS: OnceLock<Vec<Tenant>> = OnceLock::new();
    TENANTS.get_or_init(|| {
        (0..1000)
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

fn ours_client() -> Client<HttpConnector, ReplayBody<Full<Bytes>>> {
    client()
}

fn e2e(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let all = [
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
    let get32 = [Case {
        post: false,
        in_flight: 32,
    }];
    let _guard = runtime.enter();

    let bare = client::<Full<Bytes>>();
    let tower_http = ServiceBuilder::new()
        .layer(AddAuthorizationLayer::bearer(&token_string()))
        .service(client::<Full<Bytes>>());
    let tower_retry = ServiceBuilder::new()
        .layer(RetryLayer::new(RetryUnauthorizedOnce { left: 1 }))
        .layer(AddAuthorizationLayer::bearer(&token_string()))
        .service(client::<Full<Bytes>>());
    let ours = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle()))
        .service(ours_client());
    let ours_json = ServiceBuilder::new()
        .layer(
            AuthRefreshLayer::new(handle())
                .detector(Unauthorized::new().or(JsonBodyRule::default_rules())),
        )
        .service(ours_client());
    let origin = Origin::parse(&format!("http://{}", server())).expect("origin");
    let registry = || {
        TokenRegistry::builder(MemoryStore::new(), |_tenant: &str| {
            token_source_fn(|_| async {
                Ok::<_, Infallible>(
                    Token::bearer(token_string()).with_expires_in(Duration::from_secs(3600)),
                )
            })
        })
        .build()
    };
    let tenants = ServiceBuilder::new()
        .layer(AuthRoutingLayer::new().tenants(origin.clone(), registry()))
        .service(ours_client());

    run_all(c, &runtime, "bare", &bare, &all, 0);
    run_all(c, &runtime, "tower_http_bearer", &tower_http, &all, 0);
    run_all(c, &runtime, "tower_retry_bearer", &tower_retry, &all, 0);
    run_all(c, &runtime, "ours", &ours, &all, 0);
    run_all(c, &runtime, "ours_json", &ours_json, &get32, 0);
    run_all(c, &runtime, "tenants_1", &tenants, &get32, 1);
    run_all(c, &runtime, "tenants_1000", &tenants, &get32, 1000);
}

fn run_all<S, B>(
    c: &mut Criterion,
    runtime: &tokio::runtime::Runtime,
    name: &str,
    service: &S,
    cases: &[Case],
    tenants: usize,
) where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let uri = format!("http://{}/v1/items", server());
    for &case in cases {
        // Warm the pool and the tokens (every tenant's) before measuring.
        runtime.block_on(drive(service.clone(), case, &uri, tenants, 2000));
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
    }
}

criterion_group!(benches, e2e);
criterion_main!(benches);
