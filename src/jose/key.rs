//! [`SigningKey`]: an asymmetric private key that signs JWTs (RS256, ES256,
//! EdDSA), with its public JWK and RFC 7638 thumbprint.

use std::fmt;
use std::sync::Arc;

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RSA_PKCS1_SHA256,
    RsaKeyPair, RsaPublicKeyComponents,
};
use secrecy::SecretSlice;

use super::jws::{b64, sha256_b64};

/// A private key that signs JWTs: client assertions (`private_key_jwt`) and
/// DPoP proofs. ES256 (P-256), EdDSA (Ed25519) and RS256 (RSA, 2048 bits or
/// more) keys in PKCS#8; ES256 and EdDSA keys can also be generated here.
///
/// A generated key stays in the process unless it is exported with
/// [`export_pkcs8_der`](Self::export_pkcs8_der). `Debug` shows the algorithm,
/// the key id and the public thumbprint, never the key.
///
/// ```
/// use tower_auth_refresh::oauth2::SigningKey;
///
/// let key = SigningKey::generate_es256()?.with_key_id("2026-11");
/// assert_eq!(key.algorithm(), "ES256");
/// assert_eq!(key.public_jwk()["kty"], "EC");
/// assert!(format!("{key:?}").contains(key.thumbprint()));
/// # Ok::<(), tower_auth_refresh::oauth2::KeyError>(())
/// ```
#[derive(Clone)]
pub struct SigningKey {
    inner: Arc<Inner>,
    key_id: Option<Arc<str>>,
}

struct Inner {
    pair: Pair,
    public_jwk: serde_json::Value,
    thumbprint: String,
    pkcs8: SecretSlice<u8>,
}

enum Pair {
    Es256(EcdsaKeyPair),
    EdDsa(Ed25519KeyPair),
    Rs256(RsaKeyPair),
}

/// A key that could not be read, generated or used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    reason: String,
}

impl KeyError {
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "signing key: {}", self.reason)
    }
}

impl std::error::Error for KeyError {}

impl SigningKey {
    /// A new P-256 key, for ES256.
    pub fn generate_es256() -> Result<Self, KeyError> {
        let document =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .map_err(|_| KeyError::new("P-256 key generation failed"))?;
        Self::from_pkcs8_der(document.as_ref())
    }

    /// A new Ed25519 key, for EdDSA.
    pub fn generate_ed25519() -> Result<Self, KeyError> {
        let document = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| KeyError::new("Ed25519 key generation failed"))?;
        Self::from_pkcs8_der(document.as_ref())
    }

    /// A PKCS#8 key in PEM (`-----BEGIN PRIVATE KEY-----`): P-256, Ed25519
    /// or RSA. The document may hold other blocks too (a certificate chain
    /// before or after the key); it must hold exactly one `PRIVATE KEY`.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        let blocks = pem::parse_many(pem).map_err(|_| KeyError::new("not a PEM document"))?;
        let mut keys = blocks.iter().filter(|block| block.tag() == "PRIVATE KEY");
        match (keys.next(), keys.next()) {
            (Some(key), None) => Self::from_pkcs8_der(key.contents()),
            (Some(_), Some(_)) => Err(KeyError::new(
                "the PEM document holds more than one `PRIVATE KEY`",
            )),
            (None, _) => {
                let found: Vec<&str> = blocks.iter().map(pem::Pem::tag).collect();
                Err(KeyError::new(if found.is_empty() {
                    "not a PEM document".to_owned()
                } else {
                    format!(
                        "expected a PKCS#8 `PRIVATE KEY`, found `{}` (convert it with \
                         `openssl pkcs8 -topk8 -nocrypt`)",
                        found.join("`, `")
                    )
                }))
            }
        }
    }

    /// A PKCS#8 key in DER: P-256, Ed25519 or RSA.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        let pair = if let Ok(pair) =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
        {
            Pair::Es256(pair)
        } else if let Ok(pair) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            Pair::EdDsa(pair)
        } else {
            match RsaKeyPair::from_pkcs8(der) {
                Ok(pair) => Pair::Rs256(pair),
                Err(rejected) => {
                    return Err(KeyError::new(format!(
                        "not a P-256, Ed25519 or RSA PKCS#8 key ({rejected})"
                    )));
                }
            }
        };
        let (public_jwk, canonical) = public_jwk(&pair);
        Ok(Self {
            inner: Arc::new(Inner {
                pair,
                public_jwk,
                thumbprint: sha256_b64(canonical),
                pkcs8: SecretSlice::from(der.to_vec()),
            }),
            key_id: None,
        })
    }

    /// Sets the `kid` header of the JWTs this key signs.
    pub fn with_key_id(mut self, key_id: impl Into<String>) -> Self {
        self.key_id = Some(Arc::from(key_id.into()));
        self
    }

    /// The `kid`, if one was set.
    pub fn key_id(&self) -> Option<&str> {
        self.key_id.as_deref()
    }

    /// The JWS `alg`: `ES256`, `EdDSA` or `RS256`.
    pub fn algorithm(&self) -> &'static str {
        match self.inner.pair {
            Pair::Es256(_) => "ES256",
            Pair::EdDsa(_) => "EdDSA",
            Pair::Rs256(_) => "RS256",
        }
    }

    /// The public key as a JWK (no `kid`, no private members): what the
    /// authorization server registers for `private_key_jwt`, and what a DPoP
    /// proof carries.
    pub fn public_jwk(&self) -> &serde_json::Value {
        &self.inner.public_jwk
    }

    /// The RFC 7638 JWK SHA-256 thumbprint, base64url: the DPoP `jkt`.
    pub fn thumbprint(&self) -> &str {
        &self.inner.thumbprint
    }

    /// The private key in PKCS#8 DER, to keep it across restarts. This is
    /// the only way key material leaves a `SigningKey`.
    pub fn export_pkcs8_der(&self) -> SecretSlice<u8> {
        use secrecy::ExposeSecret;
        SecretSlice::from(self.inner.pkcs8.expose_secret().to_vec())
    }

    /// The signature of `message` with this key's algorithm.
    pub(crate) fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        match &self.inner.pair {
            Pair::Es256(pair) => pair
                .sign(&SystemRandom::new(), message)
                .map(|sig| sig.as_ref().to_vec())
                .map_err(|_| KeyError::new("ES256 signing failed")),
            Pair::EdDsa(pair) => Ok(pair.sign(message).as_ref().to_vec()),
            Pair::Rs256(pair) => {
                let mut signature = vec![0u8; pair.public().modulus_len()];
                pair.sign(
                    &RSA_PKCS1_SHA256,
                    &SystemRandom::new(),
                    message,
                    &mut signature,
                )
                .map_err(|_| KeyError::new("RS256 signing failed"))?;
                Ok(signature)
            }
        }
    }
}

