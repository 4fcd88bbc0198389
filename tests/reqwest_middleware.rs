//! `AuthRefreshMiddleware` in a reqwest-middleware client, against a real
//! upstream on 127.0.0.1: an expired token is replaced, a rejected one is
//! refreshed once and the request retried with its body, a streaming body is
//! sent once and never retried.
#![cfg(feature = "reqwest")]

mod common;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::{Issuer, Upstream};
use http_body::Frame;
use http_body_util::StreamBody;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tower_auth_refresh::{
    AuthRefreshLayer, AuthRefreshMiddleware, ExpiryDetectorExt, JsonBodyRule, Origin,
    RefreshReason, RetrySkipped, SkipReason, Token, TokenHandle, TokenInjector,
};

fn handle(issuer: &Issuer) -> TokenHandle {
    TokenHandle::builder(issuer.source())
        .min_token_age(Duration::ZERO)
        .build()
}

fn client(middleware: AuthRefreshMiddleware) -> ClientWithMiddleware {
    ClientBuilder::new(reqwest::Client::new())
        .with(middleware)
        .build()
}

fn authorizations(upstream: &Upstream, path: &str) -> Vec<Option<String>> {
    upstream
        .seen()
        .into_iter()
        .filter(|seen| seen.path == path)
        .map(|seen| seen.authorization)
        .collect()
}

#[tokio::test]
async fn a_token_past_its_expiry_is_replaced_before_the_request_goes_out() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream);
    let handle = handle(&issuer);
    handle
        .set_token(
            Token::bearer("stale").with_expires_at(SystemTime::now() - Duration::from_secs(1)),
        )
        .unwrap();
    let client = client(AuthRefreshMiddleware::new(handle.clone()));

    let response = client.get(upstream.url("/orders")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "ok tok-1 ");
    assert_eq!(
        authorizations(&upstream, "/orders"),
        vec![Some("Bearer tok-1".to_owned())],
        "the expired token never went out"
    );
    assert_eq!(issuer.calls(), 1);
    assert_eq!(
        *issuer.reasons.lock().unwrap(),
        vec![RefreshReason::Expired]
    );
}

#[tokio::test]
async fn a_rejected_token_is_refreshed_once_and_each_request_retried_with_its_body() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream);
    let handle = handle(&issuer);
    let client = client(AuthRefreshMiddleware::new(handle.clone()));
    let first = client.get(upstream.url("/warm")).send().await.unwrap();
    assert_eq!(first.text().await.unwrap(), "ok tok-1 ");

    upstream.revoke_all();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let client = client.clone();
        let url = upstream.url("/orders");
        tasks.push(tokio::spawn(async move {
            let response = client
                .post(url)
                .body(format!("order {i}"))
                .send()
                .await
                .unwrap();
            (response.status(), response.text().await.unwrap(), i)
        }));
    }
    for task in tasks {
        let (status, text, i) = task.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(
            text,
            format!("ok tok-2 order {i}"),
            "replayed with its body"
        );
    }

    assert_eq!(
        issuer.calls(),
        2,
        "one refresh for the ten rejected requests"
    );
    let seen: Vec<_> = upstream
        .seen()
        .into_iter()
        .filter(|s| s.path == "/orders")
        .collect();
    let rejected = seen.iter().filter(|s| !s.accepted).count();
    assert!(rejected >= 1);
    assert!(
        seen.iter()
            .filter(|s| !s.accepted)
            .all(|s| s.authorization.as_deref() == Some("Bearer tok-1"))
    );
    assert!(
        seen.iter()
            .filter(|s| s.accepted)
            .all(|s| s.authorization.as_deref() == Some("Bearer tok-2"))
    );
    assert_eq!(seen.len(), 10 + rejected);
    assert_eq!(handle.stats().retries, rejected as u64);
}

