//! [`ResponseBody`]: the response body handed back to the caller, with the
//! prefix a detector peeked at put back in front.

use std::any::Any;
use std::cell::Cell;
use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;

use super::json_end::{JsonEnd, Progress, is_one_document};

pin_project! {
    #[project = InnerProj]
    enum Inner<B> {
        // NOTE: the hot path: the upstream's body, polled in place.
        Plain { #[pin] body: B },
        // A body that was peeked at: boxed so it could be polled before
        // being handed over (only on the slow path).
        Peeked { body: Pin<Box<B>> },
    }
}

pin_project! {
    /// The body of a response from [`AuthRefresh`](crate::AuthRefresh).
    ///
    /// Byte for byte the upstream's body: when a detector had to look at
    /// the body, the frames it read are yielded first, then the rest of the
    /// upstream's body (or the error it ended with).
    pub struct ResponseBody<B> {
        buffered: VecDeque<Frame<Bytes>>,
        buffered_len: u64,
        // NOTE: the upstream's error met while peeking, handed to the caller
        // after the buffered frames. Boxed as `Any` so that the type needs
        // no `B: Body` bound; it is always a `B::Error`.
        error: Option<Box<dyn Any + Send + Sync>>,
        inner_done: bool,
        #[pin]
        inner: Inner<B>,
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("buffered_bytes", &self.buffered_len)
            .field("inner_done", &self.inner_done)
            .finish_non_exhaustive()
    }
}

impl<B> ResponseBody<B> {
    /// The upstream's body, passed through.
    pub(crate) fn new(body: B) -> Self {
        Self {
            buffered: VecDeque::new(),
            buffered_len: 0,
            error: None,
            inner_done: false,
            inner: Inner::Plain { body },
        }
    }
}

/// A response body after [`peek`].
pub(crate) struct Peeked<B> {
    /// The whole body, to hand to the caller.
    pub(crate) body: ResponseBody<B>,
    /// The body's bytes, when it ended, or formed one complete JSON
    /// document, within the limit and the deadline.
    pub(crate) complete: Option<Bytes>,
}

fn to_bytes<D: Buf>(mut data: D) -> Bytes {
    data.copy_to_bytes(data.remaining())
}

/// Why a response's body is handed on without being read, whatever the
/// detector asks: a body that never ends (a stream of JSON documents or
/// events) or that could not be matched (compressed).
pub(crate) fn not_peekable(headers: &HeaderMap) -> Option<&'static str> {
    let identity = headers.get_all(CONTENT_ENCODING).iter().all(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',').all(|coding| {
                coding.trim().is_empty() || coding.trim().eq_ignore_ascii_case("identity")
            })
        })
    });
    if !identity {
        return Some("content-encoding");
    }
    let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok())?;
    let mut parts = content_type.split(';');
    let essence = parts.next().unwrap_or("").trim();
    let streaming_type = STREAMING_TYPES
        .iter()
        .any(|t| essence.eq_ignore_ascii_case(t));
    let stream_parameter = parts.any(|param| {
        param
            .split('=')
            .next()
            .is_some_and(|name| name.trim().eq_ignore_ascii_case("stream"))
    });
    (streaming_type || stream_parameter).then_some("streaming content-type")
}

/// Media types whose bodies are streams of documents or events.
const STREAMING_TYPES: [&str; 9] = [
    "text/event-stream",
    "application/x-ndjson",
    "application/ndjson",
    "application/jsonl",
    "application/jsonlines",
    "application/x-jsonlines",
    "application/x-json-stream",
    "application/json-seq",
    "application/stream+json",
];

