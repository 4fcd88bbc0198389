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
/// The header is parsed with a real challenge parser (several challenges per
/// header, several headers, quoted strings with escapes, any scheme case);
/// a header that does not parse counts as no challenge.
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

/// The `error` parameter of the first `Bearer` challenge that has one, if
/// any `WWW-Authenticate` header carries such a challenge.
pub(crate) fn bearer_error(headers: &HeaderMap) -> Option<String> {
    for value in headers.get_all(WWW_AUTHENTICATE) {
        let Ok(text) = value.to_str() else {
            continue;
        };
        let Ok(challenges) = http_auth::parse_challenges(text) else {
            continue;
        };
        for challenge in challenges {
            if !challenge.scheme.eq_ignore_ascii_case("bearer") {
                continue;
            }
            if let Some((_, value)) = challenge
                .params
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case("error"))
            {
                return Some(value.to_unescaped());
            }
        }
    }
    None
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
        assert_eq!(
            verdict(&[r#"Bearer error="unterminated"#]),
            HeadVerdict::NotExpired
        );
        assert_eq!(verdict(&["=,=,="]), HeadVerdict::NotExpired);
    }
}
