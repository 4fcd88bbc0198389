//! The slow path: waiting for a token, peeking at a suspicious response,
//! refreshing and sending the request once more.

use std::sync::Arc;

use bytes::Buf;
use http::{Request, Response};
use http_body::Body;
use tower::ServiceExt;
use tower_service::Service;

use crate::BoxError;
use crate::body::{NotReplayable, Replay, ReplayBody, ResponseBody, peek};
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
        self.manager.config.injector.apply(&header, &mut request);
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
            HeadVerdict::NotExpired => Ok(response.map(ResponseBody::new)),
            verdict => self.recover(response, verdict).await,
        }
    }

    /// The response may mean the token expired: decide, refresh, retry once.
    pub(crate) async fn recover(
        self,
        response: Response<ResB>,
        verdict: HeadVerdict,
    ) -> Result<Response<ResponseBody<ResB>>, BoxError> {
        let (parts, body) = response.into_parts();
        let (expired, body) = match verdict {
            HeadVerdict::Expired => (true, ResponseBody::new(body)),
            _ => {
                let peeked = peek(body, self.config.peek_limit).await;
                let head = ResponseHead::new(parts.status, parts.version, &parts.headers);
                let expired = peeked
                    .complete
                    .as_ref()
                    .is_some_and(|bytes| self.config.detector.check_body(&head, bytes));
                (expired, peeked.body)
            }
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
                let reason = match reason {
                    NotReplayable::Disabled => SkipReason::ReplayDisabled,
                    NotReplayable::TooLarge => SkipReason::BodyTooLarge,
                    NotReplayable::Failed => SkipReason::BodyFailed,
                };
                response = self.skip(response, reason);
                return Ok(response);
            }
        };
        let Some((header, generation)) = wait.await? else {
            return Ok(self.skip(response, SkipReason::TokenTooFresh));
        };
        drop(response);

        let (parts, ()) = self.head.into_parts();
        let mut retry = Request::from_parts(parts, body);
        self.manager.config.injector.apply(&header, &mut retry);
        Counters::bump(&self.manager.counters.retries);
        tracing::debug!(generation, "retrying request with refreshed token");
        let mut inner = self.inner;
        let response = inner.ready().await.map_err(Into::into)?.call(retry).await;
        Ok(response.map_err(Into::into)?.map(ResponseBody::new))
    }

    fn skip<B>(&self, mut response: Response<B>, reason: SkipReason) -> Response<B> {
        let status = response.status();
        mark_skipped(&self.manager, status, response.extensions_mut(), reason);
        response
    }
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
