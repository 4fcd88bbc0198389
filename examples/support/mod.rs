//! In-process servers shared by the examples, so they run offline: a token
//! endpoint and upstream APIs on 127.0.0.1 that accept only the tokens it
//! issued, for as long as they live. Token serials count per audience.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use tower_auth_refresh::{BoxError, Token};

/// The tokens the token endpoint issued, each with its issue time.
pub struct Authority {
    lifetime: Duration,
    announce_expiry: bool,
    tokens: Mutex<HashMap<String, Instant>>,
    serials: Mutex<HashMap<String, u64>>,
    issued: AtomicUsize,
}

impl Authority {
    /// Tokens live `lifetime`; `announce_expiry` says whether the token
    /// response tells the client (`expires_in`) or leaves it to find out.
    pub fn new(lifetime: Duration, announce_expiry: bool) -> Arc<Self> {
        Arc::new(Self {
            lifetime,
            announce_expiry,
            tokens: Mutex::default(),
            serials: Mutex::default(),
            issued: AtomicUsize::new(0),
        })
    }

    /// Tokens issued so far.
    pub fn issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst)
    }

    /// Every token issued so far stops working at once.
    pub fn revoke_all(&self) {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn issue(&self, audience: &str) -> String {
        self.issued.fetch_add(1, Ordering::SeqCst);
        let n = {
            let mut serials = self.serials.lock().unwrap_or_else(|e| e.into_inner());
            let serial = serials.entry(audience.to_owned()).or_default();
            *serial += 1;
            *serial
        };
        // `<audience>.<serial>.<secret part>`: upstreams echo only the
        // serial, never the token.
        let token = format!("{audience}.{n}.{:016x}", fastrand::u64(..));
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.clone(), Instant::now());
        token
    }

    /// Whether any live token appears in `text` (a leak check).
    pub fn leaked_into(&self, text: &str) -> bool {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.keys().any(|token| text.contains(token.as_str()))
    }

    fn accepts(&self, audience: &str, token: &str) -> bool {
        token.starts_with(&format!("{audience}."))
            && self
                .tokens
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(token)
                .is_some_and(|at| at.elapsed() < self.lifetime)
    }
}

async fn serve(app: Router) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            eprintln!("in-process server stopped: {err}");
        }
    });
    Ok(addr)
}

/// Starts the token endpoint: `POST /token/{audience}` answers
/// `{"access_token":"…","token_type":"Bearer","expires_in":…}`.
pub async fn token_endpoint(authority: Arc<Authority>) -> std::io::Result<SocketAddr> {
    async fn issue(
        State(authority): State<Arc<Authority>>,
        Path(audience): Path<String>,
    ) -> Json<serde_json::Value> {
        let token = authority.issue(&audience);
        let mut body = serde_json::json!({ "access_token": token, "token_type": "Bearer" });
        if authority.announce_expiry {
            body["expires_in"] = authority.lifetime.as_secs_f64().into();
        }
        Json(body)
    }
    serve(
        Router::new()
            .route("/token/{audience}", post(issue))
            .with_state(authority),
    )
    .await
}

/// How an upstream says that a token is no longer good.
#[derive(Clone, Copy)]
pub enum Rejects {
    /// `401` with `WWW-Authenticate: Bearer error="invalid_token"`.
    Unauthorized,
    /// `HTTP 200 {"code":40003,"msg":"token过期"}`.
    BusinessCode,
}

#[derive(Clone)]
struct UpstreamState {
    name: &'static str,
    authority: Arc<Authority>,
    rejects: Rejects,
}

/// Starts an upstream API called `name` that accepts tokens issued for the
/// audience `name`. It answers any path with
/// `{"upstream":…,"path":…,"token_serial":…}` (never the token itself).
pub async fn upstream(
    name: &'static str,
    authority: Arc<Authority>,
    rejects: Rejects,
) -> std::io::Result<SocketAddr> {
    async fn handle(State(state): State<UpstreamState>, uri: Uri, headers: HeaderMap) -> Response {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if state.authority.accepts(state.name, token) {
            let serial: u64 = token
                .split('.')
                .nth(1)
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            return Json(serde_json::json!({
                "upstream": state.name,
                "path": uri.path(),
                "token_serial": serial,
            }))
            .into_response();
        }
        match state.rejects {
            Rejects::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                [("www-authenticate", r#"Bearer error="invalid_token""#)],
                "token expired",
            )
                .into_response(),
            Rejects::BusinessCode => Json(serde_json::json!({
                "code": 40003, "msg": "token过期", "data": null
            }))
            .into_response(),
        }
    }
    let state = UpstreamState {
        name,
        authority,
        rejects,
    };
    serve(
        Router::new()
            .route("/", any(handle))
            .route("/{*path}", any(handle))
            .with_state(state),
    )
    .await
}

/// Reads a token response of the token endpoint.
pub fn parse_token(body: &[u8]) -> Result<Token, BoxError> {
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        access_token: String,
        token_type: String,
        expires_in: Option<f64>,
    }
    let response: TokenResponse = serde_json::from_slice(body)?;
    let mut token = Token::new(response.access_token, response.token_type);
    if let Some(seconds) = response.expires_in {
        token = token.with_expires_in(Duration::try_from_secs_f64(seconds)?);
    }
    Ok(token)
}

/// The `token_serial` an upstream answered with.
pub fn token_serial(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .get("token_serial")?
        .as_u64()
}
