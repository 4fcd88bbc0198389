//! The fleet protocol over a shared MemoryStore: several managers behave
//! like one client.

mod common;

use std::time::Duration;

use common::{Issuer, Upstream, client, get};
use secrecy::ExposeSecret;
use tower::{Layer, ServiceExt};
use tower_auth_refresh::{AuthRefreshLayer, MemoryStore, Token, TokenHandle, TokenStore};

#[tokio::test]
async fn a_stored_valid_token_is_used_without_a_token_call() {
    let store = MemoryStore::new();
    store
        .save(
            "api",
            &Token::bearer("from-last-run").with_expires_in(Duration::from_secs(600)),
            None,
        )
        .await
        .unwrap();
    let upstream = Upstream::start().await;
    upstream.accept("from-last-run");
    let issuer = Issuer::new(&upstream);
    let handle = TokenHandle::builder(issuer.source())
        .store(store, "api")
        .build();
    // The first request of a (re)started process.
    let response = AuthRefreshLayer::new(handle.clone())
        .layer(client())
        .oneshot(get(&upstream.url("/a")))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        upstream.seen()[0].authorization.as_deref(),
        Some("Bearer from-last-run")
    );
    assert_eq!(issuer.calls(), 0);
    assert_eq!(handle.stats().adopted, 1);
}

#[tokio::test]
async fn refresh_now_refreshes_even_over_a_valid_stored_token() {
    // Bulk jobs (refresh_all) rely on it.
    let store = MemoryStore::new();
    store
        .save(
            "api",
            &Token::bearer("stored").with_expires_in(Duration::from_secs(600)),
            None,
        )
        .await
        .unwrap();
    let issuer = Issuer::detached().lifetime(Duration::from_secs(600));
    let handle = TokenHandle::builder(issuer.source())
        .store(store.clone(), "api")
        .build();
    let token = handle.refresh_now().await.unwrap();
    assert_eq!(token.access_token().expose_secret(), "tok-1");
    assert_eq!(issuer.calls(), 1);
    assert_eq!(store.load("api").await.unwrap().unwrap().version, 2);
}

#[tokio::test]
async fn an_expired_stored_token_is_replaced_and_saved() {
    let store = MemoryStore::new();
    store
        .save(
            "api",
            &Token::bearer("old").with_expires_at(std::time::UNIX_EPOCH),
            None,
        )
        .await
        .unwrap();
    let issuer = Issuer::detached().lifetime(Duration::from_secs(600));
    let handle = TokenHandle::builder(issuer.source())
        .store(store.clone(), "api")
        .build();
    handle.refresh_now().await.unwrap();
    assert_eq!(issuer.calls(), 1);
    let stored = store.load("api").await.unwrap().unwrap();
    assert_eq!(stored.version, 2);
    assert_eq!(stored.token.access_token().expose_secret(), "tok-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_managers_sharing_a_store_refresh_once() {
    let store = MemoryStore::new();
    let issuer = Issuer::detached()
        .lifetime(Duration::from_secs(600))
        .delay(Duration::from_millis(50));
    let handles: Vec<TokenHandle> = (0..8)
        .map(|_| {
            TokenHandle::builder(issuer.source())
                .store(store.clone(), "shared")
                .store_timing(
                    Duration::from_secs(5),
                    Duration::from_millis(5),
                    Duration::from_secs(1),
                )
                .build()
        })
        .collect();
    let tokens = futures::future::join_all(handles.iter().map(|h| h.refresh_now())).await;
    let names: Vec<String> = tokens
        .into_iter()
        .map(|t| t.unwrap().access_token().expose_secret().to_owned())
        .collect();
    assert_eq!(issuer.calls(), 1, "one refresh for the whole fleet");
    assert!(names.iter().all(|n| n == "tok-1"), "{names:?}");
    let adopted: u64 = handles.iter().map(|h| h.stats().adopted).sum();
    assert_eq!(adopted, 7);
}

#[tokio::test]
async fn a_failed_refresh_adopts_what_another_process_stored_and_deletes_nothing() {
    // FIELD_NOTES mistake 3: the loser of a rotation race gets invalid_grant;
    // it must pick up the winner's token, not wipe it.
    let store = MemoryStore::new();
    let winner = TokenHandle::builder(
        Issuer::detached()
            .lifetime(Duration::from_secs(600))
            .source(),
    )
    .store(store.clone(), "k")
    .build();
    winner.refresh_now().await.unwrap();

    let writes_during_refresh = store.clone();
    let loser_source = tower_auth_refresh::token_source_fn(move |_cx| {
        let store = writes_during_refresh.clone();
        async move {
            // While this process refreshes, the other one rotates and saves.
            let current = store.load("k").await.unwrap().unwrap();
            store
                .save(
                    "k",
                    &Token::bearer("winner-2").with_expires_in(Duration::from_secs(600)),
                    Some(current.version),
                )
                .await
                .unwrap();
            Err::<Token, tower_auth_refresh::BoxError>(Box::new(
                tower_auth_refresh::ReauthorizationRequired::new("invalid_grant"),
            ))
        }
    });
    let loser = TokenHandle::builder(loser_source)
        .store(store.clone(), "k")
        .initial_token(Token::bearer("stale").with_expires_in(Duration::from_secs(600)))
        .build();
    // The loser's own token was rejected: it refreshes.
    let token = loser.refresh_now().await.unwrap();
    assert_eq!(token.access_token().expose_secret(), "winner-2");
    let stored = store.load("k").await.unwrap().unwrap();
    assert_eq!(stored.token.access_token().expose_secret(), "winner-2");
}

/// A MemoryStore that can be made unreachable.
#[derive(Clone, Default)]
struct Flaky {
    inner: MemoryStore,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Flaky {
    fn check(&self) -> Result<(), tower_auth_refresh::StoreError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            Err(tower_auth_refresh::StoreError::Unavailable("down".into()))
        } else {
            Ok(())
        }
    }
}

