//! An installed token: its prepared header copies, generation and
//! freshness, and the timer that ages it.
//!
//! NOTE: the invariants of this file.
//! - The hot path reads the clock only when no timer it can trust ages the
//!   token. A timer task flips `freshness` when the token enters its
//!   refresh-ahead window and when it expires. Timers run on the crate's
//!   background runtime (`background.rs`), which is always driven: a timer
//!   never sleeps through an expiry because the runtime of the caller that
//!   installed the token is idle or gone. Only a caller whose clock is
//!   paused (tests) arms it on its own runtime, where it may die with that
//!   runtime: the timer's guard then moves the token to a `CLOCKED*` state,
//!   where readers read the clock. A token installed where no timer could
//!   be armed starts `CLOCKED`.
//! - A proactive refresh that could not run (back-off, no runtime, its
//!   task gone with its runtime) never leaves the token claimed: it goes
//!   back to `STALE`, or to `CLOCKED` with `retry_at` set, so a later
//!   reader claims it again.
//! - `EXPIRED` is final for a token: nothing moves it back.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::background;
use super::header_cache::HeaderCopies;
use crate::Token;

// Freshness of the token, kept in `Current::freshness`.
/// Timed; valid and outside the refresh-ahead window.
const FRESH: u8 = 0;
/// Timed; valid, a proactive refresh is in flight.
const REFRESHING: u8 = 1;
/// Timed; inside the refresh-ahead window: the next reader starts a refresh.
const STALE: u8 = 2;
/// Expired (or rejected): readers wait for the refresh.
const EXPIRED: u8 = 3;
/// No live timer: readers read the clock (and honour `retry_at`).
const CLOCKED: u8 = 4;
/// No live timer, a proactive refresh is in flight: readers read the clock
/// only to stop sending the token once it expires.
const CLOCKED_REFRESHING: u8 = 5;

/// When an installed token is refreshed ahead and when readers wait.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub(crate) refresh_ahead: Option<Duration>,
    pub(crate) min_validity: Duration,
    /// A token that arrives with (almost) no lifetime left is used at least
    /// this long; zero for any other token.
    pub(crate) floor: Duration,
}

/// What a reader may do with the current token.
pub(crate) enum Use {
    /// Send it.
    Send,
    /// Send it, and start a proactive refresh (the reader won the race).
    SendAndRefresh,
    /// Do not send it: wait for a refresh.
    Wait,
}

/// The installed token with everything the hot path needs.
pub(crate) struct Current {
    pub(crate) token: Arc<Token>,
    pub(crate) header: HeaderValue,
    copies: HeaderCopies,
    pub(crate) generation: u64,
    /// The store's version of this token; 0 when it is not from a store.
    pub(crate) store_version: u64,
    installed_at: Instant,
    installed_wall: SystemTime,
    /// The lifetime the token was installed with (after the floor).
    lifetime: Option<Duration>,
    expires_at: Option<Instant>,
    refresh_at: Option<Instant>,
    wait_at: Option<Instant>,
    /// In a `CLOCKED` state, no proactive refresh before this (nanoseconds
    /// after `installed_at`; 0: none).
    retry_at: AtomicU64,
    freshness: AtomicU8,
    /// A timer was armed once (it is not armed again if it dies).
    armed: AtomicBool,
    timer: Mutex<Option<AbortHandle>>,
}

impl Current {
    /// A token installed now as `generation`. Its lifetime is at least
    /// `timing.floor` (given to tokens that arrive with almost none left).
    pub(crate) fn new(
        token: Token,
        header: HeaderValue,
        generation: u64,
        store_version: u64,
        timing: Timing,
    ) -> Arc<Self> {
        let now = Instant::now();
        let lifetime = token
            .expires_in()
            .map(|lifetime| lifetime.max(timing.floor));
        // A lifetime too far away for the clock counts as no expiry.
        let expires_at = lifetime.and_then(|lifetime| now.checked_add(lifetime));
        let lifetime = lifetime.filter(|_| expires_at.is_some());
        let (refresh_at, wait_at) = match lifetime {
            None => (None, None),
            Some(lifetime) => {
                let wait_margin = timing.min_validity.min(lifetime / 4);
                let ahead = timing
                    .refresh_ahead
                    .map(|ahead| jittered(ahead.min(lifetime / 2)));
                let wait_at = now + lifetime.saturating_sub(wait_margin);
                // A refresh-ahead point after the wait point would never fire
                // before readers start waiting: bring it forward.
                (
                    ahead.map(|ahead| (now + lifetime.saturating_sub(ahead)).min(wait_at)),
                    Some(wait_at),
                )
            }
        };
        let current = Arc::new(Current {
            token: Arc::new(token),
            copies: HeaderCopies::new(&header),
            header,
            generation,
            store_version,
            installed_at: now,
            installed_wall: SystemTime::now(),
            lifetime,
            expires_at,
            refresh_at,
            wait_at,
            retry_at: AtomicU64::new(0),
            // A token without an expiry never ages: nothing to time.
            freshness: AtomicU8::new(if wait_at.is_some() { CLOCKED } else { FRESH }),
            armed: AtomicBool::new(false),
            timer: Mutex::new(None),
        });
        if current.clock_says(now) == EXPIRED {
            current.freshness.store(EXPIRED, Ordering::Release);
        }
        current
    }

