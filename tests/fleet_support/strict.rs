//! A token server as strict as the real ones that detect refresh-token
//! reuse (Auth0, Okta, Keycloak), and an upstream that checks its tokens.
//!
//! - `POST /token`, JSON `{"grant_type":"password"}` (a new token family)
//!   or `{"grant_type":"refresh_token","refresh_token":"…"}`; the answer is
//!   `{"access_token","refresh_token","expires_in_ms","serial"}`.
//! - Refresh tokens rotate: each works once. A second use of a spent one
//!   is counted as reuse and revokes the whole family (every access and
//!   refresh token issued from the same login), as theft detection does.
//! - Issuing a new access token revokes the one it replaces (the access
//!   token issued with the refresh token just used), as
//!   django-oauth-toolkit does.
//! - `GET /work` accepts an access token until its expiry, unless revoked.
//! - Faults on request: answer `502` after rotating (the new token is
//!   issued and the old refresh token spent, the client never learns it);
//!   hold a refresh grant before deciding it (to stop its client meanwhile).
//!
//! Every token-endpoint call is logged with its time, for the "calls per
//! token lifetime" figure.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

/// What the strict server saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StrictCounts {
    /// Password grants answered (each starts a token family).
    pub logins: u64,
    /// Refresh grants answered with a new token (502s after rotation too).
    pub refreshes: u64,
    /// Spent refresh tokens presented again.
    pub reused: u64,
    /// Token families revoked because of a reuse.
    pub family_revocations: u64,
    /// Refresh tokens of a revoked family, or never issued.
    pub refused: u64,
    /// Refreshes answered 502 after rotating.
    pub failed_after_rotation: u64,
    /// Upstream requests accepted / rejected.
    pub accepted: u64,
    pub rejected: u64,
}

struct Issued {
    family: u64,
    /// The access token issued with this refresh token.
    access: String,
    used: bool,
}

#[derive(Default)]
struct Ledger {
    serial: u64,
    families: u64,
    revoked_families: Vec<u64>,
    /// access token → (family, expiry, revoked)
    access: HashMap<String, (u64, Instant, bool)>,
    refresh: HashMap<String, Issued>,
    counts: StrictCounts,
    /// Unix milliseconds of every token-endpoint call.
    calls: Vec<u128>,
    fail_next_after_rotation: bool,
    hold_next: Option<Duration>,
    held_by: Option<u32>,
}

/// The strict token server and its upstream on one real HTTP server.
#[derive(Clone)]
pub struct StrictServer {
    pub addr: SocketAddr,
    ledger: Arc<Mutex<Ledger>>,
    lifetime: Duration,
}

pub fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

impl StrictServer {
    pub async fn start(lifetime: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Self {
            addr: listener.local_addr().unwrap(),
            ledger: Arc::default(),
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

    pub fn counts(&self) -> StrictCounts {
        self.ledger.lock().unwrap().counts.clone()
    }

    pub fn serial(&self) -> u64 {
        self.ledger.lock().unwrap().serial
    }

    /// Unix milliseconds of every token-endpoint call so far.
    pub fn calls(&self) -> Vec<u128> {
        self.ledger.lock().unwrap().calls.clone()
    }

    /// The next refresh grant rotates, then is answered `502`.
    pub fn fail_next_refresh_after_rotation(&self) {
        self.ledger.lock().unwrap().fail_next_after_rotation = true;
    }

    /// Holds the next refresh grant for `hold` before deciding it.
    pub fn hold_next_refresh(&self, hold: Duration) {
        let mut ledger = self.ledger.lock().unwrap();
        ledger.hold_next = Some(hold);
        ledger.held_by = None;
    }

    /// The pid of the worker whose refresh is held, once it arrived.
    pub fn held_by(&self) -> Option<u32> {
        self.ledger.lock().unwrap().held_by
    }

    fn issue(&self, ledger: &mut Ledger, family: u64) -> serde_json::Value {
        ledger.serial += 1;
        let n = ledger.serial;
        let (access, refresh) = (format!("at-{n}"), format!("rt-{n}"));
        ledger.access.insert(
            access.clone(),
            (family, Instant::now() + self.lifetime, false),
        );
        ledger.refresh.insert(
            refresh.clone(),
            Issued {
                family,
                access: access.clone(),
                used: false,
            },
        );
        serde_json::json!({
            "access_token": access,
            "refresh_token": refresh,
            "expires_in_ms": u64::try_from(self.lifetime.as_millis()).unwrap(),
            "serial": n,
        })
    }
}

fn invalid_grant() -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({"error": "invalid_grant"})),
    )
        .into_response()
}

async fn token(
    State(server): State<StrictServer>,
    headers: HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> Response {
    let pid = headers
        .get("x-worker-pid")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    server.ledger.lock().unwrap().calls.push(unix_ms());
    match body["grant_type"].as_str() {
        Some("password") => {
            let mut ledger = server.ledger.lock().unwrap();
            ledger.counts.logins += 1;
            ledger.families += 1;
            let family = ledger.families;
            Json(server.issue(&mut ledger, family)).into_response()
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
            if let Some(hold) = hold {
                tokio::time::sleep(hold).await;
            }
            let mut ledger = server.ledger.lock().unwrap();
            let ledger = &mut *ledger;
            let Some(issued) = ledger.refresh.get_mut(&presented) else {
                ledger.counts.refused += 1;
                return invalid_grant();
            };
            let family = issued.family;
            if ledger.revoked_families.contains(&family) {
                ledger.counts.refused += 1;
                return invalid_grant();
            }
            if issued.used {
                // Theft detection: the whole family is revoked.
                ledger.counts.reused += 1;
                ledger.counts.family_revocations += 1;
                ledger.revoked_families.push(family);
                for (_, (f, _, revoked)) in ledger.access.iter_mut() {
                    if *f == family {
                        *revoked = true;
                    }
                }
                return invalid_grant();
            }
            issued.used = true;
            let replaced = issued.access.clone();
            if let Some((_, _, revoked)) = ledger.access.get_mut(&replaced) {
                *revoked = true;
            }
            ledger.counts.refreshes += 1;
            let answer = server.issue(ledger, family);
            if std::mem::take(&mut ledger.fail_next_after_rotation) {
                ledger.counts.failed_after_rotation += 1;
                return (StatusCode::BAD_GATEWAY, "bad gateway").into_response();
            }
            Json(answer).into_response()
        }
        _ => (StatusCode::BAD_REQUEST, "unsupported grant").into_response(),
    }
}

async fn work(State(server): State<StrictServer>, headers: HeaderMap) -> Response {
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let mut ledger = server.ledger.lock().unwrap();
    let valid = ledger
        .access
        .get(presented)
        .is_some_and(|(_, until, revoked)| !revoked && Instant::now() < *until);
    if valid {
        ledger.counts.accepted += 1;
        (StatusCode::OK, "ok").into_response()
    } else {
        ledger.counts.rejected += 1;
        (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Bearer error=\"invalid_token\"")],
            "expired or revoked",
        )
            .into_response()
    }
}
