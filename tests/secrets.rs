//! No secret in a log line or a Debug output (FIELD_NOTES mistake 7): all
//! tracing at trace level is captured while tokens are fetched, used,
//! rejected, refreshed and replayed, and searched for every 8-character
//! piece of the access and refresh tokens.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Upstream, client, get, post};
use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_auth_refresh::{
    AuthRefreshLayer, BoxError, RefreshContext, Token, TokenHandle, token_source_fn,
};

const ACCESS: &str = "acc3ss-Q7w9Zk2LmP4xR8vT";
const REFRESH: &str = "r3fresh-Hn5Jd8Fs1Gq6Yb0C";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn assert_no_secret(text: &str, what: &str) {
    for secret in [ACCESS, REFRESH] {
        for window in secret.as_bytes().windows(8) {
            let piece = std::str::from_utf8(window).unwrap();
            assert!(!text.contains(piece), "{what} contains {piece:?}:\n{text}");
        }
    }
}

#[tokio::test]
async fn tracing_and_debug_never_show_a_token() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let upstream = Upstream::start().await;
    let calls = Arc::new(Mutex::new(0));
    let counter = calls.clone();
    let up = upstream.clone();
    let source = token_source_fn(move |_cx: RefreshContext| {
        let counter = counter.clone();
        let up = up.clone();
        async move {
            let n = {
                let mut c = counter.lock().unwrap();
                *c += 1;
                *c
            };
            if n == 3 {
                return Err::<Token, BoxError>("endpoint down".into());
            }
            let access = format!("{ACCESS}{n}");
            up.accept(&access);
            Ok(Token::bearer(access)
                .with_refresh_token(REFRESH)
                .with_expires_in(Duration::from_secs(600)))
        }
    });
    let handle = TokenHandle::builder(source)
        .min_token_age(Duration::ZERO)
        .backoff(Duration::from_millis(1), Duration::from_millis(1))
        .build();
    let layer = AuthRefreshLayer::new(handle.clone());
    let service = ServiceBuilder::new().layer(layer.clone()).service(client());

    // Fetch, use, reject, refresh, replay, fail, recover.
    service
        .clone()
        .oneshot(get(&upstream.url("/a")))
        .await
        .unwrap();
    upstream.revoke_all();
    service
        .clone()
        .oneshot(post(&upstream.url("/b"), "{}"))
        .await
        .unwrap();
    upstream.revoke_all();
    let failed = service.clone().oneshot(get(&upstream.url("/c"))).await;
    let err = failed.expect_err("third fetch fails");
    tokio::time::sleep(Duration::from_millis(5)).await;
    service
        .clone()
        .oneshot(get(&upstream.url("/d")))
        .await
        .unwrap();

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("token_refresh"),
        "refresh spans are traced:\n{logs}"
    );
    assert_no_secret(&logs, "trace output");

    let token = handle.token().unwrap();
    let debugs = [
        format!("{:?} {:#?}", token, token),
        format!("{handle:?} {:?} {:?}", handle.status(), handle.stats()),
        format!("{layer:?}"),
        format!("{:?}", layer.layer(client())),
        format!("{err} {err:?}"),
        serde_json::to_string(&handle.status()).unwrap(),
    ];
    for debug in &debugs {
        assert_no_secret(debug, "Debug output");
    }
    let _ = std::io::stdout().flush();
}

#[path = "../examples/demo/scenario.rs"]
mod demo;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_scenario_at_trace_level_never_shows_a_token() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // The demo's tasks run on the runtime's threads: the subscriber must be global.
    tracing::subscriber::set_global_default(subscriber).expect("first global subscriber");

    let settings = demo::Settings {
        token_lifetime: Duration::from_millis(400),
        tasks: 20,
        requests_per_task: 10,
        pace: Duration::from_millis(150),
        report_every: Duration::from_secs(60),
    };
    let outcome = demo::run(settings, |_| {}, |_| {}).await.unwrap();
    assert_eq!(outcome.failed, 0);
    assert!(outcome.issued >= 2, "the run crossed at least one expiry");
    assert_eq!(outcome.tokens.len(), outcome.issued);

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("token_refresh") && logs.contains("retrying request"),
        "refreshes and retries are traced"
    );
    let handle = &outcome.handle;
    let seen = [
        logs,
        format!("{handle:?} {:?} {:?}", handle.status(), handle.stats()),
        format!("{:?}", handle.token()),
        serde_json::to_string(&handle.status()).unwrap(),
    ];
    for token in &outcome.tokens {
        assert!(token.len() >= 8);
        for text in &seen {
            for window in token.as_bytes().windows(8) {
                let piece = std::str::from_utf8(window).unwrap();
                // The common prefix "demo-token-…" is not secret; the random tail is.
                if "demo-token-".contains(piece) {
                    continue;
                }
                assert!(!text.contains(piece), "{piece:?} of a token was shown");
            }
        }
    }
}

