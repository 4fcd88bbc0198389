//! The response path through real servers and scripted bodies: an answer
//! the detector must read is judged in the first poll when it arrived
//! whole, read on (within the peek deadline) when it did not, and handed
//! to the caller byte for byte either way; expiry is retried exactly once;
//! the caller's own token is left alone and a retry carries exactly one.
#![allow(clippy::type_complexity)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::{Layer, ServiceExt};
use tower_auth_refresh::{
    AuthRefreshLayer, BoxError, ExpiryDetectorExt, JsonBodyRule, ReplayBody, Token, TokenHandle,
    TokenInjector, Unauthorized, token_source_fn,
};

const LIMIT: Duration = Duration::from_secs(20);

type Out = BoxBody<Bytes, Infallible>;
type Handler =
    Arc<dyn Fn(Request<Incoming>, usize) -> BoxFuture<'static, Response<Out>> + Send + Sync>;

/// A real hyper server (h1 + h2) on its own runtime thread; counts
/// connections and requests.
struct Server {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<http::request::Parts>>>,
}

impl Server {
    fn start(handler: Handler) -> Self {
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let seen: Arc<Mutex<Vec<http::request::Parts>>> = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let (c, r, s) = (connections.clone(), requests.clone(), seen.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    c.fetch_add(1, Ordering::SeqCst);
                    let handler = handler.clone();
                    let r = r.clone();
                    let s = s.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                            let n = r.fetch_add(1, Ordering::SeqCst) + 1;
                            let (parts, body) = req.into_parts();
                            s.lock().unwrap().push(parts.clone());
                            let fut = handler(Request::from_parts(parts, body), n);
                            async move { Ok::<_, Infallible>(fut.await) }
                        });
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        });
        let addr = rx.recv().unwrap();
        Self {
            addr,
            connections,
            requests,
            seen,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

fn full(bytes: impl Into<Bytes>) -> Out {
    Full::new(bytes.into()).boxed()
}

fn json(status: u16, body: impl Into<Bytes>) -> Response<Out> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(body))
        .unwrap()
}

fn authorized(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// A counting token source: `tok-1`, `tok-2`, ...
fn handle_with(injector: TokenInjector) -> (TokenHandle, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let handle = TokenHandle::builder(token_source_fn(move |_| {
        let n = c.fetch_add(1, Ordering::SeqCst) + 1;
        async move { Ok::<_, BoxError>(Token::bearer(format!("tok-{n}"))) }
    }))
    .injector(injector)
    .min_token_age(Duration::ZERO)
    .build();
    (handle, calls)
}

fn layer(handle: &TokenHandle) -> AuthRefreshLayer {
    AuthRefreshLayer::new(handle.clone())
        .detector(Unauthorized::new().or(JsonBodyRule::default_rules()))
}

type HttpClient = Client<HttpConnector, ReplayBody<Full<Bytes>>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::default()).unwrap()
}

/// Everything the caller receives of a body: data bytes, trailers, error.
async fn drain<B>(body: B) -> (Vec<u8>, Option<HeaderMap>, Option<String>)
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    let mut bytes = Vec::new();
    let mut trailers = None;
    let mut error = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => bytes.extend_from_slice(&data),
                Err(frame) => trailers = frame.into_trailers().ok(),
            },
            Err(err) => {
                error = Some(err.to_string());
                break;
            }
        }
    }
    (bytes, trailers, error)
}

fn padded(code: u32, len: usize) -> String {
    let head = format!("{{\"code\":{code},\"pad\":\"");
    let tail = "\"}";
    let pad = len - head.len() - tail.len();
    format!("{head}{}{tail}", "x".repeat(pad))
}

// ---------------------------------------------------------------- 1. bytes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_byte_for_byte_through_hyper() {
    tokio::time::timeout(LIMIT, async {
        let at_limit = padded(0, 64);
        let over_limit = padded(0, 65);
        let (a, o) = (at_limit.clone(), over_limit.clone());
        let server = Server::start(Arc::new(move |req, _| {
            let (a, o) = (a.clone(), o.clone());
            Box::pin(async move {
                let path = req.uri().path().to_owned();
                match path.as_str() {
                    "/cl" => json(200, "{\"code\":0,\"data\":[1,2,3]}"),
                    "/empty" => json(200, ""),
                    "/at-limit" => json(200, a),
                    "/over-limit" => json(200, o),
                    "/chunked-at-limit" | "/chunked-over-limit" => {
                        let text = if path.contains("over") { o } else { a };
                        let (tx, rx) = futures::channel::mpsc::unbounded();
                        let bytes = Bytes::from(text);
                        tx.unbounded_send(Ok::<_, Infallible>(Frame::data(bytes.slice(..10))))
                            .unwrap();
                        tx.unbounded_send(Ok(Frame::data(bytes.slice(10..))))
                            .unwrap();
                        drop(tx);
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(StreamBody::new(rx).boxed())
                            .unwrap()
                    }
                    "/204" => Response::builder()
                        .status(204)
                        .header("content-type", "application/json")
                        .body(Empty::new().boxed())
                        .unwrap(),
                    "/304" => Response::builder()
                        .status(304)
                        .header("content-type", "application/json")
                        .body(Empty::new().boxed())
                        .unwrap(),
                    "/head" => Response::builder()
                        .header("content-type", "application/json")
                        .header("content-length", "42")
                        .body(Empty::new().boxed())
                        .unwrap(),
                    _ => json(404, "{}"),
                }
            })
        }));
        let (handle, calls) = handle_with(TokenInjector::bearer());
        handle.valid_token().await.unwrap();
        let service = layer(&handle).peek_limit(64).layer(client());
        let cases: Vec<(&str, &str, Vec<u8>)> = vec![
            ("GET", "/cl", b"{\"code\":0,\"data\":[1,2,3]}".to_vec()),
            ("GET", "/empty", Vec::new()),
            ("GET", "/at-limit", at_limit.clone().into_bytes()),
            ("GET", "/over-limit", over_limit.clone().into_bytes()),
            ("GET", "/chunked-at-limit", at_limit.clone().into_bytes()),
            (
                "GET",
                "/chunked-over-limit",
                over_limit.clone().into_bytes(),
            ),
            ("GET", "/204", Vec::new()),
            ("GET", "/304", Vec::new()),
            ("HEAD", "/head", Vec::new()),
        ];
        for (method, path, want) in cases {
            let request = Request::builder()
                .method(method)
                .uri(server.url(path))
                .body(Full::default())
                .unwrap();
            let response = service.clone().oneshot(request).await.unwrap();
            let headers = response.headers().clone();
            let body = response.into_body();
            let hint = body.size_hint();
            let end = body.is_end_stream();
            let (got, _, err) = drain(body).await;
            assert_eq!(err, None, "{method} {path}");
            assert_eq!(got, want, "{method} {path}: bytes");
            if let Some(exact) = hint.exact() {
                assert_eq!(exact, got.len() as u64, "{method} {path}: exact size hint");
            }
            assert!(
                hint.lower() <= got.len() as u64,
                "{method} {path}: lower hint"
            );
            if end {
                assert!(
                    got.is_empty(),
                    "{method} {path}: is_end_stream but bytes followed"
                );
            }
            if method != "HEAD" {
                if let Some(cl) = headers.get("content-length") {
                    assert_eq!(cl.to_str().unwrap(), got.len().to_string(), "{path}");
                }
            }
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "no refresh for successes");
        assert_eq!(handle.stats().retries, 0);
    })
    .await
    .expect("bounded");
}

