//! [`TokenInjector`]: where the token goes on the request.

use std::fmt::Write as _;

use http::header::{AUTHORIZATION, HeaderName, HeaderValue};
use http::{Request, Uri};
use secrecy::ExposeSecret;

use crate::Token;
use crate::error::InvalidTokenValue;

/// Where the token is put on each request.
///
/// The value is built once per token (when the token is installed) and
/// cloned onto each request. A header value is marked sensitive (hyper and
/// HTTP/2 HPACK keep it out of their tables, and `Debug` of the header map
/// hides it). A request that already carries the target header or query
/// parameter is left alone: the caller's explicit token wins, and such a
/// request is passed through without refresh or retry. A query parameter
/// counts as present when its name, decoded as a server decodes it
/// (`access%5Ftoken` is `access_token`), is the injector's name.
///
/// # Query placement exposes the token
///
/// A token in the query string ([`TokenInjector::query`]) is part of the
/// request's URI, and nothing can mark a URI sensitive. Every layer inside
/// this one sees it (a `TraceLayer` that records the URI logs the token),
/// as do the HTTP client's own errors and logs, proxies, and the server's
/// access logs. The reqwest adapter strips the URL from the
/// `reqwest::Error`s it returns when the token is in the query, but the
/// layers and systems between the client and the server are out of its
/// reach. Use a header whenever the API accepts one.
///
/// ```
/// use http::header::HeaderName;
/// use tower_auth_refresh::TokenInjector;
///
/// let default = TokenInjector::bearer();                 // Authorization: Bearer <token>
/// let raw = TokenInjector::raw();                        // Authorization: <token>
/// let custom = TokenInjector::header(HeaderName::from_static("x-access-token"));
/// let query = TokenInjector::query("access_token");      // ?access_token=<token>
/// # let _ = (default, raw, custom, query);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInjector {
    placement: Placement,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Placement {
    Header { name: HeaderName, prefix: String },
    Query { name: String },
}

impl Default for TokenInjector {
    fn default() -> Self {
        Self::bearer()
    }
}

impl TokenInjector {
    /// `Authorization: Bearer <token>` (the default).
    pub fn bearer() -> Self {
        Self::header_with_prefix(AUTHORIZATION, "Bearer ")
    }

    /// The raw token in `Authorization`, with no scheme prefix.
    pub fn raw() -> Self {
        Self::header(AUTHORIZATION)
    }

    /// The raw token in the named header.
    pub fn header(name: HeaderName) -> Self {
        Self::header_with_prefix(name, "")
    }

    /// `prefix` followed by the token in the named header
    /// (`header_with_prefix(AUTHORIZATION, "Token ")`).
    pub fn header_with_prefix(name: HeaderName, prefix: impl Into<String>) -> Self {
        Self {
            placement: Placement::Header {
                name,
                prefix: prefix.into(),
            },
        }
    }

    /// The token as a query parameter (`?access_token=…`), percent-encoded.
    ///
    /// The token is then part of the URI that inner layers, client errors,
    /// logs and proxies see: read "Query placement exposes the token" on
    /// [`TokenInjector`] first.
    pub fn query(name: impl Into<String>) -> Self {
        Self {
            placement: Placement::Query { name: name.into() },
        }
    }

    /// Builds the value put on requests; done once per token.
    pub(crate) fn prepare(&self, token: &Token) -> Result<HeaderValue, InvalidTokenValue> {
        let secret = token.access_token().expose_secret();
        if secret.is_empty() {
            return Err(InvalidTokenValue::new());
        }
        let text = match &self.placement {
            Placement::Header { prefix, .. } => {
                let mut text = String::with_capacity(prefix.len() + secret.len());
                text.push_str(prefix);
                text.push_str(secret);
                text
            }
            Placement::Query { name, .. } => {
                let mut text = String::with_capacity(name.len() + 1 + secret.len());
                percent_encode_into(name, &mut text);
                text.push('=');
                percent_encode_into(secret, &mut text);
                text
            }
        };
        let mut value = HeaderValue::try_from(text).map_err(|_| InvalidTokenValue::new())?;
        // NOTE: this only hides the value where it is a header; a query
        // pair ends up in the URI, which has no such flag.
        value.set_sensitive(true);
        Ok(value)
    }

