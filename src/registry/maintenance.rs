//! Bulk jobs over a [`TokenRegistry`]'s store: refresh everything in use,
//! delete what the server rejects for good, clean up idle tenants.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use futures::StreamExt;
use serde::Serialize;

use super::tenants::{last_used_ms, now_ms};
use crate::{ReauthorizationRequired, StoreError, TokenRegistry};

type Progress = dyn Fn(&ProgressUpdate) + Send + Sync;

/// What [`TokenRegistry::refresh_all`] does.
///
/// ```
/// use std::time::Duration;
/// use tower_auth_refresh::RefreshAll;
///
/// let job = RefreshAll::new()
///     .concurrency(16)
///     .used_within(Duration::from_secs(7 * 24 * 3600))
///     .refresh_if_expiring_within(Duration::from_secs(3600))
///     .on_progress(|p| eprintln!("{}/{} {}", p.done, p.total, p.tenant));
/// # let _ = job;
/// ```
#[derive(Clone)]
pub struct RefreshAll {
    concurrency: usize,
    used_within: Option<Duration>,
    expiring_within: Option<Duration>,
    dry_run: bool,
    delete_dead: bool,
    progress: Option<Arc<Progress>>,
}

impl fmt::Debug for RefreshAll {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshAll")
            .field("concurrency", &self.concurrency)
            .field("used_within", &self.used_within)
            .field("expiring_within", &self.expiring_within)
            .field("dry_run", &self.dry_run)
            .field("delete_dead", &self.delete_dead)
            .finish_non_exhaustive()
    }
}

impl Default for RefreshAll {
    fn default() -> Self {
        Self::new()
    }
}

impl RefreshAll {
    /// Refreshes every stored token, 8 at a time. Tokens the server rejects
    /// for good are reported, not deleted, unless
    /// [`delete_dead`](Self::delete_dead) says so.
    pub fn new() -> Self {
        Self {
            concurrency: 8,
            used_within: None,
            expiring_within: None,
            dry_run: false,
            delete_dead: false,
            progress: None,
        }
    }

    /// At most `n` refreshes at once (at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Only tokens used within `age` (by their recorded last-used time;
    /// a token with no record counts as used). The others are skipped.
    pub fn used_within(mut self, age: Duration) -> Self {
        self.used_within = Some(age);
        self
    }

    /// Only tokens that expire within `window` (or whose expiry is unknown);
    /// the others are reported as still valid. Default: every token is
    /// refreshed.
    pub fn refresh_if_expiring_within(mut self, window: Duration) -> Self {
        self.expiring_within = Some(window);
        self
    }

    /// Report what would be done without refreshing or deleting anything.
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// Whether a token the server rejects for good
    /// ([`ReauthorizationRequired`]: for an
    /// `OAuth2Source`, an `invalid_grant` answer to
    /// the refresh token) is deleted from the store (default: no, it is
    /// reported as failed).
    pub fn delete_dead(mut self, delete: bool) -> Self {
        self.delete_dead = delete;
        self
    }

    /// Called after each token is handled.
    pub fn on_progress(
        mut self,
        progress: impl Fn(&ProgressUpdate) + Send + Sync + 'static,
    ) -> Self {
        self.progress = Some(Arc::new(progress));
        self
    }
}

/// One step of a bulk job, for a progress bar.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProgressUpdate {
    /// Tokens handled so far.
    pub done: usize,
    /// Tokens in the job.
    pub total: usize,
    /// The tenant just handled.
    pub tenant: String,
    /// What happened to it.
    pub outcome: Outcome,
}

/// What a bulk job did with one token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", content = "detail", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// A new token was fetched and stored.
    Refreshed,
    /// The token is valid for longer than the refresh window.
    StillValid,
    /// Not used recently enough to be refreshed.
    SkippedUnused,
    /// Would be refreshed (dry run).
    WouldRefresh,
    /// The refresh failed; the token is kept.
    Failed(String),
    /// The server rejected the token for good; it was deleted (or would be,
    /// in a dry run).
    Removed(String),
}

/// The result of a bulk job; its `Display` is a small table.
#[derive(Debug, Clone, Default, Serialize)]
#[non_exhaustive]
pub struct MaintenanceReport {
    /// Tokens looked at.
    pub total: usize,
    /// Tokens refreshed.
    pub refreshed: usize,
    /// Tokens left alone because they are valid for a while yet.
    pub still_valid: usize,
    /// Tokens skipped because they were not used recently.
    pub skipped_unused: usize,
    /// Tokens that would be refreshed (dry run).
    pub would_refresh: usize,
    /// Tokens whose refresh failed, with the reason (no secret).
    pub failed: Vec<(String, String)>,
    /// Tokens deleted (dead, or idle), with the reason.
    pub removed: Vec<(String, String)>,
    /// How long the job took.
    #[serde(rename = "duration_ms", serialize_with = "duration_ms")]
    pub duration: Duration,
    /// Nothing was changed.
    pub dry_run: bool,
}

