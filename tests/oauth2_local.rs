//! OAuth2 source against a token server of our own on 127.0.0.1: the
//! password grant, vendor envelopes, rotation, the fallback order, the
//! re-authorization hook, retries, malformed and oversized responses.
#![cfg(feature = "oauth2")]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::{Upstream, client, get};
use secrecy::ExposeSecret;
use tower::{BoxError, Layer, ServiceExt};
use tower_auth_refresh::oauth2::{
    AuthorizationCode, ClientAuth, Envelope, ExpiryFormat, Grant, OAuth2Source,
    OAuth2SourceBuilder, RetryPolicy, TokenEndpointError,
};
use tower_auth_refresh::{
    AuthRefreshLayer, MemoryStore, ReauthorizationRequired, RefreshFailed, Token, TokenHandle,
    TokenStore,
};

/// One request the token server received.
#[derive(Debug, Clone)]
struct Received {
    form: HashMap<String, String>,
    authorization: Option<String>,
}

impl Received {
    fn grant_type(&self) -> &str {
        self.form.get("grant_type").map_or("", String::as_str)
    }
}

type Handler = dyn Fn(&Received, usize) -> Response + Send + Sync;
type ServerState = (Arc<Handler>, Arc<Mutex<Vec<Received>>>);

#[derive(Clone)]
struct TokenServer {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
}

impl TokenServer {
    /// A token endpoint at `/token` answering with `handler(request, n)`,
    /// `n` counting from 1.
    async fn start(handler: impl Fn(&Received, usize) -> Response + Send + Sync + 'static) -> Self {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let handler: Arc<Handler> = Arc::new(handler);
        let app = Router::new()
            .route("/token", post(token))
            .with_state((handler, received.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, received }
    }

    fn url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    fn grant_types(&self) -> Vec<String> {
        self.received()
            .iter()
            .map(|r| r.grant_type().to_owned())
            .collect()
    }

    fn builder(&self) -> OAuth2SourceBuilder {
        OAuth2Source::builder(self.url(), ClientAuth::basic("cli", "cli-secret")).retry(
            RetryPolicy {
                max_retries: 2,
                base: Duration::from_millis(1),
                max_wait: Duration::from_millis(50),
            },
        )
    }
}

async fn token(
    State((handler, received)): State<ServerState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = Received {
        form: url::form_urlencoded::parse(&body).into_owned().collect(),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    };
    let n = {
        let mut received = received.lock().unwrap();
        received.push(request.clone());
        received.len()
    };
    handler(&request, n)
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn ok(body: serde_json::Value) -> Response {
    json(StatusCode::OK, body)
}

fn oauth_error(status: StatusCode, error: &str) -> Response {
    json(
        status,
        serde_json::json!({"error": error, "error_description": format!("{error} from the test server")}),
    )
}

fn endpoint_error(err: &BoxError) -> &TokenEndpointError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&**err);
    while let Some(e) = cause {
        if let Some(found) = e.downcast_ref::<TokenEndpointError>() {
            return found;
        }
        cause = e.source();
    }
    panic!("no TokenEndpointError in {err}")
}

fn refresh_of(token: &Token) -> Option<String> {
    token.refresh_token().map(|r| r.expose_secret().to_owned())
}

#[tokio::test]
async fn password_grant_sends_credentials_and_scope() {
    let server = TokenServer::start(|_, n| {
        ok(serde_json::json!({
            "access_token": format!("at-{n}"), "token_type": "bearer",
            "expires_in": 3600, "refresh_token": format!("rt-{n}"), "scope": "orders"
        }))
    })
    .await;
    let source = server
        .builder()
        .initial_grant(Grant::password("alice@example.com", "pä ss&word"))
        .scope("orders")
        .build()
        .unwrap();
    let handle = TokenHandle::new(source);

    let token = handle.refresh_now().await.unwrap();
    assert_eq!(token.access_token().expose_secret(), "at-1");
    assert_eq!(refresh_of(&token).as_deref(), Some("rt-1"));
    let received = server.received();
    assert_eq!(received.len(), 1);
    let form = &received[0].form;
    assert_eq!(form["grant_type"], "password");
    assert_eq!(form["username"], "alice@example.com");
    assert_eq!(form["password"], "pä ss&word");
    assert_eq!(form["scope"], "orders");
    assert!(!form.contains_key("client_secret"));
    // cli:cli-secret
    assert_eq!(
        received[0].authorization.as_deref(),
        Some("Basic Y2xpOmNsaS1zZWNyZXQ=")
    );
    assert!(!format!("{handle:?}").contains("pä ss"));
}

