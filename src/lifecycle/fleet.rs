//! The fleet protocol: how a manager with a [`TokenStore`] refreshes so that
//! a fleet of processes behaves like one client, and a rotated refresh
//! token is presented by one process, once.
//!
//! NOTE: the protocol, in order.
//! 1. Re-read the store. A newer, still-valid token there is adopted: some
//!    other process refreshed already.
//! 2. Take the key's lease. Without it, poll the store (bounded) until the
//!    holder saves (adopt) or the lease expires (take it over).
//! 3. With the lease: re-read once more, and decide what to refresh from.
//!    A refresh token is presented only when it is read from the store
//!    under the lease, unmarked; or when it is this process's own, never
//!    stored, and the store has no entry (or, after a local refresh the
//!    application opted into, holds the refresh token this process spent).
//!    A token in memory is never judged newer than the stored one by its
//!    expiry: expiries tie (whole-second `exp`), run backwards (a shorter
//!    login lifetime, clock skew), and a save whose answer was lost leaves
//!    a stored token this process does not know it wrote.
//!    Before presenting it, mark the stored entry ("a refresh with this
//!    refresh token has started", `PRESENTED_KEY` in its metadata, a
//!    compare-and-swap save), check the lease is still ours, then call the
//!    token source and save the new token over the marked version.
//! 4. A marked entry, or a stored token that is gone while this process's
//!    token came from the store (the store lost its data), means the
//!    refresh token's fate is unknown: another process may have spent it.
//!    The source is then called without it (it may use a grant that does
//!    not rotate); the server never sees a spent refresh token twice.
//! 5. A save that loses a version race re-reads: when the stored refresh
//!    token is still the one just spent, it saves again over that version
//!    (the new token must not live in one process's memory only);
//!    otherwise it adopts what is stored.
//! 6. When the source fails (`invalid_grant` …), re-read before giving up:
//!    another process may have refreshed. Never delete what another wrote.
//!    A failure that certainly left the refresh token as it was (refused
//!    connection, a 4xx error answer) unmarks the entry; a 5xx never does,
//!    whatever its body says.
//! 7. When the process cannot coordinate (the store does not answer, the
//!    lease cannot be had in time), [`UnreachableStore`] decides: by default
//!    the source is called without the refresh token.
//! 8. After a rejection of a token too young to refresh (the storm guard),
//!    `newer_than` only looks: a newer stored token, or the one a lease
//!    holder is about to save. It never calls the token source.
//!
//! 9. A token given by the application (`set_token`, `initial_token`) is
//!    saved under the lease too, with a compare-and-swap: an initial token
//!    only when the store has no entry; a set token only over the entry of
//!    the token it replaces (never over one whose refresh token moved on
//!    since), and only while it is still this process's current token
//!    (a token already refreshed from is spent).
//!
//! "Newer" (`Known::superseded_by`) means "not the token this process
//! holds": stores only move forward (a version, once saved, is replaced
//! under the lease), so a stored token other than ours is the fleet's.
//! A corrupt stored entry (put aside by the store) counts as no token.

use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;
use tracing::instrument::WithSubscriber;

use super::fetch::{Fetcher, Obtained, Previous};
use crate::error::{RefreshError, RefreshFailed, StoreUnreachable};
use crate::store::{Lease, StoreError, StoredToken, TokenStore};
use crate::{RefreshReason, Token};

/// The metadata key that marks a stored entry whose refresh token is being
/// (or was, with an unknown outcome) presented to the token server. Never
/// part of an installed token.
const PRESENTED_KEY: &str = "tower-auth-refresh:presented";

/// How many times a save that lost a version race is tried again.
const SAVE_ATTEMPTS: usize = 3;

