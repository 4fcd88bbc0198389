//! The slow path: waiting for a token, peeking at a suspicious response,
//! refreshing and sending the request once more.

use std::sync::Arc;

use bytes::Buf;
use http::{Request, Response};
use http_body::Body;
use tower::ServiceExt;
use tower_service::Service;

use crate::BoxError;
use crate::body::{NotReplayable, Replay, ReplayBody, ResponseBody, not_peekable, peek};
use crate::detect::{HeadVerdict, ResponseHead};
use crate::layer::LayerConfig;
use crate::lifecycle::{Counters, Rejection, TokenManager};

/// Why an expired-token answer was handed back without a retry. Found in the
/// response's extensions as [`RetrySkipped`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SkipReason {
    /// The request body was larger than `max_replay_bytes`.
    BodyTooLarge,
    /// Replay is turned off (`max_replay_bytes(0)`) and the body was not empty.
    ReplayDisabled,
    /// The request body failed while it was sent, so it cannot be sent again.
    BodyFailed,
    /// The token had just been issued; refreshing it again would not help
    /// (see `TokenHandleBuilder::min_token_age`).
    TokenTooFresh,
    /// The request body is a stream that cannot be cloned (reqwest), so the
    /// request was sent once.
    BodyNotCloneable,
}

/// Marker put in the extensions of an expired-token response that is
/// returned without a retry. The token is still refreshed for later requests
/// (except for [`SkipReason::TokenTooFresh`]).
///
/// ```
/// use tower_auth_refresh::{RetrySkipped, SkipReason};
///
/// fn was_skipped<B>(response: &http::Response<B>) -> Option<SkipReason> {
///     response.extensions().get::<RetrySkipped>().map(|m| m.reason)
/// }
/// # let _ = was_skipped::<()>;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetrySkipped {
    /// Why no retry was made.
    pub reason: SkipReason,
}

/// Copies what is needed to send the request again.
pub(crate) fn clone_head<B>(request: &Request<B>) -> Request<()> {
    let mut head = Request::new(());
    *head.method_mut() = request.method().clone();
    *head.uri_mut() = request.uri().clone();
    *head.version_mut() = request.version();
    *head.headers_mut() = request.headers().clone();
    *head.extensions_mut() = request.extensions().clone();
    head
}

/// Everything a request's future needs beyond the first attempt.
pub(crate) struct RetryCtx<S, ReqB> {
    pub(crate) manager: Arc<TokenManager>,
    pub(crate) config: Arc<LayerConfig>,
    pub(crate) inner: S,
    pub(crate) head: Request<()>,
    pub(crate) replay: Replay<ReqB>,
    pub(crate) generation: u64,
}

impl<S, ReqB> RetryCtx<S, ReqB> {
    pub(crate) fn verdict<B>(&self, response: &Response<B>) -> HeadVerdict {
        #[cfg(feature = "dpop")]
        if let Some(key) = &self.config.dpop {
            key.nonces().update(self.head.uri(), response.headers());
            if crate::dpop::is_nonce_challenge(response.status(), response.headers()) {
                return HeadVerdict::Expired;
            }
        }
        let head = ResponseHead::new(response.status(), response.version(), response.headers());
        self.config.detector.check_head(&head)
    }
}

