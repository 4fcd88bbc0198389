//! [`JsonBodyRule`]: business codes and messages in a JSON envelope, such
//! as `HTTP 200 {"code":40003,"msg":"token过期"}`.

use http::header::CONTENT_TYPE;
use http::{HeaderMap, StatusCode};
use serde_json::Value;

use super::json_fields::{first_member, wanted_members};
use super::{ExpiryDetector, HeadVerdict, ResponseHead};

/// Expired when a JSON response body carries a code or a message that says
/// so: a code at a JSON pointer (`/code` ∈ {401, 40001, 40002, 40003}) or a
/// phrase about the token found, case-insensitively, in the text at a
/// pointer (`/msg` contains "token过期", "无效token", "token expired" …).
///
/// Messages are read only on failures: a phrase never makes a success
/// envelope expired. An envelope is a success when a code it carries is
/// one the rule knows as success ([`success_codes_at`](Self::success_codes_at);
/// `/code` ∈ {0, 200} for the defaults), or when the status is 2xx and the
/// body carries no other code at the rule's pointers. A success such as
/// `200 {"code":0,"msg":"order 1 created; coupon expired"}` is therefore never
/// replayed.
///
/// Only responses with a JSON content type (`application/json`,
/// `application/*+json`, `text/json`, with any parameters except a
/// `stream=` parameter) are read; the body is shown only when it fits in
/// the layer's peek limit and arrives in time (see
/// [`AuthRefreshLayer::peek_deadline`](crate::AuthRefreshLayer::peek_deadline)).
/// A compressed body (`Content-Encoding: gzip` …) is not read: put a
/// decompression layer inside the auth layer to have it decoded first. A
/// UTF-8 byte order mark before the JSON is ignored. A code given as a
/// number matches the same number written as a string, and the other way
/// round.
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
/// // Successes are never expired, whatever their message says.
/// assert!(!rule.check_body(&head, br#"{"code":0,"msg":"token expired, new one issued"}"#));
/// assert!(!rule.check_body(&head, br#"{"msg":"coupon expired"}"#));
///
/// // Your own envelope:
/// let custom = JsonBodyRule::new()
///     .code_at("/status/code", ["E_TOKEN_EXPIRED"])
///     .success_codes_at("/status/code", ["OK"])
///     .keywords_at("/status/message", ["session timed out"]);
/// assert!(custom.check_body(&head, br#"{"status":{"code":"E_TOKEN_EXPIRED"}}"#));
/// assert!(custom.check_body(&head, br#"{"status":{"code":"E_AUTH","message":"Session timed out"}}"#));
/// assert!(!custom.check_body(&head, br#"{"status":{"code":"OK","message":"session timed out"}}"#));
/// ```
#[derive(Debug, Clone, Default)]
pub struct JsonBodyRule {
    codes: Vec<(String, Vec<String>)>,
    success_codes: Vec<(String, Vec<String>)>,
    keywords: Vec<(String, Vec<String>)>,
    statuses: Option<Vec<StatusCode>>,
}

/// The expiry codes of [`JsonBodyRule::default_rules`].
const DEFAULT_CODES: [i64; 4] = [401, 40001, 40002, 40003];

/// The success codes of [`JsonBodyRule::default_rules`].
const DEFAULT_SUCCESS_CODES: [i64; 2] = [0, 200];

/// The message pointers of [`JsonBodyRule::default_rules`].
const DEFAULT_MESSAGE_POINTERS: [&str; 4] = ["/msg", "/message", "/error", "/error_description"];

/// The phrases of [`JsonBodyRule::default_rules`]: each names the token.
const DEFAULT_KEYWORDS: [&str; 15] = [
    "token过期",
    "token已过期",
    "无效token",
    "token无效",
    "token异常",
    "token失效",
    "登录过期",
    "invalid token",
    "invalid_token",
    "token invalid",
    "token is invalid",
    "token expired",
    "token has expired",
    "token is expired",
    "expired token",
];

/// What the codes of a body say about its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Envelope {
    /// A code the rule knows as success: messages are not read.
    Success,
    /// Another code: messages are read.
    ErrorCode,
    /// No code at the rule's pointers: messages are read unless the status
    /// is 2xx.
    NoCode,
}

impl JsonBodyRule {
    /// A rule that matches nothing until codes or keywords are added.
    pub fn new() -> Self {
        Self::default()
    }