/// What a refresh does when its process cannot coordinate with the rest of
/// the fleet: the [`TokenStore`] does not answer (a timeout, a `READONLY`
/// replica after a failover, a network split) or the refresh lease cannot
/// be had in time. Set with
/// [`TokenHandleBuilder::when_store_unreachable`](crate::TokenHandleBuilder::when_store_unreachable).
///
/// The refresh token of a fleet is shared: while a process cannot see the
/// store, another may already have presented it, and a strict server
/// (Auth0, Okta, Keycloak with reuse detection) treats a second use as theft
/// and revokes every replica's tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum UnreachableStore {
    /// The default. The token source is called without the refresh token
    /// (`RefreshContext::previous` carries none), so it can only use a grant
    /// that does not rotate: client credentials, a password grant (an
    /// `OAuth2Source`'s initial grant). When it cannot,
    /// the request fails with [`StoreUnreachable`](crate::StoreUnreachable).
    /// The new token is saved only over the version it replaces.
    #[default]
    InitialGrantOnly,
    /// Fail the refresh at once with
    /// [`StoreUnreachable`](crate::StoreUnreachable); the token source is
    /// not called. Requests go on with the current token while it is valid.
    Fail,
    /// Present the refresh token without the lease, as a single process
    /// would. Only safe when the server does not rotate refresh tokens, or
    /// when this process is the only one using them.
    RefreshLocally,
}

/// A store, the key of this manager's token in it, and the protocol's timings.
#[derive(Clone)]
pub(crate) struct FleetStore {
    pub(crate) store: Arc<dyn TokenStore>,
    pub(crate) key: String,
    pub(crate) lease_ttl: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) op_timeout: Duration,
    pub(crate) unreachable: UnreachableStore,
    /// The refresh token a local refresh ([`UnreachableStore::RefreshLocally`])
    /// spent without the lease, while the token it got could not be saved.
    pub(crate) locally_spent: Arc<std::sync::Mutex<Option<SecretString>>>,
}

/// What an application-given token may replace in the store.
pub(crate) enum Replacing {
    /// An initial token: only an empty store.
    Nothing,
    /// A token set over this (store version, token), if any: only that
    /// entry, or one with the same refresh token.
    Current(Option<(u64, Arc<Token>)>),
}

impl std::fmt::Debug for FleetStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetStore")
            .field("key", &self.key)
            .field("lease_ttl", &self.lease_ttl)
            .field("unreachable", &self.unreachable)
            .finish_non_exhaustive()
    }
}

/// What this manager knows of the token it is about to replace.
#[derive(Clone)]
struct Known {
    /// The store version it came with; 0 when it did not come from the store.
    version: u64,
    token: Option<Arc<Token>>,
    /// The refresh token a local refresh spent without the lease.
    locally_spent: Option<SecretString>,
}

impl Known {
    /// `true` when `stored` holds another token than the known one.
    /// Metadata (usage, the presented mark) does not make a token new.
    ///
    /// NOTE: no expiry comparison. A stored token other than ours was
    /// saved by the fleet (stores move forward under the lease); the one
    /// exception, a stored refresh token this process spent locally, is
    /// `Known::spent_here`.
    fn superseded_by(&self, stored: &StoredToken) -> bool {
        let Some(ours) = &self.token else {
            return true;
        };
        !stored.token.same_secrets(ours) && !self.spent_here(stored)
    }

    /// `true` when the stored refresh token is the one this process spent
    /// in a local refresh (its replacement is ours, not saved yet).
    fn spent_here(&self, stored: &StoredToken) -> bool {
        let Some(spent) = &self.locally_spent else {
            return false;
        };
        stored
            .token
            .refresh_token()
            .is_some_and(|rt| rt.expose_secret() == spent.expose_secret())
    }

    /// `true` when `stored` replaced the known token and can be used as is.
    /// A marked entry (a refresh is under way, or its outcome is unknown) is
    /// not a newer token; it is adopted only by a process that has none.
    fn adoptable(&self, stored: &StoredToken, rejected: Option<&Token>) -> bool {
        self.superseded_by(stored)
            && (self.token.is_none() || !is_marked(&stored.token))
            && !stored.token.is_expired()
            && rejected.is_none_or(|rejected| !rejected.same_secrets(&stored.token))
    }
}

