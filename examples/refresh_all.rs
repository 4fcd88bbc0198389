//! A scheduled job over many stored tokens (one per tenant): refresh every
//! token in use, delete the ones the server rejects for good, clean up idle
//! tenants, and print a report.
//!
//! ```text
//! cargo run --example refresh_all -- --demo                 # seeded store + embedded token endpoint, one run
//! cargo run --example refresh_all -- --dir tokens/ --token-url http://127.0.0.1:9000/token \
//!     --max-age-days 30 --remove-idle-days 30 --concurrency 16 [--dry-run] [--every 3600]
//! cargo run --example refresh_all --features redis -- --redis redis://127.0.0.1/ --token-url …
//! ```
//!
//! Each tenant's token is refreshed with the RFC 6749 refresh-token grant
//! against `--token-url`. A refresh token the server answers with
//! `invalid_grant` is dead: its tenant is deleted from the store. The exit
//! code is 1 when any refresh failed for another reason (the endpoint was
//! down, say), so a scheduler can alert on it.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Form;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use indicatif::{ProgressBar, ProgressStyle};
use secrecy::ExposeSecret;
use tower_auth_refresh::{
    BoxError, FileStore, LAST_USED_METADATA_KEY, MaintenanceReport, ReauthorizationRequired,
    RefreshAll, RefreshContext, Token, TokenRegistry, TokenStore, token_source_fn,
};

const DAY: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug)]
struct Args {
    dir: Option<String>,
    redis: Option<String>,
    token_url: Option<String>,
    max_age: Option<Duration>,
    remove_idle: Option<Duration>,
    concurrency: usize,
    dry_run: bool,
    every: Option<Duration>,
    demo: bool,
}

const USAGE: &str = "usage: refresh_all (--demo | --dir DIR | --redis URL) [--token-url URL] \
[--max-age-days N] [--remove-idle-days N] [--concurrency N] [--dry-run] [--every SECONDS]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        dir: None,
        redis: None,
        token_url: None,
        max_age: None,
        remove_idle: None,
        concurrency: 8,
        dry_run: false,
        every: None,
        demo: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| v.parse::<u64>().map_err(|_| format!("not a number: {v}"));
        match flag.as_str() {
            "--demo" => args.demo = true,
            "--dir" => args.dir = Some(value()?),
            "--redis" => args.redis = Some(value()?),
            "--token-url" => args.token_url = Some(value()?),
            "--max-age-days" => args.max_age = Some(DAY * number(value()?)? as u32),
            "--remove-idle-days" => args.remove_idle = Some(DAY * number(value()?)? as u32),
            "--concurrency" => args.concurrency = number(value()?)?.max(1) as usize,
            "--dry-run" => args.dry_run = true,
            "--every" => args.every = Some(Duration::from_secs(number(value()?)?)),
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if !args.demo && args.dir.is_none() && args.redis.is_none() {
        return Err(USAGE.to_owned());
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("refresh_all: {err}");
            ExitCode::from(2)
        }
    }
}

/// Runs the job (once, or every `--every`); `Ok(false)` when a refresh failed.
async fn run(mut args: Args) -> Result<bool, BoxError> {
    let mut _demo_dir = None;
    let mut demo_endpoint = None;
    if args.demo {
        let endpoint = DemoEndpoint::start().await?;
        let dir = std::env::temp_dir().join(format!("refresh-all-demo-{}", std::process::id()));
        seed_demo_store(&FileStore::new(&dir)).await?;
        println!("demo: 200 tenants seeded in {}", dir.display());
        args.token_url = Some(endpoint.url.clone());
        args.dir = Some(dir.display().to_string());
        args.max_age.get_or_insert(30 * DAY);
        args.remove_idle.get_or_insert(60 * DAY);
        _demo_dir = Some(TempDir(dir));
        demo_endpoint = Some(endpoint);
    }
    let token_url = args
        .token_url
        .clone()
        .ok_or("--token-url is needed to refresh tokens")?;
    let store = open_store(&args)?;
    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let registry = TokenRegistry::builder(store, move |_tenant: &str| {
        refresh_grant(http.clone(), token_url.clone())
    })
    .build();

    let mut all_ok = true;
    loop {
        let report = run_once(&registry, &args).await?;
        all_ok &= !report.has_failures();
        let Some(every) = args.every else {
            break;
        };
        println!("next run in {every:?}");
        tokio::time::sleep(every).await;
    }
    if let Some(endpoint) = demo_endpoint {
        let issued = endpoint.issued.load(Ordering::SeqCst);
        println!("demo: the token endpoint issued {issued} tokens");
    }
    Ok(all_ok)
}

