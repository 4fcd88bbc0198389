//! Feature `metrics`: what reaches a `metrics` recorder (names, labels,
//! units), through the tower layer against a real upstream on 127.0.0.1;
//! and `RefreshStats` differences with the first-token wait counted apart.
//!
//! Refreshes run on the crate's background thread, so the recorder is the
//! global one, installed once for this binary; each test reads only the
//! series of its own token (the `token` label).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use common::{Issuer, Upstream, body_text, client, get, post};
use metrics::Unit;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use secrecy::ExposeSecret;
use tower::{Layer, ServiceExt};
use tower_auth_refresh::{
    AuthRefreshLayer, BoxError, ReauthorizationRequired, RefreshContext, Token, TokenHandle,
    token_source_fn,
};

/// A snapshot drains what it reads: the tests that read the recorder take
/// turns.
static RECORDING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The global recorder of this test binary, installed on first use.
fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("no other global recorder in this test binary");
        snapshotter
    })
}

/// One reported series: name, labels (sorted), unit and value.
#[derive(Debug)]
struct Series {
    name: String,
    labels: Vec<(String, String)>,
    unit: Option<Unit>,
    value: DebugValue,
}

fn drain(snapshotter: &Snapshotter) -> Vec<Series> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, unit, _, value)| {
            let mut labels: Vec<_> = key
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            Series {
                name: key.key().name().to_owned(),
                labels,
                unit,
                value,
            }
        })
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut labels: Vec<_> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    labels.sort();
    labels
}

fn counter(series: &[Series], name: &str, pairs: &[(&str, &str)]) -> u64 {
    let wanted = labels(pairs);
    series
        .iter()
        .filter(|s| s.name == name && s.labels == wanted)
        .map(|s| match s.value {
            DebugValue::Counter(n) => n,
            ref other => panic!("{name} is not a counter: {other:?}"),
        })
        .sum()
}

fn series<'a>(series: &'a [Series], name: &str, pairs: &[(&str, &str)]) -> &'a Series {
    let wanted = labels(pairs);
    series
        .iter()
        .find(|s| s.name == name && s.labels == wanted)
        .unwrap_or_else(|| panic!("no {name} {wanted:?} in {series:#?}"))
}

