//! [`RedisStore`]: tokens in Redis, shared by a fleet of processes
//! (feature `redis`).
//!
//! NOTE: the keys, under a configurable prefix (default `tower-auth-refresh:`).
//! - `<prefix>token:<key>`: a hash `{version, token}` (the token as JSON),
//!   with a time to live derived from the token's expiries. Saves and
//!   deletes are Lua scripts that compare the version first, so they are
//!   atomic compare-and-swap.
//! - `<prefix>lease:<key>`: the refresh lease, `SET … NX PX ttl` with a
//!   random owner value, released by a compare-and-delete script.
//! - `<prefix>corrupt:<key>:<unix ms>`: an entry that is not valid JSON (or
//!   not a hash), renamed aside, never deleted. Valid JSON that is not a
//!   token this release can read is left in place.
//!
//! Every operation is bounded by the connect and response timeouts: an
//! unreachable Redis is a quick [`StoreError::Unavailable`], and the
//! connection manager reconnects in the background.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use tokio::sync::OnceCell;

use super::{Lease, StoreError, StoredToken, TokenStore, new_owner};
use crate::Token;

/// NOTE: every check comes before the first write: Redis does not roll a
/// script back, so a script that fails half-way leaves half a save. A time
/// to live of 0 means none (`PERSIST`).
const SAVE: &str = r"
local ttl = tonumber(ARGV[3])
if not ttl or ttl < 0 then
  return redis.error_reply('invalid time to live')
end
local found = tonumber(redis.call('HGET', KEYS[1], 'version') or '0') or 0
local expected = tonumber(ARGV[1])
if expected >= 0 and found ~= expected then
  return {0, found}
end
local version = found + 1
redis.call('HSET', KEYS[1], 'version', version, 'token', ARGV[2])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  redis.call('PERSIST', KEYS[1])
end
return {1, version}
";

/// The longest time to live the store sets (about 100 years): far below
/// what makes Redis refuse an expiry.
const TTL_CEILING: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

const DELETE: &str = r"
local found = redis.call('HGET', KEYS[1], 'version')
if not found then
  return {0, 0}
end
found = tonumber(found) or 0
local expected = tonumber(ARGV[1])
if expected >= 0 and found ~= expected then
  return {-1, found}
end
redis.call('DEL', KEYS[1])
return {1, found}
";

const UNLOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Renames a bad entry aside, unless a writer replaced it since it was read.
const PUT_ASIDE: &str = r"
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'none' then
  return 0
end
if kind == 'hash' then
  local version = redis.call('HGET', KEYS[1], 'version') or ''
  local token = redis.call('HGET', KEYS[1], 'token') or ''
  if version ~= ARGV[1] or token ~= ARGV[2] then
    return 0
  end
end
redis.call('RENAME', KEYS[1], KEYS[2])
return 1
";

/// Tokens in Redis, shared by every process that uses the same Redis and
/// prefix (feature `redis`).
///
/// The connection is opened on first use and re-opened by the connection
/// manager after a failure; each operation is bounded by the connect and
/// response timeouts (default 1 s each), so an unreachable Redis gives a
/// quick [`StoreError::Unavailable`] and a manager follows its
/// [`UnreachableStore`](crate::UnreachableStore) policy.
///
/// A stored token lives until its refresh token expires (or its access
/// token, when it has no refresh token), plus a minute. A refresh token
/// whose expiry is unknown (Google, Microsoft, Auth0 send none) keeps its
/// entry with no time to live, as [`FileStore`](crate::FileStore) does:
/// clean idle tenants up with
/// [`TokenRegistry::remove_idle`](crate::TokenRegistry::remove_idle), or
/// set a [`max_ttl`](RedisStoreBuilder::max_ttl).
///
/// ```no_run
/// use std::time::Duration;
/// use tower_auth_refresh::{RedisStore, Token, TokenHandle, token_source_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_auth_refresh::BoxError> {
/// let store = RedisStore::builder("redis://127.0.0.1:6379/")
///     .prefix("billing:")
///     .timeouts(Duration::from_millis(500), Duration::from_millis(500))
///     .build()?;
/// let handle = TokenHandle::builder(token_source_fn(|_cx| async {
///     Ok::<_, std::io::Error>(Token::bearer("fetched").with_expires_in(Duration::from_secs(3600)))
/// }))
/// .store(store, "partner-api")
/// .build();
/// // Every replica built like this refreshes once between them.
/// handle.refresh_now().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    connection: OnceCell<ConnectionManager>,
    prefix: String,
    connect_timeout: Duration,
    response_timeout: Duration,
    max_ttl: Option<Duration>,
    save: Script,
    delete: Script,
    unlock: Script,
    put_aside: Script,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The address only: the URL may carry a password.
        f.debug_struct("RedisStore")
            .field(
                "addr",
                &self.inner.client.get_connection_info().addr().to_string(),
            )
            .field("prefix", &self.inner.prefix)
            .field("connected", &self.inner.connection.initialized())
            .finish()
    }
}

