//! [`OAuth2Source`]: a [`TokenSource`] that speaks OAuth2 to a token endpoint.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response, Uri};
use http_body::Body;
use secrecy::{ExposeSecret, SecretString};
use tower_service::Service;

use super::client_auth::ClientAuth;
use super::endpoint::{
    DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_SUPPORTS_HTTPS, HttpService, ResponseFormat, RetryPolicy,
    TokenEndpoint, TokenRequestBody, boxed_service, default_service,
};
use super::envelope::Envelope;
use super::error::{InvalidTokenUrl, TokenEndpointError};
use super::grant::{AuthorizationCode, Grant, GrantRequest};
use super::revocation::{RevocationNotConfigured, TokenTypeHint};
use crate::{BoxError, ReauthorizationRequired, RefreshContext, Token, TokenHandle, TokenSource};

type ReauthorizeHook =
    dyn Fn(ReauthorizationRequired) -> BoxFuture<'static, Option<AuthorizationCode>> + Send + Sync;

/// A [`TokenSource`] that obtains tokens from an OAuth2 token endpoint.
///
/// Each fetch tries, in order:
///
/// 1. the **refresh-token grant**, while the current token has a refresh
///    token not known to have expired. A new refresh token in the answer
///    replaces the old one at once (rotation); an answer without one keeps
///    the old one;
/// 2. the **initial grant** ([`Grant::client_credentials`] or
///    [`Grant::password`]) if one is configured — when there is no token
///    yet, or the refresh token expired or was rejected (`invalid_grant`);
/// 3. the **re-authorization hook**, if set: it may supply a new
///    authorization code, which is exchanged;
/// 4. otherwise [`ReauthorizationRequired`], with the token endpoint's
///    error as its source.
///
/// Any other failure (the endpoint is down, `invalid_client` …) is returned
/// as it is, without falling back. An authorization code an operator pastes
/// once is exchanged with [`exchange_code`](Self::exchange_code).
///
/// The token endpoint is called through its own HTTP client (a hyper-util
/// client by default, or the service given to
/// [`http_service`](OAuth2SourceBuilder::http_service)), never through the
/// service the [`AuthRefreshLayer`](crate::AuthRefreshLayer) wraps: the
/// refresh must not queue behind the requests that wait for it.
///
/// ```
/// use std::time::Duration;
/// use tower_auth_refresh::TokenHandle;
/// use tower_auth_refresh::oauth2::{ClientAuth, Grant, OAuth2Source};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let source = OAuth2Source::builder("http://auth.internal/oauth/token", ClientAuth::basic("reports", "s3cr3t"))
///     .initial_grant(Grant::client_credentials())
///     .scope("orders:read")
///     .timeout(Duration::from_secs(5))
///     .build()?;
/// let handle = TokenHandle::new(source);
/// # let _ = handle;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct OAuth2Source {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: TokenEndpoint,
    revocation: Option<TokenEndpoint>,
    initial: Option<Grant>,
    scope: Option<String>,
    redirect_uri: Option<String>,
    reauthorize: Option<Box<ReauthorizeHook>>,
    /// The last rotation: the refresh token spent, and the token that came
    /// back for it.
    rotated: Mutex<Option<(SecretString, Arc<Token>)>>,
}

impl fmt::Debug for OAuth2Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2Source")
            .field("endpoint", &self.inner.endpoint)
            .field(
                "revocation",
                &self.inner.revocation.as_ref().map(|r| &r.url),
            )
            .field("initial_grant", &self.inner.initial)
            .field("scope", &self.inner.scope)
            .field("redirect_uri", &self.inner.redirect_uri)
            .field("reauthorize_hook", &self.inner.reauthorize.is_some())
            .finish()
    }
}

