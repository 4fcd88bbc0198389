//! Detection never harms a healthy response, through the whole layer over a
//! hyper-util client against a real upstream on 127.0.0.1:
//!
//! * a success envelope whose message mentions "expired" is not taken for an
//!   expired token, so a POST is not sent twice; the vendor formats of
//!   expired tokens still are;
//! * a `Bearer error="insufficient_scope"` challenge is not overruled by a
//!   JSON body rule;
//! * streamed JSON (a watch, a chunked `application/json` stream, a
//!   compressed stream) reaches the caller event by event: the test sends
//!   the next event only after the caller has received the first one, so a
//!   layer that held the head back would hang (and fail at the time limit);
//! * a JSON body starting with a UTF-8 byte order mark is still read.

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
use common::{Issuer, body_text, client, get, post};
use futures::StreamExt;
use futures::channel::mpsc;
use http::StatusCode;
use http_body_util::BodyExt;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::{
    AuthRefreshLayer, ExpiryDetectorExt, JsonBodyRule, Token, TokenHandle, Unauthorized,
    body_detector_fn,
};

/// Every test is bounded: a hang is a failure, not a stuck CI job.
const LIMIT: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Upstream {
    /// POSTs to `/orders` so far.
    orders: AtomicUsize,
    /// Requests by path.
    requests: Mutex<Vec<(String, Option<String>)>>,
    /// The events of the next streamed response.
    events: Mutex<Option<mpsc::UnboundedReceiver<Bytes>>>,
}

async fn start() -> (String, Arc<Upstream>) {
    let state = Arc::new(Upstream::default());
    let app = Router::new()
        .route("/{*path}", any(answer))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), state)
}

fn json(status: StatusCode, body: &'static str) -> Response {
    (status, [("content-type", "application/json")], body).into_response()
}

