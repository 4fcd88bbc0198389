//! [`FileStore`]: one JSON file per key in a directory, shared by the
//! processes of one host.
//!
//! NOTE: the files of a key `k` (its name encoded as `<k>`, see [`file_stem`]).
//! - `<k>.json`: `{"version":N,"token":{…}}`, replaced atomically (temporary
//!   file in the same directory, fsync, rename, fsync of the directory), so
//!   a reader never sees half a file and needs no lock.
//! - `<k>.lock`: never replaced; an exclusive OS file lock on it makes
//!   read-version-then-write (save, delete, putting a corrupt file aside)
//!   one step for every process on the host.
//! - `<k>.lease`: the refresh lease, `owner` and expiry (unix milliseconds),
//!   rewritten in place under an OS file lock on itself. A lease whose
//!   expiry has passed (its holder crashed) is taken over.
//! - `<k>.json.corrupt-<unix ms>`: a file that is not valid JSON, put
//!   aside, never deleted.
//!
//! Deleting a key removes its three files. A process that locks `<k>.lock`
//! or `<k>.lease` checks, once it holds the lock, that the path still names
//! the file it locked (the deleter removes them while holding their locks),
//! and starts over otherwise.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{Lease, StoreError, StoredToken, TokenStore, new_owner};
use crate::Token;

/// How long a store operation waits for another process's OS file lock
/// (held only for the few milliseconds of a read-modify-write).
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Keys whose encoded file name would be longer than this are refused.
const MAX_STEM_LEN: usize = 200;

/// Tokens kept as files in one directory: one JSON file per key, written
/// atomically with permissions `0600` (the directory is created `0700`).
///
/// Several processes on one host can share a directory: saves are
/// compare-and-swap under an OS file lock, and the refresh lease is a lease
/// file guarded by an OS file lock, with a time to live so that a crashed
/// holder does not block the others. A file that is not valid JSON is
/// renamed `<name>.corrupt-<unix ms>` and reported as
/// [`StoreError::Corrupt`]; a manager then fetches a fresh token. Fields
/// written by a newer release are read and kept; valid JSON that is not a
/// token is reported but left in place. A file that cannot be read (its
/// permissions) is [`StoreError::Unavailable`], never moved.
///
/// Distinct keys get distinct file names, also where the filesystem
/// ignores case (macOS, Windows: capital letters are escaped) and for the
/// device names Windows reserves (`con`, `nul` …).
///
/// ```
/// use std::time::Duration;
/// use tower_auth_refresh::{FileStore, Token, TokenHandle, TokenStore, token_source_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_auth_refresh::BoxError> {
/// # let dir = std::env::temp_dir().join(format!("tar-doc-{}", std::process::id()));
/// let store = FileStore::new(&dir);
/// let handle = TokenHandle::builder(token_source_fn(|_cx| async {
///     Ok::<_, std::io::Error>(Token::bearer("fetched").with_expires_in(Duration::from_secs(3600)))
/// }))
/// .store(store.clone(), "billing-api")
/// .build();
/// handle.refresh_now().await?;
///
/// // The token survives a restart: the next process reads it from the file.
/// assert_eq!(store.load("billing-api").await?.map(|s| s.version), Some(1));
/// assert_eq!(store.list_keys().await?, ["billing-api"]);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct FileStore {
    dir: Arc<PathBuf>,
}

impl fmt::Debug for FileStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStore").field("dir", &self.dir).finish()
    }
}

/// The content of `<k>.json`.
#[derive(Serialize, Deserialize)]
struct Entry {
    version: u64,
    token: Token,
    /// Top-level fields of a newer release, kept as they are (rolling
    /// upgrades).
    #[serde(flatten)]
    unknown: serde_json::Map<String, serde_json::Value>,
}

/// An I/O failure with what was being done and where.
#[derive(Debug)]
struct FileError {
    doing: &'static str,
    path: PathBuf,
    source: io::Error,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "could not {} {}: {}",
            self.doing,
            self.path.display(),
            self.source
        )
    }
}

