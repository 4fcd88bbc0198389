//! [`AuthRefreshMiddleware`]: the same token, detector and injector for a
//! `reqwest-middleware` client (feature `reqwest`).

use std::fmt;
use std::sync::Arc;

use ::reqwest::{Request, Response, ResponseBuilderExt, Url};
use http::{Extensions, HeaderValue};
use reqwest_middleware::{Middleware, Next};

use crate::detect::{ExpiryDetector, HeadVerdict, ResponseHead};
use crate::inject::{query_has_key, query_without_key};
use crate::layer::LayerConfig;
use crate::lifecycle::{Acquired, Counters, Rejection, TokenManager};
use crate::retry::{judge_body, mark_skipped};
use crate::{
    AuthRefreshLayer, BoxError, ReauthorizationRequired, RefreshFailed, RefreshTimedOut,
    SkipReason, StoreError, TokenHandle, TokenInjector,
};

/// A [`reqwest_middleware::Middleware`] that does what
/// [`AuthRefreshLayer`] does: attaches the current token, recognises an
/// expired-token answer, refreshes once for all waiting requests, and
/// retries once.
///
/// It shares the [`TokenHandle`] (so a tower stack and a reqwest client can
/// use one token) and takes its detector and limits from an
/// [`AuthRefreshLayer`]. A request whose body cannot be cloned (a stream) is
/// sent once and never retried; its expired answer comes back with a
/// [`RetrySkipped`](crate::RetrySkipped) marker in the response's extensions. When no token can be
/// had, the request is not sent: the error is a
/// [`reqwest_middleware::Error::Middleware`] whose `anyhow::Error` downcasts
/// to [`RefreshFailed`], [`RefreshTimedOut`] or [`ReauthorizationRequired`].
/// With [`TokenInjector::query`], the `reqwest::Error`s it returns carry no
/// URL (the URL holds the token), and the response it hands back has the
/// token's parameter taken out of its URL (`url()`, `Debug`,
/// `error_for_status()`); middlewares between this one and the client
/// still see the URL. reqwest's own redirect handling sends the URL it
/// followed a redirect from as `Referer` to the next server, token
/// included, whatever the origin: with the token in the query, turn it off
/// (`reqwest::ClientBuilder::referer(false)`) or do not follow redirects
/// (`redirect(reqwest::redirect::Policy::none())`). With
/// [`AuthRefreshLayer::dpop`], each attempt carries `Authorization: DPoP`
/// and a proof of its own, and a resource server's nonce challenge is
/// answered once when the body can be cloned (a stream's challenge comes
/// back marked [`SkipReason::BodyNotCloneable`], its nonce remembered for
/// the next request).
///
/// An answer from another origin than the request's (reqwest followed a
/// redirect there) is not judged: the token was not sent there, so its
/// 401 is not about the token, which is neither refreshed nor retried.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_auth_refresh::{AuthRefreshLayer, AuthRefreshMiddleware, JsonBodyRule, Token, TokenHandle, Unauthorized, ExpiryDetectorExt, token_source_fn};
///
/// let handle = TokenHandle::new(token_source_fn(|_| async {
///     Ok::<_, std::io::Error>(Token::bearer("fetched"))
/// }));
/// let layer = AuthRefreshLayer::new(handle).detector(Unauthorized::new().or(JsonBodyRule::default_rules()));
/// let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
///     .with(AuthRefreshMiddleware::from_layer(&layer))
///     .build();
/// let response = client.get("http://127.0.0.1:8080/api/items").send().await?;
/// # let _ = response;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AuthRefreshMiddleware {
    handle: TokenHandle,
    config: Arc<LayerConfig>,
}

impl fmt::Debug for AuthRefreshMiddleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthRefreshMiddleware")
            .field("handle", &self.handle)
            .field("config", &self.config)
            .finish()
    }
}

impl AuthRefreshMiddleware {
    /// A middleware with the default detector ([`Unauthorized`](crate::Unauthorized)).
    pub fn new(handle: TokenHandle) -> Self {
        Self::from_layer(&AuthRefreshLayer::new(handle))
    }

