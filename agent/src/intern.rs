//! One shared copy of each short string that many records repeat: regions, zones,
//! subzones, cluster and port names. 100,000 endpoints in three zones of one region hold
//! one region string and three zone strings, not 200,000 strings, and cloning a
//! [`crate::config::Locality`] is three reference-count increments.
//!
//! Hand-written, not a crate: the interning crates hand out their own handle types
//! (whose `Ord` and `Hash` need care to match the text's), where detour's types want a
//! plain `Arc<str>`; what is needed is the twenty lines below.
//!
//! Invariants: [`intern`] returns an `Arc<str>` equal to its input, the same allocation
//! for equal inputs while any copy is alive; the table is pruned of strings nothing
//! else holds whenever it has doubled since the last prune, so names that come and go
//! do not accumulate (at most twice the live set, and never fewer than 64 entries
//! before a prune).

use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex};

#[derive(Default)]
struct Table {
    strings: HashSet<Arc<str>, foldhash::fast::RandomState>,
    pruned_at: usize,
}

static TABLE: LazyLock<Mutex<Table>> = LazyLock::new(Mutex::default);

/// The shared copy of `text`.
pub fn intern(text: &str) -> Arc<str> {
    // A poisoned lock only means another thread panicked mid-insert; the set is still a
    // valid set of strings.
    let mut table = TABLE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(found) = table.strings.get(text) {
        return found.clone();
    }
    if table.strings.len() >= 2 * table.pruned_at.max(64) {
        table.strings.retain(|s| Arc::strong_count(s) > 1);
        table.pruned_at = table.strings.len();
    }
    let text: Arc<str> = Arc::from(text);
    table.strings.insert(text.clone());
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_texts_share_one_allocation() {
        let a = intern("us-east1-b");
        let b = intern(&String::from("us-east1-b"));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*a, "us-east1-b");
        assert!(!Arc::ptr_eq(&a, &intern("us-east1-c")));
    }

    #[test]
    fn strings_nothing_holds_are_pruned() {
        // Far more distinct names than the prune threshold, none kept: the table stays
        // bounded by twice what is alive (plus the floor), whatever other tests hold.
        for n in 0..10_000 {
            drop(intern(&format!("intern-test-transient-{n}")));
        }
        let kept = intern("intern-test-kept");
        for n in 0..10_000 {
            drop(intern(&format!("intern-test-transient-again-{n}")));
        }
        let table = TABLE.lock().unwrap();
        let transient = table
            .strings
            .iter()
            .filter(|s| s.starts_with("intern-test-transient"))
            .count();
        assert!(transient < 5_000, "{transient} dead strings kept");
        assert!(table.strings.contains("intern-test-kept"));
        drop(kept);
    }
}
