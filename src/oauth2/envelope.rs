//! [`Envelope`]: token responses wrapped in a vendor's own JSON envelope.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use super::error::TokenEndpointError;
use super::response::{kind, non_negative_integer, wrong_type};
use crate::Token;

/// How an expiry is written in a vendor envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExpiryFormat {
    /// Seconds from now, like OAuth2's `expires_in`.
    SecondsFromNow,
    /// An absolute time in unix seconds.
    UnixSeconds,
    /// An absolute time in unix milliseconds.
    UnixMillis,
}

impl ExpiryFormat {
    fn to_time(self, n: u64) -> Option<SystemTime> {
        match self {
            Self::SecondsFromNow => SystemTime::now().checked_add(Duration::from_secs(n)),
            Self::UnixSeconds => UNIX_EPOCH.checked_add(Duration::from_secs(n)),
            Self::UnixMillis => UNIX_EPOCH.checked_add(Duration::from_millis(n)),
        }
    }
}

/// A parser for token responses in a vendor's envelope, such as
/// `{"code":0,"msg":"ok","data":{"accessToken":"…","refreshToken":"…","expiresAt":1640995200000}}`.
///
/// Each field is found with a JSON pointer (RFC 6901). A business code other
/// than the success value is a [`TokenEndpointError::Business`] carrying the
/// code and the message; a configured field that is absent is a
/// [`TokenEndpointError::MissingField`] naming the field and its pointer.
///
/// ```
/// use tower_auth_refresh::oauth2::{Envelope, ExpiryFormat};
///
/// let envelope = Envelope::new("/data/accessToken")
///     .refresh_token("/data/refreshToken")
///     .expires("/data/expiresAt", ExpiryFormat::UnixMillis)
///     .refresh_expires("/data/refreshExpiresAt", ExpiryFormat::UnixMillis)
///     .code("/code", 0)
///     .message("/msg");
/// # let _ = envelope;
/// ```
#[derive(Debug, Clone)]
pub struct Envelope {
    access_token: String,
    refresh_token: Option<String>,
    expires: Option<(String, ExpiryFormat)>,
    refresh_expires: Option<(String, ExpiryFormat)>,
    code: Option<(String, Value)>,
    message: Option<String>,
    token_type: Option<String>,
}

impl Envelope {
    /// An envelope whose access token is at `access_token_pointer`
    /// (for example `/data/accessToken`).
    pub fn new(access_token_pointer: impl Into<String>) -> Self {
        Self {
            access_token: access_token_pointer.into(),
            refresh_token: None,
            expires: None,
            refresh_expires: None,
            code: None,
            message: None,
            token_type: None,
        }
    }

    /// Where the refresh token is. It may be absent or null in a response
    /// (the old refresh token is then kept).
    pub fn refresh_token(mut self, pointer: impl Into<String>) -> Self {
        self.refresh_token = Some(pointer.into());
        self
    }

    /// Where the access token's expiry is, and how it is written. Required
    /// in every response once configured.
    pub fn expires(mut self, pointer: impl Into<String>, format: ExpiryFormat) -> Self {
        self.expires = Some((pointer.into(), format));
        self
    }

    /// Where the refresh token's expiry is, and how it is written. May be
    /// absent in a response.
    pub fn refresh_expires(mut self, pointer: impl Into<String>, format: ExpiryFormat) -> Self {
        self.refresh_expires = Some((pointer.into(), format));
        self
    }

    /// Where the business code is, and its success value (`0`, `200`,
    /// `"OK"` …). A number and the same number in a string are equal.
    pub fn code(mut self, pointer: impl Into<String>, ok: impl Into<Value>) -> Self {
        self.code = Some((pointer.into(), ok.into()));
        self
    }

    /// Where the human-readable message is, shown in errors.
    pub fn message(mut self, pointer: impl Into<String>) -> Self {
        self.message = Some(pointer.into());
        self
    }

    /// Where the token type is; `Bearer` when not configured or absent.
    pub fn token_type(mut self, pointer: impl Into<String>) -> Self {
        self.token_type = Some(pointer.into());
        self
    }

