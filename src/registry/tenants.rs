//! [`TokenRegistry`]: one token manager per tenant, created lazily from a
//! store.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use futures::future::BoxFuture;

use crate::detect::ExpiryDetector;
use crate::layer::LayerConfig;
use crate::{
    AuthRefreshLayer, BoxError, RefreshContext, Token, TokenHandle, TokenHandleBuilder,
    TokenSource, TokenStatus, TokenStore,
};

/// The metadata key under which a stored token keeps the time it was last
/// used (unix milliseconds). It is written when the token is refreshed and by
/// [`TokenRegistry::flush_usage`], never on each request.
pub const LAST_USED_METADATA_KEY: &str = "last_used_ms";

/// The last-used time is kept to this resolution (milliseconds).
const LAST_USED_RESOLUTION_MS: u64 = 1000;

/// The tenant a request belongs to: put it in the request's extensions and
/// the [`AuthRoutingLayer`](crate::AuthRoutingLayer) sends it with that
/// tenant's token.
///
/// ```
/// use tower_auth_refresh::Tenant;
///
/// let request = http::Request::get("https://api.example.com/orders")
///     .extension(Tenant::new("seller-42"))
///     .body(())
///     .unwrap();
/// assert_eq!(request.extensions().get::<Tenant>().unwrap().as_str(), "seller-42");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tenant(Arc<str>);

impl Tenant {
    /// The tenant called `id`.
    pub fn new(id: impl AsRef<str>) -> Self {
        Self(Arc::from(id.as_ref()))
    }

    /// The tenant's id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

type SourceFactory = dyn Fn(&str) -> Box<dyn TokenSource> + Send + Sync;
type Configure = dyn Fn(TokenHandleBuilder) -> TokenHandleBuilder + Send + Sync;

/// One token per tenant (per seller, per customer account …), kept in a
/// [`TokenStore`] and managed by a [`TokenHandle`] created the first time the
/// tenant is used.
///
/// Every tenant's handle shares the registry's settings and whatever the
/// token-source factory captures (typically one token-endpoint client). The
/// time each tenant was last used is tracked in memory (an atomic read per
/// request, a write at most once a second) and written to the store with the token's metadata when the
/// token is refreshed, so bulk jobs
/// ([`refresh_all`](Self::refresh_all), [`remove_idle`](Self::remove_idle))
/// can tell active tenants from idle ones.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
/// use tower_auth_refresh::{MemoryStore, Token, TokenRegistry, token_source_fn};
///
/// let store = MemoryStore::new();
/// let registry = TokenRegistry::builder(store, |tenant: &str| {
///     let tenant = tenant.to_owned();
///     token_source_fn(move |_| {
///         let tenant = tenant.clone();
///         async move { Ok::<_, std::io::Error>(Token::bearer(format!("token-for-{tenant}"))) }
///     })
/// })
/// .configure(|handle| handle.refresh_ahead(Duration::from_secs(120)))
/// .build();
///
/// let handle = registry.get("seller-42");
/// let token = handle.refresh_now().await.unwrap();
/// assert_eq!(registry.tenants(), vec!["seller-42".to_owned()]);
/// # let _ = token;
/// # }
/// ```
#[derive(Clone)]
pub struct TokenRegistry {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) store: Arc<dyn TokenStore>,
    pub(crate) key_prefix: String,
    factory: Box<SourceFactory>,
    configure: Option<Box<Configure>>,
    /// NOTE: a sharded concurrent map: a lookup takes one shard's read
    /// lock, a new tenant one shard's write lock (O(1), never a copy of
    /// the map).
    entries: DashMap<Arc<str>, Arc<Entry>>,
    evict_idle: Option<Duration>,
    /// When idle tenants were last swept out (unix milliseconds).
    last_sweep_ms: AtomicU64,
    pub(crate) layer: Arc<LayerConfig>,
}

pub(crate) struct Entry {
    pub(crate) handle: TokenHandle,
    pub(crate) last_used_ms: Arc<AtomicU64>,
    created_ms: u64,
}

