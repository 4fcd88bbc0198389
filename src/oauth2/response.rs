//! RFC 6749 token responses: §5.1 (success) and §5.2 (error).

use std::time::{Duration, SystemTime};

use http::StatusCode;
use serde_json::{Map, Value};

use super::error::{OAuthError, TokenEndpointError};
use crate::Token;

/// Parses a body as a JSON object.
pub(crate) fn json_object(body: &[u8]) -> Result<Map<String, Value>, TokenEndpointError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(TokenEndpointError::malformed(format!(
            "expected a JSON object, got {}",
            kind(&other)
        ))),
        Err(_) => Err(TokenEndpointError::malformed(if body.is_empty() {
            "the body is empty".to_owned()
        } else {
            "the body is not JSON".to_owned()
        })),
    }
}

/// A §5.1 success response turned into a [`Token`].
pub(crate) fn parse_success(map: &Map<String, Value>) -> Result<Token, TokenEndpointError> {
    let access_token = required_string(map.get("access_token"), "access_token")?;
    let token_type = match map.get("token_type") {
        None | Some(Value::Null) => "Bearer".to_owned(),
        Some(Value::String(t)) if t.eq_ignore_ascii_case("bearer") => "Bearer".to_owned(),
        Some(Value::String(t)) if !t.is_empty() => t.clone(),
        Some(other) => return Err(wrong_type("token_type", "a non-empty string", other)),
    };
    let mut token = Token::new(access_token, token_type);
    if let Some(secs) = optional_seconds(map.get("expires_in"), "expires_in")? {
        token = token.with_expires_in(secs);
    }
    if let Some(refresh) = optional_string(map.get("refresh_token"), "refresh_token")? {
        token = token.with_refresh_token(refresh);
        // A common extension (Keycloak and others): the refresh token's lifetime.
        if let Some(secs) = optional_seconds(map.get("refresh_expires_in"), "refresh_expires_in")? {
            if !secs.is_zero() {
                if let Some(at) = SystemTime::now().checked_add(secs) {
                    token = token.with_refresh_expires_at(at);
                }
            }
        }
    }
    if let Some(scope) = optional_string(map.get("scope"), "scope")? {
        token = token.with_scopes(scope.split_ascii_whitespace());
    }
    Ok(token)
}

/// A §5.2 error response, if the body is one.
pub(crate) fn parse_error(status: StatusCode, map: &Map<String, Value>) -> Option<OAuthError> {
    let Some(Value::String(error)) = map.get("error") else {
        return None;
    };
    let text = |key: &str| match map.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    };
    Some(OAuthError {
        status,
        error: error.clone(),
        description: text("error_description"),
        uri: text("error_uri"),
    })
}

pub(crate) fn required_string(
    value: Option<&Value>,
    field: &str,
) -> Result<String, TokenEndpointError> {
    match value {
        None | Some(Value::Null) => Err(TokenEndpointError::malformed(format!(
            "`{field}` is missing"
        ))),
        Some(Value::String(s)) if s.is_empty() => {
            Err(TokenEndpointError::malformed(format!("`{field}` is empty")))
        }
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(wrong_type(field, "a string", other)),
    }
}

pub(crate) fn optional_string(
    value: Option<&Value>,
    field: &str,
) -> Result<Option<String>, TokenEndpointError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        _ => required_string(value, field).map(Some),
    }
}

/// A non-negative whole number, given as a JSON number or a numeric string
/// (many vendors quote their numbers).
pub(crate) fn non_negative_integer(value: &Value, field: &str) -> Result<u64, TokenEndpointError> {
    let negative = || TokenEndpointError::malformed(format!("`{field}` is negative"));
    match value {
        Value::Number(n) => {
            if let Some(v) = n.as_u64() {
                Ok(v)
            } else if n.as_i64().is_some_and(|v| v < 0) {
                Err(negative())
            } else {
                match n.as_f64() {
                    Some(f) if f < 0.0 => Err(negative()),
                    Some(f) if f.is_finite() && f <= u64::MAX as f64 => Ok(f as u64),
                    _ => Err(TokenEndpointError::malformed(format!(
                        "`{field}` is out of range"
                    ))),
                }
            }
        }
        Value::String(s) => {
            let s = s.trim();
            if s.starts_with('-') {
                return Err(negative());
            }
            s.parse::<u64>().map_err(|_| {
                TokenEndpointError::malformed(format!("`{field}` is not a whole number"))
            })
        }
        other => Err(wrong_type(field, "a number", other)),
    }
}

