//! [`NonceCache`]: the latest DPoP nonce of each origin.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use http::{HeaderMap, Uri};

use super::DPOP_NONCE;

/// Origins remembered at most; a new origin past this forgets the others.
const MAX_ORIGINS: usize = 1024;

/// The latest `DPoP-Nonce` each origin (scheme, host, port) sent, updated
/// from every response that carries one, so that steady traffic rarely pays
/// the extra round trip of a nonce challenge. Bounded; nonces are not
/// secrets, but `Debug` shows only how many there are.
#[derive(Default)]
pub struct NonceCache {
    by_origin: Mutex<HashMap<String, Arc<str>>>,
}

impl NonceCache {
    /// The nonce last seen from the origin of `uri`.
    pub fn get(&self, uri: &Uri) -> Option<Arc<str>> {
        let origin = origin(uri)?;
        self.lock().get(&origin).cloned()
    }

    /// Remembers the `DPoP-Nonce` of a response from the origin of `uri`,
    /// if it has one. Returns `true` when it did.
    pub fn update(&self, uri: &Uri, headers: &HeaderMap) -> bool {
        let Some(nonce) = headers.get(DPOP_NONCE).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let Some(origin) = origin(uri) else {
            return false;
        };
        let mut map = self.lock();
        if map.get(&origin).is_some_and(|known| **known == *nonce) {
            return true;
        }
        if map.len() >= MAX_ORIGINS && !map.contains_key(&origin) {
            map.clear();
        }
        map.insert(origin, Arc::from(nonce));
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<str>>> {
        self.by_origin
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl fmt::Debug for NonceCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NonceCache")
            .field("origins", &self.lock().len())
            .finish()
    }
}

/// `scheme://host[:port]`, lowercase, without userinfo, and without the
/// port when it is the scheme's default (`http://a` and `http://a:80` are
/// one origin).
fn origin(uri: &Uri) -> Option<String> {
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let host = uri.host()?.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    };
    Some(
        match uri.port_u16().filter(|port| Some(*port) != default_port) {
            Some(port) => format!("{scheme}://{host}:{port}"),
            None => format!("{scheme}://{host}"),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_kept_per_origin() {
        let cache = NonceCache::default();
        let a: Uri = "https://A.example/token".parse().unwrap();
        let a_other_path: Uri = "https://a.example/api?x=1".parse().unwrap();
        let b: Uri = "https://b.example/token".parse().unwrap();
        let mut headers = HeaderMap::new();
        assert!(!cache.update(&a, &headers));
        headers.insert(DPOP_NONCE, "n-1".parse().unwrap());
        assert!(cache.update(&a, &headers));
        assert_eq!(cache.get(&a_other_path).as_deref(), Some("n-1"));
        assert_eq!(cache.get(&b), None);
        headers.insert(DPOP_NONCE, "n-2".parse().unwrap());
        cache.update(&a_other_path, &headers);
        assert_eq!(cache.get(&a).as_deref(), Some("n-2"));
    }

    #[test]
    fn an_origin_is_the_same_with_or_without_userinfo_and_default_port() {
        let cache = NonceCache::default();
        let mut headers = HeaderMap::new();
        headers.insert(DPOP_NONCE, "n-1".parse().unwrap());
        let plain: Uri = "http://a.example/x".parse().unwrap();
        cache.update(&plain, &headers);
        for same in [
            "http://a.example:80/y",
            "http://alice:hunter2@a.example/y",
            "HTTP://A.EXAMPLE:80/",
        ] {
            let same: Uri = same.parse().unwrap();
            assert_eq!(cache.get(&same).as_deref(), Some("n-1"), "{same}");
        }
        for other in [
            "https://a.example/x",
            "http://a.example:8080/x",
            "http://b.example/x",
        ] {
            let other: Uri = other.parse().unwrap();
            assert_eq!(cache.get(&other), None, "{other}");
        }
        let secure: Uri = "https://bob:pw@a.example:443/x".parse().unwrap();
        headers.insert(DPOP_NONCE, "n-2".parse().unwrap());
        cache.update(&secure, &headers);
        let secure_plain: Uri = "https://a.example/z".parse().unwrap();
        assert_eq!(cache.get(&secure_plain).as_deref(), Some("n-2"));
        assert!(!cache.lock().keys().any(|origin| origin.contains('@')));
    }
}
