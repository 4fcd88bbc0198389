//! JWS compact serialization (RFC 7515 §7.1) and the small encodings around it.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};

use super::key::KeyError;

/// base64url without padding (RFC 7515 §2).
pub(crate) fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// base64url(SHA-256(bytes)): PKCE S256, DPoP `ath`, JWK thumbprints.
pub(crate) fn sha256_b64(bytes: impl AsRef<[u8]>) -> String {
    b64(ring::digest::digest(&ring::digest::SHA256, bytes.as_ref()))
}

/// `len` random bytes from the system's CSPRNG, base64url-encoded.
pub(crate) fn random_id(len: usize) -> Result<String, KeyError> {
    let mut bytes = vec![0u8; len];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| KeyError::new("the system random number generator failed"))?;
    Ok(b64(bytes))
}

/// Seconds since the Unix epoch (0 for a clock set before 1970).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `base64url(header) . base64url(claims) . base64url(signature)`.
pub(crate) fn sign_compact(
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, KeyError>,
    header: &serde_json::Value,
    claims: &serde_json::Value,
) -> Result<String, KeyError> {
    let mut input = b64(header.to_string());
    input.push('.');
    input.push_str(&b64(claims.to_string()));
    let signature = sign(input.as_bytes())?;
    input.push('.');
    input.push_str(&b64(signature));
    Ok(input)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_the_rfc7636_example_verifier() {
        // RFC 7636 Appendix B.
        assert_eq!(
            sha256_b64("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn random_ids_differ() {
        let a = random_id(16).unwrap();
        let b = random_id(16).unwrap();
        assert_eq!(a.len(), 22);
        assert_ne!(a, b);
    }
}