impl Entry {
    /// When the tenant was last used here, or loaded if it never was.
    fn active_ms(&self) -> u64 {
        self.last_used_ms
            .load(Ordering::Relaxed)
            .max(self.created_ms)
    }
}

impl fmt::Debug for TokenRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRegistry")
            .field("key_prefix", &self.inner.key_prefix)
            .field("tenants", &self.inner.entries.len())
            .finish_non_exhaustive()
    }
}

/// Configures a [`TokenRegistry`].
pub struct TokenRegistryBuilder {
    store: Arc<dyn TokenStore>,
    key_prefix: String,
    factory: Box<SourceFactory>,
    configure: Option<Box<Configure>>,
    evict_idle: Option<Duration>,
    layer: AuthRefreshLayer,
}

impl fmt::Debug for TokenRegistryBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRegistryBuilder")
            .field("key_prefix", &self.key_prefix)
            .finish_non_exhaustive()
    }
}

impl TokenRegistryBuilder {
    /// Store keys are `prefix` + tenant id (default: no prefix). Bulk jobs
    /// only look at keys with this prefix.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Applies the same settings to each tenant's [`TokenHandleBuilder`]
    /// (refresh-ahead, injector, timeouts, store timing …). The store is set
    /// by the registry, before `configure` runs.
    pub fn configure(
        mut self,
        configure: impl Fn(TokenHandleBuilder) -> TokenHandleBuilder + Send + Sync + 'static,
    ) -> Self {
        self.configure = Some(Box::new(configure));
        self
    }

    /// Forgets (unloads) tenants not used in this process for `after`, so a
    /// long-running service whose tenant ids come from its callers keeps a
    /// bounded number of handles. Their stored tokens stay; a tenant used
    /// again is loaded again from the store. Idle tenants are swept out
    /// when new tenants are loaded, at most once per `after / 2`. Default:
    /// tenants stay loaded until [`unload`](TokenRegistry::unload).
    pub fn evict_idle(mut self, after: Duration) -> Self {
        self.evict_idle = Some(after);
        self
    }

    /// The expiry detector for the tenants' requests (default
    /// [`Unauthorized`](crate::Unauthorized)).
    pub fn detector(mut self, detector: impl ExpiryDetector) -> Self {
        self.layer = self.layer.detector(detector);
        self
    }

    /// The most request-body bytes kept for a replay (see
    /// [`AuthRefreshLayer::max_replay_bytes`]).
    pub fn max_replay_bytes(mut self, limit: usize) -> Self {
        self.layer = self.layer.max_replay_bytes(limit);
        self
    }

    /// The response-body peek limit (see [`AuthRefreshLayer::peek_limit`]).
    pub fn peek_limit(mut self, limit: usize) -> Self {
        self.layer = self.layer.peek_limit(limit);
        self
    }

    /// Builds the registry. No tenant is loaded until it is used.
    pub fn build(self) -> TokenRegistry {
        TokenRegistry {
            inner: Arc::new(Inner {
                store: self.store,
                key_prefix: self.key_prefix,
                factory: self.factory,
                configure: self.configure,
                entries: DashMap::new(),
                evict_idle: self.evict_idle,
                last_sweep_ms: AtomicU64::new(now_ms()),
                layer: self.layer.config().clone(),
            }),
        }
    }
}

impl TokenRegistry {
    /// Starts a registry over `store`; `source_for(tenant)` makes the token
    /// source of a tenant (called once per tenant, when it is first used).
    pub fn builder<F, S>(store: impl TokenStore, source_for: F) -> TokenRegistryBuilder
    where
        F: Fn(&str) -> S + Send + Sync + 'static,
        S: TokenSource,
    {
        let placeholder = TokenHandle::new(crate::token_source_fn(|_| async {
            Err::<Token, _>(std::io::Error::other("placeholder handle"))
        }));
        TokenRegistryBuilder {
            store: Arc::new(store),
            key_prefix: String::new(),
            factory: Box::new(move |tenant| Box::new(source_for(tenant))),
            configure: None,
            evict_idle: None,
            layer: AuthRefreshLayer::new(placeholder),
        }
    }

