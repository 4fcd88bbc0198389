//! DPoP at the resource server: `AuthRefreshLayer::dpop` over a hyper-util
//! client, against a real resource server on 127.0.0.1 that verifies every
//! proof with jsonwebtoken (signature by the embedded JWK, `typ`, `htm`,
//! `htu`, `ath`, unique `jti`), requires its current nonce, answers a wrong
//! or missing one with `401 WWW-Authenticate: DPoP error="use_dpop_nonce"` and
//! a `DPoP-Nonce`, and records every attempt with the body bytes it read.
#![cfg(feature = "dpop")]

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use bytes::Bytes;
use futures::stream;
use http::{HeaderMap, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::{Layer, ServiceExt};
use tower_auth_refresh::dpop::DpopKey;
use tower_auth_refresh::{
    AuthRefresh, AuthRefreshLayer, BoxError, RefreshContext, ReplayBody, RetrySkipped, SkipReason,
    Token, TokenHandle, token_source_fn,
};

/// Every test is bounded: a hang is a failure, not a stuck CI job.
const LIMIT: Duration = Duration::from_secs(20);

type ReqBody = BoxBody<Bytes, BoxError>;
type HttpClient = Client<HttpConnector, ReplayBody<ReqBody>>;

/// What the resource server saw on one attempt, and what it answered.
#[derive(Debug, Clone)]
struct Attempt {
    authorization: Option<String>,
    jti: Option<String>,
    nonce: Option<String>,
    body: Bytes,
    outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    NonceChallenge,
    InvalidToken,
    /// A proof that failed verification: never expected.
    BadProof,
    /// No proof at all.
    NoProof,
}

#[derive(Default)]
struct ServerState {
    addr: Mutex<String>,
    /// The nonce required now, and one more still accepted (a soft rotation).
    nonce: Mutex<(String, Option<String>)>,
    /// A nonce to rotate to softly when the next request succeeds, so that
    /// the success announces it.
    next_on_success: Mutex<Option<String>>,
    accepted: Mutex<HashSet<String>>,
    attempts: Mutex<Vec<Attempt>>,
    /// When set, the nonce rotates hard before every check: each nonce the
    /// server announces is stale by the time it comes back.
    rotate_before_each_check: std::sync::atomic::AtomicBool,
    /// A nonce to rotate to hard right after the next answer (which still
    /// announces the old one).
    rotate_after_next_answer: Mutex<Option<String>>,
    /// Rotate hard after this many successes with one nonce, announcing the
    /// new nonce on the success that ends it.
    rotate_every_successes: Mutex<Option<(usize, usize)>>,
    rotations: AtomicUsize,
}

#[derive(Clone)]
struct ResourceServer {
    addr: std::net::SocketAddr,
    state: Arc<ServerState>,
}

impl ResourceServer {
    async fn start() -> Self {
        let state = Arc::new(ServerState::default());
        *state.nonce.lock().unwrap() = ("nonce-0".to_owned(), None);
        let app = Router::new()
            .route("/{*path}", any(resource))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        *state.addr.lock().unwrap() = format!("http://{addr}");
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, state }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn accept(&self, token: &str) {
        self.state.accepted.lock().unwrap().insert(token.to_owned());
    }

    fn revoke_all(&self) {
        self.state.accepted.lock().unwrap().clear();
    }

    /// A new nonce; the old one is refused from now on.
    fn rotate(&self, nonce: &str) {
        *self.state.nonce.lock().unwrap() = (nonce.to_owned(), None);
    }

    /// A new nonce, announced on the next answers; the old one still works.
    fn rotate_softly(&self, nonce: &str) {
        let mut guard = self.state.nonce.lock().unwrap();
        let old = std::mem::replace(&mut guard.0, nonce.to_owned());
        guard.1 = Some(old);
    }

    /// Announces `nonce` on the next success (the old one still works).
    fn rotate_softly_on_next_success(&self, nonce: &str) {
        *self.state.next_on_success.lock().unwrap() = Some(nonce.to_owned());
    }

    /// From now on every nonce is stale when it comes back (or not).
    fn rotate_before_each_check(&self, on: bool) {
        self.state
            .rotate_before_each_check
            .store(on, Ordering::SeqCst);
    }

    /// The next answer announces the current nonce; `nonce` replaces it
    /// right after.
    fn rotate_after_next_answer(&self, nonce: &str) {
        *self.state.rotate_after_next_answer.lock().unwrap() = Some(nonce.to_owned());
    }

    /// A hard rotation after every `successes` successes.
    fn rotate_every_successes(&self, successes: usize) {
        *self.state.rotate_every_successes.lock().unwrap() = Some((successes, 0));
    }

    fn take(&self) -> Vec<Attempt> {
        std::mem::take(&mut *self.state.attempts.lock().unwrap())
    }
}

fn sha256_b64(text: &str) -> String {
    use base64::Engine;
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest)
}

