//! What the request paths and refreshes count: the handle's counters (read
//! by [`TokenHandle::stats`](crate::TokenHandle::stats)) and the same events
//! for the `metrics` facade ([`crate::metrics`], feature `metrics`).

use std::sync::Arc;
use std::time::Duration;

use super::current::Current;
use super::manager::{Counters, TokenManager};
use crate::error::RefreshError;
use crate::metrics::{self, Outcome};
use crate::{RefreshReason, SkipReason};

impl TokenManager {
    /// A request found no usable token and waits for one. A wait with no
    /// token installed (at start, after `clear()`) is counted apart: it is
    /// expected, while a wait on an expired token means refreshes fall
    /// behind.
    pub(crate) fn count_wait(&self) {
        let first_token = self.current().is_none();
        let counter = if first_token {
            &self.counters.waited_first_token
        } else {
            &self.counters.waited
        };
        Counters::bump(counter);
        metrics::waited(&self.config.name, first_token);
    }

    /// A request is sent again after a refresh.
    pub(crate) fn count_retry(&self) {
        Counters::bump(&self.counters.retries);
        metrics::retried(&self.config.name);
    }

    /// A rejected request is handed back without a retry.
    pub(crate) fn count_skipped_retry(&self, reason: SkipReason) {
        Counters::bump(&self.counters.skipped_retries);
        metrics::retry_skipped(&self.config.name, reason);
    }

    /// Reports how a refresh ended (the counters are kept by the manager).
    pub(crate) fn report_refresh(
        &self,
        reason: RefreshReason,
        result: &Result<(Arc<Current>, bool), RefreshError>,
        took: Duration,
    ) {
        let outcome = match result {
            Ok((_, true)) => Outcome::Adopted,
            Ok((_, false)) => Outcome::Success,
            Err(err) => match err {
                RefreshError::Failed(_) => Outcome::Failure,
                RefreshError::TimedOut(_) => Outcome::Timeout,
                RefreshError::Reauthorize(_) => Outcome::ReauthorizationRequired,
                RefreshError::Uncoordinated(_) => Outcome::StoreUnreachable,
            },
        };
        metrics::refresh_finished(&self.config.name, reason, outcome, took);
    }

    /// Reports the time left on a token just installed.
    pub(crate) fn report_expiry(&self, current: &Current) {
        metrics::expires_in(&self.config.name, current.expires_in());
    }
}
