//! Copies of a token's header, one per thread slot.
//!
//! NOTE: a `HeaderValue` is backed by a reference-counted `Bytes`. When
//! every thread clones the one shared value, its reference count is a cache
//! line that moves between cores on every request, and reads stop scaling.
//! So each installed token carries a few copies of its header, made once at
//! install, and each thread clones the copy of its own slot (a thread-local
//! index given out in turn). The copies belong to the token: they are
//! dropped with it, so no thread keeps a retired secret, and there is no
//! per-thread map to miss in, however many tokens a thread uses.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::HeaderValue;

/// At most this many copies per token, whatever the number of cores.
const MAX_COPIES: usize = 8;

/// Copies of one header, one per thread slot.
pub(crate) struct HeaderCopies {
    copies: Box<[HeaderValue]>,
}

impl HeaderCopies {
    /// As many copies of `shared` as there are cores (at most 8), each with
    /// its own reference count.
    pub(crate) fn new(shared: &HeaderValue) -> Self {
        let copies = (0..slots())
            .map(|_| {
                let mut copy =
                    HeaderValue::from_bytes(shared.as_bytes()).unwrap_or_else(|_| shared.clone());
                copy.set_sensitive(shared.is_sensitive());
                copy
            })
            .collect();
        Self { copies }
    }

    /// The copy of this thread's slot.
    #[inline]
    pub(crate) fn local(&self) -> HeaderValue {
        let slot = SLOT.try_with(Cell::get).unwrap_or(0);
        // `slot < slots() == copies.len()`; the first copy is the fallback.
        match self.copies.get(slot) {
            Some(copy) => copy.clone(),
            None => self.copies[0].clone(),
        }
    }
}

/// The number of copies per token: the cores this process may use, at most 8.
fn slots() -> usize {
    static SLOTS: OnceLock<usize> = OnceLock::new();
    *SLOTS.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, usize::from)
            .clamp(1, MAX_COPIES)
    })
}

static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's slot, given out in turn as threads first ask.
    static SLOT: Cell<usize> = Cell::new(NEXT_SLOT.fetch_add(1, Ordering::Relaxed) % slots());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_copy_is_equal_and_sensitive() {
        let mut shared = HeaderValue::from_static("Bearer one");
        shared.set_sensitive(true);
        let copies = HeaderCopies::new(&shared);
        assert_eq!(copies.copies.len(), slots());
        assert!(
            copies
                .copies
                .iter()
                .all(|c| c == shared && c.is_sensitive())
        );
        assert_eq!(copies.local(), shared);
    }

    #[test]
    fn threads_take_their_slots_in_turn() {
        let shared = HeaderValue::from_static("Bearer two");
        let copies = std::sync::Arc::new(HeaderCopies::new(&shared));
        let seen: Vec<HeaderValue> = (0..4)
            .map(|_| {
                let copies = copies.clone();
                std::thread::spawn(move || copies.local()).join().unwrap()
            })
            .collect();
        assert!(seen.iter().all(|v| v == shared));
    }
}
