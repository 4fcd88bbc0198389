//! DPoP, signed client assertions, PKCE and revocation against a real
//! authorization server: panva's `oidc-provider` (see `tests/oidc_support`),
//! configured with DPoP nonces required, `private_key_jwt` and
//! `client_secret_jwt` clients, PKCE required for the `jwt-*` clients, and
//! the revocation endpoint.
//!
//! Every token request goes through a recorder that keeps what was sent
//! (proof, assertion, form) and what came back (status, error, nonce); the
//! server counts the proofs it received and the ones it rejected.
#![cfg(feature = "dpop")]

mod oidc_support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use oidc_support::{Provider, REDIRECT_URI, plain_client};
use secrecy::ExposeSecret;
use tower::{BoxError, Layer, ServiceExt, service_fn};
use tower_auth_refresh::dpop::DpopKey;
use tower_auth_refresh::oauth2::{
    AuthorizationCode, ClientAuth, Grant, OAuth2Source, OAuth2SourceBuilder, Pkce, SigningKey,
};
use tower_auth_refresh::{AuthRefreshLayer, ReplayBody, TokenHandle};

const ES256_KEY: &str = include_str!("keys/es256-test-only.pem");
const RS256_KEY: &str = include_str!("keys/rsa-2048-test-only.pem");
const EDDSA_KEY: &str = include_str!("keys/ed25519-test-only.pem");

/// One exchange with the token or revocation endpoint, as the recorder saw it.
#[derive(Debug, Clone)]
struct Exchange {
    path: String,
    form: Vec<(String, String)>,
    authorization_header: bool,
    /// The claims of the DPoP proof, when one was sent.
    proof: Option<serde_json::Value>,
    status: u16,
    error: Option<String>,
    nonce_header: Option<String>,
}

