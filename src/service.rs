//! [`AuthRefresh`]: the middleware service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Buf;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::body::{ReplayBody, ResponseBody};
use crate::future::ResponseFuture;
use crate::inject::Put;
use crate::layer::LayerConfig;
use crate::lifecycle::Acquired;
use crate::retry::RetryCtx;
use crate::{AuthRefreshLayer, BoxError, TokenHandle};

/// Middleware that keeps the inner HTTP service authenticated; built by
/// [`AuthRefreshLayer`].
///
/// The inner service receives requests whose body is a
/// [`ReplayBody`] of the caller's body, and its responses come back with a
/// [`ResponseBody`] around its own body.
pub struct AuthRefresh<S> {
    inner: S,
    handle: TokenHandle,
    config: Arc<LayerConfig>,
}

impl<S: Clone> Clone for AuthRefresh<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            handle: self.handle.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for AuthRefresh<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthRefresh")
            .field("inner", &self.inner)
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

impl<S> AuthRefresh<S> {
    /// Wraps `inner` with the default settings of [`AuthRefreshLayer::new`].
    pub fn new(inner: S, handle: TokenHandle) -> Self {
        tower_layer::Layer::layer(&AuthRefreshLayer::new(handle), inner)
    }

    pub(crate) fn from_parts(inner: S, handle: TokenHandle, config: Arc<LayerConfig>) -> Self {
        Self {
            inner,
            handle,
            config,
        }
    }

    /// A layer around `handle`; the same as [`AuthRefreshLayer::new`].
    pub fn layer(handle: TokenHandle) -> AuthRefreshLayer {
        AuthRefreshLayer::new(handle)
    }

    /// The handle on this service's token.
    pub fn handle(&self) -> &TokenHandle {
        &self.handle
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for AuthRefresh<S>
where
    S: Service<Request<ReplayBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    ReqB: Body + Send + 'static,
    ReqB::Data: Buf + Send,
    ReqB::Error: Into<BoxError>,
    ResB: Body + Send + 'static,
    ResB::Data: Buf + Send,
    ResB::Error: Send + Sync + 'static,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, ReqB, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        // Take the service that was made ready and leave a clone behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        if !self.config.sends_token_to(request.uri()) {
            return passthrough(inner, request);
        }
        dispatch(inner, &self.handle, &self.config, request)
    }
}

/// Sends `request` without touching it: no token, no detection, no retry.
pub(crate) fn passthrough<S, ReqB, ResB>(
    mut inner: S,
    request: Request<ReqB>,
) -> ResponseFuture<S, ReqB, ResB>
where
    S: Service<Request<ReplayBody<ReqB>>, Response = Response<ResB>>,
    ReqB: Body,
{
    let request = request.map(ReplayBody::passthrough);
    ResponseFuture::passthrough(inner.call(request))
}

/// Sends `request` through the ready service `inner` with the token of
/// `handle`, keeping what a retry needs (`spare` is a clone of the service
/// for the retry).
pub(crate) fn dispatch<S, ReqB, ResB>(
    inner: S,
    handle: &TokenHandle,
    config: &Arc<LayerConfig>,
    request: Request<ReqB>,
) -> ResponseFuture<S, ReqB, ResB>
where
    S: Service<Request<ReplayBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    ReqB: Body + Send + 'static,
    ReqB::Data: Buf + Send,
    ReqB::Error: Into<BoxError>,
    ResB: Body + Send + 'static,
    ResB::Data: Buf + Send,
    ResB::Error: Send + Sync + 'static,
{
    let manager = &handle.manager;
    let (mut parts, body) = request.into_parts();
    // NOTE: the copy for further attempts is taken before the token is put
    // on (a query token would otherwise be there twice on a retry).
    let head = parts.clone();
    let acquired = manager
        .config
        .injector
        .put_if_absent(&mut parts, || match manager.acquire() {
            Acquired::Ready(header, generation) => Some((header, generation)),
            Acquired::Wait => None,
        });
    let generation = match acquired {
        // The caller's own token wins; nothing to refresh or retry.
        Put::Present => return passthrough(inner, Request::from_parts(parts, body)),
        Put::Done(generation) => Some(generation),
        Put::NoToken => None,
    };
    let (body, replay) = ReplayBody::new(body, config.max_replay_bytes);
    let mut request = Request::from_parts(parts, body);
    let mut ctx = RetryCtx {
        manager: manager.clone(),
        config: config.clone(),
        inner,
        head,
        replay,
        generation: 0,
    };
    match generation {
        Some(generation) => {
            if let Err(err) = config.prove(&mut request) {
                return ResponseFuture::slow(Box::pin(async move { Err(err) }));
            }
            ctx.generation = generation;
            // NOTE: the service that was made ready is called here and kept
            // for the retry, which makes it ready again before calling it.
            let fut = ctx.inner.call(request);
            ResponseFuture::first(fut, ctx)
        }
        None => {
            // NOTE: the ready service is let go (its capacity under
            // `ConcurrencyLimit` or `Buffer` goes back) while the request
            // waits for a token; a clone is made ready after the wait.
            let spare = ctx.inner.clone();
            drop(std::mem::replace(&mut ctx.inner, spare));
            ResponseFuture::slow(Box::pin(ctx.wait_then_send(request)))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use futures::channel::mpsc;
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};
    use tower::ServiceExt;

    use super::*;
    use crate::{Token, token_source_fn};

    type Fed = StreamBody<mpsc::UnboundedReceiver<Result<Frame<Bytes>, std::io::Error>>>;

    #[tokio::test]
    async fn an_upload_answered_not_expired_holds_no_replay_buffer() {
        let handle = TokenHandle::new(token_source_fn(|_| async {
            Ok::<_, std::io::Error>(Token::bearer("t"))
        }));
        // The upstream answers at once and keeps the request body to read
        // it afterwards, as a server answering a client-streaming upload
        // early does.
        let kept: Arc<Mutex<Option<ReplayBody<Fed>>>> = Arc::default();
        let slot = kept.clone();
        let inner = tower::service_fn(move |request: Request<ReplayBody<Fed>>| {
            let slot = slot.clone();
            async move {
                *slot.lock().unwrap() = Some(request.into_body());
                Ok::<_, BoxError>(Response::new(http_body_util::Empty::<Bytes>::new()))
            }
        });
        let (tx, rx) = mpsc::unbounded();
        let chunk = |byte: u8| Ok(Frame::data(Bytes::from(vec![byte; 4096])));
        tx.unbounded_send(chunk(0)).unwrap();
        let service = AuthRefresh::new(inner, handle);
        let response = service
            .oneshot(Request::new(StreamBody::new(rx)))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);

        let mut body = kept.lock().unwrap().take().unwrap();
        for byte in 0..50 {
            if byte > 0 {
                tx.unbounded_send(chunk(byte)).unwrap();
            }
            let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
            assert_eq!(data[0], byte);
            assert_eq!(body.buffered_bytes(), 0, "chunk {byte} was not kept");
        }
    }
}
