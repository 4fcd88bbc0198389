//! OAuth2 token sources (feature `oauth2`, on by default).
//!
//! [`OAuth2Source`] is a [`TokenSource`](crate::TokenSource) for an OAuth2
//! token endpoint: client credentials, the resource-owner password grant,
//! the refresh-token grant with rotation, and authorization-code exchange;
//! client authentication by `client_secret_basic` (default) or
//! `client_secret_post`; RFC 6749 §5.1/§5.2 responses or a vendor
//! [`Envelope`].
//!
//! ```
//! use tower::Layer;
//! use tower_auth_refresh::{AuthRefreshLayer, TokenHandle};
//! use tower_auth_refresh::oauth2::{ClientAuth, Grant, OAuth2Source};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let source = OAuth2Source::builder("http://auth.internal/oauth/token", ClientAuth::basic("reports", "s3cr3t"))
//!     .initial_grant(Grant::password("alice", "correct horse"))
//!     .scope("orders:read")
//!     .build()?;
//! let handle = TokenHandle::new(source);
//! let layer = AuthRefreshLayer::new(handle);
//! # let _ = layer;
//! # Ok(()) }
//! ```

mod client_auth;
mod endpoint;
mod envelope;
mod error;
mod grant;
mod pkce;
#[cfg(test)]
mod properties;
mod response;
mod revocation;
mod source;

pub use crate::jose::{KeyError, SigningKey};
pub use client_auth::ClientAuth;
pub use endpoint::{DEFAULT_MAX_RESPONSE_BYTES, RetryPolicy, TokenRequestBody};
pub use envelope::{Envelope, ExpiryFormat};
pub use error::{InvalidTokenUrl, OAuthError, TokenEndpointError};
pub use grant::{AuthorizationCode, Grant};
pub use pkce::Pkce;
pub use revocation::{RevocationFailed, RevocationNotConfigured};
pub use source::{OAuth2Source, OAuth2SourceBuilder};
