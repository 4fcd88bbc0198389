//! Request and response bodies through the whole layer: `AuthRefreshLayer`
//! over a hyper-util client, against a real upstream on 127.0.0.1 that
//! records the exact bytes and trailers of every attempt, rejects `tok-1`
//! with a 401 (or a JSON business code) and accepts `tok-2`.
//!
//! Request bodies: empty, exact size (`Full`), unknown size (`StreamBody`),
//! streamed over the replay cap, failing half-way, answered before the body
//! was finished (the upstream answers after reading part of the body or none
//! of it), and HTTP/1.1 chunked trailers. For each, the upstream receives on
//! the first attempt and on the retry exactly what the caller sent.
//!
//! Response bodies: the caller receives byte for byte what the upstream sent,
//! for a large body, for a JSON body the detector peeked at, and for a JSON
//! body longer than the peek limit (not read, so not taken for an expired
//! token even though it starts with an expired-token code).

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body as AxumBody;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use bytes::Bytes;
use common::Issuer;
use futures::{Stream, StreamExt, stream};
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use secrecy::ExposeSecret;
use tokio::sync::Notify;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::{
    AuthRefresh, AuthRefreshLayer, BoxError, ExpiryDetectorExt, JsonBodyRule, ReplayBody,
    RetrySkipped, SkipReason, TokenHandle, Unauthorized,
};

/// Every test is bounded: a hang is a failure, not a stuck CI job.
const LIMIT: Duration = Duration::from_secs(20);

/// What the upstream saw and answered on one attempt.
#[derive(Debug, Clone)]
struct Attempt {
    path: String,
    authorization: Option<String>,
    headers: HeaderMap,
    /// The request body bytes read before answering.
    body: Bytes,
    trailers: Option<HeaderMap>,
    body_error: Option<String>,
    /// The response body the upstream sent.
    sent: Bytes,
}

/// How the rest of an early-answered request body ended.
#[derive(Debug, Clone)]
struct Drained {
    attempt: usize,
    bytes: Bytes,
    error: Option<String>,
}

#[derive(Default)]
struct Log {
    attempts: Mutex<Vec<Attempt>>,
    drained: Mutex<Vec<Drained>>,
    drained_changed: Notify,
    /// Fired by `/early` once the retry's first half has arrived.
    second_half: Arc<Notify>,
}

/// The recording upstream.
#[derive(Clone)]
struct Recorder {
    addr: std::net::SocketAddr,
    log: Arc<Log>,
}

impl Recorder {
    async fn start() -> Self {
        let log = Arc::new(Log::default());
        let app = Router::new()
            .route("/{*path}", any(handle))
            .with_state(log.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, log }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn attempts(&self) -> Vec<Attempt> {
        self.log.attempts.lock().unwrap().clone()
    }

    /// Waits until the rest of `attempt`'s body has been read to its end or
    /// its error.
    async fn drained(&self, attempt: usize) -> Drained {
        loop {
            let changed = self.log.drained_changed.notified();
            if let Some(d) = self
                .log
                .drained
                .lock()
                .unwrap()
                .iter()
                .find(|d| d.attempt == attempt)
            {
                return d.clone();
            }
            changed.await;
        }
    }
}

/// Reads frames until at least `want` bytes (all of them for `None`), the
/// end, or an error.
async fn read_body(
    body: &mut AxumBody,
    want: Option<usize>,
) -> (Vec<u8>, Option<HeaderMap>, Option<String>) {
    let mut bytes = Vec::new();
    let mut trailers = None;
    while want.is_none_or(|want| bytes.len() < want) {
        match body.frame().await {
            None => break,
            Some(Err(err)) => return (bytes, trailers, Some(err.to_string())),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => bytes.extend_from_slice(&data),
                Err(frame) => trailers = frame.into_trailers().ok(),
            },
        }
    }
    (bytes, trailers, None)
}

/// A deterministic body of `len` bytes that is not one repeated byte.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 251) as u8).collect()
}

fn chunked(bytes: &[u8], size: usize) -> Vec<Bytes> {
    bytes.chunks(size).map(Bytes::copy_from_slice).collect()
}

/// A streamed response body (no content-length).
fn streamed_response(chunks: Vec<Bytes>) -> AxumBody {
    AxumBody::from_stream(stream::iter(chunks.into_iter().map(Ok::<_, Infallible>)))
}

fn json_expired() -> &'static str {
    r#"{"code":40003,"msg":"token过期","data":null}"#
}

