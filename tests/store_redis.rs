//! RedisStore against a real `redis-server` started by the test: versioned
//! saves, leases, key listing, corrupt entries, and an unreachable Redis.
#![cfg(feature = "redis")]

mod fleet_support;

use std::time::Duration;

use fleet_support::RedisServer;
use secrecy::ExposeSecret;
use tower_auth_refresh::{RedisStore, StoreError, Token, TokenStore};

fn store(redis: &RedisServer, prefix: &str) -> RedisStore {
    RedisStore::builder(redis.url())
        .prefix(prefix)
        .timeouts(Duration::from_millis(500), Duration::from_millis(500))
        .build()
        .unwrap()
}

fn token(name: &str) -> Token {
    Token::bearer(name)
        .with_expires_in(Duration::from_secs(600))
        .with_refresh_token(format!("{name}-refresh"))
}

/// A raw command on a second connection, to look behind the store's back.
async fn raw<T: redis::FromRedisValue>(redis: &RedisServer, cmd: &mut redis::Cmd) -> T {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    cmd.query_async(&mut connection).await.unwrap()
}

#[tokio::test]
async fn saves_are_compare_and_swap_on_the_version() {
    let redis = RedisServer::start();
    let store = store(&redis, "cas:");
    assert!(store.load("k").await.unwrap().is_none());
    assert_eq!(store.save("k", &token("a"), Some(0)).await.unwrap(), 1);
    let conflict = store.save("k", &token("b"), Some(0)).await;
    assert!(
        matches!(
            conflict,
            Err(StoreError::Conflict {
                expected: Some(0),
                found: Some(1),
                ..
            })
        ),
        "{conflict:?}"
    );
    assert_eq!(store.save("k", &token("c"), Some(1)).await.unwrap(), 2);
    assert_eq!(store.save("k", &token("d"), None).await.unwrap(), 3);
    let stored = store.load("k").await.unwrap().unwrap();
    assert_eq!(stored.version, 3);
    assert_eq!(
        stored.token,
        token("d").with_expires_at(stored.token.expires_at().unwrap())
    );
    assert_eq!(stored.token.access_token().expose_secret(), "d");

    // Deletes compare too, and never remove a newer token.
    assert!(matches!(
        store.delete("k", Some(2)).await,
        Err(StoreError::Conflict { found: Some(3), .. })
    ));
    assert!(store.load("k").await.unwrap().is_some());
    assert!(store.delete("k", Some(3)).await.unwrap());
    assert!(!store.delete("k", None).await.unwrap());
    assert!(store.load("k").await.unwrap().is_none());
}

#[tokio::test]
async fn stored_tokens_carry_a_ttl_from_their_expiry() {
    let redis = RedisServer::start();
    let store = store(&redis, "ttl:");
    let short = Token::bearer("a").with_expires_in(Duration::from_secs(30));
    store.save("short", &short, None).await.unwrap();
    let ttl: i64 = raw(&redis, redis::cmd("PTTL").arg("ttl:token:short")).await;
    // Until the expiry plus a minute.
    assert!((60_000..=90_000).contains(&ttl), "{ttl}");
    store
        .save("forever", &Token::bearer("b"), None)
        .await
        .unwrap();
    let ttl: i64 = raw(&redis, redis::cmd("PTTL").arg("ttl:token:forever")).await;
    assert_eq!(ttl, -1, "no expiry known: kept until deleted");
    // A refresh token whose expiry the server did not say (Google,
    // Microsoft, Auth0): the grant stays, even when the tenant is idle.
    let refreshable = Token::bearer("c")
        .with_expires_in(Duration::from_secs(30))
        .with_refresh_token("r");
    store.save("idle", &refreshable, None).await.unwrap();
    let ttl: i64 = raw(&redis, redis::cmd("PTTL").arg("ttl:token:idle")).await;
    assert_eq!(ttl, -1);
    // A save that gives a time to live again after none, and back.
    store.save("idle", &short, None).await.unwrap();
    let ttl: i64 = raw(&redis, redis::cmd("PTTL").arg("ttl:token:idle")).await;
    assert!(ttl > 0, "{ttl}");
    store.save("idle", &refreshable, None).await.unwrap();
    let ttl: i64 = raw(&redis, redis::cmd("PTTL").arg("ttl:token:idle")).await;
    assert_eq!(ttl, -1);
}

#[tokio::test]
async fn a_huge_max_ttl_is_clamped_and_a_save_is_never_half_applied() {
    let redis = RedisServer::start();
    let store = RedisStore::builder(redis.url())
        .prefix("huge:")
        .max_ttl(Duration::MAX)
        .build()
        .unwrap();
    assert_eq!(store.save("k", &Token::bearer("a"), None).await.unwrap(), 1);
    let ttl: i64 = raw(&redis, redis::cmd("PTTL").arg("huge:token:k")).await;
    assert!(ttl > 0, "{ttl}");
    assert_eq!(
        store.save("k", &Token::bearer("b"), Some(1)).await.unwrap(),
        2
    );
    let stored = store.load("k").await.unwrap().unwrap();
    assert_eq!(
        (stored.version, stored.token.access_token().expose_secret()),
        (2, "b")
    );
}