/// Configures a [`RedisStore`]; see [`RedisStore::builder`].
#[derive(Clone)]
pub struct RedisStoreBuilder {
    url: String,
    prefix: String,
    connect_timeout: Duration,
    response_timeout: Duration,
    max_ttl: Option<Duration>,
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("prefix", &self.prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("max_ttl", &self.max_ttl)
            .finish_non_exhaustive()
    }
}

impl RedisStoreBuilder {
    /// The prefix of every key the store writes (default
    /// `tower-auth-refresh:`). Stores with different prefixes do not see
    /// each other's tokens.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long connecting may take, and how long Redis may take to answer
    /// one command (default 1 s each).
    pub fn timeouts(mut self, connect: Duration, response: Duration) -> Self {
        self.connect_timeout = connect;
        self.response_timeout = response;
        self
    }

    /// The longest time to live of a stored token, also given to tokens
    /// whose expiry is unknown (default: none; such entries are kept until
    /// deleted). Between 1 s and about 100 years: a longer one is taken as
    /// the ceiling (`Duration::MAX` is fine), a shorter one as 1 s.
    /// `Duration::ZERO` means no maximum, as if it were not set: entries
    /// are never given a time to live they would die of at once.
    pub fn max_ttl(mut self, max_ttl: Duration) -> Self {
        self.max_ttl =
            (!max_ttl.is_zero()).then(|| max_ttl.clamp(Duration::from_secs(1), TTL_CEILING));
        self
    }

    /// Builds the store. Fails only on an invalid URL: the connection is
    /// opened on first use.
    pub fn build(self) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(self.url.as_str())
            .map_err(|e| StoreError::Unavailable(e.into()))?;
        Ok(RedisStore {
            inner: Arc::new(Inner {
                client,
                connection: OnceCell::new(),
                prefix: self.prefix,
                connect_timeout: self.connect_timeout,
                response_timeout: self.response_timeout,
                max_ttl: self.max_ttl,
                save: Script::new(SAVE),
                delete: Script::new(DELETE),
                unlock: Script::new(UNLOCK),
                put_aside: Script::new(PUT_ASIDE),
            }),
        })
    }
}

impl RedisStore {
    /// A store on the Redis at `url` (`redis://host:port/db`) with default
    /// settings. Fails only on an invalid URL.
    pub fn new(url: &str) -> Result<Self, StoreError> {
        Self::builder(url).build()
    }

