//! [`TokenHandle`]: what an application holds to see and steer its token.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::fleet::{FleetStore, UnreachableStore};
use super::manager::{ManagerConfig, TokenManager};
use crate::{BoxError, Token, TokenInjector, TokenSource, TokenStore};

/// A cheap-to-clone handle on one token: its status, counters, and the
/// operations an application needs (refresh now, set, clear).
///
/// Build one with [`TokenHandle::builder`], give it to
/// [`AuthRefreshLayer::new`](crate::AuthRefreshLayer::new), and keep a clone.
///
/// ```
/// use std::time::Duration;
/// use tower_auth_refresh::{token_source_fn, RefreshContext, Token, TokenHandle};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_auth_refresh::BoxError> {
/// let handle = TokenHandle::builder(token_source_fn(|_cx: RefreshContext| async {
///     Ok::<_, std::io::Error>(Token::bearer("t-1").with_expires_in(Duration::from_secs(3600)))
/// }))
/// .refresh_ahead(Duration::from_secs(120))
/// .build();
///
/// handle.refresh_now().await?;
/// let status = handle.status();
/// assert!(status.valid);
/// assert_eq!(status.generation, 1);
/// assert_eq!(handle.stats().refreshes, 1);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct TokenHandle {
    pub(crate) manager: Arc<TokenManager>,
}

impl fmt::Debug for TokenHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenHandle")
            .field("status", &self.status())
            .finish()
    }
}

impl TokenHandle {
    /// A handle with default settings around `source`.
    pub fn new(source: impl TokenSource) -> Self {
        Self::builder(source).build()
    }

    /// Starts configuring a handle around `source`.
    pub fn builder(source: impl TokenSource) -> TokenHandleBuilder {
        TokenHandleBuilder {
            source: Box::new(source),
            config: ManagerConfig::default(),
            initial: None,
            store: None,
            store_timing: None,
            unreachable: UnreachableStore::default(),
        }
    }

    /// The state of the token at a glance. Contains no secret.
    pub fn status(&self) -> TokenStatus {
        let snapshot = self.manager.snapshot();
        let current = snapshot.current.as_ref();
        if let Some(current) = current {
            self.manager.report_expiry(current);
        }
        TokenStatus {
            has_token: current.is_some(),
            valid: current.is_some_and(|c| c.is_valid()),
            expires_in: current.and_then(|c| c.expires_in()),
            generation: current.map_or(0, |c| c.generation),
            should_refresh: current.is_none_or(|c| c.should_refresh()),
            refreshing: snapshot.refreshing,
            consecutive_failures: snapshot.consecutive_failures,
            last_refresh_at: snapshot.last_refresh_at,
            last_refresh_duration: snapshot.last_refresh_took,
            installed_at: current.map(|c| c.installed_wall()),
            last_error: snapshot.last_error,
            backoff_remaining: snapshot.backoff_remaining,
        }
    }

    /// The counters since the handle was built; [`RefreshStats::since`]
    /// gives the counts between two calls.
    pub fn stats(&self) -> RefreshStats {
        let counters = &self.manager.counters;
        RefreshStats {
            refreshes: counters.refreshes.load(Ordering::Relaxed),
            failures: counters.failures.load(Ordering::Relaxed),
            retries: counters.retries.load(Ordering::Relaxed),
            skipped_retries: counters.skipped_retries.load(Ordering::Relaxed),
            waited: counters.waited.load(Ordering::Relaxed),
            waited_first_token: counters.waited_first_token.load(Ordering::Relaxed),
            adopted: counters.adopted.load(Ordering::Relaxed),
        }
    }

    /// The current token, if there is one.
    pub fn token(&self) -> Option<Arc<Token>> {
        self.manager.current().map(|c| c.token.clone())
    }

    /// A token that may be sent now: the current one while it is usable,
    /// otherwise the result of the one refresh for everybody (adopting a
    /// valid token from the store, when there is one, before calling the
    /// token source). What a request does before it is sent.
    pub async fn valid_token(&self) -> Result<Arc<Token>, BoxError> {
        Ok(self.manager.wait_for_current().await?.token.clone())
    }

    /// Fetches a new token now (joining a refresh already in flight), even
    /// inside a back-off window, and returns it.
    pub async fn refresh_now(&self) -> Result<Arc<Token>, BoxError> {
        Ok(self.manager.refresh_now().await?.token.clone())
    }