/// An expired code exactly at the limit is retried; one byte over is not.
#[tokio::test]
async fn expired_at_limit_and_over_limit() {
    tokio::time::timeout(LIMIT, async {
        let at_limit = padded(40003, 64);
        let over_limit = padded(40003, 65);
        let (a, o) = (at_limit.clone(), over_limit.clone());
        let server = Server::start(Arc::new(move |req, _| {
            let (a, o) = (a.clone(), o.clone());
            Box::pin(async move {
                if authorized(&req).as_deref() != Some("Bearer tok-1") {
                    return json(200, "{\"code\":0}");
                }
                if req.uri().path() == "/at" {
                    json(200, a)
                } else {
                    json(200, o)
                }
            })
        }));
        let (handle, calls) = handle_with(TokenInjector::bearer());
        handle.valid_token().await.unwrap();
        let service = layer(&handle).peek_limit(64).layer(client());
        let response = service
            .clone()
            .oneshot(get(&server.url("/at")))
            .await
            .unwrap();
        let (got, _, _) = drain(response.into_body()).await;
        assert_eq!(got, b"{\"code\":0}", "at limit: retried");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        let response = service
            .clone()
            .oneshot(get(&server.url("/over")))
            .await
            .unwrap();
        let (got, _, _) = drain(response.into_body()).await;
        // tok-2 is accepted, tok-1 only was rejected; /over with tok-2 -> code 0
        assert_eq!(got, b"{\"code\":0}", "tok-2 now in use");
        assert_eq!(handle.stats().retries, 1);
    })
    .await
    .expect("bounded");
}

// ------------------------------------------------------------ 2. trailers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_data_then_trailers_reach_the_caller_and_expiry_is_seen() {
    tokio::time::timeout(LIMIT, async {
        let server = Server::start(Arc::new(move |req, _| {
            Box::pin(async move {
                let ok = authorized(&req).as_deref() == Some("Bearer tok-2");
                let text: &'static str = if ok {
                    "{\"code\":0}"
                } else {
                    "{\"code\":40003}"
                };
                let mut trailers = HeaderMap::new();
                trailers.insert("x-checksum", HeaderValue::from_static("abc"));
                let frames = vec![
                    Ok::<_, Infallible>(Frame::data(Bytes::from_static(text.as_bytes()))),
                    Ok(Frame::trailers(trailers)),
                ];
                Response::builder()
                    .header("content-type", "application/json")
                    .body(StreamBody::new(futures::stream::iter(frames)).boxed())
                    .unwrap()
            })
        }));
        let (handle, calls) = handle_with(TokenInjector::bearer());
        handle.valid_token().await.unwrap();
        let h2: HttpClient = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        let service = layer(&handle).layer(h2);
        let response = service
            .clone()
            .oneshot(get(&server.url("/t")))
            .await
            .unwrap();
        let (got, trailers, err) = drain(response.into_body()).await;
        assert_eq!(err, None);
        assert_eq!(got, b"{\"code\":0}");
        assert_eq!(
            trailers.and_then(|t| t.get("x-checksum").cloned()),
            Some(HeaderValue::from_static("abc")),
            "trailers reach the caller"
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "expired once, refreshed once"
        );
        assert_eq!(server.requests.load(Ordering::SeqCst), 2);
        assert_eq!(handle.stats().retries, 1);
    })
    .await
    .expect("bounded");
}

// ------------------------------------------------- in-process scripted body

