//! The fleet protocol: how a manager with a [`TokenStore`] refreshes so that
//! a fleet of processes behaves like one client.
//!
//! NOTE: the protocol, in order.
//! 1. Re-read the store. A newer, still-valid token there is adopted: some
//!    other process refreshed already.
//! 2. Take the key's lease. Without it, poll the store (bounded) until the
//!    holder saves (adopt) or the lease expires (take it over).
//! 3. With the lease: re-read once more, then call the token source with the
//!    newest token known (its refresh token may have rotated), save with
//!    compare-and-swap on the version read, release the lease.
//! 4. When the source fails (`invalid_grant` …), re-read before giving up:
//!    another process may have refreshed. Never delete what another wrote.
//! 5. When the store cannot be reached, warn and refresh locally: serving
//!    requests beats coordination. The local token is saved only over the
//!    version it replaces, so it never overwrites another process's token.
//! 6. After a rejection of a token too young to refresh (the storm guard),
//!    `newer_than` only looks: a newer stored token, or the one a lease
//!    holder is about to save. It never calls the token source.
//!
//! "Newer" is decided by `Known::superseded_by`: a higher version in the
//! same line of versions or, for a token that is not from that line (a local
//! refresh, a store that lost its data), the later expiry.
//! A corrupt stored entry (put aside by the store) counts as no token.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::fetch::{Fetcher, Obtained, Previous};
use crate::error::RefreshError;
use crate::store::{StoreError, StoredToken, TokenStore};
use crate::{RefreshReason, Token};

/// A store, the key of this manager's token in it, and the protocol's timings.
#[derive(Clone)]
pub(crate) struct FleetStore {
    pub(crate) store: Arc<dyn TokenStore>,
    pub(crate) key: String,
    pub(crate) lease_ttl: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) op_timeout: Duration,
}

impl std::fmt::Debug for FleetStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetStore")
            .field("key", &self.key)
            .field("lease_ttl", &self.lease_ttl)
            .finish_non_exhaustive()
    }
}

/// What this manager knows of the token it is about to replace.
#[derive(Clone)]
struct Known {
    /// The store version it came with; 0 when it did not come from the store.
    version: u64,
    token: Option<Arc<Token>>,
}

impl Known {
    /// `true` when `stored` replaced the known token: a later save in the
    /// same line of versions or, when the known token is not from that line
    /// (a local refresh while the store was out of reach, a store that lost
    /// its data and counts from 1 again), the token that expires later.
    fn superseded_by(&self, stored: &StoredToken) -> bool {
        let Some(ours) = &self.token else {
            return true;
        };
        if stored.token == **ours {
            return false;
        }
        if self.version > 0 && stored.version > self.version {
            return true;
        }
        match (stored.token.expires_at(), ours.expires_at()) {
            (Some(theirs), Some(ours)) => theirs > ours,
            _ => true,
        }
    }

    /// `true` when `stored` replaced the known token and can be used as is.
    fn adoptable(&self, stored: &StoredToken, rejected: Option<&Token>) -> bool {
        self.superseded_by(stored)
            && !stored.token.is_expired()
            && rejected.is_none_or(|rejected| rejected != &stored.token)
    }
}

