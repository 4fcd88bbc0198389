//! Tower middleware that keeps HTTP clients authenticated.
//!
//! [`AuthRefreshLayer`] wraps any tower HTTP [`Service`](tower_service::Service):
//! it puts the current token on every request (read without a lock), recognises
//! an expired-token answer with an [`ExpiryDetector`] (a 401, an RFC 6750
//! `invalid_token` challenge, a JSON business code such as
//! `HTTP 200 {"code":40003,"msg":"token过期"}`), refreshes the token **once** for
//! every request waiting on it, and replays the request with its buffered body.
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::time::Duration;
//!
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::{Layer, ServiceExt, service_fn};
//! use tower_auth_refresh::{AuthRefreshLayer, RefreshContext, Token, TokenHandle, token_source_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_auth_refresh::BoxError> {
//! // A token source: here a counter; in practice an OAuth2 grant or a login call.
//! let issued = Arc::new(AtomicUsize::new(0));
//! let counter = issued.clone();
//! let handle = TokenHandle::builder(token_source_fn(move |_cx: RefreshContext| {
//!     let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
//!     async move {
//!         Ok::<_, std::io::Error>(Token::bearer(format!("token-{n}")).with_expires_in(Duration::from_secs(3600)))
//!     }
//! }))
//! .min_token_age(Duration::ZERO)
//! .build();
//!
//! // An upstream that only accepts the second token it ever saw issued.
//! let upstream = service_fn(|request: Request<_>| async move {
//!     let ok = request.headers()["authorization"] == "Bearer token-2";
//!     let status = if ok { StatusCode::OK } else { StatusCode::UNAUTHORIZED };
//!     Ok::<_, std::convert::Infallible>(Response::builder().status(status).body(Full::new(Bytes::new())).unwrap())
//! });
//!
//! let client = AuthRefreshLayer::new(handle.clone()).layer(upstream);
//! let response = client.oneshot(Request::post("http://api.test/orders").body(Full::new(Bytes::from("{}")))?).await?;
//! assert_eq!(response.status(), StatusCode::OK); // token-1 was rejected, token-2 fetched, request replayed
//! assert_eq!(handle.stats().refreshes, 2);
//! # Ok(()) }
//! ```
//!
//! The parts, each in its own module:
//!
//! * [`Token`] and [`TokenSource`]: what a token is and how a new one is obtained;
//! * [`TokenHandle`]: the shared manager (single-flight refresh, proactive
//!   refresh, back-off, status and stats, optional [`TokenStore`] for a fleet);
//! * [`AuthRefreshLayer`]: the middleware, with its [`ExpiryDetector`] and
//!   [`TokenInjector`];
//! * [`ReplayBody`] / [`ResponseBody`]: the request body kept for one replay,
//!   and the response body handed back byte for byte after a detector peeked;
//! * `oauth2` (feature `oauth2`, on by default): OAuth2 grants and the token
//!   endpoint client, as a [`TokenSource`].
//!
//! # Runtime
//!
//! The crate needs [tokio](https://docs.rs/tokio) 1.x. Refreshes and the
//! timers that age tokens run on the crate's own background runtime: a
//! current-thread tokio runtime (time and IO enabled) on one thread named
//! `tower-auth-refresh`, started on first use and kept for the life of the
//! process.
//!
//! A [`TokenHandle`] is therefore not tied to any runtime of the
//! application. It can live in a `static` used by several
//! `#[tokio::test]`s, or behind a sync wrapper that builds a runtime per
//! call, or that keeps one and calls `block_on` per request: a refresh
//! always ends and installs its answer, whatever happens to the runtime of
//! the caller that started it (dropped, or idle), and wakes waiters on
//! every runtime; a token expires on time while the application's runtimes
//! are idle, so an expired token is never sent. A caller waits for a
//! refresh at most the refresh timeout (with a store, plus the lease
//! protocol) and a second, on its own clock. A runtime without its time
//! driver works; [`TokenHandle::set_token`] may be called from any thread.
//!
//! A [`TokenSource`]'s (and a [`TokenStore`]'s) futures are polled on the
//! background thread: they must not block it (`spawn_blocking` for blocking
//! work), and should not depend on I/O resources made on one of the
//! application's runtimes (a hyper or reqwest client that keeps its
//! connections there stalls when that runtime is idle or gone). The OAuth2
//! source's own client sends its calls through the background runtime.
//!
//! For tests: a caller whose tokio clock is paused (`tokio::time::pause`)
//! keeps refreshes and timers on its own runtime, so tokens age with the
//! paused clock.
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![deny(clippy::await_holding_lock)]

mod body;
mod detect;
#[cfg(feature = "dpop")]
pub mod dpop;
mod error;
mod future;
mod inject;
#[cfg(feature = "oauth2")]
mod jose;
mod layer;
mod lifecycle;
#[cfg(feature = "oauth2")]
pub mod oauth2;
mod registry;
#[cfg(feature = "reqwest")]
mod reqwest;
mod retry;
mod service;
mod source;
mod store;
mod token;

// The README's examples, compiled and run as doctests.
#[cfg(all(doctest, feature = "dpop"))]
#[doc = include_str!("../README.md")]
mod readme_doctests {}

/// The error type of the middleware, as in tower.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[cfg(feature = "reqwest")]
pub use self::reqwest::AuthRefreshMiddleware;
pub use body::{ReplayBody, ResponseBody};
pub use detect::{
    BearerChallenge, BodyDetectorFn, DetectorFn, ExpiryDetector, ExpiryDetectorExt, HeadVerdict,
    JsonBodyRule, Or, ResponseHead, StatusDetector, Unauthorized, body_detector_fn, detector_fn,
};
pub use error::{
    InvalidTokenValue, ReauthorizationRequired, RefreshFailed, RefreshTimedOut, StoreUnreachable,
};
pub use future::ResponseFuture;
pub use inject::TokenInjector;
pub use layer::{
    AuthRefreshLayer, DEFAULT_MAX_REPLAY_BYTES, DEFAULT_PEEK_DEADLINE, DEFAULT_PEEK_LIMIT,
};
pub use lifecycle::{RefreshStats, TokenHandle, TokenHandleBuilder, TokenStatus, UnreachableStore};
pub use registry::{
    AuthRouting, AuthRoutingLayer, FlushReport, InvalidOrigin, LAST_USED_METADATA_KEY,
    MaintenanceReport, Origin, Outcome, ProgressUpdate, RefreshAll, Tenant, TokenRegistry,
    TokenRegistryBuilder, UpstreamKey,
};
pub use retry::{RetrySkipped, SkipReason};
pub use service::AuthRefresh;
pub use source::{RefreshContext, RefreshReason, TokenSource, TokenSourceFn, token_source_fn};
pub use store::{FileStore, Lease, MemoryStore, StoreError, StoredToken, TokenStore};
#[cfg(feature = "redis")]
pub use store::{RedisStore, RedisStoreBuilder};
pub use token::Token;