/// Verifies a proof as RFC 9449 §4.3 asks; returns its claims.
fn verify_proof(
    proof: &str,
    method: &str,
    htu: &str,
    token: &str,
) -> Result<serde_json::Value, String> {
    let header = jsonwebtoken::decode_header(proof).map_err(|e| e.to_string())?;
    if header.typ.as_deref() != Some("dpop+jwt") {
        return Err("typ".into());
    }
    let jwk = header.jwk.ok_or("no jwk")?;
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    let claims = jsonwebtoken::decode::<serde_json::Value>(proof, &key, &validation)
        .map_err(|e| e.to_string())?
        .claims;
    if claims["htm"] != method || claims["htu"] != htu || claims["ath"] != sha256_b64(token) {
        return Err(format!("claims {claims}"));
    }
    if !claims["jti"].is_string() || !claims["iat"].is_u64() {
        return Err(format!("claims {claims}"));
    }
    Ok(claims)
}

async fn resource(State(state): State<Arc<ServerState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let authorization = parts
        .headers
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_owned());
    let token = authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("DPoP "))
        .unwrap_or("")
        .to_owned();
    let htu = format!("{}{}", state.addr.lock().unwrap(), parts.uri.path());
    if state.rotate_before_each_check.load(Ordering::SeqCst) {
        let n = state.rotations.fetch_add(1, Ordering::SeqCst) + 1;
        *state.nonce.lock().unwrap() = (format!("stale-{n}"), None);
    }
    let (current, soft) = state.nonce.lock().unwrap().clone();
    let mut attempt = Attempt {
        authorization,
        jti: None,
        nonce: None,
        body,
        outcome: Outcome::Ok,
    };
    let mut headers = HeaderMap::new();
    headers.insert("dpop-nonce", current.parse().unwrap());
    let status = match parts.headers.get("dpop") {
        None => {
            attempt.outcome = Outcome::NoProof;
            StatusCode::BAD_REQUEST
        }
        Some(proof) => {
            match verify_proof(proof.to_str().unwrap(), parts.method.as_str(), &htu, &token) {
                Err(_) => {
                    attempt.outcome = Outcome::BadProof;
                    StatusCode::BAD_REQUEST
                }
                Ok(claims) => {
                    attempt.jti = claims["jti"].as_str().map(str::to_owned);
                    attempt.nonce = claims["nonce"].as_str().map(str::to_owned);
                    let nonce_ok = attempt.nonce.as_deref() == Some(current.as_str())
                        || (attempt.nonce.is_some() && attempt.nonce == soft);
                    if !nonce_ok {
                        attempt.outcome = Outcome::NonceChallenge;
                        headers.insert(
                        "www-authenticate",
                        r#"DPoP error="use_dpop_nonce", error_description="Resource server requires nonce in DPoP proof""#
                            .parse()
                            .unwrap(),
                    );
                        StatusCode::UNAUTHORIZED
                    } else if !state.accepted.lock().unwrap().contains(&token) {
                        attempt.outcome = Outcome::InvalidToken;
                        headers.insert(
                            "www-authenticate",
                            r#"DPoP error="invalid_token""#.parse().unwrap(),
                        );
                        StatusCode::UNAUTHORIZED
                    } else {
                        if let Some(next) = state.next_on_success.lock().unwrap().take() {
                            let mut nonce = state.nonce.lock().unwrap();
                            let old = std::mem::replace(&mut nonce.0, next.clone());
                            nonce.1 = Some(old);
                            headers.insert("dpop-nonce", next.parse().unwrap());
                        }
                        if let Some((every, seen)) =
                            state.rotate_every_successes.lock().unwrap().as_mut()
                        {
                            *seen += 1;
                            if *seen >= *every {
                                *seen = 0;
                                let n = state.rotations.fetch_add(1, Ordering::SeqCst) + 1;
                                let next = format!("rotated-{n}");
                                *state.nonce.lock().unwrap() = (next.clone(), None);
                                headers.insert("dpop-nonce", next.parse().unwrap());
                            }
                        }
                        StatusCode::OK
                    }
                }
            }
        }
    };
    if let Some(next) = state.rotate_after_next_answer.lock().unwrap().take() {
        *state.nonce.lock().unwrap() = (next, None);
    }
    let answer = format!("read {} bytes", attempt.body.len());
    state.attempts.lock().unwrap().push(attempt);
    (status, headers, answer).into_response()
}

