//! [`JsonBodyRule`]: business codes and messages in a JSON envelope, such
//! as `HTTP 200 {"code":40003,"msg":"token过期"}`.

use std::borrow::Cow;
use std::fmt;

use http::StatusCode;
use http::header::HeaderValue;
use memchr::memmem;
use serde_json::Value;

use super::json_fields::{INLINE, Kept, Leaf, Members};
use super::json_pointer::JsonPointer;
use super::json_success::top_level_scalars;
use super::{ExpiryDetector, HeadVerdict, ResponseHead};

/// Expired when a JSON response body carries a code or a message that says
/// so: a code at a JSON pointer (`/code` ∈ {401, 40001, 40002, 40003}) or a
/// phrase about the token found, case-insensitively, in the text at a
/// pointer (`/msg` contains "token过期", "无效token", "token expired" …).
///
/// Messages are read only on failures: a phrase never makes a success
/// envelope expired. An envelope is a success when a code it carries is
/// one the rule knows as success ([`success_codes_at`](Self::success_codes_at);
/// for the defaults `/code` is 0, 200, `"success"` or `"ok"` in any
/// spelling, or `/success` is `true`), or when the status is 2xx and the
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
/// UTF-8 byte order mark before the JSON is ignored. Codes compare by
/// numeric value (`0`, `0.0`, `-0`, `"0"`, `"0000"` are one code; so are
/// `40003`, `40003.0`, `4.0003e4` and `"40003"`); text codes compare
/// trimmed and ASCII case-insensitively. Keywords match whole words, not
/// about another kind of token (see [`default_rules`](Self::default_rules)).
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
#[derive(Clone, Default)]
pub struct JsonBodyRule {
    codes: Vec<(Field, Vec<Code<'static>>)>,
    success_codes: Vec<(Field, Vec<Code<'static>>)>,
    keywords: Vec<(Field, Vec<String>)>,
    statuses: Option<Vec<StatusCode>>,
    /// How bodies are read, worked out from the pointers when the rule is
    /// built.
    reading: Reading,
}

impl fmt::Debug for JsonBodyRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonBodyRule")
            .field("codes", &self.codes)
            .field("success_codes", &self.success_codes)
            .field("keywords", &self.keywords)
            .field("statuses", &self.statuses)
            .finish()
    }
}

/// A pointer of the rule, and the slot of the top-level member it starts
/// at (in [`Reading::members`]).
#[derive(Clone)]
struct Field {
    pointer: JsonPointer,
    slot: Option<usize>,
}

impl fmt::Debug for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.pointer.fmt(f)
    }
}

#[derive(Debug, Clone, Default)]
struct Reading {
    /// The top-level members the pointers start at.
    members: Members,
    /// Some pointer is the empty one (the whole document) or not a pointer:
    /// the whole body is parsed, as `serde_json::Value`.
    whole_document: bool,
    /// The slots of the members that hold codes, when every pointer with
    /// expiry or success codes names a top-level member (in the first
    /// [`INLINE`] slots): the raw bytes of a body can then show that it is
    /// not expired before any parse ([`JsonBodyRule::rules_out_raw`]).
    code_slots: Option<Vec<usize>>,
    /// The names of those members in quotes, as searched for in the bytes
    /// after the first code.
    quoted_code_names: Vec<memmem::Finder<'static>>,
}

/// The expiry codes of [`JsonBodyRule::default_rules`].
const DEFAULT_CODES: [i64; 4] = [401, 40001, 40002, 40003];

/// The success codes at `/code` of [`JsonBodyRule::default_rules`].
const DEFAULT_SUCCESS_CODES: [&str; 4] = ["0", "200", "success", "ok"];

/// The message pointers of [`JsonBodyRule::default_rules`].
const DEFAULT_MESSAGE_POINTERS: [&str; 4] = ["/msg", "/message", "/error", "/error_description"];

