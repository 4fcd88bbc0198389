//! TokenHandle: status at a glance, refresh now, set, clear, counters.

mod common;

use std::time::Duration;

use common::{Issuer, Upstream, client, get};
use secrecy::ExposeSecret;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::{AuthRefreshLayer, RefreshReason, Token, TokenHandle};

#[tokio::test(start_paused = true)]
async fn status_describes_the_token_without_secrets() {
    let issuer = Issuer::detached().lifetime(Duration::from_secs(300));
    let handle = TokenHandle::builder(issuer.source())
        .refresh_ahead(Duration::from_secs(60))
        .build();
    let empty = handle.status();
    assert!(!empty.has_token && !empty.valid && empty.should_refresh);
    assert_eq!(empty.generation, 0);

    handle.refresh_now().await.unwrap();
    let status = handle.status();
    assert!(status.has_token && status.valid && !status.should_refresh);
    assert_eq!(status.generation, 1);
    assert!(status.expires_in.unwrap() > Duration::from_secs(299));
    assert!(status.last_refresh_at.is_some() && status.last_refresh_duration.is_some());
    assert_eq!(status.consecutive_failures, 0);

    tokio::time::sleep(Duration::from_secs(250)).await;
    let late = handle.status();
    assert!(
        late.valid && late.should_refresh,
        "inside the refresh-ahead window"
    );
    assert!(late.expires_in.unwrap() <= Duration::from_secs(50));

    let json = serde_json::to_value(handle.status()).unwrap();
    assert_eq!(json["generation"], 1);
    assert!(json["expires_in_ms"].as_u64().unwrap() <= 50_000);
}

#[tokio::test]
async fn set_token_and_clear_change_what_requests_carry() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream);
    let handle = TokenHandle::new(issuer.source());
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(client());

    upstream.accept("pasted");
    handle.set_token(Token::bearer("pasted")).unwrap();
    assert_eq!(handle.status().generation, 1);
    service
        .clone()
        .oneshot(get(&upstream.url("/a")))
        .await
        .unwrap();
    assert_eq!(
        upstream.seen()[0].authorization.as_deref(),
        Some("Bearer pasted")
    );
    assert_eq!(issuer.calls(), 0);

    handle.clear();
    assert!(!handle.status().has_token);
    service
        .clone()
        .oneshot(get(&upstream.url("/a")))
        .await
        .unwrap();
    assert_eq!(issuer.calls(), 1);
    assert_eq!(issuer.reasons.lock().unwrap()[0], RefreshReason::Initial);
    assert_eq!(
        upstream.seen()[1].authorization.as_deref(),
        Some("Bearer tok-1")
    );
    assert!(handle.status().generation > 1);

    assert!(handle.set_token(Token::bearer("bad\r\nheader")).is_err());
    assert_eq!(
        handle.token().unwrap().access_token().expose_secret(),
        "tok-1"
    );
}

#[tokio::test]
async fn counters_add_up() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream);
    let handle = TokenHandle::builder(issuer.source())
        .min_token_age(Duration::ZERO)
        .build();
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(client());
    service
        .clone()
        .oneshot(get(&upstream.url("/a")))
        .await
        .unwrap();
    upstream.revoke_all();
    service
        .clone()
        .oneshot(get(&upstream.url("/b")))
        .await
        .unwrap();
    service
        .clone()
        .oneshot(get(&upstream.url("/c")))
        .await
        .unwrap();
    let stats = handle.stats();
    assert_eq!(stats.refreshes, 2);
    assert_eq!(stats.retries, 1);
    assert_eq!(stats.waited, 1);
    assert_eq!(stats.failures, 0);
    assert_eq!(stats.skipped_retries, 0);
    assert_eq!(issuer.reasons.lock().unwrap()[1], RefreshReason::Rejected);
}

#[tokio::test]
async fn refresh_now_joins_a_refresh_in_flight() {
    let issuer = Issuer::detached().delay(Duration::from_millis(30));
    let handle = TokenHandle::new(issuer.source());
    let (a, b) = tokio::join!(handle.refresh_now(), handle.refresh_now());
    assert_eq!(a.unwrap(), b.unwrap());
    assert_eq!(issuer.calls(), 1);
}