impl<S, ReqB, ResB> RetryCtx<S, ReqB>
where
    S: Service<Request<ReplayBody<ReqB>>, Response = Response<ResB>> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    ReqB: Body + Send + 'static,
    ReqB::Data: Buf + Send,
    ReqB::Error: Into<BoxError>,
    ResB: Body + Send + 'static,
    ResB::Data: Buf + Send,
    ResB::Error: Send + Sync + 'static,
{
    /// No usable token when the request came in: wait for one, then send.
    pub(crate) async fn wait_then_send(
        mut self,
        mut request: Request<ReplayBody<ReqB>>,
    ) -> Result<Response<ResponseBody<ResB>>, BoxError> {
        Counters::bump(&self.manager.counters.waited);
        let (header, generation) = self.manager.wait_for_token().await?;
        self.generation = generation;
        self.config
            .authorize(&self.manager.config.injector, &header, &mut request)?;
        // NOTE: `inner` is an unready clone (the ready service was let go
        // before the wait, see `dispatch`): it is made ready only now that
        // the request can go.
        let response = self
            .inner
            .ready()
            .await
            .map_err(Into::into)?
            .call(request)
            .await
            .map_err(Into::into)?;
        match self.verdict(&response) {
            verdict if verdict.is_not_expired() => Ok(response.map(ResponseBody::new)),
            verdict => self.recover(response, verdict).await,
        }
    }

    /// The response may mean the token expired: decide, refresh, retry once.
    // `self` changes only when a DPoP nonce challenge is answered.
    #[cfg_attr(not(feature = "dpop"), allow(unused_mut))]
    pub(crate) async fn recover(
        mut self,
        response: Response<ResB>,
        verdict: HeadVerdict,
    ) -> Result<Response<ResponseBody<ResB>>, BoxError> {
        #[cfg(feature = "dpop")]
        let (response, verdict) = match self.answer_nonce_challenge(response).await? {
            NonceAnswer::NotAChallenge(response) => (response, verdict),
            NonceAnswer::Resent(response) => match self.verdict(&response) {
                verdict if verdict.is_not_expired() => {
                    return Ok(response.map(ResponseBody::new));
                }
                verdict => (response, verdict),
            },
            NonceAnswer::Done(response) => return Ok(response),
        };
        let (parts, body) = response.into_parts();
        let (expired, body) = match verdict {
            HeadVerdict::Expired => (true, ResponseBody::new(body)),
            _ => judge_body(&self.config, &parts, body).await,
        };
        let mut response = Response::from_parts(parts, body);
        if !expired {
            return Ok(response);
        }

        let wait = match self.manager.on_rejected(self.generation) {
            Rejection::TooFresh => {
                return Ok(self.skip(response, SkipReason::TokenTooFresh));
            }
            Rejection::Retry(wait) => wait,
        };
        let body = match self.replay.try_replay() {
            Ok(body) => body,
            Err(reason) => {
                response = self.skip(response, skip_reason(reason));
                return Ok(response);
            }
        };
        let Some((header, generation)) = wait.await? else {
            return Ok(self.skip(response, SkipReason::TokenTooFresh));
        };
        // NOTE: the one replay has started: dropping the handle frees each
        // buffered chunk once the retry has sent it.
        drop(self.replay);
        drop(response);

        #[cfg(feature = "dpop")]
        let uri = self.config.dpop.as_ref().map(|_| self.head.uri().clone());
        let (parts, ()) = self.head.into_parts();
        let mut retry = Request::from_parts(parts, body);
        self.config
            .authorize(&self.manager.config.injector, &header, &mut retry)?;
        Counters::bump(&self.manager.counters.retries);
        tracing::debug!(generation, "retrying request with refreshed token");
        let mut inner = self.inner;
        let response = inner
            .ready()
            .await
            .map_err(Into::into)?
            .call(retry)
            .await
            .map_err(Into::into)?;
        #[cfg(feature = "dpop")]
        if let (Some(key), Some(uri)) = (&self.config.dpop, &uri) {
            key.nonces().update(uri, response.headers());
        }
        Ok(response.map(ResponseBody::new))
    }

    /// NOTE: a DPoP nonce challenge is not an expired token. The request is
    /// sent once more, with the replayed body, the current token and a new
    /// proof carrying the nonce the challenge brought (already cached by
    /// `verdict`); no refresh is started or counted. What that attempt gets
    /// back goes through the usual detection, so an expired token still
    /// refreshes once after it.
    #[cfg(feature = "dpop")]
    async fn answer_nonce_challenge(
        &mut self,
        response: Response<ResB>,
    ) -> Result<NonceAnswer<ResB>, BoxError> {
        if self.config.dpop.is_none()
            || !crate::dpop::is_nonce_challenge(response.status(), response.headers())
        {
            return Ok(NonceAnswer::NotAChallenge(response));
        }
        let body = match self.replay.try_replay() {
            Ok(body) => body,
            Err(reason) => {
                let response = response.map(ResponseBody::new);
                return Ok(NonceAnswer::Done(self.skip(response, skip_reason(reason))));
            }
        };
        drop(response);
        let (header, generation) = self.manager.wait_for_token().await?;
        self.generation = generation;
        let mut again = clone_head(&self.head).map(|()| body);
        self.config
            .authorize(&self.manager.config.injector, &header, &mut again)?;
        tracing::debug!(generation, "resending request with the server's DPoP nonce");
        let response = self
            .inner
            .ready()
            .await
            .map_err(Into::into)?
            .call(again)
            .await
            .map_err(Into::into)?;
        if let Some(key) = &self.config.dpop {
            key.nonces().update(self.head.uri(), response.headers());
        }
        Ok(NonceAnswer::Resent(response))
    }

    fn skip<B>(&self, mut response: Response<B>, reason: SkipReason) -> Response<B> {
        let status = response.status();
        mark_skipped(&self.manager, status, response.extensions_mut(), reason);
        response
    }
}

/// What was done about a possible DPoP nonce challenge.
#[cfg(feature = "dpop")]
enum NonceAnswer<ResB> {
    /// Not a nonce challenge: the response as it came.
    NotAChallenge(Response<ResB>),
    /// The answer to the request sent again with the nonce.
    Resent(Response<ResB>),
    /// The challenge, handed back marked: the body could not be replayed.
    Done(Response<ResponseBody<ResB>>),
}

fn skip_reason(reason: NotReplayable) -> SkipReason {
    match reason {
        NotReplayable::Disabled => SkipReason::ReplayDisabled,
        NotReplayable::TooLarge => SkipReason::BodyTooLarge,
        NotReplayable::Failed => SkipReason::BodyFailed,
    }
}

/// Shows the detector the body of a response whose head asked for it, when
/// the body can be judged at once (see [`peek`]); a stream or a compressed
/// body is handed on unread. Returns whether the token expired, and the
/// whole body to hand on.
pub(crate) async fn judge_body<B>(
    config: &LayerConfig,
    parts: &http::response::Parts,
    body: B,
) -> (bool, ResponseBody<B>)
where
    B: Body,
    B::Data: Buf,
    B::Error: Send + Sync + 'static,
{
    if let Some(reason) = not_peekable(&parts.headers) {
        tracing::debug!(
            reason,
            "response body not read by the detector; passed on undetected"
        );
        return (false, ResponseBody::new(body));
    }
    let peeked = peek(body, config.peek_limit, config.peek_deadline).await;
    let head = ResponseHead::new(parts.status, parts.version, &parts.headers);
    let expired = peeked
        .complete
        .as_ref()
        .is_some_and(|bytes| config.detector.check_body(&head, bytes));
    (expired, peeked.body)
}

/// Counts and logs a retry that was not made, and marks the response's
/// extensions with the reason.
pub(crate) fn mark_skipped(
    manager: &TokenManager,
    status: http::StatusCode,
    extensions: &mut http::Extensions,
    reason: SkipReason,
) {
    Counters::bump(&manager.counters.skipped_retries);
    tracing::warn!(
        reason = ?reason,
        status = status.as_u16(),
        "token rejected; request not retried"
    );
    extensions.insert(RetrySkipped { reason });
}
