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
use crate::body::{ReplayBody, ResponseBody};
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
                    let Some(retry) = this.retry.take() else {
                        return Poll::Ready(Ok(response.map(ResponseBody::new)));
                    };
                    let verdict = retry.verdict(&response);
                    if verdict.is_not_expired() {
                        return Poll::Ready(Ok(response.map(ResponseBody::new)));
                    }
                    let fut = Box::pin(retry.recover(response, verdict));
                    this.kind.set(Kind::Slow { fut });
                }
                KindProj::Slow { fut } => return fut.as_mut().poll(cx),
            }
        }
    }
}
