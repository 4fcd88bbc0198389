//! N concurrent requests hit an expired token; the token source takes 5 ms.
//!
//! Measured: the wall time of the whole burst, and the number of token-source
//! calls (printed once per N; the target is exactly 1 at every N).
//!
//! - `ours`: `AuthRefreshLayer` over a no-op inner service;
//! - `naive_mutex`: every request that saw the expired token refreshes while
//!   holding a `tokio::sync::Mutex` (N calls, serialised: N × 5 ms, so it is
//!   measured up to N = 100 only);
//! - `aws_smithy_expiring_cache`: `aws-smithy-runtime`'s `ExpiringCache`
//!   (`yield_or_clear_if_expired` then `get_or_load`), the cache the AWS SDK
//!   uses for credentials.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, ServiceExt};
use tower_auth_refresh::{AuthRefreshLayer, Token, TokenHandle, token_source_fn};

const SIZES: [usize; 4] = [10, 100, 1_000, 10_000];
const NAIVE_SIZES: [usize; 2] = [10, 100];
const SOURCE_LATENCY: Duration = Duration::from_millis(5);

fn ours_burst(runtime: &tokio::runtime::Runtime, n: usize) -> (Duration, usize) {
    runtime.block_on(async {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let handle = TokenHandle::builder(token_source_fn(move |_| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(SOURCE_LATENCY).await;
                Ok::<_, Infallible>(
                    Token::bearer("fresh").with_expires_in(Duration::from_secs(3600)),
                )
            }
        }))
        .initial_token(
            Token::bearer("stale").with_expires_at(SystemTime::now() - Duration::from_secs(1)),
        )
        .build();
        let service =
            AuthRefreshLayer::new(handle).layer(tower::service_fn(|_: Request<_>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            }));
        let start = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let service = service.clone();
                tokio::spawn(async move {
                    let request = Request::new(Full::new(Bytes::new()));
                    service.oneshot(request).await.unwrap()
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        (start.elapsed(), calls.load(Ordering::SeqCst))
    })
}

fn naive_burst(runtime: &tokio::runtime::Runtime, n: usize) -> (Duration, usize) {
    runtime.block_on(async {
        let calls = Arc::new(AtomicUsize::new(0));
        let token = Arc::new(tokio::sync::Mutex::new(
            SystemTime::now() - Duration::from_secs(1),
        ));
        let start = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let token = token.clone();
                let calls = calls.clone();
                tokio::spawn(async move {
                    // The request saw an expired token: it refreshes.
                    let mut expires_at = token.lock().await;
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(SOURCE_LATENCY).await;
                    *expires_at = SystemTime::now() + Duration::from_secs(3600);
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        (start.elapsed(), calls.load(Ordering::SeqCst))
    })
}

fn smithy_burst(runtime: &tokio::runtime::Runtime, n: usize) -> (Duration, usize) {
    use aws_smithy_runtime::expiring_cache::ExpiringCache;
    runtime.block_on(async {
        let calls = Arc::new(AtomicUsize::new(0));
        let cache: ExpiringCache<String, Infallible> = ExpiringCache::new(Duration::from_secs(10));
        let start = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let cache = cache.clone();
                let calls = calls.clone();
                tokio::spawn(async move {
                    if let Some(token) = cache.yield_or_clear_if_expired(SystemTime::now()).await {
                        return token;
                    }
                    cache
                        .get_or_load(|| async {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(SOURCE_LATENCY).await;
                            Ok((
                                "fresh".to_owned(),
                                SystemTime::now() + Duration::from_secs(3600),
                            ))
                        })
                        .await
                        .unwrap()
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        (start.elapsed(), calls.load(Ordering::SeqCst))
    })
}

type Burst = fn(&tokio::runtime::Runtime, usize) -> (Duration, usize);

fn stampede(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("stampede");
    group.sample_size(10);
    let variants: [(&str, Burst, &[usize]); 3] = [
        ("ours", ours_burst, &SIZES),
        ("aws_smithy_expiring_cache", smithy_burst, &SIZES),
        ("naive_mutex", naive_burst, &NAIVE_SIZES),
    ];
    for (name, burst, sizes) in variants {
        for &n in sizes {
            let (_, calls) = burst(&runtime, n);
            println!("stampede calls: {name} n={n} token_source_calls={calls}");
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, &n| {
                b.iter_custom(|iters| (0..iters).map(|_| burst(&runtime, n).0).sum());
            });
        }
    }
    group.finish();
}

criterion_group!(benches, stampede);
criterion_main!(benches);
