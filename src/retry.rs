//! The slow path: waiting for a token, peeking at a suspicious response,
//! refreshing and sending the request once more.

use std::sync::Arc;

use bytes::Buf;
use http::{Request, Response};
use http_body::Body;
use tower::ServiceExt;
use tower_service::Service;

use crate::BoxError;
use crate::body::{
    NotReplayable, Replay, ReplayBody, ResponseBody, Unfinished, not_peekable, peek,
};
use crate::detect::{HeadVerdict, ResponseHead};
use crate::layer::LayerConfig;
use crate::lifecycle::{Rejection, TokenManager};

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

/// Everything a request's future needs beyond the first attempt.
pub(crate) struct RetryCtx<S, ReqB> {
    pub(crate) manager: Arc<TokenManager>,
    pub(crate) config: Arc<LayerConfig>,
    pub(crate) inner: S,
    /// The request's head as it came, before the token was put on: each
    /// further attempt starts from a copy.
    pub(crate) head: http::request::Parts,
    pub(crate) replay: Replay<ReqB>,
    pub(crate) generation: u64,
}

impl<S, ReqB> RetryCtx<S, ReqB> {
    /// The first look at an answer: remembers its DPoP nonce, and says
    /// whether it is handed on as it is (`is_not_expired`) or goes to
    /// [`recover`](Self::recover).
    ///
    /// NOTE: a DPoP nonce challenge is sent to `recover` whatever the
    /// detector says (as `NeedBody`, "look further"); `recover` answers it
    /// before any expiry decision, so it never leads to a refresh.
    pub(crate) fn verdict<B>(&self, response: &Response<B>) -> HeadVerdict {
        self.remember_nonce(response);
        if self.is_nonce_challenge(response) {
            return HeadVerdict::NeedBody;
        }
        self.head_verdict(response)
    }

    /// What the expiry detector makes of an answer's head.
    fn head_verdict<B>(&self, response: &Response<B>) -> HeadVerdict {
        let head = ResponseHead::new(response.status(), response.version(), response.headers());
        self.config.detector.check_head(&head)
    }

    /// Caches the `DPoP-Nonce` an answer carries, for the next proof to its
    /// origin.
    fn remember_nonce<B>(&self, response: &Response<B>) {
        #[cfg(feature = "dpop")]
        if let Some(key) = &self.config.dpop {
            key.nonces().update(&self.head.uri, response.headers());
        }
        #[cfg(not(feature = "dpop"))]
        let _ = response;
    }