#[tokio::test]
async fn a_rotated_refresh_token_replaces_the_old_and_a_missing_one_keeps_it() {
    // 1: password → rt-1; 2: refresh → rt-2 (rotated); 3: refresh → no refresh token.
    let server = TokenServer::start(|request, n| {
        let mut body = serde_json::json!({"access_token": format!("at-{n}"), "expires_in": 600});
        if request.grant_type() == "password" || n == 2 {
            body["refresh_token"] = format!("rt-{n}").into();
        }
        ok(body)
    })
    .await;
    let source = server
        .builder()
        .initial_grant(Grant::password("alice", "pw"))
        .build()
        .unwrap();
    let handle = TokenHandle::new(source);

    handle.refresh_now().await.unwrap();
    let second = handle.refresh_now().await.unwrap();
    assert_eq!(refresh_of(&second).as_deref(), Some("rt-2"));
    let third = handle.refresh_now().await.unwrap();
    assert_eq!(third.access_token().expose_secret(), "at-3");
    assert_eq!(refresh_of(&third).as_deref(), Some("rt-2"), "kept");
    handle.refresh_now().await.unwrap();

    let presented: Vec<Option<String>> = server
        .received()
        .iter()
        .map(|r| r.form.get("refresh_token").cloned())
        .collect();
    assert_eq!(
        presented,
        [
            None,
            Some("rt-1".into()),
            Some("rt-2".into()),
            Some("rt-2".into())
        ]
    );
    assert_eq!(
        server.grant_types(),
        [
            "password",
            "refresh_token",
            "refresh_token",
            "refresh_token"
        ]
    );
}

#[tokio::test]
async fn a_rejected_refresh_token_falls_back_to_the_initial_grant() {
    let server = TokenServer::start(|request, n| {
        if request.grant_type() == "refresh_token" {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
        }
        ok(serde_json::json!({"access_token": format!("at-{n}"), "refresh_token": format!("rt-{n}")}))
    })
    .await;
    let source = server
        .builder()
        .initial_grant(Grant::client_credentials())
        .build()
        .unwrap();
    let handle = TokenHandle::builder(source)
        .initial_token(Token::bearer("old").with_refresh_token("rt-old"))
        .build();

    let token = handle.refresh_now().await.unwrap();
    assert_eq!(token.access_token().expose_secret(), "at-2");
    assert_eq!(
        server.grant_types(),
        ["refresh_token", "client_credentials"]
    );
}

#[tokio::test]
async fn an_expired_refresh_token_is_not_presented() {
    let server =
        TokenServer::start(|_, n| ok(serde_json::json!({"access_token": format!("at-{n}")}))).await;
    let source = server
        .builder()
        .initial_grant(Grant::password("alice", "pw"))
        .build()
        .unwrap();
    let expired = Token::bearer("old")
        .with_refresh_token("rt-old")
        .with_refresh_expires_at(SystemTime::now() - Duration::from_secs(1));
    let handle = TokenHandle::builder(source).initial_token(expired).build();

    handle.refresh_now().await.unwrap();
    assert_eq!(server.grant_types(), ["password"]);
}

