//! [`TokenStore`]: where tokens live between restarts, and how a fleet of
//! processes agrees on who refreshes.
//!
//! A store keeps one token per key, with a version that grows on every save
//! so a stale writer cannot overwrite a newer token (compare-and-swap), and
//! hands out short leases so that only one process refreshes a key at a time.

use std::any::Any;
use std::fmt;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;

use crate::Token;

mod file;
mod memory;
#[cfg(feature = "redis")]
mod redis;

#[cfg(feature = "redis")]
pub use self::redis::{RedisStore, RedisStoreBuilder};
pub use file::FileStore;
pub use memory::MemoryStore;

/// A token as stored, with its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredToken {
    /// The token.
    pub token: Token,
    /// Grows by at least one on every save of this key.
    pub version: u64,
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A versioned save or delete found another version than expected: some
    /// other writer got there first. Re-read the store.
    #[error("token store: version conflict on {key:?} (expected {expected:?}, found {found:?})")]
    Conflict {
        /// The key.
        key: String,
        /// The version the writer expected.
        expected: Option<u64>,
        /// The version found.
        found: Option<u64>,
    },
    /// The stored data could not be read as a token. The bad data is kept
    /// aside, not deleted; `kept_at` says where, when the store knows.
    #[error("token store: corrupt entry for {key:?}: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong with it.
        reason: String,
        /// Where the bad data was moved, if it was.
        kept_at: Option<String>,
    },
    /// The key cannot be stored by this store (too long for a file name …).
    #[error("token store: key {key:?} cannot be stored: {reason}")]
    InvalidKey {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The store could not be reached or answered with an error.
    #[error("token store unavailable: {0}")]
    Unavailable(#[source] crate::BoxError),
}

/// A lease on a key: while it is held (and not expired), other processes
/// leave the refresh of that key to its holder.
pub struct Lease {
    key: String,
    owner: String,
    acquired_at: Instant,
    ttl: Duration,
    held: Option<Box<dyn Any + Send + Sync>>,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("owner", &self.owner)
            .field("ttl", &self.ttl)
            .field("expired", &self.is_expired())
            .finish()
    }
}

impl Lease {
    /// A lease on `key` held by `owner` for `ttl` from now. `held` keeps
    /// whatever the store needs alive while the lease is held (an OS file
    /// lock, for instance).
    pub fn new(
        key: impl Into<String>,
        owner: impl Into<String>,
        ttl: Duration,
        held: Option<Box<dyn Any + Send + Sync>>,
    ) -> Self {
        Self {
            key: key.into(),
            owner: owner.into(),
            acquired_at: Instant::now(),
            ttl,
            held,
        }
    }

    /// The key the lease is on.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The owner value that identifies this holder.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// `true` once the lease's time to live has passed: another process may
    /// hold the key by now.
    pub fn is_expired(&self) -> bool {
        self.acquired_at.elapsed() >= self.ttl
    }

    /// Time left on the lease.
    pub fn remaining(&self) -> Duration {
        self.ttl.saturating_sub(self.acquired_at.elapsed())
    }

    /// Takes out what the store kept alive with the lease.
    pub fn take_held(&mut self) -> Option<Box<dyn Any + Send + Sync>> {
        self.held.take()
    }
}

/// Where tokens are kept. Implementations: [`MemoryStore`], [`FileStore`],
/// `RedisStore` (feature `redis`).
///
/// ```
/// use tower_auth_refresh::{MemoryStore, Token, TokenStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_auth_refresh::StoreError> {
/// let store = MemoryStore::new();
/// let v1 = store.save("seller-42", &Token::bearer("a"), None).await?;
/// let stored = store.load("seller-42").await?.expect("saved");
/// assert_eq!(stored.version, v1);
/// // A writer that read version 0 cannot overwrite version 1.
/// assert!(store.save("seller-42", &Token::bearer("b"), Some(0)).await.is_err());
/// # Ok(())
/// # }
/// ```
pub trait TokenStore: Send + Sync + 'static {
    /// The token stored under `key`, if any.
    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<StoredToken>, StoreError>>;

    /// Saves `token` under `key`. With `expected_version: Some(v)` the save
    /// succeeds only if the stored version is `v` (`Some(0)`: only if there is
    /// none); `None` saves unconditionally. Returns the new version.
    fn save<'a>(
        &'a self,
        key: &'a str,
        token: &'a Token,
        expected_version: Option<u64>,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// Deletes `key`, only if its version is `expected_version` when given.
    /// Returns whether something was deleted.
    fn delete<'a>(
        &'a self,
        key: &'a str,
        expected_version: Option<u64>,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Every key in the store, for bulk jobs.
    fn list_keys(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>>;

    /// Tries to take the refresh lease on `key` for `ttl`. `Ok(None)`: another
    /// holder has it.
    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Lease>, StoreError>>;

    /// Releases a lease, only if it is still ours.
    fn unlock(&self, lease: Lease) -> BoxFuture<'_, Result<(), StoreError>>;
}

impl<T: TokenStore + ?Sized> TokenStore for std::sync::Arc<T> {
    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<StoredToken>, StoreError>> {
        (**self).load(key)
    }
    fn save<'a>(
        &'a self,
        key: &'a str,
        token: &'a Token,
        expected_version: Option<u64>,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        (**self).save(key, token, expected_version)
    }
    fn delete<'a>(
        &'a self,
        key: &'a str,
        expected_version: Option<u64>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        (**self).delete(key, expected_version)
    }
    fn list_keys(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        (**self).list_keys()
    }
    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Lease>, StoreError>> {
        (**self).try_lock(key, ttl)
    }
    fn unlock(&self, lease: Lease) -> BoxFuture<'_, Result<(), StoreError>> {
        (**self).unlock(lease)
    }
}

/// A random owner value for leases: unique per process and lease.
pub(crate) fn new_owner() -> String {
    format!("{}-{:016x}", std::process::id(), fastrand::u64(..))
}
