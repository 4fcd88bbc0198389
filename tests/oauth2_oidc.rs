//! Interop with a real authorization server: panva's `oidc-provider`
//! (pinned in `tests/oidc/package.json`), started by the harness below with
//! `node tests/oidc/server.mjs` on 127.0.0.1.
//!
//! Needs Node.js and `npm ci` in `tests/oidc`; without them these tests fail
//! with a message saying so.
#![cfg(feature = "oauth2")]

mod common;
mod oidc_support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get as get_route;
use bytes::Bytes;
use common::{client, get};
use http::Request;
use http_body_util::{BodyExt, Full};
use oidc_support::{Provider, REDIRECT_URI, introspect, plain_client};
use secrecy::ExposeSecret;
use tower::{BoxError, Layer, ServiceExt, service_fn};
use tower_auth_refresh::oauth2::{
    AuthorizationCode, ClientAuth, Grant, OAuth2Source, OAuth2SourceBuilder, TokenEndpointError,
};
use tower_auth_refresh::{
    AuthRefreshLayer, ReauthorizationRequired, RefreshFailed, Token, TokenHandle,
};

/// What the token endpoint was sent: the form and whether an
/// `Authorization` header came with it.
#[derive(Debug, Clone)]
struct Sent {
    form: Vec<(String, String)>,
    basic_auth: bool,
}

