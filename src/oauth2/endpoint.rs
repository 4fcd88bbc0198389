//! [`TokenEndpoint`]: the HTTP call to the token endpoint, with its own
//! client, timeout, retries and response cap.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;
use tower_service::Service;

use super::client_auth::ClientAuth;
use super::envelope::Envelope;
use super::error::TokenEndpointError;
use super::grant::GrantRequest;
use super::response::{json_object, parse_error, parse_success};
use crate::{BoxError, Token};

/// The request body type of the HTTP service that calls the token endpoint.
pub type TokenRequestBody = Full<Bytes>;

/// Default cap on a token endpoint response body: 64 KiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024;

pub(crate) type HttpService = BoxCloneSyncService<
    Request<TokenRequestBody>,
    Response<UnsyncBoxBody<Bytes, BoxError>>,
    BoxError,
>;

/// Boxes a user's HTTP service.
pub(crate) fn boxed_service<S, B>(service: S) -> HttpService
where
    S: Service<Request<TokenRequestBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    BoxCloneSyncService::new(
        service
            .map_response(|response: Response<B>| {
                response.map(|body| {
                    body.map_err(|e: B::Error| -> BoxError { e.into() })
                        .boxed_unsync()
                })
            })
            .map_err(|e: S::Error| -> BoxError { e.into() }),
    )
}

/// Runs each call of the default client on the crate's background runtime
/// (where refreshes run), so that its pooled connections are always driven,
/// whichever runtime the caller is on, and none is tied to a runtime that
/// may be idle or dropped.
#[derive(Clone)]
struct OnBackground<C>(C);

impl<C> Service<Request<TokenRequestBody>> for OnBackground<C>
where
    C: Service<Request<TokenRequestBody>> + Clone + Send + 'static,
    C::Future: Send + 'static,
    C::Response: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = futures::future::BoxFuture<'static, Result<C::Response, BoxError>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        // Readiness is awaited inside the call, where the call runs.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<TokenRequestBody>) -> Self::Future {
        let client = self.0.clone();
        let call = async move { client.oneshot(request).await.map_err(Into::into) };
        let Some(runtime) = crate::lifecycle::runtime_for_caller() else {
            return Box::pin(call);
        };
        let task =
            runtime.spawn(tracing::instrument::WithSubscriber::with_current_subscriber(call));
        Box::pin(async move {
            // A caller that gives up (its timeout) ends the call.
            let _abort = AbortOnDrop(task.abort_handle());
            task.await
                .unwrap_or_else(|err| Err(format!("token endpoint call ended: {err}").into()))
        })
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The default client: a hyper-util client with its own connection pool,
/// separate from any client the application wraps. Plain HTTP, or HTTP and
/// HTTPS (rustls, webpki roots) with the `oauth2-rustls` feature.
pub(crate) fn default_service() -> Result<HttpService, String> {
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;

    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    let mut builder = Client::builder(TokioExecutor::new());
    builder.pool_idle_timeout(Duration::from_secs(30));
    #[cfg(feature = "oauth2-rustls")]
    {
        connector.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .map_err(|e| format!("TLS set-up failed: {e}"))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        Ok(boxed_service(OnBackground(
            builder.build::<_, TokenRequestBody>(https),
        )))
    }
    #[cfg(not(feature = "oauth2-rustls"))]
    {
        Ok(boxed_service(OnBackground(
            builder.build::<_, TokenRequestBody>(connector),
        )))
    }
}

/// `true` when the default client can reach `https` URLs.
pub(crate) const DEFAULT_SUPPORTS_HTTPS: bool = cfg!(feature = "oauth2-rustls");

