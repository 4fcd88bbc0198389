//! The token manager: the current token, its generation, the single
//! in-flight refresh and the back-off after failures.
//!
//! NOTE: the invariants of this file.
//! - Readers (`acquire`) take no lock: one `ArcSwapOption` load and one
//!   atomic load of the token's freshness (see `current.rs`).
//! - `refresh` decides under the `state` mutex (never held across `.await`)
//!   whether to join the in-flight refresh, fail fast (back-off) or start a
//!   new one. A refresh runs as a spawned task shared through
//!   `futures::Shared`, so a caller that is dropped cannot cancel it.
//! - The task installs the new token and clears `in_flight` under the same
//!   lock, so a caller that sees no refresh in flight also sees its result.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use futures::future::{BoxFuture, FutureExt, Shared};
use http::HeaderValue;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::Instrument;

use super::current::{Current, Timing, Use};
use super::fetch::{Fetcher, Obtained, Previous};
use super::fleet::FleetStore;
use crate::error::{RefreshError, RefreshFailed};
use crate::{BoxError, RefreshReason, Token, TokenInjector, TokenSource};

/// Settings of a [`TokenManager`], set through
/// [`TokenHandleBuilder`](crate::TokenHandleBuilder).
#[derive(Debug, Clone)]
pub(crate) struct ManagerConfig {
    pub(crate) injector: TokenInjector,
    pub(crate) refresh_ahead: Option<Duration>,
    pub(crate) min_validity: Duration,
    pub(crate) refresh_timeout: Duration,
    pub(crate) backoff_min: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) min_token_age: Duration,
    /// [`TokenHandle::clear`](crate::TokenHandle::clear) also revokes.
    pub(crate) revoke_on_clear: bool,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            injector: TokenInjector::bearer(),
            refresh_ahead: Some(Duration::from_secs(60)),
            min_validity: Duration::from_secs(1),
            refresh_timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            min_token_age: Duration::from_secs(5),
            revoke_on_clear: false,
        }
    }
}

/// What a request gets from [`TokenManager::acquire`].
pub(crate) enum Acquired {
    /// A usable token: its prepared header and generation.
    Ready(HeaderValue, u64),
    /// No usable token: wait for [`TokenManager::wait_for_token`].
    Wait,
}

/// What to do after the upstream rejected a token.
pub(crate) enum Rejection {
    /// The token is younger than the minimum age: return the upstream's answer.
    TooFresh,
    /// Retry once the future resolves (at once if it already has).
    Retry(BoxFuture<'static, Result<(HeaderValue, u64), BoxError>>),
}

type SharedRefresh = Shared<BoxFuture<'static, Result<Arc<Current>, RefreshError>>>;

enum Start {
    Ready(Arc<Current>),
    Wait(SharedRefresh),
    Failed(RefreshError),
}

#[derive(Default)]
struct RefreshState {
    in_flight: Option<SharedRefresh>,
    next_generation: u64,
    backoff_until: Option<Instant>,
    backoff_window: Duration,
    last_error: Option<RefreshError>,
    consecutive_failures: u32,
    last_refresh_at: Option<SystemTime>,
    last_refresh_took: Option<Duration>,
    timer: Option<AbortHandle>,
    /// Bumped by every `clear`: a refresh started in an older epoch is not
    /// installed.
    epoch: u64,
    /// The epoch the latest revoking `clear` ended; a refresh started
    /// before it has its freshly fetched token revoked.
    revoked_before: u64,
}

/// Counters kept by the manager; read with `TokenHandle::stats`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) refreshes: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) skipped_retries: AtomicU64,
    pub(crate) waited: AtomicU64,
    pub(crate) adopted: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A snapshot of the state, for `TokenHandle::status`.
pub(crate) struct Snapshot {
    pub(crate) current: Option<Arc<Current>>,
    pub(crate) consecutive_failures: u32,
    pub(crate) last_refresh_at: Option<SystemTime>,
    pub(crate) last_refresh_took: Option<Duration>,
    pub(crate) last_error: Option<String>,
    pub(crate) backoff_remaining: Option<Duration>,
    pub(crate) refreshing: bool,
}

/// The shared core behind every [`TokenHandle`](crate::TokenHandle) and layer.
pub(crate) struct TokenManager {
    current: ArcSwapOption<Current>,
    fetcher: Fetcher,
    store: Option<FleetStore>,
    pub(crate) config: ManagerConfig,
    state: Mutex<RefreshState>,
    pub(crate) counters: Counters,
    weak_self: Weak<TokenManager>,
}

impl TokenManager {
    pub(crate) fn new(
        source: Box<dyn TokenSource>,
        store: Option<FleetStore>,
        config: ManagerConfig,
        initial: Option<Token>,
    ) -> Arc<Self> {
        let manager = Arc::new_cyclic(|weak_self| Self {
            current: ArcSwapOption::empty(),
            fetcher: Fetcher::new(source, config.refresh_timeout),
            store,
            config,
            state: Mutex::new(RefreshState::default()),
            counters: Counters::default(),
            weak_self: weak_self.clone(),
        });
        if let Some(token) = initial {
            if manager.set_token(token).is_err() {
                tracing::warn!("initial token cannot be sent as a header; fetching a new one");
            }
        }
        manager
    }