/// What a refresh under the lease starts from.
struct Plan {
    /// The stored version the new token replaces (0: none).
    expected: u64,
    /// The newest token known.
    base: Option<Arc<Token>>,
    /// Why `base`'s refresh token must not be presented, if it must not.
    withheld: Option<&'static str>,
}

impl Plan {
    fn new(known: &Known, stored: Option<StoredToken>) -> Self {
        match stored {
            Some(stored) if is_marked(&stored.token) => Plan {
                expected: stored.version,
                base: Some(Arc::new(stored.token)),
                withheld: Some(
                    "a refresh with the stored refresh token was started and its outcome is unknown",
                ),
            },
            // A local refresh spent the stored refresh token; ours replaced
            // it and is this process's own.
            Some(stored) if known.version == 0 && known.spent_here(&stored) => Plan {
                expected: stored.version,
                base: known.token.clone(),
                withheld: None,
            },
            // NOTE: read under the lease and unmarked: the only refresh token
            // of the fleet that may be presented. Whatever this process holds
            // in memory is older, or was never shared.
            Some(stored) => Plan {
                expected: stored.version,
                base: Some(Arc::new(stored.token)),
                withheld: None,
            },
            None if known.version > 0 => Plan {
                expected: 0,
                base: known.token.clone(),
                withheld: Some(
                    "the stored token is gone (the store lost its data?); another process may be refreshing with it",
                ),
            },
            None => Plan {
                expected: 0,
                base: known.token.clone(),
                withheld: None,
            },
        }
    }
}

fn is_marked(token: &Token) -> bool {
    token.metadata().contains_key(PRESENTED_KEY)
}

/// A token as handed to the source when its refresh token must not be used.
fn withheld(token: Option<Arc<Token>>) -> Option<Arc<Token>> {
    token.map(|t| match t.refresh_token() {
        Some(_) => Arc::new(t.without_refresh_token()),
        None => t,
    })
}

/// A stored token as installed: without the presented mark.
fn adopted(mut stored: StoredToken) -> Obtained {
    if is_marked(&stored.token) {
        stored.token = stored.token.without_metadata(PRESENTED_KEY);
    }
    Obtained::adopted(stored)
}

/// `true` when a failed refresh certainly left the presented refresh token
/// as it was (the connection was refused, the server answered 4xx), or
/// when the token is dead anyway (rejected): the entry is unmarked. Any
/// other failure (a 5xx whatever its body, a timeout) may come after the
/// server rotated it: the mark stays.
fn refresh_token_unchanged(err: &RefreshError) -> bool {
    if matches!(err, RefreshError::Reauthorize(_)) {
        return true;
    }
    let shared = err.shared();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&*shared);
    while let Some(err) = cause {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        #[cfg(feature = "oauth2")]
        if let Some(endpoint) = err.downcast_ref::<crate::oauth2::TokenEndpointError>() {
            return endpoint.left_credential_unspent();
        }
        cause = err.source();
    }
    false
}

impl FleetStore {
    fn known(&self, previous: Previous) -> Known {
        let locally_spent = self
            .locally_spent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        Known {
            version: previous.store_version,
            token: previous.token,
            locally_spent,
        }
    }

    fn remember_locally_spent(&self, spent: Option<SecretString>) {
        *self
            .locally_spent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = spent;
    }

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
        let mut known = self.known(previous);