#[tokio::test]
async fn a_peeked_response_handed_back_keeps_its_url() {
    let upstream = Upstream::start().await;
    // The upstream knows none of these tokens, and the default minimum token
    // age keeps a just-issued token from being refreshed again: the peeked
    // answer itself comes back.
    let issuer = Issuer::detached();
    let layer = AuthRefreshLayer::new(TokenHandle::new(issuer.source()))
        .detector(JsonBodyRule::default_rules());
    let client = client(AuthRefreshMiddleware::from_layer(&layer));
    let url = upstream.url("/json/items?page=2");

    let response = client.get(&url).send().await.unwrap();
    assert_eq!(
        response
            .extensions()
            .get::<RetrySkipped>()
            .map(|m| m.reason),
        Some(SkipReason::TokenTooFresh)
    );
    assert_eq!(response.url().as_str(), url, "the URL survives the peek");
    assert_eq!(
        response.text().await.unwrap(),
        r#"{"code":40003,"msg":"token过期","data":null}"#,
        "the body survives the peek"
    );
    assert_eq!(issuer.calls(), 1);
}

#[tokio::test]
async fn a_business_code_in_a_200_is_detected_and_the_request_retried() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream);
    let layer = AuthRefreshLayer::new(handle(&issuer)).detector(JsonBodyRule::default_rules());
    let client = client(AuthRefreshMiddleware::from_layer(&layer));
    let url = upstream.url("/json/items?page=2");
    client.get(&url).send().await.unwrap();

    upstream.revoke_all();
    let response = client.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "ok tok-2 ");
    assert_eq!(
        authorizations(&upstream, "/json/items"),
        ["tok-1", "tok-1", "tok-2"].map(|t| Some(format!("Bearer {t}")))
    );
    assert_eq!(issuer.calls(), 2);
}

#[tokio::test]
async fn a_streaming_body_is_sent_once_and_never_retried() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream);
    let handle = handle(&issuer);
    let client = client(AuthRefreshMiddleware::new(handle.clone()));
    client.get(upstream.url("/warm")).send().await.unwrap();

    upstream.revoke_all();
    let chunks = ["part one, ", "part two"]
        .map(|chunk| Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(chunk.as_bytes()))));
    let body = reqwest::Body::wrap(StreamBody::new(futures::stream::iter(chunks)));
    let response = client
        .post(upstream.url("/upload"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401, "the upstream's answer, unchanged");
    assert_eq!(
        response
            .extensions()
            .get::<RetrySkipped>()
            .map(|m| m.reason),
        Some(SkipReason::BodyNotCloneable)
    );

    let uploads: Vec<_> = upstream
        .seen()
        .into_iter()
        .filter(|s| s.path == "/upload")
        .collect();
    assert_eq!(uploads.len(), 1, "sent once");
    assert_eq!(uploads[0].body, "part one, part two");

    // The refresh still happened for the requests that follow.
    let next = client.get(upstream.url("/orders")).send().await.unwrap();
    assert_eq!(next.text().await.unwrap(), "ok tok-2 ");
    assert_eq!(issuer.calls(), 2);
    let stats = handle.stats();
    assert_eq!((stats.retries, stats.skipped_retries), (0, 1));
}

#[tokio::test]
async fn a_middleware_bound_to_an_origin_sends_no_token_elsewhere() {
    let api = Upstream::start().await;
    let elsewhere = Upstream::start().await;
    let issuer = Issuer::new(&api);
    let layer =
        AuthRefreshLayer::new(handle(&issuer)).origin(Origin::parse(&api.url("/")).unwrap());
    let client = client(AuthRefreshMiddleware::from_layer(&layer));

    let response = client.get(elsewhere.url("/x")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(authorizations(&elsewhere, "/x"), vec![None]);
    assert_eq!(issuer.calls(), 0);

    let response = client.get(api.url("/x")).send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "ok tok-1 ");
}

#[tokio::test]
async fn a_failed_refresh_is_a_typed_error_and_no_request_goes_out() {
    let upstream = Upstream::start().await;
    let handle = TokenHandle::new(tower_auth_refresh::token_source_fn(|_| async {
        Err::<Token, _>(std::io::Error::other("token endpoint down"))
    }));
    let client = client(AuthRefreshMiddleware::new(handle));

    let err = client
        .get(upstream.url("/orders"))
        .send()
        .await
        .unwrap_err();
    let reqwest_middleware::Error::Middleware(err) = err else {
        panic!("expected a middleware error, got {err:?}");
    };
    assert!(
        err.downcast_ref::<tower_auth_refresh::RefreshFailed>()
            .is_some(),
        "{err:?}"
    );
    assert!(upstream.seen().is_empty(), "never sent without a token");
}

