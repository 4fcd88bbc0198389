//! Tower middleware that keeps HTTP clients authenticated.
//!
//! [`AuthRefreshLayer`] wraps any tower HTTP [`Service`](https://docs.rs/tower-service/0.3/tower_service/trait.Service.html):
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
//! # The parts
//!
//! * A token and how to get one: [`Token`] (secrets never in `Debug` or
//!   logs), [`TokenSource`] ([`token_source_fn`] adapts an async closure;
//!   [`RefreshContext`] and [`RefreshReason`] say why it is called), and the
//!   [`oauth2`] module (feature `oauth2`): OAuth2 grants and vendor envelopes
//!   as a [`TokenSource`].
//! * The shared manager: [`TokenHandle`], built with [`TokenHandleBuilder`]
//!   (single-flight refresh, refresh ahead of expiry, back-off, the
//!   [`TokenInjector`] that puts the token on a request, an optional store),
//!   with [`TokenStatus`] and [`RefreshStats`] to watch it.
//! * The middleware: [`AuthRefreshLayer`] / [`AuthRefresh`] and its
//!   [`ResponseFuture`]; which answers mean "expired" is an
//!   [`ExpiryDetector`] ([`Unauthorized`], [`BearerChallenge`],
//!   [`StatusDetector`], [`JsonBodyRule`], [`detector_fn`],
//!   [`body_detector_fn`]), combined with [`ExpiryDetectorExt::or`]. Bodies:
//!   [`ReplayBody`] (the request body, kept for one replay) and
//!   [`ResponseBody`] (handed back byte for byte after a detector peeked). A
//!   retry that could not happen leaves a [`RetrySkipped`] marker.
//!   [`HyperClient`] names a layered hyper-util client (and shows how to box
//!   it in a `BoxCloneService`).
//! * Where tokens outlive the process, and how a fleet refreshes once: the
//!   [`TokenStore`] trait with [`MemoryStore`], [`FileStore`] and [`RedisStore`]
//!   (feature `redis`), their [`StoredToken`], [`Lease`] and [`StoreError`].
//! * Many tokens: [`AuthRoutingLayer`] / [`AuthRouting`] pick a token per
//!   upstream [`Origin`], [`UpstreamKey`] or [`Tenant`]; a
//!   [`TokenRegistry`] holds one token per tenant over a store, with bulk
//!   jobs ([`TokenRegistry::refresh_all`] with [`RefreshAll`], and
//!   [`TokenRegistry::remove_idle`]) that return a [`MaintenanceReport`].
//! * [`dpop`] (feature `dpop`): DPoP-bound tokens (RFC 9449), a proof per
//!   request from the layer ([`AuthRefreshLayer::dpop`]) and the token
//!   endpoint, nonces answered once.
//! * reqwest: [`AuthRefreshMiddleware`] (feature `reqwest`), the same handle,
//!   detector and injector in a `reqwest-middleware` client.
//! * Errors: every failure is a [`BoxError`] that downcasts to
//!   [`RefreshFailed`], [`RefreshTimedOut`], [`ReauthorizationRequired`] or
//!   [`StoreError`].
//! * [`prelude`]: the traits and types most programs use, in one `use`.
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
//!
//! # Cargo features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `oauth2` | yes | the [`oauth2`] module: OAuth2 grants and the token-endpoint client (hyper-util over plain HTTP) |
//! | `hyper-client` | yes (with `oauth2`) | [`HyperClient`]: a hyper-util client wrapped in the layer, built by [`AuthRefreshLayer::hyper_client`] |
//! | `dpop` | no | [`dpop`]: DPoP (RFC 9449) sender-constrained tokens; client assertions, PKCE and revocation come with `oauth2` |
//! | `oauth2-rustls` | no | HTTPS to the token endpoint in that client: rustls (ring) with the webpki roots |
//! | `reqwest` | no | [`AuthRefreshMiddleware`] for reqwest 0.13 + reqwest-middleware 0.5 |
//! | `metrics` | no | refreshes (by reason and outcome) and their duration, retries, skipped retries, waits and the current token's time to expiry, reported through the [`metrics`](https://docs.rs/metrics) facade; names in the README |
//! | `redis` | no | [`RedisStore`]: tokens in Redis, shared by a fleet of processes |
// NOTE: link targets of the parts behind features: the items when the
// feature is on, their docs.rs pages when it is off.
#![doc = ""]
#![cfg_attr(feature = "oauth2", doc = "[`oauth2`]: crate::oauth2")]
#![cfg_attr(
    not(feature = "oauth2"),
    doc = "[`oauth2`]: https://docs.rs/tower-auth-refresh/latest/tower_auth_refresh/oauth2/index.html"
)]
#![cfg_attr(feature = "hyper-client", doc = "[`HyperClient`]: crate::HyperClient")]
#![cfg_attr(
    not(feature = "hyper-client"),
    doc = "[`HyperClient`]: https://docs.rs/tower-auth-refresh/latest/tower_auth_refresh/type.HyperClient.html"
)]
#![cfg_attr(
    feature = "hyper-client",
    doc = "[`AuthRefreshLayer::hyper_client`]: crate::AuthRefreshLayer::hyper_client"
)]
#![cfg_attr(
    not(feature = "hyper-client"),
    doc = "[`AuthRefreshLayer::hyper_client`]: https://docs.rs/tower-auth-refresh/latest/tower_auth_refresh/struct.AuthRefreshLayer.html#method.hyper_client"
)]
#![cfg_attr(
    feature = "reqwest",
    doc = "[`AuthRefreshMiddleware`]: crate::AuthRefreshMiddleware"
)]
#![cfg_attr(
    not(feature = "reqwest"),
    doc = "[`AuthRefreshMiddleware`]: https://docs.rs/tower-auth-refresh/latest/tower_auth_refresh/struct.AuthRefreshMiddleware.html"
)]
#![cfg_attr(feature = "redis", doc = "[`RedisStore`]: crate::RedisStore")]
#![cfg_attr(
    not(feature = "redis"),
    doc = "[`RedisStore`]: https://docs.rs/tower-auth-refresh/latest/tower_auth_refresh/struct.RedisStore.html"
)]
#![cfg_attr(feature = "dpop", doc = "[`dpop`]: crate::dpop")]
#![cfg_attr(
    not(feature = "dpop"),
    doc = "[`dpop`]: https://docs.rs/tower-auth-refresh/latest/tower_auth_refresh/dpop/index.html"
)]
#![cfg_attr(
    feature = "dpop",
    doc = "[`AuthRefreshLayer::dpop`]: crate::AuthRefreshLayer::dpop"
)]
#![cfg_attr(
    not(feature = "dpop"),
    doc = "[`AuthRefreshLayer::dpop`]: https://docs.rs/tower-auth-refresh/latest/tower_auth_refresh/struct.AuthRefreshLayer.html#method.dpop"
)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![deny(clippy::await_holding_lock)]