    /// Installs a token obtained elsewhere (for example by exchanging an
    /// authorization code). It gets a new generation; any back-off ends.
    ///
    /// With a [`TokenStore`](crate::TokenStore), the token is saved in the
    /// background, under the key's lease, with compare-and-swap: only over
    /// the stored entry of the token it replaces (or one with the same
    /// refresh token), never over an entry whose refresh token has moved on
    /// since, and not at all once this process has refreshed from it. When
    /// it is not saved, the next refresh starts from the stored token.
    pub fn set_token(&self, token: Token) -> Result<(), crate::InvalidTokenValue> {
        self.manager.set_token(token).map(drop)
    }

    /// Forgets the current token: the next request waits for a new one.
    /// With [`revoke_on_clear`](TokenHandleBuilder::revoke_on_clear), the
    /// forgotten token is also revoked, in a background task.
    pub fn clear(&self) {
        let revoke = self.manager.config.revoke_on_clear;
        let token = self.manager.clear(revoke);
        if let (true, Some(token)) = (revoke, token) {
            self.revoke_in_background(token);
        }
    }

    /// Forgets the current token and revokes it at the server (for an
    /// OAuth2 source with a revocation URL: its refresh token, RFC 7009),
    /// so that nobody can use it any more: a logout. The token is forgotten
    /// even when the revocation fails.
    pub async fn revoke(&self) -> Result<(), BoxError> {
        match self.manager.clear(true) {
            Some(token) => self.manager.revoke(token).await,
            None => Ok(()),
        }
    }

    fn revoke_in_background(&self, token: Arc<Token>) {
        let Some(runtime) = super::background::runtime_for_caller() else {
            tracing::warn!("no Tokio runtime: the cleared token was not revoked");
            return;
        };
        let revoke = self.manager.revoke(token);
        let revoke = async move {
            if let Err(err) = revoke.await {
                tracing::warn!(error = %err, "revoking the cleared token failed");
            }
        };
        runtime.spawn(tracing::instrument::WithSubscriber::with_current_subscriber(revoke));
    }
}

/// Configures a [`TokenHandle`].
pub struct TokenHandleBuilder {
    source: Box<dyn TokenSource>,
    config: ManagerConfig,
    initial: Option<Token>,
    store: Option<(Arc<dyn TokenStore>, String)>,
    /// Set by `store_timing`; applied at `build`, whatever the order of the
    /// builder calls.
    store_timing: Option<StoreTiming>,
    /// What a refresh does when it cannot coordinate with the fleet.
    unreachable: UnreachableStore,
}

/// The timings of the fleet protocol, as given to `store_timing`.
#[derive(Debug, Clone, Copy)]
struct StoreTiming {
    lease_ttl: Duration,
    poll_interval: Duration,
    op_timeout: Duration,
}

impl fmt::Debug for TokenHandleBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenHandleBuilder")
            .field("config", &self.config)
            .field("initial", &self.initial)
            .finish_non_exhaustive()
    }
}

impl TokenHandleBuilder {
    /// The name of this token in metrics (the `token` label; default
    /// `default`), for a program that keeps several tokens. Feature
    /// `metrics`; without it the name is kept but not reported.
    pub fn name(mut self, name: impl AsRef<str>) -> Self {
        self.config.name = Arc::from(name.as_ref());
        self
    }

    /// Where the token goes on requests (default `Authorization: Bearer …`).
    pub fn injector(mut self, injector: TokenInjector) -> Self {
        self.config.injector = injector;
        self
    }

    /// How long before expiry a token is refreshed in the background while
    /// requests keep using it. Default 60 s; never more than half the
    /// token's lifetime, and shortened by up to 10 % of jitter.
    pub fn refresh_ahead(mut self, ahead: Duration) -> Self {
        self.config.refresh_ahead = Some(ahead);
        self
    }

    /// Turns off proactive refresh: tokens are refreshed when they expire or
    /// are rejected.
    pub fn no_refresh_ahead(mut self) -> Self {
        self.config.refresh_ahead = None;
        self
    }

    /// A token with less than this left is treated as expired: requests wait
    /// for the refresh instead of racing the expiry. Default 1 s, at most a
    /// quarter of the token's lifetime.
    pub fn min_validity(mut self, min: Duration) -> Self {
        self.config.min_validity = min;
        self
    }