        // 1. Someone else may have refreshed already.
        match self.load().await {
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
                        locally_spent: None,
                    };
                }
            }
            Ok(Some(stored)) if known.adoptable(&stored, rejected) => {
                tracing::debug!(version = stored.version, "adopting token from store");
                return Ok(adopted(stored));
            }
            Ok(_) => {}
            Err(err) => return self.uncoordinated(fetcher, &known, reason, err).await,
        }

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
                Err(err) => return self.uncoordinated(fetcher, &known, reason, err).await,
            }
            if give_up_at.is_some_and(|at| Instant::now() >= at) {
                let err = StoreError::Unavailable("lease was not released in time".into());
                return self.uncoordinated(fetcher, &known, reason, err).await;
            }
            tokio::time::sleep(self.poll_interval).await;
            match self.load().await {
                Ok(Some(stored)) if known.adoptable(&stored, rejected) => {
                    tracing::debug!(
                        version = stored.version,
                        "adopting token refreshed by another process"
                    );
                    return Ok(adopted(stored));
                }
                Ok(_) => {}
                Err(err) => return self.uncoordinated(fetcher, &known, reason, err).await,
            }
        };

        // 3. We hold the lease: one more look, then refresh and save.
        let result = self
            .refresh_with_lease(fetcher, &known, rejected, reason, &lease)
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
        reason: RefreshReason,
        lease: &Lease,
    ) -> Result<Obtained, RefreshError> {
        let mut attempts = 0;
        let (plan, presented) = loop {
            attempts += 1;
            let plan = match self.load().await {
                Ok(Some(stored)) if known.adoptable(&stored, rejected) => {
                    return Ok(adopted(stored));
                }
                Ok(stored) => Plan::new(known, stored),
                Err(err) => return self.uncoordinated(fetcher, known, reason, err).await,
            };
            let Some(base) = plan.base.clone() else {
                break (plan, None);
            };
            let Some(refresh_token) = base.refresh_token() else {
                break (plan, None);
            };
            if let Some(why) = plan.withheld {
                tracing::warn!(reason = why, "not presenting the refresh token");
                break (plan, None);
            }
            // 3. Mark the entry, then make sure the lease is still ours: a
            //    process that takes the lease over after this point sees
            //    the mark and leaves the refresh token alone.
            let marked = base
                .as_ref()
                .clone()
                .with_metadata(PRESENTED_KEY, crate::store::new_owner());
            match self
                .timed(self.store.save(&self.key, &marked, Some(plan.expected)))
                .await
            {
                Ok(version) if !lease.is_expired() => {
                    let spent = refresh_token.clone();
                    break (
                        Plan {
                            expected: version,
                            ..plan
                        },
                        Some(spent),
                    );
                }
                Ok(_) => {
                    let err = StoreError::Unavailable(
                        "the lease expired before the refresh token was presented".into(),
                    );
                    return self.uncoordinated(fetcher, known, reason, err).await;
                }
                Err(StoreError::Conflict { .. }) if attempts < SAVE_ATTEMPTS => {}
                Err(err) => return self.uncoordinated(fetcher, known, reason, err).await,
            }
        };

        let withheld_refresh_token = presented.is_none()
            && plan.withheld.is_some()
            && plan
                .base
                .as_ref()
                .is_some_and(|base| base.refresh_token().is_some());
        let for_source = if presented.is_some() || plan.withheld.is_none() {
            plan.base.clone()
        } else {
            withheld(plan.base.clone())
        };
        match fetcher.fetch(for_source, reason).await {
            Ok(token) => {
                let token = if is_marked(&token) {
                    token.without_metadata(PRESENTED_KEY)
                } else {
                    token
                };
                Ok(self.save_refreshed(token, plan.expected, presented).await)
            }
            Err(err) => {
                if presented.is_some() && refresh_token_unchanged(&err) {
                    if let Some(base) = &plan.base {
                        let unmarked = base.as_ref().clone().without_metadata(PRESENTED_KEY);
                        let _ = self
                            .timed(self.store.save(&self.key, &unmarked, Some(plan.expected)))
                            .await;
                    }
                }
                // NOTE: a source that needs the withheld refresh token says
                // "re-authorization required"; the refresh token may well be
                // alive, so this is a failure, not a dead grant (bulk jobs
                // delete dead grants).
                let err = match err {
                    RefreshError::Reauthorize(reauth) if withheld_refresh_token => {
                        RefreshError::Failed(RefreshFailed::new(Arc::new(reauth)))
                    }
                    err => err,
                };
                // 6. Another process may have refreshed (and rotated) meanwhile:
                //    look before declaring the refresh failed. Nothing is
                //    deleted: what another process wrote stays.
                if let Ok(Some(stored)) = self.load().await {
                    if known.adoptable(&stored, rejected) && !is_marked(&stored.token) {
                        tracing::debug!(
                            version = stored.version,
                            "refresh failed; adopting the token another process stored"
                        );
                        return Ok(adopted(stored));
                    }
                }
                Err(err)
            }
        }
    }

    /// 5. Saves a refreshed token over `expected`. When another writer got
    ///    there first and the stored refresh token is still the one this
    ///    refresh spent, saves again over that version; when the stored
    ///    token is a newer one, adopts it.
    async fn save_refreshed(
        &self,
        token: Token,
        mut expected: u64,
        spent: Option<secrecy::SecretString>,
    ) -> Obtained {
        for _ in 0..SAVE_ATTEMPTS {
            match self
                .timed(self.store.save(&self.key, &token, Some(expected)))
                .await
            {
                Ok(version) => {
                    self.remember_locally_spent(None);
                    return Obtained::saved(token, version);
                }
                Err(StoreError::Conflict { .. }) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "could not save the refreshed token; using it locally");
                    return Obtained::fetched(token);
                }
            }
            match self.load().await {
                Ok(Some(stored)) => {
                    let stored_rt = stored
                        .token
                        .refresh_token()
                        .map(ExposeSecret::expose_secret);
                    let still_spent = match &spent {
                        Some(spent) => stored_rt == Some(spent.expose_secret()),
                        None => is_marked(&stored.token),
                    };
                    if still_spent {
                        tracing::debug!(
                            version = stored.version,
                            "the store changed under the lease; saving the new token again"
                        );
                        expected = stored.version;
                    } else if !stored.token.is_expired() {
                        tracing::debug!(
                            version = stored.version,
                            "another process stored a newer token; adopting it"
                        );
                        return adopted(stored);
                    } else {
                        expected = stored.version;
                    }
                }
                Ok(None) => expected = 0,
                Err(err) => {
                    tracing::warn!(error = %err, "could not save the refreshed token; using it locally");
                    return Obtained::fetched(token);
                }
            }
        }
        tracing::warn!(
            "could not save the refreshed token after {SAVE_ATTEMPTS} attempts; using it locally"
        );
        Obtained::fetched(token)
    }

    /// 7. The process cannot coordinate with the fleet: the policy decides.
    async fn uncoordinated(
        &self,
        fetcher: &Fetcher,
        known: &Known,
        reason: RefreshReason,
        err: StoreError,
    ) -> Result<Obtained, RefreshError> {
        let why = err.to_string();
        let cause: crate::error::SharedError = Arc::new(err);
        match self.unreachable {
            UnreachableStore::Fail => {
                tracing::warn!(error = %why, "cannot coordinate the token refresh; failing it");
                Err(RefreshError::Uncoordinated(StoreUnreachable::new(
                    why,
                    Some(cause),
                )))
            }
            UnreachableStore::RefreshLocally => {
                tracing::warn!(error = %why, "token store unavailable; refreshing locally");
                let token = fetcher.fetch(known.token.clone(), reason).await?;
                let obtained = self.save_over(token, known.version).await;
                if obtained.store_version.is_none() {
                    // NOTE: the stored entry may still hold the refresh token
                    // just spent: remember it, so that it is neither adopted
                    // nor presented once the store answers again.
                    let spent = known
                        .token
                        .as_ref()
                        .and_then(|t| t.refresh_token().cloned());
                    self.remember_locally_spent(spent.or(known.locally_spent.clone()));
                }
                Ok(obtained)
            }
            UnreachableStore::InitialGrantOnly => {
                tracing::warn!(
                    error = %why,
                    "cannot coordinate the token refresh; asking without the refresh token"
                );
                match fetcher.fetch(withheld(known.token.clone()), reason).await {
                    Ok(token) => Ok(self.save_over(token, known.version).await),
                    Err(fetch_err) => Err(RefreshError::Uncoordinated(StoreUnreachable::new(
                        format!(
                            "{why}; and no token could be had without the refresh token: {fetch_err}"
                        ),
                        Some(fetch_err.shared()),
                    ))),
                }
            }
        }
    }

    /// Best effort, and only over the version this token replaces: a token
    /// another process saved meanwhile is never overwritten.
    async fn save_over(&self, token: Token, version: u64) -> Obtained {
        match self
            .timed(self.store.save(&self.key, &token, Some(version)))
            .await
        {
            Ok(version) => Obtained::saved(token, version),
            Err(err) => {
                tracing::debug!(error = %err, "locally obtained token not saved");
                Obtained::fetched(token)
            }
        }
    }

    /// After a rejection of a token too young to refresh: the token another
    /// process stored in its place, if any. A refresh another process has in
    /// flight (its lease is held) is waited for, within twice the lease ttl.
    /// A store out of reach counts as nothing newer.
    pub(crate) async fn newer_than(&self, previous: Previous) -> Option<StoredToken> {
        let rejected = previous.token.clone();
        let known = self.known(previous);
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

    /// 9. Saves a token given by the application, in the background (where
    ///    refreshes run), under the lease. `still_current` tells whether the
    ///    token is still this process's current one: once it has been
    ///    refreshed from, its refresh token is spent and it must not be
    ///    stored.
    pub(crate) fn save_application(
        &self,
        token: Arc<Token>,
        replacing: Replacing,
        still_current: impl Fn() -> bool + Send + Sync + 'static,
    ) {
        let Some(runtime) = super::background::runtime_for_caller() else {
            return;
        };
        let this = self.clone();
        let save = async move {
            let Some(lease) = this.wait_for_lease().await else {
                tracing::warn!("could not take the token lease; the token set is not saved");
                return;
            };
            let result = this
                .save_application_with_lease(&token, &replacing, &still_current)
                .await;
            if let Err(err) = this.timed(this.store.unlock(lease)).await {
                tracing::warn!(error = %err, "could not release the token lease; it will expire");
            }
            match result {
                Ok(true) => {}
                Ok(false) => tracing::debug!(
                    "the token set is not saved: the store holds a newer one, or it was refreshed already"
                ),
                Err(err) => tracing::warn!(error = %err, "could not save the token"),
            }
        };
        runtime.spawn(save.with_current_subscriber());
    }

    /// The lease, within twice its ttl; `None` when it cannot be had.
    async fn wait_for_lease(&self) -> Option<Lease> {
        let give_up_at = Instant::now().checked_add(self.lease_ttl.saturating_mul(2));
        loop {
            if let Some(lease) = self
                .timed(self.store.try_lock(&self.key, self.lease_ttl))
                .await
                .ok()?
            {
                return Some(lease);
            }
            if give_up_at.is_some_and(|at| Instant::now() >= at) {
                return None;
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    async fn save_application_with_lease(
        &self,
        token: &Token,
        replacing: &Replacing,
        still_current: &(impl Fn() -> bool + Sync),
    ) -> Result<bool, StoreError> {
        if !still_current() {
            return Ok(false);
        }
        let expected = match (self.load().await?, replacing) {
            (None, _) => 0,
            (Some(_), Replacing::Nothing) => return Ok(false),
            (Some(stored), Replacing::Current(None)) => stored.version,
            (Some(stored), Replacing::Current(Some((version, replaced)))) => {
                let same_refresh_token =
                    match (stored.token.refresh_token(), replaced.refresh_token()) {
                        (Some(theirs), Some(ours)) => {
                            theirs.expose_secret() == ours.expose_secret()
                        }
                        (None, None) => true,
                        _ => false,
                    };
                if stored.version != *version && !same_refresh_token {
                    return Ok(false);
                }
                stored.version
            }
        };
        if !still_current() {
            return Ok(false);
        }
        self.timed(self.store.save(&self.key, token, Some(expected)))
            .await
            .map(|_| true)
    }
}