    /// The business error in `map`, if the code is configured and not the
    /// success value.
    pub(crate) fn business_error(&self, root: &Value) -> Option<TokenEndpointError> {
        let (pointer, ok) = self.code.as_ref()?;
        let code = root.pointer(pointer)?;
        if same_code(code, ok) {
            return None;
        }
        let message = self
            .message
            .as_ref()
            .and_then(|p| root.pointer(p))
            .and_then(|m| match m {
                Value::String(s) => Some(s.clone()),
                Value::Null => None,
                other => Some(other.to_string()),
            });
        Some(TokenEndpointError::Business {
            code: code.to_string(),
            message,
        })
    }

    /// Whether the envelope gives a token type (one is configured and found).
    pub(crate) fn declares_token_type(&self, map: &Map<String, Value>) -> bool {
        let Some(pointer) = &self.token_type else {
            return false;
        };
        // A token answer is small (the endpoint caps it); one copy per
        // refresh is fine.
        Value::Object(map.clone())
            .pointer(pointer)
            .is_some_and(|value| !value.is_null())
    }

    /// Turns a successful (HTTP 2xx) envelope into a [`Token`].
    pub(crate) fn parse(&self, map: Map<String, Value>) -> Result<Token, TokenEndpointError> {
        let root = Value::Object(map);
        if let Some(err) = self.business_error(&root) {
            return Err(err);
        }
        if let Some((pointer, _)) = &self.code {
            if root.pointer(pointer).is_none() {
                return Err(missing("code", pointer));
            }
        }
        let access_token = match root.pointer(&self.access_token) {
            None | Some(Value::Null) => return Err(missing("access_token", &self.access_token)),
            Some(Value::String(s)) if s.is_empty() => {
                return Err(TokenEndpointError::malformed(format!(
                    "`access_token` at `{}` is empty",
                    self.access_token
                )));
            }
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(wrong_type("access_token", "a string", other)),
        };
        let token_type = match self.token_type.as_ref().and_then(|p| root.pointer(p)) {
            Some(Value::String(t)) if !t.is_empty() && !t.eq_ignore_ascii_case("bearer") => {
                t.clone()
            }
            _ => "Bearer".to_owned(),
        };
        let mut token = Token::new(access_token, token_type);
        if let Some((pointer, format)) = &self.expires {
            let value = root
                .pointer(pointer)
                .filter(|v| !v.is_null())
                .ok_or_else(|| missing("expires", pointer))?;
            if let Some(at) = expiry(value, "expires", *format)? {
                token = token.with_expires_at(at);
            }
        }
        if let Some(pointer) = &self.refresh_token {
            match root.pointer(pointer) {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) if s.is_empty() => {}
                Some(Value::String(s)) => token = token.with_refresh_token(s.clone()),
                Some(other) => return Err(wrong_type("refresh_token", "a string", other)),
            }
        }
        if let Some((pointer, format)) = &self.refresh_expires {
            if let Some(value) = root.pointer(pointer).filter(|v| !v.is_null()) {
                if let Some(at) = expiry(value, "refresh_expires", *format)? {
                    token = token.with_refresh_expires_at(at);
                }
            }
        }
        Ok(token)
    }
}

fn missing(field: &'static str, pointer: &str) -> TokenEndpointError {
    TokenEndpointError::MissingField {
        field,
        pointer: pointer.to_owned(),
    }
}

fn expiry(
    value: &Value,
    field: &str,
    format: ExpiryFormat,
) -> Result<Option<SystemTime>, TokenEndpointError> {
    if !matches!(value, Value::Number(_) | Value::String(_)) {
        return Err(TokenEndpointError::malformed(format!(
            "`{field}` should be a number, got {}",
            kind(value)
        )));
    }
    non_negative_integer(value, field).map(|n| format.to_time(n))
}

