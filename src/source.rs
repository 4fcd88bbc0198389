//! [`TokenSource`]: how a new token is obtained.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::{BoxError, Token};

/// Why a token is being fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefreshReason {
    /// There is no token yet.
    Initial,
    /// The token's known expiry has passed.
    Expired,
    /// The upstream rejected the token (a 401, an `invalid_token` challenge,
    /// a business code such as 40003).
    Rejected,
    /// The token is still valid but close to its expiry; refreshed in the
    /// background while requests keep using it.
    Proactive,
    /// The application asked for it with [`TokenHandle::refresh_now`](crate::TokenHandle::refresh_now).
    Manual,
}

impl RefreshReason {
    /// A short lowercase name, used in tracing fields.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Initial => "initial",
            Self::Expired => "expired",
            Self::Rejected => "rejected",
            Self::Proactive => "proactive",
            Self::Manual => "manual",
        }
    }
}

impl fmt::Display for RefreshReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a [`TokenSource`] is told when it is asked for a token.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RefreshContext {
    /// The token being replaced, if there is one (its refresh token is what a
    /// refresh-token grant presents).
    ///
    /// In a fleet, `previous` comes **without its refresh token** when that
    /// refresh token must not be presented: the process cannot coordinate
    /// with the store (see [`UnreachableStore`](crate::UnreachableStore)),
    /// or another process may have spent it already. A source should then
    /// use a grant that does not rotate (client credentials, a password
    /// grant) or fail.
    ///
    /// A source must present **only this refresh token**, never one it
    /// kept itself (from an earlier answer, an SDK session): the fleet
    /// decides which refresh token may be presented, and a source with a
    /// refresh token of its own presents what another process may have
    /// spent.
    pub previous: Option<Arc<Token>>,
    /// Why the token is fetched.
    pub reason: RefreshReason,
}

/// Obtains tokens. The manager calls it at most once at a time, however many
/// requests are waiting.
///
/// A source is stateless about refresh tokens: a refresh-token grant
/// presents the refresh token of [`RefreshContext::previous`] and nothing
/// else (with a [`TokenStore`](crate::TokenStore), that is how the fleet
/// makes sure a rotated refresh token is presented once, by one process).
///
/// Implement it for a type, or adapt an async closure with [`token_source_fn`].
/// An error is reported to callers as [`RefreshFailed`](crate::RefreshFailed);
/// return [`ReauthorizationRequired`](crate::ReauthorizationRequired) when no
/// token can be had without a person.
///
/// The future `fetch` returns is polled on the crate's background runtime
/// (see the crate docs, "Runtime"), not on the caller's: it must not block
/// its thread (use `tokio::task::spawn_blocking`), and should not depend on
/// I/O resources made on an application runtime that may be idle or
/// dropped (a client whose pooled connections live there); make such a
/// client inside the future, or use one whose calls do not depend on that
/// runtime.
///
/// ```
/// use tower_auth_refresh::{BoxError, RefreshContext, Token, TokenSource};
/// use futures::future::BoxFuture;
///
/// struct Fixed;
///
/// impl TokenSource for Fixed {
///     fn fetch(&self, _cx: RefreshContext) -> BoxFuture<'static, Result<Token, BoxError>> {
///         Box::pin(async { Ok(Token::bearer("fixed")) })
///     }
/// }
/// ```
pub trait TokenSource: Send + Sync + 'static {
    /// Fetches a new token.
    fn fetch(&self, cx: RefreshContext) -> BoxFuture<'static, Result<Token, BoxError>>;

    /// Revokes `token` at the server, for
    /// [`TokenHandle::revoke`](crate::TokenHandle::revoke). The default does
    /// nothing; an `oauth2::OAuth2Source` (feature `oauth2`) with a
    /// revocation URL revokes the refresh token (RFC 7009).
    fn revoke(&self, token: Arc<Token>) -> BoxFuture<'static, Result<(), BoxError>> {
        let _ = token;
        Box::pin(async { Ok(()) })
    }
}

impl<T: TokenSource + ?Sized> TokenSource for Arc<T> {
    fn fetch(&self, cx: RefreshContext) -> BoxFuture<'static, Result<Token, BoxError>> {
        (**self).fetch(cx)
    }

    fn revoke(&self, token: Arc<Token>) -> BoxFuture<'static, Result<(), BoxError>> {
        (**self).revoke(token)
    }
}

impl<T: TokenSource + ?Sized> TokenSource for Box<T> {
    fn fetch(&self, cx: RefreshContext) -> BoxFuture<'static, Result<Token, BoxError>> {
        (**self).fetch(cx)
    }

    fn revoke(&self, token: Arc<Token>) -> BoxFuture<'static, Result<(), BoxError>> {
        (**self).revoke(token)
    }
}

/// A [`TokenSource`] made from an async closure; see [`token_source_fn`].
#[derive(Clone)]
pub struct TokenSourceFn<F> {
    f: F,
}

impl<F> fmt::Debug for TokenSourceFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSourceFn").finish_non_exhaustive()
    }
}

/// Adapts an async closure into a [`TokenSource`].
///
/// ```
/// use std::time::Duration;
/// use tower_auth_refresh::{token_source_fn, RefreshContext, RefreshReason, Token};
///
/// let source = token_source_fn(|cx: RefreshContext| async move {
///     if cx.reason == RefreshReason::Initial {
///         tracing::info!("first token");
///     }
///     Ok::<_, std::io::Error>(Token::bearer("from-closure").with_expires_in(Duration::from_secs(600)))
/// });
/// # let _ = source;
/// ```
pub fn token_source_fn<F, Fut, E>(f: F) -> TokenSourceFn<F>
where
    F: Fn(RefreshContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Token, E>> + Send + 'static,
    E: Into<BoxError>,
{
    TokenSourceFn { f }
}

impl<F, Fut, E> TokenSource for TokenSourceFn<F>
where
    F: Fn(RefreshContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Token, E>> + Send + 'static,
    E: Into<BoxError>,
{
    fn fetch(&self, cx: RefreshContext) -> BoxFuture<'static, Result<Token, BoxError>> {
        let fut = (self.f)(cx);
        Box::pin(async move { fut.await.map_err(Into::into) })
    }
}
