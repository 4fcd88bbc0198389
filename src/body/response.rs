//! [`ResponseBody`]: the response body handed back to the caller, with the
//! bytes a detector read put back in front.

use std::any::Any;
use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    #[project = InnerProj]
    enum Inner<B> {
        // NOTE: the hot path: the upstream's body, polled in place, with
        // nothing else to keep or drop.
        Plain { #[pin] body: B },
        // The whole body, read while a detector judged it: the upstream's
        // body had ended and is gone.
        Whole { data: Option<Bytes> },
        // A body that was read in part: boxed, with what was read (only on
        // the slow path).
        Prefixed { rest: Box<Prefixed<B>> },
    }
}

/// The frames a detector read from a body that had not ended, and that
/// body.
pub(crate) struct Prefixed<B> {
    pub(crate) buffered: VecDeque<Frame<Bytes>>,
    pub(crate) buffered_len: u64,
    // NOTE: the upstream's error met while peeking, handed to the caller
    // after the buffered frames. Boxed as `Any` so that the type needs no
    // `B: Body` bound; it is always a `B::Error`.
    pub(crate) error: Option<Box<dyn Any + Send + Sync>>,
    pub(crate) inner_done: bool,
    pub(crate) body: Pin<Box<B>>,
}

pin_project! {
    /// The body of a response from [`AuthRefresh`](crate::AuthRefresh).
    ///
    /// Byte for byte the upstream's body: when a detector had to look at
    /// the body, the frames it read are yielded first, then the rest of the
    /// upstream's body (or the error it ended with).
    pub struct ResponseBody<B> {
        #[pin]
        inner: Inner<B>,
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (buffered, done) = match &self.inner {
            Inner::Plain { .. } => (0, false),
            Inner::Whole { data } => (data.as_ref().map_or(0, |d| d.len() as u64), true),
            Inner::Prefixed { rest } => (rest.buffered_len, rest.inner_done),
        };
        f.debug_struct("ResponseBody")
            .field("buffered_bytes", &buffered)
            .field("inner_done", &done)
            .finish_non_exhaustive()
    }
}

impl<B> ResponseBody<B> {
    /// The upstream's body, passed through.
    pub(crate) fn new(body: B) -> Self {
        Self {
            inner: Inner::Plain { body },
        }
    }

    /// A body that was read to its end: these are all its bytes.
    pub(crate) fn whole(data: Bytes) -> Self {
        Self {
            inner: Inner::Whole {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    /// A body read in part: `rest` holds what was read and the body.
    pub(crate) fn prefixed(rest: Prefixed<B>) -> Self {
        Self {
            inner: Inner::Prefixed {
                rest: Box::new(rest),
            },
        }
    }

    /// Bytes read ahead and not yet handed on.
    #[cfg(test)]
    pub(crate) fn buffered_len(&self) -> u64 {
        match &self.inner {
            Inner::Plain { .. } => 0,
            Inner::Whole { data } => data.as_ref().map_or(0, |d| d.len() as u64),
            Inner::Prefixed { rest } => rest.buffered_len,
        }
    }
}

pub(crate) fn to_bytes<D: Buf>(mut data: D) -> Bytes {
    data.copy_to_bytes(data.remaining())
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Data: Buf,
    B::Error: 'static,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut inner = self.project().inner;
        match inner.as_mut().project() {
            InnerProj::Plain { body } => match body.poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(match frame.into_data() {
                    Ok(data) => Frame::data(to_bytes(data)),
                    Err(frame) => frame.map_data(to_bytes),
                }))),
                Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(err))),
                Poll::Ready(None) => {
                    // NOTE: the upstream's body is never polled after its
                    // end (a stream may panic then): it is let go here.
                    inner.set(Inner::Whole { data: None });
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            },
            InnerProj::Whole { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            InnerProj::Prefixed { rest } => rest.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Plain { body } => body.is_end_stream(),
            Inner::Whole { data } => data.is_none(),
            Inner::Prefixed { rest } => {
                rest.buffered.is_empty()
                    && rest.error.is_none()
                    && (rest.inner_done || rest.body.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Plain { body } => body.size_hint(),
            Inner::Whole { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Inner::Prefixed { rest } => rest.size_hint(),
        }
    }
}

impl<B> Prefixed<B>
where
    B: Body,
    B::Data: Buf,
    B::Error: 'static,
{
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(frame) = self.buffered.pop_front() {
            if let Some(data) = frame.data_ref() {
                self.buffered_len -= data.len() as u64;
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(err) = self.error.take() {
            self.inner_done = true;
            return match err.downcast::<B::Error>() {
                Ok(err) => Poll::Ready(Some(Err(*err))),
                Err(_) => Poll::Ready(None),
            };
        }
        if self.inner_done {
            return Poll::Ready(None);
        }
        match self.body.as_mut().poll_frame(cx) {
            Poll::Ready(None) => {
                self.inner_done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => Poll::Ready(Some(frame.map(|f| f.map_data(to_bytes)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        if self.inner_done {
            return SizeHint::with_exact(self.buffered_len);
        }
        let inner = self.body.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(self.buffered_len));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(self.buffered_len));
        }
        hint
    }
}