    /// How long a token source may take. Default 30 s.
    pub fn refresh_timeout(mut self, timeout: Duration) -> Self {
        self.config.refresh_timeout = timeout;
        self
    }

    /// The back-off window after a failed refresh: starts at `min`, doubles
    /// on each further failure up to `max`, with ±10 % jitter. Default
    /// 500 ms to 60 s.
    ///
    /// A refresh that brings a token with no lifetime left (`expires_in`
    /// of 0, or an expiry behind the local clock) counts into the same
    /// window: the token is used (the upstream decides) for one back-off
    /// step, at least 1 s, instead of being refreshed on every request.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.config.backoff_min = min;
        self.config.backoff_max = max;
        self
    }

    /// A token rejected by the upstream before it is this old is not
    /// refreshed again; the upstream's answer is returned instead (an
    /// endpoint that always answers 401 is a permission problem). Default
    /// 5 s, and never more than a quarter of the token's lifetime.
    ///
    /// With a [`store`](Self::store), the store is read first: when another
    /// process saved a newer token (servers that revoke the old access token
    /// when they rotate the refresh token do this to a fleet), or is saving
    /// one (its lease is held), the request is retried with it.
    pub fn min_token_age(mut self, age: Duration) -> Self {
        self.config.min_token_age = age;
        self
    }

    /// Keeps the token in `store` under `key`: a stored valid token is used
    /// instead of fetching one (restarts make no token call), every refresh
    /// is saved, and processes sharing the store refresh once between them
    /// (the store's lease decides who; the others adopt the saved token).
    /// When the store is out of reach, the refresh follows
    /// [`when_store_unreachable`](Self::when_store_unreachable).
    pub fn store(mut self, store: impl TokenStore, key: impl Into<String>) -> Self {
        self.store = Some((Arc::new(store), key.into()));
        self
    }

    /// How long a refresh lease is held at most (default: the refresh timeout
    /// plus 5 s), how often a process waiting for another's refresh re-reads
    /// the store (default 50 ms), and how long one store operation may take
    /// before the store counts as unavailable (default 2 s). Without
    /// [`store`](Self::store) these are not used; with it, the order of the
    /// calls does not matter.
    ///
    /// The lease never ends before the refresh it guards could: a `lease_ttl`
    /// shorter than the refresh timeout plus `op_timeout` (the save after
    /// the token call) is raised to that, with a warning, so that two
    /// processes never present the same refresh token. No lease lasts more
    /// than a day.
    pub fn store_timing(
        mut self,
        lease_ttl: Duration,
        poll_interval: Duration,
        op_timeout: Duration,
    ) -> Self {
        self.store_timing = Some(StoreTiming {
            lease_ttl,
            poll_interval,
            op_timeout,
        });
        self
    }

    /// [`TokenHandle::clear`] also revokes the token it forgets, in a
    /// background task (see [`TokenHandle::revoke`]).
    pub fn revoke_on_clear(mut self) -> Self {
        self.config.revoke_on_clear = true;
        self
    }

    /// What a refresh does when it cannot coordinate with the other
    /// processes sharing the store: the store does not answer, or the lease
    /// cannot be had in time. Default [`UnreachableStore::InitialGrantOnly`]:
    /// the refresh token is not presented (another process may have spent
    /// it); the token source may use a grant that does not rotate.
    ///
    /// ```
    /// use tower_auth_refresh::{MemoryStore, Token, TokenHandle, UnreachableStore, token_source_fn};
    ///
    /// let handle = TokenHandle::builder(token_source_fn(|_cx| async {
    ///     Ok::<_, std::io::Error>(Token::bearer("t"))
    /// }))
    /// .store(MemoryStore::new(), "api")
    /// .when_store_unreachable(UnreachableStore::Fail)
    /// .build();
    /// # let _ = handle;
    /// ```
    pub fn when_store_unreachable(mut self, policy: UnreachableStore) -> Self {
        self.unreachable = policy;
        self
    }

    /// Starts with this token instead of fetching one on the first request.
    ///
    /// With a [`TokenStore`](crate::TokenStore) it is a fallback: it is
    /// saved only when the store has no entry for the key, never over a
    /// stored one (a replica started after the fleet rotated the token must
    /// not bring the spent refresh token back); the first refresh starts
    /// from the stored token.
    pub fn initial_token(mut self, token: Token) -> Self {
        self.initial = Some(token);
        self
    }

    /// Builds the handle. An initial token that cannot be made into a
    /// header is dropped (the first request fetches one).
    pub fn build(self) -> TokenHandle {
        let store = self
            .store
            .map(|(store, key)| fleet_store(store, key, self.store_timing, &self.config))
            .map(|store| FleetStore {
                unreachable: self.unreachable,
                ..store
            });
        TokenHandle {
            manager: TokenManager::new(self.source, store, self.config, self.initial),
        }
    }
}

