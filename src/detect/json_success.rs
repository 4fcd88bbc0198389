//! A look at the raw bytes of a JSON object that finds its top-level
//! codes without parsing: enough to tell the usual success envelope
//! (`{"code":0,…}`) or a 2xx without a code before any parse.
//!
//! It answers only when the bytes leave no doubt. A body that is valid JSON
//! gives the values a parse would give (the last of repeated members, as
//! `serde_json` keeps); a body that is not JSON may give anything, which a
//! caller must only use to conclude what it concludes for broken JSON too.

use super::json_fields::Leaf;

/// Reads, from the raw bytes of the object `body` (from its `{`,
/// whitespace before it allowed), the value of each top-level member whose
/// key `slot_of` maps to a slot into `found[slot]`: a scalar, or
/// [`Leaf::Composite`] for an object or an array. Members the body does not
/// have stay `None`.
///
/// `false` when telling would need a parse: a top-level key written with an
/// escape (`"\u0063ode"` is `code`), a wanted member's value a string with
/// an escape or a number other than a plain integer of up to 18 digits, a
/// slot outside `found`, or bytes that cannot be JSON.
///
/// After the first wanted value, `rest_is_plain` is asked about the bytes
/// after it: when they hold no escape and no wanted key (`true`), there is
/// nothing more to find and they are not walked.
pub(crate) fn top_level_scalars<'b>(
    body: &'b [u8],
    slot_of: impl Fn(&[u8]) -> Option<usize>,
    rest_is_plain: impl Fn(&[u8]) -> bool,
    found: &mut [Option<Leaf<'b>>],
) -> bool {
    let mut depth = 0usize;
    let mut at = 0;
    let mut asked = false;
    while let Some(&byte) = body.get(at) {
        at += 1;
        if !STRUCTURE[usize::from(byte)] {
            continue;
        }
        match byte {
            b'"' => {
                let start = at;
                let Some((end, escaped)) = string_end(body, start) else {
                    return false;
                };
                at = end + 1;
                // NOTE: in valid JSON, bytes outside strings are structure,
                // so `depth` counts the containers around this string, and a
                // string followed by `:` is a key.
                if depth != 1 {
                    continue;
                }
                let colon = skip_whitespace(body, at);
                if body.get(colon) != Some(&b':') {
                    continue;
                }
                if escaped {
                    return false;
                }
                let Some(slot) = slot_of(&body[start..end]) else {
                    continue;
                };
                let value_at = skip_whitespace(body, colon + 1);
                let Some((value, next)) = value(body, value_at) else {
                    return false;
                };
                let Some(kept) = found.get_mut(slot) else {
                    return false;
                };
                *kept = Some(value);
                at = next;
                // NOTE: a key is a whole string after the value, so without
                // an escape every later key equal to a wanted name shows as
                // that name in quotes. Asked once: a body repeating a
                // member is walked, not searched again and again.
                if !asked {
                    asked = true;
                    if body.get(at..).is_some_and(&rest_is_plain) {
                        return true;
                    }
                }
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => match depth.checked_sub(1) {
                Some(outer) => depth = outer,
                None => return false,
            },
            _ => {}
        }
    }
    true
}

/// The bytes that matter outside strings: quotes and brackets.
static STRUCTURE: [bool; 256] = {
    let mut table = [false; 256];
    table[b'"' as usize] = true;
    table[b'{' as usize] = true;
    table[b'}' as usize] = true;
    table[b'[' as usize] = true;
    table[b']' as usize] = true;
    table
};

/// The index of the quote that ends the string whose text starts at
/// `start`, and whether the text holds an escape.
fn string_end(body: &[u8], start: usize) -> Option<(usize, bool)> {
    let mut escaped = false;
    let mut at = start;
    loop {
        match *body.get(at)? {
            b'"' => return Some((at, escaped)),
            b'\\' => {
                escaped = true;
                at += 2;
            }
            _ => at += 1,
        }
    }
}

fn skip_whitespace(body: &[u8], mut at: usize) -> usize {
    while body
        .get(at)
        .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        at += 1;
    }
    at
}