/// The phrases of [`JsonBodyRule::default_rules`]: each names the token.
const DEFAULT_KEYWORDS: [&str; 28] = [
    "token过期",
    "token已过期",
    "token已失效",
    "token不存在或已过期",
    "token超时",
    "无效token",
    "token无效",
    "token异常",
    "token失效",
    "令牌已过期",
    "令牌过期",
    "令牌无效",
    "登录过期",
    "登录已过期",
    "invalid token",
    "invalid_token",
    "invalid access token",
    "token invalid",
    "token is invalid",
    "token expired",
    "token has expired",
    "token has been expired",
    "token is expired",
    "token provided is expired",
    "token provided has expired",
    "expired token",
    "expired access token",
    "access token expired",
];

/// Words that, just before a phrase, say it is about another token than the
/// access token: "CSRF token expired", "password reset token expired",
/// "验证码token过期". A refresh token's expiry is not one either: refreshing
/// cannot cure it.
const OTHER_TOKENS: [&str; 20] = [
    "csrf",
    "xsrf",
    "refresh",
    "reset",
    "password",
    "payment",
    "idempotency",
    "verification",
    "confirmation",
    "captcha",
    "activation",
    "invitation",
    "invite",
    "email",
    "page",
    "pagination",
    "continuation",
    "upload",
    "验证码",
    "刷新",
];

/// Whether `text` (lowercased) mentions `phrase` (lowercased) as a phrase:
/// not inside a longer word (`invalid token_type_hint` is not `invalid
/// token`), and not about another kind of token ([`OTHER_TOKENS`]).
fn mentions(text: &str, phrase: &str) -> bool {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let starts_word = phrase.chars().next().is_some_and(is_word);
    let ends_word = phrase.chars().next_back().is_some_and(is_word);
    text.match_indices(phrase).any(|(start, _)| {
        let before = &text[..start];
        let after = &text[start + phrase.len()..];
        let joined_before = starts_word && before.chars().next_back().is_some_and(is_word);
        let joined_after = ends_word && after.chars().next().is_some_and(is_word);
        !joined_before && !joined_after && !about_another_token(before)
    })
}

