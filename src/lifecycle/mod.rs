//! The token lifecycle: from the handle an application holds down to the
//! token source and the store.
//!
//! The files read in one direction, each using only those below it:
//!
//! - `handle.rs`: [`TokenHandle`], its builder, status and counters.
//! - `manager.rs`: the shared core: the current token, the single refresh
//!   in flight, back-off.
//! - `current.rs`: an installed token with its prepared header and
//!   freshness, and the timer that ages it.
//! - `fleet.rs`: how a refresh goes when there is a store (the lease
//!   protocol); without a store the manager calls the source directly.
//! - `fetch.rs`: one call of the token source (timeout, panics contained)
//!   and what a refresh obtained.
//! - `header_cache.rs`: copies of a token's header, one per thread slot.
//! - `background.rs`: the crate's own runtime, where refreshes and timers
//!   run whatever happens to the caller's runtime.

mod background;
mod counting;
mod current;
mod fetch;
mod fleet;
mod handle;
mod header_cache;
mod manager;

#[cfg(feature = "oauth2")]
pub(crate) use background::runtime_for_caller;
pub(crate) use manager::{Acquired, Rejection, TokenManager};

pub use fleet::UnreachableStore;
pub use handle::{RefreshStats, TokenHandle, TokenHandleBuilder, TokenStatus};