/// How failed token requests are retried: a 5xx, a 429, or a connection
/// that could not be opened is retried up to `max_retries` times, waiting
/// `base`, then twice as long each time (±10 %), never more than `max_wait`.
/// A `Retry-After` in seconds is honoured when it is within `max_wait`; a
/// longer one ends the retries. A 4xx is never retried, nor a request that
/// timed out (it may have been processed: a rotated refresh token would be
/// spent).
///
/// A grant that spends what it presents (the refresh-token grant, whose
/// refresh token may rotate, and the authorization-code grant) is retried
/// only when the request certainly was not processed: the connection could
/// not be opened, or the answer is a `429` or `503` with a `Retry-After`
/// (the server says it did not do it). A `502`/`504` from a gateway, or a
/// `500`, may come after the server rotated the token: like a timeout, it
/// is not retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt. Default 2.
    pub max_retries: u32,
    /// The first wait. Default 200 ms.
    pub base: Duration,
    /// The longest wait, computed or asked for with `Retry-After`. Default 5 s.
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 2,
            base: Duration::from_millis(200),
            max_wait: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        Self {
            max_retries: 0,
            ..Self::default()
        }
    }

    fn backoff(&self, retry: u32) -> Duration {
        let doubled = self.base.saturating_mul(
            1u32.checked_shl(retry.saturating_sub(1))
                .unwrap_or(u32::MAX),
        );
        doubled
            .min(self.max_wait)
            .mul_f64(0.9 + fastrand::f64() * 0.2)
    }
}

/// What a response is parsed as.
#[derive(Debug, Clone)]
pub(crate) enum ResponseFormat {
    Standard,
    Envelope(Box<Envelope>),
}

/// A token endpoint: its URL, the HTTP service that reaches it, the client
/// authentication and how responses are read.
#[derive(Clone)]
pub(crate) struct TokenEndpoint {
    pub(crate) url: Uri,
    pub(crate) http: HttpService,
    pub(crate) auth: ClientAuth,
    pub(crate) format: ResponseFormat,
    pub(crate) retry: RetryPolicy,
    pub(crate) timeout: Duration,
    pub(crate) max_response_bytes: usize,
    pub(crate) extra_params: Arc<Vec<(String, String)>>,
    /// Proofs on every token request, and DPoP-bound tokens expected back.
    #[cfg(feature = "dpop")]
    pub(crate) dpop: Option<crate::dpop::DpopKey>,
}

impl fmt::Debug for TokenEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenEndpoint")
            .field("url", &self.url)
            .field("auth", &self.auth)
            .field("format", &self.format)
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .field("max_response_bytes", &self.max_response_bytes)
            .finish_non_exhaustive()
    }
}

pub(crate) enum Attempt {
    Answer(StatusCode, HeaderMap, Bytes),
    Transport(BoxError),
}