    /// The common envelopes. A response is expired when:
    ///
    /// - `/code` is 401, 40001, 40002 or 40003 (a number or a string), on
    ///   any status; or
    /// - the text at `/msg`, `/message`, `/error` or `/error_description`
    ///   contains, case-insensitively, one of "token过期", "token已过期",
    ///   "无效token", "token无效", "token异常", "token失效", "登录过期",
    ///   "invalid token", "invalid_token", "token invalid",
    ///   "token is invalid", "token expired", "token has expired",
    ///   "token is expired", "expired token"; and the response is not a
    ///   success: `/code` is not 0 or 200, and either `/code` holds another
    ///   code or the status is not 2xx.
    ///
    /// So `200 {"code":40003,"msg":"token过期或异常"}`,
    /// `200 {"code":1,"msg":"Token expired"}` and
    /// `403 {"error":"Token expired, please refresh"}` are expired;
    /// `200 {"code":0,"msg":"coupon expired"}`, `200 {"msg":"token expired"}`
    /// and `400 {"msg":"unauthorized"}` are not.
    pub fn default_rules() -> Self {
        let mut rule = Self::new()
            .code_at("/code", DEFAULT_CODES)
            .success_codes_at("/code", DEFAULT_SUCCESS_CODES);
        for pointer in DEFAULT_MESSAGE_POINTERS {
            rule = rule.keywords_at(pointer, DEFAULT_KEYWORDS);
        }
        rule
    }

    /// Expired when the value at `pointer` (RFC 6901, e.g. `/code` or
    /// `/error/code`) is one of `codes` (numbers or strings).
    pub fn code_at<I>(mut self, pointer: impl Into<String>, codes: I) -> Self
    where
        I: IntoIterator,
        I::Item: ToString,
    {
        self.codes.push((pointer.into(), code_list(codes)));
        self
    }

    /// The value at `pointer` is one of `codes` on a success: such a body is
    /// never expired by a keyword, whatever its messages say.
    pub fn success_codes_at<I>(mut self, pointer: impl Into<String>, codes: I) -> Self
    where
        I: IntoIterator,
        I::Item: ToString,
    {
        self.success_codes.push((pointer.into(), code_list(codes)));
        self
    }

    /// Expired when the text at `pointer` contains one of `keywords`,
    /// compared case-insensitively, and the body is not a success (see the
    /// type's docs). Prefer phrases that name the token ("token expired")
    /// to bare words ("expired"), which failures of other kinds use too.
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

    /// The pointers whose first member must be read.
    fn pointers(&self) -> impl Iterator<Item = &str> {
        self.codes
            .iter()
            .chain(&self.success_codes)
            .chain(&self.keywords)
            .map(|(pointer, _)| pointer.as_str())
    }

    fn envelope(&self, json: &Value) -> Envelope {
        let mut envelope = Envelope::NoCode;
        for (pointer, _) in self.success_codes.iter().chain(&self.codes) {
            if let Some(code) = json.pointer(pointer).and_then(code_text) {
                if self.is_success(pointer, &code) {
                    return Envelope::Success;
                }
                envelope = Envelope::ErrorCode;
            }
        }
        envelope
    }

    fn is_success(&self, pointer: &str, code: &str) -> bool {
        self.success_codes
            .iter()
            .any(|(p, codes)| p == pointer && codes.iter().any(|c| c == code))
    }

    fn matches(&self, json: &Value, status: StatusCode) -> bool {
        let code_hit = self.codes.iter().any(|(pointer, codes)| {
            json.pointer(pointer)
                .and_then(code_text)
                .is_some_and(|code| codes.contains(&code) && !self.is_success(pointer, &code))
        });
        if code_hit {
            return true;
        }
        if self.keywords.is_empty() {
            return false;
        }
        let read_messages = match self.envelope(json) {
            Envelope::Success => false,
            Envelope::ErrorCode => true,
            Envelope::NoCode => !status.is_success(),
        };
        read_messages
            && self.keywords.iter().any(|(pointer, keywords)| {
                json.pointer(pointer)
                    .and_then(Value::as_str)
                    .map(str::to_lowercase)
                    .is_some_and(|text| keywords.iter().any(|k| text.contains(k.as_str())))
            })
    }
}