#[tokio::test]
async fn a_query_token_is_not_in_the_errors_the_adapter_returns() {
    // A port nothing listens on: the request fails with a connection error.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let issuer = Issuer::detached();
    let handle = TokenHandle::builder(issuer.source())
        .injector(TokenInjector::query("access_token"))
        .build();
    let client = client(AuthRefreshMiddleware::new(handle));
    let err = client
        .get(format!("http://{addr}/items?page=2"))
        .send()
        .await
        .unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("tok-1"), "{shown}");
    assert!(!shown.contains("access_token"), "{shown}");
    assert!(err.is_connect(), "{shown}");
}

#[tokio::test]
async fn a_percent_encoded_query_key_counts_as_the_callers_token() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream);
    let handle = TokenHandle::builder(issuer.source())
        .injector(TokenInjector::query("access_token"))
        .build();
    let client = client(AuthRefreshMiddleware::new(handle));
    client
        .get(upstream.url("/p?access%5Ftoken=mine"))
        .send()
        .await
        .unwrap();
    assert_eq!(issuer.calls(), 0, "not ours to refresh");
    assert_eq!(
        upstream.seen()[0].query.as_deref(),
        Some("access%5Ftoken=mine")
    );
}

/// A server that answers every request with `answer`, counting requests.
async fn raw_server(answer: Vec<u8>) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = count.clone();
    let answer = std::sync::Arc::new(answer);
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut request = vec![0u8; 65536];
                let _ = socket.read(&mut request).await;
                let _ = socket.write_all(&answer).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (base, count)
}

#[tokio::test]
async fn an_insufficient_scope_challenge_with_utf8_is_not_replayed() {
    let mut answer = "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n\
        www-authenticate: Bearer error=\"insufficient_scope\", error_description=\"权限不足\"\r\n\
        content-length: 2\r\nconnection: close\r\n\r\n"
        .as_bytes()
        .to_vec();
    answer.extend_from_slice(b"{}");
    let (base, count) = raw_server(answer).await;
    let issuer = Issuer::detached();
    let handle = handle(&issuer);
    handle.refresh_now().await.unwrap();
    let layer = AuthRefreshLayer::new(handle)
        .detector(tower_auth_refresh::Unauthorized::new().or(JsonBodyRule::default_rules()));
    let response = client(AuthRefreshMiddleware::from_layer(&layer))
        .post(format!("{base}/orders"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        count.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "sent once"
    );
    assert_eq!(issuer.calls(), 1, "not refreshed");
}

#[tokio::test]
async fn a_query_token_is_not_in_the_response_handed_back() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream);
    let handle = TokenHandle::builder(issuer.source())
        .injector(TokenInjector::query("access_token"))
        .min_token_age(Duration::ZERO)
        .build();
    let client = client(AuthRefreshMiddleware::new(handle));
    // Always 401: refreshed once, retried once, the 401 is handed back.
    let response = client
        .get(upstream.url("/always-401?page=2"))
        .send()
        .await
        .unwrap();
    assert!(
        upstream.seen()[0]
            .query
            .as_deref()
            .is_some_and(|q| q.contains("access_token=tok-1")),
        "the token was sent"
    );
    assert_eq!(
        response.url().as_str(),
        upstream.url("/always-401?page=2"),
        "the caller's URL, without the token"
    );
    let shown = format!("{response:?}");
    assert!(!shown.contains("access_token"), "{shown}");
    let err = response.error_for_status().unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("access_token"), "{shown}");
    assert!(!shown.contains("tok-"), "{shown}");

    // A success is handed back without the token too.
    let response = client.get(upstream.url("/items")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.url().as_str(), upstream.url("/items"));
}