/// Whether the text before a phrase ends with a word naming another token.
fn about_another_token(before: &str) -> bool {
    let before = before.trim_end_matches([' ', '-', '_']);
    OTHER_TOKENS.iter().any(|word| {
        before.strip_suffix(word).is_some_and(|rest| {
            !rest
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric())
        })
    })
}

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
    /// - `/code` is 401, 40001, 40002 or 40003, on any status: a number of
    ///   that value in any spelling (`40003`, `40003.0`, `4.0003e4`) or a
    ///   string holding one (`"40003"`); or
    /// - the text at `/msg`, `/message`, `/error` or `/error_description`
    ///   mentions, case-insensitively and as whole words, one of
    ///   "token过期", "token已过期", "token已失效", "token不存在或已过期",
    ///   "token超时", "无效token", "token无效", "token异常", "token失效",
    ///   "令牌已过期", "令牌过期", "令牌无效", "登录过期", "登录已过期",
    ///   "invalid token", "invalid_token", "invalid access token",
    ///   "token invalid", "token is invalid", "token expired",
    ///   "token has expired", "token has been expired", "token is expired",
    ///   "token provided is expired", "token provided has expired",
    ///   "expired token", "expired access token", "access token expired";
    ///   and the response is not a success (below).
    ///
    /// A phrase right after a word naming another kind of token is not
    /// about the access token and does not count: "CSRF token expired",
    /// "password reset token expired", "refresh token expired" (refreshing
    /// cannot cure that one), "验证码token过期"; nor does a phrase inside a
    /// longer word ("invalid token_type_hint").
    ///
    /// A response is a success, and its messages are never read, when
    /// `/code` is zero or 200 (any spelling: `0`, `0.0`, `-0`, `"0"`,
    /// `"0000"`, `"200"`), `"success"` or `"ok"` (any case), or `/success`
    /// is `true`; or when the status is 2xx and no code is at `/code` or
    /// `/success` (`null` and `""` are no code). Any other code (`1`,
    /// `"E_AUTH"`, `"success": false`) is a failure whose messages are read.
    ///
    /// So `200 {"code":40003,"msg":"token过期或异常"}`,
    /// `200 {"code":1,"msg":"Token expired"}` and
    /// `403 {"error":"Token expired, please refresh"}` are expired;
    /// `200 {"code":0,"msg":"coupon expired"}`,
    /// `200 {"code":"SUCCESS","msg":"token expired, new one issued"}`,
    /// `200 {"msg":"token expired"}` and `400 {"msg":"unauthorized"}` are
    /// not.
    pub fn default_rules() -> Self {
        let mut rule = Self::new()
            .code_at("/code", DEFAULT_CODES)
            .success_codes_at("/code", DEFAULT_SUCCESS_CODES)
            .success_codes_at("/success", [true]);
        for pointer in DEFAULT_MESSAGE_POINTERS {
            rule = rule.keywords_at(pointer, DEFAULT_KEYWORDS);
        }
        rule
    }

    /// Expired when the value at `pointer` (RFC 6901, e.g. `/code` or
    /// `/error/code`) is one of `codes` (numbers, strings or booleans).
    /// Numbers, and strings that hold one, compare by numeric value (`0`,
    /// `0.0`, `"0"` and `"0000"` are equal); other strings compare trimmed
    /// and ASCII case-insensitively.
    pub fn code_at<I>(mut self, pointer: impl Into<String>, codes: I) -> Self
    where
        I: IntoIterator,
        I::Item: ToString,
    {
        self.codes
            .push((Field::new(pointer.into()), code_list(codes)));
        self.index();
        self
    }

    /// The value at `pointer` is one of `codes` on a success: such a body is
    /// never expired by a keyword, whatever its messages say. Codes compare
    /// as in [`code_at`](Self::code_at).
    pub fn success_codes_at<I>(mut self, pointer: impl Into<String>, codes: I) -> Self
    where
        I: IntoIterator,
        I::Item: ToString,
    {
        self.success_codes
            .push((Field::new(pointer.into()), code_list(codes)));
        self.index();
        self
    }

    /// Expired when the text at `pointer` mentions one of `keywords`,
    /// compared case-insensitively, and the body is not a success (see the
    /// type's docs). A keyword matches whole words only (its ends are not
    /// inside a longer ASCII word), and not right after a word naming
    /// another kind of token ("CSRF", "refresh", "password reset",
    /// "验证码" …). Prefer phrases that name the token ("token expired")
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
        self.keywords.push((Field::new(pointer.into()), keywords));
        self.index();
        self
    }

    /// Only read the bodies of responses with one of these statuses
    /// (default: any status).
    pub fn statuses(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        self.statuses = Some(statuses.into_iter().collect());
        self
    }

    /// Works out how bodies are read from the rule's pointers: which
    /// top-level members to keep, whether the whole document is needed,
    /// and whether the raw bytes can show the codes.
    fn index(&mut self) {
        let mut members = Members::default();
        let mut whole_document = false;
        let fields = self
            .codes
            .iter_mut()
            .map(|(field, _)| field)
            .chain(self.success_codes.iter_mut().map(|(field, _)| field))
            .chain(self.keywords.iter_mut().map(|(field, _)| field));
        for field in fields {
            field.slot = match field.pointer.tokens() {
                Some([first, rest @ ..]) => Some(members.add(first, !rest.is_empty())),
                _ => {
                    whole_document = true;
                    None
                }
            };
        }
        let mut code_slots = Some(Vec::new());
        for (field, _) in self.codes.iter().chain(&self.success_codes) {
            match (field.pointer.tokens(), field.slot) {
                (Some([_]), Some(slot)) if slot < INLINE => {
                    if let Some(slots) = code_slots.as_mut().filter(|s| !s.contains(&slot)) {
                        slots.push(slot);
                    }
                }
                _ => code_slots = None,
            }
        }
        let quoted_code_names = code_slots
            .iter()
            .flatten()
            .filter_map(|&slot| members.name(slot))
            .map(|name| memmem::Finder::new(&format!("\"{name}\"")).into_owned())
            .collect();
        self.reading = Reading {
            members,
            whole_document,
            code_slots,
            quoted_code_names,
        };
    }

    fn envelope(&self, json: &impl Document) -> Envelope {
        let mut envelope = Envelope::NoCode;
        for (field, _) in self.success_codes.iter().chain(&self.codes) {
            if let Some(code) = json.find(field).and_then(Code::of_leaf) {
                if self.is_success(field, &code) {
                    return Envelope::Success;
                }
                envelope = Envelope::ErrorCode;
            }
        }
        envelope
    }

    fn is_success(&self, field: &Field, code: &Code<'_>) -> bool {
        self.success_codes.iter().any(|(success, codes)| {
            success.pointer.as_str() == field.pointer.as_str() && codes.iter().any(|c| c == code)
        })
    }

    fn matches(&self, json: &impl Document, status: StatusCode) -> bool {
        self.code_hit(json) || (self.reads_messages(json, status) && self.keyword_hit(json))
    }

    /// Whether a code at a pointer is one of its expiry codes (and not a
    /// success code there).
    fn code_hit(&self, json: &impl Document) -> bool {
        self.codes.iter().any(|(field, codes)| {
            json.find(field)
                .and_then(Code::of_leaf)
                .is_some_and(|code| codes.contains(&code) && !self.is_success(field, &code))
        })
    }

    /// Whether the codes (or their absence) let the messages be read.
    fn reads_messages(&self, json: &impl Document, status: StatusCode) -> bool {
        !self.keywords.is_empty()
            && match self.envelope(json) {
                Envelope::Success => false,
                Envelope::ErrorCode => true,
                Envelope::NoCode => !status.is_success(),
            }
    }

    fn keyword_hit(&self, json: &impl Document) -> bool {
        self.keywords.iter().any(|(field, keywords)| {
            json.find(field)
                .and_then(Leaf::as_str)
                .map(str::to_lowercase)
                .is_some_and(|text| keywords.iter().any(|k| mentions(&text, k)))
        })
    }

    /// Whether the raw bytes of `body`, a JSON object, show that it is not
    /// expired: its codes hit no expiry code, and they (or their absence)
    /// keep the messages unread. Nothing is parsed.
    ///
    /// NOTE: this only ever rules expiry out, so it must agree with a parse
    /// whenever the body is JSON (a body that is not JSON is not expired
    /// either). It does: every pointer with codes names a top-level member,
    /// and `top_level_scalars` reads those members as a parse would, or
    /// gives up; the codes and the status are all `code_hit` and
    /// `reads_messages` look at.
    fn rules_out_raw(&self, body: &[u8], status: StatusCode) -> bool {
        let Some(code_slots) = &self.reading.code_slots else {
            return false;
        };
        let members = &self.reading.members;
        let slot_of = |key: &[u8]| {
            code_slots.iter().copied().find(|&slot| {
                members
                    .name(slot)
                    .is_some_and(|name| name.as_bytes() == key)
            })
        };
        let rest_is_plain = |rest: &[u8]| {
            memchr::memchr(b'\\', rest).is_none()
                && self
                    .reading
                    .quoted_code_names
                    .iter()
                    .all(|name| name.find(rest).is_none())
        };
        let mut found = RawCodes([None; INLINE]);
        top_level_scalars(body, slot_of, rest_is_plain, &mut found.0)
            && !self.code_hit(&found)
            && !self.reads_messages(&found, status)
    }
}

