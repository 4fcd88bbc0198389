//! Temporary: passthrough-only replay body (replaced by the real one).
#![allow(dead_code)]
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::BoxError;

pin_project! {
    /// A request body that can be replayed once.
    pub struct ReplayBody<B> {
        #[pin]
        inner: Option<B>,
    }
}

impl<B> std::fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayBody").finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotReplayable {
    Disabled,
    TooLarge,
    Failed,
}

pub(crate) struct Replay<B> {
    empty: bool,
    _b: std::marker::PhantomData<fn() -> B>,
}

impl<B: Body> ReplayBody<B> {
    pub(crate) fn new(body: B, _max: usize) -> (ReplayBody<B>, Replay<B>) {
        let empty = body.is_end_stream();
        (
            ReplayBody { inner: Some(body) },
            Replay {
                empty,
                _b: std::marker::PhantomData,
            },
        )
    }
}

impl<B> Replay<B> {
    pub(crate) fn try_replay(&self) -> Result<ReplayBody<B>, NotReplayable> {
        if self.empty {
            Ok(ReplayBody { inner: None })
        } else {
            Err(NotReplayable::Disabled)
        }
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body,
    B::Data: Buf,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().inner.as_pin_mut() {
            None => Poll::Ready(None),
            Some(inner) => inner.poll_frame(cx).map(|f| {
                f.map(|f| {
                    f.map(|f| f.map_data(|mut d| d.copy_to_bytes(d.remaining())))
                        .map_err(Into::into)
                })
            }),
        }
    }
    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }
    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or(SizeHint::with_exact(0), |b| b.size_hint())
    }
}