async fn answer(State(state): State<Arc<Upstream>>, request: Request) -> Response {
    let path = request.uri().path().to_owned();
    let authorization = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    state
        .requests
        .lock()
        .unwrap()
        .push((path.clone(), authorization.clone()));
    let rejected = authorization.as_deref() == Some("Bearer tok-1");
    let stream_type = match path.as_str() {
        "/watch" => Some(("application/json;stream=watch", None)),
        "/chunked-json" => Some(("application/json", None)),
        "/gzip-json" => Some(("application/json", Some("gzip"))),
        _ => None,
    };
    if let Some((content_type, encoding)) = stream_type {
        let events = state.events.lock().unwrap().take().unwrap();
        let body = AxumBody::from_stream(events.map(Ok::<_, Infallible>));
        let mut response = ([("content-type", content_type)], body).into_response();
        if let Some(encoding) = encoding {
            response
                .headers_mut()
                .insert("content-encoding", encoding.parse().unwrap());
        }
        return response;
    }
    match path.as_str() {
        "/orders" => {
            let n = state.orders.fetch_add(1, Ordering::SeqCst) + 1;
            let text = format!(r#"{{"code":0,"msg":"order {n} created; coupon expired"}}"#);
            ([("content-type", "application/json")], text).into_response()
        }
        "/orders/float-zero" => {
            let n = state.orders.fetch_add(1, Ordering::SeqCst) + 1;
            let text = format!(
                r#"{{"code":0.0,"msg":"order {n} created; old token expired, new token issued"}}"#
            );
            ([("content-type", "application/json")], text).into_response()
        }
        "/scope/utf8" | "/scope/token68" | "/scope/spaces" | "/scope/zurich" => {
            let challenge: &[u8] = match path.as_str() {
                "/scope/utf8" => {
                    "Bearer error=\"insufficient_scope\", error_description=\"权限不足\"".as_bytes()
                }
                "/scope/token68" => br#"Negotiate abc==, Bearer error="insufficient_scope""#,
                "/scope/spaces" => br#"Bearer  error="insufficient_scope""#,
                _ => "Bearer realm=\"Zürich\", error=\"insufficient_scope\"".as_bytes(),
            };
            let mut response = json(
                StatusCode::UNAUTHORIZED,
                r#"{"statusCode":401,"message":"Unauthorized"}"#,
            );
            response.headers_mut().insert(
                "www-authenticate",
                http::HeaderValue::from_bytes(challenge).unwrap(),
            );
            response
        }
        "/scope" => (
            StatusCode::UNAUTHORIZED,
            [
                ("content-type", "application/json"),
                ("www-authenticate", r#"Bearer error="insufficient_scope""#),
            ],
            r#"{"statusCode":401,"message":"Unauthorized"}"#,
        )
            .into_response(),
        _ if !rejected => json(StatusCode::OK, r#"{"code":0,"msg":"ok"}"#),
        "/vendor/40003" => json(StatusCode::OK, r#"{"code":40003,"msg":"token过期或异常"}"#),
        "/vendor/open" => {
            // The whole JSON error, then a transfer that does not end.
            let error = Bytes::from_static(r#"{"code":40003,"msg":"token过期或异常"}"#.as_bytes());
            let body = futures::stream::once(async move { Ok::<_, Infallible>(error) })
                .chain(futures::stream::pending());
            (
                [("content-type", "application/json")],
                AxumBody::from_stream(body),
            )
                .into_response()
        }
        "/vendor/401" => json(StatusCode::OK, r#"{"code":401,"msg":"Token无效"}"#),
        "/vendor/40001" => json(StatusCode::OK, r#"{"code":40001,"msg":"access denied"}"#),
        "/vendor/40002" => json(StatusCode::OK, r#"{"code":"40002"}"#),
        "/vendor/error" => json(
            StatusCode::FORBIDDEN,
            r#"{"error":"Token expired, please refresh"}"#,
        ),
        "/vendor/bom" => json(
            StatusCode::OK,
            "\u{feff}{\"code\":40003,\"msg\":\"无效token\"}",
        ),
        _ => (StatusCode::NOT_FOUND, "no such path").into_response(),
    }
}

/// A handle whose current token is `tok-1` (rejected by `/vendor/*`) and
/// whose next one is `tok-2`.
async fn handle_with_tok1() -> (TokenHandle, Issuer) {
    let issuer = Issuer::detached();
    let handle = TokenHandle::builder(issuer.source())
        .min_token_age(Duration::ZERO)
        .build();
    handle.refresh_now().await.unwrap();
    (handle, issuer)
}

/// `{"item":1}` posted to `url` through `service`, within `LIMIT`.
async fn post_item<S, B>(service: S, url: &str) -> http::Response<B>
where
    S: tower::Service<http::Request<http_body_util::Full<Bytes>>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
{
    tokio::time::timeout(LIMIT, service.oneshot(post(url, r#"{"item":1}"#)))
        .await
        .unwrap()
        .unwrap()
}

fn json_layer(handle: TokenHandle) -> AuthRefreshLayer {
    AuthRefreshLayer::new(handle).detector(Unauthorized::new().or(JsonBodyRule::default_rules()))
}

#[tokio::test]
async fn a_success_that_mentions_expired_is_not_replayed() {
    let (base, upstream) = start().await;
    let (handle, issuer) = handle_with_tok1().await;
    let service = ServiceBuilder::new()
        .layer(json_layer(handle))
        .service(client());
    let response = post_item(service, &format!("{base}/orders")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        body_text(response).await,
        r#"{"code":0,"msg":"order 1 created; coupon expired"}"#
    );
    assert_eq!(upstream.orders.load(Ordering::SeqCst), 1, "sent once");
    assert_eq!(issuer.calls(), 1, "no refresh beyond the first token");
}

#[tokio::test]
async fn the_vendor_formats_of_an_expired_token_are_still_detected() {
    let (base, upstream) = start().await;
    for path in [
        "/vendor/40003",
        "/vendor/401",
        "/vendor/40001",
        "/vendor/40002",
        "/vendor/error",
        "/vendor/bom",
        "/vendor/open",
    ] {
        let (handle, issuer) = handle_with_tok1().await;
        let service = ServiceBuilder::new()
            .layer(json_layer(handle))
            .service(client());
        let response = tokio::time::timeout(LIMIT, service.oneshot(get(&format!("{base}{path}"))))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(
            tokio::time::timeout(LIMIT, body_text(response))
                .await
                .unwrap(),
            r#"{"code":0,"msg":"ok"}"#,
            "{path}"
        );
        assert_eq!(issuer.calls(), 2, "{path}: refreshed once");
        let seen: Vec<Option<String>> = upstream
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, a)| a.clone())
            .collect();
        assert_eq!(
            seen,
            [Some("Bearer tok-1".into()), Some("Bearer tok-2".into())],
            "{path}"
        );
    }
}

#[tokio::test]
async fn an_insufficient_scope_challenge_is_not_overruled_by_the_body() {
    let (base, upstream) = start().await;
    let (handle, issuer) = handle_with_tok1().await;
    let service = ServiceBuilder::new()
        .layer(json_layer(handle))
        .service(client());
    let response = post_item(service, &format!("{base}/scope")).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        body_text(response).await,
        r#"{"statusCode":401,"message":"Unauthorized"}"#
    );
    assert_eq!(upstream.requests.lock().unwrap().len(), 1, "sent once");
    assert_eq!(issuer.calls(), 1, "not refreshed");
}

/// Challenges that are valid HTTP but that a strict parser rejects (UTF-8
/// in a quoted string, a token68 challenge first, two spaces after the
/// scheme): the scope error must still be found, so the POST is sent once.
#[tokio::test]
async fn an_insufficient_scope_challenge_in_any_legal_spelling_is_not_replayed() {
    for path in [
        "/scope/utf8",
        "/scope/token68",
        "/scope/spaces",
        "/scope/zurich",
    ] {
        let (base, upstream) = start().await;
        let (handle, issuer) = handle_with_tok1().await;
        let service = ServiceBuilder::new()
            .layer(json_layer(handle))
            .service(client());
        let response = post_item(service, &format!("{base}{path}")).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(
            upstream.requests.lock().unwrap().len(),
            1,
            "{path}: sent once"
        );
        assert_eq!(issuer.calls(), 1, "{path}: not refreshed");
    }
}

/// `{"code":0.0}` is the success code 0: its message is not read, and the
/// POST is not sent again.
#[tokio::test]
async fn a_success_code_written_as_a_float_is_not_replayed() {
    let (base, upstream) = start().await;
    let (handle, issuer) = handle_with_tok1().await;
    let service = ServiceBuilder::new()
        .layer(json_layer(handle))
        .service(client());
    let response = post_item(service, &format!("{base}/orders/float-zero")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(upstream.orders.load(Ordering::SeqCst), 1, "sent once");
    assert_eq!(issuer.calls(), 1, "no refresh beyond the first token");
}

/// Sends a request to `path`, whose response streams the events the test
/// sends, and checks that each event reaches the caller before the next one
/// is sent.
async fn events_arrive_one_by_one(path: &str, layer: AuthRefreshLayer) {
    let (base, upstream) = start().await;
    let (events, receiver) = mpsc::unbounded();
    *upstream.events.lock().unwrap() = Some(receiver);
    let service = ServiceBuilder::new().layer(layer).service(client());
    let event =
        |n: usize| Bytes::from(format!("{{\"type\":\"ADDED\",\"object\":{{\"n\":{n}}}}}\n"));
    events.unbounded_send(event(1)).unwrap();

    let response = tokio::time::timeout(LIMIT, service.oneshot(get(&format!("{base}{path}"))))
        .await
        .expect("the response head arrives while the stream is open")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut received = Vec::new();
    for n in 1..=3 {
        let want = event(n);
        while received.len() < want.len() {
            let frame = tokio::time::timeout(LIMIT, body.frame())
                .await
                .expect("each event arrives before the next one is sent")
                .expect("the stream is still open")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                received.extend_from_slice(&data);
            }
        }
        assert_eq!(received, want, "event {n} arrived whole, and alone");
        received.clear();
        if n < 3 {
            events.unbounded_send(event(n + 1)).unwrap();
        }
    }
    drop(events);
    let rest = tokio::time::timeout(LIMIT, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert!(rest.is_empty());
}

/// A layer whose detector asks for every body and that would wait an hour
/// for it: only the rule that streams and compressed bodies are never read
/// lets their events through.
fn never_peek_layer(handle: TokenHandle) -> AuthRefreshLayer {
    AuthRefreshLayer::new(handle)
        .detector(
            Unauthorized::new()
                .or(JsonBodyRule::default_rules())
                .or(body_detector_fn(|_, body| {
                    body.starts_with(b"{\"code\":40003")
                })),
        )
        .peek_deadline(Duration::from_secs(3600))
}

#[tokio::test]
async fn a_watch_stream_reaches_the_caller_event_by_event() {
    let (handle, _issuer) = handle_with_tok1().await;
    events_arrive_one_by_one("/watch", never_peek_layer(handle)).await;
}

#[tokio::test]
async fn a_compressed_json_stream_is_not_peeked() {
    let (handle, _issuer) = handle_with_tok1().await;
    events_arrive_one_by_one("/gzip-json", never_peek_layer(handle)).await;
}

#[tokio::test]
async fn a_chunked_json_stream_is_passed_on_after_the_peek_deadline() {
    // The default deadline: a few milliseconds.
    let (handle, _issuer) = handle_with_tok1().await;
    events_arrive_one_by_one("/chunked-json", json_layer(handle)).await;
}

/// A runtime built without tokio's timer (`enable_io()` only): the JSON
/// rule judges a body of known length and passes one of unknown length on
/// unread; nothing panics.
#[test]
fn a_runtime_without_a_timer_gets_its_json_answers() {
    let servers = tokio::runtime::Runtime::new().unwrap();
    let (base, upstream) = servers.block_on(start());
    let no_timer = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    no_timer.block_on(async {
        let issuer = Issuer::detached();
        let handle = TokenHandle::new(issuer.source());
        // A token the upstream accepts: a known-length JSON success.
        handle.set_token(Token::bearer("preset")).unwrap();
        let service = ServiceBuilder::new()
            .layer(json_layer(handle.clone()))
            .service(client());
        let response = service
            .oneshot(get(&format!("{base}/items")))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body_text(response).await, r#"{"code":0,"msg":"ok"}"#);

        // A streamed JSON body: passed on unread, its first bytes arrive.
        handle.set_token(Token::bearer("tok-1")).unwrap();
        let service = ServiceBuilder::new()
            .layer(json_layer(handle))
            .service(client());
        let response = service
            .oneshot(get(&format!("{base}/vendor/open")))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, r#"{"code":40003,"msg":"token过期或异常"}"#);
        assert_eq!(issuer.calls(), 0, "nothing refreshed");
    });
    assert_eq!(upstream.requests.lock().unwrap().len(), 2);
}
