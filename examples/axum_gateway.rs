//! An axum gateway in front of two upstream APIs, each with its own token:
//! `/a/*` is forwarded to upstream A (which says "expired" with a 401) and
//! `/b/*` to upstream B (which says it with `HTTP 200 {"code":40003}`), through
//! one hyper-util client behind an `AuthRoutingLayer` that picks the token
//! by the upstream's origin. `GET /auth/status` shows each upstream's token
//! status as JSON (never a token).
//!
//! ```text
//! cargo run --example axum_gateway -- --self-test   # runs its scenario, exits 0 or 1
//! cargo run --example axum_gateway                  # serves on 127.0.0.1:3000 until Ctrl-C
//! cargo run --example axum_gateway -- --listen 127.0.0.1:8080
//! ```
//!
//! The upstreams and the token endpoint run in-process on 127.0.0.1. Tokens
//! live 1 s in the self-test (30 s when serving) and the token endpoint does
//! not say so: the gateway learns it from the upstreams' answers, refreshes
//! once per upstream and replays the requests. The self-test sends requests
//! through the gateway before and after the tokens expire (20 at once), and
//! checks the tokens used, the refresh counts and `/auth/status`.

mod support;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{any, get};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::{Layer, ServiceExt};
use tower_auth_refresh::{
    AuthRefreshLayer, AuthRouting, AuthRoutingLayer, BoxError, ExpiryDetectorExt, JsonBodyRule,
    Origin, RefreshContext, ReplayBody, TokenHandle, Unauthorized, token_source_fn,
};

use support::{Authority, Rejects};

/// The gateway's outgoing client: a token per upstream origin.
type UpstreamClient = AuthRouting<Client<HttpConnector, ReplayBody<Body>>>;

/// One upstream behind the gateway.
#[derive(Clone)]
struct Upstream {
    name: &'static str,
    origin: Origin,
    handle: TokenHandle,
}

#[derive(Clone)]
struct Gateway {
    client: UpstreamClient,
    a: Upstream,
    b: Upstream,
}

/// A token source that POSTs to the in-process token endpoint.
fn token_handle(token_endpoint: SocketAddr, audience: &'static str) -> TokenHandle {
    let plain = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let url = format!("http://{token_endpoint}/token/{audience}");
    TokenHandle::builder(token_source_fn(move |_cx: RefreshContext| {
        let (plain, url) = (plain.clone(), url.clone());
        async move {
            let request = http::Request::post(url).body(Full::default())?;
            let body = plain.request(request).await?.into_body().collect().await?;
            support::parse_token(&body.to_bytes())
        }
    }))
    // Tokens here live seconds, not hours: a rejection of a token older than
    // 100 ms counts as an expiry.
    .min_token_age(Duration::from_millis(100))
    .build()
}

impl Gateway {
    fn new(a: Upstream, b: Upstream) -> Self {
        let routing = AuthRoutingLayer::new()
            .origin(a.origin.clone(), AuthRefreshLayer::new(a.handle.clone()))
            .origin(
                b.origin.clone(),
                AuthRefreshLayer::new(b.handle.clone())
                    .detector(Unauthorized::new().or(JsonBodyRule::default_rules())),
            );
        let client = routing.layer(Client::builder(TokioExecutor::new()).build_http());
        Self { client, a, b }
    }

    fn router(self) -> Router {
        Router::new()
            .route(
                "/a/{*rest}",
                any(|State(gw): State<Self>, request: Request| async move {
                    let upstream = gw.a.clone();
                    gw.forward(&upstream, "/a", request).await
                }),
            )
            .route(
                "/b/{*rest}",
                any(|State(gw): State<Self>, request: Request| async move {
                    let upstream = gw.b.clone();
                    gw.forward(&upstream, "/b", request).await
                }),
            )
            .route("/auth/status", get(status))
            .with_state(self)
    }

