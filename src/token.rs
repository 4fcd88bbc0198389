//! [`Token`]: an access token with its refresh token, expiry and metadata.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An access token and what is known about it.
///
/// The access token and the refresh token are secrets: [`Debug`] prints
/// `[REDACTED]` in their place, and they are only reachable through
/// [`ExposeSecret`]. The serde form (used by the token stores) keeps every
/// field, with expiry times as unix milliseconds.
///
/// ```
/// use std::time::Duration;
/// use secrecy::ExposeSecret;
/// use tower_auth_refresh::Token;
///
/// let token = Token::bearer("s3cr3t-access")
///     .with_expires_in(Duration::from_secs(3600))
///     .with_refresh_token("s3cr3t-refresh")
///     .with_scopes(["read", "write"])
///     .with_metadata("seller_id", "42");
///
/// assert_eq!(token.access_token().expose_secret(), "s3cr3t-access");
/// assert!(!format!("{token:?}").contains("s3cr3t"));
/// assert!(token.expires_in().unwrap() > Duration::from_secs(3500));
/// ```
#[derive(Clone)]
pub struct Token {
    access_token: SecretString,
    token_type: String,
    expires_at: Option<SystemTime>,
    refresh_token: Option<SecretString>,
    refresh_expires_at: Option<SystemTime>,
    scopes: Vec<String>,
    metadata: BTreeMap<String, String>,
    /// Fields of the stored form this release does not know (written by a
    /// newer one), kept so that saving the token again does not drop them.
    unknown_fields: BTreeMap<String, serde_json::Value>,
}

impl Token {
    /// A token of type `Bearer` with no known expiry.
    pub fn bearer(access_token: impl Into<String>) -> Self {
        Self::new(access_token, "Bearer")
    }

    /// A token of the given type (`Bearer`, `MAC`, a vendor's own …).
    pub fn new(access_token: impl Into<String>, token_type: impl Into<String>) -> Self {
        Self {
            access_token: SecretString::from(access_token.into()),
            token_type: token_type.into(),
            expires_at: None,
            refresh_token: None,
            refresh_expires_at: None,
            scopes: Vec::new(),
            metadata: BTreeMap::new(),
            unknown_fields: BTreeMap::new(),
        }
    }

    /// Sets the expiry to `lifetime` from now (OAuth2's `expires_in`).
    pub fn with_expires_in(mut self, lifetime: Duration) -> Self {
        self.expires_at = SystemTime::now().checked_add(lifetime);
        self
    }

    /// Sets an absolute expiry time.
    pub fn with_expires_at(mut self, at: SystemTime) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// Sets an absolute expiry as unix milliseconds, as many vendor APIs send it.
    pub fn with_expires_at_unix_millis(mut self, millis: u64) -> Self {
        self.expires_at = UNIX_EPOCH.checked_add(Duration::from_millis(millis));
        self
    }

    /// Attaches a refresh token.
    pub fn with_refresh_token(mut self, refresh_token: impl Into<String>) -> Self {
        self.refresh_token = Some(SecretString::from(refresh_token.into()));
        self
    }

    /// Sets when the refresh token itself expires.
    pub fn with_refresh_expires_at(mut self, at: SystemTime) -> Self {
        self.refresh_expires_at = Some(at);
        self
    }

