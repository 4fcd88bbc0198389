//! The fleet's promise under faults: a rotated refresh token is presented
//! by one process, once, whatever goes wrong.
//!
//! Worker processes (`examples/fleet_worker.rs`) share one token through a
//! store and send steady traffic (a request every 50 ms each) through a
//! `TokenRegistry` that flushes the tenant's usage every 300 ms, against a
//! strict token server (`fleet_support/strict.rs`): refresh tokens rotate,
//! a second use of a spent one revokes the whole family, a new access token
//! revokes the one it replaces. Tokens live 2 s. The test injects, one
//! after another, the faults of a real fleet and asserts:
//!
//! - refresh-token reuse = 0 and family revocations = 0;
//! - every request succeeds, or fails with a documented typed error
//!   (`StoreUnreachable`, `RefreshFailed`, `RefreshTimedOut`) inside a
//!   declared fault window (the fault's duration plus a recovery grace of
//!   two token lifetimes, the longest back-off (1 s) and a second);
//! - token-endpoint calls: at most one per usable token lifetime, plus one
//!   per injected fault.
//!
//! The workers run with `--unreachable fail`: a process that cannot reach
//! the store fails the refresh with `StoreUnreachable` (inside the fault
//! window) instead of logging in on its own, so the call count stays one
//! per lifetime. The default policy (log in without the refresh token) is
//! covered by `tests/fleet_races.rs`.
//!
//! Run: `cargo test --all-features --test fleet_chaos -- --nocapture`
//! (the figures are printed).

mod fleet_support;

use std::time::Duration;

use fleet_support::{Done, StrictServer, TempDir, Worker, unix_ms, wait_for};

const LIFETIME: Duration = Duration::from_secs(2);
/// Workers refresh when less than this is left (`min_validity`).
const MARGIN: Duration = Duration::from_millis(200);
const WAIT: Duration = Duration::from_secs(60);
/// After a fault ends, failures are still its own for this long: two token
/// lifetimes, the longest back-off of a worker (1 s) and a second.
const GRACE: Duration = Duration::from_millis(2 * 2000 + 1000 + 1000);
const DOCUMENTED: [&str; 3] = ["store_unreachable", "refresh_failed", "refresh_timed_out"];

/// One fleet at a time: each is several processes on a small machine.
static ONE_FLEET: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WORKER_ARGS: [&str; 14] = [
    "--lease-ms",
    "2000",
    "--unreachable",
    "fail",
    "--flush-ms",
    "300",
    "--no-refresh-ahead",
    "--min-token-age-ms",
    "0",
    "--interval-ms",
    "50",
    "--backoff-max-ms",
    "1000",
    "--key",
];

#[derive(Debug)]
struct Fault {
    name: &'static str,
    start: u128,
    end: u128,
}

struct Chaos {
    server: StrictServer,
    faults: Vec<Fault>,
    started: u128,
}

impl Chaos {
    async fn start() -> Self {
        tokio::task::spawn_blocking(fleet_support::worker_binary)
            .await
            .expect("worker built");
        Self {
            server: StrictServer::start(LIFETIME).await,
            faults: Vec::new(),
            started: unix_ms(),
        }
    }

    fn workers(&self, n: usize, store: &str) -> Vec<Worker> {
        let mut args: Vec<&str> = WORKER_ARGS.to_vec();
        args.push("fleet");
        (0..n)
            .map(|_| {
                Worker::start_on(
                    &self.server.token_url(),
                    &self.server.upstream_url(),
                    store,
                    &args,
                )
            })
            .collect()
    }

    /// Waits until the fleet moved on by `tokens` refreshes.
    async fn advance(&self, tokens: u64, what: &str) {
        let from = self.server.serial();
        wait_for(WAIT, what, || self.server.serial() >= from + tokens).await;
    }

    /// Runs `inject` as a declared fault window, then waits for the fleet
    /// to move on by two tokens.
    async fn fault<F: Future<Output = ()>>(&mut self, name: &'static str, inject: F) {
        let start = unix_ms();
        inject.await;
        let end = unix_ms();
        eprintln!("chaos: {name} for {} ms", end - start);
        self.faults.push(Fault { name, start, end });
        self.advance(2, &format!("the fleet to refresh twice after {name}"))
            .await;
    }

