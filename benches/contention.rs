//! The token read alone, under contention.
//!
//! Every mechanism does the same work per operation: read the current
//! `Authorization` value (a 900-byte bearer token) and insert it into a
//! `HeaderMap`. Measured with 1, 2, 4 and 8 OS threads (each thread does the
//! full iteration count; the time reported is per operation per thread, so a
//! flat line means perfect scaling) and with 64 and 1,024 tokio tasks on a
//! two-worker runtime.
//!
//! The `refcount` group isolates the cost of the shared reference count of a
//! `Bytes`-backed header value: every thread cloning one shared value (a
//! contended cache line) against each thread cloning its own copy and against
//! building a short header from bytes on every operation.

use std::hint::black_box;
use std::sync::{Arc, Barrier, Mutex, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::FutureExt;
use http::header::{AUTHORIZATION, HeaderValue};
use http::{HeaderMap, Request, Response};
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt};
use tower_auth_refresh::{AuthRefreshLayer, Token, TokenHandle, token_source_fn};

const THREADS: [usize; 4] = [1, 2, 4, 8];
const TASKS: [usize; 2] = [64, 1024];

fn token_header() -> HeaderValue {
    let token = "a".repeat(900);
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
    value.set_sensitive(true);
    value
}

/// One way of sharing the current header between threads.
trait Cell: Send + Sync + 'static {
    fn read_into(&self, headers: &mut HeaderMap);
}

struct ArcSwapCell(ArcSwap<HeaderValue>);
impl Cell for ArcSwapCell {
    fn read_into(&self, headers: &mut HeaderMap) {
        let guard = self.0.load();
        headers.insert(AUTHORIZATION, HeaderValue::clone(&guard));
    }
}

struct StdRwLockCell(RwLock<Arc<HeaderValue>>);
impl Cell for StdRwLockCell {
    fn read_into(&self, headers: &mut HeaderMap) {
        let value = Arc::clone(&self.0.read().unwrap());
        headers.insert(AUTHORIZATION, HeaderValue::clone(&value));
    }
}

struct MutexCell(Mutex<Arc<HeaderValue>>);
impl Cell for MutexCell {
    fn read_into(&self, headers: &mut HeaderMap) {
        let value = Arc::clone(&self.0.lock().unwrap());
        headers.insert(AUTHORIZATION, HeaderValue::clone(&value));
    }
}

/// `tokio::sync::RwLock` read without a writer never waits, so `try_read`
/// measures its semaphore without needing a runtime on plain threads.
struct TokioRwLockCell(tokio::sync::RwLock<Arc<HeaderValue>>);
impl Cell for TokioRwLockCell {
    fn read_into(&self, headers: &mut HeaderMap) {
        let value = Arc::clone(&self.0.try_read().unwrap());
        headers.insert(AUTHORIZATION, HeaderValue::clone(&value));
    }
}

struct WatchCell(tokio::sync::watch::Receiver<Arc<HeaderValue>>);
impl Cell for WatchCell {
    fn read_into(&self, headers: &mut HeaderMap) {
        let value = Arc::clone(&self.0.borrow());
        headers.insert(AUTHORIZATION, HeaderValue::clone(&value));
    }
}

fn cells() -> Vec<(&'static str, Arc<dyn Cell>)> {
    let value = token_header();
    let (_sender, rx) = tokio::sync::watch::channel(Arc::new(value.clone()));
    vec![
        (
            "arc_swap_ours",
            Arc::new(ArcSwapCell(ArcSwap::from_pointee(value.clone()))),
        ),
        (
            "std_rwlock",
            Arc::new(StdRwLockCell(RwLock::new(Arc::new(value.clone())))),
        ),
        (
            "std_mutex",
            Arc::new(MutexCell(Mutex::new(Arc::new(value.clone())))),
        ),
        (
            "tokio_rwlock",
            Arc::new(TokioRwLockCell(tokio::sync::RwLock::new(Arc::new(value)))),
        ),
        ("tokio_watch", Arc::new(WatchCell(rx))),
    ]
}