impl Field {
    fn new(pointer: String) -> Self {
        Self {
            pointer: JsonPointer::parse(pointer),
            slot: None,
        }
    }
}

/// A body as read for a rule: its wanted members, or all of it.
trait Document {
    /// What `field`'s pointer reaches.
    fn find(&self, field: &Field) -> Option<Leaf<'_>>;
}

impl Document for Value {
    fn find(&self, field: &Field) -> Option<Leaf<'_>> {
        field.pointer.find(self).map(Leaf::of_value)
    }
}

/// The codes read from the raw bytes, by member slot.
struct RawCodes<'b>([Option<Leaf<'b>>; INLINE]);

impl Document for RawCodes<'_> {
    fn find(&self, field: &Field) -> Option<Leaf<'_>> {
        match field.pointer.tokens()? {
            [_] => *self.0.get(field.slot?)?,
            _ => None,
        }
    }
}

impl Document for Kept<'_> {
    fn find(&self, field: &Field) -> Option<Leaf<'_>> {
        let [_, rest @ ..] = field.pointer.tokens()? else {
            return None;
        };
        self.get(field.slot?)?.find(rest)
    }
}

fn code_list<I>(codes: I) -> Vec<Code<'static>>
where
    I: IntoIterator,
    I::Item: ToString,
{
    codes
        .into_iter()
        .filter_map(|c| Code::of_text(&c.to_string()).map(Code::into_owned))
        .collect()
}

