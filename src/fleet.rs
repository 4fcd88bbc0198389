//! The fleet protocol: how a manager with a [`TokenStore`] refreshes so that
//! a fleet of processes behaves like one client.
//!
//! NOTE: the protocol, in order.
//! 1. Re-read the store. A newer, still-valid token there is adopted: some
//!    other process refreshed already.
//! 2. Take the key's lease. Without it, poll the store until the holder
//!    saves (adopt) or the lease expires (take it over).
//! 3. With the lease: re-read once more, then call the token source with the
//!    newest token known (its refresh token may have rotated), save with
//!    compare-and-swap on the version read, release the lease.
//! 4. When the source fails (`invalid_grant` …), re-read before giving up:
//!    another process may have refreshed. Never delete what another wrote.
//! 5. When the store cannot be reached, warn and refresh locally: serving
//!    requests beats coordination.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::RefreshError;
use crate::manager::{Current, TokenManager};
use crate::store::{StoreError, StoredToken, TokenStore};
use crate::{RefreshReason, Token};

/// A token obtained by a refresh.
pub(crate) struct Obtained {
    pub(crate) token: Token,
    pub(crate) store_version: Option<u64>,
    pub(crate) adopted: bool,
}

impl Obtained {
    pub(crate) fn fetched(token: Token) -> Self {
        Self {
            token,
            store_version: None,
            adopted: false,
        }
    }

    fn adopted(stored: StoredToken) -> Self {
        Self {
            token: stored.token,
            store_version: Some(stored.version),
            adopted: true,
        }
    }
}

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

/// `true` when `stored` is newer than what we have and can be used.
fn is_newer_and_usable(stored: &StoredToken, ours: u64, rejected: Option<&Token>) -> bool {
    stored.version > ours
        && !stored.token.is_expired()
        && rejected.is_none_or(|rejected| rejected != &stored.token)
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

    async fn load(&self) -> Result<Option<StoredToken>, StoreError> {
        self.timed(self.store.load(&self.key)).await
    }

    /// Runs the protocol and returns the token to install.
    pub(crate) async fn obtain(
        &self,
        manager: &TokenManager,
        previous: Option<Arc<Current>>,
        reason: RefreshReason,
    ) -> Result<Obtained, RefreshError> {
        let mut ours = previous.as_ref().map_or(0, |c| c.store_version);
        let rejected = previous.as_ref().map(|c| c.token.clone());
        let rejected = rejected.as_deref();
        let previous_token = previous.as_ref().map(|c| c.token.clone());

        // 1. Someone else may have refreshed already.
        let mut newest = match self.load().await {
            // NOTE: a manual refresh asks for a new token: what is stored
            // now is the base to refresh from, never an answer. Only a token
            // saved after this read (by another process that refreshed while
            // this one waited for the lease) is adopted.
            Ok(Some(stored)) if reason == RefreshReason::Manual => {
                ours = ours.max(stored.version);
                Some(stored)
            }
            Ok(Some(stored)) if is_newer_and_usable(&stored, ours, rejected) => {
                tracing::debug!(version = stored.version, "adopting token from store");
                return Ok(Obtained::adopted(stored));
            }
            Ok(stored) => stored,
            Err(err) => return self.local(manager, previous_token, reason, err).await,
        };

        // 2. Take the lease, or wait for its holder.
        let give_up_at = Instant::now() + self.lease_ttl + self.lease_ttl;
        let lease = loop {
            match self
                .timed(self.store.try_lock(&self.key, self.lease_ttl))
                .await
            {
                Ok(Some(lease)) => break lease,
                Ok(None) => {}
                Err(err) => return self.local(manager, previous_token, reason, err).await,
            }
            if Instant::now() >= give_up_at {
                let err = StoreError::Unavailable("lease was not released in time".into());
                return self.local(manager, previous_token, reason, err).await;
            }
            tokio::time::sleep(self.poll_interval).await;
            match self.load().await {
                Ok(Some(stored)) if is_newer_and_usable(&stored, ours, rejected) => {
                    tracing::debug!(
                        version = stored.version,
                        "adopting token refreshed by another process"
                    );
                    return Ok(Obtained::adopted(stored));
                }
                Ok(stored) => newest = stored,
                Err(err) => return self.local(manager, previous_token, reason, err).await,
            }
        };

        // 3. We hold the lease: one more look, then refresh and save.
        let result = self
            .refresh_with_lease(manager, ours, rejected, previous_token, newest, reason)
            .await;
        if let Err(err) = self.timed(self.store.unlock(lease)).await {
            tracing::warn!(error = %err, "could not release the token lease; it will expire");
        }
        result
    }

    async fn refresh_with_lease(
        &self,
        manager: &TokenManager,
        ours: u64,
        rejected: Option<&Token>,
        previous_token: Option<Arc<Token>>,
        newest: Option<StoredToken>,
        reason: RefreshReason,
    ) -> Result<Obtained, RefreshError> {
        let newest = match self.load().await {
            Ok(Some(stored)) if is_newer_and_usable(&stored, ours, rejected) => {
                return Ok(Obtained::adopted(stored));
            }
            Ok(stored) => stored,
            Err(err) => {
                tracing::warn!(error = %err, "token store unavailable; refreshing locally");
                newest
            }
        };
        // The newest token known carries the refresh token that is still good.
        let (expected, base) = match &newest {
            Some(stored) if stored.version >= ours => {
                (stored.version, Some(Arc::new(stored.token.clone())))
            }
            Some(stored) => (stored.version, previous_token),
            None => (0, previous_token),
        };
        match manager.call_source(base, reason).await {
            Ok(token) => match self
                .timed(self.store.save(&self.key, &token, Some(expected)))
                .await
            {
                Ok(version) => Ok(Obtained {
                    token,
                    store_version: Some(version),
                    adopted: false,
                }),
                Err(err) => {
                    tracing::warn!(error = %err, "could not save the refreshed token; using it locally");
                    Ok(Obtained::fetched(token))
                }
            },
            Err(err) => {
                // 4. Another process may have refreshed (and rotated) meanwhile.
                if let Ok(Some(stored)) = self.load().await {
                    if is_newer_and_usable(&stored, ours, rejected) {
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
        manager: &TokenManager,
        previous: Option<Arc<Token>>,
        reason: RefreshReason,
        err: StoreError,
    ) -> Result<Obtained, RefreshError> {
        tracing::warn!(error = %err, "token store unavailable; refreshing locally");
        let token = manager.call_source(previous, reason).await?;
        // Best effort: let the others see it once the store is back.
        if let Err(err) = self.timed(self.store.save(&self.key, &token, None)).await {
            tracing::debug!(error = %err, "token not saved");
        }
        Ok(Obtained::fetched(token))
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
