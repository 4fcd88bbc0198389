//! Many stored tokens, one per tenant: lazy loading, per-request routing,
//! bulk refresh with a report, and idle clean-up.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Upstream, body_text, client, get};
use secrecy::ExposeSecret;
use tower::{Layer, ServiceExt};
use tower_auth_refresh::{
    AuthRoutingLayer, BoxError, LAST_USED_METADATA_KEY, MemoryStore, Origin,
    ReauthorizationRequired, RefreshAll, Tenant, Token, TokenRegistry, TokenStore, token_source_fn,
};

const DAY: Duration = Duration::from_secs(24 * 3600);

fn ms_ago(age: Duration) -> String {
    (SystemTime::now() - age)
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string()
}

/// A token server for tenants: `dead-*` tenants' refresh tokens are
/// rejected for good; `flaky-*` fail once in a transient way; the others get
/// `<tenant>-new-<n>`. Counts calls and the most refreshes in flight at once.
#[derive(Clone, Default)]
struct TenantIssuer {
    calls: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    upstream: Option<Upstream>,
}

impl TenantIssuer {
    fn registry(&self, store: MemoryStore) -> TokenRegistry {
        let this = self.clone();
        TokenRegistry::builder(store, move |tenant: &str| {
            let this = this.clone();
            let tenant = tenant.to_owned();
            token_source_fn(move |_| {
                let this = this.clone();
                let tenant = tenant.clone();
                async move {
                    let n = this.calls.fetch_add(1, Ordering::SeqCst) + 1;
                    let now = this.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    this.max_in_flight.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    this.in_flight.fetch_sub(1, Ordering::SeqCst);
                    if tenant.starts_with("dead-") {
                        return Err::<Token, BoxError>(Box::new(ReauthorizationRequired::new(
                            "invalid_grant: refresh token revoked",
                        )));
                    }
                    if tenant.starts_with("flaky-") {
                        return Err(Box::new(std::io::Error::other(
                            "token endpoint answered 503",
                        )));
                    }
                    let name = format!("{tenant}-new-{n}");
                    if let Some(upstream) = &this.upstream {
                        upstream.accept(&name);
                    }
                    Ok(Token::bearer(name).with_expires_in(Duration::from_secs(3600)))
                }
            })
        })
        .configure(|handle| handle.min_token_age(Duration::ZERO))
        .build()
    }
}

async fn seed(store: &MemoryStore, tenant: &str, last_used: Option<Duration>) {
    let mut token = Token::bearer(format!("{tenant}-old"))
        .with_refresh_token(format!("{tenant}-refresh"))
        .with_expires_in(Duration::from_secs(60));
    if let Some(age) = last_used {
        token = token.with_metadata(LAST_USED_METADATA_KEY, ms_ago(age));
    }
    store.save(tenant, &token, None).await.unwrap();
}

#[tokio::test]
async fn refresh_all_over_200_tenants_reports_and_deletes_the_dead() {
    let store = MemoryStore::new();
    for i in 0..200 {
        let tenant = match i % 20 {
            0 => format!("dead-{i:03}"),
            1 => format!("flaky-{i:03}"),
            _ => format!("seller-{i:03}"),
        };
        seed(&store, &tenant, Some(Duration::from_secs(60))).await;
    }
    let issuer = TenantIssuer::default();
    let registry = issuer.registry(store.clone());
    let progress = Arc::new(AtomicUsize::new(0));
    let seen = progress.clone();

    let report = registry
        .refresh_all(
            RefreshAll::new()
                .concurrency(8)
                .delete_dead(true)
                .on_progress(move |p| {
                    seen.fetch_add(1, Ordering::SeqCst);
                    assert_eq!(p.total, 200);
                }),
        )
        .await
        .unwrap();

    assert_eq!(report.total, 200);
    assert_eq!(report.refreshed, 180);
    assert_eq!(report.removed.len(), 10, "{report}");
    assert!(report.removed.iter().all(|(t, _)| t.starts_with("dead-")));
    assert_eq!(report.failed.len(), 10);
    assert!(
        report
            .failed
            .iter()
            .all(|(t, reason)| t.starts_with("flaky-") && reason.contains("503"))
    );
    assert!(report.has_failures());
    assert_eq!(progress.load(Ordering::SeqCst), 200);
    assert!(issuer.max_in_flight.load(Ordering::SeqCst) <= 8);

    // The dead are gone, the flaky are kept, the others hold new tokens.
    let mut keys = store.list_keys().await.unwrap();
    keys.sort();
    assert_eq!(keys.len(), 190);
    assert!(keys.iter().all(|k| !k.starts_with("dead-")));
    let stored = store.load("seller-002").await.unwrap().unwrap();
    assert!(
        stored
            .token
            .access_token()
            .expose_secret()
            .starts_with("seller-002-new-")
    );
    let flaky = store.load("flaky-001").await.unwrap().unwrap();
    assert_eq!(flaky.token.access_token().expose_secret(), "flaky-001-old");

    let table = report.to_string();
    assert!(
        table.contains("refreshed") && table.contains("180"),
        "{table}"
    );
    assert!(
        !table.contains("-refresh"),
        "no refresh token in the report"
    );
}