mod body;
#[cfg(feature = "hyper-client")]
mod client;
mod detect;
#[cfg(feature = "dpop")]
#[cfg_attr(docsrs, doc(cfg(feature = "dpop")))]
pub mod dpop;
mod error;
mod future;
mod inject;
#[cfg(feature = "oauth2")]
mod jose;
mod layer;
mod lifecycle;
mod metrics;
#[cfg(feature = "oauth2")]
#[cfg_attr(docsrs, doc(cfg(feature = "oauth2")))]
pub mod oauth2;
pub mod prelude;
mod registry;
#[cfg(feature = "reqwest")]
mod reqwest;
mod retry;
mod service;
mod source;
mod store;
mod token;

// NOTE: the README's Rust snippets are compiled as doctests. Some use parts
// behind features (RedisStore, AuthRefreshMiddleware, DPoP), so they are
// checked with every feature on, as the README's test command does.
#[cfg(all(
    doctest,
    feature = "oauth2",
    feature = "redis",
    feature = "reqwest",
    feature = "dpop"
))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// The error type of the middleware, as in tower.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub use self::reqwest::AuthRefreshMiddleware;
pub use body::{ReplayBody, ResponseBody};
#[cfg(feature = "hyper-client")]
#[cfg_attr(docsrs, doc(cfg(feature = "hyper-client")))]
pub use client::{HyperClient, HyperResponse};
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
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use store::{RedisStore, RedisStoreBuilder};
pub use token::Token;
