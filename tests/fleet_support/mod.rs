//! Harness of the fleet tests: a `redis-server` of the test's own, a token
//! server that rotates refresh tokens and counts, an upstream that checks
//! tokens, and worker processes (`examples/fleet_worker.rs`).
//!
//! The worker binary is built by `cargo build --example fleet_worker
//! --all-features` from inside the test (a no-op after `cargo test
//! --all-features`, which builds the examples first), and found through
//! cargo's JSON messages, so it is always the current code whatever the
//! target directory.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

mod strict;
#[allow(unused_imports)]
pub use strict::{StrictCounts, StrictServer, unix_ms};

/// Polls `done` every 20 ms for at most `limit`; panics with `what` after.
pub fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The async form of [`wait_until`], for tests whose servers run on the
/// test's own runtime.
pub async fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fresh directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "tower-auth-refresh-{name}-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------- redis

/// A `redis-server` of the test's own on a free port, without persistence;
/// killed on drop.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one on a free port. Panics when `redis-server` is missing.
    pub fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut server = Self { port, child: None };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (its data is gone: there is no persistence).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a new server on the same port and waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        let spawned = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!(
                    "redis-server not found: run the tests with `cargo xtask test`, which installs it, \
                     or `apt-get install redis-server`"
                )
            }
            Err(e) => panic!("could not start redis-server: {e}"),
        };
        self.child = Some(child);
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        wait_until(
            Duration::from_secs(15),
            "redis-server to answer PING",
            || ping(addr),
        );
    }
}

fn ping(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut answer = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut answer).is_ok()
        && &answer == b"+PONG\r\n"
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------- token server

/// What the token server saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    /// Password grants answered.
    pub logins: u64,
    /// Refresh grants answered with a new token.
    pub refreshes: u64,
    /// Refresh tokens presented again after they had been used.
    pub reused: u64,
    /// Refresh tokens never issued.
    pub unknown: u64,
    /// Requests to the upstream with a valid token / without one.
    pub accepted: u64,
    pub rejected: u64,
    /// Held refreshes abandoned by their client before being answered.
    pub held_abandoned: u64,
}

#[derive(Default)]
struct Ledger {
    serial: u64,
    /// access token → (serial, expiry)
    access: HashMap<String, (u64, Instant)>,
    /// refresh token → used?
    refresh: HashMap<String, bool>,
    counts: Counts,
    /// Hold the next refresh grant this long before answering it.
    hold_next: Option<Duration>,
    /// The pid of the worker whose refresh is being held.
    held_by: Option<u32>,
    latest_refresh_token: Option<String>,
}

/// A token endpoint (`POST /token`) and an upstream (`GET /work`) on one
/// real HTTP server: tokens `at-N` / `rt-N` live `lifetime`; each refresh
/// token works once (rotation); the upstream accepts an access token until
/// its expiry.
#[derive(Clone)]
pub struct TokenServer {
    pub addr: SocketAddr,
    ledger: Arc<Mutex<Ledger>>,
    lifetime: Duration,
}

impl TokenServer {
    pub async fn start(lifetime: Duration) -> Self {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Self {
            addr,
            ledger,
            lifetime,
        };
        let app = Router::new()
            .route("/token", post(token))
            .route("/work", get(work))
            .with_state(server.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        server
    }

    pub fn token_url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn upstream_url(&self) -> String {
        format!("http://{}/work", self.addr)
    }

    pub fn counts(&self) -> Counts {
        self.ledger.lock().unwrap().counts.clone()
    }

    /// The serial of the newest token issued.
    pub fn serial(&self) -> u64 {
        self.ledger.lock().unwrap().serial
    }

    /// The refresh token of the newest token issued, and whether it is unused.
    pub fn latest_refresh_token(&self) -> Option<(String, bool)> {
        let ledger = self.ledger.lock().unwrap();
        let latest = ledger.latest_refresh_token.clone()?;
        let used = ledger.refresh.get(&latest).copied().unwrap_or(true);
        Some((latest, !used))
    }

    /// Holds the next refresh grant for `hold` before answering it.
    pub fn hold_next_refresh(&self, hold: Duration) {
        self.ledger.lock().unwrap().hold_next = Some(hold);
    }

    /// The pid of the worker whose refresh is being held, once it arrived.
    pub fn held_by(&self) -> Option<u32> {
        self.ledger.lock().unwrap().held_by
    }

    fn issue(&self, ledger: &mut Ledger) -> serde_json::Value {
        ledger.serial += 1;
        let n = ledger.serial;
        let (access, refresh) = (format!("at-{n}"), format!("rt-{n}"));
        ledger
            .access
            .insert(access.clone(), (n, Instant::now() + self.lifetime));
        ledger.refresh.insert(refresh.clone(), false);
        ledger.latest_refresh_token = Some(refresh.clone());
        serde_json::json!({
            "access_token": access,
            "refresh_token": refresh,
            "expires_in_ms": u64::try_from(self.lifetime.as_millis()).unwrap(),
            "serial": n,
        })
    }
}

/// Counts a held refresh as abandoned unless it was answered.
struct HeldGuard {
    ledger: Arc<Mutex<Ledger>>,
    answered: bool,
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        if !self.answered {
            self.ledger.lock().unwrap().counts.held_abandoned += 1;
        }
    }
}