fn code_list<I>(codes: I) -> Vec<String>
where
    I: IntoIterator,
    I::Item: ToString,
{
    codes
        .into_iter()
        .map(|c| c.to_string().trim().to_owned())
        .collect()
}

fn code_text(value: &Value) -> Option<String> {
    match value {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.trim().to_owned()),
        _ => None,
    }
}

/// Whether the response says its body is one JSON document (not a stream
/// of them: a `stream=` parameter, as in Kubernetes'
/// `application/json;stream=watch`, says the body never ends).
pub(crate) fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mut parts = value.split(';');
    let essence = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    let json = essence == "application/json"
        || essence == "text/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"));
    json && !parts.any(|param| {
        param
            .split('=')
            .next()
            .is_some_and(|name| name.trim().eq_ignore_ascii_case("stream"))
    })
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

    fn check_body(&self, head: &ResponseHead<'_>, body: &[u8]) -> bool {
        // RFC 8259 §8.1: a parser may ignore a byte order mark.
        let body = body.strip_prefix(UTF8_BOM).unwrap_or(body);
        let starts_like_json = body
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b'{' || *b == b'[');
        if !starts_like_json {
            return false;
        }
        let status = head.status();
        let mut wanted = Vec::with_capacity(self.codes.len() + self.keywords.len());
        for pointer in self.pointers() {
            match first_member(pointer) {
                Some(member) => wanted.push(member),
                // A pointer to the whole document: read all of it.
                None => {
                    return serde_json::from_slice::<Value>(body)
                        .is_ok_and(|json| self.matches(&json, status));
                }
            }
        }
        match wanted_members(body, &wanted) {
            Ok(Some(object)) => self.matches(&object, status),
            // An array at the top: pointers may index into it.
            Ok(None) => {
                serde_json::from_slice::<Value>(body).is_ok_and(|json| self.matches(&json, status))
            }
            Err(_) => false,
        }
    }
}

/// The UTF-8 encoding of U+FEFF.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

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

    fn expired_with(status: u16, body: &str) -> bool {
        let headers = head_with("application/json");
        let status = StatusCode::from_u16(status).unwrap();
        let head = ResponseHead::new(status, Version::HTTP_11, &headers);
        JsonBodyRule::default_rules().check_body(&head, body.as_bytes())
    }

    #[test]
    fn a_success_envelope_is_never_expired_by_its_message() {
        assert!(!expired(
            r#"{"code":0,"msg":"order 1 created; coupon expired"}"#
        ));
        assert!(!expired(
            r#"{"code":0,"msg":"token expired, a new one was issued"}"#
        ));
        assert!(!expired(
            r#"{"code":"200","message":"invalid token cleaned up"}"#
        ));
        assert!(!expired(r#"{"msg":"token过期"}"#), "a 2xx without a code");
        assert!(!expired_with(500, r#"{"code":0,"msg":"token过期"}"#));
        assert!(
            !expired(r#"{"code":1,"msg":"coupon expired"}"#),
            "not about the token"
        );
        assert!(!expired_with(401, r#"{"message":"Unauthorized"}"#));
    }

    #[test]
    fn token_phrases_on_failures_are_expiry() {
        assert!(expired_with(
            403,
            r#"{"error":"Token expired, please refresh"}"#
        ));
        assert!(expired_with(400, r#"{"error":"invalid_token"}"#));
        assert!(expired(
            r#"{"code":7,"msg":"The access token has expired"}"#
        ));
        assert!(
            !expired(r#"{"error":"Token expired, please refresh"}"#),
            "on a 200 without a code"
        );
    }

    #[test]
    fn a_byte_order_mark_is_ignored() {
        assert!(expired("\u{feff}{\"code\":40003}"));
        assert!(expired("\u{feff} {\"code\":1,\"msg\":\"token过期\"}"));
        assert!(!expired("\u{feff}{\"code\":0}"));
    }

    #[test]
    fn json_streams_are_not_read() {
        let rule = JsonBodyRule::default_rules();
        for content_type in [
            "application/json;stream=watch",
            "application/json; Stream=\"watch\"",
            "application/x-ndjson",
            "application/json-seq",
            "text/event-stream",
        ] {
            let headers = head_with(content_type);
            let head = ResponseHead::new(StatusCode::OK, Version::HTTP_11, &headers);
            assert_eq!(
                rule.check_head(&head),
                HeadVerdict::NotExpired,
                "{content_type}"
            );
        }
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