    /// Sets the granted scopes.
    pub fn with_scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.scopes = scopes.into_iter().map(Into::into).collect();
        self
    }

    /// Adds a free-form metadata entry (a seller id, a tenant, a region …).
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// The access token. Call [`ExposeSecret::expose_secret`] to read it.
    pub fn access_token(&self) -> &SecretString {
        &self.access_token
    }

    /// The token type, `Bearer` unless the issuer said otherwise.
    pub fn token_type(&self) -> &str {
        &self.token_type
    }

    /// When the access token expires, if known.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }

    /// How long the access token is still valid, measured now; `Some(ZERO)`
    /// once it has expired, `None` when the expiry is unknown.
    pub fn expires_in(&self) -> Option<Duration> {
        self.expires_at.map(|at| {
            at.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        })
    }

    /// `true` when the expiry is known and has passed.
    pub fn is_expired(&self) -> bool {
        self.expires_in() == Some(Duration::ZERO)
    }

    /// The refresh token, if any.
    pub fn refresh_token(&self) -> Option<&SecretString> {
        self.refresh_token.as_ref()
    }

    /// When the refresh token expires, if known.
    pub fn refresh_expires_at(&self) -> Option<SystemTime> {
        self.refresh_expires_at
    }

    /// `true` when there is a refresh token and it is not known to have expired.
    pub fn has_usable_refresh_token(&self) -> bool {
        self.refresh_token.is_some()
            && self
                .refresh_expires_at
                .is_none_or(|at| at > SystemTime::now())
    }

    /// The granted scopes.
    pub fn scopes(&self) -> &[String] {
        &self.scopes
    }

    /// Free-form metadata.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// This token without the metadata entry `key`.
    pub(crate) fn without_metadata(mut self, key: &str) -> Self {
        self.metadata.remove(key);
        self
    }

    /// This token without its refresh token (and its expiry).
    pub(crate) fn without_refresh_token(&self) -> Self {
        let mut token = self.clone();
        token.refresh_token = None;
        token.refresh_expires_at = None;
        token
    }

    /// `true` when both tokens carry the same access token and the same
    /// refresh token, whatever their metadata.
    pub(crate) fn same_secrets(&self, other: &Token) -> bool {
        self.access_token.expose_secret() == other.access_token.expose_secret()
            && self.refresh_token.as_ref().map(ExposeSecret::expose_secret)
                == other
                    .refresh_token
                    .as_ref()
                    .map(ExposeSecret::expose_secret)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("access_token", &"[REDACTED]")
            .field("token_type", &self.token_type)
            .field("expires_at", &self.expires_at.map(unix_millis))
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "[REDACTED]"),
            )
            .field(
                "refresh_expires_at",
                &self.refresh_expires_at.map(unix_millis),
            )
            .field("scopes", &self.scopes)
            .field("metadata", &self.metadata)
            .finish()
    }
}

/// Two tokens are equal when every field is; secrets are compared too.
impl PartialEq for Token {
    fn eq(&self, other: &Self) -> bool {
        self.access_token.expose_secret() == other.access_token.expose_secret()
            && self.token_type == other.token_type
            && self.expires_at == other.expires_at
            && self.refresh_token.as_ref().map(ExposeSecret::expose_secret)
                == other
                    .refresh_token
                    .as_ref()
                    .map(ExposeSecret::expose_secret)
            && self.refresh_expires_at == other.refresh_expires_at
            && self.scopes == other.scopes
            && self.metadata == other.metadata
            && self.unknown_fields == other.unknown_fields
    }
}

impl Eq for Token {}

fn unix_millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn from_unix_millis(millis: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_millis(millis))
        .unwrap_or(UNIX_EPOCH)
}

/// The version of the stored form this release writes.
///
/// NOTE: rolling upgrades. A reader accepts any `format` and keeps the
/// fields it does not know (`unknown`), so an older release reads, and saves
/// again, an entry written by a newer one without losing what it added. A
/// newer release must therefore only add fields, never change the meaning
/// of one.
const STORED_FORMAT: u32 = 1;

fn first_format() -> u32 {
    1
}

/// Format 1 is written without its number: releases from before the format
/// was numbered refuse fields they do not know, and must read it.
fn is_first_format(format: &u32) -> bool {
    *format == 1
}

/// The stored form of a token: plain strings, expiry in unix milliseconds.
#[derive(Serialize, Deserialize)]
struct StoredToken {
    #[serde(default = "first_format", skip_serializing_if = "is_first_format")]
    format: u32,
    access_token: String,
    #[serde(default = "default_token_type")]
    token_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_expires_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    metadata: BTreeMap<String, String>,
    #[serde(flatten)]
    unknown: BTreeMap<String, serde_json::Value>,
}

fn default_token_type() -> String {
    "Bearer".to_owned()
}

/// Where a token read from a newer format keeps that format's number, among
/// its unknown fields: it is written back with it.
const FORMAT_FIELD: &str = "format";

