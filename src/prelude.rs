//! The traits and types most programs use, in one line:
//!
//! ```
//! use tower_auth_refresh::prelude::*;
//!
//! let handle = TokenHandle::new(token_source_fn(|_cx: RefreshContext| async {
//!     Ok::<_, std::io::Error>(Token::bearer("t"))
//! }));
//! // `.or` is `ExpiryDetectorExt::or`, brought in by the prelude.
//! let layer = AuthRefreshLayer::new(handle).detector(Unauthorized::new().or(JsonBodyRule::default_rules()));
//! # let _ = layer;
//! ```

pub use crate::{
    AuthRefreshLayer, AuthRoutingLayer, BearerChallenge, BoxError, ExpiryDetector,
    ExpiryDetectorExt, JsonBodyRule, Origin, RefreshContext, RefreshReason, Token, TokenHandle,
    TokenInjector, TokenSource, Unauthorized, token_source_fn,
};
