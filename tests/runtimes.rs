//! A handle outlives the runtimes that use it: a handle kept in a `static`
//! and used from runtimes built and dropped in turn, a runtime dropped in
//! the middle of a refresh, a runtime without its time driver, a token set
//! from a plain thread. Whatever runtime calls next gets a working handle.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::routing::post;
use bytes::Bytes;
use common::{Upstream, body_text, client, get};
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use secrecy::ExposeSecret;
use tokio::runtime::{Builder, Runtime};
use tower::{Layer, ServiceExt, service_fn};
use tower_auth_refresh::{
    AuthRefreshLayer, BoxError, Lease, MemoryStore, RefreshContext, ReplayBody, StoreError,
    StoredToken, Token, TokenHandle, TokenStore, token_source_fn,
};

/// A runtime that outlives the test's runtimes: it runs the servers.
fn background() -> Runtime {
    Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn runtime() -> Runtime {
    Builder::new_current_thread().enable_all().build().unwrap()
}

/// A token endpoint on a real server: `POST /token` answers `tok-N` (and
/// tells the upstream to accept it), except the calls listed in `hang`,
/// which are never answered.
#[derive(Clone)]
struct TokenServer {
    url: String,
    calls: Arc<AtomicUsize>,
}

impl TokenServer {
    async fn start(upstream: &Upstream, hang: &'static [usize]) -> Self {
        let calls = Arc::new(AtomicUsize::new(0));
        let (counter, upstream) = (calls.clone(), upstream.clone());
        let app = axum::Router::new().route(
            "/token",
            post(move || {
                let (counter, upstream) = (counter.clone(), upstream.clone());
                async move {
                    let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                    if hang.contains(&n) {
                        std::future::pending::<()>().await;
                    }
                    let token = format!("tok-{n}");
                    upstream.accept(&token);
                    token
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, calls }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// A token source that asks this server, with a client of the caller's
    /// runtime.
    fn source(&self, lifetime: Duration) -> impl tower_auth_refresh::TokenSource {
        let url = self.url.clone();
        token_source_fn(move |_cx: RefreshContext| {
            let url = url.clone();
            async move {
                let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
                let request = http::Request::post(url).body(Full::default())?;
                let response = client.request(request).await?;
                let body = response.into_body().collect().await?.to_bytes();
                let name = String::from_utf8(body.to_vec())?;
                Ok::<_, BoxError>(Token::bearer(name).with_expires_in(lifetime))
            }
        })
    }
}

/// Polls `done` on the current runtime for at most 20 s.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn request_through(handle: &TokenHandle, url: &str) -> Result<String, BoxError> {
    let service = AuthRefreshLayer::new(handle.clone()).layer(client());
    let response = service.oneshot(get(url)).await?;
    assert_eq!(response.status(), 200);
    Ok(body_text(response).await.trim_end().to_owned())
}

#[test]
fn a_static_handle_survives_a_runtime_dropped_in_the_middle_of_a_refresh() {
    static HANDLE: OnceLock<TokenHandle> = OnceLock::new();
    let servers = background();
    let upstream = servers.block_on(Upstream::start());
    // The first token call hangs: its runtime is dropped while it waits.
    let tokens = servers.block_on(TokenServer::start(&upstream, &[1]));
    let handle = HANDLE.get_or_init(|| {
        TokenHandle::builder(tokens.source(Duration::from_secs(600)))
            .min_token_age(Duration::ZERO)
            .build()
    });

    let first = runtime();
    first.block_on(async {
        let url = upstream.url("/first");
        let waiting = tokio::spawn(async move { request_through(handle, &url).await });
        until("the first token call", || tokens.calls() == 1).await;
        assert!(!waiting.is_finished());
        assert!(handle.status().refreshing);
    });
    drop(first);
    assert!(
        !handle.status().refreshing,
        "the refresh went with its runtime"
    );

    // The next runtime starts a new refresh, on itself, at once.
    let second = runtime();
    let body = second
        .block_on(request_through(handle, &upstream.url("/second")))
        .expect("the request on the next runtime gets a token");
    assert_eq!(body, "ok tok-2");
    drop(second);

    // And the one after that can force a refresh.
    let third = runtime();
    let token = third.block_on(handle.refresh_now()).unwrap();
    assert_eq!(token.access_token().expose_secret(), "tok-3");
    drop(third);

    assert_eq!(tokens.calls(), 3);
    let stats = handle.stats();
    assert_eq!((stats.refreshes, stats.failures), (2, 0));
    assert!(!handle.status().refreshing);
}

#[test]
fn a_proactive_refresh_that_went_with_its_runtime_is_claimed_again() {
    let servers = background();
    let upstream = servers.block_on(Upstream::start());
    // The second call (the proactive refresh) hangs and its runtime is dropped.
    let tokens = servers.block_on(TokenServer::start(&upstream, &[2]));
    // 6 s tokens, refreshed ~3 s ahead (at most half the lifetime).
    let handle = TokenHandle::builder(tokens.source(Duration::from_secs(6)))
        .refresh_ahead(Duration::from_secs(60))
        .min_validity(Duration::ZERO)
        .build();

    let first = runtime();
    first.block_on(async {
        assert_eq!(
            request_through(&handle, &upstream.url("/a")).await.unwrap(),
            "ok tok-1"
        );
        // Into the refresh-ahead window: a request starts a refresh.
        for _ in 0..1000 {
            let body = request_through(&handle, &upstream.url("/b")).await.unwrap();
            assert_eq!(body, "ok tok-1");
            if tokens.calls() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(tokens.calls(), 2, "the proactive token call was made");
    });
    drop(first);

    // Still inside tok-1's lifetime: the next runtime's requests go out with
    // it and claim the proactive refresh again, which brings tok-3.
    let second = runtime();
    second.block_on(async {
        assert_eq!(
            request_through(&handle, &upstream.url("/c")).await.unwrap(),
            "ok tok-1"
        );
        until("the proactive refresh on this runtime", || {
            handle.status().generation == 2
        })
        .await;
        assert_eq!(
            request_through(&handle, &upstream.url("/d")).await.unwrap(),
            "ok tok-3"
        );
    });
    assert_eq!(tokens.calls(), 3);
    let stats = handle.stats();
    assert_eq!(
        (stats.waited_first_token, stats.waited),
        (1, 0),
        "only the very first request waited, for the first token"
    );
}

#[test]
fn the_freshness_timer_of_a_dropped_runtime_is_not_trusted() {
    let issued = Arc::new(AtomicUsize::new(0));
    let counter = issued.clone();
    let handle = TokenHandle::builder(token_source_fn(move |_cx: RefreshContext| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            Ok::<_, BoxError>(
                Token::bearer(format!("tok-{n}")).with_expires_in(Duration::from_millis(400)),
            )
        }
    }))
    .min_validity(Duration::ZERO)
    .build();
    let seen = Arc::new(Mutex::new(Vec::new()));

    // Installed on a runtime that is then dropped, with its timer.
    let first = runtime();
    first.block_on(handle.refresh_now()).unwrap();
    drop(first);
    std::thread::sleep(Duration::from_millis(600));

    // tok-1 expired meanwhile: it must not go out.
    let second = Builder::new_current_thread().enable_all().build().unwrap();
    second.block_on(async {
        let response = AuthRefreshLayer::new(handle.clone())
            .layer(recording(seen.clone()))
            .oneshot(http::Request::new(Full::default()))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    });
    assert_eq!(*seen.lock().unwrap(), ["Bearer tok-2"]);
    assert_eq!(issued.load(Ordering::SeqCst), 2);
    assert_eq!(handle.stats().waited, 1);
}

/// An in-process upstream that records the `Authorization` it gets.
fn recording(
    seen: Arc<Mutex<Vec<String>>>,
) -> impl tower::Service<
    http::Request<ReplayBody<Full<Bytes>>>,
    Response = http::Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    service_fn(move |req: http::Request<ReplayBody<Full<Bytes>>>| {
        let seen = seen.clone();
        async move {
            let auth = req.headers()["authorization"].to_str().unwrap().to_owned();
            seen.lock().unwrap().push(auth);
            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    })
}

#[test]
fn a_token_set_from_a_plain_thread_fails_fast_once_expired_after_a_failed_refresh() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let handle = TokenHandle::builder(token_source_fn(move |_cx: RefreshContext| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Err::<Token, BoxError>("token endpoint down".into()) }
    }))
    .refresh_ahead(Duration::from_secs(1))
    .min_validity(Duration::ZERO)
    .backoff(Duration::from_secs(60), Duration::from_secs(60))
    .build();

    // A 2 s token set outside any runtime: refreshed ahead from ~1 s, expired at 2 s.
    let setter = handle.clone();
    std::thread::spawn(move || {
        setter
            .set_token(Token::bearer("set-by-thread").with_expires_in(Duration::from_secs(2)))
            .unwrap()
    })
    .join()
    .unwrap();

    let seen = Arc::new(Mutex::new(Vec::new()));
    let paused = Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    paused.block_on(async {
        let service = AuthRefreshLayer::new(handle.clone()).layer(recording(seen.clone()));
        tokio::time::sleep(Duration::from_millis(1300)).await;
        // In the refresh-ahead window: sent, and a refresh starts (and fails).
        let response = service
            .clone()
            .oneshot(http::Request::new(Full::default()))
            .await;
        assert_eq!(response.unwrap().status(), 200);
        until("the failed proactive refresh", || {
            handle.status().consecutive_failures == 1
        })
        .await;

        // Expired: the request fails fast (back-off), without going out.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let response = service
            .clone()
            .oneshot(http::Request::new(Full::default()))
            .await;
        let err = response.expect_err("an expired token is not sent");
        assert!(err.to_string().contains("token endpoint down"), "{err}");
    });
    assert_eq!(*seen.lock().unwrap(), ["Bearer set-by-thread"]);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A store that panics on its first read, then works.
#[derive(Clone, Default)]
struct PanicsOnce {
    inner: MemoryStore,
    loads: Arc<AtomicUsize>,
}

impl TokenStore for PanicsOnce {
    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<StoredToken>, StoreError>> {
        if self.loads.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("store bug");
        }
        self.inner.load(key)
    }
    fn save<'a>(
        &'a self,
        key: &'a str,
        token: &'a Token,
        expected: Option<u64>,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        self.inner.save(key, token, expected)
    }
    fn delete<'a>(
        &'a self,
        key: &'a str,
        expected: Option<u64>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.delete(key, expected)
    }
    fn list_keys(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        self.inner.list_keys()
    }
    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Lease>, StoreError>> {
        self.inner.try_lock(key, ttl)
    }
    fn unlock(&self, lease: Lease) -> BoxFuture<'_, Result<(), StoreError>> {
        self.inner.unlock(lease)
    }
}