/// No lease is held longer than this, whatever the settings (stores keep
/// lease expiries as instants and timestamps).
const MAX_LEASE_TTL: Duration = Duration::from_secs(24 * 3600);

/// The store with its timings: the defaults, or those given, with the lease
/// long enough for the refresh it guards.
fn fleet_store(
    store: Arc<dyn TokenStore>,
    key: String,
    timing: Option<StoreTiming>,
    config: &ManagerConfig,
) -> FleetStore {
    let refresh_timeout = config.refresh_timeout;
    let timing = timing.unwrap_or(StoreTiming {
        lease_ttl: refresh_timeout.saturating_add(Duration::from_secs(5)),
        poll_interval: Duration::from_millis(50),
        op_timeout: Duration::from_secs(2),
    });
    let shortest = refresh_timeout.saturating_add(timing.op_timeout);
    if timing.lease_ttl < shortest {
        tracing::warn!(
            lease_ttl_ms = u64::try_from(timing.lease_ttl.as_millis()).unwrap_or(u64::MAX),
            raised_to_ms = u64::try_from(shortest.as_millis()).unwrap_or(u64::MAX),
            "store lease shorter than the refresh timeout plus the store timeout; raised"
        );
    }
    FleetStore {
        store,
        key,
        lease_ttl: timing.lease_ttl.max(shortest).min(MAX_LEASE_TTL),
        poll_interval: timing.poll_interval,
        op_timeout: timing.op_timeout,
        unreachable: UnreachableStore::default(),
        locally_spent: Arc::default(),
    }
}

/// The state of a token at a glance; contains no secret.
///
/// Serializes to JSON with durations in milliseconds and times as unix
/// milliseconds, for a status endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TokenStatus {
    /// A token is installed.
    pub has_token: bool,
    /// The token may be sent (not expired, not rejected).
    pub valid: bool,
    /// Time left before the token expires, if its expiry is known.
    #[serde(rename = "expires_in_ms", serialize_with = "ser::duration_ms")]
    pub expires_in: Option<Duration>,
    /// The token's generation: 0 before the first token, then +1 per token.
    pub generation: u64,
    /// The token is inside its refresh-ahead window, expired or missing.
    pub should_refresh: bool,
    /// A refresh is in flight.
    pub refreshing: bool,
    /// Refreshes that failed in a row.
    pub consecutive_failures: u32,
    /// When the last successful refresh finished.
    #[serde(rename = "last_refresh_at_ms", serialize_with = "ser::time_ms")]
    pub last_refresh_at: Option<SystemTime>,
    /// How long the last successful refresh took.
    #[serde(
        rename = "last_refresh_duration_ms",
        serialize_with = "ser::duration_ms"
    )]
    pub last_refresh_duration: Option<Duration>,
    /// When the current token was installed.
    #[serde(rename = "installed_at_ms", serialize_with = "ser::time_ms")]
    pub installed_at: Option<SystemTime>,
    /// The last refresh error, while failures last.
    pub last_error: Option<String>,
    /// Time left in the back-off window, if one is open.
    #[serde(rename = "backoff_remaining_ms", serialize_with = "ser::duration_ms")]
    pub backoff_remaining: Option<Duration>,
}