impl Exchange {
    fn param(&self, key: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn is_nonce_challenge(&self) -> bool {
        self.status == 400 && self.error.as_deref() == Some("use_dpop_nonce")
    }

    /// The claims of the client assertion, unverified (the server verifies).
    fn assertion_claims(&self) -> serde_json::Value {
        jwt_claims(self.param("client_assertion").expect("a client assertion"))
    }
}

type Log = Arc<Mutex<Vec<Exchange>>>;

fn jwt_claims(jwt: &str) -> serde_json::Value {
    use base64::Engine;
    let payload = jwt.split('.').nth(1).expect("a compact JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// Sends the token requests of `builder` through a client that records them.
fn recorded(builder: OAuth2SourceBuilder) -> (OAuth2SourceBuilder, Log) {
    let log: Log = Arc::default();
    let client = plain_client();
    let recorder = log.clone();
    let service = service_fn(move |request: Request<Full<Bytes>>| {
        let client = client.clone();
        let recorder = recorder.clone();
        async move {
            let (parts, body) = request.into_parts();
            let bytes = body.collect().await?.to_bytes();
            let proof = parts
                .headers
                .get("dpop")
                .map(|v| jwt_claims(v.to_str().unwrap()));
            let mut exchange = Exchange {
                path: parts.uri.path().to_owned(),
                form: url::form_urlencoded::parse(&bytes).into_owned().collect(),
                authorization_header: parts.headers.contains_key("authorization"),
                proof,
                status: 0,
                error: None,
                nonce_header: None,
            };
            let response = client
                .request(Request::from_parts(parts, Full::new(bytes)))
                .await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            exchange.status = parts.status.as_u16();
            exchange.error = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned));
            exchange.nonce_header = parts
                .headers
                .get("dpop-nonce")
                .map(|v| v.to_str().unwrap().to_owned());
            recorder.lock().unwrap().push(exchange);
            Ok::<_, BoxError>(Response::from_parts(parts, Full::new(body)))
        }
    });
    (builder.http_service(service), log)
}

fn take(log: &Log) -> Vec<Exchange> {
    std::mem::take(&mut *log.lock().unwrap())
}

/// The server's own count of the DPoP proofs it received at the token
/// endpoint, their distinct `jti`s, and the ones it rejected for another
/// reason than a nonce challenge.
async fn server_dpop_stats(provider: &Provider) -> (u64, u64, u64) {
    let response = plain_client()
        .request(
            Request::get(provider.url("/dev/dpop-stats"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    (
        json["proofs"].as_u64().unwrap(),
        json["jtis"].as_u64().unwrap(),
        json["rejected"].as_u64().unwrap(),
    )
}

/// How a resource request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ok,
    NonceChallenge,
    InvalidToken,
    Other(u16),
}

type Answers = Arc<Mutex<Vec<Answer>>>;

/// A hyper-util client that records how each resource request was answered.
fn recording_client() -> (
    impl tower::Service<
        Request<ReplayBody<Full<Bytes>>>,
        Response = Response<hyper::body::Incoming>,
        Error = BoxError,
        Future = impl Send,
    > + Clone
    + Send
    + 'static,
    Answers,
) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<ReplayBody<Full<Bytes>>>();
    let answers: Answers = Arc::default();
    let log = answers.clone();
    let service = service_fn(move |request: Request<ReplayBody<Full<Bytes>>>| {
        let client = client.clone();
        let log = log.clone();
        async move {
            let response = client.request(request).await?;
            let challenge = response
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap_or_default().to_owned())
                .unwrap_or_default();
            let answer = match response.status().as_u16() {
                200 => Answer::Ok,
                401 if challenge.contains("use_dpop_nonce") => Answer::NonceChallenge,
                401 if challenge.contains("invalid_token") => Answer::InvalidToken,
                other => Answer::Other(other),
            };
            log.lock().unwrap().push(answer);
            Ok::<_, BoxError>(response)
        }
    });
    (service, answers)
}

fn take_answers(answers: &Answers) -> Vec<Answer> {
    std::mem::take(&mut *answers.lock().unwrap())
}

/// Asserts the shape every DPoP token request must have, whatever happened.
fn assert_proofs_well_formed(exchanges: &[Exchange], token_url: &str) {
    let mut jtis = HashSet::new();
    for exchange in exchanges {
        let proof = exchange
            .proof
            .as_ref()
            .expect("every token request has a proof");
        assert_eq!(proof["htm"], "POST");
        assert_eq!(proof["htu"], token_url);
        assert!(proof.get("ath").is_none(), "no ath at the token endpoint");
        assert!(
            jtis.insert(proof["jti"].as_str().unwrap().to_owned()),
            "jti reused"
        );
    }
}

#[tokio::test]
async fn private_key_jwt_with_each_algorithm_gets_dpop_bound_tokens() {
    let provider = Provider::start().await;
    let mut total_requests = 0;
    for (pem, kid, alg) in [
        (ES256_KEY, "es256", "ES256"),
        (RS256_KEY, "rs256", "RS256"),
        (EDDSA_KEY, "eddsa", "EdDSA"),
    ] {
        let signing = SigningKey::from_pkcs8_pem(pem).unwrap().with_key_id(kid);
        assert_eq!(signing.algorithm(), alg);
        let dpop = DpopKey::generate().unwrap();
        let (builder, log) = recorded(
            OAuth2Source::builder(
                provider.token_url(),
                ClientAuth::private_key_jwt("jwt-svc", signing),
            )
            .initial_grant(Grant::client_credentials())
            .scope("api:read")
            .dpop(dpop.clone()),
        );
        let handle = TokenHandle::new(builder.build().unwrap());

        // First request: no nonce yet → one challenge, one more attempt.
        let token = handle.refresh_now().await.unwrap();
        assert_eq!(token.token_type(), "DPoP");
        let first = take(&log);
        assert_eq!(first.len(), 2, "{alg}: {first:#?}");
        assert!(first[0].is_nonce_challenge());
        assert!(first[0].nonce_header.is_some());
        assert_eq!(first[1].status, 200);
        assert_eq!(
            first[1].proof.as_ref().unwrap()["nonce"].as_str(),
            first[0].nonce_header.as_deref(),
            "the retry carries the nonce of the challenge"
        );
        // Each attempt signs its own assertion.
        let (a, b) = (first[0].assertion_claims(), first[1].assertion_claims());
        assert_ne!(a["jti"], b["jti"]);
        for claims in [&a, &b] {
            assert_eq!(claims["iss"], "jwt-svc");
            assert_eq!(claims["sub"], "jwt-svc");
            assert_eq!(claims["aud"], provider.token_url());
            let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
            assert!(lifetime <= 60, "short-lived assertion: {lifetime} s");
        }
        assert!(!first[1].authorization_header);
        assert_eq!(first[1].param("client_secret"), None);

        // Later requests: the cached nonce is still good → one attempt each.
        for _ in 0..3 {
            handle.refresh_now().await.unwrap();
            let later = take(&log);
            assert_eq!(later.len(), 1, "{alg}: {later:#?}");
            assert_eq!(later[0].status, 200);
            assert!(later[0].proof.as_ref().unwrap()["nonce"].is_string());
            total_requests += 1;
        }
        total_requests += 2;
        assert_proofs_well_formed(&first, &provider.token_url());

        // The token is bound to the key: the server says so.
        let token = handle.token().unwrap();
        let introspection = provider
            .introspect(token.access_token().expose_secret())
            .await;
        assert_eq!(introspection["active"], true, "{introspection}");
        assert_eq!(introspection["token_type"], "DPoP", "{introspection}");
        assert_eq!(
            introspection["cnf"]["jkt"],
            dpop.thumbprint(),
            "{introspection}"
        );
    }
    let (proofs, jtis, rejected) = server_dpop_stats(&provider).await;
    assert_eq!(proofs, total_requests, "the server got every proof");
    assert_eq!(jtis, proofs, "no jti replayed");
    assert_eq!(rejected, 0, "the server accepted every proof");
}

#[tokio::test]
async fn each_nonce_rotation_costs_exactly_one_extra_attempt() {
    const ROTATIONS: usize = 3;
    let provider = Provider::start().await;
    let dpop = DpopKey::generate().unwrap();
    let (builder, log) = recorded(
        OAuth2Source::builder(
            provider.token_url(),
            ClientAuth::basic("dpop-svc", "dpop-svc-secret"),
        )
        .initial_grant(Grant::client_credentials())
        .scope("api:read")
        .dpop(dpop.clone()),
    );
    let handle = TokenHandle::new(builder.build().unwrap());
    let mut all = Vec::new();

    handle.refresh_now().await.unwrap();
    let first = take(&log);
    assert_eq!(first.len(), 2, "first contact: one challenge, one retry");
    assert!(first[0].is_nonce_challenge());
    all.extend(first);

    for rotation in 1..=ROTATIONS {
        // Ten minutes on: the nonce the client holds has rotated out.
        provider.advance_clock(600).await;
        let token = handle.refresh_now().await.unwrap();
        assert_eq!(token.token_type(), "DPoP");
        let round = take(&log);
        let challenges = round.iter().filter(|e| e.is_nonce_challenge()).count();
        assert_eq!(round.len(), 2, "rotation {rotation}: {round:#?}");
        assert_eq!(challenges, 1, "rotation {rotation}");
        assert_eq!(round[1].status, 200);
        assert_ne!(
            round[0].proof.as_ref().unwrap()["nonce"],
            round[1].proof.as_ref().unwrap()["nonce"]
        );
        assert_eq!(round[0].form, round[1].form, "the same form sent again");
        all.extend(round);
    }

    // One minute on: the old nonce is still accepted, and the answer brings
    // the next one, which the following proof carries without a challenge.
    provider.advance_clock(60).await;
    handle.refresh_now().await.unwrap();
    let soft = take(&log);
    assert_eq!(soft.len(), 1, "{soft:#?}");
    assert_eq!(soft[0].status, 200);
    let next_nonce = soft[0].nonce_header.clone().expect("a newer nonce");
    assert_ne!(
        soft[0].proof.as_ref().unwrap()["nonce"],
        next_nonce.as_str()
    );
    handle.refresh_now().await.unwrap();
    let after = take(&log);
    assert_eq!(after.len(), 1);
    assert_eq!(
        after[0].proof.as_ref().unwrap()["nonce"],
        next_nonce.as_str()
    );
    all.extend(soft);
    all.extend(after);

    assert_proofs_well_formed(&all, &provider.token_url());
    let challenges = all.iter().filter(|e| e.is_nonce_challenge()).count();
    assert_eq!(challenges, 1 + ROTATIONS);
    let (proofs, jtis, rejected) = server_dpop_stats(&provider).await;
    assert_eq!(proofs as usize, all.len());
    assert_eq!(jtis, proofs, "no jti replayed");
    assert_eq!(rejected, 0, "the server accepted every proof");
    println!(
        "dpop interop: {} proofs sent, {} nonce challenges ({} rotations + first contact), 1 extra attempt each",
        all.len(),
        challenges,
        ROTATIONS
    );
}

#[tokio::test]
async fn client_secret_jwt_sends_an_hs256_assertion_not_the_secret() {
    let provider = Provider::start().await;
    let secret = "secret-jwt-svc-secret-of-at-least-32-bytes";
    let (builder, log) = recorded(
        OAuth2Source::builder(
            provider.token_url(),
            ClientAuth::client_secret_jwt("secret-jwt-svc", secret),
        )
        .initial_grant(Grant::client_credentials())
        .scope("api:read"),
    );
    let handle = TokenHandle::new(builder.build().unwrap());
    let token = handle.refresh_now().await.unwrap();
    assert_eq!(token.token_type(), "Bearer");
    let sent = take(&log);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].status, 200);
    assert!(!sent[0].authorization_header);
    assert!(sent[0].form.iter().all(|(_, v)| !v.contains(secret)));
    assert_eq!(
        sent[0].param("client_assertion_type"),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
    assert_eq!(sent[0].assertion_claims()["sub"], "secret-jwt-svc");
}