    /// The header the token goes in, when it goes in a header.
    #[cfg_attr(not(feature = "reqwest"), allow(dead_code))]
    pub(crate) fn header_name(&self) -> Option<&HeaderName> {
        match &self.placement {
            Placement::Header { name, .. } => Some(name),
            Placement::Query { .. } => None,
        }
    }

    /// The query parameter the token goes in, when it goes in the query.
    #[cfg_attr(not(feature = "reqwest"), allow(dead_code))]
    pub(crate) fn query_name(&self) -> Option<&str> {
        match &self.placement {
            Placement::Header { .. } => None,
            Placement::Query { name } => Some(name),
        }
    }

    /// `true` when the request already carries a token where this injector
    /// would put one.
    #[cfg(test)]
    pub(crate) fn is_present<B>(&self, request: &Request<B>) -> bool {
        match &self.placement {
            Placement::Header { name, .. } => request.headers().contains_key(name),
            Placement::Query { name } => request
                .uri()
                .query()
                .is_some_and(|query| query_has_key(query, name)),
        }
    }

    /// Puts the token on a request head that does not carry one yet. `token` is asked only when the head has
    /// none of its own; it gives the prepared value and what goes with it.
    pub(crate) fn put_if_absent<T>(
        &self,
        head: &mut http::request::Parts,
        token: impl FnOnce() -> Option<(HeaderValue, T)>,
    ) -> Put<T> {
        match &self.placement {
            // NOTE: a look-up and an insert: cheaper than `HeaderMap::entry`
            // (counted with callgrind), which pays for its guard even when
            // the header is absent.
            Placement::Header { name, .. } => {
                if head.headers.contains_key(name) {
                    return Put::Present;
                }
                match token() {
                    Some((value, with)) => {
                        head.headers.insert(name.clone(), value);
                        Put::Done(with)
                    }
                    None => Put::NoToken,
                }
            }
            Placement::Query { name } => {
                if head
                    .uri
                    .query()
                    .is_some_and(|query| query_has_key(query, name))
                {
                    return Put::Present;
                }
                match token() {
                    Some((value, with)) => {
                        if let Some(uri) = with_query_pair(&head.uri, value.as_bytes()) {
                            head.uri = uri;
                        }
                        Put::Done(with)
                    }
                    None => Put::NoToken,
                }
            }
        }
    }

    /// Puts the prepared value on the request.
    pub(crate) fn apply<B>(&self, prepared: &HeaderValue, request: &mut Request<B>) {
        match &self.placement {
            Placement::Header { name, .. } => {
                request.headers_mut().insert(name.clone(), prepared.clone());
            }
            Placement::Query { .. } => {
                if let Some(uri) = with_query_pair(request.uri(), prepared.as_bytes()) {
                    *request.uri_mut() = uri;
                }
            }
        }
    }
}

/// What [`TokenInjector::put_if_absent`] did.
pub(crate) enum Put<T> {
    /// The request carries a token of its own: left alone.
    Present,
    /// The token was put on; `T` came with it.
    Done(T),
    /// There was no token to put on.
    NoToken,
}

/// Whether `query` has a pair whose key, decoded as
/// `application/x-www-form-urlencoded` (as servers and `url` decode it), is
/// `name`. Both the tower and the reqwest paths ask this.
pub(crate) fn query_has_key(query: &str, name: &str) -> bool {
    form_urlencoded::parse(query.as_bytes()).any(|(key, _)| key == name)
}

/// `query` without its pairs whose decoded key is `name` (the others kept
/// byte for byte), or `None` when it has no such pair.
#[cfg_attr(not(feature = "reqwest"), allow(dead_code))]
pub(crate) fn query_without_key(query: &str, name: &str) -> Option<String> {
    if !query_has_key(query, name) {
        return None;
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !form_urlencoded::parse(pair.as_bytes()).any(|(key, _)| key == name))
        .collect();
    Some(kept.join("&"))
}