/// A token source that issues `tok-1`, `tok-2` … of type `DPoP` and tells
/// the server to accept each.
fn issuer(server: &ResourceServer) -> (TokenHandle, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let (counter, server) = (calls.clone(), server.clone());
    let handle = TokenHandle::builder(token_source_fn(move |_cx: RefreshContext| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        let token = format!("tok-{n}");
        server.accept(&token);
        async move {
            Ok::<_, Infallible>(
                Token::new(token, "DPoP").with_expires_in(Duration::from_secs(3600)),
            )
        }
    }))
    .min_token_age(Duration::ZERO)
    .build();
    (handle, calls)
}

/// A DPoP layer over the real client whose token is at hand: one request
/// sent, and what the server saw of it cleared.
async fn warmed_up(
    server: &ResourceServer,
) -> (TokenHandle, Arc<AtomicUsize>, AuthRefresh<HttpClient>) {
    let (handle, calls) = issuer(server);
    let service = AuthRefreshLayer::new(handle.clone())
        .dpop(DpopKey::generate().unwrap())
        .layer(client());
    service
        .clone()
        .oneshot(get(&server.url("/a")))
        .await
        .unwrap();
    server.take();
    (handle, calls, service)
}

/// What the server answered, attempt by attempt.
fn outcomes(attempts: &[Attempt]) -> Vec<Outcome> {
    attempts.iter().map(|a| a.outcome).collect()
}

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A POST whose body is a stream of chunks of unknown total size.
fn streaming_post(url: &str, chunks: &[&'static str]) -> http::Request<ReqBody> {
    let frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
        .iter()
        .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
        .collect();
    http::Request::post(url)
        .body(StreamBody::new(stream::iter(frames)).boxed())
        .unwrap()
}

fn get(url: &str) -> http::Request<ReqBody> {
    http::Request::get(url)
        .body(
            Full::default()
                .map_err(|e: Infallible| -> BoxError { match e {} })
                .boxed(),
        )
        .unwrap()
}

fn count(attempts: &[Attempt], outcome: Outcome) -> usize {
    attempts.iter().filter(|a| a.outcome == outcome).count()
}

/// No attempt was refused for its proof, and no `jti` was used twice.
fn assert_proofs_accepted(attempts: &[Attempt], jtis: &mut HashSet<String>) {
    assert_eq!(count(attempts, Outcome::BadProof), 0, "{attempts:#?}");
    assert_eq!(count(attempts, Outcome::NoProof), 0, "{attempts:#?}");
    for attempt in attempts {
        assert!(
            jtis.insert(attempt.jti.clone().unwrap()),
            "jti used twice: {attempt:?}"
        );
    }
}

#[tokio::test]
async fn a_nonce_challenge_is_answered_once_with_the_same_body_and_no_refresh() {
    tokio::time::timeout(LIMIT, async {
        let server = ResourceServer::start().await;
        let (handle, calls) = issuer(&server);
        let key = DpopKey::generate().unwrap();
        let service = AuthRefreshLayer::new(handle.clone())
            .dpop(key.clone())
            .layer(client());
        let mut jtis = HashSet::new();

        let chunks = ["{\"order\":", "42,\"items\":[1,2,3]", "}"];
        let response = service
            .clone()
            .oneshot(streaming_post(&server.url("/orders"), &chunks))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let attempts = server.take();
        assert_eq!(attempts.len(), 2, "{attempts:#?}");
        assert_eq!(attempts[0].outcome, Outcome::NonceChallenge);
        assert_eq!(attempts[0].nonce, None, "no nonce known before");
        assert_eq!(attempts[1].outcome, Outcome::Ok);
        assert_eq!(attempts[1].nonce.as_deref(), Some("nonce-0"));
        let sent = Bytes::from(chunks.concat());
        assert_eq!(attempts[0].body, sent);
        assert_eq!(attempts[1].body, sent, "the replay is byte-identical");
        for attempt in &attempts {
            assert_eq!(attempt.authorization.as_deref(), Some("DPoP tok-1"));
        }
        assert_proofs_accepted(&attempts, &mut jtis);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "a nonce retry is not a refresh"
        );
        let stats = handle.stats();
        assert_eq!(stats.refreshes, 1);
        assert_eq!(stats.retries, 0);

        // Steady traffic: the nonce is known, one attempt per request.
        for _ in 0..5 {
            let response = service
                .clone()
                .oneshot(get(&server.url("/orders")))
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
        let steady = server.take();
        assert_eq!(steady.len(), 5);
        assert_eq!(count(&steady, Outcome::Ok), 5);
        assert_proofs_accepted(&steady, &mut jtis);
        assert_eq!(handle.stats().refreshes, 1);
    })
    .await
    .expect("bounded");
}

#[tokio::test]
async fn each_nonce_rotation_costs_exactly_one_extra_attempt() {
    const ROTATIONS: usize = 5;
    tokio::time::timeout(LIMIT, async {
        let server = ResourceServer::start().await;
        let (handle, _) = issuer(&server);
        let service = AuthRefreshLayer::new(handle.clone())
            .dpop(DpopKey::generate().unwrap())
            .layer(client());
        let mut jtis = HashSet::new();
        let mut sent = 0;

        service.clone().oneshot(get(&server.url("/a"))).await.unwrap();
        sent += server.take().len();

        for rotation in 1..=ROTATIONS {
            server.rotate(&format!("nonce-{rotation}"));
            for request in 0..3 {
                let response = service.clone().oneshot(get(&server.url("/a"))).await.unwrap();
                assert_eq!(response.status(), 200);
                let attempts = server.take();
                assert_proofs_accepted(&attempts, &mut jtis);
                let expected = if request == 0 { 2 } else { 1 };
                assert_eq!(attempts.len(), expected, "rotation {rotation}: {attempts:#?}");
                assert_eq!(
                    count(&attempts, Outcome::NonceChallenge),
                    expected - 1,
                    "rotation {rotation}"
                );
                sent += attempts.len();
            }
        }

        // A nonce announced on a success is used from the next request on,
        // without a challenge.
        server.rotate_softly("nonce-soft");
        service.clone().oneshot(get(&server.url("/a"))).await.unwrap();
        service.clone().oneshot(get(&server.url("/a"))).await.unwrap();
        let soft = server.take();
        assert_eq!(soft.len(), 2);
        assert_eq!(count(&soft, Outcome::Ok), 2);
        assert_eq!(soft[1].nonce.as_deref(), Some("nonce-soft"));
        sent += soft.len();
        assert_eq!(handle.stats().refreshes, 1);
        println!(
            "dpop resource: {sent} proofs sent for {} requests, {ROTATIONS} rotations, 1 extra attempt each",
            1 + ROTATIONS * 3 + 2
        );
    })
    .await
    .expect("bounded");
}

#[tokio::test]
async fn an_expired_token_behind_a_nonce_challenge_still_refreshes_once() {
    tokio::time::timeout(LIMIT, async {
        let server = ResourceServer::start().await;
        let (handle, calls, service) = warmed_up(&server).await;

        // The token dies and the nonce rotates at once; the success that
        // ends it all announces yet another nonce.
        server.revoke_all();
        server.rotate("nonce-2");
        server.rotate_softly_on_next_success("nonce-3");
        let chunks = ["payload-", "that-must-", "arrive-three-times"];
        let response = service
            .clone()
            .oneshot(streaming_post(&server.url("/b"), &chunks))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let attempts = server.take();
        assert_eq!(
            outcomes(&attempts),
            [Outcome::NonceChallenge, Outcome::InvalidToken, Outcome::Ok]
        );
        assert_eq!(attempts[2].authorization.as_deref(), Some("DPoP tok-2"));
        let sent = Bytes::from(chunks.concat());
        assert!(attempts.iter().all(|a| a.body == sent));
        assert_proofs_accepted(&attempts, &mut HashSet::new());
        assert_eq!(calls.load(Ordering::SeqCst), 2, "exactly one refresh");
        let stats = handle.stats();
        assert_eq!(stats.refreshes, 2);
        assert_eq!(stats.retries, 1, "only the refresh retry counts");

        // The nonce the retry's answer announced is the one used next.
        service
            .clone()
            .oneshot(get(&server.url("/c")))
            .await
            .unwrap();
        let next = server.take();
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].nonce.as_deref(), Some("nonce-3"));
    })
    .await
    .expect("bounded");
}