/// The authorization-code flow: PKCE generated here, the code bound to the
/// DPoP key (`dpop_jkt`), `private_key_jwt`, a refresh, then revocation.
#[tokio::test]
async fn authorization_code_with_pkce_and_dpop_jkt_then_revocation() {
    let provider = Provider::start().await;
    let dpop = DpopKey::generate().unwrap();
    let auth = ClientAuth::private_key_jwt(
        "jwt-app",
        SigningKey::from_pkcs8_pem(ES256_KEY)
            .unwrap()
            .with_key_id("es256"),
    );
    let (builder, log) = recorded(
        OAuth2Source::builder(provider.token_url(), auth)
            .redirect_uri(REDIRECT_URI)
            .revocation_url(provider.url("/token/revocation"))
            .dpop(dpop.clone()),
    );
    let source = builder.build().unwrap();
    let handle = TokenHandle::builder(source.clone())
        .min_token_age(Duration::ZERO)
        .build();

    // The server requires PKCE for this client: a code without a challenge
    // is refused at the authorization endpoint already.
    let pkce = Pkce::generate().unwrap();
    let jkt = format!("dpop_jkt={}", dpop.thumbprint());
    let code = provider
        .authorization_code_with("jwt-app", &format!("{}&{jkt}", pkce.authorization_params()))
        .await;

    // A wrong verifier is refused…
    let wrong = Pkce::generate().unwrap();
    let err = source
        .exchange_code_for_token(AuthorizationCode::new(code.clone()).with_pkce(&wrong))
        .await
        .unwrap_err();
    assert!(err.is_invalid_grant(), "{err}");
    // …and that code is spent; a new one with the right verifier works.
    let pkce = Pkce::generate().unwrap();
    let code = provider
        .authorization_code_with("jwt-app", &format!("{}&{jkt}", pkce.authorization_params()))
        .await;
    source
        .exchange_code(&handle, AuthorizationCode::new(code).with_pkce(&pkce))
        .await
        .unwrap();
    let first = handle.token().unwrap();
    assert_eq!(first.token_type(), "DPoP");
    let refresh = first.refresh_token().unwrap().expose_secret().to_owned();

    // A code bound to another key cannot be exchanged with this one.
    let other = DpopKey::generate().unwrap();
    let pkce_other = Pkce::generate().unwrap();
    let code_other = provider
        .authorization_code_with(
            "jwt-app",
            &format!(
                "{}&dpop_jkt={}",
                pkce_other.authorization_params(),
                other.thumbprint()
            ),
        )
        .await;
    assert!(
        source
            .exchange_code_for_token(AuthorizationCode::new(code_other).with_pkce(&pkce_other))
            .await
            .is_err(),
        "the server checks dpop_jkt against the proof's key"
    );

    // The refresh-token grant, with a proof.
    let second = handle.refresh_now().await.unwrap();
    assert_eq!(second.token_type(), "DPoP");
    let introspection = provider
        .introspect(second.access_token().expose_secret())
        .await;
    assert_eq!(introspection["cnf"]["jkt"], dpop.thumbprint());
    let live_refresh = second.refresh_token().unwrap().expose_secret().to_owned();
    assert_ne!(live_refresh, refresh, "rotated");
    assert_eq!(provider.introspect(&live_refresh).await["active"], true);

    // The provider's userinfo endpoint is a DPoP resource too: the layer
    // sends `Authorization: DPoP` with a proof bound to the token, and the
    // nonce learned at the token endpoint (same origin) is reused.
    let (userinfo_client, userinfo_log) = recording_client();
    let api = AuthRefreshLayer::new(handle.clone())
        .dpop(dpop.clone())
        .layer(userinfo_client);
    let me = || {
        Request::get(provider.url("/me"))
            .body(Full::default())
            .unwrap()
    };
    let response = api.clone().oneshot(me()).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let userinfo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(userinfo["sub"], "alice");
    assert_eq!(take_answers(&userinfo_log), [Answer::Ok]);

    // Four minutes on: the nonce has rotated out (a nonce is accepted until
    // the fourth 60 s step after it was handed out), the token (300 s) is
    // still good. One challenge, one more attempt, no refresh.
    let stats = handle.stats();
    provider.advance_clock(240).await;
    assert_eq!(api.clone().oneshot(me()).await.unwrap().status(), 200);
    assert_eq!(
        take_answers(&userinfo_log),
        [Answer::NonceChallenge, Answer::Ok]
    );
    assert_eq!(handle.stats().refreshes, stats.refreshes);
    assert_eq!(handle.stats().retries, stats.retries);

    // The nonce rotates out again and the access token dies at the server:
    // the nonce challenge is answered, then the dead token is refreshed once
    // and the request sent again. The token endpoint has the same origin, so
    // the nonce the challenge brought serves the refresh too: no second
    // challenge there.
    let access = handle
        .token()
        .unwrap()
        .access_token()
        .expose_secret()
        .to_owned();
    provider.drop_access_token(&access).await;
    assert_eq!(provider.introspect(&access).await["active"], false);
    take(&log);
    provider.advance_clock(240).await;
    assert_eq!(api.clone().oneshot(me()).await.unwrap().status(), 200);
    let answers = take_answers(&userinfo_log);
    assert_eq!(
        answers,
        [Answer::NonceChallenge, Answer::InvalidToken, Answer::Ok],
        "{answers:?}"
    );
    assert_eq!(handle.stats().refreshes, stats.refreshes + 1);
    assert_eq!(handle.stats().retries, stats.retries + 1);
    let refresh_round = take(&log);
    assert_eq!(refresh_round.len(), 1, "{refresh_round:#?}");
    assert_eq!(refresh_round[0].status, 200);
    assert!(refresh_round[0].proof.as_ref().unwrap()["nonce"].is_string());
    let live_refresh = handle
        .token()
        .unwrap()
        .refresh_token()
        .unwrap()
        .expose_secret()
        .to_owned();

    // Logout: the refresh token is revoked at the server and forgotten here.
    take(&log);
    handle.revoke().await.unwrap();
    assert!(!handle.status().has_token);
    let sent = take(&log);
    assert_eq!(sent.len(), 1, "{sent:#?}");
    assert_eq!(sent[0].path, "/token/revocation");
    assert_eq!(sent[0].status, 200);
    assert_eq!(sent[0].param("token"), Some(live_refresh.as_str()));
    assert_eq!(sent[0].param("token_type_hint"), Some("refresh_token"));
    assert_eq!(
        sent[0].assertion_claims()["aud"],
        provider.url("/token/revocation")
    );
    assert_eq!(provider.introspect(&live_refresh).await["active"], false);

    let (proofs, jtis, rejected) = server_dpop_stats(&provider).await;
    assert_eq!(jtis, proofs, "no jti replayed");
    // The code bound to another key was refused; the wrong verifier too.
    assert_eq!(rejected, 2, "only the two requests meant to fail");
}

