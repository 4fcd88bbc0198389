//! [`Pkce`]: a PKCE verifier and its S256 challenge (RFC 7636).

use std::fmt;

use secrecy::SecretString;

use crate::jose::{KeyError, random_id, sha256_b64};

/// A PKCE pair for one authorization request (RFC 7636): a fresh random
/// `code_verifier` (32 bytes from the system CSPRNG, 43 characters) and its
/// `S256` `code_challenge`. Send [`challenge`](Self::challenge) with the
/// authorization request, then give the pair to
/// [`AuthorizationCode::with_pkce`](super::AuthorizationCode::with_pkce)
/// when the code comes back.
///
/// ```
/// use tower_auth_refresh::oauth2::{AuthorizationCode, Pkce};
///
/// let pkce = Pkce::generate()?;
/// assert_eq!(pkce.challenge_method(), "S256");
/// let query = pkce.authorization_params(); // code_challenge=…&code_challenge_method=S256
/// assert!(query.ends_with("&code_challenge_method=S256"));
/// // … the user authorizes, the redirect brings a code …
/// let code = AuthorizationCode::new("code-from-the-redirect").with_pkce(&pkce);
/// use secrecy::ExposeSecret;
/// assert!(!format!("{pkce:?} {code:?}").contains(pkce.verifier().expose_secret()));
/// # Ok::<(), tower_auth_refresh::oauth2::KeyError>(())
/// ```
#[derive(Clone)]
pub struct Pkce {
    verifier: SecretString,
    challenge: String,
}

impl Pkce {
    /// A new verifier and its S256 challenge.
    pub fn generate() -> Result<Self, KeyError> {
        let verifier = random_id(32)?;
        let challenge = sha256_b64(&verifier);
        Ok(Self {
            verifier: SecretString::from(verifier),
            challenge,
        })
    }

    /// The `code_challenge`: base64url(SHA-256(verifier)).
    pub fn challenge(&self) -> &str {
        &self.challenge
    }

    /// The `code_challenge_method`: always `S256`.
    pub fn challenge_method(&self) -> &'static str {
        "S256"
    }

    /// `code_challenge=…&code_challenge_method=S256`, form-encoded, for the
    /// authorization request's query.
    pub fn authorization_params(&self) -> String {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("code_challenge", &self.challenge)
            .append_pair("code_challenge_method", self.challenge_method())
            .finish()
    }

    /// The `code_verifier`, sent only to the token endpoint.
    pub fn verifier(&self) -> &SecretString {
        &self.verifier
    }
}

impl fmt::Debug for Pkce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkce")
            .field("challenge", &self.challenge)
            .field("method", &self.challenge_method())
            .field("verifier", &"[REDACTED]")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn verifier_is_rfc7636_shaped_and_challenge_is_s256() {
        let pkce = Pkce::generate().unwrap();
        let verifier = pkce.verifier().expose_secret();
        assert_eq!(verifier.len(), 43);
        assert!(
            verifier
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
        );
        assert_eq!(pkce.challenge(), sha256_b64(verifier));
        assert_ne!(
            Pkce::generate().unwrap().verifier().expose_secret(),
            verifier
        );
    }
}