fn with_query_pair(uri: &Uri, pair: &[u8]) -> Option<Uri> {
    let pair = std::str::from_utf8(pair).ok()?;
    let path = uri.path();
    let mut path_and_query = String::with_capacity(path.len() + pair.len() + 64);
    path_and_query.push_str(path);
    path_and_query.push('?');
    if let Some(query) = uri.query().filter(|q| !q.is_empty()) {
        path_and_query.push_str(query);
        path_and_query.push('&');
    }
    path_and_query.push_str(pair);
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    Uri::from_parts(parts).ok()
}

fn percent_encode_into(input: &str, out: &mut String) {
    for byte in input.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str) -> Request<()> {
        Request::builder().uri(uri).body(()).unwrap()
    }

    #[test]
    fn bearer_header_is_sensitive() {
        let injector = TokenInjector::bearer();
        let value = injector.prepare(&Token::bearer("abc")).unwrap();
        assert!(value.is_sensitive());
        let mut req = request("http://x/");
        injector.apply(&value, &mut req);
        assert_eq!(req.headers()[AUTHORIZATION], "Bearer abc");
    }

    #[test]
    fn raw_and_custom_headers() {
        let mut req = request("http://x/");
        let raw = TokenInjector::raw();
        raw.apply(&raw.prepare(&Token::bearer("abc")).unwrap(), &mut req);
        assert_eq!(req.headers()[AUTHORIZATION], "abc");
        let custom = TokenInjector::header(HeaderName::from_static("x-token"));
        assert!(!custom.is_present(&req));
        custom.apply(&custom.prepare(&Token::bearer("abc")).unwrap(), &mut req);
        assert_eq!(req.headers()["x-token"], "abc");
        assert!(custom.is_present(&req));
    }

    #[test]
    fn query_parameter_is_encoded_and_appended() {
        let injector = TokenInjector::query("access_token");
        let value = injector.prepare(&Token::bearer("a b+c/=")).unwrap();
        let mut req = request("http://x/path?page=2");
        assert!(!injector.is_present(&req));
        injector.apply(&value, &mut req);
        assert_eq!(
            req.uri().to_string(),
            "http://x/path?page=2&access_token=a%20b%2Bc%2F%3D"
        );
        assert!(injector.is_present(&req));
        let mut bare = request("/p");
        injector.apply(&value, &mut bare);
        assert_eq!(bare.uri().to_string(), "/p?access_token=a%20b%2Bc%2F%3D");
    }

    #[test]
    fn query_keys_are_compared_decoded() {
        let injector = TokenInjector::query("access_token");
        for (uri, present) in [
            ("/p?access_token=x", true),
            ("/p?access%5Ftoken=x", true),
            ("/p?a=1&access_token", true),
            ("/p?access_token_x=1", false),
            ("/p?x=access_token", false),
            ("/p", false),
        ] {
            assert_eq!(injector.is_present(&request(uri)), present, "{uri}");
        }
        let spaced = TokenInjector::query("access token");
        assert!(spaced.is_present(&request("/p?access+token=x")));
        assert!(spaced.is_present(&request("/p?access%20token=x")));
    }

    #[test]
    fn tokens_that_cannot_be_headers_are_rejected() {
        let injector = TokenInjector::bearer();
        assert!(injector.prepare(&Token::bearer("line\nbreak")).is_err());
        assert!(injector.prepare(&Token::bearer("")).is_err());
    }

    #[test]
    fn a_query_key_is_removed_and_the_rest_kept_as_it_was() {
        assert_eq!(
            query_without_key("page=2&access_token=tok-1", "access_token").as_deref(),
            Some("page=2")
        );
        assert_eq!(
            query_without_key("a=%20x&access%5Ftoken=t&b", "access_token").as_deref(),
            Some("a=%20x&b")
        );
        assert_eq!(
            query_without_key("access_token=t", "access_token").as_deref(),
            Some("")
        );
        assert_eq!(query_without_key("page=2", "access_token"), None);
    }
}
