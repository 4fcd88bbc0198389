//! [`ClientAuth`]: how the client authenticates at the token endpoint.

use std::fmt;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};

use crate::jose::{KeyError, SigningKey, random_id, sign_compact, unix_now};

/// How long a client assertion is valid: `exp` is `iat` plus this.
pub(crate) const ASSERTION_LIFETIME: Duration = Duration::from_secs(60);

/// `client_assertion_type` of RFC 7523 §2.2.
const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How the client authenticates at the token endpoint (RFC 6749 §2.3.1).
///
/// ```
/// use tower_auth_refresh::oauth2::ClientAuth;
///
/// let basic = ClientAuth::basic("reports:svc", "s3cr3t");   // the default method
/// let post = ClientAuth::post("reports", "s3cr3t");          // id and secret in the form
/// let public = ClientAuth::none("mobile-app");               // public client, id only
/// assert!(!format!("{basic:?} {post:?} {public:?}").contains("s3cr3t"));
///
/// // Signed assertions (RFC 7523 §2.2): a fresh JWT per token request.
/// let key = tower_auth_refresh::oauth2::SigningKey::generate_es256()?;
/// let signed = ClientAuth::private_key_jwt("reports", key);
/// let hmac = ClientAuth::client_secret_jwt("reports", "s3cr3t");
/// assert_eq!(signed.method_name(), "private_key_jwt");
/// assert!(!format!("{hmac:?}").contains("s3cr3t"));
/// # Ok::<(), tower_auth_refresh::oauth2::KeyError>(())
/// ```
#[derive(Clone)]
pub struct ClientAuth {
    id: String,
    secret: Option<SecretString>,
    key: Option<SigningKey>,
    method: Method,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Basic,
    Post,
    None,
    PrivateKeyJwt,
    SecretJwt,
}

