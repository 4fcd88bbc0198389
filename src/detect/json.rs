//! [`JsonBodyRule`]: business codes and messages in a JSON envelope, such
//! as `HTTP 200 {"code":40003,"msg":"token过期"}`.

use http::header::CONTENT_TYPE;
use http::{HeaderMap, StatusCode};
use serde_json::Value;

use super::json_fields::{first_member, wanted_members};
use super::{ExpiryDetector, HeadVerdict, ResponseHead};

/// Expired when a JSON response body carries a code or a message that says
/// so: a code at a JSON pointer (`/code` ∈ {401, 40001, 40002, 40003}) or a
/// keyword found, case-insensitively, in the text at a pointer (`/msg`
/// contains "token过期", "无效token", "expired" …).
///
/// Only responses with a JSON content type (`application/json`,
/// `application/*+json`, `text/json`, with any parameters) are read; the
/// body is shown only when it fits in the layer's peek limit. A code given
/// as a number matches the same number written as a string, and the other
/// way round.
///
/// ```
/// use http::{HeaderMap, StatusCode, Version};
/// use tower_auth_refresh::{ExpiryDetector, HeadVerdict, JsonBodyRule, ResponseHead};
///
/// let rule = JsonBodyRule::default_rules();
/// let mut headers = HeaderMap::new();
/// headers.insert("content-type", "application/json; charset=utf-8".parse().unwrap());
/// let head = ResponseHead::new(StatusCode::OK, Version::HTTP_11, &headers);
/// assert_eq!(rule.check_head(&head), HeadVerdict::NeedBody);
/// assert!(rule.check_body(&head, r#"{"code":40003,"msg":"token过期","data":null}"#.as_bytes()));
/// assert!(rule.check_body(&head, br#"{"code":1,"msg":"Token EXPIRED, please refresh"}"#));
/// assert!(!rule.check_body(&head, br#"{"code":0,"msg":"ok","data":{"state":"expired"}}"#));
///
/// // Your own envelope:
/// let custom = JsonBodyRule::new()
///     .code_at("/status/code", ["E_TOKEN_EXPIRED"])
///     .keywords_at("/status/message", ["session timed out"]);
/// assert!(custom.check_body(&head, br#"{"status":{"code":"E_TOKEN_EXPIRED"}}"#));
/// ```
#[derive(Debug, Clone, Default)]
pub struct JsonBodyRule {
    codes: Vec<(String, Vec<String>)>,
    keywords: Vec<(String, Vec<String>)>,
    statuses: Option<Vec<StatusCode>>,
}

/// The codes of [`JsonBodyRule::default_rules`].
const DEFAULT_CODES: [i64; 4] = [401, 40001, 40002, 40003];

/// The keywords of [`JsonBodyRule::default_rules`].
const DEFAULT_KEYWORDS: [&str; 12] = [
    "token过期",
    "token已过期",
    "无效token",
    "token无效",
    "token异常",
    "token失效",
    "登录过期",
    "expired",
    "invalid token",
    "invalid_token",
    "token invalid",
    "unauthorized",
];

impl JsonBodyRule {
    /// A rule that matches nothing until codes or keywords are added.
    pub fn new() -> Self {
        Self::default()
    }

    /// The common envelopes: code at `/code` ∈ {401, 40001, 40002, 40003},
    /// or a message at `/msg` or `/message` containing one of "token过期",
    /// "token已过期", "无效token", "token无效", "token异常", "token失效",
    /// "登录过期", "expired", "invalid token", "invalid_token",
    /// "token invalid", "unauthorized" (case-insensitive).
    pub fn default_rules() -> Self {
        Self::new()
            .code_at("/code", DEFAULT_CODES)
            .keywords_at("/msg", DEFAULT_KEYWORDS)
            .keywords_at("/message", DEFAULT_KEYWORDS)
    }

    /// Expired when the value at `pointer` (RFC 6901, e.g. `/code` or
    /// `/error/code`) is one of `codes` (numbers or strings).
    pub fn code_at<I>(mut self, pointer: impl Into<String>, codes: I) -> Self
    where
        I: IntoIterator,
        I::Item: ToString,
    {
        let codes = codes
            .into_iter()
            .map(|c| c.to_string().trim().to_owned())
            .collect();
        self.codes.push((pointer.into(), codes));
        self
    }

    /// Expired when the text at `pointer` contains one of `keywords`,
    /// compared case-insensitively.
    pub fn keywords_at<I>(mut self, pointer: impl Into<String>, keywords: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let keywords = keywords
            .into_iter()
            .map(|k| k.as_ref().to_lowercase())
            .filter(|k| !k.is_empty())
            .collect();
        self.keywords.push((pointer.into(), keywords));
        self
    }

    /// Only read the bodies of responses with one of these statuses
    /// (default: any status).
    pub fn statuses(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        self.statuses = Some(statuses.into_iter().collect());
        self
    }

    fn matches(&self, json: &Value) -> bool {
        let code_hit = self.codes.iter().any(|(pointer, codes)| {
            json.pointer(pointer)
                .and_then(code_text)
                .is_some_and(|code| codes.contains(&code))
        });
        code_hit
            || self.keywords.iter().any(|(pointer, keywords)| {
                json.pointer(pointer)
                    .and_then(Value::as_str)
                    .map(str::to_lowercase)
                    .is_some_and(|text| keywords.iter().any(|k| text.contains(k.as_str())))
            })
    }
}