    /// Arms the timer that ages this token, on the background runtime (a
    /// paused caller's own runtime), once. Without a runtime (or without an expiry) readers keep reading
    /// the clock; a reader on a runtime arms it later. A timer that dies is
    /// not armed again: readers read the clock until the next token.
    pub(crate) fn arm_timer(self: &Arc<Self>) {
        if self.wait_at.is_none() || self.armed.load(Ordering::Acquire) {
            return;
        }
        let Some(runtime) = background::runtime_for_caller() else {
            return;
        };
        if self.armed.swap(true, Ordering::AcqRel) {
            return;
        }
        let timed = match self.clock_says(Instant::now()) {
            EXPIRED => return,
            STALE => STALE,
            _ => FRESH,
        };
        // NOTE: timed before the task exists: its guard moves the token back
        // to `CLOCKED*` whenever the task ends without finishing its work
        // (aborted, or dropped with its runtime, or never polled).
        let set = self
            .freshness
            .compare_exchange(CLOCKED, timed, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if !set {
            return;
        }
        let guard = TimerGuard {
            current: Arc::downgrade(self),
        };
        let task = runtime.spawn(freshness_timer(guard)).abort_handle();
        if let Ok(mut timer) = self.timer.lock() {
            *timer = Some(task);
        }
    }

    /// Stops the timer (the token was replaced).
    pub(crate) fn stop_timer(&self) {
        if let Some(task) = self.timer.lock().ok().and_then(|mut timer| timer.take()) {
            task.abort();
        }
    }

    /// The hot path: may a reader send this token? Reads the clock only
    /// when no live timer ages it.
    #[inline]
    pub(crate) fn use_now(self: &Arc<Self>) -> Use {
        let state = self.freshness.load(Ordering::Acquire);
        match self.use_timed(state) {
            Some(verdict) => verdict,
            None => self.use_by_clock(state),
        }
    }

    /// `use_now` for a state that needs no clock.
    #[inline]
    fn use_timed(&self, state: u8) -> Option<Use> {
        match state {
            FRESH | REFRESHING => Some(Use::Send),
            STALE => Some(self.claim_proactive(STALE, REFRESHING)),
            EXPIRED => Some(Use::Wait),
            _ => None,
        }
    }

    #[cold]
    fn use_by_clock(self: &Arc<Self>, state: u8) -> Use {
        // A token installed outside a runtime gets its timer from the first
        // reader on one.
        if state == CLOCKED && self.retry_at.load(Ordering::Acquire) == 0 {
            self.arm_timer();
            if let Some(verdict) = self.use_timed(self.freshness.load(Ordering::Acquire)) {
                return verdict;
            }
        }
        let now = Instant::now();
        match self.clock_says(now) {
            EXPIRED => {
                self.freshness.store(EXPIRED, Ordering::Release);
                Use::Wait
            }
            STALE if state == CLOCKED && self.retry_allowed(now) => {
                self.claim_proactive(CLOCKED, CLOCKED_REFRESHING)
            }
            _ => Use::Send,
        }
    }

    fn claim_proactive(&self, from: u8, to: u8) -> Use {
        let won = self
            .freshness
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if won { Use::SendAndRefresh } else { Use::Send }
    }

    fn retry_allowed(&self, now: Instant) -> bool {
        let at = self.retry_at.load(Ordering::Acquire);
        at == 0 || now.saturating_duration_since(self.installed_at).as_nanos() >= u128::from(at)
    }

    /// This thread's copy of the header (see `header_cache`).
    #[inline]
    pub(crate) fn local_header(&self) -> HeaderValue {
        self.copies.local()
    }

    /// The upstream rejected this token: readers wait from now on.
    pub(crate) fn mark_rejected(&self) {
        self.freshness.store(EXPIRED, Ordering::Release);
    }

    /// The proactive refresh claimed on this token will not run (back-off,
    /// failure, no runtime): a reader may claim it again from `until` on.
    pub(crate) fn defer_proactive(&self, until: Instant) {
        let at = until
            .saturating_duration_since(self.installed_at)
            .as_nanos();
        self.retry_at.store(
            u64::try_from(at).unwrap_or(u64::MAX).max(1),
            Ordering::Release,
        );
        for from in [REFRESHING, CLOCKED_REFRESHING] {
            let _ =
                self.freshness
                    .compare_exchange(from, CLOCKED, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// The proactive refresh claimed on this token ended without a result
    /// (its task went with its runtime): the next reader claims it again.
    pub(crate) fn release_proactive(&self) {
        let _ =
            self.freshness
                .compare_exchange(REFRESHING, STALE, Ordering::AcqRel, Ordering::Acquire);
        let _ = self.freshness.compare_exchange(
            CLOCKED_REFRESHING,
            CLOCKED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// `false` once the token expired or was rejected.
    pub(crate) fn is_usable(&self) -> bool {
        match self.freshness.load(Ordering::Acquire) {
            EXPIRED => false,
            CLOCKED | CLOCKED_REFRESHING if self.clock_says(Instant::now()) == EXPIRED => {
                self.freshness.store(EXPIRED, Ordering::Release);
                false
            }
            _ => true,
        }
    }

    /// How long ago this token was installed.
    pub(crate) fn age(&self) -> Duration {
        self.installed_at.elapsed()
    }

    /// `true` while a rejection of this token is not worth a refresh: it is
    /// younger than `min_age`, or than a quarter of its lifetime if that is
    /// shorter (a token that lives 2 s is not "fresh" for 5 s).
    pub(crate) fn is_too_fresh(&self, min_age: Duration) -> bool {
        let window = match self.lifetime {
            Some(lifetime) => min_age.min(lifetime / 4),
            None => min_age,
        };
        self.age() < window
    }

    fn clock_says(&self, now: Instant) -> u8 {
        if self.wait_at.is_some_and(|at| now >= at) {
            EXPIRED
        } else if self.refresh_at.is_some_and(|at| now >= at) {
            STALE
        } else {
            FRESH
        }
    }

    /// Time left before the token expires, if its expiry is known.
    pub(crate) fn expires_in(&self) -> Option<Duration> {
        self.expires_at
            .map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// `true` while the token may be sent: what [`Current::use_now`] answers
    /// a request, without claiming a refresh.
    // NOTE: a timed token is expired for requests when its timer says so,
    // not when the clock passes `wait_at` (the timer fires a moment later);
    // reading the clock here made `status().valid` say "expired" while
    // requests still went out with the token.
    pub(crate) fn is_valid(&self) -> bool {
        match self.freshness.load(Ordering::Acquire) {
            FRESH | REFRESHING | STALE => true,
            EXPIRED => false,
            _ => self.clock_says(Instant::now()) != EXPIRED,
        }
    }

    /// `true` when the token is inside its refresh-ahead window or expired.
    pub(crate) fn should_refresh(&self) -> bool {
        !matches!(self.freshness.load(Ordering::Acquire), FRESH | CLOCKED)
            || self.clock_says(Instant::now()) != FRESH
    }

    /// When this token was installed (wall clock).
    pub(crate) fn installed_wall(&self) -> SystemTime {
        self.installed_wall
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        self.stop_timer();
    }
}

/// Moves the token to a `CLOCKED*` state when the timer ends early.
struct TimerGuard {
    current: Weak<Current>,
}

impl Drop for TimerGuard {
    fn drop(&mut self) {
        let Some(current) = self.current.upgrade() else {
            return;
        };
        let _ = current
            .freshness
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| match state {
                FRESH | STALE => Some(CLOCKED),
                REFRESHING => Some(CLOCKED_REFRESHING),
                _ => None,
            });
    }
}

/// Marks the token stale at its refresh point and expired at its wait point.
async fn freshness_timer(guard: TimerGuard) {
    let Some((refresh_at, wait_at)) = guard.current.upgrade().map(|c| (c.refresh_at, c.wait_at))
    else {
        return;
    };
    if let Some(at) = refresh_at {
        tokio::time::sleep_until(at).await;
        let Some(c) = guard.current.upgrade() else {
            return;
        };
        let _ = c
            .freshness
            .compare_exchange(FRESH, STALE, Ordering::AcqRel, Ordering::Acquire);
    }
    if let Some(at) = wait_at {
        tokio::time::sleep_until(at).await;
        if let Some(c) = guard.current.upgrade() {
            c.freshness.store(EXPIRED, Ordering::Release);
        }
    }
}

/// Shortens `ahead` by up to 10 %, so replicas do not refresh in lockstep.
fn jittered(ahead: Duration) -> Duration {
    Duration::try_from_secs_f64(ahead.as_secs_f64() * (1.0 - fastrand::f64() * 0.1))
        .unwrap_or(ahead)
        .min(ahead)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn valid_says_what_a_request_would_do_until_the_timer_fires() {
        let token = Token::bearer("t").with_expires_in(Duration::from_secs(10));
        let header = HeaderValue::from_static("Bearer t");
        let timing = Timing {
            refresh_ahead: None,
            min_validity: Duration::from_secs(1),
            floor: Duration::from_secs(1),
        };
        let current = Current::new(token, header, 1, 0, timing);
        // Timed, and its timer has not fired yet: the moment between the
        // clock passing `wait_at` and the timer flipping the state, held
        // still.
        current.freshness.store(FRESH, Ordering::Release);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(matches!(current.use_now(), Use::Send));
        assert!(current.is_valid(), "a request still sends it");

        current.freshness.store(EXPIRED, Ordering::Release);
        assert!(matches!(current.use_now(), Use::Wait));
        assert!(!current.is_valid());
    }
}
