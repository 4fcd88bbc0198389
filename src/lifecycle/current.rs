//! An installed token: its prepared header, generation and freshness, and
//! the timer that ages it.
//!
//! NOTE: the hot path never reads the clock. A timer task flips
//! `freshness` when the token enters its refresh-ahead window and when it
//! expires; a token installed where no timer could be armed is `UNTIMED`
//! and its readers read the clock instead.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::header_cache;
use crate::Token;

// Freshness of the current token, kept in `Current::freshness`.
/// Valid and outside the refresh-ahead window.
const FRESH: u8 = 0;
/// Valid; a proactive refresh has been started (or is backing off).
const REFRESHING: u8 = 1;
/// Valid, inside the refresh-ahead window; the next reader starts a refresh.
const STALE: u8 = 2;
/// Expired (or rejected): readers wait for the refresh.
const EXPIRED: u8 = 3;
/// No timer could be armed (installed outside a runtime): readers read the clock.
const UNTIMED: u8 = 4;

/// When an installed token is refreshed ahead and when readers wait.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub(crate) refresh_ahead: Option<Duration>,
    pub(crate) min_validity: Duration,
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
    /// Unique in the process: keys the per-thread copies of `header`.
    id: u64,
    pub(crate) generation: u64,
    /// The store's version of this token; 0 when it is not from a store.
    pub(crate) store_version: u64,
    installed_at: Instant,
    installed_wall: SystemTime,
    expires_at: Option<Instant>,
    refresh_at: Option<Instant>,
    wait_at: Option<Instant>,
    freshness: AtomicU8,
}

impl Current {
    /// A token installed now as `generation`.
    pub(crate) fn new(
        token: Token,
        header: HeaderValue,
        generation: u64,
        store_version: u64,
        timing: Timing,
    ) -> Arc<Self> {
        let now = Instant::now();
        let lifetime = token.expires_in();
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
            header,
            id: header_cache::next_id(),
            generation,
            store_version,
            installed_at: now,
            installed_wall: SystemTime::now(),
            expires_at: lifetime.map(|lifetime| now + lifetime),
            refresh_at,
            wait_at,
            freshness: AtomicU8::new(FRESH),
        });
        current
            .freshness
            .store(current.freshness_by_clock(now), Ordering::Release);
        current
    }

    /// Arms the timer that ages this token, on the runtime of the caller.
    /// Without a runtime the token's readers read the clock instead.
    pub(crate) fn arm_timer(self: &Arc<Self>) -> Option<AbortHandle> {
        if self.refresh_at.is_none() && self.wait_at.is_none() {
            return None;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => Some(
                runtime
                    .spawn(freshness_timer(Arc::downgrade(self)))
                    .abort_handle(),
            ),
            Err(_) => {
                self.freshness.store(UNTIMED, Ordering::Release);
                None
            }
        }
    }

    /// The hot path: may a reader send this token? Reads the clock only
    /// for an untimed token.
    #[inline]
    pub(crate) fn use_now(&self) -> Use {
        match self.freshness.load(Ordering::Acquire) {
            FRESH | REFRESHING => Use::Send,
            STALE => self.claim_proactive(STALE),
            UNTIMED => match self.freshness_by_clock(Instant::now()) {
                EXPIRED => Use::Wait,
                STALE => self.claim_proactive(UNTIMED),
                _ => Use::Send,
            },
            _ => Use::Wait,
        }
    }

    fn claim_proactive(&self, from: u8) -> Use {
        let won = self
            .freshness
            .compare_exchange(from, REFRESHING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if won { Use::SendAndRefresh } else { Use::Send }
    }

    /// This thread's copy of the header (see `header_cache`).
    #[inline]
    pub(crate) fn local_header(&self) -> HeaderValue {
        header_cache::local_copy(self.id, &self.header)
    }

    /// The upstream rejected this token: readers wait from now on.
    pub(crate) fn mark_rejected(&self) {
        self.freshness.store(EXPIRED, Ordering::Release);
    }

    /// `false` once the token expired or was rejected.
    pub(crate) fn is_usable(&self) -> bool {
        self.freshness.load(Ordering::Acquire) != EXPIRED
    }

    /// How long ago this token was installed.
    pub(crate) fn age(&self) -> Duration {
        self.installed_at.elapsed()
    }

    fn freshness_by_clock(&self, now: Instant) -> u8 {
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

    /// `true` while the token may be sent.
    pub(crate) fn is_valid(&self) -> bool {
        self.is_usable() && self.freshness_by_clock(Instant::now()) != EXPIRED
    }

    /// `true` when the token is inside its refresh-ahead window or expired.
    pub(crate) fn should_refresh(&self) -> bool {
        self.freshness.load(Ordering::Acquire) != FRESH
            || self.freshness_by_clock(Instant::now()) != FRESH
    }

    /// When this token was installed (wall clock).
    pub(crate) fn installed_wall(&self) -> SystemTime {
        self.installed_wall
    }

    /// After a failed proactive refresh, lets the next reader try again once
    /// the back-off window has passed.
    pub(crate) fn rearm_after_backoff(self: &Arc<Self>, until: Instant) {
        if self.freshness.load(Ordering::Acquire) != REFRESHING {
            return;
        }
        let weak = Arc::downgrade(self);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                tokio::time::sleep_until(until).await;
                if let Some(c) = weak.upgrade() {
                    let _ = c.freshness.compare_exchange(
                        REFRESHING,
                        STALE,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
            });
        }
    }
}

/// Marks the token stale at its refresh point and expired at its wait point.
async fn freshness_timer(current: Weak<Current>) {
    let Some((refresh_at, wait_at)) = current.upgrade().map(|c| (c.refresh_at, c.wait_at)) else {
        return;
    };
    if let Some(at) = refresh_at {
        tokio::time::sleep_until(at).await;
        match current.upgrade() {
            Some(c) => {
                let _ =
                    c.freshness
                        .compare_exchange(FRESH, STALE, Ordering::AcqRel, Ordering::Acquire);
            }
            None => return,
        }
    }
    if let Some(at) = wait_at {
        tokio::time::sleep_until(at).await;
        if let Some(c) = current.upgrade() {
            c.freshness.store(EXPIRED, Ordering::Release);
        }
    }
}

/// Shortens `ahead` by up to 10 %, so replicas do not refresh in lockstep.
fn jittered(ahead: Duration) -> Duration {
    ahead.mul_f64(1.0 - fastrand::f64() * 0.1)
}
