//! Errors of a lane run, and whether the lane retries or waits for an operator.

use crate::catalog::{CatalogError, Disposition};
use crate::state::StateError;
use crate::storage::StorageError;
use crate::table_copy::TableCopyError;

use super::plan::PlanError;

/// Why a lane run stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    /// A catalog call failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// Copying or rewriting files failed (boxed: it is large, and rare).
    #[error(transparent)]
    Copy(Box<TableCopyError>),
    /// Reading or writing a file failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// No plan can be made (divergence, unmappable paths, invalid metadata).
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The state store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// No rule routes the table to the destination any more.
    #[error(
        "no rule replicates {table} to destination {destination:?} any more; the lane is kept with its status \
         (add a rule to resume)"
    )]
    NoRoute {
        /// The source table.
        table: String,
        /// The destination.
        destination: String,
    },
    /// The lane names a destination the configuration does not have.
    #[error("destination {0:?} is not configured; add it to [[destinations]] or remove the rules that name it")]
    UnknownDestination(String),
    /// The replica catalog cannot take this table's history.
    #[error("{0}")]
    Refused(String),
    /// The source answered without a metadata location.
    #[error("the primary answered loadTable {0} without a metadata-location; icerelay cannot read the table's files")]
    NoMetadataLocation(String),
    /// The replica kept changing under the lane (concurrent writers, or a
    /// catalog that does not keep what it is sent).
    #[error("{0}")]
    NoProgress(String),
    /// A drain before promotion reached a multi-table transaction whose
    /// other tables are not replicated yet; retried until they are.
    #[error(
        "cannot finish draining before the promotion yet: the replica's next commit is part of a multi-table \
         transaction, and {0}; retrying (or promote with --now to keep the replica as it is)"
    )]
    DrainWaits(String),
    /// This instance's lease on the lane ran out or was taken over: another
    /// instance runs the lane now, and this run stopped before writing more.
    #[error(
        "lane {lane}: this instance's lease ran out (not renewed within lease_ttl, or taken over by another \
         instance); the run stopped before its next replica write"
    )]
    LeaseLost {
        /// The lane.
        lane: String,
    },
}

impl From<TableCopyError> for ReplicateError {
    fn from(e: TableCopyError) -> Self {
        Self::Copy(Box::new(e))
    }
}

impl ReplicateError {
    /// The URL of a file that was missing when the run copied it.
    pub fn missing_file(&self) -> Option<&str> {
        match self {
            Self::Copy(e) => e.missing_url(),
            Self::Storage(e) => e.missing_url(),
            _ => None,
        }
    }

    /// Whether the replica was written around icerelay.
    pub fn is_divergence(&self) -> bool {
        matches!(self, Self::Plan(PlanError::Diverged { .. } | PlanError::FailbackChoiceNeeded { .. }))
    }

    /// Whether the lane waits for an operator (resync, configuration change)
    /// instead of retrying on its own.
    pub fn parks(&self) -> bool {
        match self {
            Self::Catalog(e) => e.disposition() == Disposition::Park,
            Self::Copy(e) => !e.is_retryable(),
            Self::Storage(e) => !e.is_retryable(),
            Self::Plan(_)
            | Self::NoRoute { .. }
            | Self::UnknownDestination(_)
            | Self::Refused(_)
            | Self::NoMetadataLocation(_)
            | Self::NoProgress(_) => true,
            Self::State(_) | Self::LeaseLost { .. } | Self::DrainWaits(_) => false,
        }
    }

    /// Whether another instance runs the lane now: nothing for this one to
    /// record or retry.
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, Self::LeaseLost { .. } | Self::State(crate::state::StateError::Fenced { .. }))
    }
}
