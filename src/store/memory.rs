//! [`MemoryStore`]: tokens in this process's memory (the default).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use tokio::time::Instant;

use super::{Lease, StoreError, StoredToken, TokenStore, new_owner};
use crate::Token;

#[derive(Default)]
struct Inner {
    tokens: HashMap<String, StoredToken>,
    leases: HashMap<String, (String, Instant)>,
}

/// Tokens kept in memory, shared by the clones of one store. Nothing
/// survives a restart; use it to share tokens between handles of one process.
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("keys", &self.lock().tokens.len())
            .finish()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl TokenStore for MemoryStore {
    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<StoredToken>, StoreError>> {
        let found = self.lock().tokens.get(key).cloned();
        futures::future::ready(Ok(found)).boxed()
    }

    fn save<'a>(
        &'a self,
        key: &'a str,
        token: &'a Token,
        expected_version: Option<u64>,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        let mut inner = self.lock();
        let found = inner.tokens.get(key).map(|s| s.version);
        let result = match expected_version {
            Some(expected) if found.unwrap_or(0) != expected => Err(StoreError::Conflict {
                key: key.to_owned(),
                expected: Some(expected),
                found,
            }),
            _ => {
                let version = found.unwrap_or(0) + 1;
                inner.tokens.insert(
                    key.to_owned(),
                    StoredToken {
                        token: token.clone(),
                        version,
                    },
                );
                Ok(version)
            }
        };
        futures::future::ready(result).boxed()
    }

    fn delete<'a>(
        &'a self,
        key: &'a str,
        expected_version: Option<u64>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let mut inner = self.lock();
        let found = inner.tokens.get(key).map(|s| s.version);
        let result = match (expected_version, found) {
            (_, None) => Ok(false),
            (Some(expected), Some(found)) if expected != found => Err(StoreError::Conflict {
                key: key.to_owned(),
                expected: Some(expected),
                found: Some(found),
            }),
            _ => Ok(inner.tokens.remove(key).is_some()),
        };
        futures::future::ready(result).boxed()
    }

    fn list_keys(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        let mut keys: Vec<String> = self.lock().tokens.keys().cloned().collect();
        keys.sort();
        futures::future::ready(Ok(keys)).boxed()
    }

    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Lease>, StoreError>> {
        let mut inner = self.lock();
        let now = Instant::now();
        let taken = inner.leases.get(key).is_some_and(|(_, until)| *until > now);
        let result = if taken {
            None
        } else {
            let owner = new_owner();
            inner
                .leases
                .insert(key.to_owned(), (owner.clone(), now + ttl));
            Some(Lease::new(key, owner, ttl, None))
        };
        futures::future::ready(Ok(result)).boxed()
    }

    fn unlock(&self, lease: Lease) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut inner = self.lock();
        if inner
            .leases
            .get(lease.key())
            .is_some_and(|(owner, _)| owner == lease.owner())
        {
            inner.leases.remove(lease.key());
        }
        futures::future::ready(Ok(())).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn versions_guard_against_stale_writers() {
        let store = MemoryStore::new();
        assert_eq!(
            store.save("k", &Token::bearer("a"), Some(0)).await.unwrap(),
            1
        );
        assert!(matches!(
            store.save("k", &Token::bearer("b"), Some(0)).await,
            Err(StoreError::Conflict { found: Some(1), .. })
        ));
        assert_eq!(
            store.save("k", &Token::bearer("c"), Some(1)).await.unwrap(),
            2
        );
        assert!(store.delete("k", Some(1)).await.is_err());
        assert!(store.delete("k", Some(2)).await.unwrap());
        assert!(store.load("k").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn one_lease_at_a_time_until_it_expires_or_is_released() {
        let store = MemoryStore::new();
        let lease = store
            .try_lock("k", Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        assert!(
            store
                .try_lock("k", Duration::from_secs(10))
                .await
                .unwrap()
                .is_none()
        );
        store.unlock(lease).await.unwrap();
        assert!(
            store
                .try_lock("k", Duration::from_millis(0))
                .await
                .unwrap()
                .is_some()
        );
        // A zero-ttl lease has already expired: the next one is granted.
        assert!(
            store
                .try_lock("k", Duration::from_secs(1))
                .await
                .unwrap()
                .is_some()
        );
    }
}