async fn handle(State(log): State<Arc<Log>>, request: Request) -> Response {
    let (parts, mut body) = request.into_parts();
    let authorization = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let accepted = authorization
        .as_deref()
        .is_some_and(|a| a.starts_with("Bearer ") && a != "Bearer tok-1");
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or("").to_owned();
    let attempt = {
        let attempts = log.attempts.lock().unwrap();
        attempts.iter().filter(|a| a.path == path).count() + 1
    };

    // `/early?read=N`: a rejected token is answered after N body bytes (0:
    // none), the rest of the body is read in the background (or, with
    // `&close`, dropped, so that the server closes the connection); an
    // accepted token releases the caller's second half once its first N
    // bytes came.
    let close = query.ends_with("&close");
    let early_read = query
        .strip_prefix("read=")
        .map(|n| n.trim_end_matches("&close").parse::<usize>().unwrap());
    let read_before_answer = early_read.filter(|_| path == "/early" && !accepted);
    let (bytes, trailers, body_error) = match read_before_answer {
        Some(0) => (Vec::new(), None, None),
        Some(n) => read_body(&mut body, Some(n)).await,
        None if path == "/early" => {
            let half = early_read.unwrap();
            let (mut head, _, err) = read_body(&mut body, Some(half)).await;
            assert!(err.is_none(), "{err:?}");
            log.second_half.notify_one();
            let (rest, trailers, err) = read_body(&mut body, None).await;
            head.extend_from_slice(&rest);
            (head, trailers, err)
        }
        None => read_body(&mut body, None).await,
    };
    if read_before_answer.is_some() && close {
        drop(body);
    } else if read_before_answer.is_some() {
        let log = log.clone();
        tokio::spawn(async move {
            let (bytes, _, error) = read_body(&mut body, None).await;
            log.drained.lock().unwrap().push(Drained {
                attempt,
                bytes: bytes.into(),
                error,
            });
            log.drained_changed.notify_waiters();
        });
    }

    let mut response = if body_error.is_some() {
        (StatusCode::BAD_REQUEST, "request body failed").into_response()
    } else if path == "/json-big" {
        // Starts like an expired-token envelope, but is longer than the peek limit.
        let text = format!(
            r#"{{"code":40003,"msg":"token过期","data":"{}"}}"#,
            "x".repeat(100_000)
        );
        let body = if query == "exact" {
            AxumBody::from(text)
        } else {
            streamed_response(chunked(text.as_bytes(), 1000))
        };
        ([("content-type", "application/json")], body).into_response()
    } else if !accepted && path == "/json" {
        (
            [("content-type", "application/json;charset=utf-8")],
            json_expired(),
        )
            .into_response()
    } else if !accepted {
        (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", r#"Bearer error="invalid_token""#)],
            "expired",
        )
            .into_response()
    } else if path == "/large" {
        streamed_response(chunked(&pattern(2 * 1024 * 1024), 16 * 1024)).into_response()
    } else if path == "/json" {
        let text = format!(r#"{{"code":0,"msg":"ok","data":"{}"}}"#, "y".repeat(20_000));
        (
            [("content-type", "application/json")],
            streamed_response(chunked(text.as_bytes(), 1024)),
        )
            .into_response()
    } else {
        let mut answer = b"ok ".to_vec();
        answer.extend_from_slice(&bytes);
        answer.into_response()
    };

    // Record what is sent: buffer the answer (it is at most a few MiB) and
    // send it in the same chunks.
    let (head, out) = std::mem::take(&mut response).into_parts();
    let exact = out.size_hint().exact();
    let frames: Vec<Bytes> = out
        .into_data_stream()
        .map(|chunk| chunk.unwrap())
        .collect()
        .await;
    let sent = frames.concat();
    log.attempts.lock().unwrap().push(Attempt {
        path,
        authorization,
        headers: parts.headers,
        body: bytes.into(),
        trailers,
        body_error,
        sent: sent.clone().into(),
    });
    let out = match exact {
        Some(_) => AxumBody::from(sent),
        None => streamed_response(frames),
    };
    Response::from_parts(head, out)
}

/// A handle whose current token is `tok-1` (rejected by the upstream) and
/// whose next one is `tok-2` (accepted).
async fn handle_with_tok1() -> (TokenHandle, Issuer) {
    let issuer = Issuer::detached();
    let handle = TokenHandle::builder(issuer.source())
        .min_token_age(Duration::ZERO)
        .build();
    handle.refresh_now().await.unwrap();
    (handle, issuer)
}

type HttpClient<B> = Client<HttpConnector, ReplayBody<B>>;

fn client<B>() -> HttpClient<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    Client::builder(TokioExecutor::new()).build_http()
}