#[derive(Clone, Debug)]
enum Step {
    /// Return Pending once (waking at once).
    Pending,
    Data(&'static [u8]),
    Trailers,
    Err(&'static str),
}

#[derive(Debug)]
struct ScriptErr(&'static str);
impl std::fmt::Display for ScriptErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}
impl std::error::Error for ScriptErr {}

/// A body that plays `steps`; `lie_end_after` makes `is_end_stream` say
/// true once that many frames were yielded; `hint` overrides `size_hint`.
struct Scripted {
    steps: VecDeque<Step>,
    yielded: usize,
    lie_end_after: Option<usize>,
    hint: Option<SizeHint>,
    finished: bool,
    polls_after_none: Arc<AtomicUsize>,
}

impl Scripted {
    fn new(steps: Vec<Step>) -> Self {
        Self {
            steps: steps.into(),
            yielded: 0,
            lie_end_after: None,
            hint: None,
            finished: false,
            polls_after_none: Arc::default(),
        }
    }
}

impl Body for Scripted {
    type Data = Bytes;
    type Error = ScriptErr;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ScriptErr>>> {
        if self.finished {
            self.polls_after_none.fetch_add(1, Ordering::SeqCst);
            return Poll::Ready(None);
        }
        match self.steps.pop_front() {
            None => {
                self.finished = true;
                Poll::Ready(None)
            }
            Some(Step::Pending) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Some(Step::Data(d)) => {
                self.yielded += 1;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(d)))))
            }
            Some(Step::Trailers) => {
                self.yielded += 1;
                let mut t = HeaderMap::new();
                t.insert("x-t", HeaderValue::from_static("1"));
                Poll::Ready(Some(Ok(Frame::trailers(t))))
            }
            Some(Step::Err(e)) => {
                self.yielded += 1;
                Poll::Ready(Some(Err(ScriptErr(e))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if let Some(n) = self.lie_end_after {
            if self.yielded >= n {
                return true;
            }
        }
        self.finished || self.steps.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        self.hint.unwrap_or_default()
    }
}

/// An upstream service: attempt `n` (1-based) gets `make(n, token)`.
fn scripted_service(
    make: impl Fn(usize, Option<String>) -> Scripted + Send + Sync + 'static,
) -> (
    impl tower::Service<
        Request<ReplayBody<Full<Bytes>>>,
        Response = Response<Scripted>,
        Error = BoxError,
        Future = impl Send,
    > + Clone
    + Send
    + 'static,
    Arc<Mutex<Vec<http::request::Parts>>>,
) {
    let make = Arc::new(make);
    let seen: Arc<Mutex<Vec<http::request::Parts>>> = Arc::default();
    let s = seen.clone();
    let svc = tower::service_fn(move |req: Request<ReplayBody<Full<Bytes>>>| {
        let make = make.clone();
        let s = s.clone();
        async move {
            let (parts, _) = req.into_parts();
            let token = parts
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let n = {
                let mut seen = s.lock().unwrap();
                seen.push(parts);
                seen.len()
            };
            let body = make(n, token);
            Ok::<_, BoxError>(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(body)
                    .unwrap(),
            )
        }
    });
    (svc, seen)
}

/// Each scripted shape: (steps, expected bytes, trailers?, error?).
#[tokio::test]
async fn scripted_bodies_reach_the_caller_whole() {
    use Step::Err as Fail;
    use Step::{Data, Pending, Trailers};
    let cases: Vec<(&str, Vec<Step>, &[u8], bool, Option<&str>)> = vec![
        (
            "one frame",
            vec![Data(b"{\"code\":0}")],
            b"{\"code\":0}",
            false,
            None,
        ),
        (
            "pending then data",
            vec![Pending, Data(b"{\"code\":0}")],
            b"{\"code\":0}",
            false,
            None,
        ),
        ("trailers first", vec![Trailers], b"", true, None),
        (
            "data, trailers",
            vec![Data(b"{\"code\":0}"), Trailers],
            b"{\"code\":0}",
            true,
            None,
        ),
        (
            "error first",
            vec![Fail("reset")],
            b"",
            false,
            Some("reset"),
        ),
        (
            "data then error",
            vec![Data(b"{\"co"), Fail("reset")],
            b"{\"co",
            false,
            Some("reset"),
        ),
        (
            "pending, error",
            vec![Pending, Fail("reset")],
            b"",
            false,
            Some("reset"),
        ),
        ("empty data frame", vec![Data(b"")], b"", false, None),
        (
            "two frames",
            vec![Data(b"{\"code\""), Pending, Data(b":0}")],
            b"{\"code\":0}",
            false,
            None,
        ),
    ];
    for (name, steps, want, want_trailers, want_err) in cases {
        let counter = Arc::new(AtomicUsize::new(0));
        let c = counter.clone();
        let (svc, _) = scripted_service(move |_, _| {
            let mut s = Scripted::new(steps.clone());
            s.polls_after_none = c.clone();
            s
        });
        let (handle, _) = handle_with(TokenInjector::bearer());
        handle.valid_token().await.unwrap();
        let service = layer(&handle).layer(svc);
        let response = tokio::time::timeout(LIMIT, service.oneshot(get("http://h/x")))
            .await
            .unwrap()
            .unwrap();
        let mut body = response.into_body();
        let hint = body.size_hint();
        let mut got = Vec::new();
        let mut trailers = false;
        let mut err = None;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => match f.into_data() {
                    Ok(d) => got.extend_from_slice(&d),
                    Err(_) => trailers = true,
                },
                Err(e) => {
                    err = Some(e.to_string());
                }
            }
        }
        assert_eq!(got, want, "{name}: bytes");
        assert_eq!(trailers, want_trailers, "{name}: trailers");
        assert_eq!(err.as_deref(), want_err, "{name}: error");
        if let Some(exact) = hint.exact() {
            assert_eq!(exact, got.len() as u64, "{name}: exact hint");
        }
        // The caller polls on after the end, as some consumers do.
        assert!(body.frame().await.is_none(), "{name}: None after the end");
        assert!(
            body.is_end_stream() || err.is_some(),
            "{name}: end after None"
        );
        assert_eq!(
            counter.load(Ordering::SeqCst),
            0,
            "{name}: upstream polled after it returned None"
        );
    }
}

/// The hot path (head says not expired): is the upstream body polled
/// after it returned None? 71308cf's `ResponseBody` fused it
/// (`inner_done`); the new `Plain` variant delegates every poll.
#[tokio::test]
async fn plain_body_is_not_polled_after_none() {
    let counter = Arc::new(AtomicUsize::new(0));
    let c = counter.clone();
    let (svc, _) = scripted_service(move |_, _| {
        let mut s = Scripted::new(vec![Step::Data(b"hello")]);
        s.polls_after_none = c.clone();
        s
    });
    let (handle, _) = handle_with(TokenInjector::bearer());
    handle.valid_token().await.unwrap();
    // Default detector: a 200 is cleared by its head, body passed through.
    let service = AuthRefreshLayer::new(handle).layer(svc);
    let response = service.oneshot(get("http://h/x")).await.unwrap();
    let mut body = response.into_body();
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "hello"
    );
    assert!(body.frame().await.is_none());
    assert!(body.frame().await.is_none());
    assert_eq!(
        counter.load(Ordering::SeqCst),
        0,
        "upstream body polled after it returned None"
    );
}

/// A body that says it ended after its first frame but still has a frame.
/// Documented contract breach by the body; this records what the caller gets.
#[tokio::test]
#[ignore = "the body breaks the http-body contract; 71308cf lost the tail the same way"]
async fn body_lying_about_its_end_loses_the_rest() {
    let (svc, _) = scripted_service(|_, _| {
        let mut s = Scripted::new(vec![Step::Data(b"{\"code\":0}"), Step::Data(b" tail")]);
        s.lie_end_after = Some(1);
        s
    });
    let (handle, _) = handle_with(TokenInjector::bearer());
    handle.valid_token().await.unwrap();
    let service = layer(&handle).layer(svc);
    let response = service.oneshot(get("http://h/x")).await.unwrap();
    let (got, _, _) = drain(response.into_body()).await;
    assert_eq!(
        got, b"{\"code\":0} tail",
        "the caller gets every byte the upstream had"
    );
}

/// `size_hint` exact but wrong (says 3, yields 10) and (says 1000 > limit,
/// yields a small expired JSON).
#[tokio::test]
async fn size_hint_exact_but_wrong() {
    let (svc, seen) = scripted_service(|n, _| {
        let mut s = Scripted::new(vec![Step::Data(if n == 1 {
            b"{\"code\":40003}"
        } else {
            b"{\"code\":0}"
        })]);
        s.hint = Some(SizeHint::with_exact(3));
        s
    });
    let (handle, calls) = handle_with(TokenInjector::bearer());
    handle.valid_token().await.unwrap();
    let service = layer(&handle).layer(svc);
    let response = service.oneshot(get("http://h/x")).await.unwrap();
    let body = response.into_body();
    let hint = body.size_hint();
    let (got, _, _) = drain(body).await;
    assert_eq!(got, b"{\"code\":0}");
    assert_eq!(seen.lock().unwrap().len(), 2, "expired, retried");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // The retry's body goes through Plain: its (wrong) hint is the upstream's.
    let _ = hint;
}

