//! [`BearerChallenge`]: RFC 6750 `WWW-Authenticate: Bearer error="invalid_token"`.

use http::HeaderMap;
use http::header::WWW_AUTHENTICATE;

use super::{ExpiryDetector, HeadVerdict, ResponseHead};

/// Expired when a `WWW-Authenticate` header carries a `Bearer` challenge
/// with `error="invalid_token"` (RFC 6750 §3.1), whatever the status.
/// `insufficient_scope` and the other errors are a firm "not expired"
/// ([`HeadVerdict::Veto`]): in an [`Or`](crate::Or), no other detector can
/// overrule them.
///
/// The header is read on its bytes (several challenges per header, several
/// headers, quoted strings with escapes, any scheme and parameter case,
/// UTF-8 in quoted strings) and leniently: a token68 challenge
/// (`Negotiate abc==`), empty list elements, extra spaces, a missing comma
/// or a malformed challenge of another scheme do not hide the `Bearer`
/// challenge's `error`. The error is compared case-insensitively and
/// trimmed (`"INVALID_TOKEN "` is `invalid_token`); an empty `error=""`
/// counts as no error.
///
/// ```
/// use http::{HeaderMap, StatusCode, Version};
/// use tower_auth_refresh::{BearerChallenge, ExpiryDetector, HeadVerdict, ResponseHead};
///
/// let mut headers = HeaderMap::new();
/// headers.insert(
///     "www-authenticate",
///     r#"Basic realm="api", Bearer realm="api", error="invalid_token", error_description="The access token expired""#
///         .parse()
///         .unwrap(),
/// );
/// let head = ResponseHead::new(StatusCode::FORBIDDEN, Version::HTTP_11, &headers);
/// assert_eq!(BearerChallenge::new().check_head(&head), HeadVerdict::Expired);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct BearerChallenge;

impl BearerChallenge {
    /// The detector.
    pub fn new() -> Self {
        Self
    }
}

impl ExpiryDetector for BearerChallenge {
    fn check_head(&self, head: &ResponseHead<'_>) -> HeadVerdict {
        match bearer_error(head.headers()) {
            Some(error) if error == "invalid_token" => HeadVerdict::Expired,
            Some(_) => HeadVerdict::Veto,
            None => HeadVerdict::NotExpired,
        }
    }
}

/// The `error` parameter of the first `Bearer` challenge that names one,
/// if any `WWW-Authenticate` header carries such a challenge; lowercased
/// and trimmed (`"INVALID_TOKEN "` is `invalid_token`). An empty `error`
/// counts as none.
///
/// NOTE: read leniently, on the header's bytes: a challenge this reader
/// cannot make sense of must never hide a `Bearer` challenge's `error`
/// elsewhere in the header (a firm `insufficient_scope` would otherwise
/// turn into "expired" and a POST would be replayed). See
/// [`challenge_params`] for what is tolerated.
pub(crate) fn bearer_error(headers: &HeaderMap) -> Option<String> {
    headers.get_all(WWW_AUTHENTICATE).iter().find_map(|value| {
        challenge_params(value.as_bytes())
            .into_iter()
            .filter(|(scheme, name, _)| {
                scheme.eq_ignore_ascii_case(b"bearer") && name.eq_ignore_ascii_case(b"error")
            })
            .map(|(_, _, value)| String::from_utf8_lossy(&value).trim().to_ascii_lowercase())
            .find(|error| !error.is_empty())
    })
}

/// One lexical item of a `WWW-Authenticate` value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Item<'a> {
    /// A run of bytes up to whitespace, `,` or `=` (a scheme, a parameter
    /// name, a bare value or a token68's start).
    Word(&'a [u8]),
    /// A quoted string, unescaped; an unterminated one runs to the end.
    Quoted(Vec<u8>),
    Equals,
    Comma,
}

