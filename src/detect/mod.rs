//! [`ExpiryDetector`]: does this response mean "the token expired"?
//!
//! A detector looks at the response head first and asks for the body only
//! when it must; the body prefix it is shown is capped
//! ([`AuthRefreshLayer::peek_limit`](crate::AuthRefreshLayer::peek_limit)),
//! and the caller always receives the whole body unchanged.

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, StatusCode, Version};

mod challenge;
mod combinators;
mod json;
mod json_fields;
mod json_pointer;
mod json_success;
mod status;

pub use challenge::BearerChallenge;
pub(crate) use challenge::bearer_error;
pub use combinators::{
    BodyDetectorFn, DetectorFn, ExpiryDetectorExt, Or, body_detector_fn, detector_fn,
};
pub use json::JsonBodyRule;
pub use status::{StatusDetector, Unauthorized};

/// The parts of a response a detector decides on.
#[derive(Debug, Clone, Copy)]
pub struct ResponseHead<'a> {
    status: StatusCode,
    version: Version,
    headers: &'a HeaderMap,
    // NOTE: `Some` when whoever made the head already looked the
    // `Content-Type` up: the detectors that ask for it, and the peek, then
    // share one look-up.
    content_type: Option<Option<&'a HeaderValue>>,
}

impl<'a> ResponseHead<'a> {
    /// A head made of its parts.
    pub fn new(status: StatusCode, version: Version, headers: &'a HeaderMap) -> Self {
        Self {
            status,
            version,
            headers,
            content_type: None,
        }
    }

    /// A head whose `Content-Type` is looked up once, here, for every
    /// detector that asks for it.
    pub(crate) fn with_content_type(
        status: StatusCode,
        version: Version,
        headers: &'a HeaderMap,
    ) -> Self {
        Self {
            content_type: Some(headers.get(CONTENT_TYPE)),
            ..Self::new(status, version, headers)
        }
    }

    /// The `Content-Type` header, if any (the first one).
    ///
    /// ```
    /// use http::{HeaderMap, StatusCode, Version};
    /// use tower_auth_refresh::ResponseHead;
    ///
    /// let mut headers = HeaderMap::new();
    /// headers.insert("content-type", "application/json".parse().unwrap());
    /// let head = ResponseHead::new(StatusCode::OK, Version::HTTP_11, &headers);
    /// assert_eq!(head.content_type().unwrap(), "application/json");
    /// ```
    pub fn content_type(&self) -> Option<&'a HeaderValue> {
        match self.content_type {
            Some(content_type) => content_type,
            None => self.headers.get(CONTENT_TYPE),
        }
    }

    /// The status code.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The HTTP version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The response headers.
    pub fn headers(&self) -> &'a HeaderMap {
        self.headers
    }
}

/// What a detector says about a response head.
///
/// `NotExpired` is "nothing here for this detector": another detector
/// combined with [`Or`] may still find an expired token. `Veto` is a firm
/// "not expired" that no other detector may overrule: the response names
/// another cause, such as a `Bearer` challenge with
/// `error="insufficient_scope"` (refreshing the token would not help).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadVerdict {
    /// The token was rejected.
    Expired,
    /// This detector finds nothing about the token in this response.
    NotExpired,
    /// Cannot tell without the body: call [`ExpiryDetector::check_body`].
    NeedBody,
    /// Firmly not expired: the response says why it failed, and it is not
    /// the token's age. Overrules every other detector in an [`Or`].
    Veto,
}

impl HeadVerdict {
    /// Whether the response is handed on as it is: no body read, no
    /// refresh ([`NotExpired`](Self::NotExpired) or [`Veto`](Self::Veto)).
    pub fn is_not_expired(self) -> bool {
        matches!(self, Self::NotExpired | Self::Veto)
    }
}

/// Decides whether a response means the token expired.
///
/// [`check_head`](Self::check_head) answers from the status and headers:
/// [`Expired`](HeadVerdict::Expired), [`NotExpired`](HeadVerdict::NotExpired)
/// ("nothing here for me"), [`Veto`](HeadVerdict::Veto) ("firmly not
/// expired, whatever the others say") or [`NeedBody`](HeadVerdict::NeedBody).
/// A detector written as a closure ([`detector_fn`]) answers `Expired` or
/// `NotExpired`; implement the trait to veto.
///
/// Detectors combined with [`or`](ExpiryDetectorExt::or) decide by this
/// table (symmetric):
///
/// | `a` \ `b`   | `Veto` | `Expired` | `NeedBody` | `NotExpired` |
/// |--------------|--------|-----------|------------|--------------|
/// | `Veto`       | `Veto` | `Veto`    | `Veto`     | `Veto`       |
/// | `Expired`    | `Veto` | `Expired` | `Expired`  | `Expired`    |
/// | `NeedBody`   | `Veto` | `Expired` | `NeedBody` | `NeedBody`   |
/// | `NotExpired` | `Veto` | `Expired` | `NeedBody` | `NotExpired` |
///
/// On `NeedBody` the layer reads the body only when it can be judged at
/// once (see [`AuthRefreshLayer::peek_deadline`](crate::AuthRefreshLayer::peek_deadline)):
/// never a stream or a compressed body. A body it could not read counts as
/// not expired.
///
/// ```
/// use http::StatusCode;
/// use tower_auth_refresh::{ExpiryDetector, HeadVerdict, ResponseHead};
///
/// /// An API that answers 419 for an expired session.
/// struct Status419;
///
/// impl ExpiryDetector for Status419 {
///     fn check_head(&self, head: &ResponseHead<'_>) -> HeadVerdict {
///         if head.status().as_u16() == 419 { HeadVerdict::Expired } else { HeadVerdict::NotExpired }
///     }
/// }
///
/// let headers = http::HeaderMap::new();
/// let head = ResponseHead::new(StatusCode::from_u16(419).unwrap(), http::Version::HTTP_11, &headers);
/// assert_eq!(Status419.check_head(&head), HeadVerdict::Expired);
/// ```
pub trait ExpiryDetector: Send + Sync + 'static {
    /// Decides from the status and headers.
    fn check_head(&self, head: &ResponseHead<'_>) -> HeadVerdict;

    /// Decides from the body, when [`check_head`](Self::check_head) answered
    /// [`HeadVerdict::NeedBody`]. `body` is the whole body, or, when the
    /// bytes that arrived form one complete JSON object or array before
    /// the transfer ended, those bytes. A body longer than the peek limit,
    /// or not complete within the peek deadline, is never shown and counts
    /// as not expired.
    fn check_body(&self, head: &ResponseHead<'_>, body: &[u8]) -> bool {
        let _ = (head, body);
        false
    }
}

impl<T: ExpiryDetector + ?Sized> ExpiryDetector for std::sync::Arc<T> {
    fn check_head(&self, head: &ResponseHead<'_>) -> HeadVerdict {
        (**self).check_head(head)
    }
    fn check_body(&self, head: &ResponseHead<'_>, body: &[u8]) -> bool {
        (**self).check_body(head, body)
    }
}

impl<T: ExpiryDetector + ?Sized> ExpiryDetector for Box<T> {
    fn check_head(&self, head: &ResponseHead<'_>) -> HeadVerdict {
        (**self).check_head(head)
    }
    fn check_body(&self, head: &ResponseHead<'_>, body: &[u8]) -> bool {
        (**self).check_body(head, body)
    }
}