fn service<B>(layer: AuthRefreshLayer) -> AuthRefresh<HttpClient<B>>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    ServiceBuilder::new().layer(layer).service(client::<B>())
}

async fn collect<B>(body: B) -> (Bytes, Option<HeaderMap>)
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (collected.to_bytes(), trailers)
}

fn frames<E>(chunks: Vec<Bytes>) -> StreamBody<impl Stream<Item = Result<Frame<Bytes>, E>>> {
    StreamBody::new(stream::iter(
        chunks.into_iter().map(|c| Ok::<_, E>(Frame::data(c))),
    ))
}

/// The two attempts carried `tok-1` then `tok-2` and exactly `sent`.
fn assert_sent_twice(attempts: &[Attempt], sent: &[u8]) {
    assert_eq!(
        attempts.len(),
        2,
        "one attempt and one retry: {attempts:#?}"
    );
    assert_eq!(attempts[0].authorization.as_deref(), Some("Bearer tok-1"));
    assert_eq!(attempts[1].authorization.as_deref(), Some("Bearer tok-2"));
    for (i, attempt) in attempts.iter().enumerate() {
        assert_eq!(attempt.body_error, None, "attempt {i}");
        assert_eq!(attempt.body.len(), sent.len(), "attempt {i}: length");
        assert!(attempt.body == sent, "attempt {i}: the bytes differ");
    }
}

