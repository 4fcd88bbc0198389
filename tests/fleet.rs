//! Fleets of separate OS processes (`examples/fleet_worker.rs`) sharing one
//! token through a store, against one token server that rotates refresh
//! tokens (each works once) and one upstream that checks tokens.
//!
//! Tokens live 4 s; a worker refreshes about half-way (its refresh-ahead is
//! capped at half the lifetime). "One refresh per expiry" is asserted as
//! exact counts: 1 password grant to start, then exactly one refresh grant
//! per token the fleet moves to.

mod fleet_support;

use std::time::Duration;

use fleet_support::{Done, TempDir, TokenServer, Worker, all_on, wait_for};

const LIFETIME: Duration = Duration::from_secs(4);
const WAIT: Duration = Duration::from_secs(60);

/// One fleet at a time: each is up to 8 processes on a small machine.
static ONE_FLEET: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn worker_binary() {
    tokio::task::spawn_blocking(fleet_support::worker_binary)
        .await
        .expect("worker built");
}

async fn stop_all(workers: Vec<Worker>) -> Vec<Done> {
    tokio::task::spawn_blocking(move || workers.into_iter().map(Worker::stop).collect())
        .await
        .expect("workers stopped")
}

fn assert_served(done: &[Done]) {
    for d in done {
        assert!(d.ok > 0, "worker {} made no request: {d:?}", d.pid);
        assert_eq!(d.failed, 0, "worker {} had failed requests: {d:?}", d.pid);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_directory_refresh_once_per_expiry() {
    let _one = ONE_FLEET.lock().await;
    worker_binary().await;
    let server = TokenServer::start(LIFETIME).await;
    let dir = TempDir::new("fleet-file");
    let store = format!("file:{}", dir.path().display());
    let workers: Vec<Worker> = (0..2)
        .map(|_| Worker::start(&server, &store, &["--key", "shared"]))
        .collect();

    // Token 1 by password grant, then 3 rotations.
    wait_for(WAIT, "token 4 to be issued", || server.serial() >= 4).await;
    all_on(&workers, 4, WAIT).await;
    let done = stop_all(workers).await;
    let counts = server.counts();
    eprintln!("file fleet (2 processes, 3 token lifetimes): {counts:?}; workers: {done:?}");

    assert_eq!(counts.logins, 1, "{counts:?}");
    assert_eq!(counts.refreshes, 3, "one refresh per expiry: {counts:?}");
    assert_eq!(
        counts.reused, 0,
        "a refresh token was presented twice: {counts:?}"
    );
    assert_eq!(counts.unknown, 0, "{counts:?}");
    assert_eq!(counts.rejected, 0, "{counts:?}");
    assert_served(&done);
    let fetched: u64 = done.iter().map(|d| d.refreshes).sum();
    assert_eq!(fetched, 4, "tokens fetched by the two processes together");
}

#[cfg(feature = "redis")]
mod redis_fleet {
    use super::*;
    use fleet_support::RedisServer;
    use secrecy::ExposeSecret;
    use tower_auth_refresh::{RedisStore, TokenStore};

    fn start_fleet(server: &TokenServer, redis: &RedisServer, n: usize) -> Vec<Worker> {
        (0..n)
            .map(|_| Worker::start(server, &redis.url(), &["--lease-ms", "2000"]))
            .collect()
    }

    async fn stored_serial(redis: &RedisServer) -> (String, u64) {
        let store = RedisStore::builder(redis.url())
            .prefix("fleet:")
            .build()
            .unwrap();
        let stored = store.load("fleet").await.unwrap().expect("a stored token");
        let serial = stored.token.metadata()["serial"].clone();
        (serial, stored.version)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn eight_processes_refresh_once_per_lifetime_over_five_lifetimes() {
        let _one = ONE_FLEET.lock().await;
        worker_binary().await;
        let redis = RedisServer::start();
        let server = TokenServer::start(LIFETIME).await;
        let workers = start_fleet(&server, &redis, 8);

        // Token 1 by password grant, then 5 lifetimes: tokens 2 ..= 6.
        wait_for(WAIT, "token 6 to be issued", || server.serial() >= 6).await;
        all_on(&workers, 6, WAIT).await;
        let done = stop_all(workers).await;
        let counts = server.counts();
        eprintln!("redis fleet (8 processes, 5 token lifetimes): {counts:?}");
        for d in &done {
            eprintln!("  worker {d:?}");
        }

        assert_eq!(counts.logins, 1, "{counts:?}");
        assert_eq!(counts.refreshes, 5, "one refresh per lifetime: {counts:?}");
        assert_eq!(
            counts.reused, 0,
            "a refresh token was presented twice: {counts:?}"
        );
        assert_eq!(counts.unknown, 0, "{counts:?}");
        assert_eq!(counts.rejected, 0, "{counts:?}");
        assert_served(&done);
        let fetched: u64 = done.iter().map(|d| d.refreshes).sum();
        assert_eq!(fetched, 6, "tokens fetched by the whole fleet");
        let (serial, version) = stored_serial(&redis).await;
        // Token 1 saved as version 1; each refresh marks the entry before
        // presenting its refresh token, then saves the new token.
        assert_eq!((serial.as_str(), version), ("6", 11));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lease_holder_killed_mid_refresh_is_taken_over_after_the_lease_ttl() {
        let _one = ONE_FLEET.lock().await;
        worker_binary().await;
        let redis = RedisServer::start();
        let server = TokenServer::start(LIFETIME).await;
        // The first refresh (token 1 → 2) hangs at the token server.
        server.hold_next_refresh(Duration::from_secs(30));
        let mut workers = start_fleet(&server, &redis, 8);

        wait_for(WAIT, "a refresh to be held", || server.held_by().is_some()).await;
        let holder = server.held_by().unwrap();
        let at = workers
            .iter()
            .position(|w| w.pid() == holder)
            .expect("the holder is one of ours");
        let mut killed = workers.remove(at);
        killed.kill();

        // The others wait out the 2 s lease and take it over. The stored
        // entry says a refresh with rt-1 started and never finished: whether
        // the server rotated rt-1 cannot be known, so nobody presents it
        // again; the new holder logs in (a grant that does not rotate), and
        // the fleet goes on from there.
        wait_for(WAIT, "token 3 to be issued", || server.serial() >= 3).await;
        all_on(&workers, 3, WAIT).await;
        let done = stop_all(workers).await;
        let counts = server.counts();
        eprintln!("lease holder killed: {counts:?}");

        assert_eq!(
            counts.held_abandoned, 1,
            "the killed process's refresh never completed: {counts:?}"
        );
        assert_eq!(counts.logins, 2, "{counts:?}");
        assert_eq!(counts.refreshes, 1, "{counts:?}");
        assert_eq!(
            counts.reused, 0,
            "a refresh token was presented twice: {counts:?}"
        );
        assert_eq!(counts.unknown, 0, "{counts:?}");
        assert_eq!(counts.rejected, 0, "{counts:?}");
        assert_served(&done);
        // The chain is intact: the newest refresh token is stored and unused.
        let (latest, unused) = server.latest_refresh_token().unwrap();
        assert!(unused);
        let store = RedisStore::builder(redis.url())
            .prefix("fleet:")
            .build()
            .unwrap();
        let stored = store.load("fleet").await.unwrap().unwrap();
        assert_eq!(
            stored.token.refresh_token().unwrap().expose_secret(),
            latest.as_str()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_stopped_mid_run_requests_go_on_and_the_fleet_converges_when_it_returns() {
        let _one = ONE_FLEET.lock().await;
        worker_binary().await;
        let mut redis = RedisServer::start();
        let server = TokenServer::start(LIFETIME).await;
        let workers = start_fleet(&server, &redis, 8);
        wait_for(WAIT, "token 2 to be issued", || server.serial() >= 2).await;
        all_on(&workers, 2, WAIT).await;

        // Redis goes away for about one and a half lifetimes: every worker
        // refreshes on its own.
        let redis_at_stop = server.counts();
        redis.stop();
        let serial_at_stop = server.serial();
        wait_for(WAIT, "every worker to refresh without the store", || {
            workers.iter().all(|w| {
                w.serial()
                    .and_then(|s| s.parse::<u64>().ok())
                    .is_some_and(|s| s > serial_at_stop)
            })
        })
        .await;
        let during = server.counts();

        // Redis returns, empty, half-way to the next refresh. The next expiry
        // goes through the lease again: one token for the whole fleet.
        tokio::time::sleep(LIFETIME / 4).await;
        redis.restart();
        let serial_at_restart = server.serial();
        wait_for(WAIT, "the fleet to converge on one new token", || {
            let serials: Vec<Option<String>> = workers.iter().map(Worker::serial).collect();
            let first = serials[0].clone();
            first
                .as_deref()
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|s| s > serial_at_restart)
                && serials.iter().all(|s| *s == first)
        })
        .await;
        let converged = workers[0].serial().unwrap();
        let done = stop_all(workers).await;
        let counts = server.counts();
        let issued_after_restart =
            counts.logins + counts.refreshes - (during.logins + during.refreshes);
        eprintln!(
            "redis stopped: before {redis_at_stop:?}; while down {during:?}; end {counts:?}; \
             tokens issued after redis returned: {issued_after_restart}"
        );

        assert_served(&done);
        assert_eq!(counts.rejected, 0, "{counts:?}");
        assert!(done.iter().all(|d| d.serial == converged), "{done:?}");
        let (serial, _) = stored_serial(&redis).await;
        assert_eq!(
            serial, converged,
            "the store holds the token the fleet uses"
        );
        assert_eq!(
            issued_after_restart, 1,
            "once redis is back, one refresh for the whole fleet"
        );
    }
}