#[tokio::test]
async fn a_zero_max_ttl_means_no_maximum() {
    let redis = RedisServer::start();
    let store = RedisStore::builder(redis.url())
        .prefix("zero:")
        .max_ttl(Duration::ZERO)
        .build()
        .unwrap();
    store.save("k", &token("a"), None).await.unwrap();
    let ttl: i64 = raw(&redis, redis::cmd("PTTL").arg("zero:token:k")).await;
    assert_eq!(ttl, -1, "kept until deleted, not given a ttl of 1 s");
}

#[tokio::test]
async fn an_entry_written_by_a_newer_release_is_read_and_not_put_aside() {
    let redis = RedisServer::start();
    let store = store(&redis, "newer:");
    let _: () = raw(
        &redis,
        redis::cmd("HSET")
            .arg("newer:token:k")
            .arg("version")
            .arg(7)
            .arg("token")
            .arg(r#"{"format":2,"access_token":"a","refresh_token":"r","dpop_jkt":"x"}"#),
    )
    .await;
    let stored = store.load("k").await.unwrap().expect("read");
    assert_eq!(stored.version, 7);
    assert_eq!(stored.token.refresh_token().unwrap().expose_secret(), "r");
    // Saved again by this release: the newer field is kept.
    store
        .save("k", &stored.token.clone().with_metadata("m", "1"), Some(7))
        .await
        .unwrap();
    let json: String = raw(&redis, redis::cmd("HGET").arg("newer:token:k").arg("token")).await;
    assert!(json.contains(r#""dpop_jkt":"x""#), "{json}");
    assert!(
        json.contains(r#""format":2"#),
        "the newer format is kept: {json}"
    );
    let keys: Vec<String> = raw(&redis, redis::cmd("KEYS").arg("newer:corrupt:*")).await;
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test]
async fn one_lease_at_a_time_released_only_by_its_owner() {
    let redis = RedisServer::start();
    let store = store(&redis, "lease:");
    let other = store.clone();
    let lease = store
        .try_lock("k", Duration::from_secs(30))
        .await
        .unwrap()
        .expect("free");
    assert!(!lease.is_expired());
    assert!(
        other
            .try_lock("k", Duration::from_secs(30))
            .await
            .unwrap()
            .is_none()
    );
    let owner: String = raw(&redis, redis::cmd("GET").arg("lease:lease:k")).await;
    assert_eq!(owner, lease.owner());

    // A lease whose owner value changed (it expired and another process took
    // it) is not released by the old holder.
    let _: () = raw(
        &redis,
        redis::cmd("SET")
            .arg("lease:lease:k")
            .arg("someone-else")
            .arg("PX")
            .arg(30_000),
    )
    .await;
    store.unlock(lease).await.unwrap();
    let owner: Option<String> = raw(&redis, redis::cmd("GET").arg("lease:lease:k")).await;
    assert_eq!(owner.as_deref(), Some("someone-else"));

    let _: () = raw(&redis, redis::cmd("DEL").arg("lease:lease:k")).await;
    let mine = store
        .try_lock("k", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    store.unlock(mine).await.unwrap();
    assert!(
        store
            .try_lock("k", Duration::from_secs(30))
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn a_lease_expires_after_its_ttl() {
    let redis = RedisServer::start();
    let store = store(&redis, "ttl-lease:");
    let _held = store
        .try_lock("k", Duration::from_millis(1000))
        .await
        .unwrap()
        .unwrap();
    assert!(
        store
            .try_lock("k", Duration::from_secs(5))
            .await
            .unwrap()
            .is_none()
    );
    let mut taken = None;
    for _ in 0..250 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        taken = store.try_lock("k", Duration::from_secs(5)).await.unwrap();
        if taken.is_some() {
            break;
        }
    }
    assert!(taken.is_some(), "the expired lease was taken over");
}

#[tokio::test]
async fn keys_are_listed_by_prefix() {
    let redis = RedisServer::start();
    let a = store(&redis, "app-a:");
    let b = store(&redis, "app-b:");
    let glob = store(&redis, "app-[x]*:");
    for key in ["seller-1", "seller-2", "tenant:7/eu"] {
        a.save(key, &token(key), None).await.unwrap();
    }
    b.save("other", &token("o"), None).await.unwrap();
    glob.save("g", &token("g"), None).await.unwrap();
    let _lease = a
        .try_lock("seller-1", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        a.list_keys().await.unwrap(),
        ["seller-1", "seller-2", "tenant:7/eu"]
    );
    assert_eq!(b.list_keys().await.unwrap(), ["other"]);
    assert_eq!(glob.list_keys().await.unwrap(), ["g"]);
}

#[tokio::test]
async fn a_corrupt_entry_is_reported_and_kept_aside() {
    let redis = RedisServer::start();
    let store = store(&redis, "bad:");
    let _: () = raw(
        &redis,
        redis::cmd("HSET")
            .arg("bad:token:k")
            .arg("version")
            .arg(4)
            .arg("token")
            .arg("{not json"),
    )
    .await;
    let err = store.load("k").await.unwrap_err();
    let StoreError::Corrupt {
        key,
        reason,
        kept_at,
    } = err
    else {
        panic!("{err:?}")
    };
    assert_eq!(key, "k");
    assert!(reason.contains("JSON"), "{reason}");
    let kept_at = kept_at.expect("moved aside");
    assert!(kept_at.starts_with("bad:corrupt:k:"), "{kept_at}");
    let kept: String = raw(&redis, redis::cmd("HGET").arg(&kept_at).arg("token")).await;
    assert_eq!(kept, "{not json", "the bad data is kept as it was");
    assert!(store.load("k").await.unwrap().is_none());
    assert_eq!(store.list_keys().await.unwrap(), Vec::<String>::new());

    // Not even a hash.
    let _: () = raw(&redis, redis::cmd("SET").arg("bad:token:s").arg("x")).await;
    assert!(matches!(
        store.load("s").await,
        Err(StoreError::Corrupt {
            kept_at: Some(_),
            ..
        })
    ));
    assert!(store.load("s").await.unwrap().is_none());
}

#[tokio::test]
async fn an_unreachable_redis_is_unavailable_and_is_used_again_once_back() {
    let mut redis = RedisServer::start();
    let store = store(&redis, "down:");
    store.save("k", &token("a"), None).await.unwrap();
    redis.stop();
    // Every operation answers (bounded here only so a hang fails the test).
    let bound = Duration::from_secs(10);
    let load = tokio::time::timeout(bound, store.load("k"))
        .await
        .expect("no hang");
    assert!(matches!(load, Err(StoreError::Unavailable(_))), "{load:?}");
    let save = tokio::time::timeout(bound, store.save("k", &token("b"), None))
        .await
        .expect("no hang");
    assert!(matches!(save, Err(StoreError::Unavailable(_))), "{save:?}");
    let lock = tokio::time::timeout(bound, store.try_lock("k", Duration::from_secs(1)))
        .await
        .expect("no hang");
    assert!(matches!(lock, Err(StoreError::Unavailable(_))), "{lock:?}");

    // The same port again (empty: no persistence): the very first operation
    // goes through.
    redis.restart();
    assert!(store.load("k").await.unwrap().is_none());
    assert_eq!(store.save("k", &token("c"), Some(0)).await.unwrap(), 1);
}

#[tokio::test]
async fn a_store_on_a_port_nobody_listens_on_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = RedisStore::new(&format!("redis://127.0.0.1:{port}/")).unwrap();
    let load = tokio::time::timeout(Duration::from_secs(10), store.load("k"))
        .await
        .expect("no hang");
    assert!(matches!(load, Err(StoreError::Unavailable(_))), "{load:?}");
    assert!(matches!(
        RedisStore::new("not a url"),
        Err(StoreError::Unavailable(_))
    ));
}

#[tokio::test]
async fn a_read_only_replica_after_a_failover_does_not_make_a_process_present_the_refresh_token() {
    use std::sync::{Arc, Mutex};
    use tower_auth_refresh::{RefreshContext, TokenHandle, token_source_fn};

    let redis = RedisServer::start();
    let store = store(&redis, "ro:");
    store
        .save(
            "k",
            &Token::bearer("at-1")
                .with_refresh_token("rt-1")
                .with_expires_in(Duration::from_secs(600)),
            None,
        )
        .await
        .unwrap();
    let presented = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = presented.clone();
    let source = token_source_fn(move |cx: RefreshContext| {
        let seen = seen.clone();
        async move {
            let rt = cx.previous.as_ref().and_then(|t| t.refresh_token());
            if let Some(rt) = rt {
                seen.lock().unwrap().push(rt.expose_secret().to_owned());
            }
            // No refresh token: a client-credentials token, say.
            Ok::<_, std::io::Error>(Token::bearer("from-initial-grant"))
        }
    });
    let handle = TokenHandle::builder(source)
        .store(store.clone(), "k")
        .build();
    // This process adopts the stored token (and its refresh token).
    let token = handle.valid_token().await.unwrap();
    assert_eq!(token.access_token().expose_secret(), "at-1");

    // The store now answers reads, and refuses writes with READONLY (a
    // replica whose master is gone).
    let _: () = raw(&redis, redis::cmd("REPLICAOF").arg("127.0.0.1").arg(1)).await;
    assert!(
        store
            .try_lock("probe", Duration::from_secs(1))
            .await
            .is_err()
    );
    let token = handle.refresh_now().await.unwrap();
    assert_eq!(token.access_token().expose_secret(), "from-initial-grant");
    assert!(
        presented.lock().unwrap().is_empty(),
        "rt-1 was presented without the lease: {:?}",
        presented.lock().unwrap()
    );
}