impl Serialize for Token {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let read_as = self
            .unknown_fields
            .get(FORMAT_FIELD)
            .and_then(serde_json::Value::as_u64)
            .and_then(|format| u32::try_from(format).ok());
        let mut unknown = self.unknown_fields.clone();
        unknown.remove(FORMAT_FIELD);
        StoredToken {
            format: read_as.map_or(STORED_FORMAT, |read| read.max(STORED_FORMAT)),
            access_token: self.access_token.expose_secret().to_owned(),
            token_type: self.token_type.clone(),
            expires_at_ms: self.expires_at.map(unix_millis),
            refresh_token: self
                .refresh_token
                .as_ref()
                .map(|t| t.expose_secret().to_owned()),
            refresh_expires_at_ms: self.refresh_expires_at.map(unix_millis),
            scopes: self.scopes.clone(),
            metadata: self.metadata.clone(),
            unknown,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Token {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let stored = StoredToken::deserialize(deserializer)?;
        if stored.access_token.is_empty() {
            return Err(serde::de::Error::custom("access_token is empty"));
        }
        Ok(Self {
            access_token: SecretString::from(stored.access_token),
            token_type: stored.token_type,
            expires_at: stored.expires_at_ms.map(from_unix_millis),
            refresh_token: stored.refresh_token.map(SecretString::from),
            refresh_expires_at: stored.refresh_expires_at_ms.map(from_unix_millis),
            scopes: stored.scopes,
            metadata: stored.metadata,
            unknown_fields: {
                let mut unknown = stored.unknown;
                if stored.format != STORED_FORMAT {
                    unknown.insert(FORMAT_FIELD.to_owned(), stored.format.into());
                }
                unknown
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_both_secrets() {
        let token = Token::bearer("access-AAAA").with_refresh_token("refresh-BBBB");
        let debug = format!("{token:?} {token:#?}");
        assert!(!debug.contains("AAAA"));
        assert!(!debug.contains("BBBB"));
        assert!(debug.contains("REDACTED"));
    }

    #[test]
    fn serde_round_trip_keeps_every_field_in_millis() {
        let token = Token::bearer("a")
            .with_expires_at_unix_millis(1_640_995_200_000)
            .with_refresh_token("r")
            .with_refresh_expires_at(from_unix_millis(1_641_000_000_000))
            .with_scopes(["x"])
            .with_metadata("seller", "7");
        let json = serde_json::to_string(&token).unwrap();
        assert!(json.contains("\"expires_at_ms\":1640995200000"), "{json}");
        let back: Token = serde_json::from_str(&json).unwrap();
        assert_eq!(back, token);
    }

    #[test]
    fn corrupt_stored_tokens_are_errors() {
        assert!(serde_json::from_str::<Token>("{}").is_err());
        assert!(serde_json::from_str::<Token>(r#"{"access_token":""}"#).is_err());
        assert!(
            serde_json::from_str::<Token>(r#"{"access_token":"a","expires_at_ms":-1}"#).is_err()
        );
    }

    #[test]
    fn a_token_written_by_a_newer_release_is_read_and_saved_with_its_new_fields() {
        let newer = r#"{"format":2,"access_token":"a","refresh_token":"r","expires_at_ms":1640995200000,"dpop_jkt":"x1","metadata":{"seller":"7"}}"#;
        let token: Token = serde_json::from_str(newer).expect("unknown fields are accepted");
        assert_eq!(token.refresh_token().unwrap().expose_secret(), "r");
        assert_eq!(token.metadata()["seller"], "7");
        let again: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&token).unwrap()).unwrap();
        assert_eq!(again["dpop_jkt"], "x1", "{again}");
        assert_eq!(again["format"], 2, "the newer format is kept: {again}");
        assert_eq!(STORED_FORMAT, 1);
        let first: serde_json::Value =
            serde_json::to_value(Token::bearer("a").with_refresh_token("r")).unwrap();
        assert!(
            first.get("format").is_none(),
            "format 1 is implicit: {first}"
        );
    }

    #[test]
    fn expiry_in_the_past_is_expired() {
        let token = Token::bearer("a").with_expires_at(UNIX_EPOCH);
        assert!(token.is_expired());
        assert_eq!(Token::bearer("a").expires_in(), None);
    }
}