#[tokio::test]
async fn without_an_initial_grant_a_rejected_refresh_token_requires_reauthorization() {
    let server =
        TokenServer::start(|_, _| oauth_error(StatusCode::BAD_REQUEST, "invalid_grant")).await;
    let source = server.builder().build().unwrap();
    let handle = TokenHandle::builder(source)
        .initial_token(Token::bearer("old").with_refresh_token("rt-old"))
        .build();

    let err = handle.refresh_now().await.unwrap_err();
    let reauth = err
        .downcast_ref::<ReauthorizationRequired>()
        .unwrap_or_else(|| panic!("{err}"));
    assert_eq!(reauth.reason(), "the refresh token was rejected");
    let oauth = endpoint_error(&err).oauth().unwrap();
    assert_eq!(oauth.error(), "invalid_grant");
    assert_eq!(
        oauth.description(),
        Some("invalid_grant from the test server")
    );
    assert_eq!(server.received().len(), 1, "a 4xx is not retried");
    assert!(!format!("{err} {err:?}").contains("rt-old"));

    // Nothing at all to start from: the same error, and no request.
    let empty = TokenHandle::new(server.builder().build().unwrap());
    let err = empty.refresh_now().await.unwrap_err();
    assert!(err.downcast_ref::<ReauthorizationRequired>().is_some());
    assert_eq!(server.received().len(), 1);
}

#[tokio::test]
async fn the_reauthorization_hook_supplies_a_code_and_the_request_proceeds() {
    let upstream = Upstream::start().await;
    let up = upstream.clone();
    let server = TokenServer::start(move |request, n| match request.grant_type() {
        "authorization_code" if request.form["code"] == "fresh-code" => {
            let access = format!("at-{n}");
            up.accept(&access);
            ok(serde_json::json!({"access_token": access, "refresh_token": format!("rt-{n}"), "expires_in": 600}))
        }
        _ => oauth_error(StatusCode::BAD_REQUEST, "invalid_grant"),
    })
    .await;
    let hook_calls = Arc::new(AtomicUsize::new(0));
    let reasons = Arc::new(Mutex::new(Vec::new()));
    let (calls, why) = (hook_calls.clone(), reasons.clone());
    let source = server
        .builder()
        .redirect_uri("http://127.0.0.1/callback")
        .on_reauthorization(move |reauth: ReauthorizationRequired| {
            calls.fetch_add(1, Ordering::SeqCst);
            why.lock().unwrap().push(reauth.reason().to_owned());
            async { Some(AuthorizationCode::new("fresh-code")) }
        })
        .build()
        .unwrap();
    let handle = TokenHandle::builder(source)
        .initial_token(Token::bearer("old-at").with_refresh_token("dead-rt"))
        .min_token_age(Duration::ZERO)
        .build();
    let service = AuthRefreshLayer::new(handle.clone()).layer(client());

    let response = service
        .oneshot(get(&upstream.url("/orders")))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(hook_calls.load(Ordering::SeqCst), 1);
    assert_eq!(*reasons.lock().unwrap(), ["the refresh token was rejected"]);
    assert_eq!(
        server.grant_types(),
        ["refresh_token", "authorization_code"]
    );
    let exchange = &server.received()[1];
    assert_eq!(exchange.form["redirect_uri"], "http://127.0.0.1/callback");
    assert_eq!(
        refresh_of(&handle.token().unwrap()).as_deref(),
        Some("rt-2")
    );
    assert_eq!(upstream.rejected(), 1);
}

#[tokio::test]
async fn a_hook_without_a_code_leaves_reauthorization_required() {
    let server =
        TokenServer::start(|_, _| oauth_error(StatusCode::BAD_REQUEST, "invalid_grant")).await;
    let source = server
        .builder()
        .on_reauthorization(|_| async { None })
        .build()
        .unwrap();
    let handle = TokenHandle::builder(source)
        .initial_token(Token::bearer("a").with_refresh_token("r"))
        .build();
    let err = handle.refresh_now().await.unwrap_err();
    assert!(
        err.downcast_ref::<ReauthorizationRequired>().is_some(),
        "{err}"
    );
    assert_eq!(server.grant_types(), ["refresh_token"]);
}