/// The public JWK, and its RFC 7638 canonical form (required members in
/// lexicographic order, no whitespace).
fn public_jwk(pair: &Pair) -> (serde_json::Value, String) {
    match pair {
        Pair::Es256(pair) => {
            // Uncompressed point: 0x04 || x (32 bytes) || y (32 bytes).
            let point = pair.public_key().as_ref();
            let coordinates = point.get(1..).unwrap_or_default();
            let (x, y) = coordinates.split_at(coordinates.len() / 2);
            let (x, y) = (b64(x), b64(y));
            let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
            let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "x": x, "y": y});
            (jwk, canonical)
        }
        Pair::EdDsa(pair) => {
            let x = b64(pair.public_key().as_ref());
            let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
            let jwk = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": x});
            (jwk, canonical)
        }
        Pair::Rs256(pair) => {
            let public = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
            let (n, e) = (b64(&public.n), b64(&public.e));
            let canonical = format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#);
            let jwk = serde_json::json!({"kty": "RSA", "n": n, "e": e});
            (jwk, canonical)
        }
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.algorithm())
            .field("kid", &self.key_id)
            .field("thumbprint", &self.thumbprint())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_through_pkcs8() {
        for key in [
            SigningKey::generate_es256().unwrap(),
            SigningKey::generate_ed25519().unwrap(),
        ] {
            use secrecy::ExposeSecret;
            let again = SigningKey::from_pkcs8_der(key.export_pkcs8_der().expose_secret()).unwrap();
            assert_eq!(again.thumbprint(), key.thumbprint());
            assert_eq!(again.algorithm(), key.algorithm());
        }
    }

    #[test]
    fn rfc7638_thumbprint_of_the_rfc_example_shape() {
        // The canonical form puts members in lexicographic order.
        let key = SigningKey::generate_es256().unwrap();
        let jwk = key.public_jwk();
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            jwk["x"].as_str().unwrap(),
            jwk["y"].as_str().unwrap()
        );
        assert_eq!(key.thumbprint(), sha256_b64(canonical));
        assert_eq!(jwk["x"].as_str().unwrap().len(), 43);
        assert_eq!(jwk["y"].as_str().unwrap().len(), 43);
    }

    fn pem_block(tag: &str, contents: &[u8]) -> String {
        pem::encode(&pem::Pem::new(tag, contents.to_vec()))
    }

    #[test]
    fn the_private_key_is_found_among_certificates_in_a_pem_bundle() {
        use secrecy::ExposeSecret;
        let key = SigningKey::generate_es256().unwrap();
        let der = key.export_pkcs8_der();
        let private = pem_block("PRIVATE KEY", der.expose_secret());
        let cert = pem_block("CERTIFICATE", b"not parsed");
        for bundle in [
            format!("{cert}{private}"),
            format!("{private}{cert}"),
            format!("# the service key\n{cert}\n{private}").replace('\n', "\r\n"),
        ] {
            let loaded = SigningKey::from_pkcs8_pem(&bundle).unwrap();
            assert_eq!(loaded.thumbprint(), key.thumbprint());
        }
        let only_cert = SigningKey::from_pkcs8_pem(&cert).unwrap_err().to_string();
        assert!(only_cert.contains("CERTIFICATE"), "{only_cert}");
        let two = format!("{private}{}", pem_block("PRIVATE KEY", der.expose_secret()));
        let two = SigningKey::from_pkcs8_pem(&two).unwrap_err().to_string();
        assert!(two.contains("more than one"), "{two}");
    }

    #[test]
    fn garbage_is_a_typed_error() {
        assert!(SigningKey::from_pkcs8_der(b"nope").is_err());
        assert!(SigningKey::from_pkcs8_pem("nope").is_err());
    }
}
