//! Sequence numbers of a replica whose own history went further than the
//! source's: the old primary after a failover, keeping snapshots the new
//! primary never had.
//!
//! Catalogs refuse a snapshot whose sequence number is not above the
//! table's `last-sequence-number`. After a failback with unreplicated
//! snapshots on the old side, the numbers the new primary gave its snapshots
//! after the common ancestor are taken there, so the replica gets them all
//! shifted by the same amount: numbers up to the common ancestor's stay, the
//! ones above it move up by `by`. Order is kept, so which deletes apply to
//! which rows (decided by comparing sequence numbers) is unchanged.

use serde::{Deserialize, Serialize};

/// Sequence numbers above `above` are raised by `by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceShift {
    /// The common ancestor's sequence number: this and below are kept.
    pub above: i64,
    /// How much higher the numbers above it are on the replica.
    pub by: i64,
}

impl SequenceShift {
    /// The replica's number for the source's `n`.
    pub fn apply(self, n: i64) -> i64 {
        if n > self.above { n.saturating_add(self.by) } else { n }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_above_the_ancestor_move_up_and_keep_their_order() {
        let shift = SequenceShift { above: 3, by: 2 };
        let shifted: Vec<i64> = (0..7).map(|n| shift.apply(n)).collect();
        assert_eq!(shifted, [0, 1, 2, 3, 6, 7, 8]);
    }
}
