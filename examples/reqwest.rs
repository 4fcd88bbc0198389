//! `AuthRefreshMiddleware` in a reqwest-middleware client, against an
//! in-process token endpoint (1-second tokens) and an upstream API on
//! 127.0.0.1.
//!
//! ```text
//! cargo run --features reqwest --example reqwest
//! ```
//!
//! It runs four steps and exits (status 0 when each went as expected):
//! 1. the first token is fetched and used;
//! 2. after the token's announced expiry, a new one is fetched before sending;
//! 3. the upstream revokes every token early: a JSON POST gets a 401, the
//!    token is refreshed once and the POST is sent again with the same body;
//! 4. the same with a streaming body, which cannot be cloned: it is sent once,
//!    its 401 comes back with a `RetrySkipped` marker, and the next request
//!    uses the token refreshed meanwhile.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::StreamBody;
use reqwest_middleware::ClientBuilder;
use tower_auth_refresh::{
    AuthRefreshMiddleware, BoxError, RefreshContext, RetrySkipped, SkipReason, TokenHandle,
    token_source_fn,
};

use support::{Authority, Rejects};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let authority = Authority::new(Duration::from_secs(1), true);
    let token_endpoint = support::token_endpoint(authority.clone()).await?;
    let api = support::upstream("api", authority.clone(), Rejects::Unauthorized).await?;

    // The token source: a POST to the token endpoint with a plain reqwest client.
    let plain = reqwest::Client::new();
    let token_url = format!("http://{token_endpoint}/token/api");
    let handle = TokenHandle::builder(token_source_fn(move |_cx: RefreshContext| {
        let request = plain.post(&token_url);
        async move {
            let body = request.send().await?.error_for_status()?.bytes().await?;
            support::parse_token(&body)
        }
    }))
    // Tokens here live one second, so a rejection of a token 100 ms old
    // already counts as an expiry.
    .min_token_age(Duration::from_millis(100))
    .build();

    let client = ClientBuilder::new(reqwest::Client::new())
        .with(AuthRefreshMiddleware::new(handle.clone()))
        .build();
    let url = format!("http://{api}/orders");

    let step = |name: &str, (status, serial, _): Outcome, want: u64| {
        println!(
            "{name:<44} -> {status}, sent with token #{}",
            serial.unwrap_or(0)
        );
        if status != 200 || serial != Some(want) {
            return Err(BoxError::from(format!(
                "{name}: expected 200 with token #{want}"
            )));
        }
        Ok(())
    };

    step("first request", send(client.get(&url)).await?, 1)?;

    tokio::time::sleep(Duration::from_millis(1100)).await;
    step("after the token expired", send(client.get(&url)).await?, 2)?;

    tokio::time::sleep(Duration::from_millis(200)).await;
    authority.revoke_all();
    let post = client
        .post(&url)
        .header("content-type", "application/json")
        .body(r#"{"item":"tea","quantity":2}"#);
    step(
        "POST after the upstream revoked it (401)",
        send(post).await?,
        3,
    )?;

    tokio::time::sleep(Duration::from_millis(200)).await;
    authority.revoke_all();
    let chunks = ["{\"item\":", "\"coffee\"}"]
        .map(|chunk| Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(chunk.as_bytes()))));
    let stream = reqwest::Body::wrap(StreamBody::new(futures::stream::iter(chunks)));
    let (status, _, skipped) = send(client.post(&url).body(stream)).await?;
    println!(
        "{:<44} -> {status}, not retried: {skipped:?}",
        "streaming POST after a revocation"
    );
    if status != 401 || skipped != Some(SkipReason::BodyNotCloneable) {
        return Err("a streaming body must be sent once and never retried".into());
    }
    step("next request", send(client.get(&url)).await?, 4)?;

    let stats = handle.stats();
    println!(
        "token generation {}, refreshes {}, retries {}, skipped retries {}",
        handle.status().generation,
        stats.refreshes,
        stats.retries,
        stats.skipped_retries
    );
    if stats.refreshes != 4 || stats.retries != 1 || stats.skipped_retries != 1 {
        return Err("expected 4 tokens fetched, 1 retry and 1 skipped retry".into());
    }
    Ok(())
}

/// Status, token serial and retry marker of a response.
type Outcome = (reqwest::StatusCode, Option<u64>, Option<SkipReason>);

async fn send(request: reqwest_middleware::RequestBuilder) -> Result<Outcome, BoxError> {
    let response = request.send().await?;
    let status = response.status();
    let skipped = response
        .extensions()
        .get::<RetrySkipped>()
        .map(|m| m.reason);
    let body = response.bytes().await?;
    Ok((status, support::token_serial(&body), skipped))
}