fn items(value: &[u8]) -> Vec<Item<'_>> {
    let mut items = Vec::new();
    let mut i = 0;
    while let Some(&byte) = value.get(i) {
        match byte {
            b' ' | b'\t' => i += 1,
            b',' => {
                items.push(Item::Comma);
                i += 1;
            }
            b'=' => {
                items.push(Item::Equals);
                i += 1;
            }
            b'"' => {
                let mut text = Vec::new();
                i += 1;
                while let Some(&byte) = value.get(i) {
                    i += 1;
                    match byte {
                        b'"' => break,
                        b'\\' => {
                            if let Some(&escaped) = value.get(i) {
                                text.push(escaped);
                                i += 1;
                            }
                        }
                        other => text.push(other),
                    }
                }
                items.push(Item::Quoted(text));
            }
            _ => {
                let start = i;
                while value
                    .get(i)
                    .is_some_and(|b| !matches!(b, b' ' | b'\t' | b',' | b'='))
                {
                    i += 1;
                }
                items.push(Item::Word(&value[start..i]));
            }
        }
    }
    items
}

/// The parameters of every challenge in one `WWW-Authenticate` value, as
/// `(scheme, name, value)`.
///
/// RFC 9110 §11.6.1 grammar, read leniently: a word not followed by `=`
/// starts a challenge; `name = value` (spaces around `=` allowed, value a
/// token or a quoted string with escapes) is a parameter of the current
/// challenge; a token68 (`abc==`) is skipped; empty list elements, a
/// missing comma between parameters, extra spaces, UTF-8 in quoted strings
/// and a stray quote inside another challenge's bare value are tolerated.
fn challenge_params(value: &[u8]) -> Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let items = items(value);
    let mut params = Vec::new();
    let mut scheme: Option<&[u8]> = None;
    let mut i = 0;
    while let Some(item) = items.get(i) {
        let Item::Word(word) = item else {
            i += 1;
            continue;
        };
        if items.get(i + 1) != Some(&Item::Equals) {
            scheme = Some(word);
            i += 1;
            continue;
        }
        // `name =` then a value, or a token68's padding (`abc==`, `abc=,`).
        let value = match items.get(i + 2) {
            Some(Item::Word(value)) => Some(value.to_vec()),
            Some(Item::Quoted(value)) => Some(value.clone()),
            _ => None,
        };
        match (scheme, value) {
            (Some(scheme), Some(value)) => {
                params.push((scheme.to_vec(), word.to_vec(), value));
                i += 3;
            }
            (_, Some(_)) => i += 3,
            (_, None) => {
                i += 2;
                while items.get(i) == Some(&Item::Equals) {
                    i += 1;
                }
            }
        }
    }
    params
}

#[cfg(test)]
mod tests {
    use http::{StatusCode, Version};

    use super::*;