impl std::error::Error for FileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

fn io_error(doing: &'static str, path: &Path, source: io::Error) -> StoreError {
    StoreError::Unavailable(Box::new(FileError {
        doing,
        path: path.to_owned(),
        source,
    }))
}

impl FileStore {
    /// A store in `dir`. Nothing is touched until the first operation; the
    /// directory is created (mode `0700`) by the first write.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: Arc::new(dir.into()),
        }
    }

    /// The directory the tokens are kept in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs blocking file work on tokio's blocking pool.
    fn blocking<T, F>(&self, key: &str, work: F) -> BoxFuture<'static, Result<T, StoreError>>
    where
        T: Send + 'static,
        F: FnOnce(&Paths) -> Result<T, StoreError> + Send + 'static,
    {
        let paths = Paths::new(&self.dir, key);
        Box::pin(async move {
            let paths = paths?;
            match tokio::task::spawn_blocking(move || work(&paths)).await {
                Ok(result) => result,
                Err(err) => Err(StoreError::Unavailable(Box::new(err))),
            }
        })
    }
}

/// Why a stored file is not a token.
enum Unreadable {
    /// Not valid JSON: put aside.
    NotJson(String),
    /// Valid JSON, but not a token this release can read: left in place.
    NotAToken {
        reason: String,
        /// Its `version`, when it has one.
        version: Option<u64>,
    },
}

/// The paths of one key.
struct Paths {
    key: String,
    dir: PathBuf,
    stem: String,
    token: PathBuf,
    lock: PathBuf,
    lease: PathBuf,
    /// Where releases that did not escape capital letters kept the token
    /// (`Seller-A.json`), when that differs: read while the new file is
    /// missing, removed once the new one is written. Only ever used through
    /// [`Paths::legacy_file`].
    legacy_token: Option<PathBuf>,
}

impl Paths {
    fn new(dir: &Path, key: &str) -> Result<Self, StoreError> {
        let stem = file_stem(key);
        if stem.len() > MAX_STEM_LEN {
            return Err(StoreError::InvalidKey {
                key: key.to_owned(),
                reason: format!("longer than {MAX_STEM_LEN} bytes once encoded as a file name"),
            });
        }
        let legacy = legacy_file_stem(key);
        Ok(Self {
            key: key.to_owned(),
            dir: dir.to_owned(),
            token: dir.join(format!("{stem}.json")),
            lock: dir.join(format!("{stem}.lock")),
            lease: dir.join(format!("{stem}.lease")),
            legacy_token: (legacy != stem).then(|| dir.join(format!("{legacy}.json"))),
            stem,
        })
    }

    /// The file an earlier release wrote for this key, if there is one.
    ///
    /// NOTE: where case is ignored (macOS, Windows) the path `Seller-A.json`
    /// opens `seller-a.json`, another key's file. The old file counts only
    /// when the directory lists a regular file under exactly its name.
    fn legacy_file(&self) -> Option<&Path> {
        let legacy = self.legacy_token.as_deref()?;
        let name = legacy.file_name()?;
        let entries = fs::read_dir(&self.dir).ok()?;
        entries
            .filter_map(Result::ok)
            .any(|entry| entry.file_name() == name && entry.file_type().is_ok_and(|t| t.is_file()))
            .then_some(legacy)
    }

    /// Creates the directory (mode `0700`) if it is missing.
    fn ensure_dir(&self) -> Result<(), StoreError> {
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(&self.dir)
            .map_err(|e| io_error("create directory", &self.dir, e))
    }

