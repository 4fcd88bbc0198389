//! Combining detectors ([`Or`], [`ExpiryDetectorExt::or`]) and closure
//! adapters ([`detector_fn`], [`body_detector_fn`]).

use std::fmt;

use super::{ExpiryDetector, HeadVerdict, ResponseHead};

/// Expired when either detector says so, unless one of them vetoes; see
/// [`ExpiryDetectorExt::or`].
///
/// The head verdict of `a.or(b)` (symmetric in `a` and `b`):
///
/// | `a` \ `b`   | `Veto` | `Expired` | `NeedBody` | `NotExpired` |
/// |--------------|--------|-----------|------------|--------------|
/// | `Veto`       | `Veto` | `Veto`    | `Veto`     | `Veto`       |
/// | `Expired`    | `Veto` | `Expired` | `Expired`  | `Expired`    |
/// | `NeedBody`   | `Veto` | `Expired` | `NeedBody` | `NeedBody`   |
/// | `NotExpired` | `Veto` | `Expired` | `NeedBody` | `NotExpired` |
///
/// A [`HeadVerdict::Veto`] (a `Bearer` challenge naming another error than
/// `invalid_token`, from [`Unauthorized`](crate::Unauthorized) or
/// [`BearerChallenge`](crate::BearerChallenge)) wins over everything: the
/// body is not read and the response is handed on. On `NeedBody`, the body
/// is shown to each side that asked for it, and the response is expired
/// when one of them says so.
///
/// ```
/// use http::{HeaderMap, StatusCode, Version};
/// use tower_auth_refresh::{ExpiryDetector, ExpiryDetectorExt, HeadVerdict, JsonBodyRule, ResponseHead, Unauthorized};
///
/// let detector = Unauthorized::new().or(JsonBodyRule::default_rules());
/// let mut headers = HeaderMap::new();
/// headers.insert("content-type", "application/json".parse().unwrap());
/// headers.insert("www-authenticate", r#"Bearer error="insufficient_scope""#.parse().unwrap());
/// let head = ResponseHead::new(StatusCode::UNAUTHORIZED, Version::HTTP_11, &headers);
/// // The JSON rule would ask for the body; the challenge settles it.
/// assert_eq!(detector.check_head(&head), HeadVerdict::Veto);
/// ```
#[derive(Debug, Clone)]
pub struct Or<A, B> {
    first: A,
    second: B,
}

/// The head verdict of an [`Or`] of two verdicts.
fn either(a: HeadVerdict, b: HeadVerdict) -> HeadVerdict {
    use HeadVerdict::{Expired, NeedBody, NotExpired, Veto};
    match (a, b) {
        (Veto, _) | (_, Veto) => Veto,
        (Expired, _) | (_, Expired) => Expired,
        (NeedBody, _) | (_, NeedBody) => NeedBody,
        (NotExpired, NotExpired) => NotExpired,
    }
}

impl<A: ExpiryDetector, B: ExpiryDetector> ExpiryDetector for Or<A, B> {
    fn check_head(&self, head: &ResponseHead<'_>) -> HeadVerdict {
        either(self.first.check_head(head), self.second.check_head(head))
    }

    fn check_body(&self, head: &ResponseHead<'_>, body: &[u8]) -> bool {
        let (first, second) = (self.first.check_head(head), self.second.check_head(head));
        if either(first, second) != HeadVerdict::NeedBody {
            return either(first, second) == HeadVerdict::Expired;
        }
        (first == HeadVerdict::NeedBody && self.first.check_body(head, body))
            || (second == HeadVerdict::NeedBody && self.second.check_body(head, body))
    }
}

/// Combinators for every [`ExpiryDetector`].
///
/// ```
/// use tower_auth_refresh::{BearerChallenge, ExpiryDetectorExt, JsonBodyRule, Unauthorized};
///
/// // A 401, an `invalid_token` challenge on any status, or a JSON business code.
/// let detector = Unauthorized::new()
///     .or(BearerChallenge::new())
///     .or(JsonBodyRule::default_rules());
/// # let _ = detector;
/// ```
pub trait ExpiryDetectorExt: ExpiryDetector + Sized {
    /// Expired when `self` or `other` says so, unless one of them vetoes
    /// (the truth table is on [`Or`]). The body is read only if one of them
    /// asks for it.
    fn or<D: ExpiryDetector>(self, other: D) -> Or<Self, D> {
        Or {
            first: self,
            second: other,
        }
    }
}

impl<T: ExpiryDetector> ExpiryDetectorExt for T {}

/// A detector from a closure over the response head; see [`detector_fn`].
#[derive(Clone)]
pub struct DetectorFn<F>(F);

impl<F> fmt::Debug for DetectorFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DetectorFn")
    }
}

/// A detector that decides from the response head alone.
///
/// ```
/// use tower_auth_refresh::detector_fn;
///
/// // An API that answers 419 with a header saying why.
/// let detector = detector_fn(|head| {
///     head.status().as_u16() == 419 && head.headers().contains_key("x-session-expired")
/// });
/// # let _ = detector;
/// ```
pub fn detector_fn<F>(f: F) -> DetectorFn<F>
where
    F: Fn(&ResponseHead<'_>) -> bool + Send + Sync + 'static,
{
    DetectorFn(f)
}

impl<F> ExpiryDetector for DetectorFn<F>
where
    F: Fn(&ResponseHead<'_>) -> bool + Send + Sync + 'static,
{
    fn check_head(&self, head: &ResponseHead<'_>) -> HeadVerdict {
        if (self.0)(head) {
            HeadVerdict::Expired
        } else {
            HeadVerdict::NotExpired
        }
    }
}

/// A detector from a closure over the head and body; see
/// [`body_detector_fn`].
#[derive(Clone)]
pub struct BodyDetectorFn<F>(F);

impl<F> fmt::Debug for BodyDetectorFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BodyDetectorFn")
    }
}