#[tokio::test]
async fn refreshes_waits_retries_and_skips_reach_the_recorder() {
    let _alone = RECORDING.lock().await;
    let snapshotter = snapshotter();

    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream).lifetime(Duration::from_secs(3600));
    let handle = TokenHandle::builder(issuer.source())
        .name("orders")
        .min_token_age(Duration::ZERO)
        .build();
    let service = AuthRefreshLayer::new(handle.clone())
        .max_replay_bytes(16)
        .layer(client());

    // No token yet: the first request waits for it.
    let response = service
        .clone()
        .oneshot(get(&upstream.url("/a")))
        .await
        .unwrap();
    assert_eq!(body_text(response).await, "ok tok-1 ");
    // Revoked: a refresh and one retry.
    upstream.revoke_all();
    let response = service
        .clone()
        .oneshot(get(&upstream.url("/b")))
        .await
        .unwrap();
    assert_eq!(body_text(response).await, "ok tok-2 ");
    // Revoked again, with a body over the replay cap: not retried.
    upstream.revoke_all();
    let big = post(&upstream.url("/c"), vec![b'x'; 64]);
    let response = service.clone().oneshot(big).await.unwrap();
    assert_eq!(response.status(), 401);
    // The refresh it started goes on for the requests that follow.
    let refreshed = handle.valid_token().await.unwrap();
    assert_eq!(refreshed.access_token().expose_secret(), "tok-3");
    // A token past its expiry: the request waits for the refresh.
    handle
        .set_token(Token::bearer("old").with_expires_at(SystemTime::now() - Duration::from_secs(1)))
        .unwrap();
    let response = service
        .clone()
        .oneshot(get(&upstream.url("/d")))
        .await
        .unwrap();
    assert_eq!(body_text(response).await, "ok tok-4 ");

    let reported = drain(snapshotter);
    let token = ("token", "orders");
    let refreshes = "auth_refresh.refreshes";
    let success = ("outcome", "success");
    assert_eq!(
        counter(
            &reported,
            refreshes,
            &[token, ("reason", "initial"), success]
        ),
        1
    );
    assert_eq!(
        counter(
            &reported,
            refreshes,
            &[token, ("reason", "rejected"), success]
        ),
        2
    );
    assert_eq!(
        counter(
            &reported,
            refreshes,
            &[token, ("reason", "expired"), success]
        ),
        1
    );
    assert_eq!(counter(&reported, "auth_refresh.retries", &[token]), 1);
    let skipped = [token, ("reason", "body_too_large")];
    assert_eq!(
        counter(&reported, "auth_refresh.retries.skipped", &skipped),
        1
    );
    let first = [token, ("cause", "first_token")];
    assert_eq!(counter(&reported, "auth_refresh.waits", &first), 1);
    let expired = [token, ("cause", "expired")];
    assert_eq!(counter(&reported, "auth_refresh.waits", &expired), 1);

    let duration = series(
        &reported,
        "auth_refresh.refresh.duration",
        &[token, ("reason", "rejected"), success],
    );
    assert_eq!(duration.unit, Some(Unit::Seconds));
    match &duration.value {
        DebugValue::Histogram(values) => assert_eq!(values.len(), 2),
        other => panic!("not a histogram: {other:?}"),
    }
    let expires_in = series(&reported, "auth_refresh.token.expires_in", &[token]);
    assert_eq!(expires_in.unit, Some(Unit::Seconds));
    match expires_in.value {
        DebugValue::Gauge(left) => assert!(
            (3500.0..=3600.0).contains(&left.into_inner()),
            "tok-4 has about an hour left: {left}"
        ),
        ref other => panic!("not a gauge: {other:?}"),
    }

    // The handle's own counters say the same.
    let stats = handle.stats();
    assert_eq!(
        (stats.refreshes, stats.retries, stats.skipped_retries),
        (4, 1, 1)
    );
    assert_eq!((stats.waited_first_token, stats.waited), (1, 1));
    assert_eq!(
        issuer.reasons.lock().unwrap().len(),
        4,
        "one token-source call per refresh reported"
    );
}

#[tokio::test]
async fn failed_and_refused_refreshes_have_their_outcome() {
    let _alone = RECORDING.lock().await;
    let snapshotter = snapshotter();

    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let handle = TokenHandle::builder(token_source_fn(move |_cx: RefreshContext| {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            match n {
                0 => Err::<Token, BoxError>("token endpoint down".into()),
                _ => {
                    Err(Box::new(ReauthorizationRequired::new("refresh token revoked")) as BoxError)
                }
            }
        }
    }))
    .name("billing")
    .build();

    assert!(handle.refresh_now().await.is_err());
    let err = handle.refresh_now().await.unwrap_err();
    assert!(err.downcast_ref::<ReauthorizationRequired>().is_some());

    let reported = drain(snapshotter);
    let manual = [("token", "billing"), ("reason", "manual")];
    let with = |outcome| [manual[0], manual[1], ("outcome", outcome)];
    assert_eq!(
        counter(&reported, "auth_refresh.refreshes", &with("failure")),
        1
    );
    assert_eq!(
        counter(
            &reported,
            "auth_refresh.refreshes",
            &with("reauthorization_required")
        ),
        1
    );
    assert_eq!(handle.stats().failures, 2);
}

#[tokio::test]
async fn stats_differences_count_what_happened_between_two_snapshots() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream).lifetime(Duration::from_secs(3600));
    let handle = TokenHandle::builder(issuer.source())
        .min_token_age(Duration::ZERO)
        .build();
    let service = AuthRefreshLayer::new(handle.clone()).layer(client());

    service
        .clone()
        .oneshot(get(&upstream.url("/a")))
        .await
        .unwrap();
    let before = handle.stats();
    assert_eq!((before.waited_first_token, before.waited), (1, 0));

    upstream.revoke_all();
    service
        .clone()
        .oneshot(get(&upstream.url("/b")))
        .await
        .unwrap();
    let after = handle.stats();

    let between = after.since(&before);
    assert_eq!((between.refreshes, between.retries), (1, 1));
    assert_eq!((between.waited_first_token, between.waited), (0, 0));
    assert_eq!(after - before, between);
    assert_eq!(before.since(&after).refreshes, 0, "saturates, never wraps");
}
