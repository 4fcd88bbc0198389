//! [`ReplayBody`]: the request body streamed to the first attempt while a
//! copy of its chunks is kept, so the request can be sent once more.
//!
//! NOTE: the invariants of the replay buffer (after linkerd's `ReplayBody`).
//! - The caller's body is read once, by whichever attempt is current. Every
//!   data chunk it yields is handed on *and* pushed into the shared buffer as
//!   a refcounted `Bytes` clone: no copy of the payload is made.
//! - The buffer holds at most `max` bytes (and a bounded number of frames).
//!   A chunk that would pass the cap empties the buffer and marks the body
//!   `capped`: from then on it streams through and cannot be replayed.
//! - A body whose size hint is already larger than the cap is never
//!   buffered (passthrough), and an empty body needs no buffer at all.
//! - A replay starts a new attempt. It yields the buffered chunks first, then
//!   reads on from the caller's body where the earlier attempt stopped (the
//!   upstream may answer before it has read the whole request). An earlier
//!   attempt's body that is polled after that fails: it has been superseded.
//!   An earlier attempt left waiting on the caller's body is woken when the
//!   replay starts, so it fails at once and releases its connection instead
//!   of waiting for bytes that now go to the replay.
//! - Trailers are the last frame: once the caller's body yields them it has
//!   ended, and every replay yields them after the buffered chunks.
//! - When the [`Replay`] handle is dropped (the response said "not expired",
//!   or the one retry has started) no replay can happen any more: the chunks
//!   the current attempt has yielded are freed, new chunks are no longer
//!   kept, and the chunks a retry has still to yield are freed as it yields
//!   them. A client-streaming upload answered early holds no buffer.
//! - What the first attempt pays, and why: the caller's body is boxed (it
//!   may be `!Unpin`) in the state shared with the [`Replay`] handle, so a
//!   retry can read on from it even while the inner service holds the first
//!   attempt's body without polling it (hyper may); each frame takes the
//!   uncontended lock for the same reason; each chunk costs one refcount.
//!   The chunk of a one-frame body is kept inline in that state.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use smallvec::SmallVec;

use crate::BoxError;

/// Every buffered frame costs at least this much of the cap, so a body sent
/// in tiny chunks cannot hold an unbounded number of them.
const MIN_FRAME_COST: usize = 64;

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        // An empty body: nothing to read, nothing to keep.
        Empty,
        // Not kept for a replay (replay off, or larger than the cap).
        Passthrough { #[pin] body: B },
        // Streamed and kept in the shared buffer.
        Tee { reader: Reader<B> },
    }
}

pin_project! {
    /// The request body handed to the inner service by
    /// [`AuthRefresh`](crate::AuthRefresh).
    ///
    /// On the first attempt it streams the caller's body as it arrives and
    /// keeps a copy of its chunks (refcounted, not copied) up to the layer's
    /// [`max_replay_bytes`](crate::AuthRefreshLayer::max_replay_bytes). When
    /// the token is refreshed, the retry gets a `ReplayBody` that yields the
    /// same bytes and trailers again. Data frames are [`Bytes`](https://docs.rs/bytes/1/bytes/struct.Bytes.html); errors are
    /// [`BoxError`].
    pub struct ReplayBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Empty => "empty",
            Kind::Passthrough { .. } => "passthrough",
            Kind::Tee { .. } => "replayable",
        };
        f.debug_struct("ReplayBody")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

/// Why a request body cannot be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotReplayable {
    /// Replay is turned off and the body is not empty.
    Disabled,
    /// The body is (or turned out to be) larger than the cap.
    TooLarge,
    /// Reading the body failed.
    Failed,
}

/// The handle kept by the request's future to start a replay.
pub(crate) struct Replay<B> {
    kind: ReplayKind<B>,
}

enum ReplayKind<B> {
    Empty,
    Never(NotReplayable),
    Tee(Arc<Shared<B>>),
}

/// The chunks kept for a replay. Most request bodies arrive in one frame:
/// that chunk is kept inline, with no allocation of its own.
type Chunks = SmallVec<[Bytes; 1]>;

/// What every attempt of one request shares.
struct Shared<B> {
    state: Mutex<State<B>>,
    /// The caller's body's size hint before anything was read.
    hint: SizeHint,
    max_bytes: usize,
}

