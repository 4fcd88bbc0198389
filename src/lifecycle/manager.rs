//! The token manager: the current token, its generation, the single
//! in-flight refresh and the back-off after failures.
//!
//! NOTE: the invariants of this file.
//! - Readers (`acquire`) take no lock: one `ArcSwapOption` load and one
//!   atomic load of the token's freshness (see `current.rs`; a token no
//!   live timer ages costs a clock read too).
//! - `refresh` decides under the `state` mutex (never held across `.await`)
//!   whether to join the in-flight refresh, fail fast (back-off) or start a
//!   new one. A refresh runs as a spawned task shared through
//!   `futures::Shared`, so a caller that is dropped cannot cancel it.
//! - The task installs the new token and clears `in_flight` under the same
//!   lock, so a caller that sees no refresh in flight also sees its result.
//! - A refresh task runs on the crate's background runtime (`background.rs`),
//!   which is always driven and never dropped: a refresh ends and installs
//!   its answer whatever happens to the runtime of the caller that started
//!   it (dropped, or kept but idle), and wakes waiters on every runtime.
//!   Only a caller whose clock is paused (tests) runs it on its own runtime;
//!   such a task dies with that runtime, and an entry whose task ended
//!   without clearing it (`InFlight::is_live` is false) is dropped by the
//!   next caller, who starts a fresh refresh; a waiter that sees the task
//!   cancelled does the same. The task contains panics (token store, a
//!   runtime without its time driver): they end as a failed refresh, with
//!   back-off, like any other failure.
//! - Every waiter is bounded on its own clock (`waiter_bound`: the refresh
//!   timeout, the lease protocol with a store, and a margin), so nothing
//!   waits forever on a refresh that cannot end.
//! - A proactive refresh that cannot run gives its claim back
//!   (`Current::defer_proactive`, `Current::release_proactive`): a later
//!   reader claims it again once the back-off window has passed.
//! - A token that arrives with no lifetime left, or less than
//!   `NEAR_ZERO_LIFETIME`, is used for a while rather than refreshed on
//!   every request: for a back-off step (at least 1 s), doubling while the
//!   source keeps sending such tokens.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use futures::future::{BoxFuture, FutureExt, Shared};
use http::HeaderValue;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::Instrument;
use tracing::instrument::WithSubscriber;

use super::background;
use super::current::{Current, Timing, Use};
use super::fetch::{Fetcher, Obtained, Previous};
use super::fleet::{FleetStore, Replacing};
use crate::error::{RefreshError, RefreshFailed, RefreshTimedOut};
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
    /// The `token` label of this handle's metrics.
    pub(crate) name: Arc<str>,
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
            name: Arc::from("default"),
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
    /// Retry with the token the future resolves to (at once if it already
    /// has); `None`: the token is too fresh to refresh and the store holds
    /// nothing newer, so return the upstream's answer.
    Retry(BoxFuture<'static, Result<Option<(HeaderValue, u64)>, BoxError>>),
}

/// A token that arrives with no lifetime left is used at least this long.
const MIN_FLOOR: Duration = Duration::from_secs(1);

/// A token that arrives with less than this to live counts as arriving with
/// no lifetime left: `expires_in` 0 or a few milliseconds, or an absolute
/// expiry a moment ahead of (or behind) the local clock through clock skew.
/// No request could use it before it expires; refreshing it on every
/// request would only hammer the token source. Longer lifetimes, however
/// short, are honoured as given.
const NEAR_ZERO_LIFETIME: Duration = Duration::from_millis(100);

/// How much longer than the refresh timeout a caller waits for a refresh.
const WAITER_MARGIN: Duration = Duration::from_secs(1);

/// Where an installed token comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// A refresh (the token source or the store).
    Refresh,
    /// `set_token` or the initial token.
    Application,
}

/// How a refresh task ended, as its waiters see it.
#[derive(Clone)]
enum Outcome {
    Done(Result<Arc<Current>, RefreshError>),
    /// The task was dropped with its runtime before it finished.
    Cancelled,
}

type SharedRefresh = Shared<BoxFuture<'static, Outcome>>;

/// The refresh in flight.
struct InFlight {
    shared: SharedRefresh,
    task: AbortHandle,
    /// Set by the task's guard when the task is dropped before it finished.
    ended: Arc<AtomicBool>,
}

