//! Which backends the originator tries for one connection, in order: pure, so the
//! order is unit-tested apart from sockets.
//!
//! The kernel picks one slot of a frontend's table per connect; the originator starts
//! the same way (a slot at random, so the table's weights and tiers hold), and since it
//! is a proxy it can do what the kernel cannot: when that backend fails to connect or to
//! complete the TLS handshake, try another. Invariants of [`attempt_order`]:
//! - the first backend is `table[start % table.len()]`;
//! - then the table's other backends, in slot order from `start` on (wrapping), each
//!   once: the table holds only the best tier's serving backends, so a retry stays in
//!   the tier selection chose;
//! - then the standby table's backends, likewise from `start`, each once, never one
//!   already listed;
//! - at most `max` backends in all; none when both tables are empty.

use std::net::SocketAddr;

/// The backends to try for one connection, best first (see the module doc).
#[must_use]
pub fn attempt_order(
    table: &[SocketAddr],
    standby: &[SocketAddr],
    start: usize,
    max: usize,
) -> Vec<SocketAddr> {
    let mut order: Vec<SocketAddr> = Vec::with_capacity(max.min(4));
    for slots in [table, standby] {
        if slots.is_empty() {
            continue;
        }
        let from = start % slots.len();
        for target in slots[from..].iter().chain(&slots[..from]) {
            if order.len() == max {
                return order;
            }
            if !order.contains(target) {
                order.push(*target);
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, last], 443))
    }

    #[test]
    fn starts_at_the_slot_and_tries_each_backend_once() {
        // Weights 2:1:1 as a slot table.
        let table = [addr(1), addr(1), addr(2), addr(3)];
        assert_eq!(
            attempt_order(&table, &[], 0, 8),
            [addr(1), addr(2), addr(3)]
        );
        assert_eq!(
            attempt_order(&table, &[], 2, 8),
            [addr(2), addr(3), addr(1)]
        );
        // `start` wraps.
        assert_eq!(
            attempt_order(&table, &[], 7, 8),
            [addr(3), addr(1), addr(2)]
        );
    }

    #[test]
    fn the_standby_table_comes_after_the_table_and_repeats_nothing() {
        let table = [addr(1), addr(2)];
        let standby = [addr(2), addr(8), addr(9)];
        assert_eq!(
            attempt_order(&table, &standby, 1, 8),
            [addr(2), addr(1), addr(8), addr(9)]
        );
        // No table at all: the standby table alone.
        assert_eq!(
            attempt_order(&[], &standby, 0, 8),
            [addr(2), addr(8), addr(9)]
        );
    }

    #[test]
    fn at_most_max_and_nothing_from_nothing() {
        let table = [addr(1), addr(2), addr(3)];
        assert_eq!(attempt_order(&table, &[addr(4)], 0, 2), [addr(1), addr(2)]);
        assert!(attempt_order(&table, &[], 0, 0).is_empty());
        assert!(attempt_order(&[], &[], 5, 4).is_empty());
    }
}