// ------------------------------------------- 3. expiry on several runtimes

#[derive(Clone, Copy, Debug)]
enum Shape {
    /// Content-Length, one write.
    Whole,
    /// Content-Length, two writes with yields between.
    TwoFramesLength,
    /// Chunked, two chunks.
    TwoFramesChunked,
    /// Chunked, whole JSON in the first chunk, stream held open.
    OpenChunked,
}

fn expiry_server(
    shape: Shape,
) -> (
    Server,
    Arc<Mutex<Vec<futures::channel::mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>>>>,
) {
    let open: Arc<Mutex<Vec<_>>> = Arc::default();
    let o = open.clone();
    let server = Server::start(Arc::new(move |req, _| {
        let o = o.clone();
        Box::pin(async move {
            let ok = authorized(&req).as_deref() == Some("Bearer tok-2");
            let text: &'static [u8] = if ok {
                b"{\"code\":0,\"msg\":\"fine\"}"
            } else {
                b"{\"code\":40003,\"msg\":\"token expired\"}"
            };
            let bytes = Bytes::from_static(text);
            let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, Infallible>>();
            let mut builder = Response::builder().header("content-type", "application/json");
            match shape {
                Shape::Whole => return json(200, bytes),
                Shape::TwoFramesLength | Shape::TwoFramesChunked => {
                    if matches!(shape, Shape::TwoFramesLength) {
                        builder = builder.header("content-length", bytes.len().to_string());
                    }
                    let first = bytes.slice(..8);
                    let rest = bytes.slice(8..);
                    tx.unbounded_send(Ok(Frame::data(first))).unwrap();
                    tokio::spawn(async move {
                        for _ in 0..50 {
                            tokio::task::yield_now().await;
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        let _ = tx.unbounded_send(Ok(Frame::data(rest)));
                    });
                }
                Shape::OpenChunked => {
                    tx.unbounded_send(Ok(Frame::data(bytes))).unwrap();
                    o.lock().unwrap().push(tx);
                }
            }
            builder.body(StreamBody::new(rx).boxed()).unwrap()
        })
    }));
    (server, open)
}

async fn expiry_case(shape: Shape, warm: bool) -> (usize, usize, u64, Vec<u8>) {
    let (server, open) = expiry_server(shape);
    let (handle, calls) = handle_with(TokenInjector::bearer());
    if warm {
        // tok-1 at hand: the first-look path (a cold handle waits for its
        // first token and takes `wait_then_send`).
        handle.valid_token().await.unwrap();
    }
    let service = layer(&handle)
        // Generous: the two-frame shapes must fit in it on a loaded machine.
        .peek_deadline(Duration::from_secs(5))
        .layer(client());
    let response = service.oneshot(get(&server.url("/j"))).await.unwrap();
    let body = response.into_body();
    let got = if matches!(shape, Shape::OpenChunked) {
        // Read the first frame only: the stream stays open.
        let mut body = std::pin::pin!(body);
        let frame = body.frame().await.unwrap().unwrap();
        let data = frame.into_data().unwrap().to_vec();
        open.lock().unwrap().clear();
        assert!(body.frame().await.is_none());
        data
    } else {
        drain(body).await.0
    };
    (
        server.requests.load(Ordering::SeqCst),
        calls.load(Ordering::SeqCst),
        handle.stats().retries,
        got,
    )
}

fn check(shape: Shape, runtime: &str, got: (usize, usize, u64, Vec<u8>)) {
    assert_eq!(
        got,
        (2, 2, 1, b"{\"code\":0,\"msg\":\"fine\"}".to_vec()),
        "{shape:?} on {runtime}: (upstream calls, token-source calls, retries, body)"
    );
}

const SHAPES: [Shape; 4] = [
    Shape::Whole,
    Shape::TwoFramesLength,
    Shape::TwoFramesChunked,
    Shape::OpenChunked,
];

/// Every shape, with and without a token at hand, on `rt`.
fn every_shape_retried_once_on(rt: &tokio::runtime::Runtime, runtime: &str) {
    for shape in SHAPES {
        for warm in [false, true] {
            let got = rt.block_on(async {
                tokio::time::timeout(LIMIT, expiry_case(shape, warm))
                    .await
                    .unwrap()
            });
            check(shape, &format!("{runtime} warm={warm}"), got);
        }
    }
}

#[test]
fn expiry_retried_once_multi_thread() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    every_shape_retried_once_on(&rt, "multi-thread");
}

#[test]
fn expiry_retried_once_current_thread() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    every_shape_retried_once_on(&rt, "current-thread");
}

/// No timer: a Content-Length body within the limit is read; a chunked body
/// of unknown length is passed on undetected (see
/// `io_only_unknown_length_verdict_does_not_depend_on_timing`).
#[test]
fn expiry_on_io_only_runtime() {
    for shape in [Shape::Whole, Shape::TwoFramesLength] {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        for warm in [false, true] {
            let got = rt.block_on(expiry_case(shape, warm));
            check(shape, &format!("io-only warm={warm}"), got);
        }
    }
}

// ------------------------------------------------------------- 4. DPoP

#[cfg(feature = "dpop")]
#[tokio::test]
async fn dpop_nonce_challenge_with_json_body_never_refreshes() {
    use tower_auth_refresh::dpop::DpopKey;
    tokio::time::timeout(LIMIT, async {
        let server = Server::start(Arc::new(move |_req, _| {
            Box::pin(async move {
                Response::builder()
                    .status(401)
                    .header("content-type", "application/json")
                    .header("dpop-nonce", "n-1")
                    .header("www-authenticate", "DPoP error=\"use_dpop_nonce\"")
                    .body(full(
                        "{\"code\":40003,\"error\":\"use_dpop_nonce\",\"msg\":\"token expired\"}",
                    ))
                    .unwrap()
            })
        }));
        let (handle, calls) = handle_with(TokenInjector::bearer());
        handle.valid_token().await.unwrap();
        let service = layer(&handle)
            .dpop(DpopKey::generate().unwrap())
            .layer(client());
        let response = service.oneshot(get(&server.url("/r"))).await.unwrap();
        assert_eq!(response.status(), 401);
        let (got, _, _) = drain(response.into_body()).await;
        assert!(got.starts_with(b"{\"code\":40003"));
        assert_eq!(
            server.requests.load(Ordering::SeqCst),
            2,
            "first + one nonce resend"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1, "never a refresh");
        assert_eq!(handle.stats().retries, 0);
    })
    .await
    .expect("bounded");
}