fn duration_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

impl MaintenanceReport {
    fn record(&mut self, tenant: &str, outcome: &Outcome) {
        match outcome {
            Outcome::Refreshed => self.refreshed += 1,
            Outcome::StillValid => self.still_valid += 1,
            Outcome::SkippedUnused => self.skipped_unused += 1,
            Outcome::WouldRefresh => self.would_refresh += 1,
            Outcome::Failed(reason) => self.failed.push((tenant.to_owned(), reason.clone())),
            Outcome::Removed(reason) => self.removed.push((tenant.to_owned(), reason.clone())),
        }
    }

    /// `true` when any token failed to refresh.
    pub fn has_failures(&self) -> bool {
        !self.failed.is_empty()
    }
}

impl fmt::Display for MaintenanceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows = [
            ("total", self.total),
            ("refreshed", self.refreshed),
            ("still valid", self.still_valid),
            ("skipped (unused)", self.skipped_unused),
            ("would refresh", self.would_refresh),
            ("failed", self.failed.len()),
            ("removed", self.removed.len()),
        ];
        writeln!(f, "+------------------+--------+")?;
        writeln!(f, "| {:<16} | {:>6} |", "tokens", "count")?;
        writeln!(f, "+------------------+--------+")?;
        for (name, count) in rows {
            writeln!(f, "| {name:<16} | {count:>6} |")?;
        }
        writeln!(f, "+------------------+--------+")?;
        writeln!(
            f,
            "took {:.2?}{}",
            self.duration,
            if self.dry_run {
                " (dry run: nothing changed)"
            } else {
                ""
            }
        )?;
        for (tenant, reason) in &self.failed {
            writeln!(f, "failed  {tenant}: {reason}")?;
        }
        for (tenant, reason) in &self.removed {
            writeln!(f, "removed {tenant}: {reason}")?;
        }
        Ok(())
    }
}

impl TokenRegistry {
    /// The tenants with a token in the store (keys with the registry's
    /// prefix), sorted.
    pub async fn stored_tenants(&self) -> Result<Vec<String>, StoreError> {
        let prefix = &self.inner().key_prefix;
        let mut tenants: Vec<String> = self
            .inner()
            .store
            .list_keys()
            .await?
            .into_iter()
            .filter_map(|key| key.strip_prefix(prefix.as_str()).map(str::to_owned))
            .collect();
        tenants.sort();
        Ok(tenants)
    }

    /// Refreshes the stored tokens as `job` says, `job.concurrency` at a
    /// time, through each tenant's handle (so a fleet sharing the store
    /// still refreshes each token once). With
    /// [`delete_dead`](RefreshAll::delete_dead), a token the server rejects
    /// for good ([`ReauthorizationRequired`]) is deleted, unless another
    /// process wrote a new one meanwhile.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_auth_refresh::StoreError> {
    /// use tower_auth_refresh::{MemoryStore, RefreshAll, Token, TokenRegistry, TokenStore, token_source_fn};
    ///
    /// let store = MemoryStore::new();
    /// store.save("seller-1", &Token::bearer("old"), None).await?;
    /// let registry = TokenRegistry::builder(store, |_tenant: &str| {
    ///     token_source_fn(|_| async { Ok::<_, std::io::Error>(Token::bearer("new")) })
    /// })
    /// .build();
    /// let report = registry.refresh_all(RefreshAll::new()).await?;
    /// assert_eq!((report.total, report.refreshed), (1, 1));
    /// println!("{report}");
    /// # Ok(()) }
    /// ```
    pub async fn refresh_all(&self, job: RefreshAll) -> Result<MaintenanceReport, StoreError> {
        let started = Instant::now();
        let tenants = self.stored_tenants().await?;
        let total = tenants.len();
        let mut report = MaintenanceReport {
            total,
            dry_run: job.dry_run,
            ..MaintenanceReport::default()
        };
        let job = &job;
        let mut outcomes = futures::stream::iter(tenants)
            .map(|tenant| async move {
                let outcome = self.refresh_one(&tenant, job).await;
                (tenant, outcome)
            })
            .buffer_unordered(job.concurrency);
        let mut done = 0;
        while let Some((tenant, outcome)) = outcomes.next().await {
            done += 1;
            report.record(&tenant, &outcome);
            if let Some(progress) = &job.progress {
                progress(&ProgressUpdate {
                    done,
                    total,
                    tenant,
                    outcome,
                });
            }
        }
        report.duration = started.elapsed();
        Ok(report)
    }