fn open_store(args: &Args) -> Result<Arc<dyn TokenStore>, BoxError> {
    if let Some(dir) = &args.dir {
        return Ok(Arc::new(FileStore::new(dir)));
    }
    #[cfg(feature = "redis")]
    if let Some(url) = &args.redis {
        return Ok(Arc::new(tower_auth_refresh::RedisStore::new(url)?));
    }
    Err("--redis needs the `redis` feature (cargo run --features redis …)".into())
}

/// One pass: refresh what is in use, then remove what is idle.
async fn run_once(registry: &TokenRegistry, args: &Args) -> Result<MaintenanceReport, BoxError> {
    let total = registry.stored_tenants().await?.len() as u64;
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let progress = bar.clone();
    let mut job = RefreshAll::new()
        .concurrency(args.concurrency)
        .dry_run(args.dry_run)
        .on_progress(move |update| {
            progress.set_position(update.done as u64);
            progress.set_message(update.tenant.clone());
        });
    if let Some(age) = args.max_age {
        job = job.used_within(age);
    }
    let report = registry.refresh_all(job).await?;
    bar.finish_and_clear();
    println!(
        "refresh_all{}:",
        if args.dry_run { " (dry run)" } else { "" }
    );
    println!("{report}");
    if let Some(idle) = args.remove_idle {
        let removed = registry.remove_idle(idle, args.dry_run).await?;
        println!(
            "remove_idle (unused for {} days):",
            idle.as_secs() / DAY.as_secs()
        );
        println!("{removed}");
    }
    Ok(report)
}

/// The RFC 6749 refresh-token grant, as a token source.
fn refresh_grant(
    http: Client<HttpConnector, Full<Bytes>>,
    url: String,
) -> impl tower_auth_refresh::TokenSource {
    token_source_fn(move |cx: RefreshContext| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let refresh_token = cx
                .previous
                .as_ref()
                .and_then(|t| t.refresh_token())
                .map(|t| t.expose_secret().to_owned())
                .ok_or_else(|| ReauthorizationRequired::new("no refresh token stored"))?;
            let form = format!("grant_type=refresh_token&refresh_token={refresh_token}");
            let request = http::Request::post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Full::new(Bytes::from(form)))?;
            let response = http.request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body)?;
            if json["error"] == "invalid_grant" {
                return Err(ReauthorizationRequired::new("refresh token rejected").into());
            }
            if !status.is_success() {
                return Err(format!("token endpoint answered {status}").into());
            }
            let access = json["access_token"].as_str().ok_or("no access_token")?;
            let mut token = Token::bearer(access).with_expires_in(Duration::from_secs(
                json["expires_in"].as_u64().unwrap_or(3600),
            ));
            if let Some(refresh) = json["refresh_token"].as_str() {
                token = token.with_refresh_token(refresh);
            }
            Ok::<_, BoxError>(token)
        }
    })
}

/// The embedded token endpoint of `--demo`: refresh tokens ending in
/// `-dead` are refused with `invalid_grant`.
struct DemoEndpoint {
    url: String,
    issued: Arc<AtomicUsize>,
}

#[derive(serde::Deserialize)]
struct Grant {
    refresh_token: String,
}

impl DemoEndpoint {
    async fn start() -> Result<Self, BoxError> {
        let issued = Arc::new(AtomicUsize::new(0));
        let app = axum::Router::new()
            .route("/token", axum::routing::post(demo_token))
            .with_state(issued.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = listener.local_addr()?;
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self {
            url: format!("http://{addr}/token"),
            issued,
        })
    }
}

async fn demo_token(State(issued): State<Arc<AtomicUsize>>, Form(grant): Form<Grant>) -> Response {
    if grant.refresh_token.ends_with("-dead") {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": "invalid_grant" })),
        )
            .into_response();
    }
    let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
    Json(serde_json::json!({
        "access_token": format!("access-{n:04}-{:012x}", fastrand::u64(..1 << 48)),
        "token_type": "Bearer",
        "expires_in": 3600,
        "refresh_token": format!("refresh-{n:04}-{:012x}", fastrand::u64(..1 << 48)),
    }))
    .into_response()
}

/// 200 tenants: most used lately and expiring soon, some with dead refresh
/// tokens, some unused for 90 days.
async fn seed_demo_store(store: &FileStore) -> Result<(), BoxError> {
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    for i in 0..200u32 {
        let used_days_ago = if i % 20 == 19 { 90 } else { u64::from(i % 7) };
        let refresh = if i % 25 == 24 {
            format!("refresh-seed-{i}-dead")
        } else {
            format!("refresh-seed-{i}")
        };
        let token = Token::bearer(format!("access-seed-{i}"))
            .with_refresh_token(refresh)
            .with_expires_in(Duration::from_secs(60))
            .with_metadata(
                LAST_USED_METADATA_KEY,
                (now_ms - used_days_ago * DAY.as_millis() as u64).to_string(),
            );
        store.save(&format!("seller-{i:03}"), &token, None).await?;
    }
    Ok(())
}

/// Removes the demo's directory when the run ends.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