impl TokenStore for Flaky {
    fn load<'a>(
        &'a self,
        key: &'a str,
    ) -> futures::future::BoxFuture<
        'a,
        Result<Option<tower_auth_refresh::StoredToken>, tower_auth_refresh::StoreError>,
    > {
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
    ) -> futures::future::BoxFuture<'a, Result<u64, tower_auth_refresh::StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.save(key, token, expected_version).await
        })
    }
    fn delete<'a>(
        &'a self,
        key: &'a str,
        expected_version: Option<u64>,
    ) -> futures::future::BoxFuture<'a, Result<bool, tower_auth_refresh::StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.delete(key, expected_version).await
        })
    }
    fn list_keys(
        &self,
    ) -> futures::future::BoxFuture<'_, Result<Vec<String>, tower_auth_refresh::StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.list_keys().await
        })
    }
    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
    ) -> futures::future::BoxFuture<
        'a,
        Result<Option<tower_auth_refresh::Lease>, tower_auth_refresh::StoreError>,
    > {
        Box::pin(async move {
            self.check()?;
            self.inner.try_lock(key, ttl).await
        })
    }
    fn unlock(
        &self,
        lease: tower_auth_refresh::Lease,
    ) -> futures::future::BoxFuture<'_, Result<(), tower_auth_refresh::StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.unlock(lease).await
        })
    }
}

#[tokio::test]
async fn after_an_outage_the_next_refresh_starts_from_the_stored_token() {
    // The store keeps the token from before the outage; this process got a
    // new one meanwhile without presenting the shared refresh token (another
    // process may have spent it). Once the store answers, the refresh token
    // read from it under the lease, unmarked, is the one presented (nobody
    // spent it: a spend marks the entry first); a token in memory is never
    // judged newer than the stored one by its expiry.
    let store = Flaky::default();
    store
        .inner
        .save(
            "k",
            &Token::bearer("before")
                .with_refresh_token("r-before")
                .with_expires_in(Duration::from_secs(600)),
            None,
        )
        .await
        .unwrap();
    let presented = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = presented.clone();
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let source =
        tower_auth_refresh::token_source_fn(move |cx: tower_auth_refresh::RefreshContext| {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            if let Some(previous) = cx.previous.as_ref().and_then(|t| t.refresh_token()) {
                seen.lock()
                    .unwrap()
                    .push(previous.expose_secret().to_owned());
            }
            async move {
                // Each token lives a little longer than the one before.
                Ok::<_, std::io::Error>(
                    Token::bearer(format!("local-{n}"))
                        .with_refresh_token(format!("r-{n}"))
                        .with_expires_in(Duration::from_secs(600 + n as u64)),
                )
            }
        });
    let handle = TokenHandle::builder(source)
        .store(store.clone(), "k")
        .build();
    let upstream = Upstream::start().await;
    upstream.accept("before");
    let response = AuthRefreshLayer::new(handle.clone())
        .layer(client())
        .oneshot(get(&upstream.url("/a")))
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "the stored token was adopted");

    store.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let local = handle.refresh_now().await.unwrap();
    assert_eq!(local.access_token().expose_secret(), "local-1");

    store.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let next = handle.refresh_now().await.unwrap();
    assert_eq!(next.access_token().expose_secret(), "local-2");
    assert_eq!(*presented.lock().unwrap(), ["r-before"]);
    let stored = store.inner.load("k").await.unwrap().unwrap();
    assert_eq!(stored.token.access_token().expose_secret(), "local-2");
    assert_eq!(
        stored.version, 3,
        "version 1 marked before r-before was presented (2), then replaced (3)"
    );
}