    /// A middleware with the handle, detector, peek limit, origin and DPoP
    /// key of `layer`.
    pub fn from_layer(layer: &AuthRefreshLayer) -> Self {
        Self {
            handle: layer.handle().clone(),
            config: layer.config().clone(),
        }
    }

    /// The handle on the token.
    pub fn handle(&self) -> &TokenHandle {
        &self.handle
    }

    async fn expired(&self, response: Response) -> (bool, Response) {
        let verdict = self.config.detector.check_head(&ResponseHead::new(
            response.status(),
            response.version(),
            response.headers(),
        ));
        match verdict {
            HeadVerdict::NotExpired | HeadVerdict::Veto => (false, response),
            HeadVerdict::Expired => (true, response),
            HeadVerdict::NeedBody => {
                let url = response.url().clone();
                let (parts, body) = http::Response::<::reqwest::Body>::from(response).into_parts();
                let (expired, body) = judge_body(&self.config, &parts, body).await;
                let body = ::reqwest::Body::wrap(body);
                (expired, with_url(parts, body, url))
            }
        }
    }
}

/// A `reqwest::Response` made of parts, whose `url()` is `url`.
///
/// NOTE: the conversion to `http::Response` drops the response's URL; it is
/// put back in the extensions reqwest reads it from.
fn with_url(mut parts: http::response::Parts, body: ::reqwest::Body, url: Url) -> Response {
    if let Ok(carrier) = http::Response::builder().url(url).body(()) {
        parts.extensions.extend(carrier.into_parts().0.extensions);
    }
    Response::from(http::Response::from_parts(parts, body))
}

/// The response with the token's query parameter taken out of its URL
/// (`Response::url()`, its `Debug`, `error_for_status()` all show it).
fn without_token_in_url(injector: &TokenInjector, response: Response) -> Response {
    let Some(name) = injector.query_name() else {
        return response;
    };
    let Some(query) = response
        .url()
        .query()
        .and_then(|query| query_without_key(query, name))
    else {
        return response;
    };
    let mut url = response.url().clone();
    url.set_query(Some(&query).filter(|q| !q.is_empty()).map(String::as_str));
    let (parts, body) = http::Response::<::reqwest::Body>::from(response).into_parts();
    with_url(parts, body, url)
}

fn apply(injector: &TokenInjector, header: &HeaderValue, request: &mut Request) {
    if let Some(name) = injector.header_name() {
        request.headers_mut().insert(name.clone(), header.clone());
    } else if let Ok(pair) = header.to_str() {
        let url = request.url_mut();
        let query = match url.query() {
            Some(query) if !query.is_empty() => format!("{query}&{pair}"),
            _ => pair.to_owned(),
        };
        url.set_query(Some(&query));
    }
}

fn is_present(injector: &TokenInjector, request: &Request) -> bool {
    if let Some(name) = injector.header_name() {
        return request.headers().contains_key(name);
    }
    let name = injector.query_name().unwrap_or_default();
    request
        .url()
        .query()
        .is_some_and(|query| query_has_key(query, name))
}

/// A `reqwest::Error` shows its URL; with the token in the query, that URL
/// carries the token, so it is stripped.
fn without_token_url(
    injector: &TokenInjector,
    result: reqwest_middleware::Result<Response>,
) -> reqwest_middleware::Result<Response> {
    match result {
        Err(reqwest_middleware::Error::Reqwest(err)) if injector.query_name().is_some() => {
            Err(reqwest_middleware::Error::Reqwest(err.without_url()))
        }
        other => other,
    }
}

/// Wraps the crate's own errors as themselves, so that
/// `anyhow::Error::downcast_ref::<RefreshFailed>()` and friends work on the
/// caller's side (a boxed error would hide the type).
fn to_middleware_error(err: BoxError) -> reqwest_middleware::Error {
    fn typed<E: std::error::Error + Send + Sync + 'static>(
        err: BoxError,
    ) -> Result<anyhow::Error, BoxError> {
        err.downcast::<E>().map(|err| anyhow::Error::new(*err))
    }
    let err = typed::<RefreshFailed>(err)
        .or_else(typed::<RefreshTimedOut>)
        .or_else(typed::<ReauthorizationRequired>)
        .or_else(typed::<StoreError>)
        .unwrap_or_else(anyhow::Error::from_boxed);
    reqwest_middleware::Error::Middleware(err)
}