/// reqwest follows a redirect to another origin (and drops the
/// `Authorization` header on the way): that origin's 401 is not about our
/// token, which it never saw.
#[tokio::test]
async fn a_foreign_origins_401_after_a_redirect_does_not_refresh_our_token() {
    let ours = Upstream::start().await;
    let other = Upstream::start().await;
    let issuer = Issuer::new(&ours);
    let handle = handle(&issuer);
    let client = client(AuthRefreshMiddleware::new(handle));
    let target = other.url("/landing");
    let response = client
        .get(ours.url(&format!("/redirect?to={target}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401, "the other origin's answer");
    assert_eq!(response.url().as_str(), target);
    assert_eq!(issuer.calls(), 1, "our token was not refreshed");
    assert_eq!(other.seen().len(), 1, "not retried");
    assert_eq!(other.seen()[0].authorization, None);
}

/// reqwest sends the URL it followed a redirect from as `Referer`, query
/// token included; the documented remedy, `referer(false)`, keeps the
/// token from the other origin.
#[tokio::test]
async fn a_query_token_does_not_follow_a_redirect_with_referer_off() {
    let other = Upstream::start().await;
    let target = other.url("/landing");
    let redirect = format!(
        "HTTP/1.1 302 Found\r\nlocation: {target}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    let (base, count) = raw_server(redirect.into_bytes()).await;
    let issuer = Issuer::detached();
    let handle = TokenHandle::builder(issuer.source())
        .injector(TokenInjector::query("access_token"))
        .min_token_age(Duration::ZERO)
        .build();
    let client = ClientBuilder::new(reqwest::Client::builder().referer(false).build().unwrap())
        .with(AuthRefreshMiddleware::new(handle))
        .build();
    let response = client
        .get(format!("{base}/start?page=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(response.url().as_str(), target);
    let seen = other.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/landing");
    assert_eq!(seen[0].query, None);
    assert!(seen[0].headers.get("referer").is_none());
    assert_eq!(
        issuer.calls(),
        1,
        "the other origin's 401 refreshed nothing"
    );
}

/// The DPoP settings of a layer carry over to the middleware: each attempt
/// gets `Authorization: DPoP` and a proof of its own (verified here with
/// jsonwebtoken), and a nonce challenge is answered once when the body can
/// be cloned.
#[cfg(feature = "dpop")]
mod dpop {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use axum::Router;
    use axum::extract::{Request, State};
    use axum::response::{IntoResponse, Response};
    use axum::routing::any;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};
    use tower_auth_refresh::dpop::DpopKey;
    use tower_auth_refresh::{
        AuthRefreshLayer, AuthRefreshMiddleware, RefreshContext, RetrySkipped, SkipReason, Token,
        TokenHandle, token_source_fn,
    };

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Attempt {
        authorization: Option<String>,
        nonce: Option<String>,
        body: Bytes,
        status: u16,
    }

    #[derive(Default)]
    struct Server {
        addr: Mutex<String>,
        nonce: Mutex<String>,
        attempts: Mutex<Vec<Attempt>>,
    }

    fn sha256_b64(text: &str) -> String {
        use base64::Engine;
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest)
    }

    /// The proof's claims when it verifies for this request and token.
    fn verified(proof: &str, method: &str, htu: &str, token: &str) -> Option<serde_json::Value> {
        let header = jsonwebtoken::decode_header(proof).ok()?;
        let key = jsonwebtoken::DecodingKey::from_jwk(header.jwk.as_ref()?).ok()?;
        let mut validation = jsonwebtoken::Validation::new(header.alg);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        let claims = jsonwebtoken::decode::<serde_json::Value>(proof, &key, &validation)
            .ok()?
            .claims;
        let ok = header.typ.as_deref() == Some("dpop+jwt")
            && claims["htm"] == method
            && claims["htu"] == htu
            && claims["ath"] == sha256_b64(token);
        ok.then_some(claims)
    }

    async fn resource(State(server): State<Arc<Server>>, request: Request) -> Response {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let authorization = parts
            .headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned());
        let token = authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("DPoP "))
            .unwrap_or_default();
        let htu = format!("{}{}", server.addr.lock().unwrap(), parts.uri.path());
        let current = server.nonce.lock().unwrap().clone();
        let claims = parts
            .headers
            .get("dpop")
            .and_then(|proof| verified(proof.to_str().ok()?, parts.method.as_str(), &htu, token));
        let nonce = claims
            .as_ref()
            .and_then(|c| c["nonce"].as_str().map(str::to_owned));
        let mut headers = HeaderMap::new();
        headers.insert("dpop-nonce", current.parse().unwrap());
        let status = if claims.is_none() {
            StatusCode::BAD_REQUEST
        } else if nonce.as_deref() != Some(current.as_str()) {
            headers.insert(
                "www-authenticate",
                r#"DPoP error="use_dpop_nonce""#.parse().unwrap(),
            );
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::OK
        };
        server.attempts.lock().unwrap().push(Attempt {
            authorization,
            nonce,
            body,
            status: status.as_u16(),
        });
        (status, headers).into_response()
    }

    async fn start() -> (Arc<Server>, String) {
        let server = Arc::new(Server::default());
        *server.nonce.lock().unwrap() = "nonce-0".to_owned();
        let app = Router::new()
            .route("/{*path}", any(resource))
            .with_state(server.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        *server.addr.lock().unwrap() = base.clone();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (server, base)
    }

    fn issuer() -> (TokenHandle, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let handle = TokenHandle::builder(token_source_fn(move |_cx: RefreshContext| {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                Ok::<_, Infallible>(
                    Token::new(format!("tok-{n}"), "DPoP")
                        .with_expires_in(Duration::from_secs(3600)),
                )
            }
        }))
        .min_token_age(Duration::ZERO)
        .build();
        (handle, calls)
    }

    fn take(server: &Server) -> Vec<Attempt> {
        std::mem::take(&mut *server.attempts.lock().unwrap())
    }

    #[tokio::test]
    async fn a_dpop_layer_makes_the_middleware_send_proofs_and_answer_nonce_challenges() {
        let (server, base) = start().await;
        let (handle, calls) = issuer();
        let layer = AuthRefreshLayer::new(handle.clone()).dpop(DpopKey::generate().unwrap());
        let client = super::client(AuthRefreshMiddleware::from_layer(&layer));

        let response = client
            .post(format!("{base}/orders"))
            .body("order-42")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let attempts = take(&server);
        assert_eq!(attempts.len(), 2, "{attempts:#?}");
        assert_eq!(attempts[0].status, 401, "first contact is challenged");
        assert_eq!(attempts[0].nonce, None);
        assert_eq!(attempts[1].status, 200);
        assert_eq!(attempts[1].nonce.as_deref(), Some("nonce-0"));
        for attempt in &attempts {
            assert_eq!(attempt.authorization.as_deref(), Some("DPoP tok-1"));
            assert_eq!(attempt.body, "order-42");
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "a nonce resend is not a refresh"
        );
        assert_eq!(handle.stats().retries, 0);

        // The nonce is known: one attempt per request.
        let response = client.get(format!("{base}/orders")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(take(&server).len(), 1);

        // A challenge to a streamed body comes back marked, and teaches the
        // nonce to the next request.
        *server.nonce.lock().unwrap() = "nonce-1".to_owned();
        let frames: Vec<Result<Frame<Bytes>, Infallible>> =
            vec![Ok(Frame::data(Bytes::from_static(b"streamed")))];
        let response = client
            .post(format!("{base}/stream"))
            .body(reqwest::Body::wrap(StreamBody::new(futures::stream::iter(
                frames,
            ))))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
        assert_eq!(
            response
                .extensions()
                .get::<RetrySkipped>()
                .map(|m| m.reason),
            Some(SkipReason::BodyNotCloneable)
        );
        assert_eq!(take(&server).len(), 1);
        let response = client.get(format!("{base}/orders")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let next = take(&server);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].nonce.as_deref(), Some("nonce-1"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