    fn lock(&self) -> MutexGuard<'_, RefreshState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The hot path: the current token's header and generation, with no lock
    /// and no clock read.
    #[inline]
    pub(crate) fn acquire(&self) -> Acquired {
        let guard = self.current.load();
        let Some(current) = guard.as_ref() else {
            return Acquired::Wait;
        };
        match current.use_now() {
            Use::Send => {}
            Use::SendAndRefresh => {
                // The refresh runs in its own task; nobody needs to await it.
                let _ = self.refresh(Some(current.generation), RefreshReason::Proactive);
            }
            Use::Wait => return Acquired::Wait,
        }
        Acquired::Ready(current.local_header(), current.generation)
    }

    /// The current token, if any.
    pub(crate) fn current(&self) -> Option<Arc<Current>> {
        self.current.load_full()
    }

    /// Waits until a usable token is installed, refreshing if needed.
    pub(crate) async fn wait_for_token(&self) -> Result<(HeaderValue, u64), BoxError> {
        let current = self.wait_for_current().await?;
        Ok((current.header.clone(), current.generation))
    }

    /// The current token while it is usable, else the refreshed one.
    pub(crate) async fn wait_for_current(&self) -> Result<Arc<Current>, BoxError> {
        let (seen, reason) = match self.current.load_full() {
            Some(current) if current.is_usable() => return Ok(current),
            Some(current) => (current.generation, RefreshReason::Expired),
            None => (0, RefreshReason::Initial),
        };
        self.run(Some(seen), reason).await
    }

    /// Called when the upstream rejected the token of `generation`.
    pub(crate) fn on_rejected(&self, generation: u64) -> Rejection {
        if let Some(current) = self.current.load_full() {
            if current.generation != generation && current.is_usable() {
                let ready = (current.header.clone(), current.generation);
                return Rejection::Retry(Box::pin(async move { Ok(ready) }));
            }
            if current.generation == generation && current.age() < self.config.min_token_age {
                return Rejection::TooFresh;
            }
        }
        let start = self.refresh(Some(generation), RefreshReason::Rejected);
        Rejection::Retry(Box::pin(async move {
            let current = Self::finish(start).await?;
            Ok((current.header.clone(), current.generation))
        }))
    }

    /// Refreshes now, whatever the state, joining a refresh in flight.
    pub(crate) async fn refresh_now(&self) -> Result<Arc<Current>, BoxError> {
        self.run(None, RefreshReason::Manual).await
    }

    async fn run(
        &self,
        seen: Option<u64>,
        reason: RefreshReason,
    ) -> Result<Arc<Current>, BoxError> {
        let start = self.refresh(seen, reason);
        Self::finish(start).await
    }

    async fn finish(start: Start) -> Result<Arc<Current>, BoxError> {
        match start {
            Start::Ready(current) => Ok(current),
            Start::Wait(shared) => shared.await.map_err(RefreshError::into_box),
            Start::Failed(err) => Err(err.into_box()),
        }
    }