/// DPoP + a 200 expired JSON (first look, whole) then a nonce challenge on
/// the retry: at most one refresh, one nonce resend.
#[cfg(feature = "dpop")]
#[tokio::test]
async fn dpop_first_look_expired_then_nonce_on_retry() {
    use tower_auth_refresh::dpop::DpopKey;
    tokio::time::timeout(LIMIT, async {
        let server = Server::start(Arc::new(move |_req, n| {
            Box::pin(async move {
                match n {
                    1 => json(200, "{\"code\":40003}"),
                    2 => Response::builder()
                        .status(401)
                        .header("content-type", "application/json")
                        .header("dpop-nonce", "n-1")
                        .header("www-authenticate", "DPoP error=\"use_dpop_nonce\"")
                        .body(full("{\"code\":40003}"))
                        .unwrap(),
                    _ => json(200, "{\"code\":0}"),
                }
            })
        }));
        let (handle, calls) = handle_with(TokenInjector::bearer());
        handle.valid_token().await.unwrap();
        let service = layer(&handle)
            .dpop(DpopKey::generate().unwrap())
            .layer(client());
        let response = service.oneshot(get(&server.url("/r"))).await.unwrap();
        let (got, _, _) = drain(response.into_body()).await;
        assert_eq!(got, b"{\"code\":0}");
        assert_eq!(server.requests.load(Ordering::SeqCst), 3);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(handle.stats().retries, 1);
    })
    .await
    .expect("bounded");
}

// ------------------------------------------------------- 5. put_if_absent

#[tokio::test]
async fn callers_own_token_is_left_alone() {
    // (injector, request builder, header or query to compare)
    let cases: Vec<(&str, TokenInjector, Request<Full<Bytes>>)> = vec![
        (
            "lowercase authorization",
            TokenInjector::bearer(),
            Request::get("http://h/x")
                .header("authorization", "Bearer mine")
                .body(Full::default())
                .unwrap(),
        ),
        (
            "two authorization values",
            TokenInjector::bearer(),
            Request::get("http://h/x")
                .header("Authorization", "Basic a")
                .header("AUTHORIZATION", "Bearer b")
                .body(Full::default())
                .unwrap(),
        ),
        (
            "custom header",
            TokenInjector::header(http::header::HeaderName::from_static("x-api-token")),
            Request::get("http://h/x")
                .header("X-Api-Token", "mine")
                .body(Full::default())
                .unwrap(),
        ),
        (
            "query access%5Ftoken",
            TokenInjector::query("access_token"),
            Request::get("http://h/x?a=1&access%5Ftoken=mine&b=2")
                .body(Full::default())
                .unwrap(),
        ),
        (
            "query access_token empty",
            TokenInjector::query("access_token"),
            Request::get("http://h/x?access_token=")
                .body(Full::default())
                .unwrap(),
        ),
    ];
    for (name, injector, request) in cases {
        let (svc, seen) =
            scripted_service(|_, _| Scripted::new(vec![Step::Data(b"{\"code\":40003}")]));
        let (handle, calls) = handle_with(injector);
        let service = layer(&handle).layer(svc);
        let sent_headers = request.headers().clone();
        let sent_uri = request.uri().clone();
        let response = service.oneshot(request).await.unwrap();
        let _ = drain(response.into_body()).await;
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "{name}: passed through once, not retried");
        assert_eq!(seen[0].headers, sent_headers, "{name}: headers untouched");
        assert_eq!(seen[0].uri, sent_uri, "{name}: uri untouched");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "{name}: token source not asked"
        );
    }
}

#[derive(Clone, Debug, PartialEq)]
struct Tag(u32);

#[tokio::test]
async fn retry_carries_exactly_one_token_and_the_same_head() {
    for (name, injector) in [
        ("bearer", TokenInjector::bearer()),
        (
            "custom header",
            TokenInjector::header(http::header::HeaderName::from_static("x-api-token")),
        ),
        ("query", TokenInjector::query("access_token")),
    ] {
        let (svc, seen) = scripted_service(|n, _| {
            Scripted::new(vec![Step::Data(if n == 1 {
                b"{\"code\":40003}"
            } else {
                b"{\"code\":0}"
            })])
        });
        let (handle, calls) = handle_with(injector);
        handle.valid_token().await.unwrap();
        let service = layer(&handle).layer(svc);
        let mut request = Request::post("http://h/x?a=1&b=%20two")
            .header("x-one", "1")
            .header("x-multi", "a")
            .header("x-multi", "b")
            .header("content-type", "application/json")
            .version(http::Version::HTTP_11)
            .body(Full::new(Bytes::from_static(b"{\"q\":1}")))
            .unwrap();
        request.extensions_mut().insert(Tag(7));
        let response = service.oneshot(request).await.unwrap();
        let (got, _, _) = drain(response.into_body()).await;
        assert_eq!(got, b"{\"code\":0}", "{name}");
        assert_eq!(calls.load(Ordering::SeqCst), 2, "{name}");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "{name}");
        let strip = |p: &http::request::Parts| {
            let mut h = p.headers.clone();
            h.remove("authorization");
            h.remove("x-api-token");
            let q: Vec<(String, String)> =
                form_urlencoded::parse(p.uri.query().unwrap_or("").as_bytes())
                    .into_owned()
                    .filter(|(k, _)| k != "access_token")
                    .collect();
            (
                p.method.clone(),
                p.uri.path().to_owned(),
                q,
                p.version,
                h,
                p.extensions.get::<Tag>().cloned(),
            )
        };
        assert_eq!(
            strip(&seen[0]),
            strip(&seen[1]),
            "{name}: same head on the retry"
        );
        assert_eq!(
            seen[0].extensions.get::<Tag>(),
            Some(&Tag(7)),
            "{name}: extension kept"
        );
        for (i, p) in seen.iter().enumerate() {
            let n = i + 1;
            let headers = p.headers.get_all("authorization").iter().count()
                + p.headers.get_all("x-api-token").iter().count();
            let query = form_urlencoded::parse(p.uri.query().unwrap_or("").as_bytes())
                .filter(|(k, _)| k == "access_token")
                .count();
            assert_eq!(
                headers + query,
                1,
                "{name}: attempt {n} carries exactly one token: {p:?}"
            );
            let values: Vec<String> = p
                .headers
                .iter()
                .map(|(k, v)| format!("{k}={}", v.to_str().unwrap_or("?")))
                .collect();
            let text = format!("{values:?} {}", p.uri);
            assert!(
                text.contains(&format!("tok-{n}")),
                "{name}: attempt {n} has tok-{n}: {text}"
            );
        }
    }
}

