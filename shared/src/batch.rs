//! The vocabulary of batches and items: kinds, states, lanes and outcomes, with the exact
//! strings the contract and the database use.

use serde::{Deserialize, Serialize};

/// What a batch does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BatchKind {
    /// Bulk create Sales Records from an Individual search.
    CreateSalesRecords,
    /// Convert Sales Records to Individuals.
    ConvertSalesRecords,
}

impl BatchKind {
    /// The contract's name, as stored in `bulk_batches.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CreateSalesRecords => "create_sales_records",
            Self::ConvertSalesRecords => "convert_sales_records",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "create_sales_records" => Some(Self::CreateSalesRecords),
            "convert_sales_records" => Some(Self::ConvertSalesRecords),
            _ => None,
        }
    }

    /// Reads a stored name; an unknown one is an error (a row this code does not
    /// understand), never a default.
    ///
    /// # Errors
    /// [`sea_orm::DbErr::Type`] for an unknown name.
    pub fn from_column(s: &str) -> Result<Self, sea_orm::DbErr> {
        Self::parse(s).ok_or_else(|| sea_orm::DbErr::Type(format!("batch kind {s}")))
    }

    /// Short label for metrics (`create` / `convert`).
    pub fn label(self) -> &'static str {
        match self {
            Self::CreateSalesRecords => "create",
            Self::ConvertSalesRecords => "convert",
        }
    }
}

/// Where a batch is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BatchState {
    /// Items frozen; nothing processed yet.
    Accepted,
    /// Items are being processed.
    Running,
    /// Every item has an outcome.
    Completed,
}

impl BatchState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Running => "running",
            Self::Completed => "completed",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "accepted" => Some(Self::Accepted),
            "running" => Some(Self::Running),
            "completed" => Some(Self::Completed),
            _ => None,
        }
    }
}

/// An item's status: `pending` until its one outcome is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ItemStatus {
    /// No outcome yet.
    Pending,
    /// A Sales Record was created (result_id: the Sales Record).
    Created,
    /// The Sales Record was converted (result_id: the Individual).
    Converted,
    /// Nothing to do (reason says why; result_id names the existing record when known).
    Skipped,
    /// Could not be done (reason says why).
    Failed,
}

impl ItemStatus {
    /// All statuses, in the order the API lists counts.
    pub const ALL: [ItemStatus; 5] = [
        Self::Pending,
        Self::Created,
        Self::Converted,
        Self::Skipped,
        Self::Failed,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Created => "created",
            Self::Converted => "converted",
            Self::Skipped => "skipped",
            Self::Failed => "failed",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Reads a stored name; an unknown one is an error, never a default.
    ///
    /// # Errors
    /// [`sea_orm::DbErr::Type`] for an unknown name.
    pub fn from_column(s: &str) -> Result<Self, sea_orm::DbErr> {
        Self::parse(s).ok_or_else(|| sea_orm::DbErr::Type(format!("item status {s}")))
    }
}

/// Why an item was skipped or failed. Stored as text; the API shows it as is.
pub mod reason {
    /// Create: the Individual already has a Sales Record.
    pub const ALREADY_HAS_SALES_RECORD: &str = "already_has_sales_record";
    /// The target does not exist in the batch's agency.
    pub const NOT_FOUND: &str = "not_found";
    /// Convert: the acting user lacks view, edit or delete on the record's type.
    pub const FORBIDDEN: &str = "forbidden";
    /// Convert: the Sales Record was converted earlier by another batch.
    pub const ALREADY_CONVERTED: &str = "already_converted";
    /// Transient failures outlasted every retry.
    pub const RETRIES_EXHAUSTED: &str = "retries_exhausted";
    /// The broker dead-lettered the message (delivery limit reached).
    pub const DEAD_LETTERED: &str = "dead_lettered";
    /// A permanent error that is not one of the above.
    pub const ERROR: &str = "error";
}

/// The queue a batch's messages travel on. Small batches (a single conversion watched in
/// a modal, a handful of Individuals) go to the interactive lane, which workers serve with
/// capacity of its own, so they never wait behind a huge batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lane {
    /// Large batches.
    Bulk,
    /// Small batches.
    Interactive,
}

impl Lane {
    /// Both lanes.
    pub const ALL: [Lane; 2] = [Lane::Bulk, Lane::Interactive];

    /// The stored name, also the queue name's suffix.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bulk => "bulk",
            Self::Interactive => "interactive",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "bulk" => Some(Self::Bulk),
            "interactive" => Some(Self::Interactive),
            _ => None,
        }
    }

    /// Reads a stored name; an unknown one is an error, never a default.
    ///
    /// # Errors
    /// [`sea_orm::DbErr::Type`] for an unknown name.
    pub fn from_column(s: &str) -> Result<Self, sea_orm::DbErr> {
        Self::parse(s).ok_or_else(|| sea_orm::DbErr::Type(format!("lane {s}")))
    }

    /// The lane for a batch of `total` items.
    pub fn for_total(total: u64, interactive_max_items: u64) -> Self {
        if total <= interactive_max_items {
            Self::Interactive
        } else {
            Self::Bulk
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for k in [
            BatchKind::CreateSalesRecords,
            BatchKind::ConvertSalesRecords,
        ] {
            assert_eq!(BatchKind::parse(k.as_str()), Some(k));
        }
        for s in [
            BatchState::Accepted,
            BatchState::Running,
            BatchState::Completed,
        ] {
            assert_eq!(BatchState::parse(s.as_str()), Some(s));
        }
        for s in ItemStatus::ALL {
            assert_eq!(ItemStatus::parse(s.as_str()), Some(s));
        }
        for l in Lane::ALL {
            assert_eq!(Lane::parse(l.as_str()), Some(l));
        }
        assert_eq!(ItemStatus::parse("done"), None);
        assert!(BatchKind::from_column("delete_everything").is_err());
        assert!(Lane::from_column("").is_err());
        assert!(ItemStatus::from_column("done").is_err());
    }

    #[test]
    fn small_batches_take_the_interactive_lane() {
        assert_eq!(Lane::for_total(1, 100), Lane::Interactive);
        assert_eq!(Lane::for_total(100, 100), Lane::Interactive);
        assert_eq!(Lane::for_total(101, 100), Lane::Bulk);
    }
}