    /// Asserts the promise and prints the figures.
    fn check(&self, done: &[Done]) {
        let counts = self.server.counts();
        let ended = unix_ms();
        let mut in_windows = 0usize;
        let mut per_window = vec![0usize; self.faults.len()];
        let mut outside = Vec::new();
        for d in done {
            assert!(d.ok > 0, "worker {} made no request: {d:?}", d.pid);
            // Windows may overlap: a failure counts for the latest fault.
            for (at, kind) in &d.failures {
                let window = self
                    .faults
                    .iter()
                    .rposition(|f| *at >= f.start && *at <= f.end + GRACE.as_millis());
                match window {
                    Some(i) if DOCUMENTED.contains(&kind.as_str()) => {
                        in_windows += 1;
                        per_window[i] += 1;
                    }
                    _ => outside.push((
                        d.pid,
                        *at,
                        kind.clone(),
                        window.map(|i| self.faults[i].name),
                    )),
                }
            }
        }
        let ok: u64 = done.iter().map(|d| d.ok).sum();
        let calls = self.server.calls();
        let duration = ended - self.started;
        let usable = (LIFETIME - MARGIN).as_millis();
        let lifetimes = duration.div_ceil(usable) as usize;
        let early = calls
            .windows(2)
            .filter(|pair| pair[1] - pair[0] < LIFETIME.as_millis() / 2)
            .count();
        eprintln!(
            "chaos figures: {} processes, {:.1} s, {} faults {:?}\n  \
             requests ok {ok}, failed {in_windows} (all inside fault windows, typed)\n  \
             refresh-token reuse {}, family revocations {}, refused {}\n  \
             token-endpoint calls {} ({} logins, {} refreshes, {} answered 502 after rotating) \
             over {lifetimes} usable token lifetimes of {usable} ms: {:.2} per lifetime; \
             calls less than half a lifetime after the previous one: {early}",
            done.len(),
            duration as f64 / 1000.0,
            self.faults.len(),
            self.faults.iter().map(|f| f.name).collect::<Vec<_>>(),
            counts.reused,
            counts.family_revocations,
            counts.refused,
            calls.len(),
            counts.logins,
            counts.refreshes,
            counts.failed_after_rotation,
            calls.len() as f64 / lifetimes as f64,
        );
        for (fault, failed) in self.faults.iter().zip(&per_window) {
            eprintln!(
                "  window {}: {} .. {} ms (+{} ms grace): {failed} requests failed",
                fault.name,
                fault.start - self.started,
                fault.end - self.started,
                GRACE.as_millis()
            );
        }

        assert_eq!(
            counts.reused, 0,
            "a spent refresh token was presented: {counts:?}"
        );
        assert_eq!(counts.family_revocations, 0, "{counts:?}");
        assert_eq!(counts.refused, 0, "{counts:?}");
        assert!(
            outside.is_empty(),
            "failures outside a fault window or untyped (pid, unix ms, kind, window): {outside:?}; \
             windows {:?}",
            self.faults
        );
        assert!(
            early <= self.faults.len(),
            "{early} token calls came early; allowed one per fault ({}): {calls:?}",
            self.faults.len()
        );
        assert!(
            calls.len() <= lifetimes + self.faults.len(),
            "{} token calls over {lifetimes} lifetimes and {} faults",
            calls.len(),
            self.faults.len()
        );
    }
}

async fn stop_all(workers: Vec<Worker>) -> Vec<Done> {
    tokio::task::spawn_blocking(move || workers.into_iter().map(Worker::stop).collect())
        .await
        .expect("workers stopped")
}

/// Stops the worker whose refresh the server holds (SIGSTOP) for longer
/// than the lease's time to live, then resumes it.
async fn stall_the_lease_holder(server: &StrictServer, workers: &[Worker]) {
    // Held long enough for this test to stop the process first, even on a
    // loaded machine; decided (rotated) while the process is stopped.
    server.hold_next_refresh(Duration::from_millis(1500));
    wait_for(WAIT, "a refresh to be held", || server.held_by().is_some()).await;
    let holder = server.held_by().unwrap();
    let worker = workers
        .iter()
        .find(|w| w.pid() == holder)
        .expect("the holder is one of ours");
    worker.pause();
    // The lease (2 s) expires; another process takes it over.
    tokio::time::sleep(Duration::from_millis(4000)).await;
    worker.resume();
}

/// The next refresh rotates at the server, whose gateway then answers 502.
async fn bad_gateway_after_rotation(server: &StrictServer) {
    let before = server.counts().failed_after_rotation;
    server.fail_next_refresh_after_rotation();
    wait_for(WAIT, "a refresh answered 502", || {
        server.counts().failed_after_rotation > before
    })
    .await;
}