impl TokenEndpoint {
    /// Sends one grant request, with retries, and parses the answer.
    pub(crate) async fn request(
        &self,
        grant: GrantRequest<'_>,
        scope: Option<&str>,
    ) -> Result<Token, TokenEndpointError> {
        let body = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            grant.append_form(&mut form, scope);
            self.auth.append_form(&mut form);
            for (key, value) in self.extra_params.iter() {
                form.append_pair(key, value);
            }
            Bytes::from(form.finish())
        };
        let grant_type = grant.grant_type();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let attempt = tokio::time::timeout(self.timeout, self.send(body.clone()))
                .await
                .map_err(|_| TokenEndpointError::Timeout {
                    after: self.timeout,
                })??;
            let retries_left = attempts <= self.retry.max_retries;
            match attempt {
                Attempt::Transport(err) => {
                    if retries_left && is_connect_error(&*err) {
                        let wait = self.retry.backoff(attempts);
                        tracing::debug!(grant_type, attempts, error = %err, "token endpoint unreachable, retrying");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    return Err(TokenEndpointError::Transport {
                        source: Arc::from(err),
                        attempts,
                    });
                }
                Attempt::Answer(status, headers, bytes) => {
                    if status.is_success() {
                        return self.parse_success(status, &bytes);
                    }
                    let retryable = if grant.spends_credential() {
                        matches!(
                            status,
                            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
                        ) && headers.contains_key(RETRY_AFTER)
                    } else {
                        status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
                    };
                    if retries_left && retryable {
                        let wait = match retry_after(&headers) {
                            Some(asked) if asked > self.retry.max_wait => None,
                            Some(asked) => Some(asked),
                            None => Some(self.retry.backoff(attempts)),
                        };
                        if let Some(wait) = wait {
                            tracing::debug!(
                                grant_type,
                                status = status.as_u16(),
                                attempts,
                                wait_ms = wait.as_millis() as u64,
                                "token endpoint busy, retrying"
                            );
                            tokio::time::sleep(wait).await;
                            continue;
                        }
                    }
                    return Err(self.parse_failure(status, &bytes, attempts));
                }
            }
        }
    }

    /// One attempt as the retry policy counts it. With DPoP, a
    /// `use_dpop_nonce` challenge is answered here, once, with a fresh proof
    /// carrying the new nonce: that is not a retry of the policy.
    pub(crate) async fn send(&self, body: Bytes) -> Result<Attempt, TokenEndpointError> {
        let attempt = self.send_once(body.clone()).await?;
        #[cfg(feature = "dpop")]
        if let (Some(dpop), Attempt::Answer(status, headers, bytes)) = (&self.dpop, &attempt) {
            let got_nonce = dpop.nonces().update(&self.url, headers);
            if got_nonce && crate::dpop::is_use_dpop_nonce(*status, bytes) {
                tracing::debug!("token endpoint asked for a DPoP nonce, sending again");
                let again = self.send_once(body).await?;
                if let Attempt::Answer(_, headers, _) = &again {
                    dpop.nonces().update(&self.url, headers);
                }
                return Ok(again);
            }
        }
        Ok(attempt)
    }

    /// Sends the form once: a fresh client assertion and a fresh DPoP proof
    /// each time (each has its own `jti`).
    async fn send_once(&self, body: Bytes) -> Result<Attempt, TokenEndpointError> {
        let body = match self
            .auth
            .assertion_form(&self.url.to_string())
            .map_err(|e| TokenEndpointError::malformed(format!("client assertion: {e}")))?
        {
            Some(assertion) => {
                let mut with = bytes::BytesMut::with_capacity(body.len() + assertion.len());
                with.extend_from_slice(&body);
                with.extend_from_slice(assertion.as_bytes());
                with.freeze()
            }
            None => body,
        };
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(self.url.clone())
            .header(
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-www-form-urlencoded"),
            )
            .header(ACCEPT, HeaderValue::from_static("application/json"))
            .body(Full::new(body))
            .map_err(|e| TokenEndpointError::malformed(format!("cannot build the request: {e}")))?;
        if let Some(header) = self.auth.header() {
            request.headers_mut().insert(AUTHORIZATION, header);
        }
        #[cfg(feature = "dpop")]
        if let Some(dpop) = &self.dpop {
            let proof = dpop
                .proof(&Method::POST, &self.url, None)
                .map_err(|e| TokenEndpointError::malformed(format!("DPoP proof: {e}")))?;
            let value = HeaderValue::try_from(proof)
                .map_err(|e| TokenEndpointError::malformed(format!("DPoP proof: {e}")))?;
            request.headers_mut().insert(crate::dpop::DPOP, value);
        }
        let response = match self.http.clone().oneshot(request).await {
            Ok(response) => response,
            Err(err) => return Ok(Attempt::Transport(err)),
        };
        let (parts, body) = response.into_parts();
        let declared = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_response_bytes as u64) {
            return Err(TokenEndpointError::TooLarge {
                limit: self.max_response_bytes,
            });
        }
        match collect_limited(body, self.max_response_bytes).await {
            Ok(bytes) => Ok(Attempt::Answer(parts.status, parts.headers, bytes)),
            Err(ReadError::TooLarge) => Err(TokenEndpointError::TooLarge {
                limit: self.max_response_bytes,
            }),
            Err(ReadError::Body(err)) => Ok(Attempt::Transport(err)),
        }
    }

    fn parse_success(&self, status: StatusCode, bytes: &[u8]) -> Result<Token, TokenEndpointError> {
        let map = json_object(bytes)?;
        let declared = match &self.format {
            ResponseFormat::Standard => map.get("token_type").is_some_and(|v| !v.is_null()),
            ResponseFormat::Envelope(envelope) => envelope.declares_token_type(&map),
        };
        match &self.format {
            ResponseFormat::Standard => {
                if !map.contains_key("access_token") {
                    if let Some(err) = parse_error(status, &map) {
                        return Err(TokenEndpointError::OAuth(err));
                    }
                }
                parse_success(&map)
            }
            ResponseFormat::Envelope(envelope) => envelope.parse(map),
        }
        .and_then(|token| self.check_binding(token, declared))
    }

    #[cfg(not(feature = "dpop"))]
    fn check_binding(&self, token: Token, _declared: bool) -> Result<Token, TokenEndpointError> {
        Ok(token)
    }

    /// With DPoP, the server must have bound the token to the key: a
    /// `Bearer` token in answer to a proof means it ignored the proof, and
    /// presenting that token with proofs would fail at the resource server.
    /// `declared`: whether the answer gave a `token_type` at all.
    #[cfg(feature = "dpop")]
    fn check_binding(&self, token: Token, declared: bool) -> Result<Token, TokenEndpointError> {
        if self.dpop.is_some() && !token.token_type().eq_ignore_ascii_case("dpop") {
            let what = if declared {
                format!("the token is of type `{}`", token.token_type())
            } else {
                "the answer has no `token_type`".to_owned()
            };
            return Err(TokenEndpointError::malformed(format!(
                "a DPoP proof was sent but {what}, not `DPoP`"
            )));
        }
        Ok(token)
    }

    pub(crate) fn parse_failure(
        &self,
        status: StatusCode,
        bytes: &[u8],
        attempts: u32,
    ) -> TokenEndpointError {
        if let Ok(map) = json_object(bytes) {
            if let Some(err) = parse_error(status, &map) {
                return TokenEndpointError::OAuth(err);
            }
            if let (ResponseFormat::Envelope(envelope), false) =
                (&self.format, status.is_server_error())
            {
                if let Some(err) = envelope.business_error(&serde_json::Value::Object(map)) {
                    return err;
                }
            }
        }
        TokenEndpointError::Status { status, attempts }
    }
}