/// Runs `op` `iters` times on each of `threads` threads at once and returns
/// the wall time: the time per iteration is then per operation per thread.
fn on_threads(
    threads: usize,
    iters: u64,
    op: Arc<dyn Fn(&mut HeaderMap) + Send + Sync>,
) -> Duration {
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let barrier = barrier.clone();
            let op = op.clone();
            std::thread::spawn(move || {
                let mut headers = HeaderMap::with_capacity(4);
                barrier.wait();
                for _ in 0..iters {
                    op(&mut headers);
                    black_box(&headers);
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for handle in handles {
        handle.join().unwrap();
    }
    start.elapsed()
}

fn read_on_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("contention/threads");
    group.throughput(Throughput::Elements(1));
    for (name, cell) in cells() {
        for threads in THREADS {
            let cell = cell.clone();
            group.bench_with_input(BenchmarkId::new(name, threads), &threads, |b, &threads| {
                let cell = cell.clone();
                b.iter_custom(move |iters| {
                    let cell = cell.clone();
                    on_threads(
                        threads,
                        iters,
                        Arc::new(move |h: &mut HeaderMap| cell.read_into(h)),
                    )
                });
            });
        }
    }
    group.finish();
}

fn read_on_tasks(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let mut group = c.benchmark_group("contention/tasks");
    group.throughput(Throughput::Elements(1));
    for (name, cell) in cells() {
        for tasks in TASKS {
            let cell = cell.clone();
            group.bench_with_input(BenchmarkId::new(name, tasks), &tasks, |b, &tasks| {
                b.iter_custom(|iters| {
                    let per_task = iters.div_ceil(tasks as u64);
                    runtime.block_on(async {
                        let start = Instant::now();
                        let handles: Vec<_> = (0..tasks)
                            .map(|_| {
                                let cell = cell.clone();
                                tokio::spawn(async move {
                                    let mut headers = HeaderMap::with_capacity(4);
                                    for i in 0..per_task {
                                        cell.read_into(&mut headers);
                                        black_box(&headers);
                                        if i % 64 == 63 {
                                            tokio::task::yield_now().await;
                                        }
                                    }
                                })
                            })
                            .collect();
                        for handle in handles {
                            handle.await.unwrap();
                        }
                        // Normalise to `iters` operations.
                        start
                            .elapsed()
                            .mul_f64(iters as f64 / (per_task * tasks as u64) as f64)
                    })
                });
            });
        }
    }
    group.finish();
}

fn refcount(c: &mut Criterion) {
    let mut group = c.benchmark_group("contention/refcount");
    group.throughput(Throughput::Elements(1));
    let shared = token_header();
    let short = b"Bearer 0123456789abcdef0123456789abcdef";
    for threads in [1, 2] {
        let value = shared.clone();
        group.bench_with_input(
            BenchmarkId::new("clone_shared_bytes", threads),
            &threads,
            |b, &threads| {
                let value = value.clone();
                b.iter_custom(move |iters| {
                    let value = value.clone();
                    on_threads(
                        threads,
                        iters,
                        Arc::new(move |h: &mut HeaderMap| {
                            h.insert(AUTHORIZATION, value.clone());
                        }),
                    )
                });
            },
        );
        group.bench_with_input(
            BenchmarkId::new("clone_per_thread_copy", threads),
            &threads,
            |b, &threads| {
                b.iter_custom(move |iters| {
                    // Each thread clones a value no other thread touches.
                    let barrier = Arc::new(Barrier::new(threads + 1));
                    let handles: Vec<_> = (0..threads)
                        .map(|_| {
                            let barrier = barrier.clone();
                            std::thread::spawn(move || {
                                let own = token_header();
                                let mut headers = HeaderMap::with_capacity(4);
                                barrier.wait();
                                for _ in 0..iters {
                                    headers.insert(AUTHORIZATION, own.clone());
                                    black_box(&headers);
                                }
                            })
                        })
                        .collect();
                    barrier.wait();
                    let start = Instant::now();
                    for handle in handles {
                        handle.join().unwrap();
                    }
                    start.elapsed()
                });
            },
        );
        group.bench_with_input(
            BenchmarkId::new("copy_short_header", threads),
            &threads,
            |b, &threads| {
                b.iter_custom(move |iters| {
                    on_threads(
                        threads,
                        iters,
                        Arc::new(move |h: &mut HeaderMap| {
                            h.insert(AUTHORIZATION, HeaderValue::from_bytes(short).unwrap());
                        }),
                    )
                });
            },
        );
        group.bench_with_input(
            BenchmarkId::new("static_header", threads),
            &threads,
            |b, &threads| {
                b.iter_custom(move |iters| {
                    on_threads(
                        threads,
                        iters,
                        Arc::new(move |h: &mut HeaderMap| {
                            h.insert(
                                AUTHORIZATION,
                                HeaderValue::from_static("Bearer 0123456789abcdef"),
                            );
                        }),
                    )
                });
            },
        );
    }
    group.finish();
}

/// An inner service that answers at once and keeps the request's
/// `Authorization` header alive until the answer is dropped, as a client
/// would.
#[derive(Clone, Copy)]
struct Answer;

impl<B> Service<Request<B>> for Answer {
    type Response = Response<Full<Bytes>>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        black_box(request.headers().get(AUTHORIZATION));
        std::future::ready(Ok(Response::new(Full::default())))
    }
}

/// Runs `iters` requests through a clone of `service` on each of `threads`
/// threads at once; the wall time.
fn requests_on_threads<S>(threads: usize, iters: u64, service: &S) -> Duration
where
    S: Service<Request<Full<Bytes>>> + Clone + Send + 'static,
    S::Error: std::fmt::Debug,
{
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let barrier = barrier.clone();
            let mut service = service.clone();
            std::thread::spawn(move || {
                barrier.wait();
                for _ in 0..iters {
                    let request = Request::get("http://api.test/v1/items")
                        .body(Full::default())
                        .unwrap();
                    let response = service
                        .ready()
                        .now_or_never()
                        .expect("ready")
                        .unwrap()
                        .call(request)
                        .now_or_never()
                        .expect("answered")
                        .unwrap();
                    black_box(response);
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for handle in handles {
        handle.join().unwrap();
    }
    start.elapsed()
}

/// The whole layer, one shared token, 1 and 2 threads: does the real request
/// path scale like the floor (tower-http's static header)?
fn layer_on_threads(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let token = || Token::bearer("a".repeat(900)).with_expires_in(Duration::from_secs(3600));
    let handle = TokenHandle::builder(token_source_fn(move |_| async move {
        Ok::<_, std::convert::Infallible>(token())
    }))
    .initial_token(token())
    .build();
    let ours = AuthRefreshLayer::new(handle).layer(Answer);
    let floor = tower_http::auth::AddAuthorizationLayer::bearer(&"a".repeat(900))
        .as_sensitive(true)
        .layer(Answer);

    let mut group = c.benchmark_group("contention/layer");
    group.throughput(Throughput::Elements(1));
    for threads in [1, 2] {
        group.bench_with_input(
            BenchmarkId::new("ours", threads),
            &threads,
            |b, &threads| {
                b.iter_custom(|iters| requests_on_threads(threads, iters, &ours));
            },
        );
        group.bench_with_input(
            BenchmarkId::new("tower_http_bearer", threads),
            &threads,
            |b, &threads| {
                b.iter_custom(|iters| requests_on_threads(threads, iters, &floor));
            },
        );
    }
    group.finish();
}

/// Runs `iters` requests on each of `threads` threads, each thread taking
/// the services in turn (one token each); the wall time.
fn requests_round_robin<S>(threads: usize, iters: u64, services: &[S]) -> Duration
where
    S: Service<Request<Full<Bytes>>> + Clone + Send + 'static,
    S::Error: std::fmt::Debug,
{
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let barrier = barrier.clone();
            let mut services = services.to_vec();
            std::thread::spawn(move || {
                barrier.wait();
                let count = services.len();
                for i in 0..iters {
                    let service = &mut services[i as usize % count];
                    let request = Request::get("http://api.test/v1/items")
                        .body(Full::default())
                        .unwrap();
                    let response = service
                        .ready()
                        .now_or_never()
                        .expect("ready")
                        .unwrap()
                        .call(request)
                        .now_or_never()
                        .expect("answered")
                        .unwrap();
                    black_box(response);
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for handle in handles {
        handle.join().unwrap();
    }
    start.elapsed()
}

/// The whole layer with 1, 4, 5 and 8 tokens used in turn by each of 2
/// threads (a tenant registry), against the floor with as many static
/// headers: the per-request time must not grow with the number of tokens.
fn tokens_per_thread(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let mut group = c.benchmark_group("contention/tokens_per_thread");
    group.throughput(Throughput::Elements(1));
    for tokens in [1usize, 4, 5, 8] {
        let ours: Vec<_> = (0..tokens)
            .map(|i| {
                let token = move || {
                    Token::bearer(format!("{i}{}", "a".repeat(900)))
                        .with_expires_in(Duration::from_secs(3600))
                };
                let handle = TokenHandle::builder(token_source_fn(move |_| async move {
                    Ok::<_, std::convert::Infallible>(token())
                }))
                .initial_token(token())
                .build();
                AuthRefreshLayer::new(handle).layer(Answer)
            })
            .collect();
        let floor: Vec<_> = (0..tokens)
            .map(|i| {
                tower_http::auth::AddAuthorizationLayer::bearer(&format!("{i}{}", "a".repeat(900)))
                    .as_sensitive(true)
                    .layer(Answer)
            })
            .collect();
        group.bench_with_input(BenchmarkId::new("ours", tokens), &tokens, |b, _| {
            b.iter_custom(|iters| requests_round_robin(2, iters, &ours));
        });
        group.bench_with_input(
            BenchmarkId::new("tower_http_bearer", tokens),
            &tokens,
            |b, _| {
                b.iter_custom(|iters| requests_round_robin(2, iters, &floor));
            },
        );
    }
    group.finish();
}

criterion_group!(
    benches,
    read_on_threads,
    read_on_tasks,
    refcount,
    layer_on_threads,
    tokens_per_thread
);
criterion_main!(benches);
