//! One replica of a fleet sharing a token through a store: the process that
//! the fleet tests start eight of (`tests/fleet.rs`), and an example of
//! wiring a [`FileStore`] or `RedisStore` into a [`TokenHandle`].
//!
//! ```text
//! cargo run --example fleet_worker --all-features -- \
//!     --store redis://127.0.0.1:6379/ --token-url http://127.0.0.1:8080/token \
//!     --upstream-url http://127.0.0.1:8081/work
//! ```
//!
//! The token endpoint takes a JSON body, `{"grant_type":"password"}` or
//! `{"grant_type":"refresh_token","refresh_token":"…"}`, and answers
//! `{"access_token","refresh_token","expires_in_ms","serial"}` or
//! `400 {"error":"invalid_grant"}`. A rejected refresh token falls back to
//! the password grant.
//!
//! The worker sends a GET to the upstream every `--interval-ms` and prints,
//! on stdout: `ready`, `token <serial>` whenever its token changes, and on
//! `stop` (or end of stdin) `done ok=… failed=… refreshes=… adopted=… serial=…`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use secrecy::ExposeSecret;
use tokio::io::AsyncBufReadExt;
use tower::{Layer, ServiceExt};
use tower_auth_refresh::{
    AuthRefreshLayer, BoxError, FileStore, RefreshContext, ReplayBody, Token, TokenHandle,
    token_source_fn,
};

#[derive(Debug, Clone)]
struct Args {
    store: String,
    key: String,
    prefix: String,
    token_url: String,
    upstream_url: String,
    lease: Duration,
    interval: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        store: String::new(),
        key: "fleet".into(),
        prefix: "fleet:".into(),
        token_url: String::new(),
        upstream_url: String::new(),
        lease: Duration::from_secs(2),
        interval: Duration::from_millis(50),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let millis = || {
            value
                .parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|e| format!("{flag}: {e}"))
        };
        match flag.as_str() {
            "--store" => args.store = value.clone(),
            "--key" => args.key = value.clone(),
            "--prefix" => args.prefix = value.clone(),
            "--token-url" => args.token_url = value.clone(),
            "--upstream-url" => args.upstream_url = value.clone(),
            "--lease-ms" => args.lease = millis()?,
            "--interval-ms" => args.interval = millis()?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.store.is_empty() || args.token_url.is_empty() || args.upstream_url.is_empty() {
        return Err("--store, --token-url and --upstream-url are required".into());
    }
    Ok(args)
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// Calls the token endpoint: the refresh grant when there is a refresh
/// token, the password grant otherwise or when the refresh token is refused.
async fn fetch_token(
    http: HttpClient,
    url: String,
    previous: Option<Arc<Token>>,
) -> Result<Token, BoxError> {
    if let Some(refresh) = previous.as_ref().and_then(|t| t.refresh_token()) {
        let body = serde_json::json!({
            "grant_type": "refresh_token",
            "refresh_token": refresh.expose_secret(),
        });
        match grant(&http, &url, body).await? {
            Some(token) => return Ok(token),
            None => eprintln!(
                "worker {}: refresh token refused; logging in",
                std::process::id()
            ),
        }
    }
    grant(&http, &url, serde_json::json!({"grant_type": "password"}))
        .await?
        .ok_or_else(|| "password grant refused".into())
}

async fn grant(
    http: &HttpClient,
    url: &str,
    body: serde_json::Value,
) -> Result<Option<Token>, BoxError> {
    let request = http::Request::post(url)
        .header("content-type", "application/json")
        .header("x-worker-pid", std::process::id().to_string())
        .body(Full::new(Bytes::from(serde_json::to_vec(&body)?)))?;
    let response = http.request(request).await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    if status == http::StatusCode::BAD_REQUEST {
        return Ok(None);
    }
    if !status.is_success() {
        return Err(format!("token endpoint answered {status}").into());
    }
    let answer: serde_json::Value = serde_json::from_slice(&bytes)?;
    let field = |name: &str| {
        answer[name]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("token answer without {name}"))
    };
    let expires_in = answer["expires_in_ms"]
        .as_u64()
        .ok_or("token answer without expires_in_ms")?;
    let serial = answer["serial"]
        .as_u64()
        .ok_or("token answer without serial")?;
    Ok(Some(
        Token::bearer(field("access_token")?)
            .with_refresh_token(field("refresh_token")?)
            .with_expires_in(Duration::from_millis(expires_in))
            .with_metadata("serial", serial.to_string()),
    ))
}