impl ClientAuth {
    /// `client_secret_basic`: HTTP Basic with the id and secret each
    /// form-urlencoded first, as RFC 6749 §2.3.1 requires.
    pub fn basic(id: impl Into<String>, secret: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            secret: Some(SecretString::from(secret.into())),
            key: None,
            method: Method::Basic,
        }
    }

    /// `client_secret_post`: `client_id` and `client_secret` in the form body.
    pub fn post(id: impl Into<String>, secret: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            secret: Some(SecretString::from(secret.into())),
            key: None,
            method: Method::Post,
        }
    }

    /// A public client: only `client_id` in the form body.
    pub fn none(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            secret: None,
            key: None,
            method: Method::None,
        }
    }

    /// `private_key_jwt` (RFC 7523 §2.2, OpenID Connect Core §9): each token
    /// request carries a JWT signed with `key` (RS256, ES256 or EdDSA), with
    /// `iss` and `sub` the client id, `aud` the token endpoint URL, a unique
    /// `jti` and an `exp` one minute ahead. The server knows the public key
    /// ([`SigningKey::public_jwk`]).
    pub fn private_key_jwt(id: impl Into<String>, key: SigningKey) -> Self {
        Self {
            id: id.into(),
            secret: None,
            key: Some(key),
            method: Method::PrivateKeyJwt,
        }
    }

    /// `client_secret_jwt` (RFC 7523 §2.2): like
    /// [`private_key_jwt`](Self::private_key_jwt), signed with HS256 and the
    /// client secret instead of a private key. The secret itself is never sent.
    pub fn client_secret_jwt(id: impl Into<String>, secret: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            secret: Some(SecretString::from(secret.into())),
            key: None,
            method: Method::SecretJwt,
        }
    }

    /// The client id.
    pub fn client_id(&self) -> &str {
        &self.id
    }

    /// The method's name as in the OAuth2 client metadata
    /// (`client_secret_basic`, `client_secret_post`, `none`).
    pub fn method_name(&self) -> &'static str {
        match self.method {
            Method::Basic => "client_secret_basic",
            Method::Post => "client_secret_post",
            Method::None => "none",
            Method::PrivateKeyJwt => "private_key_jwt",
            Method::SecretJwt => "client_secret_jwt",
        }
    }

    /// The `Authorization` header, for `client_secret_basic`.
    pub(crate) fn header(&self) -> Option<HeaderValue> {
        if self.method != Method::Basic {
            return None;
        }
        let secret = self.secret.as_ref().map_or("", |s| s.expose_secret());
        let pair = format!("{}:{}", form_encode(&self.id), form_encode(secret));
        let mut value = HeaderValue::try_from(format!("Basic {}", STANDARD.encode(pair))).ok()?;
        value.set_sensitive(true);
        Some(value)
    }

    /// The form parameters, for `client_secret_post` and public clients.
    pub(crate) fn append_form(&self, form: &mut form_urlencoded::Serializer<'_, String>) {
        match self.method {
            Method::Basic => {}
            Method::Post => {
                form.append_pair("client_id", &self.id);
                if let Some(secret) = &self.secret {
                    form.append_pair("client_secret", secret.expose_secret());
                }
            }
            Method::None | Method::PrivateKeyJwt | Method::SecretJwt => {
                form.append_pair("client_id", &self.id);
            }
        }
    }

    /// `&client_assertion_type=…&client_assertion=…` for one attempt, with a
    /// new `jti`, for the token endpoint at `audience`; `None` for the
    /// methods without assertions.
    pub(crate) fn assertion_form(&self, audience: &str) -> Result<Option<String>, KeyError> {
        let now = unix_now();
        let claims = || -> Result<serde_json::Value, KeyError> {
            Ok(serde_json::json!({
                "iss": self.id,
                "sub": self.id,
                "aud": audience,
                "jti": random_id(16)?,
                "iat": now,
                "exp": now.saturating_add(ASSERTION_LIFETIME.as_secs()),
            }))
        };
        let assertion = match self.method {
            Method::PrivateKeyJwt => {
                let Some(key) = &self.key else {
                    return Ok(None);
                };
                let mut header = serde_json::json!({"alg": key.algorithm(), "typ": "JWT"});
                if let Some(kid) = key.key_id() {
                    header["kid"] = kid.into();
                }
                sign_compact(|input| key.sign(input), &header, &claims()?)?
            }
            Method::SecretJwt => {
                let secret = self.secret.as_ref().map_or("", |s| s.expose_secret());
                let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
                let header = serde_json::json!({"alg": "HS256", "typ": "JWT"});
                sign_compact(
                    |input| Ok(ring::hmac::sign(&hmac, input).as_ref().to_vec()),
                    &header,
                    &claims()?,
                )?
            }
            Method::Basic | Method::Post | Method::None => return Ok(None),
        };
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("client_assertion_type", JWT_BEARER_ASSERTION);
        form.append_pair("client_assertion", &assertion);
        Ok(Some(format!("&{}", form.finish())))
    }
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientAuth")
            .field("client_id", &self.id)
            .field("method", &self.method_name())
            .field("secret", &self.secret.as_ref().map(|_| "[REDACTED]"))
            .field("key", &self.key)
            .finish()
    }
}