#[tokio::test]
async fn refresh_all_skips_the_unused_and_the_still_valid_and_a_dry_run_changes_nothing() {
    let store = MemoryStore::new();
    seed(&store, "active", Some(DAY)).await;
    seed(&store, "stale", Some(40 * DAY)).await;
    store
        .save(
            "long-lived",
            &Token::bearer("long").with_expires_in(10 * DAY),
            None,
        )
        .await
        .unwrap();
    let issuer = TenantIssuer::default();
    let registry = issuer.registry(store.clone());

    let job = RefreshAll::new()
        .used_within(7 * DAY)
        .refresh_if_expiring_within(Duration::from_secs(3600));
    let dry = registry
        .refresh_all(job.clone().dry_run(true))
        .await
        .unwrap();
    assert_eq!(
        (dry.would_refresh, dry.skipped_unused, dry.still_valid),
        (1, 1, 1)
    );
    assert_eq!(issuer.calls.load(Ordering::SeqCst), 0);

    let report = registry.refresh_all(job).await.unwrap();
    assert_eq!(
        (report.refreshed, report.skipped_unused, report.still_valid),
        (1, 1, 1)
    );
    assert_eq!(issuer.calls.load(Ordering::SeqCst), 1);
    let active = store.load("active").await.unwrap().unwrap();
    assert!(
        active
            .token
            .access_token()
            .expose_secret()
            .starts_with("active-new-")
    );
    assert!(
        active.token.metadata().contains_key(LAST_USED_METADATA_KEY),
        "the refreshed token keeps its last-used time"
    );
}

#[tokio::test]
async fn remove_idle_deletes_only_tokens_unused_for_longer_than_the_limit() {
    let store = MemoryStore::new();
    seed(&store, "recent", Some(DAY)).await;
    seed(&store, "idle", Some(45 * DAY)).await;
    seed(&store, "unknown", None).await;
    let registry = TenantIssuer::default().registry(store.clone());

    let dry = registry.remove_idle(30 * DAY, true).await.unwrap();
    assert_eq!(dry.removed.len(), 1);
    assert_eq!(store.list_keys().await.unwrap().len(), 3);

    let report = registry.remove_idle(30 * DAY, false).await.unwrap();
    assert_eq!(report.total, 3);
    assert_eq!(report.removed.len(), 1);
    assert_eq!(report.removed[0].0, "idle");
    let mut keys = store.list_keys().await.unwrap();
    keys.sort();
    assert_eq!(keys, vec!["recent".to_owned(), "unknown".to_owned()]);
}

#[tokio::test]
async fn a_request_carries_its_tenants_token_and_marks_it_used() {
    let upstream = Upstream::start().await;
    let store = MemoryStore::new();
    let issuer = TenantIssuer {
        upstream: Some(upstream.clone()),
        ..TenantIssuer::default()
    };
    let registry = issuer.registry(store.clone());
    // A valid stored token is used as is: no token call.
    store
        .save(
            "seller-a",
            &Token::bearer("stored-a").with_expires_in(DAY),
            None,
        )
        .await
        .unwrap();
    upstream.accept("stored-a");

    let service = AuthRoutingLayer::new()
        .tenants(Origin::parse(&upstream.url("/")).unwrap(), registry.clone())
        .layer(client());
    for tenant in ["seller-a", "seller-b"] {
        let mut request = get(&upstream.url("/orders"));
        request.extensions_mut().insert(Tenant::new(tenant));
        let response = service.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let text = body_text(response).await;
        assert!(
            text.starts_with(&format!(
                "ok {}",
                if tenant == "seller-a" {
                    "stored-a"
                } else {
                    "seller-b-new-"
                }
            )),
            "{text}"
        );
    }
    assert_eq!(
        issuer.calls.load(Ordering::SeqCst),
        1,
        "only seller-b had to fetch a token"
    );
    assert_eq!(
        registry.tenants(),
        vec!["seller-a".to_owned(), "seller-b".to_owned()]
    );
    assert!(registry.last_used("seller-a").is_some());

    // The usage reaches the store only when flushed, not per request.
    assert!(
        !store
            .load("seller-a")
            .await
            .unwrap()
            .unwrap()
            .token
            .metadata()
            .contains_key(LAST_USED_METADATA_KEY)
    );
    // seller-b's token was fetched after its use began, so it was saved with
    // its last-used time already; only seller-a's needs the write.
    assert!(
        store
            .load("seller-b")
            .await
            .unwrap()
            .unwrap()
            .token
            .metadata()
            .contains_key(LAST_USED_METADATA_KEY)
    );
    assert_eq!(registry.flush_usage().await.updated, 1);
    assert!(
        store
            .load("seller-a")
            .await
            .unwrap()
            .unwrap()
            .token
            .metadata()
            .contains_key(LAST_USED_METADATA_KEY)
    );

    // A tenant request to another origin gets no token.
    let other = Upstream::start().await;
    let mut request = get(&other.url("/orders"));
    request.extensions_mut().insert(Tenant::new("seller-a"));
    service.oneshot(request).await.unwrap();
    assert_eq!(other.seen()[0].authorization, None);
}