/// A business code, compared as servers mean it: by numeric value when it
/// is a number or a string holding one (`0`, `0.0`, `-0`, `0e0`, `"0"` and
/// `"0000"` are all zero; `40003`, `4.0003e4` and `"40003"` are equal),
/// otherwise as text, ASCII case-insensitively and trimmed (`"OK"` is
/// `"ok"`; `true` is `"true"`). A code read from a body borrows its text.
#[derive(Debug, Clone)]
enum Code<'a> {
    Integer(i128),
    Fraction(f64),
    Text(Cow<'a, str>),
}

impl<'b> PartialEq<Code<'b>> for Code<'_> {
    fn eq(&self, other: &Code<'b>) -> bool {
        match (self, other) {
            (Self::Integer(a), Code::Integer(b)) => a == b,
            (Self::Fraction(a), Code::Fraction(b)) => a == b,
            (Self::Text(a), Code::Text(b)) => a.eq_ignore_ascii_case(b),
            _ => false,
        }
    }
}

impl<'a> Code<'a> {
    /// The code a JSON value holds: a number, a non-empty string or a
    /// boolean; `null`, `""`, objects and arrays hold none.
    fn of_leaf(value: Leaf<'a>) -> Option<Self> {
        match value {
            Leaf::Signed(i) => Some(Self::Integer(i128::from(i))),
            Leaf::Unsigned(u) => Some(Self::Integer(i128::from(u))),
            Leaf::Float(f) => Some(Self::of_float(f)),
            Leaf::Text(text) => Self::of_text(text),
            Leaf::Bool(b) => Some(Self::Text(Cow::Borrowed(if b { "true" } else { "false" }))),
            Leaf::Null | Leaf::Composite => None,
        }
    }

    fn of_text(text: &'a str) -> Option<Self> {
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        if let Ok(i) = text.parse::<i128>() {
            return Some(Self::Integer(i));
        }
        // NOTE: only text that reads as a number (digits, a sign, a point,
        // an exponent): Rust's float parser also takes "inf" and "NaN".
        let numeric = text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.' | b'e' | b'E'))
            && text.bytes().any(|b| b.is_ascii_digit());
        match text.parse::<f64>() {
            Ok(f) if numeric && f.is_finite() => Some(Self::of_float(f)),
            _ => Some(Self::Text(Cow::Borrowed(text))),
        }
    }

