//! Reads only the top-level members of a JSON object that a set of JSON
//! pointers can reach; every other member is checked and skipped without
//! being built. A 60 KiB answer whose `data` nobody looks at then costs a
//! scan, not a tree of maps and strings.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};

/// The first reference token of `pointer` (RFC 6901), unescaped; `None` for
/// the empty pointer (the whole document).
pub(crate) fn first_member(pointer: &str) -> Option<String> {
    let rest = pointer.strip_prefix('/')?;
    let first = rest.split('/').next().unwrap_or(rest);
    Some(first.replace("~1", "/").replace("~0", "~"))
}

/// `Some(object)` with only the `wanted` top-level members when `body` is a
/// JSON object; `None` when it is valid JSON of another kind; `Err` when it
/// is not JSON.
pub(crate) fn wanted_members(
    body: &[u8],
    wanted: &[String],
) -> Result<Option<Value>, serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let object = Wanted(wanted).deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(object.map(Value::Object))
}

struct Wanted<'w>(&'w [String]);

impl<'de> DeserializeSeed<'de> for Wanted<'_> {
    type Value = Option<Map<String, Value>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Wanted<'_> {
    type Value = Option<Map<String, Value>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut kept = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if self.0.contains(&key) {
                let value = map.next_value::<Value>()?;
                kept.insert(key, value);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Some(kept))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_members_pointers_reach() {
        let body = br#"{"code":40003,"data":{"big":[1,2,3]},"msg":"token\u8fc7\u671f","x/y":1}"#;
        let wanted = vec!["code".to_owned(), "msg".to_owned(), "x/y".to_owned()];
        let object = wanted_members(body, &wanted).unwrap().unwrap();
        assert_eq!(object.pointer("/code"), Some(&Value::from(40003)));
        assert_eq!(object.pointer("/msg"), Some(&Value::from("token过期")));
        assert_eq!(object.pointer("/x~1y"), Some(&Value::from(1)));
        assert!(object.pointer("/data").is_none());
    }

    #[test]
    fn other_json_is_none_and_broken_json_an_error() {
        assert!(wanted_members(b"[1,{\"code\":1}]", &[]).unwrap().is_none());
        assert!(wanted_members(b"\"text\"", &[]).unwrap().is_none());
        assert!(wanted_members(b"{\"code\":1", &[]).is_err());
        assert!(wanted_members(b"{\"code\":1} trailing", &[]).is_err());
    }

    #[test]
    fn first_members_are_unescaped() {
        assert_eq!(first_member("/data/code").as_deref(), Some("data"));
        assert_eq!(first_member("/a~1b~0c").as_deref(), Some("a/b~c"));
        assert_eq!(first_member(""), None);
        assert_eq!(first_member("/").as_deref(), Some(""));
    }
}
