//! Property tests of the token-response parsers: RFC 6749 answers and vendor
//! envelopes. Whatever the token endpoint sends, the parsers give a token or
//! a typed error, never a panic; a well-formed answer is read exactly.

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use std::time::Duration;

use super::envelope::{Envelope, ExpiryFormat};
use super::response::{json_object, parse_error, parse_success};
use http::StatusCode;
use secrecy::ExposeSecret;

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("access_token".to_owned()),
                    Just("token_type".to_owned()),
                    Just("expires_in".to_owned()),
                    Just("refresh_token".to_owned()),
                    Just("refresh_expires_in".to_owned()),
                    Just("scope".to_owned()),
                    Just("error".to_owned()),
                    Just("error_description".to_owned()),
                    Just("code".to_owned()),
                    Just("data".to_owned()),
                    Just("accessToken".to_owned()),
                    Just("expiresAt".to_owned()),
                    "[a-z]{1,6}",
                ],
                inner,
                0..6,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn envelopes() -> Vec<Envelope> {
    [
        ExpiryFormat::SecondsFromNow,
        ExpiryFormat::UnixSeconds,
        ExpiryFormat::UnixMillis,
    ]
    .into_iter()
    .map(|format| {
        Envelope::new("/data/accessToken")
            .refresh_token("/data/refreshToken")
            .expires("/data/expiresAt", format)
            .refresh_expires("/data/refreshExpiresAt", format)
            .code("/code", 0)
            .message("/msg")
    })
    .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_bytes_parse_to_a_token_or_an_error(body in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(map) = json_object(&body) {
            let _ = parse_success(&map);
            let _ = parse_error(StatusCode::BAD_REQUEST, &map);
        }
    }

    #[test]
    fn any_json_parses_to_a_token_or_an_error(value in any_json()) {
        let body = serde_json::to_vec(&value).unwrap();
        let map = json_object(&body);
        prop_assert_eq!(map.is_ok(), value.is_object());
        if let Ok(map) = map {
            if let Ok(token) = parse_success(&map) {
                prop_assert!(!token.access_token().expose_secret().is_empty());
            }
            let _ = parse_error(StatusCode::UNAUTHORIZED, &map);
            for envelope in envelopes() {
                let _ = envelope.parse(map.clone());
            }
            let wrapped: Map<String, Value> = json!({ "code": 0, "data": value.clone() })
                .as_object()
                .cloned()
                .unwrap_or_default();
            for envelope in envelopes() {
                let _ = envelope.parse(wrapped.clone());
            }
        }
    }

    #[test]
    fn any_expiry_number_is_a_token_or_an_error(expiry in any::<i64>(), refresh in any::<u64>()) {
        let map = json!({ "access_token": "a", "expires_in": expiry, "refresh_token": "r", "refresh_expires_in": refresh });
        let result = parse_success(map.as_object().unwrap());
        if expiry < 0 {
            prop_assert!(result.is_err(), "a negative expiry is refused");
        }
        for envelope in envelopes() {
            let map = json!({ "code": 0, "data": { "accessToken": "a", "expiresAt": expiry, "refreshExpiresAt": refresh } });
            let _ = envelope.parse(map.as_object().unwrap().clone());
        }
    }

    #[test]
    fn a_well_formed_answer_is_read_exactly(
        access in "[A-Za-z0-9._~+/-]{1,64}",
        refresh in proptest::option::of("[A-Za-z0-9._~+/-]{1,64}"),
        expires_in in proptest::option::of(1u64..10_000_000),
        scopes in prop::collection::vec("[a-z:]{1,10}", 0..4),
    ) {
        let mut map = Map::new();
        map.insert("access_token".into(), json!(access));
        map.insert("token_type".into(), json!("bearer"));
        if let Some(r) = &refresh {
            map.insert("refresh_token".into(), json!(r));
        }
        if let Some(e) = expires_in {
            map.insert("expires_in".into(), json!(e));
        }
        if !scopes.is_empty() {
            map.insert("scope".into(), json!(scopes.join(" ")));
        }
        let token = parse_success(&map).unwrap();
        prop_assert_eq!(token.access_token().expose_secret(), access.as_str());
        prop_assert_eq!(token.token_type(), "Bearer");
        prop_assert_eq!(token.refresh_token().map(|r| r.expose_secret().to_owned()), refresh);
        if let Some(e) = expires_in {
            let left = token.expires_in().unwrap();
            prop_assert!(left <= Duration::from_secs(e) && left + Duration::from_secs(5) >= Duration::from_secs(e));
        }
        prop_assert_eq!(token.scopes().to_vec(), scopes);
    }
}