    /// Starts configuring a store on the Redis at `url`.
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into(),
            prefix: "tower-auth-refresh:".to_owned(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            max_ttl: None,
        }
    }

    /// The prefix of every key the store writes.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    fn token_key(&self, key: &str) -> String {
        format!("{}token:{key}", self.inner.prefix)
    }

    fn lease_key(&self, key: &str) -> String {
        format!("{}lease:{key}", self.inner.prefix)
    }

    /// The connection manager, created on first use (it needs a runtime).
    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let inner = &self.inner;
        let manager = inner
            .connection
            .get_or_try_init(|| async {
                if tokio::runtime::Handle::try_current().is_err() {
                    return Err(StoreError::Unavailable(
                        "RedisStore needs a tokio runtime".into(),
                    ));
                }
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(inner.connect_timeout))
                    .set_response_timeout(Some(inner.response_timeout))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(20))
                    .set_max_delay(Duration::from_millis(200));
                ConnectionManager::new_lazy_with_config(inner.client.clone(), config)
                    .map_err(unavailable)
            })
            .await?;
        Ok(manager.clone())
    }

    /// Runs `op` on a connection within the connect + response timeouts.
    ///
    /// NOTE: after Redis restarts, the first command on the old connection
    /// fails and makes the manager reconnect; `op` is retried once on the
    /// new connection, so a Redis that is back is used at once.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let limit = self.inner.connect_timeout + self.inner.response_timeout;
        let attempt = || async {
            let connection = self.connection().await?;
            match tokio::time::timeout(limit, op(connection)).await {
                Ok(result) => Ok(result),
                Err(_) => Err(StoreError::Unavailable(
                    format!("redis did not answer within {limit:?}").into(),
                )),
            }
        };
        match attempt().await? {
            Err(err) if err.is_unrecoverable_error() => {
                tracing::debug!(error = %err, "redis connection lost; retrying once");
                attempt().await?.map_err(unavailable)
            }
            result => result.map_err(unavailable),
        }
    }

    /// Time to live of a stored token: until the refresh token (or, without
    /// one, the access token) expires, plus a minute, within 1 s ..= max;
    /// `None` (kept) when that expiry is unknown and there is no max.
    fn ttl_for(&self, token: &Token) -> Option<Duration> {
        let until = if token.refresh_token().is_some() {
            token.refresh_expires_at()
        } else {
            token.expires_at()
        };
        let max = self.inner.max_ttl.unwrap_or(TTL_CEILING);
        let left = match until {
            None => self.inner.max_ttl?,
            Some(at) => at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
                .saturating_add(Duration::from_secs(60)),
        };
        Some(left.clamp(Duration::from_secs(1), max))
    }

    /// Renames a bad entry aside and reports it.
    async fn put_aside(
        &self,
        key: &str,
        seen: (Option<String>, Option<String>),
        reason: String,
    ) -> StoreError {
        let aside = format!("{}corrupt:{key}:{}", self.inner.prefix, unix_millis());
        let token_key = self.token_key(key);
        let (version, token) = (seen.0.unwrap_or_default(), seen.1.unwrap_or_default());
        let moved = self
            .run(|mut c| {
                let mut invocation = self.inner.put_aside.prepare_invoke();
                invocation
                    .key(&token_key)
                    .key(&aside)
                    .arg(&version)
                    .arg(&token);
                async move { invocation.invoke_async::<i64>(&mut c).await }
            })
            .await;
        let kept_at = match moved {
            Ok(1) => Some(aside),
            Ok(_) => None,
            Err(err) => {
                tracing::warn!(error = %err, "could not put a corrupt stored token aside");
                None
            }
        };
        StoreError::Corrupt {
            key: key.to_owned(),
            reason,
            kept_at,
        }
    }
}