impl OAuth2Source {
    /// Starts configuring a source for the token endpoint at `token_url`,
    /// authenticating the client with `auth`.
    pub fn builder(token_url: impl Into<String>, auth: ClientAuth) -> OAuth2SourceBuilder {
        OAuth2SourceBuilder {
            token_url: token_url.into(),
            auth,
            http: None,
            format: ResponseFormat::Standard,
            retry: RetryPolicy::default(),
            timeout: Duration::from_secs(10),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            extra_params: Vec::new(),
            initial: None,
            scope: None,
            redirect_uri: None,
            revocation_url: None,
            reauthorize: None,
            #[cfg(feature = "dpop")]
            dpop: None,
        }
    }

    /// Exchanges an authorization code (RFC 6749 §4.1.3) and installs the
    /// token in `handle`, as the next generation. The refresh token that
    /// comes with it is what later refreshes present.
    ///
    /// ```no_run
    /// # use tower_auth_refresh::{oauth2::{ClientAuth, OAuth2Source}, TokenHandle};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_auth_refresh::BoxError> {
    /// let source = OAuth2Source::builder("http://auth.internal/token", ClientAuth::basic("app", "s3cr3t"))
    ///     .redirect_uri("http://127.0.0.1/callback")
    ///     .build()?;
    /// let handle = TokenHandle::new(source.clone());
    /// source.exchange_code(&handle, "code-pasted-by-the-operator").await?;
    /// assert!(handle.status().valid);
    /// # Ok(()) }
    /// ```
    pub async fn exchange_code(
        &self,
        handle: &TokenHandle,
        code: impl Into<AuthorizationCode>,
    ) -> Result<(), BoxError> {
        let token = self.exchange_code_for_token(code).await?;
        handle.set_token(token)?;
        Ok(())
    }

    /// Exchanges an authorization code and returns the token, without
    /// installing it anywhere.
    pub async fn exchange_code_for_token(
        &self,
        code: impl Into<AuthorizationCode>,
    ) -> Result<Token, TokenEndpointError> {
        self.inner.exchange(&code.into()).await
    }

    /// Revokes `token` at the revocation endpoint (RFC 7009): its refresh
    /// token when it has one (a server then also ends the access tokens of
    /// that grant), otherwise its access token.
    pub async fn revoke_token(&self, token: &Token) -> Result<(), BoxError> {
        let Some(endpoint) = &self.inner.revocation else {
            return Err(boxed(RevocationNotConfigured));
        };
        let result = match token.refresh_token() {
            Some(refresh) => endpoint.revoke(refresh, TokenTypeHint::RefreshToken).await,
            None => {
                endpoint
                    .revoke(token.access_token(), TokenTypeHint::AccessToken)
                    .await
            }
        };
        result.map_err(boxed)
    }

    /// Runs the configured initial grant and returns the token, without
    /// installing it anywhere; `None` when no initial grant is configured.
    pub async fn request_initial(&self) -> Option<Result<Token, TokenEndpointError>> {
        let grant = self.inner.initial.as_ref()?;
        Some(
            self.inner
                .endpoint
                .request(GrantRequest::Initial(grant), self.inner.scope.as_deref())
                .await,
        )
    }
}

impl Inner {
    async fn exchange(&self, code: &AuthorizationCode) -> Result<Token, TokenEndpointError> {
        self.endpoint
            .request(
                GrantRequest::Code(code, self.redirect_uri.as_deref()),
                self.scope.as_deref(),
            )
            .await
    }

    /// NOTE: a refresh token is spent once the server has rotated it. If the
    /// token that replaced it never got installed (the manager refused it),
    /// `previous` still carries the spent one; the replacement is used
    /// instead, so a spent refresh token is never presented again.
    fn unspent(&self, previous: Arc<Token>) -> Arc<Token> {
        let rotated = self
            .rotated
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match (&*rotated, previous.refresh_token()) {
            (Some((spent, replacement)), Some(presented))
                if spent.expose_secret() == presented.expose_secret() =>
            {
                tracing::debug!("refresh token already rotated; using its replacement");
                replacement.clone()
            }
            _ => previous,
        }
    }