#[tokio::test]
async fn exchange_code_installs_the_token() {
    let server = TokenServer::start(|_, _| {
        ok(serde_json::json!({"access_token": "from-code", "refresh_token": "rt", "expires_in": 60}))
    })
    .await;
    let source = server.builder().build().unwrap();
    let handle = TokenHandle::new(source.clone());
    source
        .exchange_code(
            &handle,
            AuthorizationCode::new("c-1")
                .with_redirect_uri("http://x/cb")
                .with_pkce_verifier("verifier"),
        )
        .await
        .unwrap();
    let status = handle.status();
    assert!(status.valid);
    assert_eq!(status.generation, 1);
    assert_eq!(
        handle.token().unwrap().access_token().expose_secret(),
        "from-code"
    );
    let form = &server.received()[0].form;
    assert_eq!(form["code"], "c-1");
    assert_eq!(form["redirect_uri"], "http://x/cb");
    assert_eq!(form["code_verifier"], "verifier");
}

#[tokio::test]
async fn client_secret_post_sends_no_authorization_header() {
    let server = TokenServer::start(|_, _| ok(serde_json::json!({"access_token": "a"}))).await;
    let source = OAuth2Source::builder(server.url(), ClientAuth::post("cli", "se cret"))
        .initial_grant(Grant::client_credentials())
        .build()
        .unwrap();
    TokenHandle::new(source).refresh_now().await.unwrap();
    let received = &server.received()[0];
    assert_eq!(received.authorization, None);
    assert_eq!(received.form["client_id"], "cli");
    assert_eq!(received.form["client_secret"], "se cret");
}

// ---- retries ----

async fn client_credentials(server: &TokenServer) -> Result<Token, BoxError> {
    let source = server
        .builder()
        .initial_grant(Grant::client_credentials())
        .build()
        .unwrap();
    TokenHandle::new(source)
        .refresh_now()
        .await
        .map(|t| (*t).clone())
}

#[tokio::test]
async fn a_5xx_is_retried_and_then_succeeds() {
    let server = TokenServer::start(|_, n| {
        if n < 3 {
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        } else {
            ok(serde_json::json!({"access_token": "finally"}))
        }
    })
    .await;
    let token = client_credentials(&server).await.unwrap();
    assert_eq!(token.access_token().expose_secret(), "finally");
    assert_eq!(server.received().len(), 3, "two retries");
}

#[tokio::test]
async fn retries_are_bounded() {
    let server = TokenServer::start(|_, _| StatusCode::BAD_GATEWAY.into_response()).await;
    let err = client_credentials(&server).await.unwrap_err();
    assert!(err.downcast_ref::<RefreshFailed>().is_some());
    match endpoint_error(&err) {
        TokenEndpointError::Status { status, attempts } => {
            assert_eq!(*status, 502);
            assert_eq!(*attempts, 3);
        }
        other => panic!("{other}"),
    }
    assert_eq!(server.received().len(), 3);
}

#[tokio::test]
async fn a_429_honours_a_short_retry_after_and_gives_up_on_a_long_one() {
    let server = TokenServer::start(|_, n| {
        if n == 1 {
            (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "0")]).into_response()
        } else {
            ok(serde_json::json!({"access_token": "after-429"}))
        }
    })
    .await;
    client_credentials(&server).await.unwrap();
    assert_eq!(server.received().len(), 2);

    // Retry-After beyond the policy's max_wait (50 ms here): no retry.
    let server = TokenServer::start(|_, _| {
        (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "3600")]).into_response()
    })
    .await;
    let err = client_credentials(&server).await.unwrap_err();
    assert!(matches!(
        endpoint_error(&err),
        TokenEndpointError::Status { attempts: 1, .. }
    ));
    assert_eq!(server.received().len(), 1);
}

#[tokio::test]
async fn a_4xx_is_not_retried() {
    let server =
        TokenServer::start(|_, _| oauth_error(StatusCode::BAD_REQUEST, "invalid_scope")).await;
    let err = client_credentials(&server).await.unwrap_err();
    assert_eq!(
        endpoint_error(&err).oauth().unwrap().error(),
        "invalid_scope"
    );
    let server = TokenServer::start(|_, _| StatusCode::FORBIDDEN.into_response()).await;
    let err = client_credentials(&server).await.unwrap_err();
    assert!(matches!(
        endpoint_error(&err),
        TokenEndpointError::Status { attempts: 1, .. }
    ));
    assert_eq!(server.received().len(), 1);
}