fn unavailable(err: redis::RedisError) -> StoreError {
    StoreError::Unavailable(Box::new(err))
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Says what is wrong with a stored token without quoting it.
fn describe(err: &serde_json::Error) -> String {
    let what = match err.classify() {
        serde_json::error::Category::Data => "not a stored token",
        serde_json::error::Category::Eof => "truncated JSON",
        serde_json::error::Category::Syntax | serde_json::error::Category::Io => "not valid JSON",
    };
    format!("{what} (line {}, column {})", err.line(), err.column())
}

/// Escapes the glob characters of a `SCAN MATCH` pattern.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// A `{status, version}` reply of the save and delete scripts.
fn pair(value: &Value) -> Option<(i64, u64)> {
    match value {
        Value::Array(items) => match items.as_slice() {
            [Value::Int(status), Value::Int(version)] => {
                Some((*status, u64::try_from(*version).unwrap_or(0)))
            }
            _ => None,
        },
        _ => None,
    }
}

fn unexpected(value: &Value) -> StoreError {
    StoreError::Unavailable(format!("unexpected reply from redis: {value:?}").into())
}

impl TokenStore for RedisStore {
    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<StoredToken>, StoreError>> {
        Box::pin(async move {
            let token_key = &self.token_key(key);
            let read = self
                .run(|mut c| async move {
                    redis::cmd("HMGET")
                        .arg(token_key)
                        .arg("version")
                        .arg("token")
                        .query_async::<(Option<String>, Option<String>)>(&mut c)
                        .await
                })
                .await;
            let (version, token) = match read {
                Ok(fields) => fields,
                Err(StoreError::Unavailable(err))
                    if err
                        .downcast_ref::<redis::RedisError>()
                        .and_then(redis::RedisError::code)
                        == Some("WRONGTYPE") =>
                {
                    let reason = "not a hash of version and token".to_owned();
                    return Err(self.put_aside(key, (None, None), reason).await);
                }
                Err(err) => return Err(err),
            };
            let parsed = match (&version, &token) {
                (None, None) => return Ok(None),
                (Some(version), Some(token)) => match version.parse::<u64>() {
                    Err(_) => Err("version is not a number".to_owned()),
                    Ok(version) => serde_json::from_str::<Token>(token)
                        .map(|token| StoredToken { token, version })
                        .map_err(|e| describe(&e)),
                },
                _ => Err("version or token missing".to_owned()),
            };
            match parsed {
                Ok(stored) => Ok(Some(stored)),
                // Valid JSON this release cannot read as a token: left where
                // it is (a newer release may need it); only what is not JSON
                // is put aside.
                Err(reason)
                    if token
                        .as_deref()
                        .is_some_and(|t| serde_json::from_str::<serde_json::Value>(t).is_ok()) =>
                {
                    Err(StoreError::Corrupt {
                        key: key.to_owned(),
                        reason,
                        kept_at: None,
                    })
                }
                Err(reason) => Err(self.put_aside(key, (version, token), reason).await),
            }
        })
    }

    fn save<'a>(
        &'a self,
        key: &'a str,
        token: &'a Token,
        expected_version: Option<u64>,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let json =
                serde_json::to_string(token).map_err(|e| StoreError::Unavailable(e.into()))?;
            // 0: no time to live.
            let ttl_ms = self.ttl_for(token).map_or(0, |ttl| {
                u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
            });
            let expected = expected_version.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX));
            let token_key = self.token_key(key);
            let reply = self
                .run(|mut c| {
                    let mut invocation = self.inner.save.prepare_invoke();
                    invocation
                        .key(&token_key)
                        .arg(expected)
                        .arg(&json)
                        .arg(ttl_ms);
                    async move { invocation.invoke_async::<Value>(&mut c).await }
                })
                .await?;
            match pair(&reply) {
                Some((1, version)) => Ok(version),
                Some((0, found)) => Err(StoreError::Conflict {
                    key: key.to_owned(),
                    expected: expected_version,
                    found: (found > 0).then_some(found),
                }),
                _ => Err(unexpected(&reply)),
            }
        })
    }

    fn delete<'a>(
        &'a self,
        key: &'a str,
        expected_version: Option<u64>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let expected = expected_version.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX));
            let token_key = self.token_key(key);
            let reply = self
                .run(|mut c| {
                    let mut invocation = self.inner.delete.prepare_invoke();
                    invocation.key(&token_key).arg(expected);
                    async move { invocation.invoke_async::<Value>(&mut c).await }
                })
                .await?;
            match pair(&reply) {
                Some((1, _)) => Ok(true),
                Some((0, _)) => Ok(false),
                Some((-1, found)) => Err(StoreError::Conflict {
                    key: key.to_owned(),
                    expected: expected_version,
                    found: Some(found),
                }),
                _ => Err(unexpected(&reply)),
            }
        })
    }

    fn list_keys(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            let prefix = format!("{}token:", self.inner.prefix);
            let pattern = format!("{}*", glob_escape(&prefix));
            let mut keys = Vec::new();
            let mut cursor = 0u64;
            loop {
                let pattern = &pattern;
                let (next, batch) = self
                    .run(|mut c| async move {
                        redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(pattern)
                            .arg("COUNT")
                            .arg(500)
                            .query_async::<(u64, Vec<String>)>(&mut c)
                            .await
                    })
                    .await?;
                keys.extend(
                    batch
                        .into_iter()
                        .filter_map(|k| k.strip_prefix(&prefix).map(str::to_owned)),
                );
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            keys.sort();
            keys.dedup();
            Ok(keys)
        })
    }

    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Lease>, StoreError>> {
        Box::pin(async move {
            let owner = new_owner();
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            let lease_key = &self.lease_key(key);
            let owner_ref = &owner;
            let set = self
                .run(|mut c| async move {
                    redis::cmd("SET")
                        .arg(lease_key)
                        .arg(owner_ref)
                        .arg("NX")
                        .arg("PX")
                        .arg(ttl_ms)
                        .query_async::<Option<String>>(&mut c)
                        .await
                })
                .await?;
            Ok(set.map(|_| Lease::new(key, owner, ttl, None)))
        })
    }

    fn unlock(&self, lease: Lease) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let lease_key = self.lease_key(lease.key());
            self.run(|mut c| {
                let mut invocation = self.inner.unlock.prepare_invoke();
                invocation.key(&lease_key).arg(lease.owner());
                async move { invocation.invoke_async::<i64>(&mut c).await }
            })
            .await
            .map(drop)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_patterns_escape_glob_characters() {
        assert_eq!(glob_escape("app:[eu]*?\\"), "app:\\[eu\\]\\*\\?\\\\");
    }

    #[test]
    fn ttl_follows_the_refresh_token_and_is_capped() {
        let store = RedisStore::builder("redis://127.0.0.1:1/")
            .max_ttl(Duration::from_secs(3600))
            .build()
            .unwrap();
        let hour = Duration::from_secs(3600);
        // No expiry known: the cap.
        assert_eq!(store.ttl_for(&Token::bearer("a")), Some(hour));
        // Access token only: its expiry plus a minute.
        let short = store
            .ttl_for(&Token::bearer("a").with_expires_in(Duration::from_secs(120)))
            .unwrap();
        assert!(short > Duration::from_secs(170) && short <= Duration::from_secs(180));
        // A refresh token without expiry keeps the entry for the cap.
        let refreshable = Token::bearer("a")
            .with_expires_in(Duration::from_secs(120))
            .with_refresh_token("r");
        assert_eq!(store.ttl_for(&refreshable), Some(hour));
        // Expired long ago: still kept a moment, never 0 (PX 0 is an error).
        let dead = Token::bearer("a").with_expires_at(UNIX_EPOCH);
        assert_eq!(store.ttl_for(&dead), Some(Duration::from_secs(60)));
    }

    #[test]
    fn without_a_max_a_refresh_token_of_unknown_expiry_keeps_its_entry() {
        let store = RedisStore::new("redis://127.0.0.1:1/").unwrap();
        let refreshable = Token::bearer("a")
            .with_expires_in(Duration::from_secs(120))
            .with_refresh_token("r");
        assert_eq!(store.ttl_for(&refreshable), None);
        let huge = RedisStore::builder("redis://127.0.0.1:1/")
            .max_ttl(Duration::MAX)
            .build()
            .unwrap();
        assert_eq!(huge.ttl_for(&refreshable), Some(TTL_CEILING));
    }

    #[test]
    fn debug_shows_no_password() {
        let store = RedisStore::new("redis://:hunter2@127.0.0.1:6379/").unwrap();
        let debug = format!("{store:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("127.0.0.1:6379"), "{debug}");
    }
}
