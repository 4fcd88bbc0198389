//! The ways a fleet could present a spent refresh token, each reproduced
//! with managers sharing a `MemoryStore` ("processes") and a token source
//! that behaves like a strict server: refresh tokens rotate, a second use
//! of a spent one is counted as reuse.

mod common;
#[cfg(feature = "redis")]
mod fleet_support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Upstream, client, get};
use futures::future::BoxFuture;
use secrecy::ExposeSecret;
use tower::{Layer, ServiceExt};
use tower_auth_refresh::{
    AuthRoutingLayer, BoxError, MemoryStore, Origin, ReauthorizationRequired, RefreshContext,
    StoreError, StoreUnreachable, Tenant, Token, TokenHandle, TokenRegistry, TokenSource,
    TokenStore, UnreachableStore, token_source_fn,
};

const LIFETIME: Duration = Duration::from_secs(600);

type During = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

#[derive(Default)]
struct Ledger {
    serial: u64,
    spent: HashSet<String>,
    presented: Vec<String>,
    reused: u64,
    logins: u64,
}

/// A strict token server as a token source: `rt-N` works once; with no
/// refresh token it logs in (a grant that does not rotate), unless
/// `logins` is off. `during` runs after the server processed a refresh and
/// before the answer arrives.
#[derive(Clone, Default)]
struct Strict {
    ledger: Arc<Mutex<Ledger>>,
    no_login: bool,
    during: Arc<Mutex<Option<During>>>,
}

impl Strict {
    fn without_login() -> Self {
        Self {
            no_login: true,
            ..Self::default()
        }
    }

    fn during_next_refresh(
        &self,
        during: impl Fn() -> BoxFuture<'static, ()> + Send + Sync + 'static,
    ) {
        *self.during.lock().unwrap() = Some(Arc::new(during));
    }

    fn presented(&self) -> Vec<String> {
        self.ledger.lock().unwrap().presented.clone()
    }

    fn reused(&self) -> u64 {
        self.ledger.lock().unwrap().reused
    }

    fn logins(&self) -> u64 {
        self.ledger.lock().unwrap().logins
    }

    fn source(&self) -> impl TokenSource + use<> {
        let this = self.clone();
        token_source_fn(move |cx: RefreshContext| {
            let this = this.clone();
            async move {
                let presented = cx
                    .previous
                    .as_ref()
                    .and_then(|t| t.refresh_token())
                    .map(|rt| rt.expose_secret().to_owned());
                let issued = {
                    let mut ledger = this.ledger.lock().unwrap();
                    match &presented {
                        Some(rt) => {
                            ledger.presented.push(rt.clone());
                            if !ledger.spent.insert(rt.clone()) {
                                ledger.reused += 1;
                                return Err::<Token, BoxError>(Box::new(
                                    ReauthorizationRequired::new("refresh token reused"),
                                ));
                            }
                        }
                        None if this.no_login => {
                            return Err(Box::new(ReauthorizationRequired::new(
                                "no refresh token and no other grant",
                            )));
                        }
                        None => ledger.logins += 1,
                    }
                    ledger.serial += 1;
                    ledger.serial
                };
                let during = this.during.lock().unwrap().take();
                if let (Some(during), Some(_)) = (during, &presented) {
                    during().await;
                }
                Ok(Token::bearer(format!("at-{issued}"))
                    .with_refresh_token(format!("rt-{issued}"))
                    .with_expires_in(LIFETIME))
            }
        })
    }
}

fn rt_of(token: &Token) -> String {
    token.refresh_token().unwrap().expose_secret().to_owned()
}

async fn seed(store: &MemoryStore, key: &str, n: u64) -> u64 {
    store
        .save(
            key,
            &Token::bearer(format!("at-{n}"))
                .with_refresh_token(format!("rt-{n}"))
                .with_expires_at(std::time::UNIX_EPOCH),
            None,
        )
        .await
        .unwrap()
}