    /// The handle of `tenant`, created (and its stored token loaded on first
    /// use) if this is the first time the tenant is asked for.
    pub fn get(&self, tenant: &str) -> TokenHandle {
        self.entry(tenant).handle.clone()
    }

    pub(crate) fn entry(&self, tenant: &str) -> Arc<Entry> {
        if let Some(entry) = self.inner.entries.get(tenant) {
            return entry.clone();
        }
        // NOTE: built outside the map's locks (`configure` is the caller's
        // code); when two callers race, the first insert wins and the
        // other handle is dropped unused.
        let last_used_ms = Arc::new(AtomicU64::new(0));
        let source = UsageRecordingSource {
            inner: (self.inner.factory)(tenant),
            last_used_ms: last_used_ms.clone(),
        };
        // The store first, so that `configure` can tune its timing.
        let mut builder =
            TokenHandle::builder(source).store(self.inner.store.clone(), self.store_key(tenant));
        if let Some(configure) = &self.inner.configure {
            builder = configure(builder);
        }
        let built = Arc::new(Entry {
            handle: builder.build(),
            last_used_ms,
            created_ms: now_ms(),
        });
        let entry = self
            .inner
            .entries
            .entry(Arc::from(tenant))
            .or_insert(built)
            .clone();
        self.sweep_idle();
        entry
    }

    /// Unloads the tenants idle for longer than `evict_idle`, at most once
    /// per half of it.
    fn sweep_idle(&self) {
        let Some(after) = self.inner.evict_idle else {
            return;
        };
        let after_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        let now = now_ms();
        let last = self.inner.last_sweep_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < after_ms / 2
            || self
                .inner
                .last_sweep_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let cutoff = now.saturating_sub(after_ms);
        self.inner
            .entries
            .retain(|_, entry| entry.active_ms() >= cutoff);
    }

    /// `true` when `tenant` is loaded in this process.
    pub(crate) fn is_loaded(&self, tenant: &str) -> bool {
        self.inner.entries.contains_key(tenant)
    }

    /// The handle of `tenant` for a request: also notes that it was used now.
    pub(crate) fn use_tenant(&self, tenant: &str) -> Arc<Entry> {
        let entry = self.entry(tenant);
        // NOTE: a read, and a write at most once a second per tenant, so busy
        // tenants do not make every core write the same cache line.
        let now = now_ms();
        if now.saturating_sub(entry.last_used_ms.load(Ordering::Relaxed)) >= LAST_USED_RESOLUTION_MS
        {
            entry.last_used_ms.store(now, Ordering::Relaxed);
        }
        entry
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }

    /// The store the tenants' tokens are kept in.
    pub fn store(&self) -> &Arc<dyn TokenStore> {
        &self.inner.store
    }

    /// The store key of `tenant`.
    pub fn store_key(&self, tenant: &str) -> String {
        format!("{}{}", self.inner.key_prefix, tenant)
    }

    /// The tenants loaded in this process, sorted.
    pub fn tenants(&self) -> Vec<String> {
        let mut tenants: Vec<String> = self
            .inner
            .entries
            .iter()
            .map(|entry| entry.key().to_string())
            .collect();
        tenants.sort();
        tenants
    }

    /// The status of a loaded tenant's token (no secret).
    pub fn status(&self, tenant: &str) -> Option<TokenStatus> {
        self.inner.entries.get(tenant).map(|e| e.handle.status())
    }

