//! [`ResponseFuture`]: the future of [`AuthRefresh`](crate::AuthRefresh).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Buf;
use futures::future::BoxFuture;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::BoxError;
use crate::body::{FirstLook, ReplayBody, ResponseBody, first_look, not_peekable};
use crate::detect::{HeadVerdict, ResponseHead};
use crate::retry::RetryCtx;

type SlowPath<ResB> = BoxFuture<'static, Result<Response<ResponseBody<ResB>>, BoxError>>;

pin_project! {
    #[project = KindProj]
    enum Kind<F, ResB> {
        // NOTE: the hot path. The inner service's future is polled in place;
        // only a response the detector flags (or a request that must wait
        // for a token) moves to the boxed slow path.
        First { #[pin] fut: F },
        Slow { fut: SlowPath<ResB> },
    }
}

pin_project! {
    /// Response future of [`AuthRefresh`](crate::AuthRefresh).
    pub struct ResponseFuture<S, ReqB, ResB>
    where
        S: Service<Request<ReplayBody<ReqB>>>,
    {
        #[pin]
        kind: Kind<S::Future, ResB>,
        retry: Option<RetryCtx<S, ReqB>>,
    }
}

impl<S, ReqB, ResB> fmt::Debug for ResponseFuture<S, ReqB, ResB>
where
    S: Service<Request<ReplayBody<ReqB>>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, ReqB, ResB> ResponseFuture<S, ReqB, ResB>
where
    S: Service<Request<ReplayBody<ReqB>>>,
{
    pub(crate) fn passthrough(fut: S::Future) -> Self {
        Self {
            kind: Kind::First { fut },
            retry: None,
        }
    }

    pub(crate) fn first(fut: S::Future, retry: RetryCtx<S, ReqB>) -> Self {
        Self {
            kind: Kind::First { fut },
            retry: Some(retry),
        }
    }

    pub(crate) fn slow(fut: SlowPath<ResB>) -> Self {
        Self {
            kind: Kind::Slow { fut },
            retry: None,
        }
    }
}

impl<S, ReqB, ResB> Future for ResponseFuture<S, ReqB, ResB>
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
    type Output = Result<Response<ResponseBody<ResB>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.kind.as_mut().project() {
                KindProj::First { fut } => {
                    let response = ready!(fut.poll(cx)).map_err(Into::into)?;
                    // NOTE: the retry context is only looked at here; it is
                    // moved out (a copy of its bytes) only for the slow path.
                    let verdict = match this.retry.as_ref() {
                        Some(retry) => retry.verdict(&response),
                        None => HeadVerdict::NotExpired,
                    };
                    if verdict.is_not_expired() {
                        return Poll::Ready(Ok(response.map(ResponseBody::new)));
                    }
                    let Some(retry) = this.retry.take() else {
                        return Poll::Ready(Ok(response.map(ResponseBody::new)));
                    };
                    let fut = match first_look_at(retry, response, verdict, cx) {
                        Look::Answer(response) => return Poll::Ready(Ok(response)),
                        Look::Slow(fut) => fut,
                    };
                    this.kind.set(Kind::Slow { fut });
                }
                KindProj::Slow { fut } => return fut.as_mut().poll(cx),
            }
        }
    }
}

enum Look<ResB> {
    /// Handed back as it is.
    Answer(Response<ResponseBody<ResB>>),
    /// Needs the slow path: more of the body, or a refresh and retry.
    Slow(SlowPath<ResB>),
}

/// A first answer the head could not clear. A body the detector must read
/// is judged here, in the same poll, when it has already arrived whole (a
/// small JSON answer usually comes with its head); only a body still on
/// its way, an expired token or a DPoP nonce challenge takes the boxed
/// slow path.
fn first_look_at<S, ReqB, ResB>(
    retry: RetryCtx<S, ReqB>,
    response: Response<ResB>,
    verdict: HeadVerdict,
    cx: &mut Context<'_>,
) -> Look<ResB>
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
    if verdict != HeadVerdict::NeedBody || retry.is_nonce_challenge(&response) {
        return Look::Slow(Box::pin(retry.recover(response, verdict)));
    }
    let (parts, body) = response.into_parts();
    let head = ResponseHead::with_content_type(parts.status, parts.version, &parts.headers);
    if let Some(reason) = not_peekable(&head) {
        tracing::debug!(
            reason,
            "response body not read by the detector; passed on undetected"
        );
        return Look::Answer(Response::from_parts(parts, ResponseBody::new(body)));
    }
    match first_look(body, retry.config.peek_limit, cx) {
        FirstLook::Whole(bytes, body) => {
            let expired = retry.config.detector.check_body(&head, &bytes);
            let answer = Response::from_parts(parts, body);
            if expired {
                Look::Slow(Box::pin(retry.retry_rejected(answer)))
            } else {
                Look::Answer(answer)
            }
        }
        FirstLook::Unjudged(body) => Look::Answer(Response::from_parts(parts, body)),
        FirstLook::Unfinished(unfinished) => {
            Look::Slow(Box::pin(retry.judge_then_recover(parts, unfinished)))
        }
    }
}