struct State<B> {
    /// The caller's body, read by the current attempt.
    body: Pin<Box<B>>,
    /// The kept chunks, in order. Once released, those the current attempt
    /// has yielded are empty placeholders (freed), until all are yielded
    /// and the list is emptied.
    chunks: Chunks,
    /// Index in `chunks` of the next chunk the current attempt yields.
    cursor: usize,
    /// Bytes counted against the cap (each frame counts `MIN_FRAME_COST` at
    /// least). Only kept while not released: nothing is added after that.
    cost: usize,
    /// The [`Replay`] handle is gone: nothing is kept any more.
    released: bool,
    trailers: Option<HeaderMap>,
    ended: bool,
    capped: bool,
    failed: bool,
    /// The attempt allowed to read; earlier ones are superseded.
    attempt: u32,
    /// The reader waiting on the caller's body, woken when it is superseded.
    waiting: Option<Waker>,
}

/// One attempt's view of the shared body.
struct Reader<B> {
    shared: Arc<Shared<B>>,
    attempt: u32,
    /// Bytes this attempt has yielded.
    yielded: u64,
    trailers_sent: bool,
}

impl<B: Body> ReplayBody<B> {
    /// Wraps `body`, keeping up to `max_bytes` of it for one replay
    /// (`0`: no replay).
    pub(crate) fn new(body: B, max_bytes: usize) -> (ReplayBody<B>, Replay<B>) {
        if body.is_end_stream() {
            return (
                ReplayBody { kind: Kind::Empty },
                Replay {
                    kind: ReplayKind::Empty,
                },
            );
        }
        let hint = body.size_hint();
        let never = if max_bytes == 0 {
            Some(NotReplayable::Disabled)
        } else if hint.lower() > max_bytes as u64 {
            Some(NotReplayable::TooLarge)
        } else {
            None
        };
        if let Some(reason) = never {
            return (
                ReplayBody {
                    kind: Kind::Passthrough { body },
                },
                Replay {
                    kind: ReplayKind::Never(reason),
                },
            );
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                body: Box::pin(body),
                chunks: Chunks::new(),
                cursor: 0,
                cost: 0,
                released: false,
                trailers: None,
                ended: false,
                capped: false,
                failed: false,
                attempt: 0,
                waiting: None,
            }),
            hint,
            max_bytes,
        });
        let reader = Reader::new(shared.clone(), 0);
        (
            ReplayBody {
                kind: Kind::Tee { reader },
            },
            Replay {
                kind: ReplayKind::Tee(shared),
            },
        )
    }

    /// A body that passes `body` through, kept for no replay.
    pub(crate) fn passthrough(body: B) -> ReplayBody<B> {
        ReplayBody {
            kind: Kind::Passthrough { body },
        }
    }
}

impl<B> Replay<B> {
    /// Gives up replaying: once the attempt under way has sent a buffered
    /// chunk, it is freed. Later `try_replay` calls fail.
    pub(crate) fn release(&mut self) {
        self.kind = ReplayKind::Never(NotReplayable::Disabled);
    }

    /// A body that yields the request's bytes again, from the start.
    pub(crate) fn try_replay(&self) -> Result<ReplayBody<B>, NotReplayable> {
        match &self.kind {
            ReplayKind::Empty => Ok(ReplayBody { kind: Kind::Empty }),
            ReplayKind::Never(reason) => Err(*reason),
            ReplayKind::Tee(shared) => {
                let mut state = shared.lock();
                if state.failed {
                    return Err(NotReplayable::Failed);
                }
                if state.capped {
                    return Err(NotReplayable::TooLarge);
                }
                state.attempt += 1;
                state.cursor = 0;
                if let Some(waker) = state.waiting.take() {
                    waker.wake();
                }
                let reader = Reader::new(shared.clone(), state.attempt);
                Ok(ReplayBody {
                    kind: Kind::Tee { reader },
                })
            }
        }
    }
}

impl<B> Shared<B> {
    fn lock(&self) -> MutexGuard<'_, State<B>> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<B> Reader<B> {
    fn new(shared: Arc<Shared<B>>, attempt: u32) -> Self {
        Self {
            shared,
            attempt,
            yielded: 0,
            trailers_sent: false,
        }
    }
}