/// A nonce challenge answering the nonce resend is not an expired token:
/// the valid token is kept, the challenge goes back to the caller, and its
/// nonce is the one the next request uses.
#[tokio::test]
async fn a_second_nonce_challenge_is_handed_back_without_a_refresh() {
    tokio::time::timeout(LIMIT, async {
        let server = ResourceServer::start().await;
        let (handle, calls, service) = warmed_up(&server).await;

        server.rotate_before_each_check(true);
        let chunks = ["stale-", "every-", "time"];
        let response = service
            .clone()
            .oneshot(streaming_post(&server.url("/b"), &chunks))
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
        assert!(
            response.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("use_dpop_nonce")
        );
        let attempts = server.take();
        assert_eq!(
            outcomes(&attempts),
            [Outcome::NonceChallenge, Outcome::NonceChallenge]
        );
        assert_eq!(attempts[1].nonce.as_deref(), Some("stale-1"));
        for attempt in &attempts {
            assert_eq!(attempt.authorization.as_deref(), Some("DPoP tok-1"));
            assert_eq!(attempt.body, Bytes::from(chunks.concat()));
        }
        assert_proofs_accepted(&attempts, &mut HashSet::new());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "no refresh of a valid token"
        );
        let stats = handle.stats();
        assert_eq!(stats.refreshes, 1);
        assert_eq!(stats.retries, 0);

        // The nonce of the second challenge is cached for the next request.
        server.rotate_before_each_check(false);
        let response = service
            .clone()
            .oneshot(get(&server.url("/c")))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let next = server.take();
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].nonce.as_deref(), Some("stale-2"));
        assert_eq!(next[0].authorization.as_deref(), Some("DPoP tok-1"));
    })
    .await
    .expect("bounded");
}