    fn of_float(f: f64) -> Self {
        // NOTE: integral floats within i64 are integers (-0.0 is 0); the
        // cast is exact there.
        if f.fract() == 0.0 && f.abs() < 9.0e18 {
            Self::Integer(f as i128)
        } else {
            Self::Fraction(f)
        }
    }

    /// The code, kept by the rule: text lowercased, as the docs show it.
    fn into_owned(self) -> Code<'static> {
        match self {
            Self::Integer(i) => Code::Integer(i),
            Self::Fraction(f) => Code::Fraction(f),
            Self::Text(text) => Code::Text(Cow::Owned(text.to_ascii_lowercase())),
        }
    }
}

/// Whether the response says its body is one JSON document (not a stream
/// of them: a `stream=` parameter, as in Kubernetes'
/// `application/json;stream=watch`, says the body never ends).
pub(crate) fn is_json(content_type: Option<&HeaderValue>) -> bool {
    let Some(value) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    // NOTE: `to_str` leaves only visible ASCII and tabs, where ASCII
    // trimming is `str::trim`.
    let mut parts = value.as_bytes().split(|&b| b == b';');
    let essence = parts.next().unwrap_or_default().trim_ascii();
    let starts_with = |prefix: &[u8]| {
        essence
            .get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
    };
    let ends_with = |suffix: &[u8]| {
        essence
            .len()
            .checked_sub(suffix.len())
            .is_some_and(|start| essence[start..].eq_ignore_ascii_case(suffix))
    };
    let json = essence.eq_ignore_ascii_case(b"application/json")
        || essence.eq_ignore_ascii_case(b"text/json")
        || (starts_with(b"application/") && ends_with(b"+json"));
    json && !parts.any(|param| {
        let name = param.split(|&b| b == b'=').next().unwrap_or_default();
        name.trim_ascii().eq_ignore_ascii_case(b"stream")
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
        if is_json(head.content_type()) {
            HeadVerdict::NeedBody
        } else {
            HeadVerdict::NotExpired
        }
    }

    fn check_body(&self, head: &ResponseHead<'_>, body: &[u8]) -> bool {
        // RFC 8259 §8.1: a parser may ignore a byte order mark.
        let body = body.strip_prefix(UTF8_BOM).unwrap_or(body);
        let object = match body.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => true,
            Some(b'[') => false,
            _ => return false,
        };
        let status = head.status();
        if object && self.rules_out_raw(body, status) {
            return false;
        }
        let whole = |body| {
            serde_json::from_slice::<Value>(body).is_ok_and(|json| self.matches(&json, status))
        };
        if self.reading.whole_document {
            return whole(body);
        }
        match self.reading.members.read(body) {
            Ok(Some(kept)) => self.matches(&kept, status),
            // An array at the top: pointers may index into it.
            Ok(None) => whole(body),
            Err(_) => false,
        }
    }
}

/// The UTF-8 encoding of U+FEFF.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

#[cfg(test)]
mod tests {
    use http::Version;

    use http::HeaderMap;
    use http::header::CONTENT_TYPE;

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

