//! [`JsonEnd`]: where a JSON object or array that arrives in pieces ends,
//! so that a body can be judged before its transfer has finished (the
//! chunked terminator may come long after the document).

use serde::de::IgnoredAny;

/// What the bytes fed so far say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Progress {
    /// The top-level object or array is still open.
    Open,
    /// The top-level object or array closed with the last bytes fed, and
    /// nothing but whitespace follows it.
    Closed,
    /// Not one object or array (another kind of body, or more than one
    /// document): wait for the end of the body.
    Unknown,
}

/// A scanner fed the body's bytes in order; O(1) per byte, no buffering.
///
/// NOTE: it only counts brackets outside strings; a `Closed` answer is a
/// candidate, confirmed by [`is_one_document`] before a detector sees it.
#[derive(Debug, Default)]
pub(crate) struct JsonEnd {
    seen: u64,
    depth: u32,
    started: bool,
    closed: bool,
    unknown: bool,
    in_string: bool,
    escaped: bool,
}

/// The UTF-8 encoding of U+FEFF.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

impl JsonEnd {
    /// Feeds the next bytes of the body.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Progress {
        for &byte in bytes {
            let position = self.seen;
            self.seen = self.seen.saturating_add(1);
            if self.unknown {
                break;
            }
            if !self.started {
                // RFC 8259 §8.1: a byte order mark may come first.
                let in_bom = usize::try_from(position)
                    .ok()
                    .and_then(|i| UTF8_BOM.get(i))
                    .is_some_and(|b| *b == byte);
                match byte {
                    b'{' | b'[' => {
                        self.started = true;
                        self.depth = 1;
                    }
                    b' ' | b'\t' | b'\r' | b'\n' => {}
                    _ if in_bom => {}
                    _ => self.unknown = true,
                }
                continue;
            }
            if self.closed {
                if !matches!(byte, b' ' | b'\t' | b'\r' | b'\n') {
                    self.unknown = true;
                }
                continue;
            }
            if self.in_string {
                match byte {
                    _ if self.escaped => self.escaped = false,
                    b'\\' => self.escaped = true,
                    b'"' => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match byte {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth = self.depth.saturating_add(1),
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        self.closed = true;
                    }
                }
                _ => {}
            }
        }
        if self.unknown {
            Progress::Unknown
        } else if self.closed {
            Progress::Closed
        } else {
            Progress::Open
        }
    }
}

/// Whether `bytes` (after an optional byte order mark) are exactly one
/// JSON document.
pub(crate) fn is_one_document(bytes: &[u8]) -> bool {
    let bytes = bytes.strip_prefix(UTF8_BOM).unwrap_or(bytes);
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    serde::Deserialize::deserialize(&mut deserializer)
        .map(|_: IgnoredAny| ())
        .and_then(|()| deserializer.end())
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(parts: &[&[u8]]) -> Progress {
        let mut end = JsonEnd::default();
        let mut last = Progress::Open;
        for part in parts {
            last = end.feed(part);
        }
        last
    }

    #[test]
    fn an_object_in_pieces_closes_at_its_last_brace() {
        assert_eq!(progress(&[b"{\"code\":", b"40003"]), Progress::Open);
        assert_eq!(progress(&[b"{\"code\":", b"40003}"]), Progress::Closed);
        assert_eq!(progress(&[b" [1,[2]", b",{}]\r\n"]), Progress::Closed);
        assert_eq!(progress(&["\u{feff}{}".as_bytes()]), Progress::Closed);
    }

    #[test]
    fn brackets_in_strings_do_not_count() {
        assert_eq!(progress(&[br#"{"msg":"}]\"}"#]), Progress::Open);
        assert_eq!(progress(&[br#"{"msg":"}]\"}"}"#]), Progress::Closed);
        assert_eq!(progress(&[br#"{"msg":"a\\"#, br#"\"}"#]), Progress::Open);
    }

    #[test]
    fn other_bodies_are_unknown() {
        assert_eq!(progress(&[b"\"text\""]), Progress::Unknown);
        assert_eq!(progress(&[b"<html>"]), Progress::Unknown);
        assert_eq!(progress(&[b"{}\n{}\n"]), Progress::Unknown);
        assert_eq!(progress(&[b"{}", b"x"]), Progress::Unknown);
    }

    #[test]
    fn one_document_is_checked_by_a_parser() {
        assert!(is_one_document(br#"{"code":40003}"#));
        assert!(is_one_document("\u{feff}[1] ".as_bytes()));
        assert!(!is_one_document(br#"{"code":}"#));
        assert!(!is_one_document(b"{} {}"));
    }
}