async fn token(
    State(server): State<TokenServer>,
    headers: HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> Response {
    let pid = headers
        .get("x-worker-pid")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    match body["grant_type"].as_str() {
        Some("password") => {
            let mut ledger = server.ledger.lock().unwrap();
            ledger.counts.logins += 1;
            Json(server.issue(&mut ledger)).into_response()
        }
        Some("refresh_token") => {
            let presented = body["refresh_token"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let hold = {
                let mut ledger = server.ledger.lock().unwrap();
                let hold = ledger.hold_next.take();
                if hold.is_some() {
                    ledger.held_by = pid;
                }
                hold
            };
            let mut guard = None;
            if let Some(hold) = hold {
                // NOTE: nothing is decided before the hold ends: a client
                // that dies meanwhile leaves its refresh token unused.
                guard = Some(HeldGuard {
                    ledger: server.ledger.clone(),
                    answered: false,
                });
                tokio::time::sleep(hold).await;
            }
            let mut ledger = server.ledger.lock().unwrap();
            if let Some(guard) = guard.as_mut() {
                guard.answered = true;
            }
            match ledger.refresh.get(&presented).copied() {
                Some(false) => {
                    ledger.refresh.insert(presented, true);
                    ledger.counts.refreshes += 1;
                    Json(server.issue(&mut ledger)).into_response()
                }
                Some(true) => {
                    ledger.counts.reused += 1;
                    invalid_grant()
                }
                None => {
                    ledger.counts.unknown += 1;
                    invalid_grant()
                }
            }
        }
        _ => (StatusCode::BAD_REQUEST, "unsupported grant").into_response(),
    }
}

fn invalid_grant() -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({"error": "invalid_grant"})),
    )
        .into_response()
}

async fn work(State(server): State<TokenServer>, headers: HeaderMap) -> Response {
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let mut ledger = server.ledger.lock().unwrap();
    let valid = ledger
        .access
        .get(presented)
        .is_some_and(|(_, until)| Instant::now() < *until);
    if valid {
        ledger.counts.accepted += 1;
        (StatusCode::OK, "ok").into_response()
    } else {
        ledger.counts.rejected += 1;
        (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Bearer error=\"invalid_token\"")],
            "expired",
        )
            .into_response()
    }
}

// ---------------------------------------------------------------- workers

/// Builds `examples/fleet_worker.rs` once per test binary and returns its path.
pub fn worker_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            let cargo = option_env!("CARGO").unwrap_or("cargo");
            let mut command = Command::new(cargo);
            // NOTE: the variables cargo sets for this test would make build
            // scripts that watch them rerun, and rebuild half the graph.
            for (name, _) in std::env::vars_os() {
                let name = name.to_string_lossy();
                if name.starts_with("CARGO_PKG_")
                    || name.starts_with("CARGO_MANIFEST_")
                    || name.starts_with("CARGO_CRATE_")
                    || name.starts_with("CARGO_BIN_")
                    || name == "CARGO_PRIMARY_PACKAGE"
                    || name == "CARGO_TARGET_TMPDIR"
                    || name == "OUT_DIR"
                {
                    command.env_remove(&*name);
                }
            }
            let output = command
                .args([
                    "build",
                    "--example",
                    "fleet_worker",
                    "--all-features",
                    "--message-format=json-render-diagnostics",
                ])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .stderr(Stdio::inherit())
                .output()
                .expect("cargo runs");
            assert!(output.status.success(), "building the fleet worker failed");
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .find(|m| {
                    m["reason"] == "compiler-artifact" && m["target"]["name"] == "fleet_worker"
                })
                .and_then(|m| m["executable"].as_str().map(PathBuf::from))
                .expect("cargo reported the fleet worker's executable")
        })
        .clone()
}

