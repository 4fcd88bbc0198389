//! Time to first byte of a streamed JSON response, through the layer and
//! without it.
//!
//! A real HTTP/1.1 server on 127.0.0.1 answers each request with a chunked
//! body that sends one event at once and then stays open (a watch). One
//! iteration sends a request with a hyper-util client and waits for the
//! first data frame of the response body; the body is then dropped.
//!
//! - `direct/*`: the client alone (the upstream's time to first byte);
//! - `layer/*`: `AuthRefreshLayer` with `Unauthorized.or(JsonBodyRule)` in
//!   front of the same client;
//! - `*/watch`: `application/json;stream=watch`, never read by a detector;
//! - `*/json`: plain `application/json` of unknown length, which the JSON
//!   rule asks for: the layer waits up to its peek deadline (default 5 ms)
//!   for the body to end, then passes it on.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::body::Body as AxumBody;
use axum::response::IntoResponse;
use axum::routing::get;
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use futures::StreamExt;
use http::Request;
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_auth_refresh::{
    AuthRefreshLayer, BoxError, ExpiryDetectorExt, JsonBodyRule, ReplayBody, Token, TokenHandle,
    Unauthorized, token_source_fn,
};

const EVENT: &str = "{\"type\":\"ADDED\",\"object\":{\"kind\":\"Pod\",\"name\":\"web-1\"}}\n";

/// A body that sends one event, then stays open until the client leaves.
fn watch_body() -> AxumBody {
    let first =
        futures::stream::once(async { Ok::<_, Infallible>(Bytes::from_static(EVENT.as_bytes())) });
    AxumBody::from_stream(first.chain(futures::stream::pending()))
}

async fn start_server() -> String {
    let app = Router::new()
        .route(
            "/watch",
            get(|| async {
                (
                    [("content-type", "application/json;stream=watch")],
                    watch_body(),
                )
                    .into_response()
            }),
        )
        .route(
            "/json",
            get(|| async {
                ([("content-type", "application/json")], watch_body()).into_response()
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// Sends a GET and waits for the first data frame.
async fn first_byte<S, ReqB, ResB>(service: &S, url: &str, body: impl Fn() -> ReqB)
where
    S: Service<Request<ReqB>, Response = http::Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    ResB: Body + Unpin,
    ResB::Error: std::fmt::Debug,
{
    let request = Request::get(url).body(body()).unwrap();
    let response = service
        .clone()
        .oneshot(request)
        .await
        .map_err(Into::into)
        .unwrap();
    let mut body = response.into_body();
    loop {
        let frame = body.frame().await.expect("an event").unwrap();
        if frame.is_data() {
            return;
        }
    }
}

fn first_byte_bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let base = rt.block_on(start_server());
    let direct: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let handle = TokenHandle::new(token_source_fn(|_| async {
        Ok::<_, Infallible>(Token::bearer("t").with_expires_in(Duration::from_secs(3600)))
    }));
    rt.block_on(handle.refresh_now()).unwrap();
    let inner: Client<HttpConnector, ReplayBody<Full<Bytes>>> =
        Client::builder(TokioExecutor::new()).build_http();
    let layered = ServiceBuilder::new()
        .layer(
            AuthRefreshLayer::new(handle)
                .detector(Unauthorized::new().or(JsonBodyRule::default_rules())),
        )
        .service(inner);

    let mut group = c.benchmark_group("first_byte");
    group.sample_size(30);
    for path in ["watch", "json"] {
        let url = format!("{base}/{path}");
        group.bench_with_input(BenchmarkId::new("direct", path), &url, |b, url| {
            b.to_async(&rt)
                .iter(|| first_byte(&direct, url, Full::default));
        });
        group.bench_with_input(BenchmarkId::new("layer", path), &url, |b, url| {
            b.to_async(&rt)
                .iter(|| first_byte(&layered, url, Full::default));
        });
    }
    group.finish();
}

criterion_group!(benches, first_byte_bench);
criterion_main!(benches);