// ---- 1. writers without the lease ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_flush_during_a_refresh_cannot_strand_the_new_refresh_token() {
    let store = MemoryStore::new();
    let server = Strict::default();
    let valid = Token::bearer("at-1")
        .with_refresh_token("rt-1")
        .with_expires_in(LIFETIME);
    store.save("seller-a", &valid, None).await.unwrap();
    server.ledger.lock().unwrap().serial = 1;

    // Process B: a registry that served a request for the tenant with the
    // stored token; its usage is not in the store yet.
    let upstream = Upstream::start().await;
    let b_server = server.clone();
    let registry_b =
        TokenRegistry::builder(store.clone(), move |_: &str| b_server.source()).build();
    upstream.accept("at-1");
    let service = AuthRoutingLayer::new()
        .tenants(
            Origin::parse(&upstream.url("/")).unwrap(),
            registry_b.clone(),
        )
        .layer(client());
    let mut request = get(&upstream.url("/orders"));
    request.extensions_mut().insert(Tenant::new("seller-a"));
    assert_eq!(service.oneshot(request).await.unwrap().status(), 200);
    assert!(server.presented().is_empty());

    // Process A refreshes rt-1 → rt-2; B flushes its usage meanwhile.
    let flushed = Arc::new(Mutex::new(None));
    let (registry, out) = (registry_b.clone(), flushed.clone());
    server.during_next_refresh(move || {
        let (registry, out) = (registry.clone(), out.clone());
        Box::pin(async move {
            *out.lock().unwrap() = Some(registry.flush_usage().await);
        })
    });
    let a = TokenHandle::builder(server.source())
        .store(store.clone(), "seller-a")
        .build();
    let a_token = a.refresh_now().await.unwrap();
    assert_eq!(rt_of(&a_token), "rt-2");
    let flushed = flushed.lock().unwrap().take().expect("the flush ran");
    assert_eq!(
        flushed.updated, 0,
        "the flush left the leased key alone: {flushed:?}"
    );
    assert_eq!(flushed.busy, 1, "{flushed:?}");

    // The store holds the newest refresh token: process C presents it.
    let stored = store.load("seller-a").await.unwrap().unwrap();
    assert_eq!(rt_of(&stored.token), "rt-2");
    let c = TokenHandle::builder(server.source())
        .store(store.clone(), "seller-a")
        .build();
    c.refresh_now().await.unwrap();
    assert_eq!(server.presented(), ["rt-1", "rt-2"]);
    assert_eq!(server.reused(), 0);

    // With no refresh under way, the flush writes.
    assert_eq!(registry_b.flush_usage().await.updated, 1);
}

#[tokio::test]
async fn a_save_that_loses_the_race_saves_again_when_the_stored_refresh_token_is_the_spent_one() {
    // An older release rewrites the entry (a compare-and-swap over the
    // version it read, without the lease) while this process refreshes.
    let store = MemoryStore::new();
    let server = Strict::default();
    seed(&store, "k", 1).await;
    server.ledger.lock().unwrap().serial = 1;
    let writer = store.clone();
    server.during_next_refresh(move || {
        let writer = writer.clone();
        Box::pin(async move {
            let stored = writer.load("k").await.unwrap().unwrap();
            let touched = stored.token.with_metadata("written_by", "v0.9");
            writer
                .save("k", &touched, Some(stored.version))
                .await
                .unwrap();
        })
    });
    let a = on_k(&store, server.source());
    a.refresh_now().await.unwrap();
    let stored = store.load("k").await.unwrap().unwrap();
    assert_eq!(
        rt_of(&stored.token),
        "rt-2",
        "the new refresh token is stored"
    );

    let b = on_k(&store, server.source());
    b.refresh_now().await.unwrap();
    assert_eq!(server.presented(), ["rt-1", "rt-2"]);
    assert_eq!(server.reused(), 0);
}

// ---- 2. a process that cannot coordinate ----

/// A MemoryStore that can be made unreachable.
#[derive(Clone, Default)]
struct Flaky {
    inner: MemoryStore,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl Flaky {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            Err(StoreError::Unavailable("down".into()))
        } else {
            Ok(())
        }
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }
}