/// A token source whose fetches wait at a gate, and that records what it is
/// asked to revoke.
struct GatedSource {
    fetched: std::sync::atomic::AtomicUsize,
    started: tokio::sync::mpsc::UnboundedSender<()>,
    gate: std::sync::Arc<tokio::sync::Semaphore>,
    revoked: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl tower_auth_refresh::TokenSource for GatedSource {
    fn fetch(
        &self,
        _cx: tower_auth_refresh::RefreshContext,
    ) -> futures::future::BoxFuture<'static, Result<Token, tower_auth_refresh::BoxError>> {
        let n = self
            .fetched
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let _ = self.started.send(());
        let gate = self.gate.clone();
        Box::pin(async move {
            gate.acquire().await?.forget();
            Ok(Token::new(format!("fetched-{n}"), "Bearer"))
        })
    }

    fn revoke(
        &self,
        token: std::sync::Arc<Token>,
    ) -> futures::future::BoxFuture<'static, Result<(), tower_auth_refresh::BoxError>> {
        let revoked = self.revoked.clone();
        Box::pin(async move {
            revoked
                .lock()
                .unwrap()
                .push(token.access_token().expose_secret().to_owned());
            Ok(())
        })
    }
}

struct Gated {
    handle: TokenHandle,
    started: tokio::sync::mpsc::UnboundedReceiver<()>,
    gate: std::sync::Arc<tokio::sync::Semaphore>,
    revoked: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

fn gated(
    configure: impl FnOnce(
        tower_auth_refresh::TokenHandleBuilder,
    ) -> tower_auth_refresh::TokenHandleBuilder,
) -> Gated {
    let (tx, started) = tokio::sync::mpsc::unbounded_channel();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let revoked = std::sync::Arc::default();
    let source = GatedSource {
        fetched: Default::default(),
        started: tx,
        gate: gate.clone(),
        revoked: std::sync::Arc::clone(&revoked),
    };
    let handle = configure(
        TokenHandle::builder(source).initial_token(Token::new("before-logout", "Bearer")),
    )
    .build();
    Gated {
        handle,
        started,
        gate,
        revoked,
    }
}

/// A logout while a refresh is under way: the refresh's token is not
/// installed afterwards, and it is revoked too.
#[tokio::test]
async fn a_refresh_under_way_during_revoke_is_dropped_and_revoked() {
    let mut g = gated(|b| b);
    let refreshing = tokio::spawn({
        let handle = g.handle.clone();
        async move { handle.refresh_now().await }
    });
    g.started.recv().await.unwrap();
    g.handle.revoke().await.unwrap();
    g.gate.add_permits(1);
    let refreshed = refreshing.await.unwrap();
    assert!(
        refreshed.is_err(),
        "the refresh lost to the logout: {:?}",
        refreshed.map(|t| t.access_token().expose_secret().to_owned())
    );
    assert!(g.handle.token().is_none(), "no token after the logout");
    tokio::time::timeout(Duration::from_secs(10), async {
        while g.revoked.lock().unwrap().len() < 2 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the dropped token is revoked");
    assert_eq!(*g.revoked.lock().unwrap(), ["before-logout", "fetched-1"]);
    assert_eq!(g.handle.stats().refreshes, 0);

    // The next caller starts a refresh of its own.
    g.gate.add_permits(1);
    let token = g.handle.refresh_now().await.unwrap();
    assert_eq!(token.access_token().expose_secret(), "fetched-2");
    assert_eq!(
        g.handle.token().unwrap().access_token().expose_secret(),
        "fetched-2"
    );
}

/// With `revoke_on_clear`, `clear` is a logout too: a refresh under way is
/// not installed afterwards, and both tokens are revoked.
#[tokio::test]
async fn a_refresh_under_way_during_a_revoking_clear_is_dropped_and_revoked() {
    let mut g = gated(|b| b.revoke_on_clear());
    let refreshing = tokio::spawn({
        let handle = g.handle.clone();
        async move { handle.refresh_now().await }
    });
    g.started.recv().await.unwrap();
    g.handle.clear();
    g.gate.add_permits(1);
    assert!(refreshing.await.unwrap().is_err());
    assert!(g.handle.token().is_none());
    assert!(!g.handle.status().refreshing);
    tokio::time::timeout(Duration::from_secs(10), async {
        while g.revoked.lock().unwrap().len() < 2 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("both tokens are revoked");
    let mut revoked = g.revoked.lock().unwrap().clone();
    revoked.sort();
    assert_eq!(revoked, ["before-logout", "fetched-1"]);
}