impl<B> Reader<B>
where
    B: Body,
    B::Data: Buf,
    B::Error: Into<BoxError>,
{
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Reader {
            shared,
            attempt,
            yielded,
            trailers_sent,
        } = self;
        let mut state = shared.lock();
        if state.attempt != *attempt {
            return Poll::Ready(Some(Err(
                "request body superseded by a replay of the request".into(),
            )));
        }
        if let Some(chunk) = state.next_buffered() {
            *yielded += chunk.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if state.ended {
            return Poll::Ready(state.trailers_once(trailers_sent));
        }
        if state.failed {
            return Poll::Ready(Some(Err("request body failed earlier".into())));
        }
        let frame = match state.body.as_mut().poll_frame(cx) {
            Poll::Pending => {
                state.waiting = Some(cx.waker().clone());
                return Poll::Pending;
            }
            Poll::Ready(None) => {
                state.ended = true;
                return Poll::Ready(state.trailers_once(trailers_sent));
            }
            Poll::Ready(Some(Err(err))) => {
                state.failed = true;
                return Poll::Ready(Some(Err(err.into())));
            }
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        let frame = match frame.into_data() {
            Ok(mut data) => {
                let chunk = data.copy_to_bytes(data.remaining());
                state.keep(&chunk, shared.max_bytes);
                *yielded += chunk.len() as u64;
                Frame::data(chunk)
            }
            Err(frame) => match frame.into_trailers() {
                Ok(trailers) => {
                    // Trailers end the body: a replay must not wait for more.
                    state.trailers = Some(trailers.clone());
                    state.ended = true;
                    *trailers_sent = true;
                    Frame::trailers(trailers)
                }
                // Neither data nor trailers: not something http-body 1 yields.
                Err(_) => return Poll::Ready(Some(Err("unknown request body frame".into()))),
            },
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        let state = self.shared.lock();
        if state.attempt != self.attempt {
            return false;
        }
        let buffered_left = state.cursor < state.chunks.len();
        let trailers_left = !self.trailers_sent && state.trailers.is_some();
        if state.ended {
            return !buffered_left && !trailers_left;
        }
        !buffered_left && !trailers_left && state.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let hint = &self.shared.hint;
        let mut left = SizeHint::new();
        left.set_lower(hint.lower().saturating_sub(self.yielded));
        if let Some(upper) = hint.upper() {
            left.set_upper(upper.saturating_sub(self.yielded));
        }
        left
    }
}

impl<B> State<B> {
    /// Keeps `chunk` for a replay, or gives up keeping anything once the
    /// body is over the cap.
    fn keep(&mut self, chunk: &Bytes, max_bytes: usize) {
        if self.capped || self.released {
            return;
        }
        let cost = self.cost + frame_cost(chunk);
        if cost > max_bytes.max(MIN_FRAME_COST) {
            self.capped = true;
            self.chunks = Chunks::new();
            self.cursor = 0;
            self.cost = 0;
            return;
        }
        self.cost = cost;
        self.chunks.push(chunk.clone());
        self.cursor = self.chunks.len();
    }

    /// The next buffered chunk for the current attempt; once released, it
    /// is handed over and no longer kept.
    fn next_buffered(&mut self) -> Option<Bytes> {
        let slot = self.chunks.get_mut(self.cursor)?;
        self.cursor += 1;
        if !self.released {
            return Some(slot.clone());
        }
        let chunk = std::mem::take(slot);
        self.forget_if_all_yielded();
        Some(chunk)
    }

    /// The trailers, the first time the attempt reaches the end of the
    /// body; `None` (the end) after that or when there are none.
    fn trailers_once(&self, sent: &mut bool) -> Option<Result<Frame<Bytes>, BoxError>> {
        if std::mem::replace(sent, true) {
            return None;
        }
        let trailers = self.trailers.as_ref()?;
        Some(Ok(Frame::trailers(trailers.clone())))
    }

    /// No replay can happen any more: frees what the current attempt has
    /// yielded and keeps nothing new.
    fn release(&mut self) {
        self.released = true;
        if self.cursor == self.chunks.len() {
            self.forget_if_all_yielded();
            return;
        }
        for chunk in &mut self.chunks[..self.cursor] {
            *chunk = Bytes::new();
        }
    }

    /// Once released and every chunk is yielded, drops the (freed) list
    /// and its storage.
    fn forget_if_all_yielded(&mut self) {
        if self.cursor == self.chunks.len() {
            self.chunks = Chunks::new();
            self.cursor = 0;
        }
    }
}

/// What a buffered chunk counts against the cap.
fn frame_cost(chunk: &Bytes) -> usize {
    chunk.len().max(MIN_FRAME_COST)
}

impl<B> Drop for Replay<B> {
    fn drop(&mut self) {
        if let ReplayKind::Tee(shared) = &self.kind {
            // NOTE: no attempt's body is left (the inner service dropped
            // it): this handle is the last owner and its drop frees it all.
            // Only this handle could clone the `Arc`, so the count cannot
            // rise meanwhile.
            if Arc::strong_count(shared) == 1 {
                return;
            }
            shared.lock().release();
        }
    }
}

impl<B> ReplayBody<B> {
    /// Bytes of the request body held for a replay.
    #[cfg(test)]
    pub(crate) fn buffered_bytes(&self) -> usize {
        match &self.kind {
            Kind::Tee { reader } => reader.shared.lock().chunks.iter().map(Bytes::len).sum(),
            _ => 0,
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
        match self.project().kind.project() {
            KindProj::Empty => Poll::Ready(None),
            KindProj::Passthrough { body } => body.poll_frame(cx).map(|frame| {
                frame.map(|frame| {
                    frame
                        .map(|frame| {
                            frame.map_data(|mut data| data.copy_to_bytes(data.remaining()))
                        })
                        .map_err(Into::into)
                })
            }),
            KindProj::Tee { reader } => reader.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Passthrough { body } => body.is_end_stream(),
            Kind::Tee { reader } => reader.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Passthrough { body } => body.size_hint(),
            Kind::Tee { reader } => reader.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::stream;
    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;

    type Frames = Vec<Result<Frame<Bytes>, std::io::Error>>;

    fn streamed(frames: Frames) -> StreamBody<stream::Iter<<Frames as IntoIterator>::IntoIter>> {
        StreamBody::new(stream::iter(frames))
    }

    fn data(parts: &[&str]) -> Frames {
        parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from(p.to_string()))))
            .collect()
    }

    async fn read<B>(body: B) -> Result<(Vec<u8>, Option<HeaderMap>), BoxError>
    where
        B: Body<Data = Bytes, Error = BoxError>,
    {
        let collected = body.collect().await?;
        let trailers = collected.trailers().cloned();
        Ok((collected.to_bytes().to_vec(), trailers))
    }

    #[tokio::test]
    async fn a_replay_yields_the_same_bytes_and_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "abc".parse().unwrap());
        let mut frames = data(&["hello ", "wide ", "world"]);
        frames.push(Ok(Frame::trailers(trailers.clone())));
        let (first, replay) = ReplayBody::new(streamed(frames), 1024);
        let (bytes, seen) = read(first).await.unwrap();
        assert_eq!(bytes, b"hello wide world");
        assert_eq!(seen.as_ref(), Some(&trailers));

        let again = replay.try_replay().unwrap();
        let (bytes, seen) = read(again).await.unwrap();
        assert_eq!(bytes, b"hello wide world");
        assert_eq!(seen.as_ref(), Some(&trailers));
    }

    #[tokio::test]
    async fn trailers_are_replayed_when_the_first_attempt_stopped_at_them() {
        // hyper stops polling a request body once it has its trailers.
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "abc".parse().unwrap());
        let mut frames = data(&["body"]);
        frames.push(Ok(Frame::trailers(trailers.clone())));
        let (mut first, replay) = ReplayBody::new(streamed(frames), 1024);
        assert!(first.frame().await.unwrap().unwrap().is_data());
        assert!(first.frame().await.unwrap().unwrap().is_trailers());
        assert!(first.is_end_stream());
        let (bytes, seen) = read(replay.try_replay().unwrap()).await.unwrap();
        assert_eq!(bytes, b"body");
        assert_eq!(seen.as_ref(), Some(&trailers));
    }

    #[tokio::test]
    async fn a_superseded_attempt_waiting_for_the_body_is_woken_and_fails() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, std::io::Error>>();
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .unwrap();
        let (mut first, replay) = ReplayBody::new(StreamBody::new(rx), 1024);
        assert_eq!(
            first.frame().await.unwrap().unwrap().into_data().unwrap(),
            "a"
        );
        let waiting = tokio::spawn(async move { first.frame().await.map(|f| f.is_err()) });
        tokio::task::yield_now().await;
        let mut again = replay.try_replay().unwrap();
        assert_eq!(
            tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
                .await
                .expect("the superseded attempt was woken")
                .unwrap(),
            Some(true),
            "and it fails"
        );
        assert_eq!(
            again.frame().await.unwrap().unwrap().into_data().unwrap(),
            "a"
        );
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"b"))))
            .unwrap();
        drop(tx);
        let (bytes, _) = read(again).await.unwrap();
        assert_eq!(bytes, b"b");
    }

    #[tokio::test]
    async fn a_replay_reads_on_where_the_first_attempt_stopped() {
        let (mut first, replay) = ReplayBody::new(streamed(data(&["a", "b", "c"])), 1024);
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "a");
        let again = replay.try_replay().unwrap();
        assert!(
            first.frame().await.unwrap().is_err(),
            "the superseded attempt no longer reads"
        );
        let (bytes, _) = read(again).await.unwrap();
        assert_eq!(bytes, b"abc");
    }

    #[tokio::test]
    async fn a_body_over_the_cap_streams_through_and_is_not_replayable() {
        let (first, replay) = ReplayBody::new(streamed(data(&["0123456789"; 20])), 100);
        let (bytes, _) = read(first).await.unwrap();
        assert_eq!(bytes.len(), 200, "the first attempt still gets everything");
        assert_eq!(replay.try_replay().unwrap_err(), NotReplayable::TooLarge);
    }

    #[tokio::test]
    async fn a_size_hint_over_the_cap_is_not_buffered_at_all() {
        let (first, replay) = ReplayBody::new(Full::new(Bytes::from(vec![7u8; 300])), 100);
        assert!(matches!(first.kind, Kind::Passthrough { .. }));
        assert_eq!(replay.try_replay().unwrap_err(), NotReplayable::TooLarge);
        assert_eq!(first.size_hint().exact(), Some(300));
    }

    #[tokio::test]
    async fn an_exact_size_body_keeps_its_size_hint_on_replay() {
        let (first, replay) = ReplayBody::new(Full::new(Bytes::from_static(b"{\"a\":1}")), 1024);
        assert_eq!(first.size_hint().exact(), Some(7));
        read(first).await.unwrap();
        let again = replay.try_replay().unwrap();
        assert_eq!(again.size_hint().exact(), Some(7));
        assert!(!again.is_end_stream());
        let (bytes, _) = read(again).await.unwrap();
        assert_eq!(bytes, b"{\"a\":1}");
    }

    #[tokio::test]
    async fn an_empty_body_replays_without_a_buffer() {
        let (first, replay) = ReplayBody::new(Full::<Bytes>::default(), 0);
        assert!(first.is_end_stream());
        let again = replay.try_replay().unwrap();
        assert!(again.is_end_stream());
        assert_eq!(again.size_hint().exact(), Some(0));
    }

    #[tokio::test]
    async fn replay_off_passes_the_body_through() {
        let (first, replay) = ReplayBody::new(Full::new(Bytes::from_static(b"x")), 0);
        assert_eq!(read(first).await.unwrap().0, b"x");
        assert_eq!(replay.try_replay().unwrap_err(), NotReplayable::Disabled);
    }

    #[tokio::test]
    async fn a_body_that_fails_is_not_replayable() {
        let mut frames = data(&["part"]);
        frames.push(Err(std::io::Error::other("client went away")));
        let (first, replay) = ReplayBody::new(streamed(frames), 1024);
        assert!(read(first).await.is_err());
        assert_eq!(replay.try_replay().unwrap_err(), NotReplayable::Failed);
    }

    #[tokio::test]
    async fn tiny_frames_count_against_the_cap() {
        let frames: Frames = (0..100)
            .map(|_| Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"x"))))
            .collect();
        let (first, replay) = ReplayBody::new(streamed(frames), 1024);
        read(first).await.unwrap();
        assert_eq!(
            replay.try_replay().unwrap_err(),
            NotReplayable::TooLarge,
            "100 frames of one byte cost more than 1 KiB of bookkeeping"
        );
    }

    type Fed = Result<Frame<Bytes>, std::io::Error>;

    /// A streamed body fed by the test, one chunk at a time.
    fn fed() -> (
        futures::channel::mpsc::UnboundedSender<Fed>,
        StreamBody<futures::channel::mpsc::UnboundedReceiver<Fed>>,
    ) {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        (tx, StreamBody::new(rx))
    }

    fn chunk(byte: u8) -> Result<Frame<Bytes>, std::io::Error> {
        Ok(Frame::data(Bytes::from(vec![byte; 4096])))
    }

    #[tokio::test]
    async fn no_buffer_is_held_once_the_replay_handle_is_gone() {
        let (tx, body) = fed();
        let (mut first, replay) = ReplayBody::new(body, 1024 * 1024);
        for byte in 0..3 {
            tx.unbounded_send(chunk(byte)).unwrap();
            first.frame().await.unwrap().unwrap();
        }
        assert_eq!(
            first.buffered_bytes(),
            3 * 4096,
            "kept while a replay may come"
        );

        // The response said "not expired": the future drops its handle.
        drop(replay);
        assert_eq!(first.buffered_bytes(), 0, "freed at once");
        let mut streamed = 0;
        for byte in 3..200 {
            tx.unbounded_send(chunk(byte)).unwrap();
            let data = first.frame().await.unwrap().unwrap().into_data().unwrap();
            assert_eq!(data[0], byte);
            streamed += data.len();
            assert_eq!(first.buffered_bytes(), 0, "nothing new is kept");
        }
        drop(tx);
        assert!(first.frame().await.is_none());
        assert_eq!(streamed, 197 * 4096, "the body still streams whole");
    }

    #[tokio::test]
    async fn a_retry_frees_each_chunk_once_it_has_sent_it() {
        let (tx, body) = fed();
        let (mut first, replay) = ReplayBody::new(body, 1024 * 1024);
        for byte in 0..4 {
            tx.unbounded_send(chunk(byte)).unwrap();
            first.frame().await.unwrap().unwrap();
        }
        let mut retry = replay.try_replay().unwrap();
        drop(replay);
        assert_eq!(
            retry.buffered_bytes(),
            4 * 4096,
            "the retry has yet to send them"
        );
        for byte in 0..4u8 {
            let data = retry.frame().await.unwrap().unwrap().into_data().unwrap();
            assert_eq!(data[0], byte);
            assert_eq!(retry.buffered_bytes(), (3 - usize::from(byte)) * 4096);
        }
        tx.unbounded_send(chunk(4)).unwrap();
        drop(tx);
        let data = retry.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(data[0], 4);
        assert_eq!(retry.buffered_bytes(), 0);
        assert!(retry.frame().await.is_none());
        assert!(retry.is_end_stream());
    }

    #[tokio::test]
    async fn a_one_frame_body_is_kept_without_a_buffer_of_its_own() {
        let (mut first, replay) = ReplayBody::new(streamed(data(&["one frame"])), 1024);
        first.frame().await.unwrap().unwrap();
        let Kind::Tee { reader } = &first.kind else {
            panic!("a streamed body under the cap is kept");
        };
        assert!(
            !reader.shared.lock().chunks.spilled(),
            "the chunk sits in the shared state itself"
        );
        assert_eq!(first.buffered_bytes(), 9);
        assert!(first.frame().await.is_none());
        let (bytes, _) = read(replay.try_replay().unwrap()).await.unwrap();
        assert_eq!(bytes, b"one frame");
    }

    #[test]
    fn the_body_is_send_and_unpin_for_hyper() {
        fn assert_send_unpin<T: Send + Unpin + 'static>() {}
        assert_send_unpin::<ReplayBody<Full<Bytes>>>();
    }
}