    fn remember_rotation(&self, spent: &SecretString, token: &Token) {
        let rotated = token
            .refresh_token()
            .is_some_and(|new| new.expose_secret() != spent.expose_secret());
        if rotated {
            *self
                .rotated
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) =
                Some((spent.clone(), Arc::new(token.clone())));
        }
    }

    async fn obtain(&self, previous: Option<Arc<Token>>) -> Result<Token, BoxError> {
        let mut reauth = None;
        let previous = previous.map(|p| self.unspent(p));
        if let Some(previous) = previous.as_deref() {
            if let Some(refresh_token) = previous.refresh_token() {
                if previous.has_usable_refresh_token() {
                    match self
                        .endpoint
                        .request(GrantRequest::Refresh(refresh_token), None)
                        .await
                    {
                        Ok(token) => {
                            let token = keep_refresh_token(token, previous);
                            self.remember_rotation(refresh_token, &token);
                            return Ok(token);
                        }
                        Err(err) if err.is_invalid_grant() => {
                            tracing::warn!(error = %err, "refresh token rejected");
                            reauth = Some(
                                ReauthorizationRequired::new("the refresh token was rejected")
                                    .with_source(err),
                            );
                        }
                        Err(err) => return Err(boxed(err)),
                    }
                } else {
                    tracing::info!("refresh token expired");
                    reauth = Some(ReauthorizationRequired::new(
                        "the refresh token has expired",
                    ));
                }
            }
        }
        if let Some(grant) = &self.initial {
            return self
                .endpoint
                .request(GrantRequest::Initial(grant), self.scope.as_deref())
                .await
                .map_err(|err| {
                    if err.is_invalid_grant() {
                        boxed(
                            ReauthorizationRequired::new(format!(
                                "the {} grant was rejected",
                                grant.grant_type()
                            ))
                            .with_source(err),
                        )
                    } else {
                        boxed(err)
                    }
                });
        }
        let reauth = reauth.unwrap_or_else(|| {
            ReauthorizationRequired::new(
                "no usable refresh token and no initial grant: an authorization code is needed",
            )
        });
        let Some(hook) = &self.reauthorize else {
            return Err(boxed(reauth));
        };
        let Some(code) = hook(reauth.clone()).await else {
            return Err(boxed(reauth));
        };
        match self.exchange(&code).await {
            Ok(token) => Ok(token),
            Err(err) if err.is_invalid_grant() => Err(boxed(
                ReauthorizationRequired::new(
                    "the authorization code from the re-authorization hook was rejected",
                )
                .with_source(err),
            )),
            Err(err) => Err(boxed(err)),
        }
    }
}

fn boxed(err: impl std::error::Error + Send + Sync + 'static) -> BoxError {
    Box::new(err)
}

/// When the server sends no new refresh token, the old one stays.
fn keep_refresh_token(token: Token, previous: &Token) -> Token {
    if token.refresh_token().is_some() {
        return token;
    }
    let Some(old) = previous.refresh_token() else {
        return token;
    };
    let token = token.with_refresh_token(old.expose_secret());
    match previous.refresh_expires_at() {
        Some(at) => token.with_refresh_expires_at(at),
        None => token,
    }
}

impl TokenSource for OAuth2Source {
    fn fetch(&self, cx: RefreshContext) -> BoxFuture<'static, Result<Token, BoxError>> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.obtain(cx.previous).await })
    }

    fn revoke(&self, token: Arc<Token>) -> BoxFuture<'static, Result<(), BoxError>> {
        let source = self.clone();
        Box::pin(async move { source.revoke_token(&token).await })
    }
}

/// Configures an [`OAuth2Source`].
pub struct OAuth2SourceBuilder {
    token_url: String,
    auth: ClientAuth,
    http: Option<HttpService>,
    format: ResponseFormat,
    retry: RetryPolicy,
    timeout: Duration,
    max_response_bytes: usize,
    extra_params: Vec<(String, String)>,
    initial: Option<Grant>,
    scope: Option<String>,
    redirect_uri: Option<String>,
    revocation_url: Option<String>,
    reauthorize: Option<Box<ReauthorizeHook>>,
    #[cfg(feature = "dpop")]
    dpop: Option<crate::dpop::DpopKey>,
}

