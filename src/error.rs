//! The crate's own failures, as small public types a caller can
//! [`downcast_ref`](std::error::Error) out of a [`BoxError`](crate::BoxError).

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A shared, cloneable error source. Refresh outcomes are shared between every
/// request that waited for them, so their sources are reference counted.
pub(crate) type SharedError = Arc<dyn StdError + Send + Sync + 'static>;

/// The token source failed to produce a token.
///
/// Requests that arrive inside the back-off window after a failure receive a
/// clone of the same error without calling the token source again.
///
/// ```
/// use tower_auth_refresh::{BoxError, RefreshFailed};
///
/// fn explain(err: &BoxError) -> &'static str {
///     if err.downcast_ref::<RefreshFailed>().is_some() { "token refresh failed" } else { "other" }
/// }
/// # let _ = explain;
/// ```
#[derive(Clone)]
pub struct RefreshFailed {
    source: SharedError,
    in_backoff: bool,
}

impl RefreshFailed {
    pub(crate) fn new(source: SharedError) -> Self {
        Self {
            source,
            in_backoff: false,
        }
    }

    pub(crate) fn from_message(message: impl Into<String>) -> Self {
        Self::new(Arc::new(Message(message.into())))
    }

    pub(crate) fn in_backoff(&self) -> Self {
        Self {
            source: self.source.clone(),
            in_backoff: true,
        }
    }

    /// `true` when this error was returned from the back-off window, without
    /// a new call to the token source.
    pub fn is_backoff(&self) -> bool {
        self.in_backoff
    }
}

impl fmt::Debug for RefreshFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshFailed")
            .field("source", &self.source)
            .field("in_backoff", &self.in_backoff)
            .finish()
    }
}

impl fmt::Display for RefreshFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.in_backoff {
            write!(
                f,
                "token refresh failed recently, backing off: {}",
                self.source
            )
        } else {
            write!(f, "token refresh failed: {}", self.source)
        }
    }
}

impl StdError for RefreshFailed {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

/// The token source did not answer within the refresh timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshTimedOut {
    after: Duration,
}

impl RefreshTimedOut {
    pub(crate) fn new(after: Duration) -> Self {
        Self { after }
    }

    /// The timeout that elapsed.
    pub fn after(&self) -> Duration {
        self.after
    }
}

impl fmt::Display for RefreshTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "token refresh timed out after {:?}", self.after)
    }
}

impl StdError for RefreshTimedOut {}

/// No token can be obtained without a person: the refresh token was rejected
/// or has expired and no other grant can run.
///
/// A [`TokenSource`](crate::TokenSource) returns this error to say so; the
/// manager hands it to callers unchanged, so it can be matched with
/// `downcast_ref::<ReauthorizationRequired>()`.
///
/// ```
/// use tower_auth_refresh::ReauthorizationRequired;
///
/// let err = ReauthorizationRequired::new("refresh token expired");
/// assert_eq!(err.reason(), "refresh token expired");
/// ```
#[derive(Clone)]
pub struct ReauthorizationRequired {
    reason: String,
    source: Option<SharedError>,
}

impl ReauthorizationRequired {
    /// A re-authorization error with a human-readable reason.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            source: None,
        }
    }

    /// Attaches the error that led to it (for example the token endpoint's
    /// `invalid_grant`).
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// Why re-authorization is required.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Debug for ReauthorizationRequired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReauthorizationRequired")
            .field("reason", &self.reason)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for ReauthorizationRequired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "re-authorization required: {}", self.reason)
    }
}