#[tokio::test]
async fn clear_revokes_when_configured() {
    let provider = Provider::start().await;
    let source =
        OAuth2Source::builder(provider.token_url(), ClientAuth::basic("app", "app-secret"))
            .redirect_uri(REDIRECT_URI)
            .revocation_url(provider.url("/token/revocation"))
            .build()
            .unwrap();
    let handle = TokenHandle::builder(source.clone())
        .revoke_on_clear()
        .build();
    let code = provider.authorization_code("app").await;
    source.exchange_code(&handle, code.as_str()).await.unwrap();
    let refresh = handle
        .token()
        .unwrap()
        .refresh_token()
        .unwrap()
        .expose_secret()
        .to_owned();
    assert_eq!(provider.introspect(&refresh).await["active"], true);

    handle.clear();
    assert!(!handle.status().has_token);
    // The revocation runs in the background: wait for it, bounded.
    for _ in 0..100 {
        if provider.introspect(&refresh).await["active"] == false {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the refresh token was not revoked within 5 s of clear()");
}

/// The nonce a resource challenge hands out has rotated out by the time the
/// resend arrives, so the resend is challenged too. The token is valid at
/// the server all along: the second challenge goes back to the caller, and
/// no refresh is made.
#[tokio::test]
async fn a_stale_nonce_on_the_resend_keeps_the_valid_token() {
    let provider = Provider::start().await;
    let dpop = DpopKey::generate().unwrap();
    let auth = ClientAuth::private_key_jwt(
        "jwt-app",
        SigningKey::from_pkcs8_pem(ES256_KEY)
            .unwrap()
            .with_key_id("es256"),
    );
    let source = OAuth2Source::builder(provider.token_url(), auth)
        .redirect_uri(REDIRECT_URI)
        .dpop(dpop.clone())
        .build()
        .unwrap();
    let handle = TokenHandle::builder(source.clone())
        .min_token_age(Duration::ZERO)
        .build();
    let pkce = Pkce::generate().unwrap();
    let code = provider
        .authorization_code_with(
            "jwt-app",
            &format!(
                "{}&dpop_jkt={}",
                pkce.authorization_params(),
                dpop.thumbprint()
            ),
        )
        .await;
    source
        .exchange_code(&handle, AuthorizationCode::new(code).with_pkce(&pkce))
        .await
        .unwrap();
    let before = handle.token().unwrap();
    let stats = handle.stats();

    // The server's clock moves four minutes on right after its first nonce
    // challenge: the nonce it just handed out is stale at once.
    let (recording, answers) = recording_client();
    let clock = format!("{}?seconds=240", provider.url("/dev/clock"));
    let moved = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = answers.clone();
    let stale_after_challenge = service_fn(move |request: Request<ReplayBody<Full<Bytes>>>| {
        let (recording, seen, clock, moved) = (
            recording.clone(),
            seen.clone(),
            clock.clone(),
            moved.clone(),
        );
        async move {
            let response = recording.oneshot(request).await?;
            let challenged = seen.lock().unwrap().last() == Some(&Answer::NonceChallenge);
            if challenged && !moved.swap(true, std::sync::atomic::Ordering::SeqCst) {
                let request = Request::get(clock).body(Full::default())?;
                assert_eq!(plain_client().request(request).await?.status(), 200);
            }
            Ok::<_, BoxError>(response)
        }
    });
    let api = AuthRefreshLayer::new(handle.clone())
        .dpop(dpop.clone())
        .layer(stale_after_challenge);
    // `localhost`: an origin whose nonce the key has not seen yet (the token
    // endpoint's nonce is cached under 127.0.0.1), so the first attempt is
    // challenged.
    let me = provider.url("/me").replace("127.0.0.1", "localhost");
    let response = api
        .oneshot(Request::get(me).body(Full::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        take_answers(&answers),
        [Answer::NonceChallenge, Answer::NonceChallenge]
    );
    let after = handle.token().unwrap();
    assert_eq!(
        after.access_token().expose_secret(),
        before.access_token().expose_secret(),
        "the valid token was kept"
    );
    let active = provider
        .introspect(before.access_token().expose_secret())
        .await["active"]
        .clone();
    assert_eq!(active, true, "the token is valid at the server all along");
    assert_eq!(handle.stats().refreshes, stats.refreshes, "no refresh");
    assert_eq!(handle.stats().retries, stats.retries, "no retry");
}