/// Client secrets, private keys and PKCE verifiers stay out of `Debug` and
/// of trace output while tokens are fetched with signed client assertions
/// and DPoP proofs (a nonce challenge included).
#[cfg(feature = "dpop")]
#[tokio::test]
async fn client_secrets_and_private_keys_never_show() {
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use secrecy::ExposeSecret;
    use tower_auth_refresh::dpop::DpopKey;
    use tower_auth_refresh::oauth2::{
        AuthorizationCode, ClientAuth, Grant, OAuth2Source, Pkce, SigningKey,
    };

    const CLIENT_SECRET: &str = "cl13nt-S3cr3t-Wq8Rt5Yu2Io9";
    const RSA_PEM: &str = include_str!("keys/rsa-2048-test-only.pem");

    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // A token endpoint that asks for a nonce once, then issues DPoP tokens.
    let challenged = Arc::new(Mutex::new(false));
    let app = axum::Router::new().route(
        "/token",
        axum::routing::post(move |headers: HeaderMap| {
            let challenged = challenged.clone();
            async move {
                assert!(headers.contains_key("dpop"));
                let first = !std::mem::replace(&mut *challenged.lock().unwrap(), true);
                if first {
                    return (
                        StatusCode::BAD_REQUEST,
                        [("dpop-nonce", "n-1")],
                        r#"{"error":"use_dpop_nonce"}"#,
                    )
                        .into_response();
                }
                (
                    StatusCode::OK,
                    [("dpop-nonce", "n-1")],
                    format!(
                        r#"{{"access_token":"{ACCESS}","token_type":"DPoP","expires_in":600,"refresh_token":"{REFRESH}"}}"#
                    ),
                )
                    .into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let token_url = format!("http://{addr}/token");

    let signing = SigningKey::from_pkcs8_pem(RSA_PEM).unwrap();
    let dpop = DpopKey::generate().unwrap();
    let auths = [
        ClientAuth::private_key_jwt("svc", signing.clone()),
        ClientAuth::client_secret_jwt("svc", CLIENT_SECRET),
        ClientAuth::basic("svc", CLIENT_SECRET),
        ClientAuth::post("svc", CLIENT_SECRET),
    ];
    let mut debugs = vec![
        format!("{signing:?} {dpop:?} {:?}", dpop.signing_key()),
        format!("{auths:?}"),
    ];
    for auth in auths {
        let builder = OAuth2Source::builder(&token_url, auth)
            .initial_grant(Grant::client_credentials())
            .dpop(dpop.clone());
        debugs.push(format!("{builder:?}"));
        let source = builder.build().unwrap();
        debugs.push(format!("{source:?}"));
        let handle = TokenHandle::new(source);
        let token = handle.refresh_now().await.unwrap();
        assert_eq!(token.token_type(), "DPoP");
        debugs.push(format!("{handle:?} {token:?}"));
    }
    let pkce = Pkce::generate().unwrap();
    let code = AuthorizationCode::new("c0de-Zx7Cv4Bn1Mq3").with_pkce(&pkce);
    debugs.push(format!("{pkce:?} {code:?}"));

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("DPoP nonce"),
        "the nonce challenge is traced:\n{logs}"
    );
    debugs.push(logs);

    // Pieces of the private keys: the PEM body past its common PKCS#8
    // prefix, and the generated DPoP key's PKCS#8 document.
    let pem_body: String = RSA_PEM
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let generated = {
        use base64::Engine;
        let der = dpop.signing_key().export_pkcs8_der();
        [
            base64::engine::general_purpose::STANDARD.encode(der.expose_secret()),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(der.expose_secret()),
        ]
    };
    let mut secrets: Vec<String> = vec![
        CLIENT_SECRET.to_owned(),
        pkce.verifier().expose_secret().to_owned(),
        pem_body[64..].to_owned(),
    ];
    // The generated key's private scalar sits past the PKCS#8 header.
    secrets.extend(generated.iter().map(|b64| b64[48..].to_owned()));
    for text in &debugs {
        assert_no_secret(text, "Debug or trace output");
        for secret in &secrets {
            for window in secret.as_bytes().windows(12) {
                let piece = std::str::from_utf8(window).unwrap();
                assert!(
                    !text.contains(piece),
                    "{piece:?} of a secret was shown:\n{text}"
                );
            }
        }
    }
}
