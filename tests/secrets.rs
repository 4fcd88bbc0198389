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