impl fmt::Debug for OAuth2SourceBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2SourceBuilder")
            .field("token_url", &self.token_url)
            .field("auth", &self.auth)
            .field("initial", &self.initial)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl OAuth2SourceBuilder {
    /// The grant run when there is no usable refresh token:
    /// [`Grant::client_credentials`] or [`Grant::password`].
    pub fn initial_grant(mut self, grant: Grant) -> Self {
        self.initial = Some(grant);
        self
    }

    /// The `scope` sent with the initial grant.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// The `redirect_uri` sent when exchanging an authorization code that
    /// does not carry its own.
    pub fn redirect_uri(mut self, redirect_uri: impl Into<String>) -> Self {
        self.redirect_uri = Some(redirect_uri.into());
        self
    }

    /// The revocation endpoint (RFC 7009), for
    /// [`TokenHandle::revoke`](crate::TokenHandle::revoke) and
    /// [`revoke_on_clear`](crate::TokenHandleBuilder::revoke_on_clear). It is
    /// called with the same client authentication and HTTP service as the
    /// token endpoint.
    pub fn revocation_url(mut self, url: impl Into<String>) -> Self {
        self.revocation_url = Some(url.into());
        self
    }

    /// An extra form parameter sent with every token request (`audience`,
    /// `resource`, a vendor's `tenant_id` …).
    pub fn param(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra_params.push((key.into(), value.into()));
        self
    }

    /// Reads responses as a vendor envelope instead of RFC 6749 JSON.
    pub fn envelope(mut self, envelope: Envelope) -> Self {
        self.format = ResponseFormat::Envelope(Box::new(envelope));
        self
    }

    /// The HTTP service that calls the token endpoint (default: a hyper-util
    /// client over plain HTTP, and HTTPS with the `oauth2-rustls` feature).
    /// Without that feature, give a client with TLS for an `https` URL.
    /// It must not be the service the [`AuthRefreshLayer`](crate::AuthRefreshLayer)
    /// wraps, nor share its concurrency limit.
    pub fn http_service<S, B>(mut self, service: S) -> Self
    where
        S: Service<Request<TokenRequestBody>, Response = Response<B>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.http = Some(boxed_service(service));
        self
    }

    /// How long one attempt may take, sending and reading. Default 10 s.
    /// Keep retries × timeout below the handle's refresh timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How 5xx, 429 and connection failures are retried.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The largest response body read. Default 64 KiB.
    pub fn max_response_bytes(mut self, limit: usize) -> Self {
        self.max_response_bytes = limit;
        self
    }

    /// An async hook called when a person is needed (the refresh token was
    /// rejected or expired, and no initial grant is configured). It gets
    /// the reason and may return a new authorization code, which is
    /// exchanged; `None` leaves the error [`ReauthorizationRequired`].
    /// It runs inside the refresh, so within the handle's refresh timeout.
    pub fn on_reauthorization<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(ReauthorizationRequired) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Option<AuthorizationCode>> + Send + 'static,
    {
        self.reauthorize = Some(Box::new(move |why| Box::pin(hook(why))));
        self
    }

    /// DPoP (RFC 9449, feature `dpop`): every token request carries a proof
    /// signed with `key`; a `use_dpop_nonce` challenge is answered once with
    /// a fresh proof and the server's nonce; the tokens that come back must
    /// be of type `DPoP`. Give the same key (a clone) to the requests that
    /// use the tokens.
    #[cfg(feature = "dpop")]
    pub fn dpop(mut self, key: crate::dpop::DpopKey) -> Self {
        self.dpop = Some(key);
        self
    }

    /// Builds the source. Fails if the URL is not an absolute `http(s)`
    /// URL, or is `https` while the default client has no TLS (feature
    /// `oauth2-rustls` off) and no other service was given.
    pub fn build(self) -> Result<OAuth2Source, InvalidTokenUrl> {
        let url: Uri = self
            .token_url
            .parse()
            .map_err(|e| InvalidTokenUrl::new(format!("{e}")))?;
        let scheme = url.scheme_str().unwrap_or("");
        if url.host().is_none() || !matches!(scheme, "http" | "https") {
            return Err(InvalidTokenUrl::new(
                "expected an absolute http or https URL",
            ));
        }
        let revocation_url = self
            .revocation_url
            .as_deref()
            .map(parse_revocation_url)
            .transpose()?;
        if revocation_url
            .as_ref()
            .is_some_and(|url| url.scheme_str() == Some("https"))
            && self.http.is_none()
            && !DEFAULT_SUPPORTS_HTTPS
        {
            return Err(InvalidTokenUrl::new(
                "an https revocation URL needs the `oauth2-rustls` feature or an HTTP \
                 service with TLS passed to `http_service`",
            ));
        }
        let http = match self.http {
            Some(http) => http,
            None if scheme == "https" && !DEFAULT_SUPPORTS_HTTPS => {
                return Err(InvalidTokenUrl::new(
                    "https needs the `oauth2-rustls` feature or an HTTP service with TLS \
                     passed to `http_service`",
                ));
            }
            None => default_service().map_err(InvalidTokenUrl::new)?,
        };
        let endpoint = TokenEndpoint {
            url,
            http,
            auth: self.auth,
            format: self.format,
            retry: self.retry,
            timeout: self.timeout,
            max_response_bytes: self.max_response_bytes,
            extra_params: Arc::new(self.extra_params),
            #[cfg(feature = "dpop")]
            dpop: self.dpop,
        };
        // Revocation takes the same client authentication, no DPoP proof
        // (RFC 9449 does not ask for one there) and no extra parameters.
        let revocation = revocation_url.map(|url| TokenEndpoint {
            url,
            extra_params: Arc::default(),
            #[cfg(feature = "dpop")]
            dpop: None,
            ..endpoint.clone()
        });
        Ok(OAuth2Source {
            inner: Arc::new(Inner {
                endpoint,
                revocation,
                initial: self.initial,
                scope: self.scope,
                redirect_uri: self.redirect_uri,
                reauthorize: self.reauthorize,
                rotated: Mutex::new(None),
            }),
        })
    }
}