#[tokio::test]
async fn an_unreachable_endpoint_is_retried_then_reported() {
    // A port that was just free: nothing listens there.
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let source = OAuth2Source::builder(format!("http://{addr}/token"), ClientAuth::basic("a", "b"))
        .initial_grant(Grant::client_credentials())
        .retry(RetryPolicy {
            max_retries: 1,
            base: Duration::from_millis(1),
            max_wait: Duration::from_millis(10),
        })
        .build()
        .unwrap();
    let err = TokenHandle::new(source).refresh_now().await.unwrap_err();
    assert!(matches!(
        endpoint_error(&err),
        TokenEndpointError::Transport { attempts: 2, .. }
    ));
}

#[tokio::test]
async fn a_hanging_endpoint_times_out() {
    let server = TokenServer::start(|_, _| {
        // A body that never ends.
        Response::new(Body::from_stream(futures::stream::pending::<
            Result<Bytes, std::io::Error>,
        >()))
    })
    .await;
    let source = server
        .builder()
        .initial_grant(Grant::client_credentials())
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let err = TokenHandle::new(source).refresh_now().await.unwrap_err();
    assert!(matches!(
        endpoint_error(&err),
        TokenEndpointError::Timeout { .. }
    ));
    assert_eq!(server.received().len(), 1, "a timeout is not retried");
}

// ---- malformed input ----

async fn malformed(body: Response) -> TokenEndpointError {
    let body = Arc::new(Mutex::new(Some(body)));
    let server = TokenServer::start(move |_, _| {
        body.lock()
            .unwrap()
            .take()
            .unwrap_or_else(|| StatusCode::GONE.into_response())
    })
    .await;
    let err = client_credentials(&server).await.unwrap_err();
    assert_eq!(server.received().len(), 1);
    endpoint_error(&err).clone()
}

fn reason(err: TokenEndpointError) -> String {
    match err {
        TokenEndpointError::Malformed { reason } => reason,
        other => panic!("not malformed: {other}"),
    }
}

#[tokio::test]
async fn malformed_responses_are_typed_errors() {
    let html = (StatusCode::OK, "<html>login</html>").into_response();
    assert_eq!(reason(malformed(html).await), "the body is not JSON");
    let cases = [
        (r#"{"access_token":""}"#, "`access_token` is empty"),
        (r#"{"token_type":"Bearer"}"#, "`access_token` is missing"),
        (
            r#"{"access_token":["a"]}"#,
            "`access_token` should be a string, got an array",
        ),
        (
            r#"{"access_token":"a","expires_in":-1}"#,
            "`expires_in` is negative",
        ),
        (
            r#"{"access_token":"a","expires_in":{"s":1}}"#,
            "`expires_in` should be a number, got an object",
        ),
        (r#""a string""#, "expected a JSON object, got a string"),
    ];
    for (body, expected) in cases {
        let response = (StatusCode::OK, body.to_owned()).into_response();
        assert_eq!(reason(malformed(response).await), expected, "{body}");
    }
}

#[tokio::test]
async fn huge_bodies_are_refused() {
    let declared = (StatusCode::OK, vec![b' '; 100 * 1024]).into_response();
    assert!(matches!(
        malformed(declared).await,
        TokenEndpointError::TooLarge { limit: 65536 }
    ));
    // No Content-Length: the read stops at the cap.
    let chunks = futures::stream::iter(
        (0..1000).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b' '; 1024]))),
    );
    let streamed = Response::new(Body::from_stream(chunks));
    assert!(matches!(
        malformed(streamed).await,
        TokenEndpointError::TooLarge { .. }
    ));
}

// ---- vendor envelope ----

fn vendor(server: &TokenServer) -> OAuth2Source {
    server
        .builder()
        .initial_grant(Grant::password("seller-42", "pw"))
        .envelope(
            Envelope::new("/data/accessToken")
                .refresh_token("/data/refreshToken")
                .expires("/data/expiresAt", ExpiryFormat::UnixMillis)
                .refresh_expires("/data/refreshExpiresAt", ExpiryFormat::UnixMillis)
                .code("/code", 0)
                .message("/msg"),
        )
        .build()
        .unwrap()
}

