//! Reading the start of a response body for a detector without holding
//! the head long: at once when the body is already there ([`first_look`]),
//! else for at most the peek deadline ([`peek`]).

use std::any::Any;
use std::cell::Cell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::CONTENT_ENCODING;
use http_body::{Body, Frame};
use http_body_util::BodyExt;

use super::json_end::{JsonEnd, Progress, is_one_document};
use super::response::{Prefixed, ResponseBody, to_bytes};
use crate::detect::{ResponseHead, is_plain_json};

/// A response body after [`peek`].
pub(crate) struct Peeked<B> {
    /// The whole body, to hand to the caller.
    pub(crate) body: ResponseBody<B>,
    /// The body's bytes, when it ended, or formed one complete JSON
    /// document, within the limit and the deadline.
    pub(crate) complete: Option<Bytes>,
}

/// Why a response's body is handed on without being read, whatever the
/// detector asks: a body that never ends (a stream of JSON documents or
/// events) or that could not be matched (compressed).
pub(crate) fn not_peekable(head: &ResponseHead<'_>) -> Option<&'static str> {
    let identity = head
        .headers()
        .get_all(CONTENT_ENCODING)
        .iter()
        .all(|value| {
            value.to_str().is_ok_and(|v| {
                v.split(',').all(|coding| {
                    coding.trim().is_empty() || coding.trim().eq_ignore_ascii_case("identity")
                })
            })
        });
    if !identity {
        return Some("content-encoding");
    }
    let content_type = head.content_type()?;
    if is_plain_json(content_type) {
        return None;
    }
    let content_type = content_type.to_str().ok()?;
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
    peek_after(Box::pin(body), None, limit, deadline).await
}

/// What [`first_look`] found.
pub(crate) enum FirstLook<B> {
    /// The body had ended within the limit: these are all its bytes, and
    /// the body to hand on.
    Whole(Bytes, ResponseBody<B>),
    /// The body cannot be judged (longer than the limit, or it failed): hand
    /// it on unread.
    Unjudged(ResponseBody<B>),
    /// The body had not ended: read further with [`Unfinished::peek`].
    Unfinished(Unfinished<B>),
}

/// A body that [`first_look`] started to read (and whose length it found
/// within the limit).
pub(crate) struct Unfinished<B> {
    body: Pin<Box<B>>,
    read: Read,
}

/// What [`first_look`] read and knew before reading.
struct Read {
    first: Option<Frame<Bytes>>,
    known_length: bool,
}

/// Reads what `body` has ready now, without waiting: a small response
/// usually arrives with its head, so most bodies are judged here, with no
/// timer and no task of their own.
pub(crate) fn first_look<B>(body: B, limit: usize, cx: &mut Context<'_>) -> FirstLook<B>
where
    B: Body,
    B::Data: Buf,
    B::Error: Send + Sync + 'static,
{
    if body.is_end_stream() {
        return FirstLook::Whole(Bytes::new(), ResponseBody::whole(Bytes::new()));
    }
    let hint = body.size_hint();
    if hint.lower() > limit as u64 {
        return FirstLook::Unjudged(ResponseBody::new(body));
    }
    let known_length = hint.exact().is_some();
    // NOTE: as in `peek`: without a timer only a body of known length is
    // read, whether or not its bytes happen to be there already, so the
    // verdict does not depend on when they arrive.
    if !known_length && deadline_timer(Duration::ZERO).is_none() {
        return FirstLook::Unjudged(ResponseBody::new(body));
    }
    let mut body = Box::pin(body);
    let first = match body.as_mut().poll_frame(cx) {
        Poll::Ready(None) => {
            return FirstLook::Whole(Bytes::new(), ResponseBody::whole(Bytes::new()));
        }
        Poll::Ready(Some(Ok(frame))) => frame.map_data(to_bytes),
        Poll::Ready(Some(Err(err))) => {
            return FirstLook::Unjudged(ResponseBody::prefixed(Prefixed {
                buffered: VecDeque::new(),
                buffered_len: 0,
                error: Some(Box::new(err)),
                inner_done: false,
                body,
            }));
        }
        Poll::Pending => {
            let read = Read {
                first: None,
                known_length,
            };
            return FirstLook::Unfinished(Unfinished { body, read });
        }
    };
    match first.data_ref() {
        Some(data) if data.len() <= limit && body.is_end_stream() => {
            let data = data.clone();
            FirstLook::Whole(data.clone(), ResponseBody::whole(data))
        }
        _ => FirstLook::Unfinished(Unfinished {
            body,
            read: Read {
                first: Some(first),
                known_length,
            },
        }),
    }
}

impl<B> Unfinished<B>
where
    B: Body,
    B::Data: Buf,
    B::Error: Send + Sync + 'static,
{
    /// Reads on, as [`peek`] does, after what [`first_look`] read.
    pub(crate) async fn peek(self, limit: usize, deadline: Duration) -> Peeked<B> {
        peek_after(self.body, Some(self.read), limit, deadline).await
    }
}

/// Reads `inner` for a detector; `read` is what [`first_look`] read and
/// knew of it (its length was already checked against the limit then).
async fn peek_after<B>(
    mut inner: Pin<Box<B>>,
    read: Option<Read>,
    limit: usize,
    deadline: Duration,
) -> Peeked<B>
where
    B: Body,
    B::Data: Buf,
    B::Error: Send + Sync + 'static,
{
    let mut buffered = VecDeque::new();
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total: u64 = 0;
    let mut error = None;
    let mut inner_done = inner.is_end_stream();
    let mut json_end = JsonEnd::default();
    let mut json_closed = false;
    let mut over_limit = false;
    // NOTE: the size hint is read before any frame: after one, a body's
    // hint may or may not count what was already read.
    let (too_long, known_length) = match &read {
        Some(read) => (false, read.known_length),
        None => {
            let hint = inner.size_hint();
            (hint.lower() > limit as u64, hint.exact().is_some())
        }
    };
    if let Some(frame) = read.and_then(|read| read.first) {
        if let Some(data) = frame.data_ref() {
            total += data.len() as u64;
            chunks.push(data.clone());
            json_closed = json_end.feed(data) == Progress::Closed;
        }
        buffered.push_back(frame);
        over_limit = total > limit as u64;
        inner_done = inner.is_end_stream();
    }
    let mut complete = !too_long && !over_limit;
    // NOTE: no timer is set for a body that needs no more reading (it
    // ended, is too long, or failed).
    let needs_reading = !inner_done && complete;
    let timer = if needs_reading {
        deadline_timer(deadline)
    } else {
        None
    };
    let no_timer = timer.is_none();
    let sleep = async move {
        match timer {
            Some(sleep) => sleep.await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(sleep);

    if !needs_reading {
        // Nothing more to read.
    } else if no_timer && !known_length {
        tracing::debug!(
            "no tokio timer for the peek deadline; response body of unknown length passed on undetected"
        );
        complete = false;
    } else if json_closed {
        // The first frame already held one whole JSON document.
    } else {
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
        body: ResponseBody::prefixed(Prefixed {
            buffered,
            buffered_len: total,
            error,
            inner_done,
            body: inner,
        }),
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

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::HeaderMap;
    use http_body_util::{Full, StreamBody};

    use std::fmt;

    use http_body::SizeHint;

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
            peeked.body.buffered_len() <= 35 + 10,
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

    fn look<B>(body: B, limit: usize) -> FirstLook<B>
    where
        B: Body,
        B::Data: Buf,
        B::Error: Send + Sync + 'static,
    {
        let waker = futures::task::noop_waker();
        first_look(body, limit, &mut Context::from_waker(&waker))
    }

    #[tokio::test]
    async fn a_body_that_arrived_whole_is_judged_at_first_look() {
        let FirstLook::Whole(bytes, body) =
            look(Full::new(Bytes::from_static(b"{\"code\":0}")), 64)
        else {
            panic!("a whole body");
        };
        assert_eq!(&bytes[..], b"{\"code\":0}");
        assert_eq!(body.size_hint().exact(), Some(10));
        assert!(!body.is_end_stream());
        let (read, _, _) = read_all(Box::pin(body)).await;
        assert_eq!(read, b"{\"code\":0}");

        let FirstLook::Whole(bytes, body) = look(Full::new(Bytes::new()), 64) else {
            panic!("an empty body is whole");
        };
        assert!(bytes.is_empty() && body.is_end_stream());
    }

    #[tokio::test]
    async fn a_body_still_arriving_is_read_on_with_what_was_read_first() {
        let FirstLook::Unfinished(unfinished) = look(stream(chunks(&["{\"co", "de\":1}"])), 64)
        else {
            panic!("not whole after one frame");
        };
        let peeked = unfinished.peek(64, WAIT).await;
        assert_eq!(peeked.complete.as_deref(), Some(&b"{\"code\":1}"[..]));
        let (read, _, _) = read_all(Box::pin(peeked.body)).await;
        assert_eq!(read, b"{\"code\":1}");

        // Past the limit after the first frame: handed on whole, unjudged.
        let FirstLook::Unfinished(unfinished) = look(stream(chunks(&["123456", "78"])), 4) else {
            panic!("not whole after one frame");
        };
        let peeked = unfinished.peek(4, WAIT).await;
        assert!(peeked.complete.is_none());
        let (read, _, _) = read_all(Box::pin(peeked.body)).await;
        assert_eq!(read, b"12345678");
    }

    #[tokio::test]
    async fn a_body_that_fails_at_once_is_handed_on_with_its_error() {
        let failing = stream(vec![Err(std::io::Error::other("reset"))]);
        let FirstLook::Unjudged(body) = look(failing, 64) else {
            panic!("a failed body is not judged");
        };
        let (read, _, err) = read_all(Box::pin(body)).await;
        assert!(read.is_empty());
        assert_eq!(err.as_deref(), Some("reset"));
    }

    #[tokio::test]
    async fn a_known_long_body_is_not_read() {
        let peeked = peek(Full::new(Bytes::from(vec![b'x'; 100])), 10, WAIT).await;
        assert!(peeked.complete.is_none());
        assert_eq!(peeked.body.buffered_len(), 0);
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
                assert_eq!(unknown.body.buffered_len(), 0);
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
            let headers = headers(&pairs);
            let head = ResponseHead::new(http::StatusCode::OK, http::Version::HTTP_11, &headers);
            assert_eq!(not_peekable(&head), want, "{pairs:?}");
        }
    }
}