// ------------------------------------------------------------- 6. proxy

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_proxy_frames_each_variant_correctly() {
    tokio::time::timeout(LIMIT, async {
        let big = "y".repeat(100_000);
        let b = big.clone();
        let upstream = Server::start(Arc::new(move |req, _| {
            let b = b.clone();
            Box::pin(async move {
                match req.uri().path() {
                    "/whole" => json(200, "{\"code\":0,\"n\":1}"),
                    "/chunked" => {
                        let frames = vec![
                            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"{\"code\":0,"))),
                            Ok(Frame::data(Bytes::from_static(b"\"n\":2}"))),
                        ];
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(StreamBody::new(futures::stream::iter(frames)).boxed())
                            .unwrap()
                    }
                    "/open" => {
                        let frames = vec![Ok::<_, Infallible>(Frame::data(Bytes::from_static(
                            b"{\"code\":0,\"n\":3}",
                        )))];
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(StreamBody::new(futures::stream::iter(frames)).boxed())
                            .unwrap()
                    }
                    "/big" => json(200, b),
                    "/plain" => Response::new(full("plain text")),
                    _ => json(200, ""),
                }
            })
        }));
        let (handle, _) = handle_with(TokenInjector::bearer());
        handle.valid_token().await.unwrap();
        let service = layer(&handle).layer(client());
        let base = format!("http://{}", upstream.addr);
        for strip_framing in [false, true] {
            let service = service.clone();
            let base = base.clone();
            let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
                let service = service.clone();
                let base = base.clone();
                async move {
                    let uri = format!("{base}{}", req.uri().path());
                    let response = service.oneshot(get(&uri)).await.unwrap();
                    let (mut parts, body) = response.into_parts();
                    if strip_framing {
                        parts.headers.remove("content-length");
                        parts.headers.remove("transfer-encoding");
                    }
                    Response::from_parts(parts, axum::body::Body::new(body))
                }
            });
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            let outer: Client<HttpConnector, Full<Bytes>> =
                Client::builder(TokioExecutor::new()).build_http();
            for (path, want) in [
                ("/whole", "{\"code\":0,\"n\":1}".to_owned()),
                ("/chunked", "{\"code\":0,\"n\":2}".to_owned()),
                ("/open", "{\"code\":0,\"n\":3}".to_owned()),
                ("/big", big.clone()),
                ("/plain", "plain text".to_owned()),
                ("/empty", String::new()),
            ] {
                let response = outer
                    .request(
                        Request::get(format!("http://{addr}{path}"))
                            .body(Full::default())
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                let cl = response.headers().get("content-length").cloned();
                let (got, _, err) = drain(response.into_body()).await;
                assert_eq!(err, None, "{path} strip={strip_framing}");
                assert_eq!(got, want.as_bytes(), "{path} strip={strip_framing}: bytes");
                if let Some(cl) = cl {
                    assert_eq!(
                        cl.to_str().unwrap(),
                        want.len().to_string(),
                        "{path} strip={strip_framing}: content-length"
                    );
                }
            }
        }
    })
    .await
    .expect("bounded");
}

// ------------------------------------------------- 7. connection reuse

/// A whole body judged at first look drops the upstream `Incoming` at
/// once: the connection must still go back to the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_look_whole_keeps_the_connection_alive() {
    tokio::time::timeout(LIMIT, async {
        let server = Server::start(Arc::new(|_, _| {
            Box::pin(async { json(200, "{\"code\":0}") })
        }));
        let (handle, _) = handle_with(TokenInjector::bearer());
        handle.valid_token().await.unwrap();
        let service = layer(&handle).layer(client());
        for _ in 0..10 {
            let response = service
                .clone()
                .oneshot(get(&server.url("/k")))
                .await
                .unwrap();
            let (got, _, _) = drain(response.into_body()).await;
            assert_eq!(got, b"{\"code\":0}");
        }
        assert_eq!(server.requests.load(Ordering::SeqCst), 10);
        // NOTE: hyper puts a connection back in its pool from the
        // connection's own task, so the next request may open a second one
        // before it is back; a body that kept connections from the pool
        // would open one per request.
        let connections = server.connections.load(Ordering::SeqCst);
        assert!(
            connections <= 3,
            "{connections} connections for 10 requests: the pool is not reused"
        );
        let _ = &server.seen;
    })
    .await
    .expect("bounded");
}

/// io-only runtime, a body of unknown length holding one whole expired
/// JSON document: the verdict should not depend on whether its first frame
/// was ready at the first poll. Docs (`peek_deadline`): without a timer
/// "any other body [than Content-Length within the limit] is passed on
/// undetected".
#[test]
fn io_only_unknown_length_verdict_does_not_depend_on_timing() {
    let run_on = |timer: bool, warm: bool, steps: Vec<Step>| {
        let mut builder = tokio::runtime::Builder::new_current_thread();
        builder.enable_io();
        if timer {
            builder.enable_time();
        }
        let rt = builder.build().unwrap();
        rt.block_on(async move {
            let (svc, seen) = scripted_service(move |n, _| {
                if n == 1 {
                    Scripted::new(steps.clone())
                } else {
                    Scripted::new(vec![Step::Data(b"{\"code\":0}")])
                }
            });
            let (handle, _) = handle_with(TokenInjector::bearer());
            if warm {
                // A token at hand: the request takes the first-look path,
                // not `wait_then_send`.
                handle.valid_token().await.unwrap();
            }
            let service = layer(&handle).layer(svc);
            let response = service.oneshot(get("http://h/x")).await.unwrap();
            let _ = drain(response.into_body()).await;
            seen.lock().unwrap().len()
        })
    };
    let ready = || vec![Step::Data(b"{\"code\":40003}"), Step::Pending];
    let later = || {
        vec![
            Step::Pending,
            Step::Data(b"{\"code\":40003}"),
            Step::Pending,
        ]
    };
    let table = [
        (
            "timer, cold",
            run_on(true, false, ready()),
            run_on(true, false, later()),
        ),
        (
            "timer, warm",
            run_on(true, true, ready()),
            run_on(true, true, later()),
        ),
        (
            "io-only, cold",
            run_on(false, false, ready()),
            run_on(false, false, later()),
        ),
        (
            "io-only, warm",
            run_on(false, true, ready()),
            run_on(false, true, later()),
        ),
    ];
    eprintln!("upstream attempts (first frame ready at first poll, one wake later): {table:?}");
    for (name, ready_at_once, a_moment_later) in table {
        assert_eq!(
            ready_at_once, a_moment_later,
            "{name}: upstream attempts, first frame ready at the first poll vs one wake later"
        );
    }
    let cold = table[2].1;
    let warm = table[3].1;
    assert_eq!(
        cold, warm,
        "io-only: same answer, request that waited for its token vs one that had it"
    );
}

