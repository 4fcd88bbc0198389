//! DPoP (RFC 9449): tokens bound to a key the client holds (feature `dpop`).
//!
//! A [`DpopKey`] signs a proof for each request: a JWT with the request's
//! method (`htm`), its URL without query and fragment (`htu`), the time
//! (`iat`), a unique id (`jti`), the server's latest nonce and, on resource
//! requests, the hash of the access token (`ath`). Give the key to
//! [`OAuth2SourceBuilder::dpop`](crate::oauth2::OAuth2SourceBuilder::dpop)
//! and the token endpoint gets proofs, answers its `use_dpop_nonce`
//! challenges once each, and checks that the tokens it returns are of type
//! `DPoP`. Give it to [`AuthRefreshLayer::dpop`](crate::AuthRefreshLayer::dpop)
//! and every resource request carries `Authorization: DPoP <token>` and a
//! fresh proof, and a resource server's nonce challenge is answered once
//! through the replay path.
//!
//! ```
//! use http::{Method, Uri};
//! use tower_auth_refresh::dpop::DpopKey;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let key = DpopKey::generate()?; // ES256; never leaves the process unless exported
//! let uri: Uri = "https://api.example/orders?page=2".parse()?;
//! let proof = key.proof(&Method::GET, &uri, Some("the-access-token"))?;
//! assert_eq!(proof.split('.').count(), 3);
//! assert!(!format!("{key:?}").contains("d\""));
//! # Ok(()) }
//! ```

mod key;
mod nonce;
mod resource;

pub use key::DpopKey;
pub(crate) use key::is_use_dpop_nonce;
pub use nonce::NonceCache;
pub(crate) use resource::{is_nonce_challenge, stamp};

/// The `DPoP` request header that carries a proof.
pub const DPOP: http::HeaderName = http::HeaderName::from_static("dpop");

/// The `DPoP-Nonce` response header that carries a server's nonce.
pub const DPOP_NONCE: http::HeaderName = http::HeaderName::from_static("dpop-nonce");
