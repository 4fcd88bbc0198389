//! DPoP on resource requests: the `Authorization: DPoP` header and a proof
//! per attempt, and the resource server's nonce challenge.

use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Request, StatusCode};

use super::{DPOP, DPOP_NONCE, DpopKey};
use crate::BoxError;

/// Puts a fresh proof on one attempt of a request that carries its token in
/// `Authorization` (`Bearer <token>` is turned into `DPoP <token>`), with
/// `ath` and the latest nonce of the request's origin.
///
/// A request without an `Authorization` token is refused: RFC 9449 §7.1
/// sends a DPoP-bound token in `Authorization: DPoP`, so a handle whose
/// injector puts it in the query or another header cannot speak DPoP.
pub(crate) fn stamp<B>(key: &DpopKey, request: &mut Request<B>) -> Result<(), BoxError> {
    let Some(value) = request.headers().get(AUTHORIZATION) else {
        return Err(
            "DPoP needs the token in the Authorization header (RFC 9449 §7.1); \
             the handle's injector puts it elsewhere (use `TokenInjector::bearer()` with DPoP)"
                .into(),
        );
    };
    let (value, token) = dpop_authorization(value)?;
    let proof = key.proof(request.method(), request.uri(), Some(&token))?;
    let headers = request.headers_mut();
    headers.insert(AUTHORIZATION, value);
    headers.insert(DPOP, HeaderValue::try_from(proof)?);
    Ok(())
}

/// `DPoP <token>` for an `Authorization` value of `Bearer <token>`, `DPoP
/// <token>` or a raw token; and the token, for `ath`.
fn dpop_authorization(value: &HeaderValue) -> Result<(HeaderValue, String), BoxError> {
    let text = value
        .to_str()
        .map_err(|_| "the Authorization header is not visible ASCII")?;
    let token = strip_scheme(text, "Bearer ")
        .or_else(|| strip_scheme(text, "DPoP "))
        .unwrap_or(text);
    let mut value = HeaderValue::try_from(format!("DPoP {token}"))?;
    value.set_sensitive(true);
    Ok((value, token.to_owned()))
}

fn strip_scheme<'a>(text: &'a str, scheme: &str) -> Option<&'a str> {
    let head = text.get(..scheme.len())?;
    head.eq_ignore_ascii_case(scheme)
        .then(|| text.get(scheme.len()..))
        .flatten()
}

/// A resource server's nonce challenge (RFC 9449 §9): `401` with
/// `WWW-Authenticate: DPoP error="use_dpop_nonce"` and a `DPoP-Nonce`.
pub(crate) fn is_nonce_challenge(status: StatusCode, headers: &HeaderMap) -> bool {
    status == StatusCode::UNAUTHORIZED
        && headers.contains_key(DPOP_NONCE)
        && headers.get_all(WWW_AUTHENTICATE).iter().any(|value| {
            let Ok(text) = value.to_str() else {
                return false;
            };
            let Ok(challenges) = http_auth::parse_challenges(text) else {
                return false;
            };
            challenges.iter().any(|challenge| {
                challenge.scheme.eq_ignore_ascii_case("dpop")
                    && challenge.params.iter().any(|(name, value)| {
                        name.eq_ignore_ascii_case("error")
                            && value.to_unescaped() == "use_dpop_nonce"
                    })
            })
        })
}

#[cfg(test)]
mod tests {
    use http::Method;

    use super::*;
    use crate::jose::sha256_b64;

    fn claims(proof: &HeaderValue) -> serde_json::Value {
        use base64::Engine;
        let payload = proof.to_str().unwrap().split('.').nth(1).unwrap();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn bearer_becomes_dpop_with_a_proof_bound_to_the_token() {
        let key = DpopKey::generate().unwrap();
        let mut request = Request::builder()
            .method(Method::PUT)
            .uri("https://api.example/orders/1?x=2")
            .header(AUTHORIZATION, "Bearer tok-1")
            .body(())
            .unwrap();
        stamp(&key, &mut request).unwrap();
        let authorization = &request.headers()[AUTHORIZATION];
        assert_eq!(authorization, "DPoP tok-1");
        assert!(authorization.is_sensitive());
        let claims = claims(&request.headers()[DPOP]);
        assert_eq!(claims["htm"], "PUT");
        assert_eq!(claims["htu"], "https://api.example/orders/1");
        assert_eq!(claims["ath"], sha256_b64("tok-1"));

        // A second attempt: the same token, a new proof.
        let first_jti = claims["jti"].clone();
        stamp(&key, &mut request).unwrap();
        assert_eq!(request.headers()[AUTHORIZATION], "DPoP tok-1");
        assert_ne!(self::claims(&request.headers()[DPOP])["jti"], first_jti);
    }

    #[test]
    fn nonce_challenges_are_recognised() {
        let mut headers = HeaderMap::new();
        headers.insert(
            WWW_AUTHENTICATE,
            r#"DPoP error="use_dpop_nonce", error_description="Resource server requires nonce in DPoP proof""#
                .parse()
                .unwrap(),
        );
        assert!(
            !is_nonce_challenge(StatusCode::UNAUTHORIZED, &headers),
            "no nonce given"
        );
        headers.insert(DPOP_NONCE, "n".parse().unwrap());
        assert!(is_nonce_challenge(StatusCode::UNAUTHORIZED, &headers));
        assert!(!is_nonce_challenge(StatusCode::FORBIDDEN, &headers));
        headers.insert(
            WWW_AUTHENTICATE,
            r#"DPoP error="invalid_token""#.parse().unwrap(),
        );
        assert!(!is_nonce_challenge(StatusCode::UNAUTHORIZED, &headers));
        headers.insert(
            WWW_AUTHENTICATE,
            r#"Bearer error="use_dpop_nonce""#.parse().unwrap(),
        );
        assert!(!is_nonce_challenge(StatusCode::UNAUTHORIZED, &headers));
    }
}