#[derive(Default)]
struct WorkerLog {
    ready: bool,
    serial: Option<String>,
    done: Option<String>,
    /// `(unix ms, kind)` of each failed request.
    failures: Vec<(u128, String)>,
}

/// What a worker reported when stopped.
#[derive(Debug, Clone)]
pub struct Done {
    pub pid: u32,
    pub ok: u64,
    pub failed: u64,
    pub refreshes: u64,
    pub adopted: u64,
    pub serial: String,
    /// `(unix ms, kind)` of each failed request.
    pub failures: Vec<(u128, String)>,
}

/// A fleet worker process.
pub struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    log: Arc<Mutex<WorkerLog>>,
}

impl Worker {
    /// Starts a worker on `store` (`redis://…` or `file:<dir>`).
    pub fn start(server: &TokenServer, store: &str, extra: &[&str]) -> Self {
        Self::start_on(&server.token_url(), &server.upstream_url(), store, extra)
    }

    /// Starts a worker on `store` against the given token endpoint and
    /// upstream.
    pub fn start_on(token_url: &str, upstream_url: &str, store: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(worker_binary())
            .args(["--store", store])
            .args(["--token-url", token_url])
            .args(["--upstream-url", upstream_url])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the fleet worker starts");
        let stdout = child.stdout.take().expect("piped");
        let log = Arc::new(Mutex::new(WorkerLog::default()));
        let writer = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut log = writer.lock().unwrap();
                if line == "ready" {
                    log.ready = true;
                } else if let Some(serial) = line.strip_prefix("token ") {
                    log.serial = Some(serial.to_owned());
                } else if line.starts_with("done ") {
                    log.done = Some(line);
                } else if let Some(fail) = line.strip_prefix("fail ") {
                    let mut parts = fail.split_whitespace();
                    if let (Some(at), Some(kind)) = (parts.next(), parts.next()) {
                        if let Ok(at) = at.parse() {
                            log.failures.push((at, kind.to_owned()));
                        }
                    }
                }
            }
        });
        let stdin = child.stdin.take();
        Self { child, stdin, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_ready(&self) -> bool {
        self.log.lock().unwrap().ready
    }

    /// The serial of the token the worker last used.
    pub fn serial(&self) -> Option<String> {
        self.log.lock().unwrap().serial.clone()
    }

    /// Stops the process (SIGSTOP): it holds whatever it holds, and answers
    /// nothing, until [`resume`](Self::resume).
    pub fn pause(&self) {
        signal(self.pid(), "-STOP");
    }

    /// Resumes a stopped process (SIGCONT).
    pub fn resume(&self) {
        signal(self.pid(), "-CONT");
    }

    /// Kills the process at once (SIGKILL): no clean-up, no lease release.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks the worker to stop and returns its report.
    pub fn stop(mut self) -> Done {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"stop\n");
        }
        let log = self.log.clone();
        wait_until(Duration::from_secs(20), "a worker's report", || {
            log.lock().unwrap().done.is_some()
        });
        let _ = self.child.wait();
        let line = log.lock().unwrap().done.clone().unwrap();
        let failures = std::mem::take(&mut log.lock().unwrap().failures);
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("{name} in {line:?}"))
                .to_owned()
        };
        let number = |name: &str| field(name).parse::<u64>().expect("a number");
        Done {
            pid: self.child.id(),
            ok: number("ok"),
            failed: number("failed"),
            refreshes: number("refreshes"),
            adopted: number("adopted"),
            serial: field("serial"),
            failures,
        }
    }
}

/// Sends a signal with `kill(1)`.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill(1) runs");
    assert!(status.success(), "kill {signal} {pid} failed");
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (without blocking the runtime) until every worker uses the token
/// of serial `serial`.
pub async fn all_on(workers: &[Worker], serial: u64, limit: Duration) {
    let want = serial.to_string();
    wait_for(
        limit,
        &format!("every worker to use token {serial}"),
        || workers.iter().all(|w| w.serial().as_deref() == Some(&want)),
    )
    .await;
}
