//! tower-auth-refresh (docs to come)
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
mod error;
mod fleet;
mod future;
mod handle;
mod inject;
mod layer;
mod manager;
mod retry;
mod service;
mod source;
mod store;
mod token;

/// The error type of the middleware, as in tower.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

pub use body::{ReplayBody, ResponseBody};
pub use detect::{ExpiryDetector, HeadVerdict, ResponseHead, Unauthorized};
pub use error::{InvalidTokenValue, ReauthorizationRequired, RefreshFailed, RefreshTimedOut};
pub use future::ResponseFuture;
pub use handle::{RefreshStats, TokenHandle, TokenHandleBuilder, TokenStatus};
pub use inject::TokenInjector;
pub use layer::{AuthRefreshLayer, DEFAULT_MAX_REPLAY_BYTES, DEFAULT_PEEK_LIMIT};
pub use retry::{RetrySkipped, SkipReason};
pub use service::AuthRefresh;
pub use source::{RefreshContext, RefreshReason, TokenSource, TokenSourceFn, token_source_fn};
pub use store::{Lease, MemoryStore, StoreError, StoredToken, TokenStore};
pub use token::Token;
