//! Reads only the top-level members of a JSON object that a set of JSON
//! pointers can reach; every other member is checked and skipped without
//! being built. A 60 KiB answer whose `data` nobody looks at then costs a
//! scan, not a tree of maps and strings; a small answer costs no allocation
//! unless a kept string holds an escape or a pointer goes below a member.

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// The top-level members a rule reads, each once, in the order the rule
/// first named them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Members {
    names: Vec<String>,
    /// Whether some pointer goes below the member: then its whole value is
    /// built, otherwise only what a code or a message can be.
    deep: Vec<bool>,
}

impl Members {
    /// The slot of member `name`, added if new.
    pub(crate) fn add(&mut self, name: &str, deep: bool) -> usize {
        match self.names.iter().position(|n| n == name) {
            Some(slot) => {
                self.deep[slot] |= deep;
                slot
            }
            None => {
                self.names.push(name.to_owned());
                self.deep.push(deep);
                self.names.len() - 1
            }
        }
    }

    /// The name of the member in `slot`.
    pub(crate) fn name(&self, slot: usize) -> Option<&str> {
        self.names.get(slot).map(String::as_str)
    }

    /// `Some(kept)` with only these members when `body` is a JSON object;
    /// `None` when it is valid JSON of another kind; `Err` when it is not
    /// JSON.
    pub(crate) fn read<'de>(
        &self,
        body: &'de [u8],
    ) -> Result<Option<Kept<'de>>, serde_json::Error> {
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        let kept = (&mut deserializer).deserialize_any(Reader(self))?;
        deserializer.end()?;
        Ok(kept)
    }
}

/// How many kept members live inline, without an allocation.
pub(crate) const INLINE: usize = 8;

/// The members read from one body, by slot: the first few inline, without
/// an allocation, the rest (rules with many pointers) in a vector.
pub(crate) struct Kept<'de> {
    inline: [Option<Member<'de>>; INLINE],
    spilled: Vec<Option<Member<'de>>>,
}

impl<'de> Kept<'de> {
    fn new(members: usize) -> Self {
        let spilled = members.saturating_sub(INLINE);
        Self {
            inline: [const { None }; INLINE],
            spilled: (0..spilled).map(|_| None).collect(),
        }
    }

    fn slot_mut(&mut self, slot: usize) -> Option<&mut Option<Member<'de>>> {
        match slot.checked_sub(INLINE) {
            None => self.inline.get_mut(slot),
            Some(spilled) => self.spilled.get_mut(spilled),
        }
    }

    /// The value of the member in `slot`, if the body has it.
    pub(crate) fn get(&self, slot: usize) -> Option<&Member<'de>> {
        match slot.checked_sub(INLINE) {
            None => self.inline.get(slot)?.as_ref(),
            Some(spilled) => self.spilled.get(spilled)?.as_ref(),
        }
    }
}

/// A kept member's value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Member<'de> {
    /// What a pointer to the member itself can use.
    Scalar(Scalar<'de>),
    /// The whole value, for pointers that go below the member.
    Tree(Value),
}

/// A value as far as codes and messages go: strings borrow from the body
/// unless they hold an escape; objects and arrays are checked, not built.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Scalar<'de> {
    Null,
    Bool(bool),
    Signed(i64),
    Unsigned(u64),
    Float(f64),
    Text(Cow<'de, str>),
    Composite,
}

/// What a pointer found, whichever way it was read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Leaf<'a> {
    Null,
    Bool(bool),
    Signed(i64),
    Unsigned(u64),
    Float(f64),
    Text(&'a str),
    Composite,
}

impl<'a> Leaf<'a> {
    pub(crate) fn of_value(value: &'a Value) -> Self {
        match value {
            Value::Null => Self::Null,
            Value::Bool(b) => Self::Bool(*b),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Self::Signed(i)
                } else if let Some(u) = n.as_u64() {
                    Self::Unsigned(u)
                } else {
                    // Without `arbitrary_precision` every number is one of
                    // the three.
                    n.as_f64().map_or(Self::Null, Self::Float)
                }
            }
            Value::String(s) => Self::Text(s),
            Value::Array(_) | Value::Object(_) => Self::Composite,
        }
    }

    pub(crate) fn as_str(self) -> Option<&'a str> {
        match self {
            Self::Text(text) => Some(text),
            _ => None,
        }
    }
}

impl<'de> Member<'de> {
    /// The value `rest` (the pointer's tokens after the member's) reaches.
    pub(crate) fn find(&self, rest: &[String]) -> Option<Leaf<'_>> {
        match self {
            Self::Tree(value) => super::json_pointer::walk(value, rest).map(Leaf::of_value),
            Self::Scalar(scalar) if rest.is_empty() => Some(scalar.leaf()),
            // NOTE: a member some pointer goes below is always a tree.
            Self::Scalar(_) => None,
        }
    }
}

impl Scalar<'_> {
    fn leaf(&self) -> Leaf<'_> {
        match self {
            Self::Null => Leaf::Null,
            Self::Bool(b) => Leaf::Bool(*b),
            Self::Signed(i) => Leaf::Signed(*i),
            Self::Unsigned(u) => Leaf::Unsigned(*u),
            Self::Float(f) => Leaf::Float(*f),
            Self::Text(text) => Leaf::Text(text),
            Self::Composite => Leaf::Composite,
        }
    }
}

/// Reads the top-level value: an object keeps its wanted members.
struct Reader<'m>(&'m Members);