/// A detector that reads the body of every response. It is shown only
/// bodies that fit in the layer's peek limit (a longer body is not expired);
/// prefer a head check first where one exists.
///
/// ```
/// use tower_auth_refresh::body_detector_fn;
///
/// let detector = body_detector_fn(|head, body| {
///     head.status().is_success() && body.starts_with(b"ERR_SESSION")
/// });
/// # let _ = detector;
/// ```
pub fn body_detector_fn<F>(f: F) -> BodyDetectorFn<F>
where
    F: Fn(&ResponseHead<'_>, &[u8]) -> bool + Send + Sync + 'static,
{
    BodyDetectorFn(f)
}

impl<F> ExpiryDetector for BodyDetectorFn<F>
where
    F: Fn(&ResponseHead<'_>, &[u8]) -> bool + Send + Sync + 'static,
{
    fn check_head(&self, _head: &ResponseHead<'_>) -> HeadVerdict {
        HeadVerdict::NeedBody
    }

    fn check_body(&self, head: &ResponseHead<'_>, body: &[u8]) -> bool {
        (self.0)(head, body)
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, StatusCode, Version};

    use super::*;
    use crate::{JsonBodyRule, Unauthorized};

    #[test]
    fn or_asks_for_the_body_only_when_one_side_does() {
        let detector = Unauthorized::new().or(JsonBodyRule::default_rules());
        let mut json = HeaderMap::new();
        json.insert("content-type", "application/json".parse().unwrap());
        let plain = HeaderMap::new();

        let unauthorized = ResponseHead::new(StatusCode::UNAUTHORIZED, Version::HTTP_11, &plain);
        assert_eq!(detector.check_head(&unauthorized), HeadVerdict::Expired);
        let ok_plain = ResponseHead::new(StatusCode::OK, Version::HTTP_11, &plain);
        assert_eq!(detector.check_head(&ok_plain), HeadVerdict::NotExpired);
        let ok_json = ResponseHead::new(StatusCode::OK, Version::HTTP_11, &json);
        assert_eq!(detector.check_head(&ok_json), HeadVerdict::NeedBody);
        assert!(detector.check_body(&ok_json, br#"{"code":40003}"#));
        assert!(!detector.check_body(&ok_json, br#"{"code":0}"#));
    }

    #[test]
    fn the_truth_table() {
        use HeadVerdict::{Expired, NeedBody, NotExpired, Veto};
        let all = [Veto, Expired, NeedBody, NotExpired];
        for a in all {
            for b in all {
                let want = if a == Veto || b == Veto {
                    Veto
                } else if a == Expired || b == Expired {
                    Expired
                } else if a == NeedBody || b == NeedBody {
                    NeedBody
                } else {
                    NotExpired
                };
                let detector = Fixed(a).or(Fixed(b));
                let plain = HeaderMap::new();
                let head = ResponseHead::new(StatusCode::OK, Version::HTTP_11, &plain);
                assert_eq!(detector.check_head(&head), want, "{a:?} or {b:?}");
                // The body decides only when the head left it open.
                assert_eq!(
                    detector.check_body(&head, b"expired"),
                    want == Expired || want == NeedBody,
                    "{a:?} or {b:?}"
                );
            }
        }
    }

    /// A detector with a fixed head verdict; its body check says "expired".
    struct Fixed(HeadVerdict);

    impl ExpiryDetector for Fixed {
        fn check_head(&self, _: &ResponseHead<'_>) -> HeadVerdict {
            self.0
        }
        fn check_body(&self, _: &ResponseHead<'_>, _: &[u8]) -> bool {
            true
        }
    }

    #[test]
    fn an_insufficient_scope_challenge_vetoes_the_body_rule() {
        let detector = Unauthorized::new().or(JsonBodyRule::default_rules());
        for status in [StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN] {
            let mut headers = HeaderMap::new();
            headers.insert("content-type", "application/json".parse().unwrap());
            headers.insert(
                "www-authenticate",
                r#"Bearer error="insufficient_scope""#.parse().unwrap(),
            );
            let head = ResponseHead::new(status, Version::HTTP_11, &headers);
            assert_eq!(detector.check_head(&head), HeadVerdict::Veto);
            assert!(!detector.check_body(&head, br#"{"statusCode":401,"message":"Unauthorized"}"#));
            assert!(!detector.check_body(&head, r#"{"code":40003,"msg":"token过期"}"#.as_bytes()));
        }
    }

    #[test]
    fn closures() {
        let plain = HeaderMap::new();
        let head = ResponseHead::new(StatusCode::from_u16(419).unwrap(), Version::HTTP_11, &plain);
        assert_eq!(
            detector_fn(|h| h.status().as_u16() == 419).check_head(&head),
            HeadVerdict::Expired
        );
        let body = body_detector_fn(|_, b| b == b"expired");
        assert_eq!(body.check_head(&head), HeadVerdict::NeedBody);
        assert!(body.check_body(&head, b"expired"));
    }
}