    fn verdict(values: &[&str]) -> HeadVerdict {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(WWW_AUTHENTICATE, value.parse().unwrap());
        }
        let head = ResponseHead::new(StatusCode::UNAUTHORIZED, Version::HTTP_11, &headers);
        BearerChallenge::new().check_head(&head)
    }

    #[test]
    fn invalid_token_is_expiry_and_other_errors_are_not() {
        assert_eq!(
            verdict(&[r#"Bearer error="invalid_token""#]),
            HeadVerdict::Expired
        );
        assert_eq!(
            verdict(&[r#"bearer ERROR="invalid_token""#]),
            HeadVerdict::Expired
        );
        assert_eq!(
            verdict(&[r#"Bearer error="insufficient_scope", scope="admin""#]),
            HeadVerdict::Veto
        );
        assert_eq!(
            verdict(&[r#"Bearer error="invalid_request""#]),
            HeadVerdict::Veto
        );
        assert_eq!(verdict(&[r#"Bearer realm="x""#]), HeadVerdict::NotExpired);
        assert_eq!(verdict(&[]), HeadVerdict::NotExpired);
    }

    #[test]
    fn several_challenges_and_headers() {
        assert_eq!(
            verdict(&[r#"Basic realm="x", Bearer realm="y", error="invalid_token""#]),
            HeadVerdict::Expired
        );
        assert_eq!(
            verdict(&[r#"Basic realm="x""#, r#"Bearer error="invalid_token""#]),
            HeadVerdict::Expired
        );
        // A quoted comma or scheme name inside another challenge is not a challenge.
        assert_eq!(
            verdict(&[r#"Basic realm="Bearer error=\"invalid_token\", x""#]),
            HeadVerdict::NotExpired
        );
    }

    #[test]
    fn malformed_headers_are_not_expiry() {
        assert_eq!(verdict(&["=,=,="]), HeadVerdict::NotExpired);
        assert_eq!(verdict(&["Bearer error="]), HeadVerdict::NotExpired);
        assert_eq!(verdict(&[r#"Bearer ="x""#]), HeadVerdict::NotExpired);
    }

    fn verdict_of_bytes(value: &[u8]) -> HeadVerdict {
        let mut headers = HeaderMap::new();
        headers.append(
            WWW_AUTHENTICATE,
            http::HeaderValue::from_bytes(value).unwrap(),
        );
        let head = ResponseHead::new(StatusCode::UNAUTHORIZED, Version::HTTP_11, &headers);
        BearerChallenge::new().check_head(&head)
    }

    #[test]
    fn a_scope_error_is_found_in_every_challenge_servers_write() {
        let cases: &[&[u8]] = &[
            br#"Bearer error="insufficient_scope""#,
            br#"Basic realm="api", Bearer error="insufficient_scope""#,
            br#"Bearer realm="api", error="insufficient_scope", scope="a b""#,
            br#"Bearer error=insufficient_scope"#,
            br#"bearer ERROR="insufficient_scope""#,
            br#"Bearer error = "insufficient_scope""#,
            br#"Bearer error="insufficient_scope","#,
            br#"Bearer ,error="insufficient_scope""#,
            br#"Bearer  error="insufficient_scope""#,
            b"Bearer\terror=\"insufficient_scope\"",
            br#"Bearer error="insufficient_scope", error_description="The request requires higher privileges than provided by the access token.", error_uri="https://tools.ietf.org/html/rfc6750#section-3.1""#,
            br#"Bearer realm="x", error="insufficient_scope", error_description="a \"quoted\" word""#,
            "Bearer error=\"insufficient_scope\", error_description=\"权限不足\"".as_bytes(),
            "Bearer realm=\"Zürich\", error=\"insufficient_scope\"".as_bytes(),
            br#"Basic realm=unterminated", Bearer error="insufficient_scope""#,
            br#"Negotiate, Bearer error="insufficient_scope""#,
            br#"Negotiate abc==, Bearer error="insufficient_scope""#,
            br#"Negotiate abc=, Bearer error="insufficient_scope""#,
            br#"Bearer realm="x" error="insufficient_scope""#,
        ];
        for value in cases {
            assert_eq!(
                verdict_of_bytes(value),
                HeadVerdict::Veto,
                "{}",
                String::from_utf8_lossy(value)
            );
        }
    }

    #[test]
    fn invalid_token_is_compared_case_insensitively_and_trimmed() {
        for value in [
            &br#"Bearer error="INVALID_TOKEN""#[..],
            br#"Bearer error="invalid_token ""#,
            br#"Bearer error=invalid_token"#,
            "Bearer error=\"invalid_token\", error_description=\"令牌已过期\"".as_bytes(),
        ] {
            assert_eq!(
                verdict_of_bytes(value),
                HeadVerdict::Expired,
                "{}",
                String::from_utf8_lossy(value)
            );
        }
        // An empty error names nothing: no veto.
        assert_eq!(
            verdict_of_bytes(br#"Bearer error="""#),
            HeadVerdict::NotExpired
        );
    }
}