impl Sent {
    fn param(&self, key: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends the token requests of `builder` through a hyper-util client that
/// records each of them.
fn recorded(builder: OAuth2SourceBuilder) -> (OAuth2SourceBuilder, Arc<Mutex<Vec<Sent>>>) {
    let log: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let client = plain_client();
    let recorder = log.clone();
    let service = service_fn(move |request: Request<Full<Bytes>>| {
        let client = client.clone();
        let recorder = recorder.clone();
        async move {
            let (parts, body) = request.into_parts();
            let bytes = body.collect().await?.to_bytes();
            recorder.lock().unwrap().push(Sent {
                form: url::form_urlencoded::parse(&bytes).into_owned().collect(),
                basic_auth: parts.headers.contains_key("authorization"),
            });
            let response = client
                .request(Request::from_parts(parts, Full::new(bytes)))
                .await?;
            Ok::<_, BoxError>(response)
        }
    });
    (builder.http_service(service), log)
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

#[tokio::test]
async fn client_credentials_with_basic_auth_form_encodes_the_credentials() {
    let provider = Provider::start().await;
    // Both the id and the secret hold characters that RFC 6749 §2.3.1 wants
    // form-urlencoded before Base64; the provider decodes them that way.
    let (builder, sent) = recorded(
        OAuth2Source::builder(
            provider.token_url(),
            ClientAuth::basic("reports:svc", "s3cr3t +/=:%&?~"),
        )
        .initial_grant(Grant::client_credentials())
        .scope("api:read"),
    );
    let source = builder.build().unwrap();
    let handle = TokenHandle::new(source);

    let token = handle.refresh_now().await.unwrap();
    assert_eq!(token.token_type(), "Bearer");
    assert_eq!(token.scopes(), ["api:read"]);
    let left = token.expires_in().unwrap();
    assert!(left > Duration::from_secs(200) && left <= Duration::from_secs(300));

    let introspection = provider
        .introspect(token.access_token().expose_secret())
        .await;
    assert_eq!(introspection["active"], true, "{introspection}");
    assert_eq!(introspection["client_id"], "reports:svc");

    let sent = sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert!(sent[0].basic_auth);
    assert_eq!(sent[0].param("grant_type"), Some("client_credentials"));
    assert_eq!(sent[0].param("client_secret"), None);
}

#[tokio::test]
async fn client_credentials_with_client_secret_post() {
    let provider = Provider::start().await;
    let (builder, sent) = recorded(
        OAuth2Source::builder(
            provider.token_url(),
            ClientAuth::post("post-svc", "post-secret"),
        )
        .initial_grant(Grant::client_credentials())
        .scope("api:read"),
    );
    let source = builder.build().unwrap();
    let handle = TokenHandle::new(source);

    let token = handle.refresh_now().await.unwrap();
    let introspection = provider
        .introspect(token.access_token().expose_secret())
        .await;
    assert_eq!(introspection["active"], true, "{introspection}");
    assert_eq!(introspection["client_id"], "post-svc");
    let sent = sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert!(!sent[0].basic_auth);
    assert_eq!(sent[0].param("client_id"), Some("post-svc"));
    assert_eq!(sent[0].param("client_secret"), Some("post-secret"));
}

#[tokio::test]
async fn invalid_client_is_a_typed_error_sent_once() {
    let provider = Provider::start().await;
    let (builder, sent) = recorded(
        OAuth2Source::builder(
            provider.token_url(),
            ClientAuth::basic("reports:svc", "wrong-secret-XYZ"),
        )
        .initial_grant(Grant::client_credentials()),
    );
    let source = builder.build().unwrap();
    let handle = TokenHandle::new(source);

    let err = handle.refresh_now().await.unwrap_err();
    assert!(err.downcast_ref::<RefreshFailed>().is_some(), "{err}");
    let oauth = endpoint_error(&err).oauth().expect("an RFC 6749 error");
    assert_eq!(oauth.error(), "invalid_client");
    assert_eq!(oauth.status(), 401);
    assert!(oauth.description().is_some());
    assert_eq!(sent.lock().unwrap().len(), 1, "a 4xx is not retried");
    let shown = format!("{err} {err:?} {:?}", handle.status());
    assert!(!shown.contains("wrong-secret-XYZ"), "{shown}");
}

#[tokio::test]
async fn rotated_refresh_tokens_are_never_presented_twice() {
    let provider = Provider::start().await;
    let (builder, sent) = recorded(
        OAuth2Source::builder(provider.token_url(), ClientAuth::basic("app", "app-secret"))
            .redirect_uri(REDIRECT_URI),
    );
    let source = builder.build().unwrap();
    let handle = TokenHandle::builder(source.clone())
        .min_token_age(Duration::ZERO)
        .build();

    let code = provider.authorization_code("app").await;
    source.exchange_code(&handle, code.as_str()).await.unwrap();
    let mut issued = vec![refresh_token_of(&handle.token().unwrap())];

    for _ in 0..4 {
        let token = handle.refresh_now().await.unwrap();
        let rotated = refresh_token_of(&token);
        assert!(!issued.contains(&rotated), "the server rotates");
        issued.push(rotated);
    }

    // Each refresh presented the refresh token issued just before it, once.
    let sent = sent.lock().unwrap().clone();
    assert_eq!(sent[0].param("grant_type"), Some("authorization_code"));
    assert_eq!(sent[0].param("code"), Some(code.as_str()));
    assert_eq!(sent[0].param("redirect_uri"), Some(REDIRECT_URI));
    let presented: Vec<&str> = sent[1..]
        .iter()
        .map(|s| {
            assert_eq!(s.param("grant_type"), Some("refresh_token"));
            s.param("refresh_token").unwrap()
        })
        .collect();
    let expected: Vec<&str> = issued[..4].iter().map(String::as_str).collect();
    assert_eq!(presented, expected);

    // The first refresh token is refused by the server now. (oidc-provider
    // treats the reuse as theft and revokes the whole grant, which is why
    // the crate must never present it again.)
    let stale = OAuth2Source::builder(provider.token_url(), ClientAuth::basic("app", "app-secret"))
        .build()
        .unwrap();
    let replay = TokenHandle::builder(stale)
        .initial_token(Token::bearer("unused").with_refresh_token(issued[0].clone()))
        .build();
    let err = replay.refresh_now().await.unwrap_err();
    let reauth = err
        .downcast_ref::<ReauthorizationRequired>()
        .unwrap_or_else(|| panic!("expected re-authorization, got {err}"));
    assert!(endpoint_error(&err).is_invalid_grant(), "{reauth}");

    // The grant is revoked: even the newest refresh token is refused, and
    // with no initial grant the handle asks for re-authorization.
    let err = handle.refresh_now().await.unwrap_err();
    assert!(
        err.downcast_ref::<ReauthorizationRequired>().is_some(),
        "{err}"
    );
}

fn refresh_token_of(token: &Token) -> String {
    token
        .refresh_token()
        .expect("a refresh token")
        .expose_secret()
        .to_owned()
}

/// An API that accepts a bearer token only if the provider's introspection
/// endpoint says it is active.
#[derive(Clone)]
struct ProtectedApi {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(String, bool)>>>,
}

impl ProtectedApi {
    async fn start(introspection_url: String) -> Self {
        let seen: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
        let app = Router::new()
            .route("/me", get_route(protected))
            .with_state((introspection_url, seen.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, seen }
    }

    fn url(&self) -> String {
        format!("http://{}/me", self.addr)
    }

    fn seen(&self) -> Vec<(String, bool)> {
        self.seen.lock().unwrap().clone()
    }
}

type ApiState = (String, Arc<Mutex<Vec<(String, bool)>>>);

async fn protected(State((url, seen)): State<ApiState>, headers: HeaderMap) -> Response {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    let introspection = introspect(&url, &token).await;
    let active = introspection["active"] == true;
    seen.lock().unwrap().push((token, active));
    if active {
        (StatusCode::OK, format!("hello {}", introspection["sub"])).into_response()
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(
                "www-authenticate",
                "Bearer error=\"invalid_token\", error_description=\"The access token expired\"",
            )],
            "expired",
        )
            .into_response()
    }
}

/// Waits (bounded) until the provider no longer accepts `token`.
async fn until_inactive(provider: &Provider, token: &str) {
    for _ in 0..80 {
        if provider.introspect(token).await["active"] != true {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("the access token did not expire within 20 s");
}

#[tokio::test]
async fn an_access_token_the_upstream_finds_expired_is_refreshed_and_the_request_replayed() {
    let provider = Provider::start().await;
    let api = ProtectedApi::start(provider.url("/token/introspection")).await;
    let source = OAuth2Source::builder(
        provider.token_url(),
        ClientAuth::basic("short-app", "short-app-secret"),
    )
    .redirect_uri(REDIRECT_URI)
    .build()
    .unwrap();

    // The client does not know when this token expires (say, it was
    // restored after a restart): only the upstream can tell.
    let code = provider.authorization_code("short-app").await;
    let first = source.exchange_code_for_token(code.as_str()).await.unwrap();
    let first_access = first.access_token().expose_secret().to_owned();
    let first_refresh = refresh_token_of(&first);
    let handle = TokenHandle::builder(source)
        .initial_token(
            Token::bearer(first_access.clone()).with_refresh_token(first_refresh.clone()),
        )
        .min_token_age(Duration::ZERO)
        .no_refresh_ahead()
        .build();
    let service = AuthRefreshLayer::new(handle.clone()).layer(client());

    let response = service.clone().oneshot(get(&api.url())).await.unwrap();
    assert_eq!(response.status(), 200, "the fresh token works");

    until_inactive(&provider, &first_access).await;

    let response = service.clone().oneshot(get(&api.url())).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(common::body_text(response).await, "hello \"alice\"");

    let seen = api.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(
        seen[1],
        (first_access.clone(), false),
        "rejected by the upstream"
    );
    assert!(seen[2].1, "replayed with the new token");
    assert_ne!(seen[2].0, first_access);
    let stats = handle.stats();
    assert_eq!(stats.refreshes, 1);
    assert_eq!(stats.retries, 1);
    let current = handle.token().unwrap();
    assert_ne!(refresh_token_of(&current), first_refresh, "rotated");
}

#[tokio::test]
async fn an_access_token_known_to_be_expired_is_refreshed_before_sending() {
    let provider = Provider::start().await;
    let api = ProtectedApi::start(provider.url("/token/introspection")).await;
    let source = OAuth2Source::builder(
        provider.token_url(),
        ClientAuth::basic("short-app", "short-app-secret"),
    )
    .redirect_uri(REDIRECT_URI)
    .build()
    .unwrap();
    let handle = TokenHandle::builder(source.clone())
        .min_token_age(Duration::ZERO)
        .no_refresh_ahead()
        .build();
    let code = provider.authorization_code("short-app").await;
    source.exchange_code(&handle, code.as_str()).await.unwrap();
    let first = handle.token().unwrap();
    assert!(first.expires_in().unwrap() <= Duration::from_secs(2));
    let service = AuthRefreshLayer::new(handle.clone()).layer(client());

    // Wait (bounded) until the handle itself counts the token as expired.
    for _ in 0..80 {
        if !handle.status().valid {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !handle.status().valid,
        "the token did not expire within 8 s"
    );

    let response = service.clone().oneshot(get(&api.url())).await.unwrap();
    assert_eq!(response.status(), 200);
    let seen = api.seen();
    assert_eq!(seen.len(), 1, "the expired token was never sent");
    assert!(seen[0].1);
    let stats = handle.stats();
    assert_eq!(stats.refreshes, 1);
    assert_eq!(stats.retries, 0);
    assert_eq!(stats.waited, 1);
}

#[tokio::test]
async fn a_rejected_refresh_token_is_replaced_through_the_reauthorization_hook() {
    let provider = Arc::new(Provider::start().await);
    let hook_calls = Arc::new(Mutex::new(Vec::new()));
    let (for_hook, calls) = (provider.clone(), hook_calls.clone());
    let (builder, sent) = recorded(
        OAuth2Source::builder(provider.token_url(), ClientAuth::basic("app", "app-secret"))
            .redirect_uri(REDIRECT_URI)
            .on_reauthorization(move |why: ReauthorizationRequired| {
                calls.lock().unwrap().push(why.reason().to_owned());
                let provider = for_hook.clone();
                async move {
                    Some(AuthorizationCode::new(
                        provider.authorization_code("app").await,
                    ))
                }
            }),
    );
    let handle = TokenHandle::builder(builder.build().unwrap())
        .initial_token(Token::bearer("stale").with_refresh_token("never-issued"))
        .build();

    let token = handle.refresh_now().await.unwrap();
    assert_eq!(
        *hook_calls.lock().unwrap(),
        ["the refresh token was rejected"]
    );
    let introspection = provider
        .introspect(token.access_token().expose_secret())
        .await;
    assert_eq!(introspection["active"], true, "{introspection}");
    assert_eq!(introspection["sub"], "alice");
    let grant_types: Vec<String> = sent
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.param("grant_type").unwrap().to_owned())
        .collect();
    assert_eq!(grant_types, ["refresh_token", "authorization_code"]);
    assert!(token.refresh_token().is_some());
}