fn skipped(manager: &TokenManager, mut response: Response, reason: SkipReason) -> Response {
    let status = response.status();
    mark_skipped(manager, status, response.extensions_mut(), reason);
    response
}

#[async_trait::async_trait]
impl Middleware for AuthRefreshMiddleware {
    async fn handle(
        &self,
        mut request: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let manager = &self.handle.manager;
        let injector = &manager.config.injector;
        let uri: Option<http::Uri> = request.url().as_str().parse().ok();
        let for_us = uri.is_some_and(|uri| self.config.sends_token_to(&uri));
        if !for_us || is_present(injector, &request) {
            return next.run(request, extensions).await;
        }

        // NOTE: cloned before the token goes on, so the retry carries only
        // the token current when it is sent.
        let retry = request.try_clone();
        let (header, mut generation) = match manager.acquire() {
            Acquired::Ready(header, generation) => (header, generation),
            Acquired::Wait => {
                Counters::bump(&manager.counters.waited);
                manager
                    .wait_for_token()
                    .await
                    .map_err(to_middleware_error)?
            }
        };
        let origin = request.url().origin();
        apply(injector, &header, &mut request);
        self.dpop_stamp(&mut request)?;
        let response = without_token_url(injector, next.clone().run(request, extensions).await)?;
        let response = without_token_in_url(injector, response);
        // NOTE: after a redirect to another origin (followed by reqwest),
        // the answer comes from a server the token was not sent to: it says
        // nothing about our token (nor is its nonce challenge ours).
        if response.url().origin() != origin {
            return Ok(response);
        }
        let response = match self
            .dpop_answer(response, retry.as_ref(), &mut generation, extensions, &next)
            .await?
        {
            NonceAnswer::Judge(response) => without_token_in_url(injector, response),
            NonceAnswer::HandBack(response) => {
                return Ok(without_token_in_url(injector, response));
            }
        };
        let (expired, response) = self.expired(response).await;
        if !expired {
            return Ok(response);
        }

        let wait = match manager.on_rejected(generation) {
            Rejection::TooFresh => {
                return Ok(skipped(manager, response, SkipReason::TokenTooFresh));
            }
            Rejection::Retry(wait) => wait,
        };
        let Some(mut retry) = retry else {
            // The refresh runs on (it is a task of its own) for the requests
            // that follow.
            drop(wait);
            return Ok(skipped(manager, response, SkipReason::BodyNotCloneable));
        };
        let Some((header, mut generation)) = wait.await.map_err(to_middleware_error)? else {
            return Ok(skipped(manager, response, SkipReason::TokenTooFresh));
        };
        drop(response);
        let spare = self.dpop_spare(&retry);
        apply(injector, &header, &mut retry);
        self.dpop_stamp(&mut retry)?;
        Counters::bump(&manager.counters.retries);
        tracing::debug!(generation, "retrying request with refreshed token");
        let response = without_token_url(injector, next.clone().run(retry, extensions).await)?;
        // NOTE: the refresh retry's answer may be a nonce challenge: one
        // nonce resend, and no second refresh, whatever comes back.
        match self
            .dpop_answer(response, spare.as_ref(), &mut generation, extensions, &next)
            .await?
        {
            NonceAnswer::Judge(response) | NonceAnswer::HandBack(response) => {
                Ok(without_token_in_url(injector, response))
            }
        }
    }
}

/// What became of a possible DPoP nonce challenge.
enum NonceAnswer {
    /// Not a challenge, or the answer to the nonce resend: judged as usual.
    Judge(Response),
    /// Handed back as it is: a challenge to the nonce resend, or one whose
    /// body cannot be cloned (marked).
    #[cfg_attr(not(feature = "dpop"), allow(dead_code))]
    HandBack(Response),
}

// DPoP (feature `dpop`): a proof per attempt and the nonce challenge. With
// the feature off, or no key on the layer, these do nothing.
impl AuthRefreshMiddleware {
    /// Puts `Authorization: DPoP` and a fresh proof on one attempt.
    #[cfg(feature = "dpop")]
    fn dpop_stamp(&self, request: &mut Request) -> reqwest_middleware::Result<()> {
        let Some(key) = &self.config.dpop else {
            return Ok(());
        };
        stamp_dpop(key, request).map_err(to_middleware_error)
    }