impl<'de> Visitor<'de> for Reader<'_> {
    type Value = Option<Kept<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut kept = Kept::new(self.0.names.len());
        while let Some(slot) = map.next_key_seed(Slot(&self.0.names))? {
            match slot {
                Some(slot) => {
                    let value = if self.0.deep[slot] {
                        Member::Tree(map.next_value()?)
                    } else {
                        Member::Scalar(map.next_value_seed(ScalarSeed)?)
                    };
                    // As in a `serde_json::Map`, the last of repeated
                    // members wins.
                    if let Some(kept) = kept.slot_mut(slot) {
                        *kept = Some(value);
                    }
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Some(kept))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
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

/// A key, as the slot of the wanted member it names; read without keeping
/// it.
struct Slot<'m>(&'m [String]);

impl<'de> DeserializeSeed<'de> for Slot<'_> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Slot<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().position(|name| name == key))
    }
}

/// A kept member's value when no pointer goes below it. It is checked as
/// strictly as building a [`Value`] would check it (strings inside objects
/// are UTF-8, numbers in range), so a body is JSON or not the same way
/// whichever pointers a rule has.
struct ScalarSeed;

impl<'de> DeserializeSeed<'de> for ScalarSeed {
    type Value = Scalar<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ScalarSeed {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Bool(b))
    }
    fn visit_i64<E>(self, i: i64) -> Result<Self::Value, E> {
        Ok(Scalar::Signed(i))
    }
    fn visit_u64<E>(self, u: u64) -> Result<Self::Value, E> {
        Ok(Scalar::Unsigned(u))
    }
    fn visit_f64<E>(self, f: f64) -> Result<Self::Value, E> {
        // As `Value` does: a number that is not finite is null.
        Ok(if f.is_finite() {
            Scalar::Float(f)
        } else {
            Scalar::Null
        })
    }
    fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Text(Cow::Borrowed(text)))
    }
    fn visit_str<E>(self, text: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Text(Cow::Owned(text.to_owned())))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry_seed(Checked, Checked)?.is_some() {}
        Ok(Scalar::Composite)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element_seed(Checked)?.is_some() {}
        Ok(Scalar::Composite)
    }
}

/// Any value, read as strictly as [`Value`] reads it, and dropped.
/// (`IgnoredAny` checks less: it does not look inside strings.)
#[derive(Clone, Copy)]
struct Checked;

impl<'de> DeserializeSeed<'de> for Checked {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Checked {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry_seed(Checked, Checked)?.is_some() {}
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Checked)?.is_some() {}
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(names: &[(&str, bool)]) -> Members {
        let mut members = Members::default();
        for (name, deep) in names {
            members.add(name, *deep);
        }
        members
    }

    #[test]
    fn keeps_only_the_members_pointers_reach() {
        let body = br#"{"code":40003,"data":{"big":[1,2,3]},"msg":"token\u8fc7\u671f","x/y":1,"e":{"c":2}}"#;
        let members = members(&[("code", false), ("msg", false), ("x/y", false), ("e", true)]);
        let kept = members.read(body).unwrap().unwrap();
        assert_eq!(kept.get(0), Some(&Member::Scalar(Scalar::Unsigned(40003))));
        assert_eq!(
            kept.get(1),
            Some(&Member::Scalar(Scalar::Text("token过期".into())))
        );
        assert_eq!(kept.get(2), Some(&Member::Scalar(Scalar::Unsigned(1))));
        let e = kept.get(3).unwrap();
        assert_eq!(e.find(&["c".to_owned()]), Some(Leaf::Signed(2)));
        assert_eq!(e.find(&[]), Some(Leaf::Composite));
        assert!(kept.get(4).is_none());
    }

    #[test]
    fn unescaped_strings_are_borrowed_and_the_last_repeat_wins() {
        let body = br#"{"msg":"first","msg":"ok","n":-1.5}"#;
        let kept = members(&[("msg", false), ("n", false)])
            .read(body)
            .unwrap()
            .unwrap();
        assert!(matches!(
            kept.get(0),
            Some(Member::Scalar(Scalar::Text(Cow::Borrowed("ok"))))
        ));
        assert_eq!(kept.get(1), Some(&Member::Scalar(Scalar::Float(-1.5))));
    }

    #[test]
    fn other_json_is_none_and_broken_json_an_error() {
        let none = Members::default();
        assert!(none.read(b"[1,{\"code\":1}]").unwrap().is_none());
        assert!(none.read(b"\"text\"").unwrap().is_none());
        assert!(none.read(b"{\"code\":1").is_err());
        assert!(none.read(b"{\"code\":1} trailing").is_err());
    }

    #[test]
    fn kept_members_are_checked_like_values() {
        let code = members(&[("code", false)]);
        // Inside a kept member, as strictly as `Value`; elsewhere, as `IgnoredAny`.
        for body in [
            &b"{\"code\":{\"a\":\"\xff\"}}"[..],
            b"{\"code\":[1e400]}",
            b"{\"code\":[1,]}",
        ] {
            assert!(
                code.read(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
            assert!(serde_json::from_slice::<Value>(body).is_err());
        }
        assert!(code.read(b"{\"data\":{\"a\":\"\xff\"}}").is_ok());
    }

    #[test]
    fn many_members_spill_to_the_heap() {
        let names: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
        let mut members = Members::default();
        for name in &names {
            members.add(name, false);
        }
        let kept = members.read(br#"{"m19":true,"m0":null}"#).unwrap().unwrap();
        assert_eq!(kept.get(19), Some(&Member::Scalar(Scalar::Bool(true))));
        assert_eq!(kept.get(0), Some(&Member::Scalar(Scalar::Null)));
        assert!(kept.get(5).is_none());
    }
}
