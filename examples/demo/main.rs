//! The main demo: an embedded token endpoint issuing 2-second tokens, an
//! embedded upstream API that rejects expired tokens in two ways (401 on
//! `/v1/*`, HTTP 200 `{"code":40003,"msg":"token过期"}` on `/v2/*`), and
//! 1,000 requests from 100 tasks through `AuthRefreshLayer` over a
//! hyper-util client.
//!
//! ```text
//! cargo run --example demo
//! ```
//!
//! The token endpoint does not say when its tokens expire, so every refresh
//! here is driven by the upstream's answers: detection, single-flight
//! refresh and replay. The last line is machine-readable:
//! `summary requests=… ok=… failed=… refreshes=… retries=… waited=… waited_first_token=…`.

mod scenario;

use scenario::{Settings, run};
use tower_auth_refresh::BoxError;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let settings = Settings::default();
    let outcome = run(
        settings,
        |at| {
            println!(
                "token endpoint  http://{}/token  (tokens live {:?}, expiry not announced)",
                at.token_endpoint, settings.token_lifetime
            );
            println!(
                "upstream API    http://{}  (/v1: 401 when expired, /v2: 200 + code 40003)",
                at.api
            );
            println!(
                "sending {} requests from {} tasks …",
                settings.tasks * settings.requests_per_task,
                settings.tasks
            );
        },
        |p| {
            println!(
                "  t={:>4.1}s  ok={:<4} token generation {}  refreshes so far {}",
                p.elapsed.as_secs_f64(),
                p.ok,
                p.generation,
                p.refreshes
            );
        },
    )
    .await?;

    let stats = outcome.stats;
    println!();
    println!("finished in {:.1} s", outcome.elapsed.as_secs_f64());
    println!("  requests answered ok      {}", outcome.ok);
    println!("  requests failed           {}", outcome.failed);
    println!(
        "  tokens issued by endpoint {}  (~{:.1} token lifetimes elapsed)",
        outcome.issued,
        outcome.elapsed.as_secs_f64() / settings.token_lifetime.as_secs_f64()
    );
    println!(
        "  refreshes by the layer    {}  (one per expiry, shared by every waiting request)",
        stats.refreshes
    );
    println!(
        "  requests replayed         {}  (rejected by 401 or code 40003, sent again with the new token)",
        stats.retries
    );
    println!(
        "  requests that waited      {} for the first token, {} for an expired token's refresh",
        stats.waited_first_token, stats.waited
    );
    println!(
        "summary requests={} ok={} failed={} refreshes={} retries={} waited={} waited_first_token={}",
        outcome.ok + outcome.failed,
        outcome.ok,
        outcome.failed,
        stats.refreshes,
        stats.retries,
        stats.waited,
        stats.waited_first_token
    );
    if outcome.failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