fn optional_seconds(
    value: Option<&Value>,
    field: &str,
) -> Result<Option<Duration>, TokenEndpointError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => non_negative_integer(v, field).map(|s| Some(Duration::from_secs(s))),
    }
}

pub(crate) fn wrong_type(field: &str, expected: &str, got: &Value) -> TokenEndpointError {
    TokenEndpointError::malformed(format!("`{field}` should be {expected}, got {}", kind(got)))
}

pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    fn parse(body: &str) -> Result<Token, TokenEndpointError> {
        parse_success(&json_object(body.as_bytes())?)
    }

    fn reason(err: TokenEndpointError) -> String {
        match err {
            TokenEndpointError::Malformed { reason } => reason,
            other => panic!("not malformed: {other}"),
        }
    }

    #[test]
    fn full_success_response() {
        let token = parse(
            r#"{"access_token":"at","token_type":"bearer","expires_in":3600,
                "refresh_token":"rt","scope":"a b","refresh_expires_in":"7200"}"#,
        )
        .unwrap();
        assert_eq!(token.access_token().expose_secret(), "at");
        assert_eq!(token.token_type(), "Bearer");
        assert!(token.expires_in().unwrap() > Duration::from_secs(3590));
        assert_eq!(token.refresh_token().unwrap().expose_secret(), "rt");
        assert!(token.refresh_expires_at().is_some());
        assert_eq!(token.scopes(), ["a", "b"]);
    }

    #[test]
    fn malformed_responses_name_the_problem() {
        assert_eq!(reason(parse("<html>").unwrap_err()), "the body is not JSON");
        assert_eq!(reason(parse("").unwrap_err()), "the body is empty");
        assert!(reason(parse("[1]").unwrap_err()).contains("an array"));
        assert_eq!(
            reason(parse("{}").unwrap_err()),
            "`access_token` is missing"
        );
        assert_eq!(
            reason(parse(r#"{"access_token":""}"#).unwrap_err()),
            "`access_token` is empty"
        );
        assert!(reason(parse(r#"{"access_token":5}"#).unwrap_err()).contains("a number"));
        assert_eq!(
            reason(parse(r#"{"access_token":"a","expires_in":-5}"#).unwrap_err()),
            "`expires_in` is negative"
        );
        assert_eq!(
            reason(parse(r#"{"access_token":"a","expires_in":"-5"}"#).unwrap_err()),
            "`expires_in` is negative"
        );
        assert_eq!(
            reason(parse(r#"{"access_token":"a","expires_in":1e400}"#).unwrap_err()),
            "the body is not JSON"
        );
        assert!(
            reason(parse(r#"{"access_token":"a","expires_in":"soon"}"#).unwrap_err())
                .contains("whole number")
        );
        assert!(
            reason(parse(r#"{"access_token":"a","refresh_token":[]}"#).unwrap_err())
                .contains("`refresh_token`")
        );
    }

    #[test]
    fn huge_expiry_does_not_panic() {
        let token = parse(r#"{"access_token":"a","expires_in":18446744073709551615}"#).unwrap();
        let _ = token.expires_in();
        let token = parse(r#"{"access_token":"a","expires_in":1.0e30}"#);
        assert!(token.is_err());
    }

    #[test]
    fn error_response() {
        let map = json_object(br#"{"error":"invalid_grant","error_description":"gone"}"#).unwrap();
        let err = parse_error(StatusCode::BAD_REQUEST, &map).unwrap();
        assert_eq!(err.error(), "invalid_grant");
        assert_eq!(err.description(), Some("gone"));
        assert_eq!(err.to_string(), "invalid_grant (HTTP 400): gone");
        assert!(parse_error(StatusCode::BAD_REQUEST, &Map::new()).is_none());
    }
}