    /// Joins the refresh in flight or starts one. `seen` is the generation
    /// the caller found wanting; `None` forces a refresh (manual).
    fn refresh(&self, seen: Option<u64>, reason: RefreshReason) -> Start {
        let mut state = self.lock();
        let current = self.current.load_full();
        if let (Some(seen), Some(current)) = (seen, current.as_ref()) {
            if current.generation != seen && current.is_usable() {
                return Start::Ready(current.clone());
            }
        }
        if let Some(in_flight) = &state.in_flight {
            return Start::Wait(in_flight.clone());
        }
        if reason != RefreshReason::Manual {
            if let (Some(until), Some(err)) = (state.backoff_until, &state.last_error) {
                if Instant::now() < until {
                    return Start::Failed(err.for_backoff());
                }
            }
        }
        if reason == RefreshReason::Rejected {
            if let Some(current) = current.as_ref() {
                current.mark_rejected();
            }
        }
        let Some(manager) = self.weak_self.upgrade() else {
            return Start::Failed(RefreshError::Failed(RefreshFailed::from_message(
                "token manager dropped",
            )));
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Start::Failed(RefreshError::Failed(RefreshFailed::from_message(
                "token refresh needs a tokio runtime",
            )));
        };
        let previous = current;
        let generation = state.next_generation;
        let epoch = state.epoch;
        let span = tracing::info_span!(
            "token_refresh",
            reason = reason.as_str(),
            generation,
            duration_ms = tracing::field::Empty,
        );
        let task = runtime.spawn(
            manager
                .fetch_and_install(previous, reason, epoch)
                .instrument(span),
        );
        let shared = async move {
            task.await.unwrap_or_else(|_| {
                Err(RefreshError::Failed(RefreshFailed::from_message(
                    "token refresh task was cancelled",
                )))
            })
        }
        .boxed()
        .shared();
        state.in_flight = Some(shared.clone());
        Start::Wait(shared)
    }

    async fn fetch_and_install(
        self: Arc<Self>,
        previous: Option<Arc<Current>>,
        reason: RefreshReason,
        epoch: u64,
    ) -> Result<Arc<Current>, RefreshError> {
        let started = Instant::now();
        let previous = previous.map_or_else(Previous::default, |c| Previous {
            token: Some(c.token.clone()),
            store_version: c.store_version,
        });
        let result = match &self.store {
            Some(store) => store.obtain(&self.fetcher, previous, reason).await,
            None => self
                .fetcher
                .fetch(previous.token, reason)
                .await
                .map(Obtained::fetched),
        };
        let took = started.elapsed();
        tracing::Span::current().record("duration_ms", took.as_millis() as u64);
        let mut state = self.lock();
        if state.epoch != epoch {
            let revoke = state.revoked_before > epoch;
            drop(state);
            return Err(self.discard_cleared(result, revoke));
        }
        state.in_flight = None;
        let installed = result.and_then(|obtained| {
            let adopted = obtained.adopted;
            self.install(&mut state, obtained.token, obtained.store_version)
                .map(|current| (current, adopted))
                .map_err(|err| RefreshError::Failed(RefreshFailed::new(Arc::new(err))))
        });
        match installed {
            Ok((current, adopted)) => {
                if adopted {
                    Counters::bump(&self.counters.adopted);
                } else {
                    Counters::bump(&self.counters.refreshes);
                }
                state.consecutive_failures = 0;
                state.backoff_until = None;
                state.backoff_window = Duration::ZERO;
                state.last_error = None;
                state.last_refresh_at = Some(SystemTime::now());
                state.last_refresh_took = Some(took);
                tracing::debug!(generation = current.generation, "token refreshed");
                Ok(current)
            }
            Err(err) => {
                Counters::bump(&self.counters.failures);
                state.consecutive_failures = state.consecutive_failures.saturating_add(1);
                let window = next_backoff(state.backoff_window, &self.config);
                state.backoff_window = window;
                let until = Instant::now() + window;
                state.backoff_until = Some(until);
                state.last_error = Some(err.clone());
                tracing::warn!(
                    error = %err,
                    failures = state.consecutive_failures,
                    backoff_ms = window.as_millis() as u64,
                    "token refresh failed"
                );
                if let Some(current) = self.current.load_full() {
                    current.rearm_after_backoff(until);
                }
                Err(err)
            }
        }
    }