    /// Opens (creating, mode `0600`) a file that only carries a lock, and
    /// takes the exclusive lock on it.
    fn open_locked(&self, path: &Path) -> Result<File, StoreError> {
        self.ensure_dir()?;
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        for _ in 0..8 {
            let file = options.open(path).map_err(|e| io_error("open", path, e))?;
            lock_bounded(&file, path)?;
            // NOTE: a deleter may have removed the file between our open
            // and our lock: a lock on a removed file guards nothing.
            if still_at(&file, path) {
                return Ok(file);
            }
        }
        Err(io_error(
            "lock",
            path,
            io::Error::other("the file kept being removed"),
        ))
    }

    /// Reads `<k>.json`: `Ok(None)` when absent, `Err(Ok(reason))` when it
    /// is not a stored token.
    /// A file that cannot be read (permissions, I/O) is an error of the
    /// store, never a corrupt entry: it is not moved.
    fn read(&self) -> Result<Option<Result<StoredToken, Unreadable>>, StoreError> {
        let bytes = match read_file(&self.token)? {
            Some(bytes) => bytes,
            None => match self.legacy_file() {
                Some(legacy) => match read_file(legacy)? {
                    Some(bytes) => bytes,
                    None => return Ok(None),
                },
                None => return Ok(None),
            },
        };
        Ok(Some(
            serde_json::from_slice::<Entry>(&bytes)
                .map(|entry| StoredToken {
                    token: entry.token,
                    version: entry.version,
                })
                .map_err(
                    |err| match serde_json::from_slice::<serde_json::Value>(&bytes) {
                        Ok(json) => Unreadable::NotAToken {
                            reason: describe(err),
                            version: json.get("version").and_then(serde_json::Value::as_u64),
                        },
                        Err(_) => Unreadable::NotJson(describe(err)),
                    },
                ),
        ))
    }

    /// The top-level fields of the stored entry this release does not know.
    /// Called with the key's lock held.
    fn unknown_fields_locked(&self) -> serde_json::Map<String, serde_json::Value> {
        let path = if self.token.exists() {
            Some(self.token.as_path())
        } else {
            self.legacy_file()
        };
        let Some(Ok(Some(bytes))) = path.map(read_file) else {
            return serde_json::Map::new();
        };
        match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(serde_json::Value::Object(mut fields)) => {
                fields.remove("version");
                fields.remove("token");
                fields
            }
            _ => serde_json::Map::new(),
        }
    }

    /// Renames a bad `<k>.json` to `<k>.json.corrupt-<unix ms>`. Called with
    /// the key's lock held.
    fn put_aside(&self, reason: String) -> StoreError {
        let aside = self
            .dir
            .join(format!("{}.json.corrupt-{}", self.stem, unix_millis()));
        let kept_at = match fs::rename(&self.token, &aside) {
            Ok(()) => {
                sync_dir(&self.dir);
                Some(aside.display().to_string())
            }
            Err(e) => {
                tracing::warn!(path = %self.token.display(), error = %e, "could not put a corrupt token file aside");
                None
            }
        };
        StoreError::Corrupt {
            key: self.key.clone(),
            reason,
            kept_at,
        }
    }

    /// The stored version, putting a file that is not JSON aside. Called
    /// with the key's lock held.
    fn version_locked(&self) -> Result<Option<u64>, StoreError> {
        match self.read()? {
            None => Ok(None),
            Some(Ok(stored)) => Ok(Some(stored.version)),
            Some(Err(Unreadable::NotAToken { version, .. })) => Ok(version),
            Some(Err(Unreadable::NotJson(reason))) => {
                let err = self.put_aside(reason);
                tracing::warn!(error = %err, "corrupt token file replaced");
                Ok(None)
            }
        }
    }

    /// Writes `<k>.json` atomically. Called with the key's lock held.
    fn write(&self, entry: &Entry) -> Result<(), StoreError> {
        let json = serde_json::to_vec(entry).map_err(|e| StoreError::Unavailable(Box::new(e)))?;
        let temp = self.dir.join(format!(
            ".{}.json.tmp-{}-{:08x}",
            self.stem,
            std::process::id(),
            fastrand::u32(..)
        ));
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let written = options
            .open(&temp)
            .and_then(|mut file| {
                file.write_all(&json)?;
                file.sync_all()
            })
            .and_then(|()| fs::rename(&temp, &self.token));
        if let Err(e) = written {
            let _ = fs::remove_file(&temp);
            return Err(io_error("write", &self.token, e));
        }
        if let Some(legacy) = self.legacy_file() {
            let _ = fs::remove_file(legacy);
        }
        sync_dir(&self.dir);
        Ok(())
    }

    /// Removes the key's lease file (unless a live lease is in it) and its
    /// lock file, each while holding its lock. Called with the key's lock
    /// held, after the token file is gone.
    #[cfg(unix)]
    fn remove_lock_files(&self, lock: File) {
        if let Ok(mut lease) = self.open_locked(&self.lease) {
            let held = read_lease(&mut lease)
                .ok()
                .flatten()
                .is_some_and(|(_, until)| until > unix_millis());
            if !held {
                let _ = fs::remove_file(&self.lease);
            }
        }
        let _ = fs::remove_file(&self.lock);
        drop(lock);
    }

    /// Without a way to tell a removed file from its path, lock files stay.
    #[cfg(not(unix))]
    fn remove_lock_files(&self, lock: File) {
        drop(lock);
    }
}