    #[test]
    fn a_success_code_in_any_spelling_is_a_success() {
        for body in [
            r#"{"code":"0","msg":"token expired, new one issued"}"#,
            r#"{"code":"200","msg":"token expired, new one issued"}"#,
            r#"{"code":" 0 ","msg":"token expired"}"#,
            r#"{"code":0.0,"msg":"token expired, new one issued"}"#,
            r#"{"code":200.0,"msg":"token expired, new one issued"}"#,
            r#"{"code":0e0,"msg":"token expired, new one issued"}"#,
            r#"{"code":-0,"msg":"token expired, new one issued"}"#,
            r#"{"code":-0.0,"msg":"token expired, new one issued"}"#,
            r#"{"code":"0000","msg":"token expired, new one issued"}"#,
            r#"{"code":"SUCCESS","msg":"token expired, new one issued"}"#,
            r#"{"code":"OK","msg":"token expired, new one issued"}"#,
            r#"{"code":"success","msg":"token expired, new one issued"}"#,
            r#"{"success":true,"msg":"token expired, new one issued"}"#,
            r#"{"code":"","msg":"old token expired; new token issued"}"#,
            r#"{"code":null,"msg":"token expired"}"#,
        ] {
            assert!(!expired(body), "{body}");
        }
        // A failure spelled out is still read.
        assert!(expired(r#"{"success":false,"msg":"token expired"}"#));
        assert!(expired(r#"{"code":"FAIL","msg":"token expired"}"#));
    }

    #[test]
    fn an_expiry_code_in_any_spelling_is_expiry() {
        for body in [
            r#"{"code":40003.0}"#,
            r#"{"code":4.0003e4}"#,
            r#"{"code":"40003.0"}"#,
            r#"{"code":401.0,"msg":"x"}"#,
            r#"{"code":"+40003"}"#,
            r#"{"code":" 40001 "}"#,
        ] {
            assert!(expired(body), "{body}");
        }
        assert!(!expired(r#"{"code":40003.5}"#));
        assert!(!expired(r#"{"code":"40003x"}"#));
        assert!(!expired(r#"{"code":"inf"}"#));
    }

    #[test]
    fn text_codes_compare_trimmed_and_case_insensitively() {
        let headers = head_with("application/json");
        let head = ResponseHead::new(StatusCode::OK, Version::HTTP_11, &headers);
        let rule = JsonBodyRule::new().code_at("/code", ["E_TOKEN_EXPIRED"]);
        assert!(rule.check_body(&head, br#"{"code":"e_token_expired "}"#));
        assert!(!rule.check_body(&head, br#"{"code":"E_TOKEN"}"#));
    }

    #[test]
    fn phrases_about_other_tokens_are_not_expiry() {
        for (status, body) in [
            (400, r#"{"code":1001,"msg":"Password reset token expired"}"#),
            (403, r#"{"message":"CSRF token expired"}"#),
            (403, r#"{"message":"csrf-token expired"}"#),
            (422, r#"{"error":"payment token is invalid"}"#),
            (
                400,
                r#"{"error":"invalid_grant","error_description":"Refresh token expired"}"#,
            ),
            (200, r#"{"code":2,"msg":"验证码token过期"}"#),
            (400, r#"{"error":"invalid token_type_hint"}"#),
            (409, r#"{"message":"idempotency token expired"}"#),
            (400, r#"{"message":"mytoken expired"}"#),
        ] {
            assert!(!expired_with(status, body), "{status} {body}");
        }
        // The access token named as such still counts.
        assert!(expired_with(401, r#"{"message":"Access token expired"}"#));
        assert!(expired_with(403, r#"{"message":"token expired."}"#));
    }

    #[test]
    fn common_phrases_about_the_access_token_are_expiry() {
        for msg in [
            "token已失效",
            "登录已过期，请重新登录",
            "令牌已过期",
            "token不存在或已过期",
            "Token has been expired",
            "Access token is expired",
            "The access token provided is expired",
            "Invalid access token",
            "token超时",
            "Token expired, please refresh",
            "token过期或异常",
            "无效token",
        ] {
            let body = format!(r#"{{"code":1,"msg":"{msg}"}}"#);
            assert!(expired(&body), "{msg}");
        }
    }

    /// `is_json` as it was written first, lowercasing into a new string.
    fn is_json_by_lowercasing(value: &str) -> bool {
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

    proptest::proptest! {
        #[test]
        fn is_json_reads_content_types_as_lowercasing_did(
            pieces in proptest::collection::vec(
                proptest::sample::select(vec![
                    "application/json", "APPLICATION/Json", "text/json", "TEXT/JSON", "application/",
                    "Application/", "vnd.api", "+json", "+JSON", "json", "+", " ", "\t", ";", "=",
                    "stream", "Stream", "charset", "utf-8", "\"", "x", "/",
                ]),
                0..8,
            )
        ) {
            let value = pieces.concat();
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, value.parse().unwrap());
            proptest::prop_assert_eq!(is_json(headers.get(CONTENT_TYPE)), is_json_by_lowercasing(&value), "{:?}", value);
        }
    }

    #[test]
    fn the_raw_look_rules_out_what_it_can_see() {
        let rule = JsonBodyRule::default_rules();
        let ok = StatusCode::OK;
        let bad = StatusCode::BAD_REQUEST;
        for (status, body) in [
            (
                ok,
                r#"{"code":0,"msg":"ok","data":{"id":42,"name":"widget","price":1999}}"#,
            ),
            (
                ok,
                r#" {"msg":"\u6210\u529f","data":[{"code":40003}],"code":"200"}"#,
            ),
            (
                bad,
                r#"{"code":"SUCCESS","msg":"token expired, new one issued"}"#,
            ),
            (ok, r#"{"code":40003,"code":0}"#),
            (ok, r#"{"success":true,"msg":"token expired"}"#),
            (
                ok,
                r#"{"id":7,"items":[{"code":40003}],"msg":"token expired"}"#,
            ),
            (ok, r#"{"code":null,"error":"token expired"}"#),
        ] {
            assert!(
                rule.rules_out_raw(body.as_bytes(), status),
                "{status} {body}"
            );
            let headers = head_with("application/json");
            let head = ResponseHead::new(status, Version::HTTP_11, &headers);
            assert!(!rule.check_body(&head, body.as_bytes()), "{status} {body}");
        }
        for (status, body, want) in [
            (ok, r#"{"code":0,"code":40003}"#, true),
            (ok, r#"{"code":0,"\u0063ode":40003}"#, true),
            (ok, r#"{"code":0.0,"msg":"ok"}"#, false),
            (ok, r#"{"code":1,"msg":"token expired"}"#, true),
            (ok, r#"{"success":false,"msg":"token expired"}"#, true),
            (bad, r#"{"msg":"token expired"}"#, true),
            (bad, r#"{"msg":"unknown field"}"#, false),
            (
                ok,
                r#"{"data":{"code":0},"msg":"token expired","code":1}"#,
                true,
            ),
        ] {
            assert!(
                !rule.rules_out_raw(body.as_bytes(), status),
                "{status} {body}"
            );
            let headers = head_with("application/json");
            let head = ResponseHead::new(status, Version::HTTP_11, &headers);
            assert_eq!(
                rule.check_body(&head, body.as_bytes()),
                want,
                "{status} {body}"
            );
        }
        // Only when every pointer with codes names a top-level member.
        let deep = JsonBodyRule::default_rules().code_at("/error/code", [401]);
        assert!(!deep.rules_out_raw(br#"{"code":0}"#, ok));
        let headers = head_with("application/json");
        let head = ResponseHead::new(ok, Version::HTTP_11, &headers);
        assert!(deep.check_body(&head, br#"{"code":0,"error":{"code":401}}"#));
        // A rule with codes only rules out any other code.
        let codes = JsonBodyRule::new().code_at("/code", [40003]);
        assert!(codes.rules_out_raw(br#"{"code":1,"msg":"token expired"}"#, bad));
        assert!(!codes.rules_out_raw(br#"{"code":40003}"#, ok));
    }

    #[test]
    fn debug_shows_the_rule_as_written() {
        let rule = JsonBodyRule::new()
            .code_at("/a~1b", ["OK"])
            .keywords_at("/msg", ["Token Expired"]);
        assert_eq!(
            format!("{rule:?}"),
            r#"JsonBodyRule { codes: [("/a~1b", [Text("ok")])], success_codes: [], keywords: [("/msg", ["token expired"])], statuses: None }"#
        );
    }
}