impl FleetStore {
    async fn timed<T>(
        &self,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.op_timeout, op).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(
                format!("no answer within {:?}", self.op_timeout).into(),
            )),
        }
    }

    /// Reads the stored token. A corrupt entry has been put aside by the
    /// store: it counts as no token, and the protocol goes on (a fresh token
    /// is fetched under the lease and saved).
    async fn load(&self) -> Result<Option<StoredToken>, StoreError> {
        match self.timed(self.store.load(&self.key)).await {
            Err(StoreError::Corrupt {
                key,
                reason,
                kept_at,
            }) => {
                tracing::warn!(
                    key = %key,
                    reason = %reason,
                    kept_at = kept_at.as_deref().unwrap_or("-"),
                    "stored token is corrupt; fetching a fresh one"
                );
                Ok(None)
            }
            other => other,
        }
    }

    /// Runs the protocol and returns the token to install.
    pub(crate) async fn obtain(
        &self,
        fetcher: &Fetcher,
        previous: Previous,
        reason: RefreshReason,
    ) -> Result<Obtained, RefreshError> {
        let rejected = previous.token.clone();
        let rejected = rejected.as_deref();
        let mut known = Known {
            version: previous.store_version,
            token: previous.token,
        };

        // 1. Someone else may have refreshed already.
        let mut newest = match self.load().await {
            // NOTE: a manual refresh asks for a new token: what is stored
            // now is the base to refresh from, never an answer. Only a token
            // saved after this read (by another process that refreshed while
            // this one waited for the lease) is adopted (bulk jobs rely on
            // it to refresh stored tokens). A restart makes no token call
            // because its first request asks with `Initial`, not `Manual`.
            Ok(Some(stored)) if reason == RefreshReason::Manual => {
                if known.superseded_by(&stored) || known.version == stored.version {
                    known = Known {
                        version: stored.version,
                        token: Some(Arc::new(stored.token.clone())),
                    };
                }
                Some(stored)
            }
            Ok(Some(stored)) if known.adoptable(&stored, rejected) => {
                tracing::debug!(version = stored.version, "adopting token from store");
                return Ok(Obtained::adopted(stored));
            }
            Ok(stored) => stored,
            Err(err) => return self.local(fetcher, &known, reason, err).await,
        };

        // 2. Take the lease, or wait for its holder (bounded polling: the
        //    holder saves, or its lease expires and can be taken over).
        let give_up_at = Instant::now().checked_add(self.lease_ttl.saturating_mul(2));
        let lease = loop {
            match self
                .timed(self.store.try_lock(&self.key, self.lease_ttl))
                .await
            {
                Ok(Some(lease)) => break lease,
                Ok(None) => {}
                Err(err) => return self.local(fetcher, &known, reason, err).await,
            }
            if give_up_at.is_some_and(|at| Instant::now() >= at) {
                let err = StoreError::Unavailable("lease was not released in time".into());
                return self.local(fetcher, &known, reason, err).await;
            }
            tokio::time::sleep(self.poll_interval).await;
            match self.load().await {
                Ok(Some(stored)) if known.adoptable(&stored, rejected) => {
                    tracing::debug!(
                        version = stored.version,
                        "adopting token refreshed by another process"
                    );
                    return Ok(Obtained::adopted(stored));
                }
                Ok(stored) => newest = stored,
                Err(err) => return self.local(fetcher, &known, reason, err).await,
            }
        };

        // 3. We hold the lease: one more look, then refresh and save.
        let result = self
            .refresh_with_lease(fetcher, &known, rejected, newest, reason)
            .await;
        if let Err(err) = self.timed(self.store.unlock(lease)).await {
            tracing::warn!(error = %err, "could not release the token lease; it will expire");
        }
        result
    }

    async fn refresh_with_lease(
        &self,
        fetcher: &Fetcher,
        known: &Known,
        rejected: Option<&Token>,
        newest: Option<StoredToken>,
        reason: RefreshReason,
    ) -> Result<Obtained, RefreshError> {
        let newest = match self.load().await {
            Ok(Some(stored)) if known.adoptable(&stored, rejected) => {
                return Ok(Obtained::adopted(stored));
            }
            Ok(stored) => stored,
            Err(err) => {
                tracing::warn!(error = %err, "token store unavailable; refreshing locally");
                newest
            }
        };
        // The newest token known carries the refresh token that is still
        // good: the stored one unless ours replaced it (a local refresh).
        let (expected, base) = match newest {
            Some(stored) if known.superseded_by(&stored) || known.version == stored.version => {
                (stored.version, Some(Arc::new(stored.token)))
            }
            Some(stored) => (stored.version, known.token.clone()),
            None => (0, known.token.clone()),
        };
        match fetcher.fetch(base, reason).await {
            Ok(token) => match self
                .timed(self.store.save(&self.key, &token, Some(expected)))
                .await
            {
                Ok(version) => Ok(Obtained::saved(token, version)),
                Err(err) => {
                    tracing::warn!(error = %err, "could not save the refreshed token; using it locally");
                    Ok(Obtained::fetched(token))
                }
            },
            Err(err) => {
                // 4. Another process may have refreshed (and rotated) meanwhile:
                //    look before declaring the refresh failed. Nothing is
                //    deleted: what another process wrote stays.
                if let Ok(Some(stored)) = self.load().await {
                    if known.adoptable(&stored, rejected) {
                        tracing::debug!(
                            version = stored.version,
                            "refresh failed; adopting the token another process stored"
                        );
                        return Ok(Obtained::adopted(stored));
                    }
                }
                Err(err)
            }
        }
    }

    /// 5. The store is out of reach: refresh without it.
    async fn local(
        &self,
        fetcher: &Fetcher,
        known: &Known,
        reason: RefreshReason,
        err: StoreError,
    ) -> Result<Obtained, RefreshError> {
        tracing::warn!(error = %err, "token store unavailable; refreshing locally");
        let token = fetcher.fetch(known.token.clone(), reason).await?;
        // Best effort, and only over the version this token replaces: a
        // token another process saved meanwhile is never overwritten.
        match self
            .timed(self.store.save(&self.key, &token, Some(known.version)))
            .await
        {
            Ok(version) => Ok(Obtained::saved(token, version)),
            Err(err) => {
                tracing::debug!(error = %err, "locally refreshed token not saved");
                Ok(Obtained::fetched(token))
            }
        }
    }

    /// After a rejection of a token too young to refresh: the token another
    /// process stored in its place, if any. A refresh another process has in
    /// flight (its lease is held) is waited for, within twice the lease ttl.
    /// A store out of reach counts as nothing newer.
    pub(crate) async fn newer_than(&self, previous: Previous) -> Option<StoredToken> {
        let rejected = previous.token.clone();
        let known = Known {
            version: previous.store_version,
            token: previous.token,
        };
        let newer = |stored: Option<StoredToken>| {
            stored.filter(|stored| known.adoptable(stored, rejected.as_deref()))
        };
        let give_up_at = Instant::now().checked_add(self.lease_ttl.saturating_mul(2));
        loop {
            if let Some(stored) = newer(self.load().await.ok()?) {
                return Some(stored);
            }
            if let Some(lease) = self
                .timed(self.store.try_lock(&self.key, self.lease_ttl))
                .await
                .ok()?
            {
                // Nobody is refreshing; one last look covers a holder that
                // saved and let go between the read and the lock.
                let stored = self.load().await;
                let _ = self.timed(self.store.unlock(lease)).await;
                return newer(stored.ok()?);
            }
            if give_up_at.is_some_and(|at| Instant::now() >= at) {
                return None;
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    /// Saves a token given by the application, without waiting.
    pub(crate) fn save_in_background(&self, token: Arc<Token>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = self.clone();
        runtime.spawn(async move {
            if let Err(err) = this.timed(this.store.save(&this.key, &token, None)).await {
                tracing::warn!(error = %err, "could not save the token");
            }
        });
    }
}