#[tokio::test]
async fn one_unreadable_entry_is_reported_and_the_clean_up_goes_on() {
    let dir = std::env::temp_dir().join(format!(
        "tower-auth-refresh-idle-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    let store = tower_auth_refresh::FileStore::new(&dir);
    for tenant in ["idle-a", "idle-b", "idle-c"] {
        let token = Token::bearer("t").with_metadata(LAST_USED_METADATA_KEY, ms_ago(90 * DAY));
        store.save(tenant, &token, None).await.unwrap();
    }
    // An entry that cannot be read at all (here: a directory in its place).
    std::fs::create_dir_all(dir.join("broken.json")).unwrap();
    let registry = TokenRegistry::builder(store.clone(), |_: &str| {
        token_source_fn(|_| async { Ok::<_, std::io::Error>(Token::bearer("new")) })
    })
    .build();

    let report = registry.remove_idle(30 * DAY, false).await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(report.total, 4, "{report}");
    assert_eq!(report.removed.len(), 3, "{report}");
    assert_eq!(report.failed.len(), 1, "{report}");
    assert_eq!(report.failed[0].0, "broken");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_uses_of_many_tenants_make_one_handle_each() {
    let store = MemoryStore::new();
    let registry = TokenRegistry::builder(store, |_: &str| {
        token_source_fn(|_| async { Ok::<_, std::io::Error>(Token::bearer("t")) })
    })
    .build();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let registry = registry.clone();
            tokio::spawn(async move {
                (0..5_000)
                    .map(|i| registry.get(&format!("tenant-{i}")))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut seen = Vec::new();
    for task in tasks {
        seen.push(task.await.unwrap());
    }
    assert_eq!(registry.tenants().len(), 5_000);
    // Every caller got the same handle for a tenant: one refresh for all.
    for i in [0, 1234, 4999] {
        let first = seen[0][i].refresh_now().await.unwrap();
        for other in &seen[1..] {
            assert_eq!(other[i].token(), Some(first.clone()), "tenant-{i}");
        }
    }
}

#[tokio::test]
async fn refresh_all_releases_the_tenants_it_loaded() {
    let store = MemoryStore::new();
    for i in 0..50 {
        seed(&store, &format!("seller-{i:02}"), None).await;
    }
    let registry = TenantIssuer::default().registry(store.clone());
    let kept = registry.get("seller-07");
    let report = registry.refresh_all(RefreshAll::new()).await.unwrap();
    assert_eq!(report.refreshed, 50);
    assert_eq!(
        registry.tenants(),
        ["seller-07"],
        "only the tenant loaded before the job stays loaded"
    );
    drop(kept);
}

#[tokio::test]
async fn idle_tenants_are_evicted_when_new_ones_arrive() {
    let store = MemoryStore::new();
    let registry = TokenRegistry::builder(store, |_: &str| {
        token_source_fn(|_| async { Ok::<_, std::io::Error>(Token::bearer("t")) })
    })
    .evict_idle(Duration::from_millis(50))
    .build();
    for i in 0..100 {
        registry.get(&format!("caller-supplied-{i}"));
    }
    assert_eq!(registry.tenants().len(), 100);
    tokio::time::sleep(Duration::from_millis(120)).await;
    registry.get("newcomer");
    assert_eq!(registry.tenants(), ["newcomer"]);
}