fn code_text(value: &Value) -> Option<String> {
    match value {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.trim().to_owned()),
        _ => None,
    }
}

/// Whether the response says its body is JSON.
pub(crate) fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence == "text/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

impl ExpiryDetector for JsonBodyRule {
    fn check_head(&self, head: &ResponseHead<'_>) -> HeadVerdict {
        if self.codes.is_empty() && self.keywords.is_empty() {
            return HeadVerdict::NotExpired;
        }
        if let Some(statuses) = &self.statuses {
            if !statuses.contains(&head.status()) {
                return HeadVerdict::NotExpired;
            }
        }
        if is_json(head.headers()) {
            HeadVerdict::NeedBody
        } else {
            HeadVerdict::NotExpired
        }
    }

    fn check_body(&self, _head: &ResponseHead<'_>, body: &[u8]) -> bool {
        let starts_like_json = body
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b'{' || *b == b'[');
        if !starts_like_json {
            return false;
        }
        let mut wanted = Vec::with_capacity(self.codes.len() + self.keywords.len());
        for (pointer, _) in self.codes.iter().chain(&self.keywords) {
            match first_member(pointer) {
                Some(member) => wanted.push(member),
                // A pointer to the whole document: read all of it.
                None => {
                    return serde_json::from_slice::<Value>(body)
                        .is_ok_and(|json| self.matches(&json));
                }
            }
        }
        match wanted_members(body, &wanted) {
            Ok(Some(object)) => self.matches(&object),
            // An array at the top: pointers may index into it.
            Ok(None) => serde_json::from_slice::<Value>(body).is_ok_and(|json| self.matches(&json)),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use http::Version;

    use super::*;

    fn head_with(content_type: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, content_type.parse().unwrap());
        headers
    }

    fn expired(body: &str) -> bool {
        let headers = head_with("application/json");
        let head = ResponseHead::new(StatusCode::OK, Version::HTTP_11, &headers);
        JsonBodyRule::default_rules().check_body(&head, body.as_bytes())
    }

    #[test]
    fn codes_numbers_and_strings() {
        assert!(expired(r#"{"code":40003,"msg":"token过期"}"#));
        assert!(expired(r#"{"code":"40003"}"#));
        assert!(expired(r#"{"code":401,"msg":"Token无效"}"#));
        assert!(expired(r#"{"code":40001}"#));
        assert!(!expired(r#"{"code":0,"msg":"ok"}"#));
        assert!(!expired(r#"{"code":40004,"msg":"参数错误"}"#));
    }

    #[test]
    fn keywords_are_case_insensitive_and_unicode() {
        assert!(expired(r#"{"code":1,"msg":"Token EXPIRED"}"#));
        assert!(expired(r#"{"code":1,"msg":"token过期或异常"}"#));
        assert!(expired(r#"{"code":1,"msg":"无效TOKEN"}"#));
        assert!(expired(
            r#"{"code":1,"message":"Token expired, please refresh"}"#
        ));
        assert!(!expired(r#"{"code":1,"msg":"余额不足"}"#));
        assert!(!expired(r#"{"code":0,"data":{"msg":"expired"}}"#));
    }

    #[test]
    fn only_json_bodies_and_bad_json_is_not_expiry() {
        let rule = JsonBodyRule::default_rules();
        for (content_type, want) in [
            ("application/json", HeadVerdict::NeedBody),
            ("Application/JSON; charset=UTF-8", HeadVerdict::NeedBody),
            ("application/problem+json", HeadVerdict::NeedBody),
            ("text/html", HeadVerdict::NotExpired),
            ("text/plain; charset=utf-8", HeadVerdict::NotExpired),
        ] {
            let headers = head_with(content_type);
            let head = ResponseHead::new(StatusCode::OK, Version::HTTP_11, &headers);
            assert_eq!(rule.check_head(&head), want, "{content_type}");
        }
        let none = HeaderMap::new();
        let head = ResponseHead::new(StatusCode::OK, Version::HTTP_11, &none);
        assert_eq!(rule.check_head(&head), HeadVerdict::NotExpired);
        assert!(!expired(r#"{"code":40003"#));
        assert!(!expired("not json at all"));
        assert!(!expired(""));
        assert!(!expired("\u{feff}{}"));
    }

    #[test]
    fn statuses_restrict_which_bodies_are_read() {
        let rule = JsonBodyRule::default_rules().statuses([StatusCode::OK]);
        let headers = head_with("application/json");
        let ok = ResponseHead::new(StatusCode::OK, Version::HTTP_11, &headers);
        let bad = ResponseHead::new(StatusCode::BAD_REQUEST, Version::HTTP_11, &headers);
        assert_eq!(rule.check_head(&ok), HeadVerdict::NeedBody);
        assert_eq!(rule.check_head(&bad), HeadVerdict::NotExpired);
        assert_eq!(JsonBodyRule::new().check_head(&ok), HeadVerdict::NotExpired);
    }
}