fn unix_millis_in(d: Duration) -> u64 {
    (SystemTime::now() + d)
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn a_vendor_envelope_is_parsed_and_rotates() {
    let server = TokenServer::start(|_, n| {
        ok(serde_json::json!({"code": 0, "msg": "ok", "data": {
            "accessToken": format!("v-at-{n}"),
            "refreshToken": format!("v-rt-{n}"),
            "expiresAt": unix_millis_in(Duration::from_secs(7200)),
            "refreshExpiresAt": unix_millis_in(Duration::from_secs(30 * 86400)),
        }}))
    })
    .await;
    let handle = TokenHandle::new(vendor(&server));
    let token = handle.refresh_now().await.unwrap();
    assert_eq!(token.access_token().expose_secret(), "v-at-1");
    let left = token.expires_in().unwrap();
    assert!(left > Duration::from_secs(7000) && left <= Duration::from_secs(7200));
    assert!(token.refresh_expires_at().unwrap() > SystemTime::now() + Duration::from_secs(86400));
    let token = handle.refresh_now().await.unwrap();
    assert_eq!(refresh_of(&token).as_deref(), Some("v-rt-2"));
    assert_eq!(server.grant_types(), ["password", "refresh_token"]);
    assert_eq!(server.received()[1].form["refresh_token"], "v-rt-1");
}

#[tokio::test]
async fn a_vendor_business_code_or_missing_field_is_a_clear_error() {
    let server = TokenServer::start(|_, _| {
        ok(serde_json::json!({"code": 40001, "msg": "密码错误", "data": null}))
    })
    .await;
    let err = TokenHandle::new(vendor(&server))
        .refresh_now()
        .await
        .unwrap_err();
    let endpoint = endpoint_error(&err);
    assert!(
        matches!(endpoint, TokenEndpointError::Business { code, message } if code == "40001" && message.as_deref() == Some("密码错误")),
        "{endpoint}"
    );
    assert_eq!(server.received().len(), 1);

    let server =
        TokenServer::start(|_, _| ok(serde_json::json!({"code": 0, "data": {"accessToken": "a"}})))
            .await;
    let err = TokenHandle::new(vendor(&server))
        .refresh_now()
        .await
        .unwrap_err();
    assert_eq!(
        endpoint_error(&err).to_string(),
        "token endpoint response has no `expires` at JSON pointer `/data/expiresAt`"
    );
}

// ---- the token call does not queue behind the requests (FIELD_NOTES mistake 9) ----

#[tokio::test]
async fn the_token_call_does_not_wait_behind_a_saturated_client() {
    let upstream = Upstream::start().await;
    let up = upstream.clone();
    let server = TokenServer::start(move |_, n| {
        let access = format!("at-{n}");
        up.accept(&access);
        ok(serde_json::json!({"access_token": access, "expires_in": 600}))
    })
    .await;
    let source = server
        .builder()
        .initial_grant(Grant::client_credentials())
        .build()
        .unwrap();
    let handle = TokenHandle::new(source);
    // The wrapped client lets one request through at a time; requests hold
    // their slot while they wait for the token.
    let service = tower::ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .concurrency_limit(1)
        .service(client());

    let calls = (0..8).map(|i| {
        let service = service.clone();
        let url = upstream.url(&format!("/r/{i}"));
        tokio::spawn(async move { service.oneshot(get(&url)).await.map(|r| r.status()) })
    });
    let statuses = tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(calls))
        .await
        .expect("requests finished");
    for status in statuses {
        assert_eq!(status.unwrap().unwrap(), 200);
    }
    assert_eq!(server.received().len(), 1, "one token call for all");
}

