//! Token revocation (RFC 7009): the call to the revocation endpoint.

use std::fmt;

use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};

use super::endpoint::{Attempt, TokenEndpoint};
use super::error::TokenEndpointError;

/// Which token is revoked, as the `token_type_hint` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenTypeHint {
    RefreshToken,
    AccessToken,
}

impl TokenTypeHint {
    fn as_str(self) -> &'static str {
        match self {
            Self::RefreshToken => "refresh_token",
            Self::AccessToken => "access_token",
        }
    }
}

/// The revocation endpoint (RFC 7009) did not revoke the token: it
/// answered with an error, or could not be reached. The token is forgotten
/// all the same. Its `Display` names the revocation endpoint; the details
/// are in [`error`](Self::error). It never shows the token.
#[derive(Debug, Clone)]
pub struct RevocationFailed {
    error: TokenEndpointError,
}

impl RevocationFailed {
    /// What went wrong, in the terms of an OAuth2 endpoint call.
    pub fn error(&self) -> &TokenEndpointError {
        &self.error
    }
}

impl fmt::Display for RevocationFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.describe(f, "revocation endpoint")
    }
}

impl std::error::Error for RevocationFailed {}

/// [`TokenHandle::revoke`](crate::TokenHandle::revoke) was called on an
/// [`OAuth2Source`](super::OAuth2Source) built without
/// [`revocation_url`](super::OAuth2SourceBuilder::revocation_url).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevocationNotConfigured;

impl fmt::Display for RevocationNotConfigured {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no revocation URL is configured: the token was forgotten but not revoked")
    }
}

impl std::error::Error for RevocationNotConfigured {}

impl TokenEndpoint {
    /// `POST token=…&token_type_hint=…` with the client's authentication,
    /// once, within the timeout. A 200 is success, whether or not the server
    /// knew the token (RFC 7009 §2.2).
    pub(crate) async fn revoke(
        &self,
        token: &SecretString,
        hint: TokenTypeHint,
    ) -> Result<(), RevocationFailed> {
        self.try_revoke(token, hint)
            .await
            .map_err(|error| RevocationFailed { error })
    }

    async fn try_revoke(
        &self,
        token: &SecretString,
        hint: TokenTypeHint,
    ) -> Result<(), TokenEndpointError> {
        let body = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.append_pair("token", token.expose_secret());
            form.append_pair("token_type_hint", hint.as_str());
            self.auth.append_form(&mut form);
            Bytes::from(form.finish())
        };
        let attempt = tokio::time::timeout(self.timeout, self.send(body))
            .await
            .map_err(|_| TokenEndpointError::Timeout {
                after: self.timeout,
            })??;
        match attempt {
            Attempt::Answer(status, _, _) if status.is_success() => {
                tracing::debug!(hint = hint.as_str(), "token revoked");
                Ok(())
            }
            Attempt::Answer(status, _, bytes) => Err(self.parse_failure(status, &bytes, 1)),
            Attempt::Transport(err) => Err(TokenEndpointError::Transport {
                source: std::sync::Arc::from(err),
                attempts: 1,
            }),
        }
    }
}