    async fn refresh_one(&self, tenant: &str, job: &RefreshAll) -> Outcome {
        let key = self.store_key(tenant);
        let stored = match self.inner().store.load(&key).await {
            Ok(Some(stored)) => stored,
            Ok(None) => return Outcome::Failed("no longer in the store".into()),
            Err(err) => return Outcome::Failed(err.to_string()),
        };
        if let Some(age) = job.used_within {
            let used = last_used_ms(&stored.token);
            let cutoff = now_ms().saturating_sub(age.as_millis() as u64);
            if used.is_some_and(|used| used < cutoff) {
                return Outcome::SkippedUnused;
            }
        }
        if let Some(window) = job.expiring_within {
            if stored.token.expires_in().is_some_and(|left| left > window) {
                return Outcome::StillValid;
            }
        }
        if job.dry_run {
            return Outcome::WouldRefresh;
        }
        // NOTE: a tenant this job loads is unloaded again once handled: a
        // job over every stored tenant must not keep them all in memory.
        let was_loaded = self.is_loaded(tenant);
        let handle = self.get(tenant);
        let refreshed = handle.refresh_now().await;
        drop(handle);
        if !was_loaded {
            self.unload(tenant);
        }
        match refreshed {
            Ok(_) => Outcome::Refreshed,
            Err(err) => {
                let reason = err.to_string();
                if err.downcast_ref::<ReauthorizationRequired>().is_none() || !job.delete_dead {
                    return Outcome::Failed(reason);
                }
                // NOTE: delete only the version we saw dead: a token another
                // process saved meanwhile is kept.
                let version = match self.inner().store.load(&key).await {
                    Ok(Some(now)) if !now.token.same_secrets(&stored.token) => {
                        return Outcome::Failed(format!(
                            "{reason} (a newer token was stored meanwhile; kept)"
                        ));
                    }
                    Ok(Some(now)) => now.version,
                    Ok(None) => return Outcome::Removed(reason),
                    Err(err) => return Outcome::Failed(format!("{reason}; {err}")),
                };
                match self.inner().store.delete(&key, Some(version)).await {
                    Ok(_) => {
                        self.unload(tenant);
                        Outcome::Removed(reason)
                    }
                    Err(err) => Outcome::Failed(format!("{reason}; not deleted: {err}")),
                }
            }
        }
    }

    /// Deletes the stored tokens of tenants not used for `older_than` (by the
    /// last-used time recorded in the store, or seen in this process).
    /// Tokens with no usage record are kept. With `dry_run`, only reports.
    /// A tenant whose entry cannot be read is reported as failed; the job
    /// goes on. Only listing the store can fail the whole job.
    pub async fn remove_idle(
        &self,
        older_than: Duration,
        dry_run: bool,
    ) -> Result<MaintenanceReport, StoreError> {
        let started = Instant::now();
        let tenants = self.stored_tenants().await?;
        let mut report = MaintenanceReport {
            total: tenants.len(),
            dry_run,
            ..MaintenanceReport::default()
        };
        let cutoff = now_ms().saturating_sub(older_than.as_millis() as u64);
        for tenant in tenants {
            let key = self.store_key(&tenant);
            // NOTE: one bad entry (unreadable, a store error) is recorded
            // and the job goes on: the report is what the operator sees.
            let stored = match self.inner().store.load(&key).await {
                Ok(Some(stored)) => stored,
                Ok(None) => continue,
                Err(err) => {
                    report.failed.push((tenant, err.to_string()));
                    continue;
                }
            };
            let here = self
                .last_used(&tenant)
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64);
            let used = last_used_ms(&stored.token).max(here);
            let Some(used) = used else {
                report.still_valid += 1;
                continue;
            };
            if used >= cutoff {
                report.still_valid += 1;
                continue;
            }
            let idle_for = Duration::from_millis(now_ms().saturating_sub(used));
            let reason = format!("idle for {}", human(idle_for));
            if dry_run {
                report.removed.push((tenant, reason));
                continue;
            }
            match self.inner().store.delete(&key, Some(stored.version)).await {
                Ok(true) => {
                    self.unload(&tenant);
                    report.removed.push((tenant, reason));
                }
                Ok(false) | Err(StoreError::Conflict { .. }) => report.still_valid += 1,
                Err(err) => report.failed.push((tenant, err.to_string())),
            }
        }
        report.duration = started.elapsed();
        Ok(report)
    }
}

fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 86_400 {
        format!("{} days", secs / 86_400)
    } else if secs >= 3_600 {
        format!("{} hours", secs / 3_600)
    } else {
        format!("{secs} s")
    }
}