#[tokio::test]
async fn a_spent_refresh_token_is_not_presented_even_if_its_replacement_was_never_installed() {
    // The first refresh rotates rt-0 → rt-1 but hands back an access token
    // that cannot be put in a header, so the manager keeps the old token.
    let server = TokenServer::start(|request, n| {
        let access = if n == 1 {
            "bad\ntoken".to_owned()
        } else {
            format!("at-{n}")
        };
        let presented = request
            .form
            .get("refresh_token")
            .cloned()
            .unwrap_or_default();
        if presented != format!("rt-{}", n - 1) {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
        }
        ok(serde_json::json!({"access_token": access, "refresh_token": format!("rt-{n}")}))
    })
    .await;
    let handle = TokenHandle::builder(server.builder().build().unwrap())
        .initial_token(Token::bearer("at-0").with_refresh_token("rt-0"))
        .build();

    let err = handle.refresh_now().await.unwrap_err();
    assert!(err.downcast_ref::<RefreshFailed>().is_some(), "{err}");
    assert_eq!(
        refresh_of(&handle.token().unwrap()).as_deref(),
        Some("rt-0"),
        "the manager still holds the spent refresh token"
    );

    let token = handle.refresh_now().await.unwrap();
    assert_eq!(token.access_token().expose_secret(), "at-2");
    let presented: Vec<String> = server
        .received()
        .iter()
        .map(|r| r.form["refresh_token"].clone())
        .collect();
    assert_eq!(presented, ["rt-0", "rt-1"], "rt-0 was presented once");
}

#[tokio::test]
async fn a_vendor_error_status_with_an_envelope_keeps_its_business_code() {
    let server = TokenServer::start(|_, _| {
        json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"code": 40002, "msg": "账号已禁用"}),
        )
    })
    .await;
    let err = TokenHandle::new(vendor(&server))
        .refresh_now()
        .await
        .unwrap_err();
    assert_eq!(
        endpoint_error(&err).to_string(),
        "token endpoint returned business code 40002: 账号已禁用"
    );
    assert_eq!(server.received().len(), 1, "a 4xx is not retried");
}

// ---- refresh grants and 5xx (a gateway's 502 may come after the rotation) ----

async fn refresh_once(server: &TokenServer) -> Result<Token, BoxError> {
    let source = server.builder().build().unwrap();
    TokenHandle::builder(source)
        .initial_token(Token::bearer("old").with_refresh_token("rt-1"))
        .build()
        .refresh_now()
        .await
        .map(|t| (*t).clone())
}

#[tokio::test]
async fn a_refresh_grant_answered_502_is_not_sent_again() {
    // The server rotated rt-1, then its gateway answered 502: presenting
    // rt-1 again would be a reuse.
    for status in [
        StatusCode::BAD_GATEWAY,
        StatusCode::GATEWAY_TIMEOUT,
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::SERVICE_UNAVAILABLE,
    ] {
        let server = TokenServer::start(move |_, _| status.into_response()).await;
        let err = refresh_once(&server).await.unwrap_err();
        assert!(matches!(
            endpoint_error(&err),
            TokenEndpointError::Status { attempts: 1, .. }
        ));
        assert_eq!(
            server.grant_types(),
            ["refresh_token"],
            "{status}: the refresh token was presented once"
        );
    }
}

#[tokio::test]
async fn a_refresh_grant_is_retried_on_503_or_429_with_retry_after() {
    for status in [
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        let server = TokenServer::start(move |_, n| {
            if n == 1 {
                (status, [("retry-after", "0")]).into_response()
            } else {
                ok(serde_json::json!({"access_token": "new", "refresh_token": "rt-2"}))
            }
        })
        .await;
        let token = refresh_once(&server).await.unwrap();
        assert_eq!(token.access_token().expose_secret(), "new");
        assert_eq!(server.grant_types(), ["refresh_token", "refresh_token"]);
    }
}

/// A fleet member on `store`, with a password grant to fall back on.
fn fleet_member(source: OAuth2SourceBuilder, store: &MemoryStore) -> TokenHandle {
    TokenHandle::builder(
        source
            .initial_grant(Grant::password("u", "p"))
            .build()
            .unwrap(),
    )
    .store(store.clone(), "k")
    .build()
}

