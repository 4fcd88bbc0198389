//! One call of the token source, and what a refresh obtained.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;

use crate::error::{RefreshError, RefreshFailed, RefreshTimedOut};
use crate::{RefreshContext, RefreshReason, Token, TokenSource};

/// The token source with the time it may take.
pub(crate) struct Fetcher {
    source: Box<dyn TokenSource>,
    timeout: Duration,
}

impl Fetcher {
    pub(crate) fn new(source: Box<dyn TokenSource>, timeout: Duration) -> Self {
        Self { source, timeout }
    }

    /// Calls the token source, with the refresh timeout, containing panics.
    pub(crate) async fn fetch(
        &self,
        previous: Option<Arc<Token>>,
        reason: RefreshReason,
    ) -> Result<Token, RefreshError> {
        let cx = RefreshContext { previous, reason };
        // NOTE: a runtime built without its time driver panics when a timer
        // is made; find out before the source is called.
        let timeout = self.timeout;
        if std::panic::catch_unwind(move || drop(tokio::time::sleep(timeout))).is_err() {
            return Err(RefreshError::Failed(RefreshFailed::from_message(
                "token refresh needs a tokio runtime with its time driver \
                 (`enable_time` or `enable_all` on the runtime builder)",
            )));
        }
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.source.fetch(cx))) {
            Err(_) => Err(panicked()),
            Ok(fetch) => {
                let guarded = AssertUnwindSafe(fetch).catch_unwind();
                match tokio::time::timeout(self.timeout, guarded).await {
                    Err(_) => Err(RefreshError::TimedOut(RefreshTimedOut::new(self.timeout))),
                    Ok(Err(_)) => Err(panicked()),
                    Ok(Ok(Err(err))) => Err(RefreshError::from_source(err)),
                    Ok(Ok(Ok(token))) => Ok(token),
                }
            }
        }
    }
}

impl Fetcher {
    /// Asks the token source to revoke `token` at the server.
    pub(crate) fn revoke(
        &self,
        token: Arc<Token>,
    ) -> futures::future::BoxFuture<'static, Result<(), crate::BoxError>> {
        self.source.revoke(token)
    }
}

fn panicked() -> RefreshError {
    RefreshError::Failed(RefreshFailed::from_message("token source panicked"))
}

/// What a refresh replaces: the token it found wanting, if any.
#[derive(Clone, Default)]
pub(crate) struct Previous {
    pub(crate) token: Option<Arc<Token>>,
    /// The store version it came with; 0 when it did not come from a store.
    pub(crate) store_version: u64,
}

/// A token obtained by a refresh.
pub(crate) struct Obtained {
    pub(crate) token: Token,
    pub(crate) store_version: Option<u64>,
    pub(crate) adopted: bool,
}

impl Obtained {
    /// Fetched here, not saved in a store.
    pub(crate) fn fetched(token: Token) -> Self {
        Self {
            token,
            store_version: None,
            adopted: false,
        }
    }

    /// Fetched here and saved as `version`.
    pub(crate) fn saved(token: Token, version: u64) -> Self {
        Self {
            token,
            store_version: Some(version),
            adopted: false,
        }
    }

    /// Taken from the store, where another process (or an earlier run) put it.
    pub(crate) fn adopted(stored: crate::StoredToken) -> Self {
        Self {
            token: stored.token,
            store_version: Some(stored.version),
            adopted: true,
        }
    }
}