/// The refresh retry may itself be challenged for a nonce: that challenge is
/// answered once too (a nonce resend is not a refresh retry).
#[tokio::test]
async fn a_nonce_challenge_to_the_refresh_retry_is_answered_once() {
    tokio::time::timeout(LIMIT, async {
        let server = ResourceServer::start().await;
        let (handle, calls, service) = warmed_up(&server).await;

        // tok-1 dies; the answer that says so still announces nonce-0, and
        // the nonce rotates right after it.
        server.revoke_all();
        server.rotate_after_next_answer("nonce-1");
        let chunks = ["sent-", "three-", "times"];
        let response = service
            .clone()
            .oneshot(streaming_post(&server.url("/b"), &chunks))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let attempts = server.take();
        assert_eq!(
            outcomes(&attempts),
            [Outcome::InvalidToken, Outcome::NonceChallenge, Outcome::Ok]
        );
        let tokens: Vec<_> = attempts
            .iter()
            .map(|a| a.authorization.as_deref().unwrap())
            .collect();
        assert_eq!(tokens, ["DPoP tok-1", "DPoP tok-2", "DPoP tok-2"]);
        assert_eq!(attempts[2].nonce.as_deref(), Some("nonce-1"));
        assert!(attempts.iter().all(|a| a.body == chunks.concat()));
        assert_proofs_accepted(&attempts, &mut HashSet::new());
        assert_eq!(calls.load(Ordering::SeqCst), 2, "exactly one refresh");
        let stats = handle.stats();
        assert_eq!(stats.refreshes, 2);
        assert_eq!(stats.retries, 1, "the nonce resend is not a retry");

        // A dead token behind a server that challenges every attempt: the
        // nonce challenges hide the expiry, and none of them refreshes.
        server.revoke_all();
        server.rotate_before_each_check(true);
        let response = service
            .clone()
            .oneshot(streaming_post(&server.url("/c"), &chunks))
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
        let attempts = server.take();
        assert_eq!(attempts.len(), 2, "{attempts:#?}");
        assert_eq!(count(&attempts, Outcome::NonceChallenge), 2);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "a nonce challenge never refreshes"
        );
    })
    .await
    .expect("bounded");
}