impl TokenStore for Flaky {
    fn load<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<tower_auth_refresh::StoredToken>, StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.load(key).await
        })
    }
    fn save<'a>(
        &'a self,
        key: &'a str,
        token: &'a Token,
        expected_version: Option<u64>,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.save(key, token, expected_version).await
        })
    }
    fn delete<'a>(
        &'a self,
        key: &'a str,
        expected_version: Option<u64>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.delete(key, expected_version).await
        })
    }
    fn list_keys(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.list_keys().await
        })
    }
    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<tower_auth_refresh::Lease>, StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.try_lock(key, ttl).await
        })
    }
    fn unlock(&self, lease: tower_auth_refresh::Lease) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.unlock(lease).await
        })
    }
}

/// A process that adopted `rt-1` from the store, which then goes away.
async fn adopted_then_store_down(server: &Strict, policy: Option<UnreachableStore>) -> TokenHandle {
    let store = Flaky::default();
    store
        .inner
        .save(
            "k",
            &Token::bearer("at-1")
                .with_refresh_token("rt-1")
                .with_expires_in(LIFETIME),
            None,
        )
        .await
        .unwrap();
    server.ledger.lock().unwrap().serial = 1;
    let mut builder = TokenHandle::builder(server.source()).store(store.clone(), "k");
    if let Some(policy) = policy {
        builder = builder.when_store_unreachable(policy);
    }
    let handle = builder.build();
    // Adopts the stored token (no token call).
    handle.valid_token().await.unwrap();
    store.set_down(true);
    handle
}

#[tokio::test]
async fn by_default_an_unreachable_store_withholds_the_refresh_token_and_uses_the_initial_grant() {
    let server = Strict::default();
    let store = Flaky::default();
    store
        .inner
        .save(
            "k",
            &Token::bearer("at-1")
                .with_refresh_token("rt-1")
                .with_expires_in(LIFETIME),
            None,
        )
        .await
        .unwrap();
    server.ledger.lock().unwrap().serial = 1;
    let handle = on_k(&store, server.source());
    let upstream = Upstream::start().await;
    upstream.accept("at-1");
    let response = tower_auth_refresh::AuthRefreshLayer::new(handle.clone())
        .layer(client())
        .oneshot(get(&upstream.url("/a")))
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "the stored token was adopted");

    store.set_down(true);
    let token = handle.refresh_now().await.unwrap();
    assert_eq!(token.access_token().expose_secret(), "at-2");
    assert!(
        server.presented().is_empty(),
        "rt-1 may be spent by another process: {:?}",
        server.presented()
    );
    assert_eq!(server.logins(), 1, "a grant that does not rotate");
}

#[tokio::test]
async fn a_source_with_no_other_grant_fails_with_the_typed_error() {
    let server = Strict::without_login();
    let handle = adopted_then_store_down(&server, None).await;
    let err = handle.refresh_now().await.unwrap_err();
    let typed = err
        .downcast_ref::<StoreUnreachable>()
        .unwrap_or_else(|| panic!("not a StoreUnreachable: {err}"));
    assert!(typed.reason().contains("down"), "{typed}");
    assert!(
        err.downcast_ref::<ReauthorizationRequired>().is_none(),
        "not a dead grant: bulk jobs must not delete it"
    );
    assert!(server.presented().is_empty());
}

#[tokio::test]
async fn the_fail_policy_does_not_call_the_source() {
    let server = Strict::default();
    let handle = adopted_then_store_down(&server, Some(UnreachableStore::Fail)).await;
    let err = handle.refresh_now().await.unwrap_err();
    assert!(err.downcast_ref::<StoreUnreachable>().is_some(), "{err}");
    assert!(server.presented().is_empty());
    assert_eq!(server.logins(), 0);
}

#[tokio::test]
async fn local_refresh_with_the_refresh_token_is_an_opt_in() {
    let server = Strict::default();
    let handle = adopted_then_store_down(&server, Some(UnreachableStore::RefreshLocally)).await;
    let token = handle.refresh_now().await.unwrap();
    assert_eq!(rt_of(&token), "rt-2");
    assert_eq!(server.presented(), ["rt-1"]);
}