/// A whole expired answer that cannot be retried (token too fresh) comes
/// back byte for byte, marked.
#[tokio::test]
async fn whole_expired_not_retried_is_handed_back_intact() {
    let (svc, seen) =
        scripted_service(|_, _| Scripted::new(vec![Step::Data(b"{\"code\":40003,\"msg\":\"x\"}")]));
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let handle = TokenHandle::new(token_source_fn(move |_| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, BoxError>(Token::bearer("t")) }
    }));
    handle.valid_token().await.unwrap();
    let service = layer(&handle).layer(svc);
    let response = service.oneshot(get("http://h/x")).await.unwrap();
    assert!(
        response
            .extensions()
            .get::<tower_auth_refresh::RetrySkipped>()
            .is_some()
    );
    let body = response.into_body();
    assert_eq!(body.size_hint().exact(), Some(24));
    let (got, _, _) = drain(body).await;
    assert_eq!(got, b"{\"code\":40003,\"msg\":\"x\"}");
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// 16 concurrent requests, every first answer a whole `200 {"code":40003}`
/// judged at first look: one refresh for all, one retry each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_look_expiries_share_one_refresh() {
    tokio::time::timeout(LIMIT, async {
        let server = Server::start(Arc::new(|req, _| {
            Box::pin(async move {
                if authorized(&req).as_deref() == Some("Bearer tok-2") {
                    json(200, "{\"code\":0}")
                } else {
                    json(200, "{\"code\":40003}")
                }
            })
        }));
        let (handle, calls) = handle_with(TokenInjector::bearer());
        handle.valid_token().await.unwrap();
        // Take tok-1 first so every request starts with it.
        let service = layer(&handle).layer(client());
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let service = service.clone();
            let url = server.url("/c");
            tasks.push(tokio::spawn(async move {
                let response = service.oneshot(get(&url)).await.unwrap();
                drain(response.into_body()).await.0
            }));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap(), b"{\"code\":0}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2, "one refresh");
        assert_eq!(handle.stats().retries, 16);
        assert_eq!(server.requests.load(Ordering::SeqCst), 32);
    })
    .await
    .expect("bounded");
}

/// Real hyper, io-only runtime, warm handle, chunked body whose first chunk
/// is one whole expired JSON document and whose stream stays open: run it
/// several times and report how often it was retried (the docs say a
/// chunked body is passed on undetected without a timer).
#[test]
fn io_only_open_chunked_over_hyper() {
    let mut outcomes = Vec::new();
    for _ in 0..10 {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let got = rt.block_on(expiry_case(Shape::OpenChunked, true));
        outcomes.push(got.0);
    }
    eprintln!("upstream calls per run: {outcomes:?}");
    assert!(
        outcomes.iter().all(|&n| n == outcomes[0]),
        "io-only open chunked: same answer, different verdicts: {outcomes:?}"
    );
}

/// The one-frame body judged at first look: its Debug, size hint and
/// end-of-stream as the caller sees them before reading.
#[tokio::test]
async fn first_look_whole_variant_is_taken() {
    let (svc, _) = scripted_service(|_, _| Scripted::new(vec![Step::Data(b"{\"code\":0}")]));
    let (handle, _) = handle_with(TokenInjector::bearer());
    handle.valid_token().await.unwrap();
    let service = layer(&handle).layer(svc);
    let response = service.oneshot(get("http://h/x")).await.unwrap();
    let debug = format!("{:?}", response.body());
    assert!(
        debug.contains("buffered_bytes: 10") && debug.contains("inner_done: true"),
        "{debug}"
    );
    let body = response.into_body();
    assert_eq!(body.size_hint().exact(), Some(10));
    assert!(!body.is_end_stream());
}

/// reqwest adapter (`judge_body` → `peek_after(None)`): bodies byte for
/// byte, expiry retried once.
#[cfg(feature = "reqwest")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_bodies_and_expiry() {
    use tower_auth_refresh::AuthRefreshMiddleware;
    tokio::time::timeout(LIMIT, async {
        let at_limit = padded(0, 64);
        let a = at_limit.clone();
        let server = Server::start(Arc::new(move |req, _| {
            let a = a.clone();
            Box::pin(async move {
                let ok = authorized(&req).as_deref() == Some("Bearer tok-2");
                match req.uri().path() {
                    "/expiring" if !ok => json(200, "{\"code\":40003}"),
                    "/expiring-chunked" if !ok => {
                        let frames = vec![
                            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"{\"code\":"))),
                            Ok(Frame::data(Bytes::from_static(b"40003}"))),
                        ];
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(StreamBody::new(futures::stream::iter(frames)).boxed())
                            .unwrap()
                    }
                    "/at-limit" => json(200, a),
                    "/empty" => json(200, ""),
                    _ => json(200, "{\"code\":0}"),
                }
            })
        }));
        let (handle, calls) = handle_with(TokenInjector::bearer());
        handle.valid_token().await.unwrap();
        let mw = AuthRefreshMiddleware::from_layer(&layer(&handle).peek_limit(64));
        let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
            .with(mw)
            .build();
        for (path, want) in [
            ("/at-limit", at_limit.clone()),
            ("/empty", String::new()),
            ("/expiring", "{\"code\":0}".to_owned()),
            ("/expiring-chunked", "{\"code\":0}".to_owned()),
        ] {
            let response = client.get(server.url(path)).send().await.unwrap();
            let got = response.bytes().await.unwrap();
            assert_eq!(&got[..], want.as_bytes(), "{path}");
        }
        // tok-1 rejected once (on /expiring); /expiring-chunked then goes with tok-2.
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(handle.stats().retries, 1);
    })
    .await
    .expect("bounded");
}

/// A raw HTTP/1.1 server that answers every request with `head` then
/// `body`, then closes the connection (a truncated Content-Length body).
async fn raw_server(answer: &'static [u8]) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut read = Vec::new();
                while !read.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = stream.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    read.extend_from_slice(&buf[..n]);
                }
                stream.write_all(answer).await.unwrap();
                stream.flush().await.unwrap();
                // Closed here: the body is cut short.
            });
        }
    });
    addr
}

