//! JSON pointers (RFC 6901) parsed once, when a rule is built: looking a
//! value up then walks ready-made reference tokens and allocates nothing.

use std::fmt;

use serde_json::Value;

/// A JSON pointer: its text, as the rule was given it, and its reference
/// tokens, unescaped (`~1` is `/`, `~0` is `~`).
///
/// It reaches what [`Value::pointer`] reaches: the empty pointer is the
/// whole document, and text that does not start with `/` reaches nothing.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct JsonPointer {
    text: String,
    /// `None` when the text is not a pointer; empty for the whole document.
    tokens: Option<Vec<String>>,
}

impl JsonPointer {
    pub(crate) fn parse(text: String) -> Self {
        let tokens = if text.is_empty() {
            Some(Vec::new())
        } else {
            text.strip_prefix('/')
                .map(|rest| rest.split('/').map(unescape).collect())
        };
        Self { text, tokens }
    }

    /// The pointer as it was written.
    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }

    /// The reference tokens; `None` when the pointer reaches nothing.
    pub(crate) fn tokens(&self) -> Option<&[String]> {
        self.tokens.as_deref()
    }

    /// The value this pointer reaches in `document`: [`Value::pointer`]
    /// without unescaping anything per call.
    pub(crate) fn find<'v>(&self, document: &'v Value) -> Option<&'v Value> {
        walk(document, self.tokens()?)
    }
}

impl fmt::Debug for JsonPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

/// One reference token, unescaped as [`Value::pointer`] does it (`~1`
/// first, then `~0`, which for these two escapes is one left-to-right pass;
/// any other `~` stays).
fn unescape(token: &str) -> String {
    let mut out = String::with_capacity(token.len());
    let mut chars = token.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('~', Some('1')) => {
                out.push('/');
                chars.next();
            }
            ('~', Some('0')) => {
                out.push('~');
                chars.next();
            }
            _ => out.push(c),
        }
    }
    out
}

/// The value `tokens` reach from `value`: an object's member by name, an
/// array's element by index.
pub(crate) fn walk<'v>(mut value: &'v Value, tokens: &[String]) -> Option<&'v Value> {
    for token in tokens {
        value = match value {
            Value::Object(members) => members.get(token.as_str())?,
            Value::Array(elements) => elements.get(array_index(token)?)?,
            _ => return None,
        };
    }
    Some(value)
}

/// An array index as RFC 6901 writes it: decimal digits without leading
/// zeros (`0`, `7`, `12`; not `07`, `+1`, `-1` or `-`).
fn array_index(token: &str) -> Option<usize> {
    let digits = token.as_bytes();
    let canonical = match digits {
        [] => false,
        [b'0', _, ..] => false,
        _ => digits.iter().all(u8::is_ascii_digit),
    };
    if canonical { token.parse().ok() } else { None }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn tokens(text: &str) -> Option<Vec<String>> {
        JsonPointer::parse(text.to_owned())
            .tokens()
            .map(<[_]>::to_vec)
    }

    #[test]
    fn tokens_are_unescaped_once() {
        assert_eq!(tokens(""), Some(vec![]));
        assert_eq!(tokens("code"), None);
        assert_eq!(tokens("/"), Some(vec![String::new()]));
        assert_eq!(tokens("/a/b"), Some(vec!["a".into(), "b".into()]));
        assert_eq!(tokens("/a~1b~0c"), Some(vec!["a/b~c".into()]));
        assert_eq!(tokens("/~01"), Some(vec!["~1".into()]));
        assert_eq!(tokens("/~~1~2~"), Some(vec!["~/~2~".into()]));
    }

    #[test]
    fn indices_are_canonical_decimals() {
        let document = json!({"a": [10, 11, 12], "": {"": 1}, "0": "zero"});
        for (pointer, want) in [
            ("/a/0", Some(json!(10))),
            ("/a/2", Some(json!(12))),
            ("/a/3", None),
            ("/a/01", None),
            ("/a/+1", None),
            ("/a/-1", None),
            ("/a/-", None),
            ("/a/", None),
            ("/a/99999999999999999999999", None),
            ("//", Some(json!(1))),
            ("/0", Some(json!("zero"))),
            ("", Some(document.clone())),
            ("a", None),
        ] {
            let found = JsonPointer::parse(pointer.to_owned()).find(&document);
            assert_eq!(found, want.as_ref(), "{pointer}");
            assert_eq!(found, document.pointer(pointer), "{pointer}");
        }
    }

    #[test]
    fn debug_shows_the_text() {
        let pointer = JsonPointer::parse("/a~1b".to_owned());
        assert_eq!(format!("{pointer:?}"), r#""/a~1b""#);
        assert_eq!(pointer.as_str(), "/a~1b");
    }

    /// Member names that the escapes and indices below can reach.
    const NAMES: [&str; 14] = [
        "a", "b", "~", "/", "~2", "~1", "/0", "0", "1", "01", "", "-", "+1", "a/b",
    ];

    /// Pieces of pointer text: names, escapes (valid or not), indices with
    /// and without leading zeros, signs, empty tokens.
    const PIECES: [&str; 18] = [
        "a",
        "b",
        "~0",
        "~1",
        "~",
        "~2",
        "~01",
        "~10",
        "0",
        "1",
        "01",
        "00",
        "10",
        "-",
        "+1",
        "",
        "a~1b",
        "18446744073709551616",
    ];

    fn document() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![Just(Value::Null), any::<i64>().prop_map(Value::from)];
        leaf.prop_recursive(4, 64, 12, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..12).prop_map(Value::from),
                prop::collection::btree_map(prop::sample::select(NAMES.to_vec()), inner, 0..8)
                    .prop_map(|m| Value::Object(
                        m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                    )),
            ]
        })
    }

    fn pointer_text() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::collection::vec(prop::sample::select(PIECES.to_vec()), 0..5)
                .prop_map(|pieces| pieces.iter().map(|p| format!("/{p}")).collect()),
            1 => "[ab~01/+-]{0,10}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn finds_what_value_pointer_finds(document in document(), text in pointer_text()) {
            let pointer = JsonPointer::parse(text.clone());
            prop_assert_eq!(pointer.find(&document), document.pointer(&text), "{}", text);
            prop_assert_eq!(pointer.as_str(), text.as_str());
        }

        #[test]
        fn tokens_unescape_as_value_pointer_does(text in "(/[a~01]{0,6}){0,3}") {
            let want: Vec<String> = text
                .split('/')
                .skip(1)
                .map(|t| t.replace("~1", "/").replace("~0", "~"))
                .collect();
            let pointer = JsonPointer::parse(text.clone());
            prop_assert_eq!(pointer.tokens(), Some(&want[..]), "{}", text);
        }
    }
}