impl InFlight {
    /// `false` once the task ended without clearing its entry: it died with
    /// its runtime.
    fn is_live(&self) -> bool {
        !self.ended.load(Ordering::Acquire) && !self.task.is_finished()
    }
}

enum Start {
    Ready(Arc<Current>),
    Wait(SharedRefresh),
    /// Refused; a proactive claim may be retried from `retry_at`.
    Failed(RefreshError, Instant),
}

/// Marks a refresh task that is dropped before it finished, and gives back
/// the proactive claim it was started for.
struct TaskGuard {
    ended: Arc<AtomicBool>,
    claimed: Option<Arc<Current>>,
    finished: bool,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.ended.store(true, Ordering::Release);
        if let Some(current) = &self.claimed {
            current.release_proactive();
        }
    }
}

#[derive(Default)]
struct RefreshState {
    in_flight: Option<InFlight>,
    next_generation: u64,
    backoff_until: Option<Instant>,
    backoff_window: Duration,
    last_error: Option<RefreshError>,
    consecutive_failures: u32,
    last_refresh_at: Option<SystemTime>,
    last_refresh_took: Option<Duration>,
    /// Bumped by every logout (a revoking `clear`): a refresh started in an
    /// older epoch is not installed.
    epoch: u64,
}

/// Counters kept by the manager; read with `TokenHandle::stats`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) refreshes: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) skipped_retries: AtomicU64,
    pub(crate) waited: AtomicU64,
    pub(crate) waited_first_token: AtomicU64,
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
            if manager.set_application_token(token, true).is_err() {
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

    /// The hot path: the current token's header and generation, with no lock,
    /// and no clock read while a live timer ages the token.
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
                // A refusal gives the claim back for after the back-off.
                if let Start::Failed(_, retry_at) =
                    self.refresh(Some(current.generation), RefreshReason::Proactive)
                {
                    current.defer_proactive(retry_at);
                }
            }
            Use::Wait => return Acquired::Wait,
        }
        Acquired::Ready(current.local_header(), current.generation)
    }

    /// The lease ttl of the store, if there is one.
    #[cfg(test)]
    pub(crate) fn store_lease_ttl(&self) -> Option<Duration> {
        self.store.as_ref().map(|store| store.lease_ttl)
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
    ///
    /// NOTE: the order matters. A newer token already installed is used at
    /// once. A token too young to refresh (`Current::is_too_fresh`) is not
    /// refreshed; but with a store, another process may have replaced it
    /// (servers that revoke the old access token when they rotate), so the
    /// store is read first and a newer stored token is used at once.
    pub(crate) fn on_rejected(&self, generation: u64) -> Rejection {
        let Some(manager) = self.weak_self.upgrade() else {
            return Rejection::TooFresh;
        };
        if let Some(current) = self.current.load_full() {
            if current.generation != generation && current.is_usable() {
                let ready = (current.header.clone(), current.generation);
                return Rejection::Retry(Box::pin(async move { Ok(Some(ready)) }));
            }
            if current.generation == generation && current.is_too_fresh(self.config.min_token_age) {
                if self.store.is_none() {
                    return Rejection::TooFresh;
                }
                return Rejection::Retry(Box::pin(async move {
                    manager.adopt_newer_than(&current).await
                }));
            }
        }
        let start = self.refresh(Some(generation), RefreshReason::Rejected);
        Rejection::Retry(Box::pin(async move {
            let current = manager
                .finish(start, Some(generation), RefreshReason::Rejected)
                .await?;
            Ok(Some((current.header.clone(), current.generation)))
        }))
    }

    /// With a store: installs the token another process stored in place of
    /// `rejected`, if there is one (waiting for a refresh another process
    /// has in flight).
    async fn adopt_newer_than(
        &self,
        rejected: &Arc<Current>,
    ) -> Result<Option<(HeaderValue, u64)>, BoxError> {
        let Some(store) = &self.store else {
            return Ok(None);
        };
        let previous = Previous {
            token: Some(rejected.token.clone()),
            store_version: rejected.store_version,
        };
        let Some(stored) = store.newer_than(previous).await else {
            return Ok(None);
        };
        let mut state = self.lock();
        if let Some(current) = self.current.load_full() {
            if current.generation != rejected.generation && current.is_usable() {
                return Ok(Some((current.header.clone(), current.generation)));
            }
        }
        let current = self
            .install(
                &mut state,
                stored.token,
                Some(stored.version),
                Origin::Refresh,
            )
            .map_err(|err| RefreshError::Failed(RefreshFailed::new(Arc::new(err))).into_box())?;
        Counters::bump(&self.counters.adopted);
        tracing::debug!(
            generation = current.generation,
            "rejected token replaced by a newer stored one"
        );
        Ok(Some((current.header.clone(), current.generation)))
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
        self.finish(start, seen, reason).await
    }

    /// Waits for the refresh `start` joined. A refresh whose task went with
    /// its runtime is started again here, on the caller's runtime.
    async fn finish(
        &self,
        mut start: Start,
        seen: Option<u64>,
        reason: RefreshReason,
    ) -> Result<Arc<Current>, BoxError> {
        for _ in 0..3 {
            match start {
                Start::Ready(current) => return Ok(current),
                Start::Failed(err, _) => return Err(err.into_box()),
                Start::Wait(shared) => match self.wait_bounded(shared).await {
                    Outcome::Done(result) => return result.map_err(RefreshError::into_box),
                    Outcome::Cancelled => {
                        tracing::debug!("token refresh went with its runtime; starting it again");
                        start = self.refresh(seen, reason);
                    }
                },
            }
        }
        Err(RefreshError::Failed(RefreshFailed::from_message(
            "token refresh task was cancelled: its runtime shut down",
        ))
        .into_box())
    }

    /// Awaits a refresh for at most [`Self::waiter_bound`], measured on the
    /// waiter's own clock when it has one: a refresh that cannot end in time
    /// (its runtime idle, its thread blocked) never holds a caller forever.
    /// Without a timer of its own, the waiter relies on the refresh's own
    /// timeout.
    async fn wait_bounded(&self, shared: SharedRefresh) -> Outcome {
        let bound = self.waiter_bound();
        let timer = tokio::runtime::Handle::try_current()
            .ok()
            .and_then(|_| std::panic::catch_unwind(move || tokio::time::sleep(bound)).ok());
        let Some(timer) = timer else {
            return shared.await;
        };
        tokio::select! {
            outcome = shared => outcome,
            () = timer => {
                tracing::warn!(
                    waited_ms = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX),
                    "gave up waiting for a token refresh"
                );
                Outcome::Done(Err(RefreshError::TimedOut(RefreshTimedOut::new(bound))))
            }
        }
    }

    /// The longest a caller waits for a refresh: the refresh timeout and,
    /// with a store, the lease protocol around it, plus a margin so that the
    /// refresh's own timeout (which starts back-off) normally ends it first.
    fn waiter_bound(&self) -> Duration {
        let refresh = self.config.refresh_timeout.saturating_add(WAITER_MARGIN);
        match &self.store {
            None => refresh,
            Some(store) => refresh
                .saturating_add(store.lease_ttl.saturating_mul(2))
                .saturating_add(store.op_timeout.saturating_mul(8)),
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
        // NOTE: a rejected token is no longer handed out, even while a
        // refresh started for another reason is in flight.
        if reason == RefreshReason::Rejected {
            if let (Some(seen), Some(current)) = (seen, current.as_ref()) {
                if current.generation == seen {
                    current.mark_rejected();
                }
            }
        }
        if let Some(in_flight) = &state.in_flight {
            if in_flight.is_live() {
                return Start::Wait(in_flight.shared.clone());
            }
            tracing::debug!("token refresh went with its runtime; starting a new one");
            state.in_flight = None;
        }
        let now = Instant::now();
        if reason != RefreshReason::Manual {
            if let (Some(until), Some(err)) = (state.backoff_until, &state.last_error) {
                if now < until {
                    return Start::Failed(err.for_backoff(), until);
                }
            }
        }
        let Some(manager) = self.weak_self.upgrade() else {
            return Start::Failed(
                RefreshError::Failed(RefreshFailed::from_message("token manager dropped")),
                now,
            );
        };
        let Some(runtime) = background::runtime_for_caller() else {
            return Start::Failed(
                RefreshError::Failed(RefreshFailed::from_message(
                    "token refresh needs a tokio runtime",
                )),
                now,
            );
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
        let ended = Arc::new(AtomicBool::new(false));
        // NOTE: the task is spawned with the lock held; if its runtime is
        // shutting down it is dropped at once, before its first poll, so
        // nothing in it may take the lock on drop (its guard does not).
        let task = runtime.spawn(
            manager
                .fetch_and_install(previous, reason, ended.clone(), epoch)
                .instrument(span)
                .with_current_subscriber(),
        );
        let abort = task.abort_handle();
        let shared = async move {
            match task.await {
                Ok(result) => Outcome::Done(result),
                Err(err) if err.is_panic() => Outcome::Done(Err(RefreshError::Failed(
                    RefreshFailed::from_message("token refresh task panicked"),
                ))),
                Err(_) => Outcome::Cancelled,
            }
        }
        .boxed()
        .shared();
        state.in_flight = Some(InFlight {
            shared: shared.clone(),
            task: abort,
            ended,
        });
        Start::Wait(shared)
    }

    async fn fetch_and_install(
        self: Arc<Self>,
        previous: Option<Arc<Current>>,
        reason: RefreshReason,
        ended: Arc<AtomicBool>,
        epoch: u64,
    ) -> Result<Arc<Current>, RefreshError> {
        let mut guard = TaskGuard {
            ended,
            claimed: previous
                .clone()
                .filter(|_| reason == RefreshReason::Proactive),
            finished: false,
        };
        let started = Instant::now();
        let previous = previous.map_or_else(Previous::default, |c| Previous {
            token: Some(c.token.clone()),
            store_version: c.store_version,
        });
        let obtain = async {
            match &self.store {
                Some(store) => store.obtain(&self.fetcher, previous, reason).await,
                None => self
                    .fetcher
                    .fetch(previous.token, reason)
                    .await
                    .map(Obtained::fetched),
            }
        };
        let result = AssertUnwindSafe(obtain)
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                Err(RefreshError::Failed(RefreshFailed::from_message(
                    "token refresh panicked (in the token store, or in a tokio \
                     runtime built without its time driver: `enable_time`)",
                )))
            });
        let took = started.elapsed();
        tracing::Span::current().record("duration_ms", took.as_millis() as u64);
        let mut state = self.lock();
        guard.finished = true;
        if state.epoch != epoch {
            drop(state);
            return Err(self.discard_logged_out(result));
        }
        state.in_flight = None;
        let installed = result.and_then(|obtained| {
            let adopted = obtained.adopted;
            self.install(
                &mut state,
                obtained.token,
                obtained.store_version,
                Origin::Refresh,
            )
            .map(|current| (current, adopted))
            .map_err(|err| RefreshError::Failed(RefreshFailed::new(Arc::new(err))))
        });
        self.report_refresh(reason, &installed, took);
        match installed {
            Ok((current, adopted)) => {
                if adopted {
                    Counters::bump(&self.counters.adopted);
                } else {
                    Counters::bump(&self.counters.refreshes);
                }
                state.consecutive_failures = 0;
                state.backoff_until = None;
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
                let until = deadline(Instant::now(), window);
                state.backoff_until = Some(until);
                state.last_error = Some(err.clone());
                tracing::warn!(
                    error = %err,
                    failures = state.consecutive_failures,
                    backoff_ms = window.as_millis() as u64,
                    "token refresh failed"
                );
                if let Some(current) = self.current.load_full() {
                    current.defer_proactive(until);
                }
                Err(err)
            }
        }
    }

    /// NOTE: a refresh that started before a logout must not bring a token
    /// back (it would undo the logout): its result is dropped, and a token
    /// it fetched (not one adopted from a store) is revoked. The logout has
    /// already forgotten this refresh (`in_flight`).
    fn discard_logged_out(&self, result: Result<Obtained, RefreshError>) -> RefreshError {
        tracing::debug!("logged out during the refresh; its result is dropped");
        if let Ok(obtained) = result {
            if let (false, Ok(runtime)) = (obtained.adopted, tokio::runtime::Handle::try_current())
            {
                let revoke = self.fetcher.revoke(Arc::new(obtained.token));
                let revoke = async move {
                    if let Err(err) = revoke.await {
                        tracing::warn!(error = %err, "revoking a token fetched during a logout failed");
                    }
                };
                runtime.spawn(revoke.with_current_subscriber());
            }
        }
        RefreshError::Failed(RefreshFailed::from_message(
            "logged out while this refresh was under way",
        ))
    }

    /// Installs `token` as the new current token. Called with the state locked.
    fn install(
        &self,
        state: &mut RefreshState,
        token: Token,
        store_version: Option<u64>,
        origin: Origin,
    ) -> Result<Arc<Current>, crate::InvalidTokenValue> {
        let header = self.config.injector.prepare(&token)?;
        state.next_generation += 1;
        // A refresh that brings a token with no lifetime left (or almost
        // none, `NEAR_ZERO_LIFETIME`) counts into back-off: the token is
        // used for one back-off step (at least 1 s),
        // doubling while it lasts. A token the application sets already
        // expired is refreshed before it is used, as usual.
        let floor = match origin {
            Origin::Refresh
                if token
                    .expires_in()
                    .is_some_and(|left| left < NEAR_ZERO_LIFETIME) =>
            {
                let window = next_backoff(state.backoff_window, &self.config);
                state.backoff_window = window;
                let floor = window.max(MIN_FLOOR);
                tracing::warn!(
                    used_for_ms = u64::try_from(floor.as_millis()).unwrap_or(u64::MAX),
                    "the new token has (almost) no lifetime left (expires_in 0 or a few ms, \
                     or an expiry behind the local clock); using it for a while"
                );
                floor
            }
            _ => {
                state.backoff_window = Duration::ZERO;
                Duration::ZERO
            }
        };
        let timing = Timing {
            refresh_ahead: self.config.refresh_ahead,
            min_validity: self.config.min_validity,
            floor,
        };
        let current = Current::new(
            token,
            header,
            state.next_generation,
            store_version.unwrap_or(0),
            timing,
        );
        current.arm_timer();
        if let Some(replaced) = self.current.swap(Some(current.clone())) {
            replaced.stop_timer();
        }
        self.report_expiry(&current);
        Ok(current)
    }

    /// Installs a token given by the application; resets the back-off.
    pub(crate) fn set_token(&self, token: Token) -> Result<Arc<Current>, crate::InvalidTokenValue> {
        self.set_application_token(token, false)
    }

    /// Installs a token given by the application and saves it through the
    /// fleet protocol (`FleetStore::save_application`): an initial token
    /// only into an empty store, a set token only over the one it replaces.
    fn set_application_token(
        &self,
        token: Token,
        initial: bool,
    ) -> Result<Arc<Current>, crate::InvalidTokenValue> {
        let mut state = self.lock();
        let replaced = self
            .current
            .load_full()
            .map(|c| (c.store_version, c.token.clone()));
        let current = self.install(&mut state, token, None, Origin::Application)?;
        if let Some(store) = &self.store {
            let replacing = if initial {
                Replacing::Nothing
            } else {
                Replacing::Current(replaced)
            };
            let weak = self.weak_self.clone();
            let generation = current.generation;
            store.save_application(current.token.clone(), replacing, move || {
                weak.upgrade()
                    .and_then(|manager| manager.current())
                    .is_some_and(|current| current.generation == generation)
            });
        }
        state.backoff_until = None;
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

    /// Forgets the current token; the next request fetches a new one (or
    /// joins the refresh under way). Returns the token forgotten.
    ///
    /// With `logout` (the token is being revoked), a refresh under way is
    /// forgotten too: its result is not installed, and the token it fetched
    /// is revoked.
    pub(crate) fn clear(&self, logout: bool) -> Option<Arc<Token>> {
        let mut state = self.lock();
        state.next_generation += 1;
        if logout {
            state.in_flight = None;
            state.epoch = state.epoch.wrapping_add(1);
        }
        let replaced = self.current.swap(None)?;
        replaced.stop_timer();
        Some(replaced.token.clone())
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
            refreshing: state.in_flight.as_ref().is_some_and(InFlight::is_live),
        }
    }
}

impl Drop for TokenManager {
    fn drop(&mut self) {
        if let Some(current) = self.current.load_full() {
            current.stop_timer();
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
    let jittered = capped.as_secs_f64() * (0.9 + fastrand::f64() * 0.2);
    Duration::try_from_secs_f64(jittered).unwrap_or(capped)
}

/// `now + window`, or as far as the clock goes.
fn deadline(now: Instant, window: Duration) -> Instant {
    now.checked_add(window)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}