/// `application/x-www-form-urlencoded` encoding of one value.
fn form_encode(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_form_encodes_id_and_secret_before_base64() {
        let auth = ClientAuth::basic("reports:svc", "a b+/=:%&é");
        let header = auth.header().unwrap();
        assert!(header.is_sensitive());
        let encoded = header.to_str().unwrap().strip_prefix("Basic ").unwrap();
        let decoded = String::from_utf8(STANDARD.decode(encoded).unwrap()).unwrap();
        assert_eq!(decoded, "reports%3Asvc:a+b%2B%2F%3D%3A%25%26%C3%A9");
    }

    #[test]
    fn post_puts_credentials_in_the_form() {
        let mut form = form_urlencoded::Serializer::new(String::new());
        ClientAuth::post("id 1", "p&w").append_form(&mut form);
        assert_eq!(form.finish(), "client_id=id+1&client_secret=p%26w");
        assert!(ClientAuth::post("a", "b").header().is_none());
    }

    /// Decodes `client_assertion` from the form fragment and verifies it
    /// with jsonwebtoken, an independent JOSE implementation.
    fn verified_claims(
        fragment: &str,
        key: &jsonwebtoken::DecodingKey,
        alg: jsonwebtoken::Algorithm,
    ) -> serde_json::Value {
        let pairs: Vec<(String, String)> =
            form_urlencoded::parse(fragment.trim_start_matches('&').as_bytes())
                .into_owned()
                .collect();
        assert_eq!(pairs[0].0, "client_assertion_type");
        assert_eq!(pairs[0].1, JWT_BEARER_ASSERTION);
        let jwt = &pairs[1].1;
        let mut validation = jsonwebtoken::Validation::new(alg);
        validation.set_audience(&["https://as.example/token"]);
        validation.set_issuer(&["svc"]);
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        jsonwebtoken::decode::<serde_json::Value>(jwt, key, &validation)
            .unwrap()
            .claims
    }

    fn assert_claims(claims: &serde_json::Value) {
        assert_eq!(claims["sub"], "svc");
        let iat = claims["iat"].as_u64().unwrap();
        let exp = claims["exp"].as_u64().unwrap();
        assert_eq!(exp - iat, ASSERTION_LIFETIME.as_secs());
        assert!(iat.abs_diff(unix_now()) <= 5);
    }

    fn decoding_key(key: &SigningKey) -> jsonwebtoken::DecodingKey {
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.public_jwk().clone()).unwrap();
        jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap()
    }

    #[test]
    fn private_key_jwt_with_each_algorithm_verifies() {
        let rsa =
            SigningKey::from_pkcs8_pem(include_str!("../../tests/keys/rsa-2048-test-only.pem"))
                .unwrap()
                .with_key_id("rsa-1");
        let cases = [
            (rsa, jsonwebtoken::Algorithm::RS256),
            (
                SigningKey::generate_es256().unwrap(),
                jsonwebtoken::Algorithm::ES256,
            ),
            (
                SigningKey::generate_ed25519().unwrap(),
                jsonwebtoken::Algorithm::EdDSA,
            ),
        ];
        for (key, alg) in cases {
            let auth = ClientAuth::private_key_jwt("svc", key.clone());
            assert!(auth.header().is_none());
            let mut form = form_urlencoded::Serializer::new(String::new());
            auth.append_form(&mut form);
            assert_eq!(form.finish(), "client_id=svc");
            let first = auth
                .assertion_form("https://as.example/token")
                .unwrap()
                .unwrap();
            let second = auth
                .assertion_form("https://as.example/token")
                .unwrap()
                .unwrap();
            let a = verified_claims(&first, &decoding_key(&key), alg);
            let b = verified_claims(&second, &decoding_key(&key), alg);
            assert_claims(&a);
            assert_ne!(a["jti"], b["jti"], "each assertion has its own jti");
            let jwt = first.rsplit('=').next().unwrap();
            let header = jsonwebtoken::decode_header(jwt).unwrap();
            assert_eq!(header.kid.as_deref(), key.key_id());
        }
    }

    #[test]
    fn client_secret_jwt_is_hs256_with_the_secret() {
        let auth = ClientAuth::client_secret_jwt("svc", "shared-secret-XYZ");
        let fragment = auth
            .assertion_form("https://as.example/token")
            .unwrap()
            .unwrap();
        assert!(!fragment.contains("XYZ"));
        let claims = verified_claims(
            &fragment,
            &jsonwebtoken::DecodingKey::from_secret(b"shared-secret-XYZ"),
            jsonwebtoken::Algorithm::HS256,
        );
        assert_claims(&claims);
        assert!(!format!("{auth:?}").contains("XYZ"));
        assert!(
            ClientAuth::basic("a", "b")
                .assertion_form("x")
                .unwrap()
                .is_none()
        );
    }
}
