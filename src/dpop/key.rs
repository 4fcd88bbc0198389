//! [`DpopKey`]: the key that tokens are bound to, and its proofs.

use std::fmt;
use std::sync::Arc;

use http::{Method, StatusCode, Uri};

use super::nonce::NonceCache;
use crate::jose::{KeyError, SigningKey, random_id, sha256_b64, sign_compact, unix_now};

/// The key DPoP-bound tokens are bound to (RFC 9449), with the nonces the
/// servers handed out. Cheap to clone; clones share the key and the nonces.
///
/// ES256 by default ([`generate`](Self::generate)); any [`SigningKey`]
/// (EdDSA, RS256, or a key loaded from PKCS#8) with
/// [`from_signing_key`](Self::from_signing_key). `Debug` shows the algorithm
/// and the thumbprint, never the key.
///
/// A token is bound to one key: replicas that share tokens through a store
/// must all hold the same key, loaded from the same PKCS#8 PEM
/// (`DpopKey::from_signing_key(SigningKey::from_pkcs8_pem(pem)?)`), not one
/// generated per replica.
///
/// ```
/// use tower_auth_refresh::dpop::DpopKey;
/// use tower_auth_refresh::oauth2::SigningKey;
///
/// # fn main() -> Result<(), tower_auth_refresh::oauth2::KeyError> {
/// let generated = DpopKey::generate()?;
/// assert_eq!(generated.signing_key().algorithm(), "ES256");
/// let brought = DpopKey::from_signing_key(SigningKey::generate_ed25519()?);
/// assert_eq!(brought.signing_key().algorithm(), "EdDSA");
/// assert_ne!(generated.thumbprint(), brought.thumbprint());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct DpopKey {
    key: SigningKey,
    nonces: Arc<NonceCache>,
}

impl DpopKey {
    /// A new P-256 key (ES256), generated in this process.
    pub fn generate() -> Result<Self, KeyError> {
        SigningKey::generate_es256().map(Self::from_signing_key)
    }

    /// Bring your own key.
    pub fn from_signing_key(key: SigningKey) -> Self {
        Self {
            key,
            nonces: Arc::default(),
        }
    }

    /// The signing key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// The JWK thumbprint (RFC 7638): the `jkt` tokens are bound to, and the
    /// `dpop_jkt` of an authorization request.
    pub fn thumbprint(&self) -> &str {
        self.key.thumbprint()
    }

    /// The nonces seen so far, per origin.
    pub fn nonces(&self) -> &NonceCache {
        &self.nonces
    }

    /// A proof for one request to `uri`, with the nonce last seen from its
    /// origin, and `ath` when `access_token` is given (resource requests).
    pub fn proof(
        &self,
        method: &Method,
        uri: &Uri,
        access_token: Option<&str>,
    ) -> Result<String, KeyError> {
        let nonce = self.nonces.get(uri);
        self.proof_with_nonce(method, uri, access_token, nonce.as_deref())
    }

    /// A proof with an explicit nonce (or none).
    pub fn proof_with_nonce(
        &self,
        method: &Method,
        uri: &Uri,
        access_token: Option<&str>,
        nonce: Option<&str>,
    ) -> Result<String, KeyError> {
        let header = serde_json::json!({
            "typ": "dpop+jwt",
            "alg": self.key.algorithm(),
            "jwk": self.key.public_jwk(),
        });
        let mut claims = serde_json::json!({
            "jti": random_id(16)?,
            "htm": method.as_str(),
            "htu": htu(uri)?,
            "iat": unix_now(),
        });
        if let Some(token) = access_token {
            claims["ath"] = sha256_b64(token).into();
        }
        if let Some(nonce) = nonce {
            claims["nonce"] = nonce.into();
        }
        sign_compact(|input| self.key.sign(input), &header, &claims)
    }
}

impl fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DpopKey")
            .field("alg", &self.key.algorithm())
            .field("thumbprint", &self.key.thumbprint())
            .field("nonces", &self.nonces)
            .finish()
    }
}

/// The `htu` claim: the URI without query and fragment (RFC 9449 §4.2),
/// and without userinfo (never on the request line, and it may hold a
/// password). Host and port are kept as written.
fn htu(uri: &Uri) -> Result<String, KeyError> {
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(KeyError::new(format!(
            "a DPoP proof needs an absolute URI, got `{}`",
            uri.path()
        )));
    };
    let host_and_port = without_userinfo(authority.as_str());
    Ok(format!("{scheme}://{host_and_port}{}", uri.path()))
}

/// `host[:port]` of an authority that may start with `userinfo@`.
// NOTE: neither a host nor a port can hold `@`, so the last one ends the
// userinfo.
fn without_userinfo(authority: &str) -> &str {
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, host_and_port)| host_and_port)
}

