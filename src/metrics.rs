//! Reporting through the [`metrics`](https://docs.rs/metrics) facade
//! (feature `metrics`): whatever recorder the application installed
//! (Prometheus, OpenTelemetry, StatsD …) receives these. Refreshes run on
//! the crate's background thread, so the recorder must be the global one.
//! Without the feature every function here is empty.
//!
//! Names and labels follow the OpenTelemetry conventions: dotted lowercase
//! names, the unit given apart (an exporter adds it, e.g.
//! `auth_refresh_refresh_duration_seconds` in Prometheus), counters named
//! for what they count.
//!
//! | name | kind | unit | labels |
//! |---|---|---|---|
//! | `auth_refresh.refreshes` | counter | `{refresh}` | `token`, `reason`, `outcome` |
//! | `auth_refresh.refresh.duration` | histogram | `s` | `token`, `reason`, `outcome` |
//! | `auth_refresh.retries` | counter | `{request}` | `token` |
//! | `auth_refresh.retries.skipped` | counter | `{request}` | `token`, `reason` |
//! | `auth_refresh.waits` | counter | `{request}` | `token`, `cause` |
//! | `auth_refresh.token.expires_in` | gauge | `s` | `token` |
//!
//! * `token`: the handle's name ([`TokenHandleBuilder::name`](crate::TokenHandleBuilder::name),
//!   default `default`).
//! * `reason`: why a refresh ran (`initial`, `expired`, `rejected`,
//!   `proactive`, `manual`), or why a retry was skipped (`body_too_large`,
//!   `replay_disabled`, `body_failed`, `token_too_fresh`,
//!   `body_not_cloneable`).
//! * `outcome`: `success` (a new token from the source), `adopted` (taken
//!   from the store, fetched by another process), `failure`, `timeout`,
//!   `reauthorization_required`, `store_unreachable` (the fleet's store could
//!   not be reached and the refresh could not safely go ahead alone).
//! * `cause` of a wait: `first_token` (no token yet, or after `clear()`:
//!   expected at start) or `expired` (the token ran out before a refresh
//!   replaced it: worth a look when it grows).
//! * `auth_refresh.token.expires_in`: seconds left on the current token,
//!   set when a token is installed and each time
//!   [`TokenHandle::status`](crate::TokenHandle::status) is read.

use std::time::Duration;

use crate::{RefreshReason, SkipReason};

/// How a refresh ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    Adopted,
    Failure,
    Timeout,
    ReauthorizationRequired,
    StoreUnreachable,
}

impl Outcome {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Adopted => "adopted",
            Self::Failure => "failure",
            Self::Timeout => "timeout",
            Self::ReauthorizationRequired => "reauthorization_required",
            Self::StoreUnreachable => "store_unreachable",
        }
    }
}

#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
fn skip_reason(reason: SkipReason) -> &'static str {
    match reason {
        SkipReason::BodyTooLarge => "body_too_large",
        SkipReason::ReplayDisabled => "replay_disabled",
        SkipReason::BodyFailed => "body_failed",
        SkipReason::TokenTooFresh => "token_too_fresh",
        SkipReason::BodyNotCloneable => "body_not_cloneable",
    }
}

#[cfg(feature = "metrics")]
mod report {
    use std::time::Duration;

    use metrics::{
        Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
    };

    use super::{Outcome, skip_reason};
    use crate::{RefreshReason, SkipReason};

    const REFRESHES: &str = "auth_refresh.refreshes";
    const REFRESH_DURATION: &str = "auth_refresh.refresh.duration";
    const RETRIES: &str = "auth_refresh.retries";
    const RETRIES_SKIPPED: &str = "auth_refresh.retries.skipped";
    const WAITS: &str = "auth_refresh.waits";
    const EXPIRES_IN: &str = "auth_refresh.token.expires_in";

    /// Descriptions and units. Given with each report: reports are rare
    /// (refreshes, waits, retries; never the plain request path), and a
    /// recorder installed late still gets them.
    fn describe() {
        describe_counter!(
            REFRESHES,
            Unit::Count,
            "Token refreshes, by reason and outcome."
        );
        describe_histogram!(
            REFRESH_DURATION,
            Unit::Seconds,
            "How long token refreshes took, by reason and outcome."
        );
        describe_counter!(RETRIES, Unit::Count, "Requests sent again after a refresh.");
        describe_counter!(
            RETRIES_SKIPPED,
            Unit::Count,
            "Rejected requests that were not retried, by reason."
        );
        describe_counter!(
            WAITS,
            Unit::Count,
            "Requests that waited for a token before being sent, by cause."
        );
        describe_gauge!(
            EXPIRES_IN,
            Unit::Seconds,
            "Seconds until the current token expires."
        );
    }

    pub(super) fn refresh_finished(
        token: &str,
        reason: RefreshReason,
        outcome: Outcome,
        took: Duration,
    ) {
        describe();
        let labels = [
            ("token", token.to_owned()),
            ("reason", reason.as_str().to_owned()),
            ("outcome", outcome.as_str().to_owned()),
        ];
        counter!(REFRESHES, &labels).increment(1);
        histogram!(REFRESH_DURATION, &labels).record(took.as_secs_f64());
    }

    pub(super) fn retried(token: &str) {
        describe();
        counter!(RETRIES, "token" => token.to_owned()).increment(1);
    }

    pub(super) fn retry_skipped(token: &str, reason: SkipReason) {
        describe();
        counter!(RETRIES_SKIPPED, "token" => token.to_owned(), "reason" => skip_reason(reason))
            .increment(1);
    }

    pub(super) fn waited(token: &str, first_token: bool) {
        describe();
        let cause = if first_token {
            "first_token"
        } else {
            "expired"
        };
        counter!(WAITS, "token" => token.to_owned(), "cause" => cause).increment(1);
    }

    pub(super) fn expires_in(token: &str, left: Duration) {
        describe();
        gauge!(EXPIRES_IN, "token" => token.to_owned()).set(left.as_secs_f64());
    }
}

/// A refresh ended after `took`.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn refresh_finished(
    token: &str,
    reason: RefreshReason,
    outcome: Outcome,
    took: Duration,
) {
    #[cfg(feature = "metrics")]
    report::refresh_finished(token, reason, outcome, took);
}

/// A request was sent again with a refreshed token.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn retried(token: &str) {
    #[cfg(feature = "metrics")]
    report::retried(token);
}

/// A rejected request was not retried.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn retry_skipped(token: &str, reason: SkipReason) {
    #[cfg(feature = "metrics")]
    report::retry_skipped(token, reason);
}

/// A request waited for a token: the first one, or one to replace an
/// expired one.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn waited(token: &str, first_token: bool) {
    #[cfg(feature = "metrics")]
    report::waited(token, first_token);
}

/// Time left on the current token, when its expiry is known.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn expires_in(token: &str, left: Option<Duration>) {
    #[cfg(feature = "metrics")]
    if let Some(left) = left {
        report::expires_in(token, left);
    }
}