enum ReadError {
    TooLarge,
    Body(BoxError),
}

/// Reads a whole body, at most `limit` bytes: a frame that would go past
/// the cap ends the read.
async fn collect_limited(
    mut body: UnsyncBoxBody<Bytes, BoxError>,
    limit: usize,
) -> Result<Bytes, ReadError> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ReadError::Body)?;
        if let Ok(data) = frame.into_data() {
            if buf.len().saturating_add(data.len()) > limit {
                return Err(ReadError::TooLarge);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// A connection that could not be opened: nothing was sent, a retry is safe.
pub(crate) fn is_connect_error(err: &(dyn std::error::Error + 'static)) -> bool {
    err.downcast_ref::<hyper_util::client::legacy::Error>()
        .is_some_and(|e| e.is_connect())
}

/// `Retry-After` as delta-seconds or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_the_cap() {
        let policy = RetryPolicy {
            max_retries: 10,
            base: Duration::from_millis(100),
            max_wait: Duration::from_millis(300),
        };
        assert!(policy.backoff(1) <= Duration::from_millis(110));
        assert!(policy.backoff(2) >= Duration::from_millis(180));
        assert!(policy.backoff(40) <= Duration::from_millis(330));
    }

    #[test]
    fn retry_after_forms() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&headers), Some(Duration::ZERO));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }
}
