//! Request bodies of 1 KiB, 64 KiB and 1 MiB streamed in 8 KiB chunks.
//!
//! Three ways to send them: `no_replay` (the layer with replay off: the body
//! is passed through), `ours_tee` (the layer's replay body, which streams each
//! chunk on and keeps a cheap reference to it), and `collect_then_send` (a
//! wrapper that buffers the whole body before calling the inner service, the
//! usual way to make a request retryable).
//!
//! Two figures per case: `first_byte`, the time from the call until the
//! first chunk reaches the inner service, and `total`, the time until the
//! inner service has read the last chunk.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::FutureExt;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use tower::{Layer, Service, ServiceExt};
use tower_auth_refresh::{AuthRefreshLayer, Token, TokenHandle, token_source_fn};

const CHUNK: usize = 8 * 1024;
const SIZES: [(&str, usize); 3] = [("1KiB", 1024), ("64KiB", 64 * 1024), ("1MiB", 1024 * 1024)];

type Chunks =
    StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

fn chunked(size: usize) -> Chunks {
    let data = Bytes::from(vec![b'x'; size]);
    let frames: Vec<_> = (0..size)
        .step_by(CHUNK)
        .map(|at| Ok(Frame::data(data.slice(at..(at + CHUNK).min(size)))))
        .collect();
    StreamBody::new(futures::stream::iter(frames))
}

/// When the inner service saw the first and the last byte.
#[derive(Default)]
struct Marks {
    first: Option<Instant>,
    last: Option<Instant>,
}

/// The inner service: reads the body, noting when the first and last bytes
/// arrive.
#[derive(Clone)]
struct Recorder(Arc<Mutex<Marks>>);

impl<B> Service<Request<B>> for Recorder
where
    B: Body + Unpin,
    B::Error: std::fmt::Debug,
{
    type Response = Response<Empty<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let mut body = request.into_body();
        let mut marks = self.0.lock().unwrap();
        while let Some(frame) = body.frame().now_or_never().expect("chunks are ready") {
            frame.unwrap();
            marks.first.get_or_insert_with(Instant::now);
        }
        marks.last = Some(Instant::now());
        Box::pin(async { Ok(Response::new(Empty::new())) })
    }
}

/// Buffers the whole request body, then calls the inner service.
#[derive(Clone)]
struct CollectThenSend<S>(S);

impl<S, B> Service<Request<B>> for CollectThenSend<S>
where
    S: Service<Request<Full<Bytes>>>,
    B: Body + Unpin,
    B::Error: std::fmt::Debug,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> S::Future {
        let (parts, body) = request.into_parts();
        let bytes = body
            .collect()
            .now_or_never()
            .expect("chunks are ready")
            .unwrap()
            .to_bytes();
        self.0.call(Request::from_parts(parts, Full::new(bytes)))
    }
}

fn handle() -> TokenHandle {
    TokenHandle::builder(token_source_fn(|_| async {
        Ok::<_, Infallible>(Token::bearer("t").with_expires_in(Duration::from_secs(3600)))
    }))
    .initial_token(
        Token::bearer("t").with_expires_at(SystemTime::now() + Duration::from_secs(3600)),
    )
    .build()
}

/// Sends one body and returns (time to first byte, total time).
fn measure<S>(service: &mut S, marks: &Mutex<Marks>, size: usize) -> (Duration, Duration)
where
    S: Service<Request<Chunks>>,
    S::Error: std::fmt::Debug,
{
    *marks.lock().unwrap() = Marks::default();
    let request = Request::new(chunked(size));
    let start = Instant::now();
    let response = service
        .ready()
        .now_or_never()
        .expect("ready")
        .unwrap()
        .call(request)
        .now_or_never()
        .expect("response");
    drop(response.unwrap());
    let marks = marks.lock().unwrap();
    (marks.first.unwrap() - start, marks.last.unwrap() - start)
}

fn replay(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let handle = handle();

    for (figure, pick) in [
        (
            "first_byte",
            (|m: (Duration, Duration)| m.0) as fn((Duration, Duration)) -> Duration,
        ),
        ("total", |m: (Duration, Duration)| m.1),
    ] {
        let mut group = c.benchmark_group(format!("replay/{figure}"));
        for (label, size) in SIZES {
            group.throughput(Throughput::Bytes(size as u64));
            let marks = Arc::new(Mutex::new(Marks::default()));
            let recorder = Recorder(marks.clone());

            let mut no_replay = AuthRefreshLayer::new(handle.clone())
                .max_replay_bytes(0)
                .layer(recorder.clone());
            group.bench_with_input(BenchmarkId::new("no_replay", label), &size, |b, &size| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| pick(measure(&mut no_replay, &marks, size)))
                        .sum()
                })
            });

            let mut tee = AuthRefreshLayer::new(handle.clone())
                .max_replay_bytes(2 * 1024 * 1024)
                .layer(recorder.clone());
            group.bench_with_input(BenchmarkId::new("ours_tee", label), &size, |b, &size| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| pick(measure(&mut tee, &marks, size)))
                        .sum()
                })
            });

            let mut collect = CollectThenSend(
                AuthRefreshLayer::new(handle.clone())
                    .max_replay_bytes(2 * 1024 * 1024)
                    .layer(recorder.clone()),
            );
            group.bench_with_input(
                BenchmarkId::new("collect_then_send", label),
                &size,
                |b, &size| {
                    b.iter_custom(|iters| {
                        (0..iters)
                            .map(|_| pick(measure(&mut collect, &marks, size)))
                            .sum()
                    })
                },
            );
        }
        group.finish();
    }
}

criterion_group!(benches, replay);
criterion_main!(benches);