fn serial_of(handle: &TokenHandle) -> String {
    handle
        .token()
        .and_then(|t| t.metadata().get("serial").cloned())
        .unwrap_or_else(|| "-".into())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = parse_args().map_err(|e| format!("fleet_worker: {e}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let http: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    let token_http = http.clone();
    let token_url = args.token_url.clone();
    let source = token_source_fn(move |cx: RefreshContext| {
        fetch_token(token_http.clone(), token_url.clone(), cx.previous)
    });
    let builder = TokenHandle::builder(source).refresh_timeout(Duration::from_millis(1500));
    let builder = if let Some(dir) = args.store.strip_prefix("file:") {
        builder.store(FileStore::new(dir), args.key.clone())
    } else {
        redis_store(builder, &args)?
    };
    let handle = builder
        .store_timing(
            args.lease,
            Duration::from_millis(25),
            Duration::from_secs(1),
        )
        .build();

    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let upstream: Client<_, ReplayBody<Full<Bytes>>> =
        Client::builder(TokioExecutor::new()).build_http();
    let client = AuthRefreshLayer::new(handle.clone()).layer(upstream);
    let requests = {
        let (ok, failed, url, handle) = (
            ok.clone(),
            failed.clone(),
            args.upstream_url.clone(),
            handle.clone(),
        );
        tokio::spawn(async move {
            let mut serial = String::new();
            let mut tick = tokio::time::interval(args.interval);
            loop {
                tick.tick().await;
                let request = http::Request::get(&url)
                    .body(Full::<Bytes>::default())
                    .expect("valid request");
                let sent =
                    tokio::time::timeout(Duration::from_secs(10), client.clone().oneshot(request))
                        .await;
                match sent {
                    Ok(Ok(response)) if response.status().is_success() => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Ok(response)) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!(
                            "worker {}: upstream answered {}",
                            std::process::id(),
                            response.status()
                        );
                    }
                    Ok(Err(err)) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("worker {}: request failed: {err}", std::process::id());
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("worker {}: request timed out", std::process::id());
                    }
                }
                let now = serial_of(&handle);
                if now != serial {
                    println!("token {now}");
                    serial = now;
                }
            }
        })
    };
    println!("ready");

    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = stdin.next_line().await {
        if line.trim() == "stop" {
            break;
        }
    }
    requests.abort();
    let stats = handle.stats();
    println!(
        "done ok={} failed={} refreshes={} adopted={} serial={}",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        stats.refreshes,
        stats.adopted,
        serial_of(&handle),
    );
    Ok(())
}

#[cfg(feature = "redis")]
fn redis_store(
    builder: tower_auth_refresh::TokenHandleBuilder,
    args: &Args,
) -> Result<tower_auth_refresh::TokenHandleBuilder, BoxError> {
    let store = tower_auth_refresh::RedisStore::builder(args.store.clone())
        .prefix(args.prefix.clone())
        .timeouts(Duration::from_millis(500), Duration::from_millis(500))
        .build()?;
    Ok(builder.store(store, args.key.clone()))
}

#[cfg(not(feature = "redis"))]
fn redis_store(
    _builder: tower_auth_refresh::TokenHandleBuilder,
    args: &Args,
) -> Result<tower_auth_refresh::TokenHandleBuilder, BoxError> {
    Err(format!(
        "store {:?}: build with --features redis for a Redis store",
        args.store
    )
    .into())
}