#[tokio::test]
async fn once_the_store_is_back_a_refresh_token_spent_locally_is_not_presented_again() {
    let server = Strict::default();
    let store = Flaky::default();
    store
        .inner
        .save(
            "k",
            &Token::bearer("at-1")
                .with_refresh_token("rt-1")
                .with_expires_in(LIFETIME),
            None,
        )
        .await
        .unwrap();
    server.ledger.lock().unwrap().serial = 1;
    let handle = TokenHandle::builder(server.source())
        .store(store.clone(), "k")
        .when_store_unreachable(UnreachableStore::RefreshLocally)
        .build();
    handle.valid_token().await.unwrap();
    store.set_down(true);
    handle.refresh_now().await.unwrap(); // rt-1 → rt-2, not saved
    store.set_down(false);

    // The store still holds rt-1, spent: this process's own rt-2 goes next.
    let token = handle.refresh_now().await.unwrap();
    assert_eq!(rt_of(&token), "rt-3");
    assert_eq!(server.presented(), ["rt-1", "rt-2"]);
    let stored = store.inner.load("k").await.unwrap().unwrap();
    assert_eq!(rt_of(&stored.token), "rt-3");
}

#[tokio::test]
async fn a_lease_wait_that_runs_out_withholds_the_refresh_token() {
    let store = MemoryStore::new();
    let server = Strict::default();
    store
        .save(
            "k",
            &Token::bearer("at-1")
                .with_refresh_token("rt-1")
                .with_expires_at(std::time::UNIX_EPOCH),
            None,
        )
        .await
        .unwrap();
    server.ledger.lock().unwrap().serial = 1;
    // Another process holds the lease and never saves.
    let _stuck = store
        .try_lock("k", Duration::from_secs(600))
        .await
        .unwrap()
        .unwrap();
    // The lease a process waits for is at least the refresh timeout plus a
    // store operation: 1.05 s here, so the wait gives up after 2.1 s.
    let handle = TokenHandle::builder(server.source())
        .refresh_timeout(Duration::from_secs(1))
        .store(store.clone(), "k")
        .store_timing(
            Duration::from_millis(100),
            Duration::from_millis(10),
            Duration::from_millis(50),
        )
        .build();
    let token = handle.refresh_now().await.unwrap();
    assert_eq!(token.access_token().expose_secret(), "at-2");
    assert!(server.presented().is_empty(), "{:?}", server.presented());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_taken_over_from_a_stalled_holder_leaves_its_refresh_token_alone() {
    // A holds the lease and has presented rt-1 (the server rotated it), then
    // stalls; its refresh times out and its lease runs out (a lease always
    // outlasts the refresh timeout plus a store operation); B takes the
    // lease over.
    let store = MemoryStore::new();
    let server = Strict::default();
    seed(&store, "k", 1).await;
    server.ledger.lock().unwrap().serial = 1;
    let timing = |b: tower_auth_refresh::TokenHandleBuilder| {
        b.refresh_timeout(Duration::from_millis(100)).store_timing(
            Duration::from_millis(200),
            Duration::from_millis(10),
            Duration::from_millis(50),
        )
    };
    let resume = Arc::new(tokio::sync::Notify::new());
    let stalled = resume.clone();
    server.during_next_refresh(move || {
        let stalled = stalled.clone();
        Box::pin(async move { stalled.notified().await })
    });
    let a = timing(TokenHandle::builder(server.source()).store(store.clone(), "k")).build();
    let a_refresh = tokio::spawn({
        let a = a.clone();
        async move { a.refresh_now().await.map(|t| rt_of(&t)) }
    });
    while server.presented().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let b = timing(TokenHandle::builder(server.source()).store(store.clone(), "k")).build();
    let b_token = b.refresh_now().await.unwrap();
    assert_eq!(server.presented(), ["rt-1"], "B did not present rt-1 again");
    assert_eq!(server.logins(), 1, "B used the grant that does not rotate");

    resume.notify_one();
    assert!(
        a_refresh.await.unwrap().is_err(),
        "A's stalled refresh timed out"
    );
    assert_eq!(server.reused(), 0);
    let stored = store.load("k").await.unwrap().unwrap();
    assert_eq!(
        rt_of(&stored.token),
        rt_of(&b_token),
        "nothing replaced what B stored"
    );
}

#[tokio::test]
async fn a_store_that_lost_its_data_is_not_a_reason_to_present_a_shared_refresh_token() {
    let store = MemoryStore::new();
    let server = Strict::default();
    store
        .save(
            "k",
            &Token::bearer("at-1")
                .with_refresh_token("rt-1")
                .with_expires_in(LIFETIME),
            None,
        )
        .await
        .unwrap();
    server.ledger.lock().unwrap().serial = 1;
    let handle = on_k(&store, server.source());
    handle.valid_token().await.unwrap(); // adopts rt-1, version 1
    assert!(server.presented().is_empty());
    // The store restarts empty; the token is rejected upstream.
    store.delete("k", None).await.unwrap();
    handle.refresh_now().await.unwrap();
    assert!(server.presented().is_empty(), "{:?}", server.presented());
    assert_eq!(server.logins(), 1);
    let stored = store.load("k").await.unwrap().unwrap();
    assert_eq!(rt_of(&stored.token), "rt-2", "and the new token is stored");
}

// ---- a refresh whose outcome is unknown ----

/// A handle on the store's entry `k`.
fn on_k(store: &(impl TokenStore + Clone), source: impl TokenSource + 'static) -> TokenHandle {
    TokenHandle::builder(source)
        .store(store.clone(), "k")
        .build()
}

/// `rt-1` stored under `k` (the server's serial at 1), and one refresh of
/// it through a source whose first call fails with `first`.
async fn refresh_failing_once(
    store: &MemoryStore,
    server: &Strict,
    first: std::io::ErrorKind,
) -> Result<(), BoxError> {
    seed(store, "k", 1).await;
    server.ledger.lock().unwrap().serial = 1;
    let (source, _) = failing_once(server, first);
    on_k(store, source).refresh_now().await.map(drop)
}

/// A source that presents the refresh token and fails once with `first`.
fn failing_once(
    server: &Strict,
    first: std::io::ErrorKind,
) -> (impl TokenSource + use<>, Arc<std::sync::atomic::AtomicBool>) {
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (inner, flag) = (server.source(), failed.clone());
    let presented = server.ledger.clone();
    let source = token_source_fn(move |cx: RefreshContext| {
        let first_call = !flag.swap(true, std::sync::atomic::Ordering::SeqCst);
        let fetch = inner.fetch(cx.clone());
        let presented = presented.clone();
        async move {
            if first_call {
                if first != std::io::ErrorKind::ConnectionRefused {
                    // The server processed the refresh; its gateway answered 502.
                    if let Some(rt) = cx.previous.as_ref().and_then(|t| t.refresh_token()) {
                        let mut ledger = presented.lock().unwrap();
                        ledger.presented.push(rt.expose_secret().to_owned());
                        ledger.spent.insert(rt.expose_secret().to_owned());
                    }
                }
                drop(fetch);
                return Err::<Token, BoxError>(Box::new(std::io::Error::from(first)));
            }
            fetch.await
        }
    });
    (source, failed)
}

#[tokio::test]
async fn after_an_uncertain_failure_the_refresh_token_is_not_presented_again() {
    let store = MemoryStore::new();
    let server = Strict::default();
    assert!(
        refresh_failing_once(&store, &server, std::io::ErrorKind::Other)
            .await
            .is_err()
    );
    // Another process (or this one, later) refreshes: rt-1 may be spent.
    let other = on_k(&store, server.source());
    other.refresh_now().await.unwrap();
    assert_eq!(server.presented(), ["rt-1"]);
    assert_eq!(server.reused(), 0);
    assert_eq!(server.logins(), 1);
}

#[tokio::test]
async fn after_a_refused_connection_the_refresh_token_is_still_used() {
    let store = MemoryStore::new();
    let server = Strict::default();
    assert!(
        refresh_failing_once(&store, &server, std::io::ErrorKind::ConnectionRefused)
            .await
            .is_err()
    );
    let stored = store.load("k").await.unwrap().unwrap();
    assert!(
        stored.token.metadata().is_empty(),
        "the entry is unmarked: {:?}",
        stored.token.metadata()
    );
    let other = on_k(&store, server.source());
    other.refresh_now().await.unwrap();
    assert_eq!(server.presented(), ["rt-1"]);
    assert_eq!(server.logins(), 0);
}

#[tokio::test]
async fn a_withheld_refresh_token_is_a_failure_not_a_dead_grant() {
    let store = MemoryStore::new();
    let server = Strict::without_login();
    assert!(
        refresh_failing_once(&store, &server, std::io::ErrorKind::Other)
            .await
            .is_err()
    );
    let other = on_k(&store, server.source());
    let err = other.refresh_now().await.unwrap_err();
    assert!(
        err.downcast_ref::<ReauthorizationRequired>().is_none(),
        "a bulk job would delete it: {err}"
    );
    assert!(
        err.downcast_ref::<tower_auth_refresh::RefreshFailed>()
            .is_some(),
        "{err}"
    );
    assert_eq!(server.presented(), ["rt-1"]);
}

// ---- 4. tokens given by the application, tokens remembered in memory ----

/// A whole-second expiry, as a JWT `exp` gives: tokens issued in the same
/// ten seconds expire at the same instant.
fn whole_ten_seconds_from_now() -> std::time::SystemTime {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    std::time::UNIX_EPOCH + Duration::from_secs((now / 10 + 60) * 10)
}

/// A strict server whose tokens all expire at `expiry`.
fn same_expiry_source(server: &Strict, expiry: std::time::SystemTime) -> impl TokenSource + use<> {
    let strict = server.source();
    token_source_fn(move |cx: RefreshContext| {
        let fut = strict.fetch(cx);
        async move { fut.await.map(|token| token.with_expires_at(expiry)) }
    })
}

/// A strict server whose logins (no refresh token presented) give tokens
/// that live a minute only.
fn short_logins(server: &Strict) -> impl TokenSource + use<> {
    let strict = server.source();
    token_source_fn(move |cx: RefreshContext| {
        let login = cx
            .previous
            .as_ref()
            .is_none_or(|t| t.refresh_token().is_none());
        let fut = strict.fetch(cx);
        async move {
            let token = fut.await?;
            Ok::<_, BoxError>(if login {
                token.with_expires_in(Duration::from_secs(60))
            } else {
                token
            })
        }
    })
}

/// A MemoryStore that can lose the answer of a save it applied (a Redis
/// response timeout), and delay the saves of one access token.
#[derive(Clone, Default)]
struct Lossy {
    inner: MemoryStore,
    lose_next_answer: Arc<std::sync::atomic::AtomicBool>,
    slow_access_token: Arc<Mutex<Option<String>>>,
}

impl TokenStore for Lossy {
    fn load<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<tower_auth_refresh::StoredToken>, StoreError>> {
        self.inner.load(key)
    }
    fn save<'a>(
        &'a self,
        key: &'a str,
        token: &'a Token,
        expected_version: Option<u64>,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let marking = token
                .metadata()
                .contains_key("tower-auth-refresh:presented");
            let slow = self.slow_access_token.lock().unwrap().clone();
            if !marking && slow.as_deref() == Some(token.access_token().expose_secret()) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let saved = self.inner.save(key, token, expected_version).await;
            if saved.is_ok()
                && !marking
                && self
                    .lose_next_answer
                    .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                return Err(StoreError::Unavailable("no answer (timeout)".into()));
            }
            saved
        })
    }
    fn delete<'a>(
        &'a self,
        key: &'a str,
        expected_version: Option<u64>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.delete(key, expected_version)
    }
    fn list_keys(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        self.inner.list_keys()
    }
    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<tower_auth_refresh::Lease>, StoreError>> {
        self.inner.try_lock(key, ttl)
    }
    fn unlock(&self, lease: tower_auth_refresh::Lease) -> BoxFuture<'_, Result<(), StoreError>> {
        self.inner.unlock(lease)
    }
}