/// A body cut short by the upstream is never handed on as a clean end:
/// the caller gets the bytes that came and then an error.
#[tokio::test]
async fn truncated_bodies_end_with_an_error() {
    tokio::time::timeout(LIMIT, async {
        let cases: [(&str, &'static [u8], &[u8]); 3] = [
            (
                "head only",
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 40\r\n\r\n",
                b"",
            ),
            (
                "part of the body",
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 40\r\n\r\n{\"code\":0,",
                b"{\"code\":0,",
            ),
            (
                "chunked, no terminator",
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\na\r\n{\"code\":0,\r\n",
                b"{\"code\":0,",
            ),
        ];
        for (name, answer, want) in cases {
            let addr = raw_server(answer).await;
            let (handle, _) = handle_with(TokenInjector::bearer());
            handle.valid_token().await.unwrap();
            let service = layer(&handle).layer(client());
            let response = service.oneshot(get(&format!("http://{addr}/t"))).await.unwrap();
            let (got, _, err) = drain(response.into_body()).await;
            assert_eq!(got, want, "{name}: bytes");
            assert!(err.is_some(), "{name}: the caller must see an error, not a clean end");
        }
    })
    .await
    .expect("bounded");
}

/// The same as `plain_body_is_not_polled_after_none` with a body from
/// the ecosystem: `StreamBody` over `futures::stream::unfold`, which
/// panics when polled after its end. The caller polls once more after
/// `None` (as `frame()` loops written `while let` + one more check do).
#[tokio::test]
async fn plain_unfold_body_polled_after_none_panics() {
    type Unfolded = StreamBody<
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>,
    >;
    let svc = tower::service_fn(|_req: Request<ReplayBody<Full<Bytes>>>| async {
        let stream = futures::stream::unfold(0u8, |n| async move {
            (n < 1).then(|| (Ok(Frame::data(Bytes::from_static(b"hello"))), n + 1))
        });
        let body: Unfolded = StreamBody::new(Box::pin(stream));
        Ok::<_, BoxError>(Response::new(body))
    });
    let (handle, _) = handle_with(TokenInjector::bearer());
    handle.valid_token().await.unwrap();
    let service = AuthRefreshLayer::new(handle).layer(svc);
    let response = service.oneshot(get("http://h/x")).await.unwrap();
    let mut body = response.into_body();
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "hello"
    );
    assert!(body.frame().await.is_none());
    let again = tokio::spawn(async move { body.frame().await.is_none() }).await;
    assert!(
        matches!(again, Ok(true)),
        "polling the finished ResponseBody again: {again:?}"
    );
}

/// `size_hint` and `is_end_stream` of each variant, checked before every
/// frame the caller reads: the hint brackets what is left, an exact hint
/// is what is left, and the end is said only when nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_hint_and_end_track_what_is_left() {
    tokio::time::timeout(LIMIT, async {
        let server = Server::start(Arc::new(|req, _| {
            Box::pin(async move {
                let path = req.uri().path().to_owned();
                let (tx, rx) =
                    futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, Infallible>>();
                let mut builder = Response::builder().header("content-type", "application/json");
                let text = Bytes::from_static(b"{\"code\":0,\"data\":\"abcdefghij\"}");
                match path.as_str() {
                    "/whole" => return json(200, text),
                    "/big" => return json(200, vec![b'z'; 70_000]),
                    "/length-two" => {
                        builder = builder.header("content-length", text.len().to_string());
                    }
                    _ => {}
                }
                tx.unbounded_send(Ok(Frame::data(text.slice(..7)))).unwrap();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let _ = tx.unbounded_send(Ok(Frame::data(text.slice(7..))));
                });
                builder.body(StreamBody::new(rx).boxed()).unwrap()
            })
        }));
        let (handle, _) = handle_with(TokenInjector::bearer());
        handle.valid_token().await.unwrap();
        let service = layer(&handle)
            .peek_deadline(Duration::from_secs(5))
            .layer(client());
        for path in ["/whole", "/big", "/length-two", "/chunked-two"] {
            let response = service
                .clone()
                .oneshot(get(&server.url(path)))
                .await
                .unwrap();
            let variant = format!("{:?}", response.body());
            let mut body = std::pin::pin!(response.into_body());
            let mut steps = Vec::new();
            loop {
                let hint = body.size_hint();
                let end = body.is_end_stream();
                match body.frame().await {
                    Some(Ok(frame)) => {
                        let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                        steps.push((hint, end, len));
                    }
                    Some(Err(err)) => panic!("{path}: {err}"),
                    None => {
                        steps.push((hint, end, 0));
                        break;
                    }
                }
            }
            let total: u64 = steps.iter().map(|s| s.2).sum();
            let mut left = total;
            for (i, (hint, end, len)) in steps.iter().enumerate() {
                let last = i + 1 == steps.len();
                assert!(
                    hint.lower() <= left,
                    "{path} {variant} step {i}: lower {} > left {left}",
                    hint.lower()
                );
                if let Some(upper) = hint.upper() {
                    assert!(
                        upper >= left,
                        "{path} {variant} step {i}: upper {upper} < left {left}"
                    );
                }
                if let Some(exact) = hint.exact() {
                    assert_eq!(exact, left, "{path} {variant} step {i}: exact hint");
                }
                if *end {
                    assert!(
                        last,
                        "{path} {variant} step {i}: is_end_stream while frames followed"
                    );
                }
                left -= len;
            }
        }
    })
    .await
    .expect("bounded");
}

/// HTTP/2: a JSON answer that is only trailers (no data), and one whose
/// data is followed by trailers, through an axum proxy that hands our body
/// on: the outer h2 client sees the same data and trailers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_trailers_through_a_proxy() {
    tokio::time::timeout(LIMIT, async {
        let upstream = Server::start(Arc::new(|req, _| {
            Box::pin(async move {
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                let mut frames = Vec::new();
                if req.uri().path() == "/data" {
                    frames.push(Ok::<_, Infallible>(Frame::data(Bytes::from_static(
                        b"{\"code\":0}",
                    ))));
                }
                frames.push(Ok(Frame::trailers(trailers)));
                Response::builder()
                    .header("content-type", "application/json")
                    .body(StreamBody::new(futures::stream::iter(frames)).boxed())
                    .unwrap()
            })
        }));
        let (handle, _) = handle_with(TokenInjector::bearer());
        handle.valid_token().await.unwrap();
        let h2: HttpClient = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        let service = layer(&handle).layer(h2);
        let base = format!("http://{}", upstream.addr);
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let service = service.clone();
            let uri = format!("{base}{}", req.uri().path());
            async move {
                let response = service.oneshot(get(&uri)).await.unwrap();
                let (parts, body) = response.into_parts();
                Response::from_parts(parts, axum::body::Body::new(body))
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let outer: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        for (path, want) in [
            ("/data", &b"{\"code\":0}"[..]),
            ("/trailers-only", &b""[..]),
        ] {
            let response = outer
                .request(
                    Request::get(format!("http://{addr}{path}"))
                        .body(Full::default())
                        .unwrap(),
                )
                .await
                .unwrap();
            let (got, trailers, err) = drain(response.into_body()).await;
            assert_eq!(err, None, "{path}");
            assert_eq!(got, want, "{path}");
            assert_eq!(
                trailers.and_then(|t| t.get("grpc-status").cloned()),
                Some(HeaderValue::from_static("0")),
                "{path}: trailers through the proxy"
            );
        }
    })
    .await
    .expect("bounded");
}