/// Counters of a [`TokenHandle`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RefreshStats {
    /// Tokens fetched successfully (the first one included).
    pub refreshes: u64,
    /// Token-source calls that failed or timed out.
    pub failures: u64,
    /// Requests sent a second time after a refresh.
    pub retries: u64,
    /// Rejected requests that were not retried (body not replayable, token too fresh).
    pub skipped_retries: u64,
    /// Requests that had to wait because the token had expired (or been
    /// rejected) and its refresh was not done yet: a growing count means
    /// refreshes fall behind (refresh ahead of expiry is off or too short,
    /// or the token source is slow).
    pub waited: u64,
    /// Requests that waited for a first token: none was installed yet (at
    /// start, or after [`TokenHandle::clear`]). Expected once per start.
    pub waited_first_token: u64,
    /// Tokens taken from the store because another process (or an earlier
    /// run) had already fetched them.
    pub adopted: u64,
}

impl RefreshStats {
    /// What happened between `earlier` and `self`, two snapshots of the
    /// same handle: each counter's difference (zero rather than negative
    /// when the snapshots are given the wrong way round).
    ///
    /// ```
    /// # use tower_auth_refresh::{Token, TokenHandle, token_source_fn};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_auth_refresh::BoxError> {
    /// # let handle = TokenHandle::new(token_source_fn(|_| async {
    /// #     Ok::<_, std::io::Error>(Token::bearer("t"))
    /// # }));
    /// let before = handle.stats();
    /// handle.refresh_now().await?;
    /// let last_minute = handle.stats().since(&before);
    /// assert_eq!(last_minute.refreshes, 1);
    /// # Ok(()) }
    /// ```
    pub fn since(&self, earlier: &RefreshStats) -> RefreshStats {
        RefreshStats {
            refreshes: self.refreshes.saturating_sub(earlier.refreshes),
            failures: self.failures.saturating_sub(earlier.failures),
            retries: self.retries.saturating_sub(earlier.retries),
            skipped_retries: self.skipped_retries.saturating_sub(earlier.skipped_retries),
            waited: self.waited.saturating_sub(earlier.waited),
            waited_first_token: self
                .waited_first_token
                .saturating_sub(earlier.waited_first_token),
            adopted: self.adopted.saturating_sub(earlier.adopted),
        }
    }
}

impl std::ops::Sub for RefreshStats {
    type Output = RefreshStats;

    /// `later - earlier`: the same as [`RefreshStats::since`].
    fn sub(self, earlier: RefreshStats) -> RefreshStats {
        self.since(&earlier)
    }
}

mod ser {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde::Serializer;

    pub(super) fn duration_ms<S: Serializer>(
        d: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn time_ms<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        duration_ms(&t.and_then(|t| t.duration_since(UNIX_EPOCH).ok()), s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemoryStore, RefreshContext, token_source_fn};

    fn builder() -> TokenHandleBuilder {
        TokenHandle::builder(token_source_fn(|_cx: RefreshContext| async {
            Ok::<_, std::io::Error>(Token::bearer("t"))
        }))
    }

    fn lease_ttl(handle: &TokenHandle) -> Duration {
        handle.manager.store_lease_ttl().unwrap()
    }

    #[test]
    fn extreme_durations_build_without_panicking() {
        let handle = builder()
            .refresh_timeout(Duration::MAX)
            .backoff(Duration::MAX, Duration::MAX)
            .min_token_age(Duration::MAX)
            .refresh_ahead(Duration::MAX)
            .min_validity(Duration::MAX)
            .store(MemoryStore::new(), "k")
            .build();
        assert_eq!(lease_ttl(&handle), Duration::from_secs(24 * 3600));
    }

    #[test]
    fn store_timing_counts_before_or_after_store() {
        let ms = Duration::from_millis;
        let timing = (Duration::from_secs(60), ms(10), ms(500));
        let before = builder()
            .store_timing(timing.0, timing.1, timing.2)
            .store(MemoryStore::new(), "k")
            .build();
        let after = builder()
            .store(MemoryStore::new(), "k")
            .store_timing(timing.0, timing.1, timing.2)
            .build();
        assert_eq!(lease_ttl(&before), Duration::from_secs(60));
        assert_eq!(lease_ttl(&after), Duration::from_secs(60));
    }

    #[test]
    fn a_lease_shorter_than_the_refresh_is_raised() {
        let handle = builder()
            .refresh_timeout(Duration::from_secs(30))
            .store(MemoryStore::new(), "k")
            .store_timing(
                Duration::from_secs(1),
                Duration::from_millis(50),
                Duration::from_secs(2),
            )
            .build();
        assert_eq!(lease_ttl(&handle), Duration::from_secs(32));
    }
}