/// Reads the start of `body` for a detector and gives back the body to hand
/// on plus, when it could be judged, its bytes.
///
/// The head must never wait long for a detector, so the body is read until
/// it ends, its bytes so far form one complete JSON object or array, it
/// passes `limit` (at most one frame past it is held) or `deadline` passes,
/// whichever comes first; a body whose known length (`Content-Length`) is
/// over `limit` is not read at all. The bytes are shown when the body ended
/// or formed a complete JSON document in time; after the deadline the
/// frames read so far are handed on first and the body is not judged.
///
/// Without a tokio timer (a runtime built without `enable_time`), only a
/// body of known length within `limit` is read (it needs no deadline, but
/// a stalled one holds the head); any other body is passed on unread.
pub(crate) async fn peek<B>(body: B, limit: usize, deadline: Duration) -> Peeked<B>
where
    B: Body,
    B::Data: Buf,
    B::Error: Send + Sync + 'static,
{
    let mut inner = Box::pin(body);
    let mut buffered = VecDeque::new();
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total: u64 = 0;
    let mut error = None;
    let mut inner_done = inner.is_end_stream();
    let hint = inner.size_hint();
    let too_long = hint.lower() > limit as u64;
    let known_length = hint.exact().is_some();
    let timer = deadline_timer(deadline);
    let no_timer = timer.is_none();
    let sleep = async move {
        match timer {
            Some(sleep) => sleep.await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(sleep);
    let mut json_end = JsonEnd::default();
    let mut json_closed = false;

    let mut complete = !too_long;
    if !inner_done && !too_long && no_timer && !known_length {
        tracing::debug!(
            "no tokio timer for the peek deadline; response body of unknown length passed on undetected"
        );
        complete = false;
    } else if !inner_done && !too_long {
        loop {
            let frame = tokio::select! {
                biased;
                frame = inner.frame() => frame,
                () = &mut sleep => {
                    tracing::debug!(
                        deadline_ms = deadline.as_millis() as u64,
                        peeked_bytes = total,
                        "response body not complete within the peek deadline; passed on undetected"
                    );
                    complete = false;
                    break;
                }
            };
            match frame {
                None => {
                    inner_done = true;
                    break;
                }
                Some(Ok(frame)) => {
                    let frame = frame.map_data(to_bytes);
                    let mut closed = false;
                    if let Some(data) = frame.data_ref() {
                        total += data.len() as u64;
                        chunks.push(data.clone());
                        closed = json_end.feed(data) == Progress::Closed;
                    }
                    buffered.push_back(frame);
                    if total > limit as u64 {
                        complete = false;
                        break;
                    }
                    if inner.is_end_stream() {
                        inner_done = true;
                        break;
                    }
                    // NOTE: a JSON error may arrive whole while the transfer
                    // goes on (the chunked terminator comes later): judge it
                    // now and pass the rest on.
                    if closed {
                        json_closed = true;
                        break;
                    }
                }
                Some(Err(err)) => {
                    error = Some(Box::new(err) as Box<dyn Any + Send + Sync>);
                    complete = false;
                    break;
                }
            }
        }
    }

    let complete = if complete && inner_done {
        Some(concat(chunks))
    } else if complete && json_closed {
        Some(concat(chunks)).filter(|bytes| is_one_document(bytes))
    } else {
        None
    };
    Peeked {
        body: ResponseBody {
            buffered,
            buffered_len: total,
            error,
            inner_done,
            inner: Inner::Peeked { body: inner },
        },
        complete,
    }
}

thread_local! {
    /// The last runtime found without a timer on this thread: asked once.
    static NO_TIMER: Cell<Option<tokio::runtime::Id>> = const { Cell::new(None) };
}

/// A sleep of `deadline` on the current tokio runtime's timer, or `None`
/// when there is no runtime or it has no timer.
///
/// NOTE: tokio offers no way to ask whether the time driver is enabled;
/// creating a `Sleep` without it panics. That panic is caught here (once
/// per runtime and thread: the answer is remembered), so a runtime built
/// with `enable_io()` only never panics in the layer. With `panic = "abort"`
/// the process would abort instead: enable the timer there.
fn deadline_timer(deadline: Duration) -> Option<tokio::time::Sleep> {
    let runtime = tokio::runtime::Handle::try_current().ok()?.id();
    if NO_TIMER.with(Cell::get) == Some(runtime) {
        return None;
    }
    match std::panic::catch_unwind(|| tokio::time::sleep(deadline)) {
        Ok(sleep) => Some(sleep),
        Err(_) => {
            NO_TIMER.with(|cell| cell.set(Some(runtime)));
            None
        }
    }
}

fn concat(mut chunks: Vec<Bytes>) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
            for chunk in chunks {
                all.extend_from_slice(&chunk);
            }
            all.freeze()
        }
    }
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
        let this = self.project();
        if let Some(frame) = this.buffered.pop_front() {
            if let Some(data) = frame.data_ref() {
                *this.buffered_len -= data.len() as u64;
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(err) = this.error.take() {
            *this.inner_done = true;
            return match err.downcast::<B::Error>() {
                Ok(err) => Poll::Ready(Some(Err(*err))),
                Err(_) => Poll::Ready(None),
            };
        }
        if *this.inner_done {
            return Poll::Ready(None);
        }
        let polled = match this.inner.project() {
            InnerProj::Plain { body } => body.poll_frame(cx),
            InnerProj::Peeked { body } => body.as_mut().poll_frame(cx),
        };
        match polled {
            Poll::Ready(None) => {
                *this.inner_done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => Poll::Ready(Some(frame.map(|f| f.map_data(to_bytes)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.buffered.is_empty()
            && self.error.is_none()
            && (self.inner_done
                || match &self.inner {
                    Inner::Plain { body } => body.is_end_stream(),
                    Inner::Peeked { body } => body.is_end_stream(),
                })
    }

    fn size_hint(&self) -> SizeHint {
        if self.inner_done {
            return SizeHint::with_exact(self.buffered_len);
        }
        let inner = match &self.inner {
            Inner::Plain { body } => body.size_hint(),
            Inner::Peeked { body } => body.size_hint(),
        };
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(self.buffered_len));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(self.buffered_len));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::HeaderMap;
    use http_body_util::{Full, StreamBody};

    use super::*;

    type Frames = Vec<Result<Frame<Bytes>, std::io::Error>>;

    /// A deadline no test reaches unless its body stalls.
    const WAIT: Duration = Duration::from_secs(3600);

    fn stream(
        frames: Frames,
    ) -> StreamBody<futures::stream::Iter<<Frames as IntoIterator>::IntoIter>> {
        StreamBody::new(futures::stream::iter(frames))
    }

    fn chunks(parts: &[&str]) -> Frames {
        parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from(p.to_string()))))
            .collect()
    }

    async fn read_all<B>(body: B) -> (Vec<u8>, Option<HeaderMap>, Option<String>)
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: fmt::Display,
    {
        let mut body = body;
        let mut bytes = Vec::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => bytes.extend_from_slice(&data),
                    Err(frame) => trailers = frame.into_trailers().ok(),
                },
                Err(err) => return (bytes, trailers, Some(err.to_string())),
            }
        }
        (bytes, trailers, None)
    }

    #[tokio::test]
    async fn a_short_body_is_complete_and_handed_back_whole() {
        let peeked = peek(Full::new(Bytes::from_static(b"{\"code\":40003}")), 64, WAIT).await;
        assert_eq!(peeked.complete.as_deref(), Some(&b"{\"code\":40003}"[..]));
        assert_eq!(peeked.body.size_hint().exact(), Some(14));
        let body: ResponseBody<Full<Bytes>> = peeked.body;
        let (bytes, _, _) = read_all(Box::pin(body)).await;
        assert_eq!(bytes, b"{\"code\":40003}");
    }

    #[tokio::test]
    async fn a_long_streamed_body_is_not_complete_and_arrives_byte_for_byte() {
        let parts: Vec<String> = (0..100).map(|i| format!("chunk-{i:03};")).collect();
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        let peeked = peek(stream(chunks(&refs)), 35, WAIT).await;
        assert!(peeked.complete.is_none());
        assert!(
            peeked.body.buffered_len <= 35 + 10,
            "at most one frame past the limit"
        );
        let (bytes, _, err) = read_all(Box::pin(peeked.body)).await;
        assert_eq!(err, None);
        assert_eq!(bytes, parts.concat().as_bytes());
    }

    #[tokio::test]
    async fn the_limit_is_inclusive() {
        let peeked = peek(stream(chunks(&["12345", "67890"])), 10, WAIT).await;
        assert_eq!(peeked.complete.as_deref(), Some(&b"1234567890"[..]));
        let peeked = peek(stream(chunks(&["12345", "678901"])), 10, WAIT).await;
        assert!(peeked.complete.is_none());
        let (bytes, _, _) = read_all(Box::pin(peeked.body)).await;
        assert_eq!(bytes, b"12345678901");
    }

    #[tokio::test]
    async fn a_known_long_body_is_not_read() {
        let peeked = peek(Full::new(Bytes::from(vec![b'x'; 100])), 10, WAIT).await;
        assert!(peeked.complete.is_none());
        assert_eq!(peeked.body.buffered_len, 0);
        let (bytes, _, _) = read_all(Box::pin(peeked.body)).await;
        assert_eq!(bytes.len(), 100);
    }

    #[tokio::test]
    async fn an_error_reaches_the_caller_after_the_prefix() {
        let mut frames = chunks(&["abc", "def"]);
        frames.push(Err(std::io::Error::other("connection reset")));
        frames.push(Ok(Frame::data(Bytes::from_static(b"never"))));
        let peeked = peek(stream(frames), 1024, WAIT).await;
        assert!(peeked.complete.is_none());
        let (bytes, _, err) = read_all(Box::pin(peeked.body)).await;
        assert_eq!(bytes, b"abcdef");
        assert_eq!(err.as_deref(), Some("connection reset"));
    }

    #[tokio::test]
    async fn trailers_are_kept() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let mut frames = chunks(&["body"]);
        frames.push(Ok(Frame::trailers(trailers.clone())));
        let peeked = peek(stream(frames), 1024, WAIT).await;
        assert_eq!(peeked.complete.as_deref(), Some(&b"body"[..]));
        let (bytes, got, _) = read_all(Box::pin(peeked.body)).await;
        assert_eq!(bytes, b"body");
        assert_eq!(got, Some(trailers));
    }

    #[tokio::test]
    async fn an_empty_body_is_complete() {
        let peeked = peek(http_body_util::Empty::<Bytes>::new(), 10, WAIT).await;
        assert_eq!(peeked.complete.as_deref(), Some(&b""[..]));
        assert!(peeked.body.is_end_stream());
        let _: Result<(), Infallible> = Ok(());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_is_handed_on_after_the_deadline() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, std::io::Error>>();
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"{\"type\":\"ADDED\","))))
            .unwrap();
        let started = tokio::time::Instant::now();
        let peeked = peek(StreamBody::new(rx), 1024, Duration::from_millis(5)).await;
        assert_eq!(started.elapsed(), Duration::from_millis(5));
        assert!(peeked.complete.is_none(), "not judged");
        let mut body = Box::pin(peeked.body);
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "{\"type\":\"ADDED\",");
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"next"))))
            .unwrap();
        drop(tx);
        let (rest, _, _) = read_all(body).await;
        assert_eq!(rest, b"next");
    }

    /// A body that says it has `len` bytes, yields `first`, then stalls.
    struct Stalled {
        first: Option<Bytes>,
        len: u64,
    }

    impl Body for Stalled {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            match self.first.take() {
                Some(first) => Poll::Ready(Some(Ok(Frame::data(first)))),
                None => Poll::Pending,
            }
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.len)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_of_known_length_is_handed_on_after_the_deadline() {
        let body = Stalled {
            first: Some(Bytes::from_static(b"{\"code\":")),
            len: 14,
        };
        let started = tokio::time::Instant::now();
        let peeked = peek(body, 64, Duration::from_millis(5)).await;
        assert_eq!(started.elapsed(), Duration::from_millis(5));
        assert!(peeked.complete.is_none(), "not judged");
        let mut body = Box::pin(peeked.body);
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "{\"code\":");
    }

    #[tokio::test(start_paused = true)]
    async fn a_complete_json_document_is_judged_before_the_body_ends() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, std::io::Error>>();
        for part in ["{\"code\":40003,", "\"msg\":\"}\"}\r\n"] {
            tx.unbounded_send(Ok(Frame::data(Bytes::from_static(part.as_bytes()))))
                .unwrap();
        }
        let started = tokio::time::Instant::now();
        let peeked = peek(StreamBody::new(rx), 1024, Duration::from_secs(60)).await;
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "not held to the deadline"
        );
        assert_eq!(
            peeked.complete.as_deref(),
            Some(&b"{\"code\":40003,\"msg\":\"}\"}\r\n"[..])
        );
        drop(tx);
        let (bytes, _, _) = read_all(Box::pin(peeked.body)).await;
        assert_eq!(bytes, b"{\"code\":40003,\"msg\":\"}\"}\r\n");
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_bracket_that_is_not_json_is_not_judged_early() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, std::io::Error>>();
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"{code:1}"))))
            .unwrap();
        let peeked = peek(StreamBody::new(rx), 1024, Duration::from_secs(60)).await;
        assert!(peeked.complete.is_none());
        drop(tx);
        let (bytes, _, _) = read_all(Box::pin(peeked.body)).await;
        assert_eq!(bytes, b"{code:1}");
    }

    #[test]
    fn without_a_timer_only_a_known_length_is_read_and_nothing_panics() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        runtime.block_on(async {
            let known = peek(Full::new(Bytes::from_static(b"{}")), 64, WAIT).await;
            assert_eq!(known.complete.as_deref(), Some(&b"{}"[..]));
            for _ in 0..2 {
                let (tx, rx) =
                    futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, std::io::Error>>();
                tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"{\"code\""))))
                    .unwrap();
                let unknown = peek(StreamBody::new(rx), 64, WAIT).await;
                assert!(unknown.complete.is_none(), "passed on unread");
                assert_eq!(unknown.body.buffered_len, 0);
                drop(tx);
                let (bytes, _, _) = read_all(Box::pin(unknown.body)).await;
                assert_eq!(bytes, b"{\"code\"");
            }
        });
    }

    #[test]
    fn streams_and_compressed_bodies_are_not_peekable() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.append(*name, value.parse().unwrap());
            }
            headers
        };
        for (pairs, want) in [
            (vec![("content-type", "application/json")], None),
            (
                vec![
                    ("content-type", "application/json"),
                    ("content-encoding", "identity"),
                ],
                None,
            ),
            (vec![], None),
            (
                vec![("content-type", "application/json;stream=watch")],
                Some("streaming content-type"),
            ),
            (
                vec![("content-type", "application/x-ndjson")],
                Some("streaming content-type"),
            ),
            (
                vec![("content-type", "application/json-seq")],
                Some("streaming content-type"),
            ),
            (
                vec![("content-type", "application/ndjson")],
                Some("streaming content-type"),
            ),
            (
                vec![("content-type", "application/x-json-stream")],
                Some("streaming content-type"),
            ),
            (
                vec![("content-type", "application/jsonlines")],
                Some("streaming content-type"),
            ),
            (
                vec![("content-type", "Application/X-JsonLines; charset=utf-8")],
                Some("streaming content-type"),
            ),
            (
                vec![("content-type", "Text/Event-Stream; charset=utf-8")],
                Some("streaming content-type"),
            ),
            (
                vec![
                    ("content-type", "application/json"),
                    ("content-encoding", "gzip"),
                ],
                Some("content-encoding"),
            ),
            (
                vec![
                    ("content-type", "application/json"),
                    ("content-encoding", "identity, br"),
                ],
                Some("content-encoding"),
            ),
        ] {
            assert_eq!(not_peekable(&headers(&pairs)), want, "{pairs:?}");
        }
    }
}
