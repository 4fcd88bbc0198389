//! Where refreshes and freshness timers run: the crate's own background
//! runtime, which nothing a user does can drop or leave idle.
//!
//! NOTE: the invariants of this file.
//! - The background runtime is a current-thread tokio runtime (time and IO
//!   enabled) driven by one thread of its own, named for the crate. It is
//!   created on first use and lives as long as the process; its thread
//!   only ever waits in `block_on` on a future that never ends, so every
//!   task spawned there is driven until it ends, whatever happens to the
//!   runtime of the caller that started it.
//! - A caller whose tokio clock is paused (`tokio::time::pause`, a test)
//!   keeps its refreshes and timers on its own runtime: a paused clock only
//!   moves for the tasks of its runtime, and a token aged by real time
//!   would not follow it.
//! - Work spawned there carries the caller's tracing subscriber
//!   (`with_current_subscriber`), so its logs go where the caller's go.
//! - When the thread cannot be started (the OS refused it), work falls
//!   back to the caller's runtime, as a last resort.

use std::sync::OnceLock;

use tokio::runtime::Handle;

/// The runtime that runs refreshes and timers (and the OAuth2 source's
/// HTTP calls) on behalf of a caller.
pub(crate) fn runtime_for_caller() -> Option<Handle> {
    let caller = Handle::try_current().ok();
    if caller.is_some() && caller_clock_is_paused() {
        return caller;
    }
    background().or(caller)
}

/// The background runtime, started on first use; `None` if its thread
/// could not be started.
fn background() -> Option<Handle> {
    static BACKGROUND: OnceLock<Option<Handle>> = OnceLock::new();
    BACKGROUND.get_or_init(start).clone()
}

fn start() -> Option<Handle> {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(error = %err, "cannot build the token refresh runtime");
            return None;
        }
    };
    let handle = runtime.handle().clone();
    let spawned = std::thread::Builder::new()
        .name("tower-auth-refresh".into())
        .spawn(move || runtime.block_on(std::future::pending::<()>()));
    match spawned {
        Ok(_) => Some(handle),
        Err(err) => {
            tracing::error!(error = %err, "cannot start the token refresh thread");
            None
        }
    }
}

/// `true` when the caller's tokio clock is paused.
///
/// NOTE: a clock that is not paused is the real clock (plus an offset after
/// `tokio::time::resume`), so it moves whenever real time moves. A paused
/// clock moves only when its runtime advances it, which cannot happen
/// between two reads on the thread that drives it. So: read the tokio
/// clock, wait until real time has moved, read it again.
fn caller_clock_is_paused() -> bool {
    let first = tokio::time::Instant::now();
    let real = std::time::Instant::now();
    // Real time moves within nanoseconds; on a clock too coarse to see it
    // move, give up: not paused.
    let moved = (0..100_000).any(|_| {
        std::hint::spin_loop();
        std::time::Instant::now() > real
    });
    moved && tokio::time::Instant::now() == first
}