    /// Sends `request` on to `upstream`, without the caller's credentials:
    /// the upstream gets the gateway's token for it, nothing else.
    async fn forward(self, upstream: &Upstream, prefix: &str, request: Request) -> Response {
        let (mut parts, body) = request.into_parts();
        let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let rest = path_and_query
            .strip_prefix(prefix)
            .unwrap_or(path_and_query);
        let origin = &upstream.origin;
        let uri = format!("http://{}:{}{rest}", origin.host(), origin.port());
        parts.uri = match uri.parse::<Uri>() {
            Ok(uri) => uri,
            Err(_) => return (StatusCode::BAD_REQUEST, "bad path").into_response(),
        };
        for name in [header::AUTHORIZATION, header::COOKIE, header::HOST] {
            parts.headers.remove(name);
        }
        match self.client.oneshot(Request::from_parts(parts, body)).await {
            Ok(response) => response.map(Body::new),
            Err(err) => {
                (StatusCode::BAD_GATEWAY, format!("{}: {err}", upstream.name)).into_response()
            }
        }
    }
}

/// `GET /auth/status`: each upstream's token status and counters.
async fn status(State(gw): State<Gateway>) -> Json<serde_json::Value> {
    let entry = |upstream: &Upstream| {
        serde_json::json!({
            "origin": upstream.origin.to_string(),
            "status": upstream.handle.status(),
            "stats": upstream.handle.stats(),
        })
    };
    Json(serde_json::json!({ "a": entry(&gw.a), "b": entry(&gw.b) }))
}

/// Starts the token endpoint, both upstreams and the gateway.
async fn start(
    listen: SocketAddr,
    lifetime: Duration,
) -> Result<(SocketAddr, Gateway, std::sync::Arc<Authority>), BoxError> {
    let authority = Authority::new(lifetime, false);
    let token_endpoint = support::token_endpoint(authority.clone()).await?;
    let a_addr = support::upstream("a", authority.clone(), Rejects::Unauthorized).await?;
    let b_addr = support::upstream("b", authority.clone(), Rejects::BusinessCode).await?;
    let upstream = |name: &'static str, addr: SocketAddr| -> Result<Upstream, BoxError> {
        Ok(Upstream {
            name,
            origin: Origin::parse(&format!("http://{addr}"))?,
            handle: token_handle(token_endpoint, name),
        })
    };
    let gateway = Gateway::new(upstream("a", a_addr)?, upstream("b", b_addr)?);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = gateway.clone().router();
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            eprintln!("gateway stopped: {err}");
        }
    });
    Ok((addr, gateway, authority))
}

const USAGE: &str = "\
usage: axum_gateway [--self-test | --listen ADDR]

  (no flag)      serve on 127.0.0.1:3000 until Ctrl-C (tokens live 30 s)
  --listen ADDR  serve on ADDR instead
  --self-test    run the scenario against in-process servers; exit 0 or 1
  -h, --help     print this help
";

