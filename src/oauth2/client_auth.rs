//! [`ClientAuth`]: how the client authenticates at the token endpoint.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};

/// How the client authenticates at the token endpoint (RFC 6749 §2.3.1).
///
/// ```
/// use tower_auth_refresh::oauth2::ClientAuth;
///
/// let basic = ClientAuth::basic("reports:svc", "s3cr3t");   // the default method
/// let post = ClientAuth::post("reports", "s3cr3t");          // id and secret in the form
/// let public = ClientAuth::none("mobile-app");               // public client, id only
/// assert!(!format!("{basic:?} {post:?} {public:?}").contains("s3cr3t"));
/// ```
#[derive(Clone)]
pub struct ClientAuth {
    id: String,
    secret: Option<SecretString>,
    method: Method,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Basic,
    Post,
    None,
}

impl ClientAuth {
    /// `client_secret_basic`: HTTP Basic with the id and secret each
    /// form-urlencoded first, as RFC 6749 §2.3.1 requires.
    pub fn basic(id: impl Into<String>, secret: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            secret: Some(SecretString::from(secret.into())),
            method: Method::Basic,
        }
    }

    /// `client_secret_post`: `client_id` and `client_secret` in the form body.
    pub fn post(id: impl Into<String>, secret: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            secret: Some(SecretString::from(secret.into())),
            method: Method::Post,
        }
    }

    /// A public client: only `client_id` in the form body.
    pub fn none(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            secret: None,
            method: Method::None,
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
            Method::None => {
                form.append_pair("client_id", &self.id);
            }
        }
    }
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientAuth")
            .field("client_id", &self.id)
            .field("method", &self.method_name())
            .field("secret", &self.secret.as_ref().map(|_| "[REDACTED]"))
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
}