fn member(store: impl TokenStore, source: impl TokenSource) -> TokenHandle {
    TokenHandle::builder(source)
        .store(store, "k")
        .store_timing(
            Duration::from_secs(2),
            Duration::from_millis(10),
            Duration::from_millis(300),
        )
        .build()
}

/// Waits until the store's lease of `k` is free: a save in the background
/// holds it while it runs.
async fn lease_free(store: &MemoryStore) {
    for _ in 0..500 {
        if let Some(lease) = store.try_lock("k", Duration::from_secs(1)).await.unwrap() {
            store.unlock(lease).await.unwrap();
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the lease of `k` was never released");
}

/// Waits until the application's token, saved in the background, is stored.
async fn stored_refresh_token_becomes(store: &MemoryStore, expected: &str) {
    for _ in 0..500 {
        if let Some(stored) = store.load("k").await.unwrap() {
            if rt_of(&stored.token) == expected {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("`{expected}` was never stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_initial_token_of_a_late_replica_does_not_overwrite_a_rotated_token() {
    let store = MemoryStore::new();
    let server = Strict::default();
    // The deployment's initial token, from a login done once: rt-1.
    let initial = Token::bearer("at-1")
        .with_refresh_token("rt-1")
        .with_expires_in(LIFETIME);
    server.ledger.lock().unwrap().serial = 1;
    let a = TokenHandle::builder(server.source())
        .store(store.clone(), "k")
        .initial_token(initial.clone())
        .build();
    lease_free(&store).await;
    a.refresh_now().await.unwrap(); // rt-1 → rt-2, stored

    // A replica started later with the same configuration.
    let b = TokenHandle::builder(server.source())
        .store(store.clone(), "k")
        .initial_token(initial)
        .build();
    lease_free(&store).await;
    let stored = store.load("k").await.unwrap().unwrap();
    assert_eq!(
        rt_of(&stored.token),
        "rt-2",
        "the rotated token stays stored"
    );

    let b_refreshed = b.refresh_now().await;
    let a_refreshed = a.refresh_now().await;
    assert_eq!(server.presented(), ["rt-1", "rt-2", "rt-3"]);
    b_refreshed.unwrap();
    a_refreshed.unwrap();
    assert_eq!(server.reused(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_set_token_save_cannot_put_a_spent_refresh_token_back() {
    let store = Lossy::default();
    *store.slow_access_token.lock().unwrap() = Some("at-app".to_owned());
    let server = Strict::default();
    let a = member(store.clone(), server.source());
    let b = member(store.clone(), server.source());
    // A token the application got elsewhere (an authorization code).
    a.set_token(
        Token::bearer("at-app")
            .with_refresh_token("rt-app")
            .with_expires_in(LIFETIME),
    )
    .unwrap();
    a.refresh_now().await.unwrap(); // rt-app is spent, once
    lease_free(&store.inner).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // the slow save lands, or not
    lease_free(&store.inner).await;

    let stored = store.inner.load("k").await.unwrap().unwrap();
    assert_ne!(
        rt_of(&stored.token),
        "rt-app",
        "the spent refresh token is not stored"
    );
    b.refresh_now().await.unwrap();
    assert_eq!(server.reused(), 0, "presented {:?}", server.presented());
    assert_eq!(
        server
            .presented()
            .iter()
            .filter(|rt| *rt == "rt-app")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_token_another_process_refreshed_is_not_presented_again_when_expiries_tie() {
    let store = MemoryStore::new();
    let server = Strict::default();
    let expiry = whole_ten_seconds_from_now();
    let a = member(store.clone(), same_expiry_source(&server, expiry));
    let b = member(store.clone(), same_expiry_source(&server, expiry));
    a.set_token(
        Token::bearer("at-app")
            .with_refresh_token("rt-app")
            .with_expires_at(expiry),
    )
    .unwrap();
    stored_refresh_token_becomes(&store, "rt-app").await;
    b.valid_token().await.unwrap(); // adopts rt-app
    b.refresh_now().await.unwrap(); // rt-app → rt-1, same expiry

    a.refresh_now().await.unwrap();
    assert_eq!(server.presented(), ["rt-app", "rt-1"]);
    assert_eq!(server.reused(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_whose_answer_was_lost_is_not_presented_after_another_process_refreshed_it() {
    let store = Lossy::default();
    let server = Strict::default();
    let expiry = whole_ten_seconds_from_now();
    store
        .inner
        .save(
            "k",
            &Token::bearer("at-0")
                .with_refresh_token("rt-0")
                .with_expires_at(expiry),
            None,
        )
        .await
        .unwrap();
    let a = member(store.clone(), same_expiry_source(&server, expiry));
    let b = member(store.clone(), same_expiry_source(&server, expiry));
    a.valid_token().await.unwrap();
    b.valid_token().await.unwrap();

    store
        .lose_next_answer
        .store(true, std::sync::atomic::Ordering::SeqCst);
    a.refresh_now().await.unwrap(); // rt-0 → rt-1: stored, but A never heard
    b.refresh_now().await.unwrap(); // rt-1 → rt-2
    a.refresh_now().await.unwrap();
    assert_eq!(server.presented(), ["rt-0", "rt-1", "rt-2"]);
    assert_eq!(server.reused(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_data_loss_a_higher_version_in_memory_is_not_presented() {
    let store = MemoryStore::new();
    let server = Strict::default();
    server.ledger.lock().unwrap().serial = 1;
    store
        .save(
            "k",
            &Token::bearer("at-1")
                .with_refresh_token("rt-1")
                .with_expires_in(LIFETIME),
            None,
        )
        .await
        .unwrap();
    let a = member(store.clone(), short_logins(&server));
    a.valid_token().await.unwrap();
    a.refresh_now().await.unwrap(); // rt-1 → rt-2
    let b = member(store.clone(), server.source());
    b.valid_token().await.unwrap(); // adopts rt-2
    a.refresh_now().await.unwrap(); // rt-2 → rt-3: B's rt-2 is spent
    store.delete("k", None).await.unwrap(); // the store lost its data
    // A's logs in (its rt-3 is withheld); the login's token lives shorter
    // than B's in memory, and its version is lower.
    a.refresh_now().await.unwrap();
    let stored = store.load("k").await.unwrap().unwrap();
    assert_eq!(rt_of(&stored.token), "rt-4");

    b.refresh_now().await.unwrap();
    assert_eq!(server.presented(), ["rt-1", "rt-2", "rt-4"]);
    assert_eq!(server.reused(), 0);
}

/// Handles on one store doing what applications do, in a random order:
/// refresh, set a token, forget it, use it. No refresh token is presented
/// twice.
async fn random_interleavings(
    store: impl TokenStore + Clone,
    server: &Strict,
    members: usize,
    during: impl FnOnce() + Send + 'static,
) {
    let mut tasks = Vec::new();
    for i in 0..members {
        let handle = member(store.clone(), server.source());
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(i as u64 + 7);
            for _ in 0..150 {
                match rng.u8(..10) {
                    0..=4 => {
                        let _ = handle.refresh_now().await;
                    }
                    5 => handle.clear(),
                    6 => {
                        let login = {
                            let mut ledger = server.ledger.lock().unwrap();
                            ledger.serial += 1;
                            ledger.serial
                        };
                        let _ = handle.set_token(
                            Token::bearer(format!("at-{login}"))
                                .with_refresh_token(format!("rt-{login}"))
                                .with_expires_in(LIFETIME),
                        );
                    }
                    _ => {
                        let _ = handle.valid_token().await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(rng.u64(0..4))).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    during();
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_interleavings_on_one_memory_store_present_each_refresh_token_once() {
    let store = MemoryStore::new();
    let server = Strict::default();
    seed(&store, "k", 0).await;
    random_interleavings(store, &server, 4, || {}).await;
    assert!(
        server.presented().len() > 50,
        "{}",
        server.presented().len()
    );
    assert_eq!(server.reused(), 0, "presented {:?}", server.presented());
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_interleavings_on_redis_with_a_restart_present_each_refresh_token_once() {
    let redis = Arc::new(Mutex::new(fleet_support::RedisServer::start()));
    let url = redis.lock().unwrap().url();
    let store = tower_auth_refresh::RedisStore::builder(url)
        .timeouts(Duration::from_millis(200), Duration::from_millis(200))
        .build()
        .unwrap();
    let server = Strict::default();
    store
        .save(
            "k",
            &Token::bearer("at-0")
                .with_refresh_token("rt-0")
                .with_expires_in(LIFETIME),
            None,
        )
        .await
        .unwrap();
    let restarting = redis.clone();
    random_interleavings(store, &server, 4, move || {
        std::thread::spawn(move || restarting.lock().unwrap().restart());
    })
    .await;
    assert!(
        server.presented().len() > 50,
        "{}",
        server.presented().len()
    );
    assert_eq!(server.reused(), 0, "presented {:?}", server.presented());
}
