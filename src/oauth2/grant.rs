//! The grants: what is presented at the token endpoint.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};

/// A grant that needs no person and can always run again: the
/// [`OAuth2Source`](super::OAuth2Source)'s initial grant, used when there is
/// no token yet and whenever the refresh token is gone or rejected.
///
/// ```
/// use tower_auth_refresh::oauth2::Grant;
///
/// let machine = Grant::client_credentials();
/// let user = Grant::password("alice", "correct horse");
/// assert!(!format!("{user:?}").contains("horse"));
/// # let _ = machine;
/// ```
#[derive(Clone)]
pub struct Grant {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    ClientCredentials,
    Password {
        username: String,
        password: SecretString,
    },
}

impl Grant {
    /// `grant_type=client_credentials` (RFC 6749 §4.4).
    pub fn client_credentials() -> Self {
        Self {
            kind: Kind::ClientCredentials,
        }
    }

    /// `grant_type=password`, the resource-owner password grant (RFC 6749 §4.3).
    pub fn password(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            kind: Kind::Password {
                username: username.into(),
                password: SecretString::from(password.into()),
            },
        }
    }

    /// The `grant_type` value.
    pub fn grant_type(&self) -> &'static str {
        match self.kind {
            Kind::ClientCredentials => "client_credentials",
            Kind::Password { .. } => "password",
        }
    }

    pub(crate) fn append_form(&self, form: &mut form_urlencoded::Serializer<'_, String>) {
        form.append_pair("grant_type", self.grant_type());
        if let Kind::Password { username, password } = &self.kind {
            form.append_pair("username", username);
            form.append_pair("password", password.expose_secret());
        }
    }
}

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::ClientCredentials => f.write_str("Grant::ClientCredentials"),
            Kind::Password { username, .. } => f
                .debug_struct("Grant::Password")
                .field("username", username)
                .field("password", &"[REDACTED]")
                .finish(),
        }
    }
}

/// An authorization code to exchange (RFC 6749 §4.1.3), with the
/// `redirect_uri` it was issued for and the PKCE verifier when one was used.
/// Without a `redirect_uri` here, the source's configured one is sent.
///
/// ```
/// use tower_auth_refresh::oauth2::AuthorizationCode;
///
/// let code = AuthorizationCode::new("SplxlOBeZQQYbYS6WxSbIA")
///     .with_redirect_uri("https://app.example/callback")
///     .with_pkce_verifier("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk");
/// assert!(!format!("{code:?}").contains("SplxlOBeZQQYbYS6WxSbIA"));
/// let plain: AuthorizationCode = "from-the-operator".into();
/// # let _ = plain;
/// ```
#[derive(Clone)]
pub struct AuthorizationCode {
    pub(crate) code: SecretString,
    pub(crate) redirect_uri: Option<String>,
    pub(crate) pkce_verifier: Option<SecretString>,
}

impl AuthorizationCode {
    /// A code as the authorization server gave it.
    pub fn new(code: impl Into<String>) -> Self {
        Self {
            code: SecretString::from(code.into()),
            redirect_uri: None,
            pkce_verifier: None,
        }
    }

    /// The `redirect_uri` of the authorization request.
    pub fn with_redirect_uri(mut self, redirect_uri: impl Into<String>) -> Self {
        self.redirect_uri = Some(redirect_uri.into());
        self
    }

    /// The verifier of a [`Pkce`](super::Pkce) pair made for this code's
    /// authorization request.
    pub fn with_pkce(mut self, pkce: &super::Pkce) -> Self {
        self.pkce_verifier = Some(pkce.verifier().clone());
        self
    }

    /// The PKCE `code_verifier` (RFC 7636), when it was made elsewhere.
    pub fn with_pkce_verifier(mut self, verifier: impl Into<String>) -> Self {
        self.pkce_verifier = Some(SecretString::from(verifier.into()));
        self
    }
}

impl From<String> for AuthorizationCode {
    fn from(code: String) -> Self {
        Self::new(code)
    }
}

impl From<&str> for AuthorizationCode {
    fn from(code: &str) -> Self {
        Self::new(code)
    }
}

impl fmt::Debug for AuthorizationCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorizationCode")
            .field("code", &"[REDACTED]")
            .field("redirect_uri", &self.redirect_uri)
            .field(
                "pkce_verifier",
                &self.pkce_verifier.as_ref().map(|_| "[REDACTED]"),
            )
            .finish()
    }
}

/// One token request's grant parameters.
pub(crate) enum GrantRequest<'a> {
    Initial(&'a Grant),
    Refresh(&'a SecretString),
    Code(&'a AuthorizationCode, Option<&'a str>),
}

impl GrantRequest<'_> {
    pub(crate) fn grant_type(&self) -> &'static str {
        match self {
            Self::Initial(grant) => grant.grant_type(),
            Self::Refresh(_) => "refresh_token",
            Self::Code(..) => "authorization_code",
        }
    }

    /// Appends the grant's parameters, and `scope` where RFC 6749 allows it.
    pub(crate) fn append_form(
        &self,
        form: &mut form_urlencoded::Serializer<'_, String>,
        scope: Option<&str>,
    ) {
        match self {
            Self::Initial(grant) => {
                grant.append_form(form);
                if let Some(scope) = scope {
                    form.append_pair("scope", scope);
                }
            }
            Self::Refresh(refresh_token) => {
                form.append_pair("grant_type", "refresh_token");
                form.append_pair("refresh_token", refresh_token.expose_secret());
            }
            Self::Code(code, default_redirect) => {
                form.append_pair("grant_type", "authorization_code");
                form.append_pair("code", code.code.expose_secret());
                if let Some(uri) = code.redirect_uri.as_deref().or(*default_redirect) {
                    form.append_pair("redirect_uri", uri);
                }
                if let Some(verifier) = &code.pkce_verifier {
                    form.append_pair("code_verifier", verifier.expose_secret());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(request: GrantRequest<'_>, scope: Option<&str>) -> String {
        let mut form = form_urlencoded::Serializer::new(String::new());
        request.append_form(&mut form, scope);
        form.finish()
    }

    #[test]
    fn forms_of_each_grant() {
        assert_eq!(
            form(
                GrantRequest::Initial(&Grant::client_credentials()),
                Some("a b")
            ),
            "grant_type=client_credentials&scope=a+b"
        );
        assert_eq!(
            form(
                GrantRequest::Initial(&Grant::password("al ice", "p&w")),
                None
            ),
            "grant_type=password&username=al+ice&password=p%26w"
        );
        let rt = SecretString::from("r/1".to_owned());
        assert_eq!(
            form(GrantRequest::Refresh(&rt), Some("ignored")),
            "grant_type=refresh_token&refresh_token=r%2F1"
        );
        let code = AuthorizationCode::new("c").with_pkce_verifier("v");
        assert_eq!(
            form(GrantRequest::Code(&code, Some("http://x/cb")), None),
            "grant_type=authorization_code&code=c&redirect_uri=http%3A%2F%2Fx%2Fcb&code_verifier=v"
        );
    }
}
