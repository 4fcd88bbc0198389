//! FileStore: versioned saves, file permissions, leases, corrupt files, and
//! restarts through a TokenHandle (two OS processes on one directory are in
//! `tests/fleet.rs`).

mod common;
mod fleet_support;

use std::time::Duration;

use common::{Issuer, Upstream, body_text, client, get};
use fleet_support::TempDir;
use secrecy::ExposeSecret;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::{AuthRefreshLayer, FileStore, StoreError, Token, TokenHandle, TokenStore};

fn token(name: &str) -> Token {
    Token::bearer(name)
        .with_expires_in(Duration::from_secs(600))
        .with_refresh_token(format!("{name}-refresh"))
}

fn names_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn saves_are_compare_and_swap_on_the_version() {
    let dir = TempDir::new("file-cas");
    let store = FileStore::new(dir.path());
    assert!(store.load("k").await.unwrap().is_none(), "no directory yet");
    assert_eq!(store.save("k", &token("a"), Some(0)).await.unwrap(), 1);
    assert!(matches!(
        store.save("k", &token("b"), Some(0)).await,
        Err(StoreError::Conflict {
            expected: Some(0),
            found: Some(1),
            ..
        })
    ));
    assert_eq!(store.save("k", &token("c"), Some(1)).await.unwrap(), 2);
    // Another store on the same directory sees the same versions.
    let other = FileStore::new(dir.path());
    let stored = other.load("k").await.unwrap().unwrap();
    assert_eq!(stored.version, 2);
    assert_eq!(stored.token.access_token().expose_secret(), "c");
    assert_eq!(
        stored.token.refresh_token().unwrap().expose_secret(),
        "c-refresh"
    );

    assert!(matches!(
        other.delete("k", Some(1)).await,
        Err(StoreError::Conflict { found: Some(2), .. })
    ));
    assert!(other.delete("k", Some(2)).await.unwrap());
    assert!(!store.delete("k", None).await.unwrap());
    assert!(store.load("k").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_of_one_version_make_one_save() {
    let dir = TempDir::new("file-race");
    let store = FileStore::new(dir.path());
    store.save("k", &token("base"), None).await.unwrap();
    let writers = (0..16).map(|i| {
        // A store of its own each: separate file descriptors, as separate
        // processes would have.
        let store = FileStore::new(dir.path());
        tokio::spawn(async move { store.save("k", &token(&format!("w{i}")), Some(1)).await })
    });
    let results = futures::future::join_all(writers).await;
    let won = results.iter().filter(|r| matches!(r, Ok(Ok(2)))).count();
    let lost = results
        .iter()
        .filter(|r| matches!(r, Ok(Err(StoreError::Conflict { .. }))))
        .count();
    assert_eq!((won, lost), (1, 15), "{results:?}");
    assert_eq!(store.load("k").await.unwrap().unwrap().version, 2);
}

#[cfg(unix)]
#[tokio::test]
async fn files_are_private_to_their_owner() {
    use std::os::unix::fs::PermissionsExt;

    let dir = TempDir::new("file-perms");
    let nested = dir.path().join("tokens");
    let store = FileStore::new(&nested);
    store.save("seller-1", &token("a"), None).await.unwrap();
    store.save("seller-1", &token("b"), Some(1)).await.unwrap();
    let lease = store
        .try_lock("seller-1", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(lease.is_some());

    let mode =
        |path: std::path::PathBuf| std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(nested.clone()), 0o700, "directory");
    // No temporary file is left behind.
    assert_eq!(
        names_in(&nested),
        ["seller-1.json", "seller-1.lease", "seller-1.lock"]
    );
    for name in names_in(&nested) {
        assert_eq!(mode(nested.join(&name)), 0o600, "{name}");
    }
}

#[tokio::test]
async fn one_lease_at_a_time_and_an_expired_one_is_taken_over() {
    let dir = TempDir::new("file-lease");
    let store = FileStore::new(dir.path());
    let other = FileStore::new(dir.path());
    let first = store
        .try_lock("k", Duration::from_secs(30))
        .await
        .unwrap()
        .expect("free");
    assert!(
        other
            .try_lock("k", Duration::from_secs(30))
            .await
            .unwrap()
            .is_none()
    );
    store.unlock(first).await.unwrap();

    // A holder that never releases (it crashed) blocks only for its ttl.
    let crashed = other
        .try_lock("k", Duration::from_millis(1000))
        .await
        .unwrap()
        .expect("free again");
    assert!(
        store
            .try_lock("k", Duration::from_secs(30))
            .await
            .unwrap()
            .is_none()
    );
    let mut taken = None;
    for _ in 0..250 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        taken = store.try_lock("k", Duration::from_secs(30)).await.unwrap();
        if taken.is_some() {
            break;
        }
    }
    let taken = taken.expect("the expired lease was taken over");
    // The late holder's release does not free the new holder's lease.
    other.unlock(crashed).await.unwrap();
    assert!(
        other
            .try_lock("k", Duration::from_secs(30))
            .await
            .unwrap()
            .is_none()
    );
    store.unlock(taken).await.unwrap();
    assert!(
        other
            .try_lock("k", Duration::from_secs(30))
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn keys_are_listed_whatever_their_characters() {
    let dir = TempDir::new("file-keys");
    let store = FileStore::new(dir.path());
    for key in ["seller-1", "tenant:7/eu", "../escape", "ü"] {
        store.save(key, &token("t"), None).await.unwrap();
    }
    let _lease = store
        .try_lock("seller-1", Duration::from_secs(5))
        .await
        .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a token").unwrap();
    assert_eq!(
        store.list_keys().await.unwrap(),
        ["../escape", "seller-1", "tenant:7/eu", "ü"]
    );
    // Nothing was written outside the directory.
    assert!(!dir.path().parent().unwrap().join("escape.json").exists());
    assert!(matches!(
        store.save(&"x".repeat(300), &token("t"), None).await,
        Err(StoreError::InvalidKey { .. })
    ));
}

#[tokio::test]
async fn a_corrupt_file_is_reported_and_kept_aside() {
    let dir = TempDir::new("file-corrupt");
    let store = FileStore::new(dir.path());
    store.save("k", &token("a"), None).await.unwrap();
    let garbage = b"{\"version\":3,\"token\":{\"access_token\":\"half-writ";
    std::fs::write(dir.path().join("k.json"), garbage).unwrap();

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
    assert!(!reason.contains("half-writ"), "no content quoted: {reason}");
    let kept_at = std::path::PathBuf::from(kept_at.expect("moved aside"));
    assert!(
        kept_at
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("k.json.corrupt-"),
        "{kept_at:?}"
    );
    assert_eq!(std::fs::read(&kept_at).unwrap(), garbage, "kept as it was");
    assert!(store.load("k").await.unwrap().is_none());
    assert_eq!(store.list_keys().await.unwrap(), Vec::<String>::new());
    // The key starts over.
    assert_eq!(store.save("k", &token("b"), Some(0)).await.unwrap(), 1);
}

#[tokio::test]
async fn a_manager_replaces_a_corrupt_file_with_a_fresh_token() {
    let dir = TempDir::new("file-corrupt-e2e");
    std::fs::create_dir_all(dir.path()).unwrap();
    std::fs::write(dir.path().join("api.json"), "this is not json").unwrap();

    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream).lifetime(Duration::from_secs(600));
    let store = FileStore::new(dir.path());
    let handle = TokenHandle::builder(issuer.source())
        .store(store.clone(), "api")
        .build();
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(client());
    let response = service
        .oneshot(get(&upstream.url("/orders")))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(body_text(response).await, "ok tok-1 ");
    assert_eq!(issuer.calls(), 1, "a fresh token was fetched");

    let stored = store.load("api").await.unwrap().expect("saved");
    assert_eq!(stored.token.access_token().expose_secret(), "tok-1");
    let kept: Vec<String> = names_in(dir.path())
        .into_iter()
        .filter(|n| n.starts_with("api.json.corrupt-"))
        .collect();
    assert_eq!(kept.len(), 1, "{:?}", names_in(dir.path()));
    assert_eq!(
        std::fs::read_to_string(dir.path().join(&kept[0])).unwrap(),
        "this is not json"
    );
}

#[tokio::test]
async fn a_restarted_process_with_a_valid_stored_token_makes_no_token_call() {
    let dir = TempDir::new("file-restart");
    let upstream = Upstream::start().await;

    let first_run = Issuer::new(&upstream).lifetime(Duration::from_secs(600));
    {
        let handle = TokenHandle::builder(first_run.source())
            .store(FileStore::new(dir.path()), "api")
            .build();
        let service = ServiceBuilder::new()
            .layer(AuthRefreshLayer::new(handle))
            .service(client());
        let response = service.oneshot(get(&upstream.url("/a"))).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(first_run.calls(), 1);
    }

    // A new manager on the same directory, as after a restart.
    let second_run = Issuer::new(&upstream)
        .prefix("second-run")
        .lifetime(Duration::from_secs(600));
    let handle = TokenHandle::builder(second_run.source())
        .store(FileStore::new(dir.path()), "api")
        .build();
    let service = ServiceBuilder::new()
        .layer(AuthRefreshLayer::new(handle.clone()))
        .service(client());
    let response = service.oneshot(get(&upstream.url("/b"))).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(body_text(response).await, "ok tok-1 ");
    assert_eq!(second_run.calls(), 0, "no token call after a restart");
    assert_eq!(handle.stats().adopted, 1);
    assert_eq!(upstream.rejected(), 0);
}

#[tokio::test]
async fn keys_that_differ_only_in_case_get_files_that_differ_without_case() {
    // macOS and Windows ignore case: `Seller-A.json` and `seller-a.json`
    // would be one file there, and one tenant would send the other's token.
    let dir = TempDir::new("file-case");
    let store = FileStore::new(dir.path());
    store.save("Seller-A", &token("upper"), None).await.unwrap();
    store.save("seller-a", &token("lower"), None).await.unwrap();
    let names = names_in(dir.path());
    let folded: std::collections::HashSet<String> =
        names.iter().map(|n| n.to_lowercase()).collect();
    assert_eq!(folded.len(), names.len(), "{names:?}");
    assert_eq!(store.list_keys().await.unwrap(), ["Seller-A", "seller-a"]);
    let upper = store.load("Seller-A").await.unwrap().unwrap();
    assert_eq!(upper.token.access_token().expose_secret(), "upper");
    // Windows device names are not file names.
    store.save("nul", &token("n"), None).await.unwrap();
    assert!(!dir.path().join("nul.json").exists());
    assert_eq!(
        store
            .load("nul")
            .await
            .unwrap()
            .unwrap()
            .token
            .access_token()
            .expose_secret(),
        "n"
    );
}

#[tokio::test]
async fn a_file_written_by_an_earlier_release_under_its_old_name_is_read_and_moved() {
    let dir = TempDir::new("file-legacy");
    std::fs::create_dir_all(dir.path()).unwrap();
    let entry = serde_json::json!({"version": 4, "token": {"access_token": "old-name"}});
    std::fs::write(dir.path().join("Seller-A.json"), entry.to_string()).unwrap();
    let store = FileStore::new(dir.path());
    let stored = store.load("Seller-A").await.unwrap().expect("found");
    assert_eq!(stored.version, 4);
    store
        .save("Seller-A", &token("new"), Some(4))
        .await
        .unwrap();
    assert!(
        !dir.path().join("Seller-A.json").exists(),
        "{:?}",
        names_in(dir.path())
    );
    assert_eq!(store.list_keys().await.unwrap(), ["Seller-A"]);
}

/// Where case is ignored (macOS, Windows), the path `Seller-A.json` (key
/// `Seller-A`'s name in earlier releases) opens key `seller-a`'s file. The
/// filesystem of the tests is case-sensitive: a symbolic link stands for
/// the alias such a filesystem makes.
#[cfg(unix)]
fn alias_seller_a(dir: &std::path::Path) {
    std::os::unix::fs::symlink(dir.join("seller-a.json"), dir.join("Seller-A.json")).unwrap();
}

#[cfg(unix)]
#[tokio::test]
async fn an_old_file_name_that_is_another_key_s_file_where_case_is_ignored_is_not_read() {
    let dir = TempDir::new("file-legacy-alias-read");
    let store = FileStore::new(dir.path());
    store.save("seller-a", &token("lower"), None).await.unwrap();
    alias_seller_a(dir.path());

    assert!(
        store.load("Seller-A").await.unwrap().is_none(),
        "key Seller-A does not read key seller-a's token"
    );
    assert!(!store.delete("Seller-A", None).await.unwrap());
    let lower = store.load("seller-a").await.unwrap().expect("still there");
    assert_eq!(lower.token.access_token().expose_secret(), "lower");
}

#[cfg(unix)]
#[tokio::test]
async fn saving_a_capitalised_key_leaves_another_key_s_file_where_case_is_ignored() {
    let dir = TempDir::new("file-legacy-alias-write");
    let store = FileStore::new(dir.path());
    store.save("seller-a", &token("lower"), None).await.unwrap();
    alias_seller_a(dir.path());

    store.save("Seller-A", &token("upper"), None).await.unwrap();
    store.delete("Seller-A", None).await.unwrap();
    assert!(
        std::fs::symlink_metadata(dir.path().join("Seller-A.json")).is_ok(),
        "the path Seller-A.json (seller-a.json where case is ignored) is left alone"
    );
    let lower = store.load("seller-a").await.unwrap().expect("still there");
    assert_eq!(lower.token.access_token().expose_secret(), "lower");
}

#[tokio::test]
async fn deleting_a_key_removes_its_lock_and_lease_files() {
    let dir = TempDir::new("file-stale");
    let store = FileStore::new(dir.path());
    store.save("k", &token("a"), None).await.unwrap();
    let lease = store
        .try_lock("k", Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    store.unlock(lease).await.unwrap();
    assert_eq!(names_in(dir.path()), ["k.json", "k.lease", "k.lock"]);
    assert!(store.delete("k", None).await.unwrap());
    assert_eq!(names_in(dir.path()), Vec::<String>::new());
    // The key works as before.
    assert_eq!(store.save("k", &token("b"), Some(0)).await.unwrap(), 1);
    let lease = store.try_lock("k", Duration::from_secs(5)).await.unwrap();
    assert!(lease.is_some());
    assert!(
        store
            .try_lock("k", Duration::from_secs(5))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn valid_json_that_is_not_a_token_is_left_in_place() {
    // A newer release's format this one cannot read is not corruption.
    let dir = TempDir::new("file-newer");
    let store = FileStore::new(dir.path());
    store.save("k", &token("a"), None).await.unwrap();
    let newer = serde_json::json!({"version": 9, "token": {"access_token": {"sealed": "…"}}});
    std::fs::write(dir.path().join("k.json"), newer.to_string()).unwrap();
    let err = store.load("k").await.unwrap_err();
    assert!(
        matches!(err, StoreError::Corrupt { kept_at: None, .. }),
        "{err:?}"
    );
    assert_eq!(names_in(dir.path()), ["k.json", "k.lock"]);
}

#[tokio::test]
async fn an_entry_written_by_a_newer_release_is_saved_again_with_what_it_added() {
    let dir = TempDir::new("file-newer-fields");
    let store = FileStore::new(dir.path());
    store.save("k", &token("a"), None).await.unwrap();
    let newer = serde_json::json!({
        "version": 7,
        "written_by": "3.0",
        "token": {"format": 2, "access_token": "at", "refresh_token": "rt", "dpop_jkt": "x"},
    });
    std::fs::write(dir.path().join("k.json"), newer.to_string()).unwrap();
    let stored = store.load("k").await.unwrap().expect("read");
    store
        .save("k", &stored.token.clone().with_metadata("m", "1"), Some(7))
        .await
        .unwrap();

    let again: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("k.json")).unwrap()).unwrap();
    assert_eq!(again["version"], 8);
    assert_eq!(again["written_by"], "3.0", "{again}");
    assert_eq!(again["token"]["format"], 2, "{again}");
    assert_eq!(again["token"]["dpop_jkt"], "x", "{again}");
    assert_eq!(again["token"]["metadata"]["m"], "1", "{again}");
}