    /// Whether the layer speaks DPoP and the answer is a resource server's
    /// nonce challenge.
    pub(crate) fn is_nonce_challenge<B>(&self, response: &Response<B>) -> bool {
        #[cfg(feature = "dpop")]
        return self.config.dpop.is_some()
            && crate::dpop::is_nonce_challenge(response.status(), response.headers());
        #[cfg(not(feature = "dpop"))]
        {
            let _ = response;
            false
        }
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
        self.manager.count_wait();
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

    /// The response may mean the token expired, or (DPoP) the server wants
    /// a nonce: answer the nonce challenge, decide, refresh, retry once.
    ///
    /// NOTE: the attempts are bounded: at most one nonce resend after each
    /// attempt that is not itself a nonce resend, and at most one refresh
    /// retry per request, so at most four sends. A nonce challenge is never
    /// an expired token: one that answers a nonce resend is handed back to
    /// the caller (its nonce is cached for the next request), and no
    /// refresh is started or counted for it.
    pub(crate) async fn recover(
        self,
        response: Response<ResB>,
        verdict: HeadVerdict,
    ) -> Result<Response<ResponseBody<ResB>>, BoxError> {
        self.recover_from(response, Some(verdict), false).await
    }

    /// The first answer's body did not end with its first frame: read on
    /// (for at most the peek deadline), judge, and refresh and retry if it
    /// says the token expired.
    pub(crate) async fn judge_then_recover(
        self,
        parts: http::response::Parts,
        unfinished: Unfinished<ResB>,
    ) -> Result<Response<ResponseBody<ResB>>, BoxError> {
        let peeked = unfinished
            .peek(self.config.peek_limit, self.config.peek_deadline)
            .await;
        let head = ResponseHead::with_content_type(parts.status, parts.version, &parts.headers);
        let expired = judge(&self.config, &head, peeked.complete.as_deref());
        let answer = Response::from_parts(parts, peeked.body);
        if !expired {
            return Ok(answer);
        }
        self.retry_rejected(answer).await
    }

    /// The first answer was judged an expired token: refresh, retry once,
    /// and handle the retry's answer as `recover` does.
    pub(crate) async fn retry_rejected(
        mut self,
        rejected: Response<ResponseBody<ResB>>,
    ) -> Result<Response<ResponseBody<ResB>>, BoxError> {
        let response = match self.refresh_and_retry(rejected).await? {
            Ok(response) => response,
            Err(handed_back) => return Ok(handed_back),
        };
        self.recover_from(response, None, true).await
    }

    async fn recover_from(
        mut self,
        mut response: Response<ResB>,
        mut verdict: Option<HeadVerdict>,
        mut refreshed: bool,
    ) -> Result<Response<ResponseBody<ResB>>, BoxError> {
        let mut nonce_resent = false;
        loop {
            if self.is_nonce_challenge(&response) {
                if nonce_resent {
                    tracing::debug!("DPoP nonce challenge after a nonce resend; handed back");
                    return Ok(response.map(ResponseBody::new));
                }
                let body = match self.replay.try_replay() {
                    Ok(body) => body,
                    Err(reason) => {
                        let response = response.map(ResponseBody::new);
                        return Ok(self.skip(response, skip_reason(reason)));
                    }
                };
                drop(response);
                response = self.resend_with_nonce(body).await?;
                nonce_resent = true;
                verdict = None;
                continue;
            }
            if refreshed {
                return Ok(response.map(ResponseBody::new));
            }
            let verdict = verdict
                .take()
                .unwrap_or_else(|| self.head_verdict(&response));
            if verdict.is_not_expired() {
                return Ok(response.map(ResponseBody::new));
            }
            let (parts, body) = response.into_parts();
            let (expired, body) = match verdict {
                HeadVerdict::Expired => (true, ResponseBody::new(body)),
                _ => judge_body(&self.config, &parts, body).await,
            };
            let rejected = Response::from_parts(parts, body);
            if !expired {
                return Ok(rejected);
            }
            response = match self.refresh_and_retry(rejected).await? {
                Ok(response) => response,
                Err(handed_back) => return Ok(handed_back),
            };
            refreshed = true;
            nonce_resent = false;
        }
    }

    /// The token was rejected: refresh (or join the refresh under way) and
    /// send the request once more with the new token. `Err` holds the
    /// rejected answer, marked, when no retry is made.
    async fn refresh_and_retry(
        &mut self,
        mut rejected: Response<ResponseBody<ResB>>,
    ) -> Result<Result<Response<ResB>, Response<ResponseBody<ResB>>>, BoxError> {
        let wait = match self.manager.on_rejected(self.generation) {
            Rejection::TooFresh => {
                return Ok(Err(self.skip(rejected, SkipReason::TokenTooFresh)));
            }
            Rejection::Retry(wait) => wait,
        };
        let body = match self.replay.try_replay() {
            Ok(body) => body,
            Err(reason) => {
                rejected = self.skip(rejected, skip_reason(reason));
                return Ok(Err(rejected));
            }
        };
        let Some((header, generation)) = wait.await? else {
            return Ok(Err(self.skip(rejected, SkipReason::TokenTooFresh)));
        };
        // NOTE: without DPoP this is the last send: giving up the replay
        // frees each buffered chunk once the retry has sent it. With DPoP
        // the retry's answer may still be a nonce challenge, answered with
        // one more replay.
        if !self.answers_nonce_challenges() {
            self.replay.release();
        }
        self.generation = generation;
        drop(rejected);

        let mut retry = Request::from_parts(self.head.clone(), body);
        self.config
            .authorize(&self.manager.config.injector, &header, &mut retry)?;
        self.manager.count_retry();
        tracing::debug!(generation, "retrying request with refreshed token");
        let response = self
            .inner
            .ready()
            .await
            .map_err(Into::into)?
            .call(retry)
            .await
            .map_err(Into::into)?;
        self.remember_nonce(&response);
        Ok(Ok(response))
    }

    /// Sends the request once more, with the replayed body, the current
    /// token and a new proof carrying the nonce the challenge brought
    /// (cached by `remember_nonce`). Not a refresh and not counted as a
    /// retry.
    async fn resend_with_nonce(
        &mut self,
        body: ReplayBody<ReqB>,
    ) -> Result<Response<ResB>, BoxError> {
        let (header, generation) = self.manager.wait_for_token().await?;
        self.generation = generation;
        let mut again = Request::from_parts(self.head.clone(), body);
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
        self.remember_nonce(&response);
        Ok(response)
    }

    fn answers_nonce_challenges(&self) -> bool {
        #[cfg(feature = "dpop")]
        return self.config.dpop.is_some();
        #[cfg(not(feature = "dpop"))]
        false
    }

    fn skip<B>(&self, mut response: Response<B>, reason: SkipReason) -> Response<B> {
        let status = response.status();
        mark_skipped(&self.manager, status, response.extensions_mut(), reason);
        response
    }
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
    let head = ResponseHead::with_content_type(parts.status, parts.version, &parts.headers);
    if let Some(reason) = not_peekable(&head) {
        tracing::debug!(
            reason,
            "response body not read by the detector; passed on undetected"
        );
        return (false, ResponseBody::new(body));
    }
    let peeked = peek(body, config.peek_limit, config.peek_deadline).await;
    let expired = judge(config, &head, peeked.complete.as_deref());
    (expired, peeked.body)
}

/// What the detector says of a body whose bytes were all read (`None`:
/// not read in time or too long, so not expired).
fn judge(config: &LayerConfig, head: &ResponseHead<'_>, complete: Option<&[u8]>) -> bool {
    complete.is_some_and(|bytes| config.detector.check_body(head, bytes))
}

/// Counts and logs a retry that was not made, and marks the response's
/// extensions with the reason.
pub(crate) fn mark_skipped(
    manager: &TokenManager,
    status: http::StatusCode,
    extensions: &mut http::Extensions,
    reason: SkipReason,
) {
    manager.count_skipped_retry(reason);
    tracing::warn!(
        reason = ?reason,
        status = status.as_u16(),
        "token rejected; request not retried"
    );
    extensions.insert(RetrySkipped { reason });
}