#[cfg(feature = "redis")]
mod redis_chaos {
    use super::*;
    use fleet_support::RedisServer;

    async fn redis_cmd<T: redis::FromRedisValue>(url: &str, cmd: &mut redis::Cmd) -> T {
        let client = redis::Client::open(url).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        cmd.query_async(&mut connection).await.unwrap()
    }

    /// What a newer release does: saves the entry again (version + 1) with
    /// a field this release does not know.
    const REWRITE: &str = r"
local token = redis.call('HGET', KEYS[1], 'token')
if not token then return 0 end
local parsed = cjson.decode(token)
parsed['added_by_a_newer_release'] = {proof_key = 'jkt-1'}
local version = tonumber(redis.call('HGET', KEYS[1], 'version')) + 1
redis.call('HSET', KEYS[1], 'token', cjson.encode(parsed), 'version', version)
return version
";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn eight_processes_under_faults_never_present_a_spent_refresh_token() {
        let _one = ONE_FLEET.lock().await;
        let mut redis = RedisServer::start();
        let mut chaos = Chaos::start().await;
        let workers = chaos.workers(8, &redis.url());
        chaos.advance(3, "the fleet to warm up").await;

        let url = redis.url();
        chaos
            .fault("CLIENT PAUSE 2500 ms (store timeout 1 s)", async {
                let _: () =
                    redis_cmd(&url, redis::cmd("CLIENT").arg("PAUSE").arg(2500).arg("ALL")).await;
                tokio::time::sleep(Duration::from_millis(2500)).await;
            })
            .await;

        let server = chaos.server.clone();
        chaos
            .fault(
                "lease holder stopped past the lease TTL",
                stall_the_lease_holder(&server, &workers),
            )
            .await;

        chaos
            .fault("redis restarted, data lost", async {
                redis.stop();
                tokio::time::sleep(Duration::from_millis(500)).await;
                tokio::task::block_in_place(|| redis.restart());
            })
            .await;

        chaos
            .fault("502 after rotation", bad_gateway_after_rotation(&server))
            .await;

        let url = redis.url();
        chaos
            .fault("entry rewritten by a newer release", async {
                let version: i64 = redis_cmd(
                    &url,
                    redis::cmd("EVAL")
                        .arg(REWRITE)
                        .arg(1)
                        .arg("fleet:token:fleet"),
                )
                .await;
                assert!(version > 0, "there was an entry to rewrite");
            })
            .await;

        chaos.advance(2, "the fleet to go on").await;
        let done = stop_all(workers).await;
        let aside: Vec<String> =
            redis_cmd(&redis.url(), redis::cmd("KEYS").arg("fleet:corrupt:*")).await;
        assert!(aside.is_empty(), "nothing was put aside: {aside:?}");
        chaos.check(&done);
    }
}

/// What a newer release does to a `FileStore` entry: saves it again
/// (version + 1) with a field this release does not know.
fn rewrite_file_entry(dir: &std::path::Path) {
    let path = dir.join("fleet.json");
    let mut entry: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("an entry")).unwrap();
    entry["token"]["added_by_a_newer_release"] = serde_json::json!({"proof_key": "jkt-1"});
    entry["version"] = (entry["version"].as_u64().unwrap() + 1).into();
    let temp = dir.join(".rewrite.tmp");
    std::fs::write(&temp, serde_json::to_vec(&entry).unwrap()).unwrap();
    std::fs::rename(&temp, &path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_on_one_directory_under_faults_never_present_a_spent_refresh_token() {
    let _one = ONE_FLEET.lock().await;
    let dir = TempDir::new("fleet-chaos");
    let mut chaos = Chaos::start().await;
    let workers = chaos.workers(4, &format!("file:{}", dir.path().display()));
    chaos.advance(3, "the fleet to warm up").await;

    let server = chaos.server.clone();
    chaos
        .fault(
            "lease holder stopped past the lease TTL",
            stall_the_lease_holder(&server, &workers),
        )
        .await;
    chaos
        .fault("502 after rotation", bad_gateway_after_rotation(&server))
        .await;
    chaos
        .fault("entry rewritten by a newer release", async {
            rewrite_file_entry(dir.path());
        })
        .await;

    chaos.advance(2, "the fleet to go on").await;
    let done = stop_all(workers).await;
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains("corrupt"))
        .collect();
    assert!(aside.is_empty(), "nothing was put aside: {aside:?}");
    chaos.check(&done);
}