    /// When `tenant` was last used by a request in this process.
    pub fn last_used(&self, tenant: &str) -> Option<SystemTime> {
        let ms = self
            .inner
            .entries
            .get(tenant)?
            .last_used_ms
            .load(Ordering::Relaxed);
        (ms > 0).then(|| UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// Forgets a loaded tenant (its stored token stays).
    pub fn unload(&self, tenant: &str) -> bool {
        self.inner.entries.remove(tenant).is_some()
    }

    /// Writes each loaded tenant's last-used time into its stored token's
    /// metadata. Call it from time to time, or before a bulk job in another
    /// process.
    ///
    /// NOTE: the write is made under the key's refresh lease, as a
    /// compare-and-swap over the version just read, so it can never replace
    /// a token a refresh is saving: a tenant whose lease is held (a refresh
    /// is under way; it records the usage itself) is left for the next
    /// flush and counted as `busy`. A store error on one tenant is recorded
    /// in the report and the flush goes on.
    pub async fn flush_usage(&self) -> FlushReport {
        let mut report = FlushReport::default();
        let entries: Vec<(Arc<str>, u64)> = self
            .inner
            .entries
            .iter()
            .map(|entry| {
                (
                    entry.key().clone(),
                    entry.last_used_ms.load(Ordering::Relaxed),
                )
            })
            .filter(|(_, used)| *used > 0)
            .collect();
        for (tenant, used) in entries {
            match self.flush_one(&tenant, used).await {
                Ok(Flushed::Updated) => report.updated += 1,
                Ok(Flushed::Unchanged) => {}
                Ok(Flushed::Busy) => report.busy += 1,
                Err(err) => report.failed.push((tenant.to_string(), err.to_string())),
            }
        }
        report
    }

    async fn flush_one(&self, tenant: &str, used: u64) -> Result<Flushed, crate::StoreError> {
        let store = &self.inner.store;
        let key = self.store_key(tenant);
        let Some(lease) = store.try_lock(&key, FLUSH_LEASE_TTL).await? else {
            return Ok(Flushed::Busy);
        };
        let result = async {
            let Some(stored) = store.load(&key).await? else {
                return Ok(Flushed::Unchanged);
            };
            if last_used_ms(&stored.token).is_some_and(|at| at >= used) {
                return Ok(Flushed::Unchanged);
            }
            let token = stored
                .token
                .with_metadata(LAST_USED_METADATA_KEY, used.to_string());
            match store.save(&key, &token, Some(stored.version)).await {
                Ok(_) => Ok(Flushed::Updated),
                Err(crate::StoreError::Conflict { .. }) => Ok(Flushed::Busy),
                Err(err) => Err(err),
            }
        }
        .await;
        if let Err(err) = store.unlock(lease).await {
            tracing::debug!(error = %err, "could not release the usage-flush lease; it will expire");
        }
        result
    }
}

/// How long a usage flush holds a key's lease at most: a load and a save.
/// NOTE: short, so that a flush whose release is lost (the store paused
/// mid-flush) delays a refresh by a second at most; should the flush
/// outlive it, its compare-and-swap still cannot replace a newer token.
const FLUSH_LEASE_TTL: Duration = Duration::from_secs(1);

enum Flushed {
    Updated,
    Unchanged,
    Busy,
}

/// What [`TokenRegistry::flush_usage`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlushReport {
    /// Stored tokens whose last-used time was written.
    pub updated: usize,
    /// Tenants whose token was being refreshed (lease held, or the token
    /// changed meanwhile): left for the next flush.
    pub busy: usize,
    /// Tenants whose flush failed, with the store's error (no secret).
    pub failed: Vec<(String, String)>,
}

/// The last-used time recorded in a token's metadata, in unix milliseconds.
pub(crate) fn last_used_ms(token: &Token) -> Option<u64> {
    token.metadata().get(LAST_USED_METADATA_KEY)?.parse().ok()
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Wraps a tenant's token source so that each new token carries the time the
/// tenant was last used (from this process, or else from the previous token).
struct UsageRecordingSource {
    inner: Box<dyn TokenSource>,
    last_used_ms: Arc<AtomicU64>,
}

impl TokenSource for UsageRecordingSource {
    fn fetch(&self, cx: RefreshContext) -> BoxFuture<'static, Result<Token, BoxError>> {
        let previous = cx.previous.as_deref().and_then(last_used_ms);
        let here = self.last_used_ms.load(Ordering::Relaxed);
        let fetch = self.inner.fetch(cx);
        Box::pin(async move {
            let token = fetch.await?;
            let used = previous.unwrap_or(0).max(here);
            if used == 0 || last_used_ms(&token).is_some_and(|t| t >= used) {
                return Ok(token);
            }
            Ok(token.with_metadata(LAST_USED_METADATA_KEY, used.to_string()))
        })
    }
}
