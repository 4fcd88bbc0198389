//! tower-auth-refresh (docs to come)
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub, rust_2018_idioms)]
#![deny(clippy::await_holding_lock)]

mod detect;
mod error;
mod source;
mod token;

/// The error type of the middleware, as in tower.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

pub use detect::{ExpiryDetector, HeadVerdict, ResponseHead};
pub use error::{InvalidTokenValue, ReauthorizationRequired, RefreshFailed, RefreshTimedOut};
pub use source::{RefreshContext, RefreshReason, TokenSource, TokenSourceFn, token_source_fn};
pub use token::Token;