#[tokio::test]
async fn an_empty_body_is_sent_empty_twice() {
    tokio::time::timeout(LIMIT, async {
        let upstream = Recorder::start().await;
        let (handle, issuer) = handle_with_tok1().await;
        let response = service::<Empty<Bytes>>(AuthRefreshLayer::new(handle.clone()))
            .oneshot(
                http::Request::get(upstream.url("/echo"))
                    .body(Empty::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let (received, _) = collect(response.into_body()).await;
        let attempts = upstream.attempts();
        assert_sent_twice(&attempts, b"");
        assert_eq!(received, attempts[1].sent);
        assert_eq!(received, "ok ");
        assert_eq!(issuer.calls(), 2);
        assert_eq!(handle.stats().retries, 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_exact_size_body_is_sent_with_its_length_twice() {
    tokio::time::timeout(LIMIT, async {
        let upstream = Recorder::start().await;
        let (handle, _issuer) = handle_with_tok1().await;
        let sent = pattern(100_000);
        let response = service::<Full<Bytes>>(AuthRefreshLayer::new(handle.clone()))
            .oneshot(
                http::Request::post(upstream.url("/echo"))
                    .body(Full::new(Bytes::from(sent.clone())))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let (received, _) = collect(response.into_body()).await;
        let attempts = upstream.attempts();
        assert_sent_twice(&attempts, &sent);
        for attempt in &attempts {
            assert_eq!(
                attempt.headers.get("content-length"),
                Some(&HeaderValue::from(sent.len())),
                "the exact size is kept on the retry"
            );
        }
        assert!(received == attempts[1].sent);
        assert_eq!(received.len(), 3 + sent.len());
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_body_of_unknown_size_is_streamed_twice() {
    tokio::time::timeout(LIMIT, async {
        let upstream = Recorder::start().await;
        let (handle, _issuer) = handle_with_tok1().await;
        // Uneven chunks, one of them empty.
        let sent = pattern(50_000);
        let mut chunks = chunked(&sent[..10_000], 7);
        chunks.push(Bytes::new());
        chunks.extend(chunked(&sent[10_000..], 4096));
        let response = service(AuthRefreshLayer::new(handle.clone()))
            .oneshot(
                http::Request::put(upstream.url("/echo"))
                    .body(frames::<Infallible>(chunks))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let (received, _) = collect(response.into_body()).await;
        let attempts = upstream.attempts();
        assert_sent_twice(&attempts, &sent);
        for attempt in &attempts {
            assert_eq!(attempt.headers.get("transfer-encoding").unwrap(), "chunked");
        }
        assert!(received == attempts[1].sent);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_streamed_body_over_the_cap_is_sent_once_and_the_token_still_refreshed() {
    tokio::time::timeout(LIMIT, async {
        let upstream = Recorder::start().await;
        let (handle, issuer) = handle_with_tok1().await;
        let sent = pattern(4096);
        let layer = AuthRefreshLayer::new(handle.clone()).max_replay_bytes(1000);
        let response = service(layer.clone())
            .oneshot(
                http::Request::post(upstream.url("/echo"))
                    .body(frames::<Infallible>(chunked(&sent, 256)))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            401,
            "the upstream's answer, not an error"
        );
        assert_eq!(
            response
                .extensions()
                .get::<RetrySkipped>()
                .map(|m| m.reason),
            Some(SkipReason::BodyTooLarge)
        );
        let (received, _) = collect(response.into_body()).await;
        let attempts = upstream.attempts();
        assert_eq!(attempts.len(), 1, "no retry");
        assert!(attempts[0].body == sent, "the first attempt got every byte");
        assert_eq!(received, attempts[0].sent);

        // The refresh was started all the same: the next request uses tok-2.
        let token = handle.valid_token().await.unwrap();
        assert_eq!(token.access_token().expose_secret(), "tok-2");
        assert_eq!(issuer.calls(), 2);
        assert_eq!(handle.stats().skipped_retries, 1);

        // An exact-size body over the cap is not buffered at all; same outcome.
        upstream.log.attempts.lock().unwrap().clear();
        let response = service::<Full<Bytes>>(layer)
            .oneshot(
                http::Request::post(upstream.url("/echo"))
                    .body(Full::new(Bytes::from(sent.clone())))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "tok-2 is accepted");
        assert!(upstream.attempts()[0].body == sent);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_body_that_fails_half_way_ends_in_a_typed_error_without_a_hang() {
    tokio::time::timeout(LIMIT, async {
        let upstream = Recorder::start().await;
        let (handle, issuer) = handle_with_tok1().await;
        let body = StreamBody::new(stream::iter(vec![
            Ok(Frame::data(Bytes::from_static(b"first part, "))),
            Err(std::io::Error::other("client body broke")),
            Ok(Frame::data(Bytes::from_static(b"never sent"))),
        ]));
        let err = service(AuthRefreshLayer::new(handle.clone()))
            .oneshot(
                http::Request::post(upstream.url("/echo"))
                    .body(body)
                    .unwrap(),
            )
            .await
            .unwrap_err();
        let mut chain = Vec::new();
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&*err);
        while let Some(err) = source {
            chain.push(err.to_string());
            source = err.source();
        }
        assert!(
            chain.iter().any(|e| e.contains("client body broke")),
            "the body's own error is in the chain: {chain:?}"
        );
        assert_eq!(issuer.calls(), 1, "no rejection was seen, so no refresh");
        assert!(
            upstream
                .attempts()
                .iter()
                .all(|a| a.sent != "ok first part, ")
        );

        // The layer keeps working.
        let response = service::<Full<Bytes>>(AuthRefreshLayer::new(handle.clone()))
            .oneshot(
                http::Request::post(upstream.url("/echo"))
                    .body(Full::from("again"))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_body_that_fails_after_an_early_rejection_ends_in_an_error_without_a_hang() {
    tokio::time::timeout(LIMIT, async {
        let upstream = Recorder::start().await;
        let (handle, issuer) = handle_with_tok1().await;
        let gate = upstream.log.second_half.clone();
        let first = Bytes::from_static(b"0123456789");
        let body = StreamBody::new(
            stream::once(async move { Ok(Frame::data(first)) })
                .chain(stream::once(async move {
                    gate.notified().await;
                    Err(std::io::Error::other("client body broke"))
                }))
                .boxed(),
        );
        let result = service(AuthRefreshLayer::new(handle.clone()))
            .oneshot(
                http::Request::post(upstream.url("/early?read=10"))
                    .body(body)
                    .unwrap(),
            )
            .await;
        // The 401 came before the body failed: the retry was sent and failed
        // with the body's error.
        let err = result.unwrap_err();
        let mut text = err.to_string();
        let mut source = err.source();
        while let Some(err) = source {
            text.push_str(&format!(" / {err}"));
            source = err.source();
        }
        assert!(text.contains("client body broke"), "{text}");
        assert_eq!(issuer.calls(), 2, "the rejection refreshed the token");
        let attempts = upstream.attempts();
        assert_eq!(attempts[0].body, "0123456789");
        assert_eq!(attempts[0].authorization.as_deref(), Some("Bearer tok-1"));
    })
    .await
    .unwrap();
}

/// The caller's body: `first` at once, `second` only once the upstream has
/// received the retry's first half (so the first attempt is answered
/// before its body is finished, deterministically).
fn first_then_second(
    first: Bytes,
    second: Bytes,
    gate: Arc<Notify>,
) -> StreamBody<impl Stream<Item = Result<Frame<Bytes>, Infallible>> + Unpin> {
    StreamBody::new(
        stream::once(async move { Ok(Frame::data(first)) })
            .chain(stream::once(async move {
                gate.notified().await;
                Ok(Frame::data(second))
            }))
            .boxed(),
    )
}

/// The upstream answers `tok-1` after `read_before_answer` bytes of a
/// 3000-byte body whose last 2000 bytes come only once the retry is under
/// way; the layer keeps at most `max_replay_bytes`.
async fn early_response(read_before_answer: usize, max_replay_bytes: usize) {
    let upstream = Recorder::start().await;
    let (handle, issuer) = handle_with_tok1().await;
    let sent = pattern(3000);
    let (first, second) = sent.split_at(1000);
    let inner_calls = Arc::new(AtomicUsize::new(0));
    let counter = inner_calls.clone();
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()).max_replay_bytes(max_replay_bytes))
        .map_request(move |request: http::Request<_>| {
            counter.fetch_add(1, Ordering::SeqCst);
            request
        })
        .service(client());
    let body = first_then_second(
        Bytes::copy_from_slice(first),
        Bytes::copy_from_slice(second),
        upstream.log.second_half.clone(),
    );
    let url = upstream.url(&format!("/early?read={read_before_answer}"));
    let response = service
        .oneshot(http::Request::post(url).body(body).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (received, _) = collect(response.into_body()).await;

    let attempts = upstream.attempts();
    assert_eq!(attempts.len(), 2);
    assert_eq!(inner_calls.load(Ordering::SeqCst), 2);
    assert!(
        attempts[0].body == first[..read_before_answer],
        "answered after {read_before_answer} bytes"
    );
    assert_eq!(attempts[1].authorization.as_deref(), Some("Bearer tok-2"));
    assert_eq!(attempts[1].body_error, None);
    assert!(attempts[1].body == sent, "the retry carries the whole body");
    assert!(received == attempts[1].sent);
    assert_eq!(issuer.calls(), 2);

    // The first attempt's request body, superseded by the retry, must end
    // (with an error), so its connection is released rather than left
    // waiting for bytes that now go to the retry.
    let drained = tokio::time::timeout(Duration::from_secs(5), upstream.drained(1))
        .await
        .expect("the superseded request body ended");
    assert!(drained.error.is_some(), "{drained:?}");
    let mut first_attempt = attempts[0].body.to_vec();
    first_attempt.extend_from_slice(&drained.bytes);
    assert!(
        sent.starts_with(&first_attempt),
        "the first attempt only ever got a prefix of the body"
    );
}

#[tokio::test]
async fn an_answer_before_any_of_the_body_was_read_is_retried_with_the_whole_body() {
    tokio::time::timeout(LIMIT, early_response(0, 1 << 20))
        .await
        .unwrap();
}

#[tokio::test]
async fn an_answer_after_part_of_the_body_is_retried_with_the_whole_body() {
    tokio::time::timeout(LIMIT, early_response(1000, 1 << 20))
        .await
        .unwrap();
}

/// The upstream answers after the part of the body that was sent, drops the
/// rest and closes the connection (what hyper does with an unread body):
/// the retry still carries the whole body.
#[tokio::test]
async fn an_early_answer_that_closes_the_connection_is_retried_with_the_whole_body() {
    tokio::time::timeout(LIMIT, async {
        let upstream = Recorder::start().await;
        let (handle, issuer) = handle_with_tok1().await;
        let sent = pattern(3000);
        let (first, second) = sent.split_at(1000);
        let body = first_then_second(
            Bytes::copy_from_slice(first),
            Bytes::copy_from_slice(second),
            upstream.log.second_half.clone(),
        );
        let response = service(AuthRefreshLayer::new(handle.clone()))
            .oneshot(
                http::Request::post(upstream.url("/early?read=1000&close"))
                    .body(body)
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let (received, _) = collect(response.into_body()).await;
        let attempts = upstream.attempts();
        assert_eq!(attempts.len(), 2);
        assert!(attempts[0].body == first);
        assert!(attempts[1].body == sent, "the retry carries the whole body");
        assert!(received == attempts[1].sent);
        assert_eq!(issuer.calls(), 2);
    })
    .await
    .unwrap();
}

/// The first attempt was answered before the body passed the cap, so the
/// body could still be replayed: the retry streams on past the cap and
/// carries every byte.
#[tokio::test]
async fn an_early_answer_before_the_cap_was_reached_is_retried_with_the_whole_body() {
    tokio::time::timeout(LIMIT, early_response(1000, 2000))
        .await
        .unwrap();
}

#[tokio::test]
async fn request_trailers_are_sent_on_both_attempts() {
    tokio::time::timeout(LIMIT, async {
        let upstream = Recorder::start().await;
        let (handle, _issuer) = handle_with_tok1().await;
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("sha256=abc123"));
        let sent = pattern(5000);
        let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = chunked(&sent, 1000)
            .into_iter()
            .map(|c| Ok(Frame::data(c)))
            .collect();
        frames.push(Ok(Frame::trailers(trailers.clone())));
        // HTTP/1.1 sends request trailers in a chunked body announced by `Trailer`.
        let request = http::Request::post(upstream.url("/echo"))
            .header("trailer", "x-checksum")
            .body(StreamBody::new(stream::iter(frames)))
            .unwrap();
        let response = service(AuthRefreshLayer::new(handle.clone()))
            .oneshot(request)
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let (received, _) = collect(response.into_body()).await;
        let attempts = upstream.attempts();
        assert_sent_twice(&attempts, &sent);
        for (i, attempt) in attempts.iter().enumerate() {
            assert_eq!(attempt.trailers.as_ref(), Some(&trailers), "attempt {i}");
        }
        assert!(received == attempts[1].sent);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_large_response_reaches_the_caller_byte_for_byte() {
    tokio::time::timeout(LIMIT, async {
        let upstream = Recorder::start().await;
        let (handle, _issuer) = handle_with_tok1().await;
        let response = service::<Full<Bytes>>(AuthRefreshLayer::new(handle.clone()))
            .oneshot(
                http::Request::post(upstream.url("/large"))
                    .body(Full::from("give me a lot"))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let (received, _) = collect(response.into_body()).await;
        let attempts = upstream.attempts();
        assert_sent_twice(&attempts, b"give me a lot");
        assert_eq!(received.len(), 2 * 1024 * 1024);
        assert!(received == attempts[1].sent);
        assert!(received == pattern(2 * 1024 * 1024));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_json_response_the_detector_peeked_at_reaches_the_caller_byte_for_byte() {
    tokio::time::timeout(LIMIT, async {
        let upstream = Recorder::start().await;
        let (handle, issuer) = handle_with_tok1().await;
        let layer = AuthRefreshLayer::new(handle.clone())
            .detector(Unauthorized::new().or(JsonBodyRule::default_rules()));
        let sent = br#"{"order":42,"items":["a","b"]}"#;
        let response = service::<Full<Bytes>>(layer)
            .oneshot(
                http::Request::post(upstream.url("/json"))
                    .header("content-type", "application/json")
                    .body(Full::from(&sent[..]))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let (received, _) = collect(response.into_body()).await;
        let attempts = upstream.attempts();
        assert_sent_twice(&attempts, sent);
        assert_eq!(
            attempts[0].sent,
            json_expired(),
            "the first answer was a 40003"
        );
        assert!(received == attempts[1].sent);
        assert!(received.starts_with(br#"{"code":0,"#));
        assert!(received.len() > 20_000);
        assert_eq!(issuer.calls(), 2);
        assert_eq!(handle.stats().retries, 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_json_response_longer_than_the_peek_limit_is_not_expiry_and_arrives_whole() {
    tokio::time::timeout(LIMIT, async {
        let upstream = Recorder::start().await;
        let (handle, issuer) = handle_with_tok1().await;
        let layer = AuthRefreshLayer::new(handle.clone())
            .detector(Unauthorized::new().or(JsonBodyRule::default_rules()))
            .peek_limit(4096);
        for path in ["/json-big", "/json-big?exact"] {
            let response = service::<Empty<Bytes>>(layer.clone())
                .oneshot(
                    http::Request::get(upstream.url(path))
                        .body(Empty::new())
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            assert!(response.extensions().get::<RetrySkipped>().is_none());
            let (received, _) = collect(response.into_body()).await;
            let attempts = upstream.attempts();
            let last = attempts.last().unwrap();
            assert!(received == last.sent, "{path}: byte for byte");
            assert!(received.starts_with(br#"{"code":40003"#));
            assert!(received.len() > 100_000);
        }
        assert_eq!(upstream.attempts().len(), 2, "no retry for either");
        assert_eq!(issuer.calls(), 1, "and no refresh");
        assert_eq!(handle.stats().retries, 0);
    })
    .await
    .unwrap();
}