impl StdError for ReauthorizationRequired {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// The process could not coordinate its refresh with the rest of the fleet
/// (the token store could not be reached, or the refresh lease could not be
/// had in time), and its policy
/// ([`UnreachableStore`](crate::UnreachableStore)) forbids presenting a
/// refresh token without the lease: another process may have spent it
/// already, and a strict authorization server would revoke every replica's
/// tokens for a second use.
///
/// Returned when the policy is [`UnreachableStore::Fail`](crate::UnreachableStore::Fail),
/// or when the token source could not obtain a token without the refresh
/// token (no grant that does not rotate, such as client credentials).
///
/// ```
/// use tower_auth_refresh::{BoxError, StoreUnreachable};
///
/// fn is_fleet_outage(err: &BoxError) -> bool {
///     err.downcast_ref::<StoreUnreachable>().is_some()
/// }
/// # let _ = is_fleet_outage;
/// ```
#[derive(Clone)]
pub struct StoreUnreachable {
    reason: String,
    source: Option<SharedError>,
}

impl StoreUnreachable {
    pub(crate) fn new(reason: impl Into<String>, source: Option<SharedError>) -> Self {
        Self {
            reason: reason.into(),
            source,
        }
    }

    /// Why the process could not coordinate (no secret).
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Debug for StoreUnreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreUnreachable")
            .field("reason", &self.reason)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for StoreUnreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "token refresh not coordinated with the fleet, refresh token not presented: {}",
            self.reason
        )
    }
}

impl StdError for StoreUnreachable {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// The token could not be turned into a request header (for example it
/// contains a line break). Reported as the cause of a [`RefreshFailed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTokenValue {
    _private: (),
}

impl InvalidTokenValue {
    pub(crate) fn new() -> Self {
        Self { _private: () }
    }
}

impl fmt::Display for InvalidTokenValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("token contains characters that are not allowed in a header value")
    }
}

impl StdError for InvalidTokenValue {}

/// The outcome of a failed refresh, shared between all waiters.
#[derive(Debug, Clone)]
pub(crate) enum RefreshError {
    Failed(RefreshFailed),
    TimedOut(RefreshTimedOut),
    Reauthorize(ReauthorizationRequired),
    Uncoordinated(StoreUnreachable),
}

impl RefreshError {
    /// Classifies an error returned by a token source.
    pub(crate) fn from_source(err: crate::BoxError) -> Self {
        match err.downcast::<ReauthorizationRequired>() {
            Ok(reauth) => Self::Reauthorize(*reauth),
            Err(err) => match err.downcast::<RefreshTimedOut>() {
                Ok(timeout) => Self::TimedOut(*timeout),
                Err(err) => match err.downcast::<RefreshFailed>() {
                    Ok(failed) => Self::Failed(*failed),
                    Err(err) => Self::Failed(RefreshFailed::new(Arc::from(err))),
                },
            },
        }
    }

    /// This error as a shareable cause.
    pub(crate) fn shared(&self) -> SharedError {
        match self {
            Self::Failed(e) => Arc::new(e.clone()),
            Self::TimedOut(e) => Arc::new(e.clone()),
            Self::Reauthorize(e) => Arc::new(e.clone()),
            Self::Uncoordinated(e) => Arc::new(e.clone()),
        }
    }

    /// The error handed to callers during the back-off window.
    pub(crate) fn for_backoff(&self) -> Self {
        match self {
            Self::Failed(failed) => Self::Failed(failed.in_backoff()),
            other => other.clone(),
        }
    }

    pub(crate) fn into_box(self) -> crate::BoxError {
        match self {
            Self::Failed(e) => Box::new(e),
            Self::TimedOut(e) => Box::new(e),
            Self::Reauthorize(e) => Box::new(e),
            Self::Uncoordinated(e) => Box::new(e),
        }
    }
}

impl fmt::Display for RefreshError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Failed(e) => e.fmt(f),
            Self::TimedOut(e) => e.fmt(f),
            Self::Reauthorize(e) => e.fmt(f),
            Self::Uncoordinated(e) => e.fmt(f),
        }
    }
}

#[derive(Debug)]
struct Message(String);

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for Message {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_errors_are_classified() {
        let reauth: crate::BoxError = Box::new(ReauthorizationRequired::new("gone"));
        assert!(matches!(
            RefreshError::from_source(reauth),
            RefreshError::Reauthorize(_)
        ));
        let other: crate::BoxError = "boom".into();
        let err = RefreshError::from_source(other).into_box();
        let failed = err.downcast_ref::<RefreshFailed>().expect("wrapped");
        assert!(failed.to_string().contains("boom"));
        assert!(!failed.is_backoff());
    }
}