/// Many requests at once against a server that rotates its nonce hard every
/// few successes: the challenges cost extra attempts, never a refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonce_rotation_under_concurrency_never_refreshes_a_valid_token() {
    const REQUESTS: usize = 64;
    tokio::time::timeout(LIMIT, async {
        let server = ResourceServer::start().await;
        let (handle, calls) = issuer(&server);
        let service = AuthRefreshLayer::new(handle.clone())
            .dpop(DpopKey::generate().unwrap())
            .layer(client());
        server.rotate_every_successes(4);
        let requests = (0..REQUESTS).map(|i| {
            let service = service.clone();
            let url = server.url(&format!("/r/{i}"));
            async move {
                let chunks: &[&'static str] = if i % 2 == 0 { &["even"] } else { &["odd"] };
                service
                    .oneshot(streaming_post(&url, chunks))
                    .await
                    .unwrap()
                    .status()
            }
        });
        let statuses = futures::future::join_all(requests).await;
        let attempts = server.take();
        assert_proofs_accepted(&attempts, &mut HashSet::new());
        let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
        let challenged = statuses.len() - ok;
        assert_eq!(count(&attempts, Outcome::Ok), ok);
        assert_eq!(count(&attempts, Outcome::InvalidToken), 0);
        assert!(attempts.len() <= 2 * REQUESTS, "{} attempts", attempts.len());
        assert_eq!(calls.load(Ordering::SeqCst), 1, "no refresh of a valid token");
        let stats = handle.stats();
        assert_eq!(stats.refreshes, 1);
        assert_eq!(stats.retries, 0);
        println!(
            "dpop rotation under load: {REQUESTS} requests, {} attempts, {ok} ok, {challenged} handed back challenged, 1 refresh",
            attempts.len()
        );
    })
    .await
    .expect("bounded");
}

#[tokio::test]
async fn a_challenge_to_a_body_that_cannot_be_replayed_comes_back_marked() {
    tokio::time::timeout(LIMIT, async {
        let server = ResourceServer::start().await;
        let (handle, _) = issuer(&server);
        let service = AuthRefreshLayer::new(handle.clone())
            .dpop(DpopKey::generate().unwrap())
            .max_replay_bytes(8)
            .layer(client());
        let response = service
            .clone()
            .oneshot(streaming_post(
                &server.url("/big"),
                &["more than ", "eight bytes"],
            ))
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
        assert_eq!(
            response
                .extensions()
                .get::<RetrySkipped>()
                .map(|m| m.reason),
            Some(SkipReason::BodyTooLarge)
        );
        let attempts = server.take();
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].outcome, Outcome::NonceChallenge);
        // The nonce was still learned: the next request needs no challenge.
        service
            .clone()
            .oneshot(get(&server.url("/a")))
            .await
            .unwrap();
        assert_eq!(count(&server.take(), Outcome::Ok), 1);
        assert_eq!(handle.stats().refreshes, 1);
    })
    .await
    .expect("bounded");
}

#[tokio::test]
async fn without_dpop_requests_carry_no_proof() {
    tokio::time::timeout(LIMIT, async {
        let server = ResourceServer::start().await;
        let (handle, _) = issuer(&server);
        let service = AuthRefreshLayer::new(handle).layer(client());
        let response = service.oneshot(get(&server.url("/a"))).await.unwrap();
        assert_eq!(response.status(), 400);
        let attempts = server.take();
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].outcome, Outcome::NoProof);
        assert_eq!(attempts[0].authorization.as_deref(), Some("Bearer tok-1"));
    })
    .await
    .expect("bounded");
}

/// RFC 9449 wants the token in `Authorization: DPoP`: a handle that puts it
/// in the query (or another header) cannot be used with DPoP, and says so
/// instead of sending a proof without `ath`.
#[tokio::test]
async fn dpop_with_the_token_outside_authorization_is_refused() {
    tokio::time::timeout(LIMIT, async {
        let server = ResourceServer::start().await;
        for injector in [
            tower_auth_refresh::TokenInjector::query("access_token"),
            tower_auth_refresh::TokenInjector::header(http::HeaderName::from_static("x-api-token")),
        ] {
            let handle = TokenHandle::builder(token_source_fn(|_cx: RefreshContext| async {
                Ok::<_, Infallible>(Token::new("secret-tok-9", "DPoP"))
            }))
            .injector(injector)
            .build();
            let service = AuthRefreshLayer::new(handle)
                .dpop(DpopKey::generate().unwrap())
                .layer(client());
            let err = service
                .oneshot(get(&server.url("/a?x=1")))
                .await
                .unwrap_err();
            assert!(err.to_string().contains("Authorization"), "{err}");
            assert!(!err.to_string().contains("secret-tok-9"), "{err}");
        }
        assert!(server.take().is_empty(), "nothing was sent");
    })
    .await
    .expect("bounded");
}
