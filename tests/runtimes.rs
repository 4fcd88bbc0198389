//! A handle outlives the runtimes that use it: a handle kept in a `static`
//! and used from runtimes built and dropped in turn, a runtime dropped in
//! the middle of a refresh, a runtime kept but idle (a sync wrapper that
//! calls `block_on` per request), a runtime without its time driver, a
//! token set from a plain thread. Refreshes and freshness timers run on the
//! crate's own runtime: whatever runtime calls next gets a working handle,
//! and no refresh answer is lost with a runtime.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::routing::post;
use bytes::Bytes;
use common::{Issuer, Upstream, body_text, client, get};
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
/// tells the upstream to accept it); the calls listed in `held` are
/// answered only once the test calls `release`.
#[derive(Clone)]
struct TokenServer {
    url: String,
    calls: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::Semaphore>,
}

impl TokenServer {
    async fn start(upstream: &Upstream, held: &'static [usize]) -> Self {
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (counter, upstream, held_calls) = (calls.clone(), upstream.clone(), gate.clone());
        let app = axum::Router::new().route(
            "/token",
            post(move || {
                let (counter, upstream, gate) =
                    (counter.clone(), upstream.clone(), held_calls.clone());
                async move {
                    let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                    if held.contains(&n) {
                        gate.acquire().await.unwrap().forget();
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
        Self { url, calls, gate }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Answers one held call.
    fn release(&self) {
        self.gate.add_permits(1);
    }

    /// A token source that asks this server, with a client made where the
    /// refresh runs.
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

/// A refresh does not go with the runtime that started it: its answer is
/// installed after that runtime was dropped, and the next runtime uses it
/// without another token call.
#[test]
fn a_static_handle_keeps_the_answer_of_a_refresh_whose_runtime_was_dropped() {
    static HANDLE: OnceLock<TokenHandle> = OnceLock::new();
    let servers = background();
    let upstream = servers.block_on(Upstream::start());
    // The first token call is held until the runtime that asked is gone.
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
        handle.status().refreshing,
        "the refresh did not go with its runtime"
    );
    tokens.release();

    // The next runtime gets the answer of that refresh.
    let second = runtime();
    let body = second
        .block_on(request_through(handle, &upstream.url("/second")))
        .expect("the request on the next runtime gets a token");
    assert_eq!(body, "ok tok-1");
    drop(second);

    // And the one after that can force a refresh.
    let third = runtime();
    let token = third.block_on(handle.refresh_now()).unwrap();
    assert_eq!(token.access_token().expose_secret(), "tok-2");
    drop(third);

    assert_eq!(tokens.calls(), 2);
    let stats = handle.stats();
    assert_eq!((stats.refreshes, stats.failures), (2, 0));
    assert!(!handle.status().refreshing);
}

/// A proactive refresh started at the end of a call on a runtime that is
/// then dropped still installs its token.
#[test]
fn a_proactive_refresh_outlives_the_runtime_that_started_it() {
    let servers = background();
    let upstream = servers.block_on(Upstream::start());
    // The second call (the proactive refresh) is held while its runtime is dropped.
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
    assert!(
        handle.status().refreshing,
        "the refresh outlived its runtime"
    );

    // Still inside tok-1's lifetime: the next runtime's requests go out with
    // it; once the held answer arrives, with tok-2, and no token call more.
    let second = runtime();
    second.block_on(async {
        assert_eq!(
            request_through(&handle, &upstream.url("/c")).await.unwrap(),
            "ok tok-1"
        );
        tokens.release();
        until("the proactive refresh to install its token", || {
            handle.status().generation == 2
        })
        .await;
        assert_eq!(
            request_through(&handle, &upstream.url("/d")).await.unwrap(),
            "ok tok-2"
        );
    });
    assert_eq!(tokens.calls(), 2);
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

/// A token set from a plain thread is timed by the crate's own runtime,
/// in real time: its proactive refresh starts on time and, when that
/// refresh failed, the expired token is not sent.
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
    runtime().block_on(async {
        let service = AuthRefreshLayer::new(handle.clone()).layer(recording(seen.clone()));
        // In the refresh-ahead window (the timer marks it, on the crate's
        // runtime): sent, and a refresh starts (and fails).
        for _ in 0..1000 {
            let response = service
                .clone()
                .oneshot(http::Request::new(Full::default()))
                .await;
            assert_eq!(response.unwrap().status(), 200);
            if calls.load(Ordering::SeqCst) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        until("the failed proactive refresh", || {
            handle.status().consecutive_failures == 1
        })
        .await;

        // Expired (and the timer had time to mark it so): the request fails
        // fast (back-off), without going out.
        until("the expiry", || !handle.status().valid).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let response = service
            .clone()
            .oneshot(http::Request::new(Full::default()))
            .await;
        let err = response.expect_err("an expired token is not sent");
        assert!(err.to_string().contains("token endpoint down"), "{err}");
    });
    let seen = seen.lock().unwrap();
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|auth| auth == "Bearer set-by-thread"));
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

/// The refresh runs on the crate's own runtime, which has timers: a caller
/// on a runtime without its time driver gets its token.
#[test]
fn a_runtime_without_timers_gets_its_token() {
    let calls = Arc::new(AtomicUsize::new(0));
    let handle = TokenHandle::new(counting_source(&calls));

    let no_timers = Builder::new_current_thread().build().unwrap();
    let token = no_timers.block_on(handle.refresh_now()).unwrap();
    assert_eq!(token.access_token().expose_secret(), "tok-1");
    drop(no_timers);
    assert!(!handle.status().refreshing);
    assert_eq!(handle.stats().failures, 0);
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

/// A sync wrapper that keeps one current-thread runtime and calls
/// `block_on` per request: between calls the runtime is alive but idle.
fn call_on(rt: &Runtime, handle: &TokenHandle, url: &str) -> String {
    let service = AuthRefreshLayer::new(handle.clone()).layer(client());
    let url = url.to_owned();
    rt.block_on(async move { body_text(service.oneshot(get(&url)).await.unwrap()).await })
        .trim_end()
        .to_owned()
}

#[test]
fn a_refresh_started_on_an_idle_runtime_does_not_wedge_other_runtimes() {
    let issuer = Issuer::detached().delay(Duration::from_millis(200));
    let handle = TokenHandle::builder(issuer.source()).build();
    let a = runtime();
    // The caller on `a` gives up after 20 ms; `a` is kept, but idle.
    let gave_up = a.block_on(async {
        tokio::time::timeout(Duration::from_millis(20), handle.refresh_now()).await
    });
    assert!(gave_up.is_err());
    assert!(handle.status().refreshing);

    // A caller on another runtime, on another thread, gets the token of
    // that refresh (bounded at 10 s so that a wedge fails the test).
    let other = handle.clone();
    let got = std::thread::spawn(move || {
        runtime().block_on(async {
            tokio::time::timeout(Duration::from_secs(10), other.valid_token()).await
        })
    })
    .join()
    .unwrap();
    let token = got.expect("not wedged behind the idle runtime").unwrap();
    assert_eq!(token.access_token().expose_secret(), "tok-1");
    assert_eq!(issuer.calls(), 1);
    assert!(!handle.status().refreshing);
    drop(a);
}

#[test]
fn an_idle_kept_runtime_does_not_let_an_expired_token_out_on_itself_or_elsewhere() {
    let servers = background();
    let upstream = servers.block_on(Upstream::start());
    let issuer = Issuer::new(&upstream).lifetime(Duration::from_millis(600));
    let handle = TokenHandle::builder(issuer.source()).build();
    let url = upstream.url("/x");

    let kept = runtime();
    assert_eq!(call_on(&kept, &handle, &url), "ok tok-1");
    // tok-1 expires while `kept` is idle (its wait point is at 450 ms).
    std::thread::sleep(Duration::from_millis(900));
    assert!(!handle.status().valid);

    // The next call on the same runtime sends a new token, not tok-1 ...
    assert_eq!(call_on(&kept, &handle, &url), "ok tok-2");
    std::thread::sleep(Duration::from_millis(900));
    // ... and so does a call on another runtime, and then on the kept one.
    assert_eq!(call_on(&runtime(), &handle, &url), "ok tok-3");
    assert_eq!(call_on(&kept, &handle, &url), "ok tok-3");
    assert_eq!(issuer.calls(), 3);
    assert_eq!(upstream.rejected(), 0, "no expired token went out");
}

/// A sync wrapper that builds a runtime per call, against an authorization
/// server that rotates refresh tokens: a refresh token is spent the moment
/// the server answers. A proactive refresh started at the end of a call
/// must still install its answer after the call's runtime is dropped, or
/// the next call presents the spent refresh token.
#[test]
fn a_runtime_per_call_never_presents_a_spent_rotating_refresh_token() {
    // (tokens issued, live refresh token, spent refresh tokens presented)
    let server = Arc::new(Mutex::new((0usize, "r0".to_owned(), 0usize)));
    let calls = Arc::new(AtomicUsize::new(0));
    let (state, counter) = (server.clone(), calls.clone());
    let handle = TokenHandle::builder(token_source_fn(move |cx: RefreshContext| {
        let (state, counter) = (state.clone(), counter.clone());
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            let presented = cx
                .previous
                .as_ref()
                .and_then(|t| t.refresh_token())
                .map_or_else(|| "r0".to_owned(), |r| r.expose_secret().to_owned());
            let answer = {
                let mut server = state.lock().unwrap();
                if presented == server.1 {
                    server.0 += 1;
                    server.1 = format!("r{}", server.0);
                    Some((server.0, server.1.clone()))
                } else {
                    server.2 += 1;
                    None
                }
            };
            // The answer travels back for 5 ms.
            tokio::time::sleep(Duration::from_millis(5)).await;
            match answer {
                None => Err::<Token, BoxError>("invalid_grant".into()),
                Some((n, refresh)) => Ok(Token::bearer(format!("a{n}"))
                    .with_refresh_token(refresh)
                    .with_expires_in(Duration::from_millis(300))),
            }
        }
    }))
    .build();

    let mut errors = 0;
    for _ in 0..100 {
        let rt = runtime();
        let inner = service_fn(|_req: http::Request<ReplayBody<Full<Bytes>>>| async {
            tokio::time::sleep(Duration::from_millis(2)).await;
            Ok::<_, Infallible>(http::Response::new(Full::<Bytes>::default()))
        });
        let service = AuthRefreshLayer::new(handle.clone()).layer(inner);
        if rt
            .block_on(service.oneshot(http::Request::new(Full::default())))
            .is_err()
        {
            errors += 1;
        }
        drop(rt);
        std::thread::sleep(Duration::from_millis(10));
    }
    let server = server.lock().unwrap();
    assert_eq!(server.2, 0, "spent refresh tokens presented");
    assert_eq!(errors, 0);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        server.0,
        "every call answered"
    );
}

/// A runtime per call, 300 ms tokens: one token call per token lifetime, not
/// one per proactive refresh that went with its runtime.
#[test]
fn a_runtime_per_call_makes_one_token_call_per_token_lifetime() {
    let servers = background();
    let upstream = servers.block_on(Upstream::start());
    let issuer = Issuer::new(&upstream)
        .lifetime(Duration::from_millis(300))
        .delay(Duration::from_millis(5));
    let handle = TokenHandle::builder(issuer.source()).build();
    let url = upstream.url("/p");
    let started = std::time::Instant::now();
    for i in 0..100 {
        let rt = if i % 2 == 0 {
            runtime()
        } else {
            Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap()
        };
        assert_eq!(call_on(&rt, &handle, &url).get(..6), Some("ok tok"));
        drop(rt);
        std::thread::sleep(Duration::from_millis(10));
    }
    // A 300 ms token is refreshed at most 150 ms ahead (half its lifetime):
    // at most one token per 150 ms, and the first.
    let bound = started.elapsed().as_millis() as usize / 150 + 2;
    assert!(issuer.calls() <= bound, "{} > {bound}", issuer.calls());
    assert_eq!(upstream.rejected(), 0);
}
