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
//! on stdout: `ready`, `token <serial>` whenever its token changes,
//! `fail <unix ms> <kind>` for each failed request (`store_unreachable`,
//! `refresh_failed`, `refresh_timed_out`, `reauthorization_required`,
//! `status_<code>`, `timeout`, `other`), and on `stop` (or end of stdin)
//! `done ok=… failed=… refreshes=… adopted=… serial=…`.
//!
//! Options: `--unreachable initial-grant|fail|local` (what a refresh does
//! when it cannot coordinate, see `UnreachableStore`), `--flush-ms N` (use
//! a `TokenRegistry` with the key as tenant and flush the tenant's usage
//! every N ms, as a service with many tenants does), `--no-refresh-ahead`,
//! `--min-token-age-ms N`, `--backoff-max-ms N`.

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
    AuthRefreshLayer, AuthRoutingLayer, BoxError, FileStore, Origin, ReauthorizationRequired,
    RefreshContext, RefreshFailed, RefreshTimedOut, ReplayBody, StoreUnreachable, Tenant, Token,
    TokenHandle, TokenHandleBuilder, TokenRegistry, TokenStore, UnreachableStore, token_source_fn,
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
    unreachable: UnreachableStore,
    flush: Option<Duration>,
    refresh_ahead: bool,
    min_token_age: Option<Duration>,
    backoff_max: Option<Duration>,
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
        unreachable: UnreachableStore::default(),
        flush: None,
        refresh_ahead: true,
        min_token_age: None,
        backoff_max: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--no-refresh-ahead" {
            args.refresh_ahead = false;
            continue;
        }
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
            "--flush-ms" => args.flush = Some(millis()?),
            "--min-token-age-ms" => args.min_token_age = Some(millis()?),
            "--backoff-max-ms" => args.backoff_max = Some(millis()?),
            "--unreachable" => {
                args.unreachable = match value.as_str() {
                    "initial-grant" => UnreachableStore::InitialGrantOnly,
                    "fail" => UnreachableStore::Fail,
                    "local" => UnreachableStore::RefreshLocally,
                    other => return Err(format!("--unreachable {other}?")),
                }
            }
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
    let store: Arc<dyn TokenStore> = if let Some(dir) = args.store.strip_prefix("file:") {
        Arc::new(FileStore::new(dir))
    } else {
        redis_store(&args)?
    };
    let settings = {
        let args = args.clone();
        move |builder: TokenHandleBuilder| {
            let mut builder = builder
                .refresh_timeout(Duration::from_millis(1500))
                .store_timing(
                    args.lease,
                    Duration::from_millis(25),
                    Duration::from_secs(1),
                )
                .when_store_unreachable(args.unreachable);
            if !args.refresh_ahead {
                builder = builder
                    .no_refresh_ahead()
                    .min_validity(Duration::from_millis(200));
            }
            if let Some(age) = args.min_token_age {
                builder = builder.min_token_age(age);
            }
            if let Some(max) = args.backoff_max {
                builder = builder.backoff(Duration::from_millis(200).min(max), max);
            }
            builder
        }
    };

    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let upstream: Client<_, ReplayBody<Full<Bytes>>> =
        Client::builder(TokioExecutor::new()).build_http();
    // One handle, or a registry whose tenant is the key (with usage flushes).
    let (client, handle, registry) = match args.flush {
        None => {
            let handle =
                settings(TokenHandle::builder(source).store(store, args.key.clone())).build();
            let client = tower::util::BoxCloneSyncService::new(
                AuthRefreshLayer::new(handle.clone()).layer(upstream),
            );
            (client, handle, None)
        }
        Some(_) => {
            let registry = TokenRegistry::builder(store, move |_: &str| source.clone())
                .configure(settings)
                .build();
            let origin = Origin::parse(&args.upstream_url)?;
            let client = tower::util::BoxCloneSyncService::new(
                AuthRoutingLayer::new()
                    .tenants(origin, registry.clone())
                    .layer(upstream),
            );
            (client, registry.get(&args.key), Some(registry))
        }
    };
    let flushes = match (&registry, args.flush) {
        (Some(registry), Some(every)) => {
            let registry = registry.clone();
            Some(tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    let report = registry.flush_usage().await;
                    for (tenant, error) in report.failed {
                        eprintln!(
                            "worker {}: usage flush of {tenant}: {error}",
                            std::process::id()
                        );
                    }
                }
            }))
        }
        _ => None,
    };
    let requests = {
        let (ok, failed, url, handle, key) = (
            ok.clone(),
            failed.clone(),
            args.upstream_url.clone(),
            handle.clone(),
            args.key.clone(),
        );
        tokio::spawn(async move {
            let mut serial = String::new();
            let mut tick = tokio::time::interval(args.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let mut request = http::Request::get(&url)
                    .body(Full::<Bytes>::default())
                    .expect("valid request");
                request.extensions_mut().insert(Tenant::new(&key));
                let sent =
                    tokio::time::timeout(Duration::from_secs(10), client.clone().oneshot(request))
                        .await;
                let kind = match sent {
                    Ok(Ok(response)) if response.status().is_success() => None,
                    Ok(Ok(response)) => Some(format!("status_{}", response.status().as_u16())),
                    Ok(Err(err)) => {
                        eprintln!("worker {}: request failed: {err}", std::process::id());
                        Some(kind_of(&err).to_owned())
                    }
                    Err(_) => Some("timeout".to_owned()),
                };
                match kind {
                    None => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(kind) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        println!("fail {} {kind}", unix_millis());
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
    if let Some(flushes) = flushes {
        flushes.abort();
    }
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

/// The documented error a failed request carries, by name.
fn kind_of(err: &BoxError) -> &'static str {
    if err.downcast_ref::<StoreUnreachable>().is_some() {
        "store_unreachable"
    } else if err.downcast_ref::<RefreshFailed>().is_some() {
        "refresh_failed"
    } else if err.downcast_ref::<RefreshTimedOut>().is_some() {
        "refresh_timed_out"
    } else if err.downcast_ref::<ReauthorizationRequired>().is_some() {
        "reauthorization_required"
    } else {
        "other"
    }
}

fn unix_millis() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

#[cfg(feature = "redis")]
fn redis_store(args: &Args) -> Result<Arc<dyn TokenStore>, BoxError> {
    let store = tower_auth_refresh::RedisStore::builder(args.store.clone())
        .prefix(args.prefix.clone())
        .timeouts(Duration::from_millis(500), Duration::from_millis(500))
        .build()?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "redis"))]
fn redis_store(args: &Args) -> Result<Arc<dyn TokenStore>, BoxError> {
    Err(format!(
        "store {:?}: build with --features redis for a Redis store",
        args.store
    )
    .into())
}