    /// NOTE: a refresh that started before a `clear` must not bring a token
    /// back (it would undo a logout): its result is dropped, and a token it
    /// fetched (not one adopted from a store) is revoked when that `clear`
    /// revoked. `clear` has already forgotten this refresh (`in_flight`).
    fn discard_cleared(
        &self,
        result: Result<Obtained, RefreshError>,
        revoke: bool,
    ) -> RefreshError {
        tracing::debug!("token cleared during the refresh; its result is dropped");
        if let (true, Ok(obtained)) = (revoke, result) {
            if !obtained.adopted {
                let revoke = self.fetcher.revoke(Arc::new(obtained.token));
                tokio::spawn(async move {
                    if let Err(err) = revoke.await {
                        tracing::warn!(error = %err, "revoking a token fetched during a logout failed");
                    }
                });
            }
        }
        RefreshError::Failed(RefreshFailed::from_message(
            "the token was cleared while this refresh was under way",
        ))
    }

    /// Installs `token` as the new current token. Called with the state locked.
    fn install(
        &self,
        state: &mut RefreshState,
        token: Token,
        store_version: Option<u64>,
    ) -> Result<Arc<Current>, crate::InvalidTokenValue> {
        let header = self.config.injector.prepare(&token)?;
        state.next_generation += 1;
        let timing = Timing {
            refresh_ahead: self.config.refresh_ahead,
            min_validity: self.config.min_validity,
        };
        let current = Current::new(
            token,
            header,
            state.next_generation,
            store_version.unwrap_or(0),
            timing,
        );
        if let Some(timer) = state.timer.take() {
            timer.abort();
        }
        state.timer = current.arm_timer();
        self.current.store(Some(current.clone()));
        Ok(current)
    }

    /// Installs a token given by the application; resets the back-off.
    pub(crate) fn set_token(&self, token: Token) -> Result<Arc<Current>, crate::InvalidTokenValue> {
        let mut state = self.lock();
        let current = self.install(&mut state, token, None)?;
        if let Some(store) = &self.store {
            store.save_in_background(current.token.clone());
        }
        state.backoff_until = None;
        state.backoff_window = Duration::ZERO;
        state.last_error = None;
        state.consecutive_failures = 0;
        Ok(current)
    }

    /// Asks the token source to revoke `token` at the server.
    pub(crate) fn revoke(
        &self,
        token: Arc<Token>,
    ) -> futures::future::BoxFuture<'static, Result<(), crate::BoxError>> {
        self.fetcher.revoke(token)
    }

    /// Forgets the current token, and any refresh under way (its result
    /// will not be installed); the next request fetches a new token.
    /// Returns the token forgotten. With `revoke`, a token that a refresh
    /// under way fetches is revoked too.
    pub(crate) fn clear(&self, revoke: bool) -> Option<Arc<Token>> {
        let mut state = self.lock();
        if let Some(timer) = state.timer.take() {
            timer.abort();
        }
        state.next_generation += 1;
        state.in_flight = None;
        state.epoch = state.epoch.wrapping_add(1);
        if revoke {
            state.revoked_before = state.epoch;
        }
        self.current.swap(None).map(|current| current.token.clone())
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let state = self.lock();
        let now = Instant::now();
        Snapshot {
            current: self.current.load_full(),
            consecutive_failures: state.consecutive_failures,
            last_refresh_at: state.last_refresh_at,
            last_refresh_took: state.last_refresh_took,
            last_error: state.last_error.as_ref().map(ToString::to_string),
            backoff_remaining: state
                .backoff_until
                .filter(|until| *until > now)
                .map(|until| until - now),
            refreshing: state.in_flight.is_some(),
        }
    }
}

impl Drop for TokenManager {
    fn drop(&mut self) {
        if let Some(timer) = self.lock().timer.take() {
            timer.abort();
        }
    }
}

impl std::fmt::Debug for TokenManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenManager")
            .field(
                "generation",
                &self.current.load().as_ref().map(|c| c.generation),
            )
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Doubles the back-off window, within the configured bounds, with ±10 % jitter.
fn next_backoff(previous: Duration, config: &ManagerConfig) -> Duration {
    let doubled = if previous.is_zero() {
        config.backoff_min
    } else {
        previous.saturating_mul(2)
    };
    let capped = doubled.clamp(
        config.backoff_min,
        config.backoff_max.max(config.backoff_min),
    );
    capped.mul_f64(0.9 + fastrand::f64() * 0.2)
}