/// The token endpoint's nonce challenge: `400 {"error":"use_dpop_nonce"}`.
pub(crate) fn is_use_dpop_nonce(status: StatusCode, body: &[u8]) -> bool {
    status == StatusCode::BAD_REQUEST
        && serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .is_some_and(|v| v.get("error").and_then(|e| e.as_str()) == Some("use_dpop_nonce"))
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};

    use super::*;

    fn verify(key: &DpopKey, proof: &str) -> serde_json::Value {
        let header = decode_header(proof).unwrap();
        assert_eq!(header.typ.as_deref(), Some("dpop+jwt"));
        let jwk = header.jwk.expect("the proof carries its public key");
        let decoding = DecodingKey::from_jwk(&jwk).unwrap();
        let mut validation = Validation::new(header.alg);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        let data = decode::<serde_json::Value>(proof, &decoding, &validation).unwrap();
        let jwk_json = serde_json::to_value(&jwk).unwrap();
        for member in ["kty", "crv", "x", "y", "n", "e"] {
            assert_eq!(
                jwk_json.get(member),
                key.signing_key().public_jwk().get(member)
            );
        }
        assert!(
            jwk_json.get("d").is_none(),
            "no private member in the proof"
        );
        data.claims
    }

    #[test]
    fn es256_proof_verifies_and_carries_the_claims() {
        let key = DpopKey::generate().unwrap();
        let uri: Uri = "https://api.example:8443/orders/7?page=2#top"
            .parse()
            .unwrap();
        let proof = key
            .proof_with_nonce(&Method::POST, &uri, Some("tok-123"), Some("n-1"))
            .unwrap();
        assert_eq!(decode_header(&proof).unwrap().alg, Algorithm::ES256);
        let claims = verify(&key, &proof);
        assert_eq!(claims["htm"], "POST");
        assert_eq!(claims["htu"], "https://api.example:8443/orders/7");
        assert_eq!(claims["ath"], sha256_b64("tok-123"));
        assert_eq!(claims["nonce"], "n-1");
        let iat = claims["iat"].as_u64().unwrap();
        assert!(iat.abs_diff(unix_now()) <= 5);
    }

    #[test]
    fn htu_leaves_out_userinfo() {
        let key = DpopKey::generate().unwrap();
        for (uri, htu) in [
            (
                "https://alice:hunter2@api.example/orders?x=1",
                "https://api.example/orders",
            ),
            ("http://bob@API.Example:8080/a", "http://API.Example:8080/a"),
            ("http://[::1]:8080/a", "http://[::1]:8080/a"),
        ] {
            let uri: Uri = uri.parse().unwrap();
            let claims = verify(&key, &key.proof(&Method::GET, &uri, None).unwrap());
            assert_eq!(claims["htu"], htu);
        }
    }

    #[test]
    fn each_proof_has_its_own_jti_and_no_ath_without_a_token() {
        let key = DpopKey::generate().unwrap();
        let uri: Uri = "http://127.0.0.1:1/token".parse().unwrap();
        let jtis: std::collections::HashSet<String> = (0..50)
            .map(|_| {
                let claims = verify(&key, &key.proof(&Method::POST, &uri, None).unwrap());
                assert!(claims.get("ath").is_none());
                assert!(claims.get("nonce").is_none());
                claims["jti"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(jtis.len(), 50);
    }

    #[test]
    fn brought_keys_sign_with_their_own_algorithm() {
        let key = DpopKey::from_signing_key(SigningKey::generate_ed25519().unwrap());
        let uri: Uri = "https://as.example/token".parse().unwrap();
        let proof = key.proof(&Method::POST, &uri, None).unwrap();
        assert_eq!(decode_header(&proof).unwrap().alg, Algorithm::EdDSA);
        verify(&key, &proof);
    }

    #[test]
    fn cached_nonce_goes_into_the_next_proof() {
        let key = DpopKey::generate().unwrap();
        let uri: Uri = "https://as.example/token".parse().unwrap();
        let mut headers = http::HeaderMap::new();
        headers.insert(super::super::DPOP_NONCE, "fresh".parse().unwrap());
        key.nonces().update(&uri, &headers);
        let claims = verify(&key, &key.proof(&Method::POST, &uri, None).unwrap());
        assert_eq!(claims["nonce"], "fresh");
    }

    #[test]
    fn debug_shows_no_key_material() {
        use secrecy::ExposeSecret;
        let key = DpopKey::generate().unwrap();
        let shown = format!("{key:?} {:?}", key.signing_key());
        assert!(shown.contains(key.thumbprint()));
        let der = key.signing_key().export_pkcs8_der();
        let private_b64 = {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(der.expose_secret())
        };
        assert!(!shown.contains(&private_b64[..20]));
        assert!(!shown.contains("\"d\""));
    }

    #[test]
    fn relative_uris_are_refused() {
        let key = DpopKey::generate().unwrap();
        assert!(
            key.proof(&Method::GET, &Uri::from_static("/orders"), None)
                .is_err()
        );
    }

    #[test]
    fn use_dpop_nonce_is_recognised() {
        assert!(is_use_dpop_nonce(
            StatusCode::BAD_REQUEST,
            br#"{"error":"use_dpop_nonce","error_description":"x"}"#
        ));
        assert!(!is_use_dpop_nonce(
            StatusCode::BAD_REQUEST,
            br#"{"error":"invalid_grant"}"#
        ));
        assert!(!is_use_dpop_nonce(
            StatusCode::UNAUTHORIZED,
            br#"{"error":"use_dpop_nonce"}"#
        ));
    }
}
