//! The README's hyper-util example, runnable: `AuthRefreshLayer` over a
//! hyper-util legacy client, against an in-process token endpoint (1-second
//! tokens) and an upstream API on 127.0.0.1.
//!
//! ```text
//! cargo run --example hyper_client
//! ```
//!
//! It sends three requests and exits (status 0 when each went out with the
//! token expected):
//! 1. the first token is fetched and used;
//! 2. after the token's announced expiry, a new one is fetched before sending;
//! 3. the upstream revokes every token early: its 401 is recognised, the
//!    token is refreshed once and the request is sent again.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::{
    AuthRefreshLayer, BoxError, RefreshContext, TokenHandle, token_source_fn,
};

use support::{Authority, Rejects};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let authority = Authority::new(Duration::from_secs(1), true);
    let token_endpoint = support::token_endpoint(authority.clone()).await?;
    let api = support::upstream("api", authority.clone(), Rejects::Unauthorized).await?;

    // The token source: a POST to the token endpoint with a plain client.
    let plain = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let token_url = format!("http://{token_endpoint}/token/api");
    let handle = TokenHandle::builder(token_source_fn(move |_cx: RefreshContext| {
        let (plain, token_url) = (plain.clone(), token_url.clone());
        async move {
            let request = http::Request::post(token_url).body(Full::default())?;
            let body = plain.request(request).await?.into_body().collect().await?;
            support::parse_token(&body.to_bytes())
        }
    }))
    // Tokens here live one second, so a rejection of a token 100 ms old
    // already counts as an expiry (the default, 5 s, guards real APIs
    // against refreshing on a permanent 401).
    .min_token_age(Duration::from_millis(100))
    .build();

    // The README's client: the layer over a hyper-util legacy client.
    let client = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(Client::builder(TokioExecutor::new()).build_http());

    let get = |path: &str| {
        let request =
            http::Request::get(format!("http://{api}{path}")).body(Full::<Bytes>::default());
        let client = client.clone();
        async move {
            let response = client.oneshot(request?).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>((status, support::token_serial(&body)))
        }
    };

    let step = |name: &str, (status, serial): (http::StatusCode, Option<u64>), want: u64| {
        println!(
            "{name:<40} -> {status}, sent with token #{}",
            serial.unwrap_or(0)
        );
        if status != 200 || serial != Some(want) {
            return Err(BoxError::from(format!(
                "{name}: expected 200 with token #{want}"
            )));
        }
        Ok(())
    };

    step("first request", get("/orders").await?, 1)?;

    tokio::time::sleep(Duration::from_millis(1100)).await;
    step("after the token expired", get("/orders").await?, 2)?;

    tokio::time::sleep(Duration::from_millis(200)).await;
    authority.revoke_all();
    step(
        "after the upstream revoked it (401)",
        get("/orders").await?,
        3,
    )?;

    let stats = handle.stats();
    let status = handle.status();
    println!(
        "token generation {}, valid {}, refreshes {}, retries {}",
        status.generation, status.valid, stats.refreshes, stats.retries
    );
    if stats.refreshes != 3 || stats.retries != 1 || authority.issued() != 3 {
        return Err("expected 3 tokens fetched and 1 retry".into());
    }
    Ok(())
}