/// The bytes of `path`; `None` when it does not exist.
fn read_file(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("read", path, e)),
    }
}

/// `true` when `path` still names the open `file`.
#[cfg(unix)]
fn still_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn still_at(_file: &File, _path: &Path) -> bool {
    true
}

/// Takes the exclusive OS lock on `file`, waiting at most [`LOCK_WAIT`].
fn lock_bounded(file: &File, path: &Path) -> Result<(), StoreError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match fs4::FileExt::try_lock(file) {
            Ok(()) => return Ok(()),
            Err(fs4::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(fs4::TryLockError::WouldBlock) => {
                return Err(io_error(
                    "lock",
                    path,
                    io::Error::new(io::ErrorKind::TimedOut, "held by another process"),
                ));
            }
            Err(fs4::TryLockError::Error(e)) => return Err(io_error("lock", path, e)),
        }
    }
}

/// Makes a rename durable. Best effort: not every platform can open a directory.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!(dir = %dir.display(), error = %e, "could not sync directory");
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Says what is wrong with a stored file without quoting it (it may hold a
/// secret).
fn describe(err: serde_json::Error) -> String {
    let what = match err.classify() {
        serde_json::error::Category::Data => "not a stored token",
        serde_json::error::Category::Eof => "truncated JSON",
        serde_json::error::Category::Syntax | serde_json::error::Category::Io => "not valid JSON",
    };
    format!("{what} (line {}, column {})", err.line(), err.column())
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Device names Windows reserves whatever the extension (`con.json` is
/// the console there).
const RESERVED: [&str; 22] = [
    "con", "prn", "aux", "nul", "com1", "com2", "com3", "com4", "com5", "com6", "com7", "com8",
    "com9", "lpt1", "lpt2", "lpt3", "lpt4", "lpt5", "lpt6", "lpt7", "lpt8", "lpt9",
];

/// The file name stem of `key`: lowercase ASCII letters, digits, `-` and
/// `_` as they are, every other byte (capital letters too) as `%XX`, and
/// the first letter of a name Windows reserves (`con`, `nul` …) as `%XX`.
///
/// NOTE: distinct keys give names that are distinct even on a filesystem
/// that ignores case (macOS, Windows): the only capital letters in a stem
/// are the hex digits of escapes, and a `%` is never literal.
pub(crate) fn file_stem(key: &str) -> String {
    let reserved = RESERVED.contains(&key);
    let mut stem = String::with_capacity(key.len());
    for (i, byte) in key.bytes().enumerate() {
        let plain =
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-' || byte == b'_';
        if plain && !(reserved && i == 0) {
            stem.push(char::from(byte));
        } else {
            stem.push_str(&format!("%{byte:02X}"));
        }
    }
    stem
}

/// The stem earlier releases gave `key` (capital letters as they are).
fn legacy_file_stem(key: &str) -> String {
    let mut stem = String::with_capacity(key.len());
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            stem.push(char::from(byte));
        } else {
            stem.push_str(&format!("%{byte:02X}"));
        }
    }
    stem
}

/// The key of a file name stem made by [`file_stem`] (or by an earlier
/// release); `None` for names the store did not make.
fn key_of(stem: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(stem.len());
    let mut rest = stem.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        if first == b'%' {
            let hex = tail.get(..2)?;
            let hex = std::str::from_utf8(hex).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else if first.is_ascii_alphanumeric() || first == b'-' || first == b'_' {
            bytes.push(first);
            rest = tail;
        } else {
            return None;
        }
    }
    String::from_utf8(bytes).ok()
}

/// The lease file's content: `owner`, then the expiry in unix milliseconds.
fn read_lease(file: &mut File) -> io::Result<Option<(String, u64)>> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0))?;
    file.read_to_string(&mut text)?;
    let mut lines = text.lines();
    Ok(match (lines.next(), lines.next().map(str::parse::<u64>)) {
        (Some(owner), Some(Ok(until))) if !owner.is_empty() => Some((owner.to_owned(), until)),
        _ => None,
    })
}