fn counting_source(calls: &Arc<AtomicUsize>) -> impl tower_auth_refresh::TokenSource {
    let counter = calls.clone();
    token_source_fn(move |_cx: RefreshContext| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move { Ok::<_, BoxError>(Token::bearer(format!("tok-{n}"))) }
    })
}

#[test]
fn a_runtime_without_timers_fails_one_refresh_and_wedges_nothing() {
    let calls = Arc::new(AtomicUsize::new(0));
    let handle = TokenHandle::new(counting_source(&calls));

    // A runtime without the time driver: the refresh cannot time itself.
    let no_timers = Builder::new_current_thread().build().unwrap();
    let err = no_timers.block_on(handle.refresh_now()).unwrap_err();
    assert!(err.to_string().contains("enable_time"), "{err}");
    drop(no_timers);
    assert!(!handle.status().refreshing);

    // A runtime with timers refreshes at once.
    let token = runtime().block_on(handle.refresh_now()).unwrap();
    assert_eq!(token.access_token().expose_secret(), "tok-1");
    assert_eq!(handle.stats().failures, 1);
}

#[test]
fn a_panicking_store_fails_one_refresh_as_a_panic_and_wedges_nothing() {
    let calls = Arc::new(AtomicUsize::new(0));
    let handle = TokenHandle::builder(counting_source(&calls))
        .store(PanicsOnce::default(), "key")
        .build();

    let rt = runtime();
    let err = rt.block_on(handle.refresh_now()).unwrap_err();
    assert!(err.to_string().contains("panicked"), "{err}");
    assert!(!err.to_string().contains("cancelled"), "{err}");
    assert!(!handle.status().refreshing);
    // The next refresh works (a manual one ignores the back-off).
    let token = rt.block_on(handle.refresh_now()).unwrap();
    assert_eq!(token.access_token().expose_secret(), "tok-1");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(handle.stats().failures, 1);
}