#[tokio::test]
async fn a_5xx_with_an_error_body_after_the_rotation_leaves_the_refresh_token_marked() {
    // The server rotated rt-1 and then answered 5xx with an error body of
    // its own kind (an RFC 6749 error, a vendor envelope): the refresh
    // token's fate is unknown, so no process presents it again.
    let answers: [(StatusCode, serde_json::Value, bool); 3] = [
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({"error": "server_error"}),
            false,
        ),
        (
            StatusCode::BAD_GATEWAY,
            serde_json::json!({"error": "temporarily_unavailable"}),
            false,
        ),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({"code": 50000, "msg": "系统繁忙"}),
            true,
        ),
    ];
    for (status, body, envelope) in answers {
        let server = TokenServer::start(move |request, n| {
            if request.grant_type() == "refresh_token" && n == 1 {
                return json(status, body.clone());
            }
            if request.grant_type() == "refresh_token" {
                // rt-1 was spent by the first call: a second use is reuse.
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
            }
            ok(serde_json::json!({"access_token": format!("at-{n}"), "refresh_token": format!("rt-{n}"),
                "code": 0, "data": {"accessToken": format!("at-{n}"), "refreshToken": format!("rt-{n}")}}))
        })
        .await;
        let builder = || {
            let builder = server.builder();
            if envelope {
                builder.envelope(
                    Envelope::new("/data/accessToken")
                        .refresh_token("/data/refreshToken")
                        .code("/code", 0)
                        .message("/msg"),
                )
            } else {
                builder
            }
        };
        let store = MemoryStore::new();
        store
            .save("k", &Token::bearer("at-0").with_refresh_token("rt-1"), None)
            .await
            .unwrap();
        let a = fleet_member(builder(), &store);
        let b = fleet_member(builder(), &store);

        a.refresh_now().await.unwrap_err();
        b.refresh_now().await.unwrap();
        a.refresh_now().await.unwrap();

        let presented: Vec<String> = server
            .received()
            .iter()
            .filter_map(|r| r.form.get("refresh_token").cloned())
            .collect();
        assert_eq!(
            presented.iter().filter(|rt| *rt == "rt-1").count(),
            1,
            "{status} {envelope}: rt-1 presented once; presented {presented:?}"
        );
    }
}

/// A failed revocation names the revocation endpoint, not the token
/// endpoint, and still carries the typed cause.
#[tokio::test]
async fn a_failed_revocation_names_the_revocation_endpoint() {
    let server = TokenServer::start(|_, _| ok(serde_json::json!({"access_token": "at"}))).await;
    let source = server
        .builder()
        .revocation_url(format!("http://{}/no-such-revocation", server.addr))
        .build()
        .unwrap();
    let handle = TokenHandle::builder(source)
        .initial_token(Token::bearer("at").with_refresh_token("rt-secret"))
        .build();
    let err = handle.revoke().await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("revocation endpoint"), "{text}");
    assert!(!text.contains("token endpoint"), "{text}");
    assert!(!format!("{text} {err:?}").contains("rt-secret"));
    let failed = err
        .downcast_ref::<tower_auth_refresh::oauth2::RevocationFailed>()
        .expect("a typed revocation error");
    assert!(matches!(
        failed.error(),
        TokenEndpointError::Status { status, .. } if status.as_u16() == 404
    ));
    assert!(
        handle.token().is_none(),
        "forgotten even though revocation failed"
    );
}

/// A DPoP token request answered with a token that is not bound to the key
/// is refused, and the error says what the answer declared.
#[cfg(feature = "dpop")]
#[tokio::test]
async fn a_dpop_request_answered_with_an_unbound_token_says_what_was_declared() {
    for (answer, expected) in [
        (
            serde_json::json!({"access_token": "at"}),
            "the answer has no `token_type`",
        ),
        (
            serde_json::json!({"access_token": "at", "token_type": "bearer"}),
            "the token is of type `Bearer`",
        ),
    ] {
        let server = TokenServer::start(move |_, _| ok(answer.clone())).await;
        let source = server
            .builder()
            .initial_grant(Grant::client_credentials())
            .dpop(tower_auth_refresh::dpop::DpopKey::generate().unwrap())
            .build()
            .unwrap();
        let err = TokenHandle::new(source).refresh_now().await.unwrap_err();
        let text = format!("{}", endpoint_error(&err));
        assert!(text.contains(expected), "{text}");
        assert!(text.contains("not `DPoP`"), "{text}");
    }
}
