//! [`TokenEndpointError`]: why the token endpoint gave no token.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

/// An RFC 6749 §5.2 error response: the server's `error` code and, when it
/// sent them, its `error_description` and `error_uri`.
///
/// ```
/// use tower_auth_refresh::oauth2::{OAuthError, TokenEndpointError};
///
/// fn needs_person(err: &TokenEndpointError) -> bool {
///     matches!(err, TokenEndpointError::OAuth(e) if e.error() == "invalid_grant")
/// }
/// # let _ = needs_person;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    pub(crate) status: StatusCode,
    pub(crate) error: String,
    pub(crate) description: Option<String>,
    pub(crate) uri: Option<String>,
}

impl OAuthError {
    /// The HTTP status the error came with (400 or 401 as a rule).
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The `error` code: `invalid_grant`, `invalid_client`, `invalid_scope` …
    pub fn error(&self) -> &str {
        &self.error
    }

    /// The server's `error_description`, if any.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// The server's `error_uri`, if any.
    pub fn uri(&self) -> Option<&str> {
        self.uri.as_deref()
    }
}

impl fmt::Display for OAuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (HTTP {})", self.error, self.status.as_u16())?;
        if let Some(description) = &self.description {
            write!(f, ": {description}")?;
        }
        Ok(())
    }
}

impl StdError for OAuthError {}

/// The token endpoint did not produce a token.
///
/// Reaches callers as the source of a [`RefreshFailed`](crate::RefreshFailed),
/// or of a [`ReauthorizationRequired`](crate::ReauthorizationRequired) when the
/// refresh token or an authorization code was rejected. Neither `Display` nor
/// `Debug` ever contains a token, a client secret or a password; the
/// server's own texts (`error_description`, an envelope message) are shown.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum TokenEndpointError {
    /// An RFC 6749 §5.2 error (`invalid_grant`, `invalid_client` …).
    OAuth(OAuthError),
    /// A non-success status without an RFC 6749 error body (or a 5xx with a
    /// vendor envelope), after `attempts` tries (a 5xx or 429 is retried, a
    /// 4xx is not; for a refresh-token grant, see
    /// [`RetryPolicy`](super::RetryPolicy)).
    Status {
        /// The last status.
        status: StatusCode,
        /// How many requests were sent.
        attempts: u32,
    },
    /// The request could not be sent or the response not read.
    Transport {
        /// The underlying error.
        source: Arc<dyn StdError + Send + Sync + 'static>,
        /// How many requests were tried.
        attempts: u32,
    },
    /// One attempt took longer than the endpoint's timeout.
    Timeout {
        /// The timeout.
        after: Duration,
    },
    /// The response body is larger than the cap.
    TooLarge {
        /// The cap, in bytes.
        limit: usize,
    },
    /// The response is not what the protocol says (not JSON, a field of the
    /// wrong type, an empty token, a negative expiry …). The reason names the
    /// field; it never contains the response itself.
    Malformed {
        /// What is wrong.
        reason: String,
    },
    /// A vendor envelope lacks a field it was configured with.
    MissingField {
        /// The name of the field (`access_token`, `expires` …).
        field: &'static str,
        /// The JSON pointer that found nothing.
        pointer: String,
    },
    /// A vendor envelope carries a business code other than the success value,
    /// in a 2xx or 4xx answer. A 5xx answer is reported as
    /// [`Status`](Self::Status), whatever its body: the server may have
    /// processed the request before it failed.
    Business {
        /// The code, as JSON text (`40003`, `"E_AUTH"`).
        code: String,
        /// The envelope's message, if it has one.
        message: Option<String>,
    },
}

impl TokenEndpointError {
    /// `true` when the server certainly did not grant anything for this
    /// request, so a refresh token it carried is still as it was: a 4xx
    /// answer (an RFC 6749 error such as `invalid_grant`, a business code,
    /// a bare status), or a connection that could not be opened. A 5xx never
    /// is, whatever its body says (`server_error`, `temporarily_unavailable`
    /// may come from a server, or a gateway in front of it, after the
    /// rotation); nor is a timeout or an unreadable answer.
    ///
    /// NOTE: a `Business` error is only made from a 2xx or 4xx answer
    /// (`TokenEndpoint::parse_failure` reports a 5xx as `Status`).
    pub(crate) fn left_credential_unspent(&self) -> bool {
        match self {
            Self::OAuth(e) => e.status.is_client_error() || e.status.is_success(),
            Self::Business { .. } => true,
            Self::Status { status, .. } => status.is_client_error(),
            Self::Transport { source, .. } => super::endpoint::is_connect_error(&**source),
            Self::Timeout { .. }
            | Self::TooLarge { .. }
            | Self::Malformed { .. }
            | Self::MissingField { .. } => false,
        }
    }

    /// `true` for an `invalid_grant` error: the refresh token, authorization
    /// code or password was rejected.
    pub fn is_invalid_grant(&self) -> bool {
        matches!(self, Self::OAuth(e) if e.error == "invalid_grant")
    }

    /// The RFC 6749 error, if this is one.
    pub fn oauth(&self) -> Option<&OAuthError> {
        match self {
            Self::OAuth(e) => Some(e),
            _ => None,
        }
    }

    pub(crate) fn malformed(reason: impl Into<String>) -> Self {
        Self::Malformed {
            reason: reason.into(),
        }
    }
}

impl fmt::Display for TokenEndpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.describe(f, "token endpoint")
    }
}

impl TokenEndpointError {
    /// The error, told of `endpoint` (the token or the revocation endpoint).
    pub(crate) fn describe(&self, f: &mut fmt::Formatter<'_>, endpoint: &str) -> fmt::Result {
        match self {
            Self::OAuth(e) => write!(f, "{endpoint} error {e}"),
            Self::Status { status, attempts } => write!(
                f,
                "{endpoint} answered HTTP {} (after {attempts} attempt{})",
                status.as_u16(),
                if *attempts == 1 { "" } else { "s" }
            ),
            Self::Transport { source, attempts } => write!(
                f,
                "{endpoint} unreachable after {attempts} attempt{}: {source}",
                if *attempts == 1 { "" } else { "s" }
            ),
            Self::Timeout { after } => {
                write!(f, "{endpoint} did not answer within {after:?}")
            }
            Self::TooLarge { limit } => {
                write!(f, "{endpoint} response is larger than {limit} bytes")
            }
            Self::Malformed { reason } => {
                write!(f, "malformed {endpoint} response: {reason}")
            }
            Self::MissingField { field, pointer } => write!(
                f,
                "{endpoint} response has no `{field}` at JSON pointer `{pointer}`"
            ),
            Self::Business { code, message } => {
                write!(f, "{endpoint} returned business code {code}")?;
                if let Some(message) = message {
                    write!(f, ": {message}")?;
                }
                Ok(())
            }
        }
    }
}

impl StdError for TokenEndpointError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Self::OAuth(e) => Some(e),
            Self::Transport { source, .. } => Some(&**source),
            _ => None,
        }
    }
}

/// The token endpoint URL given to the builder cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTokenUrl {
    reason: String,
}

impl InvalidTokenUrl {
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

impl fmt::Display for InvalidTokenUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid token endpoint URL: {}", self.reason)
    }
}

impl StdError for InvalidTokenUrl {}
