//! A per-thread copy of the current token's header value.
//!
//! NOTE: a `HeaderValue` is backed by a reference-counted `Bytes`. When
//! every thread clones the one shared value, its reference count is a cache
//! line that moves between cores on every request, and reads stop scaling.
//! Each thread instead keeps its own copy of the few headers it used last,
//! keyed by a process-wide unique id of the installed token (never by
//! address, which can be reused). A copy is made once per thread and token;
//! an old token's copy stays until its slot is reused.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderValue;

/// Headers kept per thread: enough for a few tokens in use at once.
const SLOTS: usize = 4;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A new id for an installed token, unique in the process.
pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

struct Slots {
    entries: [(u64, Option<HeaderValue>); SLOTS],
    next: usize,
}

thread_local! {
    static LOCAL: RefCell<Slots> = const {
        RefCell::new(Slots { entries: [const { (0, None) }; SLOTS], next: 0 })
    };
}

/// This thread's copy of `shared`, the header of the token with `id`.
#[inline]
pub(crate) fn local_copy(id: u64, shared: &HeaderValue) -> HeaderValue {
    LOCAL
        .try_with(|slots| {
            let mut slots = slots.try_borrow_mut().ok()?;
            Some(slots.get_or_insert(id, shared))
        })
        .ok()
        .flatten()
        .unwrap_or_else(|| shared.clone())
}

impl Slots {
    fn get_or_insert(&mut self, id: u64, shared: &HeaderValue) -> HeaderValue {
        for (slot_id, value) in &self.entries {
            if *slot_id == id {
                if let Some(value) = value {
                    return value.clone();
                }
            }
        }
        let mut copy =
            HeaderValue::from_bytes(shared.as_bytes()).unwrap_or_else(|_| shared.clone());
        copy.set_sensitive(shared.is_sensitive());
        let slot = self.next;
        self.next = (slot + 1) % SLOTS;
        self.entries[slot] = (id, Some(copy.clone()));
        copy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_equal_sensitive_and_kept_per_token() {
        let mut shared = HeaderValue::from_static("Bearer one");
        shared.set_sensitive(true);
        let id = next_id();
        let first = local_copy(id, &shared);
        assert_eq!(first, shared);
        assert!(first.is_sensitive());
        let other = HeaderValue::from_static("Bearer two");
        let other_id = next_id();
        assert_eq!(local_copy(other_id, &other), other);
        assert_eq!(
            local_copy(id, &shared),
            shared,
            "each token keeps its own slot"
        );
    }

    #[test]
    fn old_tokens_are_evicted_and_never_confused() {
        let values: Vec<(u64, HeaderValue)> = (0..10)
            .map(|i| {
                (
                    next_id(),
                    HeaderValue::from_str(&format!("Bearer t{i}")).unwrap(),
                )
            })
            .collect();
        for _ in 0..3 {
            for (id, value) in &values {
                assert_eq!(&local_copy(*id, value), value);
            }
        }
    }
}
