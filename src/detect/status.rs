//! Status-code detectors: [`Unauthorized`] (the default) and
//! [`StatusDetector`].

use http::StatusCode;

use super::{ExpiryDetector, HeadVerdict, ResponseHead, bearer_error};

/// The default detector: a `401 Unauthorized` means the token expired,
/// unless its `Bearer` challenge names another error than `invalid_token`
/// (`insufficient_scope`, `invalid_request`: refreshing would not help).
/// Such a challenge, on a 401 or any other 4xx (RFC 6750 sends
/// `insufficient_scope` with a 403), is a [`HeadVerdict::Veto`]: in an
/// [`Or`](crate::Or), no body rule can turn it into an expired token.
///
/// ```
/// use http::{HeaderMap, StatusCode, Version};
/// use tower_auth_refresh::{ExpiryDetector, HeadVerdict, ResponseHead, Unauthorized};
///
/// let plain = HeaderMap::new();
/// let head = ResponseHead::new(StatusCode::UNAUTHORIZED, Version::HTTP_11, &plain);
/// assert_eq!(Unauthorized::new().check_head(&head), HeadVerdict::Expired);
///
/// let mut scope = HeaderMap::new();
/// scope.insert("www-authenticate", r#"Bearer error="insufficient_scope""#.parse().unwrap());
/// let head = ResponseHead::new(StatusCode::UNAUTHORIZED, Version::HTTP_11, &scope);
/// assert_eq!(Unauthorized::new().check_head(&head), HeadVerdict::Veto);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Unauthorized;

impl Unauthorized {
    /// The detector.
    pub fn new() -> Self {
        Self
    }
}

impl ExpiryDetector for Unauthorized {
    fn check_head(&self, head: &ResponseHead<'_>) -> HeadVerdict {
        // NOTE: the hot path: a success is judged on its status alone.
        if !head.status().is_client_error() {
            return HeadVerdict::NotExpired;
        }
        match bearer_error(head.headers()) {
            Some(error) if error != "invalid_token" => HeadVerdict::Veto,
            _ if head.status() == StatusCode::UNAUTHORIZED => HeadVerdict::Expired,
            _ => HeadVerdict::NotExpired,
        }
    }
}

/// Expired when the status is one of a given set, for APIs that say
/// "session expired" with their own code (419, 440 …).
///
/// ```
/// use http::{HeaderMap, StatusCode, Version};
/// use tower_auth_refresh::{ExpiryDetector, HeadVerdict, ResponseHead, StatusDetector};
///
/// let detector = StatusDetector::new([StatusCode::from_u16(419).unwrap()]);
/// let headers = HeaderMap::new();
/// let head = ResponseHead::new(StatusCode::from_u16(419).unwrap(), Version::HTTP_11, &headers);
/// assert_eq!(detector.check_head(&head), HeadVerdict::Expired);
/// ```
#[derive(Debug, Clone)]
pub struct StatusDetector {
    statuses: Vec<StatusCode>,
}

impl StatusDetector {
    /// Expired on any of `statuses`.
    pub fn new(statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        Self {
            statuses: statuses.into_iter().collect(),
        }
    }
}

impl ExpiryDetector for StatusDetector {
    fn check_head(&self, head: &ResponseHead<'_>) -> HeadVerdict {
        if self.statuses.contains(&head.status()) {
            HeadVerdict::Expired
        } else {
            HeadVerdict::NotExpired
        }
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, Version};

    use super::*;

    fn verdict(status: u16, challenge: Option<&str>) -> HeadVerdict {
        let mut headers = HeaderMap::new();
        if let Some(challenge) = challenge {
            headers.insert("www-authenticate", challenge.parse().unwrap());
        }
        let head = ResponseHead::new(
            StatusCode::from_u16(status).unwrap(),
            Version::HTTP_11,
            &headers,
        );
        Unauthorized::new().check_head(&head)
    }

    #[test]
    fn only_401_without_another_bearer_error() {
        assert_eq!(verdict(401, None), HeadVerdict::Expired);
        assert_eq!(
            verdict(401, Some(r#"Bearer error="invalid_token""#)),
            HeadVerdict::Expired
        );
        assert_eq!(
            verdict(401, Some(r#"Basic realm="x""#)),
            HeadVerdict::Expired
        );
        assert_eq!(
            verdict(401, Some(r#"Bearer error="insufficient_scope""#)),
            HeadVerdict::Veto
        );
        assert_eq!(
            verdict(403, Some(r#"Bearer error="insufficient_scope""#)),
            HeadVerdict::Veto
        );
        assert_eq!(
            verdict(200, Some(r#"Bearer error="insufficient_scope""#)),
            HeadVerdict::NotExpired
        );
        assert_eq!(verdict(403, None), HeadVerdict::NotExpired);
        assert_eq!(verdict(200, None), HeadVerdict::NotExpired);
    }
}