/// What the command line asks for.
#[derive(Debug, PartialEq)]
enum Mode {
    Help,
    SelfTest,
    Serve(SocketAddr),
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Mode, String> {
    let mut mode = Mode::Serve(SocketAddr::from(([127, 0, 0, 1], 3000)));
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(Mode::Help),
            "--self-test" => mode = Mode::SelfTest,
            "--listen" => {
                let addr = args.next().ok_or("--listen needs an address")?;
                let addr = addr.parse().map_err(|e| format!("--listen {addr}: {e}"))?;
                mode = Mode::Serve(addr);
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(mode)
}

#[tokio::main]
async fn main() -> ExitCode {
    let result = match parse_args(std::env::args().skip(1)) {
        Ok(Mode::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprint!("axum_gateway: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
        Ok(Mode::SelfTest) => self_test().await,
        Ok(Mode::Serve(listen)) => serve(listen).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("axum_gateway: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Serves until Ctrl-C.
async fn serve(listen: SocketAddr) -> Result<(), BoxError> {
    let (addr, _gateway, _authority) = start(listen, Duration::from_secs(30)).await?;
    println!("gateway on http://{addr} (tokens live 30 s)");
    println!("  curl http://{addr}/a/orders");
    println!("  curl http://{addr}/b/items");
    println!("  curl http://{addr}/auth/status");
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// The scenario run by `--self-test`.
async fn self_test() -> Result<(), BoxError> {
    let (addr, gateway, authority) = start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        Duration::from_secs(1),
    )
    .await?;
    let caller = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();

    let call = |path: &str| {
        let caller = caller.clone();
        let request = http::Request::get(format!("http://{addr}{path}"))
            // The caller's own credential must not reach an upstream.
            .header(header::AUTHORIZATION, "Bearer caller-credential")
            .body(Full::default());
        async move {
            let response = caller.request(request?).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>((status, body))
        }
    };
    let expect = |path: &str, (status, body): (StatusCode, Bytes), upstream: &str, serial: u64| {
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        if serial == 1 {
            println!("GET {path:<15} -> {status} {answer}");
        }
        let ok = status == StatusCode::OK
            && answer["upstream"] == upstream
            && answer["token_serial"] == serial;
        if ok {
            Ok(())
        } else {
            Err(BoxError::from(format!(
                "{path}: expected upstream {upstream} with its token #{serial}"
            )))
        }
    };

    expect("/a/orders", call("/a/orders").await?, "a", 1)?;
    expect("/b/items?page=2", call("/b/items?page=2").await?, "b", 1)?;

    println!("-- both tokens expire (the upstreams decide; the gateway was not told when)");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut calls = Vec::new();
    for i in 0..20 {
        let path = if i % 2 == 0 { "/a/orders" } else { "/b/items" };
        calls.push(tokio::spawn(call(path)));
    }
    for (i, task) in calls.into_iter().enumerate() {
        let (path, upstream) = if i % 2 == 0 {
            ("/a/orders", "a")
        } else {
            ("/b/items", "b")
        };
        expect(path, task.await??, upstream, 2)?;
    }
    println!("20 requests at once  -> 20 x 200 OK, each upstream's token #2");

    let (status, body) = call("/auth/status").await?;
    let report: serde_json::Value = serde_json::from_slice(&body)?;
    println!(
        "GET /auth/status -> {status}\n{}",
        serde_json::to_string_pretty(&report)?
    );
    for name in ["a", "b"] {
        let entry = &report[name];
        if entry["status"]["generation"] != 2 || entry["status"]["valid"] != true {
            return Err(format!("{name}: expected a valid second token").into());
        }
        if entry["stats"]["refreshes"] != 2 {
            return Err(format!("{name}: expected exactly one refresh after the expiry").into());
        }
    }
    if authority.leaked_into(&String::from_utf8_lossy(&body)) {
        return Err("/auth/status shows a token".into());
    }
    let stats = (gateway.a.handle.stats(), gateway.b.handle.stats());
    println!(
        "self-test passed: a refreshes {} retries {}, b refreshes {} retries {}",
        stats.0.refreshes, stats.0.retries, stats.1.refreshes, stats.1.retries
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Mode, String> {
        parse_args(args.iter().map(|a| a.to_string()))
    }

    #[test]
    fn help_is_asked_for_with_either_flag() {
        assert_eq!(parse(&["--help"]), Ok(Mode::Help));
        assert_eq!(parse(&["--self-test", "-h"]), Ok(Mode::Help));
    }

    #[test]
    fn unknown_flags_and_bad_addresses_are_errors() {
        assert_eq!(
            parse(&["--port", "80"]),
            Err("unknown argument `--port`".to_owned())
        );
        assert!(parse(&["--listen"]).is_err());
        assert!(parse(&["--listen", "not-an-address"]).is_err());
    }

    #[test]
    fn serves_on_the_default_or_given_address() {
        assert_eq!(parse(&[]), Ok(Mode::Serve(([127, 0, 0, 1], 3000).into())));
        assert_eq!(
            parse(&["--listen", "127.0.0.1:8080"]),
            Ok(Mode::Serve(([127, 0, 0, 1], 8080).into()))
        );
        assert_eq!(parse(&["--self-test"]), Ok(Mode::SelfTest));
    }
}
