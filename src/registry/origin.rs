//! [`Origin`]: scheme, host and port, the unit a token belongs to.

use std::fmt;

use http::Uri;

/// The scheme, host and port of a URL: a token is only ever sent to the
/// origins it was configured for.
///
/// Hosts compare case-insensitively; a missing port is the scheme's default
/// (80 for `http`, 443 for `https`).
///
/// ```
/// use tower_auth_refresh::Origin;
///
/// let api = Origin::parse("https://API.example.com")?;
/// assert!(api.matches(&"https://api.example.com:443/v1/items".parse().unwrap()));
/// assert!(!api.matches(&"http://api.example.com/v1/items".parse().unwrap()));
/// assert!(!api.matches(&"https://evil.example.net/".parse().unwrap()));
/// # Ok::<(), tower_auth_refresh::InvalidOrigin>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

/// A string that is not an absolute `http` or `https` URL.
#[derive(Debug, Clone, thiserror::Error)]
#[error("not an http(s) origin: {reason}")]
pub struct InvalidOrigin {
    reason: String,
}

impl Origin {
    /// Parses `scheme://host[:port]` (a path, if any, is ignored).
    pub fn parse(origin: &str) -> Result<Self, InvalidOrigin> {
        let uri: Uri = origin
            .parse()
            .map_err(|err: http::uri::InvalidUri| InvalidOrigin {
                reason: err.to_string(),
            })?;
        Self::of(&uri).ok_or_else(|| InvalidOrigin {
            reason: "an absolute http or https URL is needed".into(),
        })
    }

    /// The origin of an absolute `http`/`https` URI; `None` for a relative
    /// URI or another scheme.
    pub fn of(uri: &Uri) -> Option<Self> {
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return None,
        };
        let host = uri.host()?.to_ascii_lowercase();
        Some(Self {
            port: uri.port_u16().unwrap_or(default_port),
            scheme,
            host,
        })
    }

    /// Whether `uri` points at this origin.
    pub fn matches(&self, uri: &Uri) -> bool {
        let Some(scheme) = uri.scheme_str() else {
            return false;
        };
        let Some(host) = uri.host() else {
            return false;
        };
        let default_port = if scheme.eq_ignore_ascii_case("https") {
            443
        } else if scheme.eq_ignore_ascii_case("http") {
            80
        } else {
            return false;
        };
        scheme.eq_ignore_ascii_case(&self.scheme)
            && host.eq_ignore_ascii_case(&self.host)
            && uri.port_u16().unwrap_or(default_port) == self.port
    }

    /// The scheme, lowercase.
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// The host, lowercase.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port, explicit or the scheme's default.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Origin({self})")
    }
}

impl std::str::FromStr for Origin {
    type Err = InvalidOrigin;

    fn from_str(s: &str) -> Result<Self, InvalidOrigin> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ports_and_case() {
        let origin = Origin::parse("HTTP://Example.COM").unwrap();
        assert_eq!(origin.to_string(), "http://example.com:80");
        assert!(origin.matches(&"http://example.com:80/x".parse().unwrap()));
        assert!(!origin.matches(&"http://example.com:8080/x".parse().unwrap()));
        assert!(!origin.matches(&"/relative".parse().unwrap()));
    }

    #[test]
    fn rejects_what_is_not_an_origin() {
        assert!(Origin::parse("/just/a/path").is_err());
        assert!(Origin::parse("ftp://example.com").is_err());
        assert!(Origin::parse("not a url").is_err());
    }
}
