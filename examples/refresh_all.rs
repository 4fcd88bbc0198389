//! A scheduled job over many stored tokens (one per tenant): refresh every
//! token in use, delete the ones the server rejects for good, clean up idle
//! tenants, and print a report.
//!
//! ```text
//! cargo run --example refresh_all -- --demo                 # seeded store + embedded token endpoint, one run
//! cargo run --example refresh_all -- --dir tokens/ --token-url http://127.0.0.1:9000/token \
//!     --client-id ID [--client-secret SECRET] --max-age-days 30 --remove-idle-days 30 \
//!     --concurrency 16 [--delete-dead] [--dry-run] [--every 3600]
//! cargo run --example refresh_all --features redis -- --redis redis://127.0.0.1/ --token-url …
//! ```
//!
//! Each tenant's token is refreshed with the RFC 6749 refresh-token grant
//! against `--token-url`, by an [`OAuth2Source`]: the form is encoded
//! properly, and a server that sends no new refresh token keeps the old one
//! (RFC 6749 §6). Only an `invalid_grant` answer makes a refresh token dead;
//! with `--delete-dead` its tenant is then deleted from the store, otherwise
//! it is reported. The exit code is 1 when any refresh failed for another
//! reason (the endpoint was down, say), so a scheduler can alert on it.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Form;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use indicatif::{ProgressBar, ProgressStyle};
use tower_auth_refresh::oauth2::{ClientAuth, OAuth2Source};
use tower_auth_refresh::{
    BoxError, FileStore, LAST_USED_METADATA_KEY, MaintenanceReport, RefreshAll, Token,
    TokenRegistry, TokenStore,
};

const DAY: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug)]
struct Args {
    dir: Option<String>,
    redis: Option<String>,
    token_url: Option<String>,
    client_id: String,
    client_secret: Option<String>,
    delete_dead: bool,
    max_age: Option<Duration>,
    remove_idle: Option<Duration>,
    concurrency: usize,
    dry_run: bool,
    every: Option<Duration>,
    demo: bool,
}

const USAGE: &str = "usage: refresh_all (--demo | --dir DIR | --redis URL) [--token-url URL] \
[--client-id ID] [--client-secret SECRET] [--max-age-days N] [--remove-idle-days N] \
[--concurrency N] [--delete-dead] [--dry-run] [--every SECONDS]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        dir: None,
        redis: None,
        token_url: None,
        client_id: "refresh-all".to_owned(),
        client_secret: None,
        delete_dead: false,
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
            "--client-id" => args.client_id = value()?,
            "--client-secret" => args.client_secret = Some(value()?),
            "--delete-dead" => args.delete_dead = true,
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
        args.delete_dead = true;
        _demo_dir = Some(TempDir(dir));
        demo_endpoint = Some(endpoint);
    }
    let token_url = args
        .token_url
        .clone()
        .ok_or("--token-url is needed to refresh tokens")?;
    let store = open_store(&args)?;
    // One token-endpoint client for every tenant: the refresh-token grant
    // only (no initial grant), so a tenant without a usable refresh token
    // needs a person, and only `invalid_grant` counts as dead.
    let auth = match &args.client_secret {
        Some(secret) => ClientAuth::basic(args.client_id.clone(), secret.clone()),
        None => ClientAuth::none(args.client_id.clone()),
    };
    let source = OAuth2Source::builder(token_url, auth).build()?;
    let registry = TokenRegistry::builder(store, move |_tenant: &str| source.clone()).build();

    let mut all_ok = true;
    loop {
        let report = run_once(&registry, &args).await?;
        if args.demo {
            check_demo(&registry, &report).await?;
        }
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

/// The demo's promise: only the tenants whose refresh token the server
/// refused are removed by the refresh, and every tenant kept still has a
/// refresh token (also after answers that did not rotate it).
async fn check_demo(registry: &TokenRegistry, report: &MaintenanceReport) -> Result<(), BoxError> {
    if let Some((tenant, _)) = report.removed.iter().find(|(tenant, _)| {
        let i: u32 = tenant.trim_start_matches("seller-").parse().unwrap_or(0);
        i % 25 != 24
    }) {
        return Err(format!("demo: live tenant {tenant} was removed").into());
    }
    let mut kept = 0;
    for tenant in registry.stored_tenants().await? {
        let key = registry.store_key(&tenant);
        let Some(stored) = registry.store().load(&key).await? else {
            continue;
        };
        if stored.token.refresh_token().is_none() {
            return Err(format!("demo: {tenant} lost its refresh token").into());
        }
        kept += 1;
    }
    println!("demo: {kept} tenants kept, each with its refresh token");
    Ok(())
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
        .delete_dead(args.delete_dead)
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

/// The embedded token endpoint of `--demo`: refresh tokens ending in
/// `-dead` are refused with `invalid_grant`; every third answer carries no
/// new refresh token (the server does not rotate it); seeded refresh tokens
/// contain a `+`, which only arrives intact when the form is encoded.
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
    if !grant.refresh_token.starts_with("refresh-") || !grant.refresh_token.contains('+') {
        // Not a refresh token this endpoint issued (a `+` became a space).
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": "invalid_request" })),
        )
            .into_response();
    }
    if grant.refresh_token.ends_with("-dead") {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": "invalid_grant" })),
        )
            .into_response();
    }
    let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
    let mut answer = serde_json::json!({
        "access_token": format!("access-{n:04}-{:012x}", fastrand::u64(..1 << 48)),
        "token_type": "Bearer",
        "expires_in": 3600,
    });
    if n % 3 != 0 {
        answer["refresh_token"] =
            format!("refresh-{n:04}+{:012x}", fastrand::u64(..1 << 48)).into();
    }
    Json(answer).into_response()
}

/// 200 tenants: most used lately and expiring soon, some with dead refresh
/// tokens, some unused for 90 days.
async fn seed_demo_store(store: &FileStore) -> Result<(), BoxError> {
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    for i in 0..200u32 {
        let used_days_ago = if i % 20 == 19 { 90 } else { u64::from(i % 7) };
        let refresh = if i % 25 == 24 {
            format!("refresh-seed+{i}-dead")
        } else {
            format!("refresh-seed+{i}")
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