/// The revocation URL: an absolute `http(s)` URL.
fn parse_revocation_url(url: &str) -> Result<Uri, InvalidTokenUrl> {
    let uri: Uri = url
        .parse()
        .map_err(|e| InvalidTokenUrl::new(format!("revocation URL: {e}")))?;
    if uri.host().is_none() || !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(InvalidTokenUrl::new(
            "revocation URL: expected an absolute http or https URL",
        ));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(url: &str) -> Result<OAuth2Source, InvalidTokenUrl> {
        OAuth2Source::builder(url, ClientAuth::basic("id", "secret-XYZ")).build()
    }

    #[test]
    fn token_urls_are_checked() {
        assert!(build("http://127.0.0.1:1/token").is_ok());
        assert!(build("/token").is_err());
        assert!(build("ftp://host/token").is_err());
        assert!(build("not a url").is_err());
        assert_eq!(
            build("https://auth.example/token").is_ok(),
            cfg!(feature = "oauth2-rustls")
        );
    }

    #[test]
    fn debug_shows_no_secret() {
        let source = OAuth2Source::builder(
            "http://127.0.0.1:1/token",
            ClientAuth::post("id", "secret-XYZ"),
        )
        .initial_grant(Grant::password("alice", "pw-XYZ"))
        .build()
        .unwrap();
        let shown = format!("{source:?}");
        assert!(shown.contains("client_secret_post"), "{shown}");
        assert!(!shown.contains("XYZ"), "{shown}");
    }
}
