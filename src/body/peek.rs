//! Temporary: response body without peeking (replaced by the real one).
#![allow(dead_code)]
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The response body, possibly with a peeked prefix put back in front.
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
    }
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody").finish_non_exhaustive()
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn new(inner: B) -> Self {
        Self { inner }
    }
}

pub(crate) struct Peeked<B> {
    pub(crate) body: ResponseBody<B>,
    pub(crate) complete: Option<Bytes>,
}

pub(crate) async fn peek<B: Body>(body: B, _limit: usize) -> Peeked<B> {
    Peeked {
        body: ResponseBody::new(body),
        complete: None,
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Data: Buf,
{
    type Data = Bytes;
    type Error = B::Error;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        self.project()
            .inner
            .poll_frame(cx)
            .map(|f| f.map(|f| f.map(|f| f.map_data(|mut d| d.copy_to_bytes(d.remaining())))))
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