    #[cfg(not(feature = "dpop"))]
    fn dpop_stamp(&self, _request: &mut Request) -> reqwest_middleware::Result<()> {
        Ok(())
    }

    /// A copy of the unsent request for a nonce resend after the refresh
    /// retry (DPoP only).
    fn dpop_spare(&self, request: &Request) -> Option<Request> {
        #[cfg(feature = "dpop")]
        if self.config.dpop.is_some() {
            return request.try_clone();
        }
        let _ = request;
        None
    }

    /// Remembers the answer's nonce; answers a nonce challenge once by
    /// sending `unsent` again with the current token and a proof carrying
    /// the nonce. Not a refresh, not counted as a retry.
    #[cfg(feature = "dpop")]
    async fn dpop_answer(
        &self,
        response: Response,
        unsent: Option<&Request>,
        generation: &mut u64,
        extensions: &mut Extensions,
        next: &Next<'_>,
    ) -> reqwest_middleware::Result<NonceAnswer> {
        let Some(key) = &self.config.dpop else {
            return Ok(NonceAnswer::Judge(response));
        };
        remember_nonce(key, &response);
        if !crate::dpop::is_nonce_challenge(response.status(), response.headers()) {
            return Ok(NonceAnswer::Judge(response));
        }
        let manager = &self.handle.manager;
        let Some(mut again) = unsent.and_then(Request::try_clone) else {
            let response = skipped(manager, response, SkipReason::BodyNotCloneable);
            return Ok(NonceAnswer::HandBack(response));
        };
        drop(response);
        let (header, current) = manager
            .wait_for_token()
            .await
            .map_err(to_middleware_error)?;
        *generation = current;
        let injector = &manager.config.injector;
        apply(injector, &header, &mut again);
        stamp_dpop(key, &mut again).map_err(to_middleware_error)?;
        tracing::debug!(
            generation = current,
            "resending request with the server's DPoP nonce"
        );
        let response = without_token_url(injector, next.clone().run(again, extensions).await)?;
        remember_nonce(key, &response);
        if crate::dpop::is_nonce_challenge(response.status(), response.headers()) {
            tracing::debug!("DPoP nonce challenge after a nonce resend; handed back");
            return Ok(NonceAnswer::HandBack(response));
        }
        Ok(NonceAnswer::Judge(response))
    }

    #[cfg(not(feature = "dpop"))]
    async fn dpop_answer(
        &self,
        response: Response,
        _unsent: Option<&Request>,
        _generation: &mut u64,
        _extensions: &mut Extensions,
        _next: &Next<'_>,
    ) -> reqwest_middleware::Result<NonceAnswer> {
        Ok(NonceAnswer::Judge(response))
    }
}

/// `Authorization: DPoP <token>` and a proof for `request`, made by the same
/// code as for a tower request.
#[cfg(feature = "dpop")]
fn stamp_dpop(key: &crate::dpop::DpopKey, request: &mut Request) -> Result<(), BoxError> {
    use http::header::AUTHORIZATION;
    let mut head = http::Request::new(());
    *head.method_mut() = request.method().clone();
    *head.uri_mut() = request.url().as_str().parse()?;
    if let Some(value) = request.headers().get(AUTHORIZATION) {
        head.headers_mut().insert(AUTHORIZATION, value.clone());
    }
    crate::dpop::stamp(key, &mut head)?;
    for name in [AUTHORIZATION, crate::dpop::DPOP] {
        if let Some(value) = head.headers_mut().remove(&name) {
            request.headers_mut().insert(name, value);
        }
    }
    Ok(())
}

/// Caches the `DPoP-Nonce` of an answer under its request's origin.
#[cfg(feature = "dpop")]
fn remember_nonce(key: &crate::dpop::DpopKey, response: &Response) {
    if let Ok(uri) = response.url().as_str().parse::<http::Uri>() {
        key.nonces().update(&uri, response.headers());
    }
}