/// The value that starts at `at`, and the index to read on from: after a
/// scalar; at the bracket of an object or an array, which the caller walks.
fn value(body: &[u8], at: usize) -> Option<(Leaf<'_>, usize)> {
    let rest = body.get(at..)?;
    match rest.first()? {
        b'"' => {
            let (end, escaped) = string_end(body, at + 1)?;
            if escaped {
                return None;
            }
            let text = std::str::from_utf8(&body[at + 1..end]).ok()?;
            Some((Leaf::Text(text), end + 1))
        }
        b'-' | b'0'..=b'9' => {
            let length = rest
                .iter()
                .position(|b| !matches!(b, b'0'..=b'9' | b'+' | b'-' | b'.' | b'e' | b'E'))
                .unwrap_or(rest.len());
            let number = &rest[..length];
            let digits = number.strip_prefix(b"-").unwrap_or(number);
            let plain = match digits {
                [] => false,
                [b'0', _, ..] => false,
                _ => digits.len() <= 18 && digits.iter().all(u8::is_ascii_digit),
            };
            if !plain {
                return None;
            }
            let number = std::str::from_utf8(number).ok()?.parse().ok()?;
            Some((Leaf::Signed(number), at + length))
        }
        _ if rest.starts_with(b"true") => Some((Leaf::Bool(true), at + 4)),
        _ if rest.starts_with(b"false") => Some((Leaf::Bool(false), at + 5)),
        _ if rest.starts_with(b"null") => Some((Leaf::Null, at + 4)),
        b'{' | b'[' => Some((Leaf::Composite, at)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Some(found)` for `code` and `success`; `None` when in doubt.
    fn codes(body: &str) -> Option<[Option<Leaf<'_>>; 2]> {
        let mut found = [None; 2];
        let slot_of = |key: &[u8]| match key {
            b"code" => Some(0),
            b"success" => Some(1),
            _ => None,
        };
        top_level_scalars(body.as_bytes(), slot_of, |_: &[u8]| false, &mut found).then_some(found)
    }

    fn code(body: &str) -> Option<Option<Leaf<'_>>> {
        codes(body).map(|[code, _]| code)
    }

    #[test]
    fn finds_the_top_level_members() {
        assert_eq!(
            code(r#"{"code":0,"msg":"ok"}"#),
            Some(Some(Leaf::Signed(0)))
        );
        assert_eq!(
            code(r#" { "msg" : "a\"code\":1" , "code" : -12 } "#),
            Some(Some(Leaf::Signed(-12)))
        );
        assert_eq!(
            code(r#"{"data":{"code":1},"list":[{"code":2}],"code":"OK"}"#),
            Some(Some(Leaf::Text("OK")))
        );
        assert_eq!(code(r#"{"code":null}"#), Some(Some(Leaf::Null)));
        assert_eq!(
            code(r#"{"code":{"value":0},"msg":"x"}"#),
            Some(Some(Leaf::Composite))
        );
        assert_eq!(code(r#"{"code":[0]}"#), Some(Some(Leaf::Composite)));
        assert_eq!(
            code(r#"{"code":0,"msg":"\u6210\u529f","code":40003}"#),
            Some(Some(Leaf::Signed(40003))),
            "the last of repeated members"
        );
        assert_eq!(
            codes(r#"{"success":true,"data":{"code":1}}"#),
            Some([None, Some(Leaf::Bool(true))])
        );
        assert_eq!(codes(r#"{"id":7,"name":"\u00e9"}"#), Some([None, None]));
    }

    #[test]
    fn a_plain_rest_is_not_walked() {
        let body = br#"{"code":0,"data":"unterminated"#;
        let mut found = [None];
        let slot_of = |key: &[u8]| (key == b"code").then_some(0);
        let rest = |rest: &[u8]| {
            assert_eq!(rest, br#","data":"unterminated"#);
            true
        };
        assert!(top_level_scalars(body, slot_of, rest, &mut found));
        assert_eq!(found, [Some(Leaf::Signed(0))]);
        // Otherwise the walk goes on, and finds the string unterminated.
        assert!(!top_level_scalars(
            body,
            slot_of,
            |_: &[u8]| false,
            &mut found
        ));
    }

    #[test]
    fn leaves_doubt_to_the_parser() {
        for body in [
            r#"{"code":0,"\u0063ode":40003}"#,
            r#"{"\u0069d":7}"#,
            r#"{"code":"\u0030"}"#,
            r#"{"code":4.0003e4}"#,
            r#"{"code":0.0}"#,
            r#"{"code":1234567890123456789}"#,
            r#"{"code":007}"#,
            r#"{"code":0,"msg":"unterminated}"#,
            r#"{"code":0}]]"#,
            r#"{"code":nope}"#,
        ] {
            assert_eq!(code(body), None, "{body}");
        }
    }
}