fn write_lease(file: &mut File, content: &str) -> io::Result<()> {
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(content.as_bytes())?;
    file.sync_data()
}

impl TokenStore for FileStore {
    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<StoredToken>, StoreError>> {
        self.blocking(key, |paths| match paths.read()? {
            None => Ok(None),
            Some(Ok(stored)) => Ok(Some(stored)),
            Some(Err(_)) => {
                // Look again under the lock: a writer may have replaced it.
                let lock = paths.open_locked(&paths.lock)?;
                let result = match paths.read()? {
                    None => Ok(None),
                    Some(Ok(stored)) => Ok(Some(stored)),
                    // Valid JSON this release cannot read as a token: left
                    // where it is (a newer release may need it).
                    Some(Err(Unreadable::NotAToken { reason, .. })) => Err(StoreError::Corrupt {
                        key: paths.key.clone(),
                        reason,
                        kept_at: None,
                    }),
                    Some(Err(Unreadable::NotJson(reason))) => Err(paths.put_aside(reason)),
                };
                drop(lock);
                result
            }
        })
    }

    fn save<'a>(
        &'a self,
        key: &'a str,
        token: &'a Token,
        expected_version: Option<u64>,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        let token = token.clone();
        self.blocking(key, move |paths| {
            let lock = paths.open_locked(&paths.lock)?;
            let found = paths.version_locked()?;
            if let Some(expected) = expected_version {
                if found.unwrap_or(0) != expected {
                    return Err(StoreError::Conflict {
                        key: paths.key.clone(),
                        expected: Some(expected),
                        found,
                    });
                }
            }
            let version = found.unwrap_or(0) + 1;
            let unknown = paths.unknown_fields_locked();
            paths.write(&Entry {
                version,
                token,
                unknown,
            })?;
            drop(lock);
            Ok(version)
        })
    }

    fn delete<'a>(
        &'a self,
        key: &'a str,
        expected_version: Option<u64>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.blocking(key, move |paths| {
            if !paths.token.exists() && paths.legacy_file().is_none() {
                return Ok(false);
            }
            let lock = paths.open_locked(&paths.lock)?;
            let found = match paths.version_locked()? {
                None => return Ok(false),
                Some(found) => found,
            };
            if expected_version.is_some_and(|expected| expected != found) {
                return Err(StoreError::Conflict {
                    key: paths.key.clone(),
                    expected: expected_version,
                    found: Some(found),
                });
            }
            match fs::remove_file(&paths.token) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("remove", &paths.token, e)),
            }
            if let Some(legacy) = paths.legacy_file() {
                let _ = fs::remove_file(legacy);
            }
            paths.remove_lock_files(lock);
            sync_dir(&paths.dir);
            Ok(true)
        })
    }

    fn list_keys(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        let dir = self.dir.clone();
        Box::pin(async move {
            let listed = tokio::task::spawn_blocking(move || {
                let entries = match fs::read_dir(&*dir) {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(e) => return Err(io_error("list", &dir, e)),
                };
                let mut keys = Vec::new();
                for entry in entries {
                    let entry = entry.map_err(|e| io_error("list", &dir, e))?;
                    let name = entry.file_name();
                    let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                        continue;
                    };
                    if let Some(key) = key_of(stem) {
                        keys.push(key);
                    }
                }
                keys.sort();
                keys.dedup();
                Ok(keys)
            })
            .await;
            listed.unwrap_or_else(|err| Err(StoreError::Unavailable(Box::new(err))))
        })
    }

    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Lease>, StoreError>> {
        let taken = self.blocking(key, move |paths| {
            let mut file = paths.open_locked(&paths.lease)?;
            let now = unix_millis();
            let held = read_lease(&mut file).map_err(|e| io_error("read", &paths.lease, e))?;
            if held.is_some_and(|(_, until)| until > now) {
                return Ok(None);
            }
            let owner = new_owner();
            let until = now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
            write_lease(&mut file, &format!("{owner}\n{until}\n"))
                .map_err(|e| io_error("write", &paths.lease, e))?;
            Ok(Some(owner))
        });
        Box::pin(async move { Ok(taken.await?.map(|owner| Lease::new(key, owner, ttl, None))) })
    }

    fn unlock(&self, lease: Lease) -> BoxFuture<'_, Result<(), StoreError>> {
        let key = lease.key().to_owned();
        self.blocking(&key, move |paths| {
            let mut file = paths.open_locked(&paths.lease)?;
            let held = read_lease(&mut file).map_err(|e| io_error("read", &paths.lease, e))?;
            if held.is_some_and(|(owner, _)| owner == lease.owner()) {
                write_lease(&mut file, "").map_err(|e| io_error("write", &paths.lease, e))?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_stems_are_reversible_and_stay_in_the_directory() {
        for key in ["seller-42", "a/b", "../up", "", "tenant:7 ü", "%41"] {
            let stem = file_stem(key);
            assert!(!stem.contains('/') && !stem.contains('.'), "{stem}");
            assert_eq!(key_of(&stem).as_deref(), Some(key));
        }
        assert_eq!(file_stem("seller-42"), "seller-42");
        assert_eq!(key_of(".hidden"), None);
        assert_eq!(key_of("%4"), None);
    }

    #[test]
    fn file_names_stay_distinct_where_case_is_ignored() {
        let keys = ["Seller-A", "seller-a", "SELLER-A", "%41", "A", "a"];
        let folded: std::collections::HashSet<String> = keys
            .iter()
            .map(|key| file_stem(key).to_lowercase())
            .collect();
        assert_eq!(folded.len(), keys.len(), "{folded:?}");
        for key in keys {
            assert_eq!(key_of(&file_stem(key)).as_deref(), Some(key));
        }
    }

    #[test]
    fn windows_device_names_are_escaped() {
        for key in RESERVED {
            let stem = file_stem(key);
            assert!(!RESERVED.contains(&stem.to_lowercase().as_str()), "{stem}");
            assert_eq!(key_of(&stem).as_deref(), Some(key));
        }
        assert_eq!(file_stem("console"), "console");
    }

    #[test]
    fn an_unreadable_file_is_a_store_error_not_a_corrupt_entry() {
        let dir = std::env::temp_dir().join(format!("tar-unreadable-{}", std::process::id()));
        let paths = Paths::new(&dir, "k").unwrap();
        // A directory where the file should be: reading it fails.
        std::fs::create_dir_all(&paths.token).unwrap();
        let read = paths.read();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(read, Err(StoreError::Unavailable(_))));
    }
}