fn same_code(code: &Value, ok: &Value) -> bool {
    if code == ok {
        return true;
    }
    let as_text = |v: &Value| match v {
        Value::String(s) => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    matches!((as_text(code), as_text(ok)), (Some(a), Some(b)) if a == b)
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;
    use crate::oauth2::response::json_object;

    fn vendor() -> Envelope {
        Envelope::new("/data/accessToken")
            .refresh_token("/data/refreshToken")
            .expires("/data/expiresAt", ExpiryFormat::UnixMillis)
            .refresh_expires("/data/refreshExpiresAt", ExpiryFormat::UnixMillis)
            .code("/code", 0)
            .message("/msg")
    }

    fn parse(envelope: &Envelope, body: &str) -> Result<Token, TokenEndpointError> {
        envelope.parse(json_object(body.as_bytes())?)
    }

    #[test]
    fn vendor_envelope_with_millis() {
        let token = parse(
            &vendor(),
            r#"{"code":0,"data":{"accessToken":"at","refreshToken":"rt",
                "expiresAt":1640995200000,"refreshExpiresAt":"1641081600000"}}"#,
        )
        .unwrap();
        assert_eq!(token.access_token().expose_secret(), "at");
        assert_eq!(token.refresh_token().unwrap().expose_secret(), "rt");
        assert_eq!(
            token.expires_at(),
            Some(UNIX_EPOCH + Duration::from_secs(1_640_995_200))
        );
        assert_eq!(
            token.refresh_expires_at(),
            Some(UNIX_EPOCH + Duration::from_secs(1_641_081_600))
        );
    }

    #[test]
    fn expiry_formats() {
        let seconds = Envelope::new("/t").expires("/e", ExpiryFormat::UnixSeconds);
        let token = parse(&seconds, r#"{"t":"a","e":1640995200}"#).unwrap();
        assert_eq!(
            token.expires_at(),
            Some(UNIX_EPOCH + Duration::from_secs(1_640_995_200))
        );
        let relative = Envelope::new("/t").expires("/e", ExpiryFormat::SecondsFromNow);
        let token = parse(&relative, r#"{"t":"a","e":"120"}"#).unwrap();
        let left = token.expires_in().unwrap();
        assert!(left > Duration::from_secs(100) && left <= Duration::from_secs(120));
    }

    #[test]
    fn business_code_is_an_error_with_the_message() {
        let err = parse(&vendor(), r#"{"code":40003,"msg":"token过期","data":null}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "token endpoint returned business code 40003: token过期"
        );
        let ok_as_string = Envelope::new("/t").code("/code", "0");
        assert!(parse(&ok_as_string, r#"{"code":0,"t":"x"}"#).is_ok());
        assert!(parse(&ok_as_string, r#"{"code":"0","t":"x"}"#).is_ok());
    }

    #[test]
    fn missing_fields_are_named() {
        let err = parse(&vendor(), r#"{"code":0,"data":{"expiresAt":1}}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "token endpoint response has no `access_token` at JSON pointer `/data/accessToken`"
        );
        let err = parse(&vendor(), r#"{"code":0,"data":{"accessToken":"a"}}"#).unwrap_err();
        assert!(matches!(
            err,
            TokenEndpointError::MissingField {
                field: "expires",
                ..
            }
        ));
        let err = parse(&vendor(), r#"{"data":{"accessToken":"a","expiresAt":1}}"#).unwrap_err();
        assert!(matches!(
            err,
            TokenEndpointError::MissingField { field: "code", .. }
        ));
    }

    #[test]
    fn wrong_types_and_negative_expiry() {
        let err = parse(
            &vendor(),
            r#"{"code":0,"data":{"accessToken":1,"expiresAt":1}}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("`access_token` should be a string")
        );
        let err = parse(
            &vendor(),
            r#"{"code":0,"data":{"accessToken":"a","expiresAt":-1}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("`expires` is negative"));
        let err = parse(
            &vendor(),
            r#"{"code":0,"data":{"accessToken":"a","expiresAt":true}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("`expires` should be a number"));
        let err = parse(
            &vendor(),
            r#"{"code":0,"data":{"accessToken":"","expiresAt":1}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("is empty"));
    }
}
