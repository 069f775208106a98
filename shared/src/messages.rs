//! The per-record work message: what the splitter publishes and a worker consumes.
//!
//! A message carries ids only (never record data): the batch, the item's sequence number
//! in it, and the target record. Everything else the worker reads from the database, so a
//! message cannot disagree with the frozen batch. The body is versioned JSON; a worker
//! refuses (dead-letters) a version it does not know rather than guessing.

use serde::{Deserialize, Serialize};

use crate::batch::BatchKind;
use crate::ids::BatchId;

/// The current message version.
pub const VERSION: u8 = 1;

/// What to do with the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Create a Sales Record from the Individual `target_id`.
    CreateSalesRecord,
    /// Convert the Sales Record `target_id` into an Individual.
    ConvertSalesRecord,
}

impl BatchKind {
    /// The message operation of this kind's items (the one place a kind becomes an op).
    pub fn op(self) -> Op {
        match self {
            Self::CreateSalesRecords => Op::CreateSalesRecord,
            Self::ConvertSalesRecords => Op::ConvertSalesRecord,
        }
    }
}

impl Op {
    /// The batch kind whose items carry this operation.
    pub fn kind(self) -> BatchKind {
        match self {
            Self::CreateSalesRecord => BatchKind::CreateSalesRecords,
            Self::ConvertSalesRecord => BatchKind::ConvertSalesRecords,
        }
    }
}

/// The AMQP header names bulkops writes and reads on work messages (the splitter, the
/// worker's retry path, the dead-letter tools and the bench all use these names).
pub mod headers {
    /// The publish time (Unix milliseconds), for the item latency metric.
    pub const PUBLISHED_AT: &str = "x-published-at-ms";
    /// Attempts so far (a retry's republish carries it).
    pub const ATTEMPTS: &str = "x-attempts";
    /// One line per failed attempt: when, and why.
    pub const HISTORY: &str = "x-attempt-history";
    /// Why the message was dead-lettered or last failed.
    pub const REASON: &str = "x-bulkops-reason";
    /// When the first attempt failed (Unix milliseconds), for the retry budget.
    pub const FIRST_FAILED_AT: &str = "x-first-failed-at-ms";
    /// The broker's own dead-letter record.
    pub const DEATH: &str = "x-death";
}

/// One item of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkMessage {
    /// Message format version ([`VERSION`]).
    pub v: u8,
    /// What to do.
    pub op: Op,
    /// The batch the item belongs to.
    pub batch_id: BatchId,
    /// The item's sequence number within the batch (1-based).
    pub seq: i64,
    /// The Individual (create) or Sales Record (convert) the item is about.
    pub target_id: i64,
}

/// Why a body could not be read as a [`WorkMessage`]. Such a message is dead-lettered.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON, or not the expected shape.
    #[error("malformed work message: {0}")]
    Malformed(String),
    /// A version this worker does not understand.
    #[error("unsupported work message version {0}")]
    UnsupportedVersion(u8),
}

impl WorkMessage {
    /// A current-version message.
    pub fn new(op: Op, batch_id: BatchId, seq: i64, target_id: i64) -> Self {
        Self {
            v: VERSION,
            op,
            batch_id,
            seq,
            target_id,
        }
    }

    /// The JSON body.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising a struct of integers and unit enums cannot fail; fall back to an
        // empty object rather than panic, which a consumer would dead-letter.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }

    /// Parses a body.
    ///
    /// # Errors
    /// [`DecodeError`] for anything but a well-formed message of a known version.
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        #[derive(Deserialize)]
        struct Versioned {
            v: u8,
        }
        // One parse on the happy path; the version is read apart only to explain a failure.
        let msg: WorkMessage = match serde_json::from_slice(body) {
            Ok(m) => m,
            Err(e) => {
                return Err(match serde_json::from_slice::<Versioned>(body) {
                    Ok(Versioned { v }) if v != VERSION => DecodeError::UnsupportedVersion(v),
                    _ => DecodeError::Malformed(e.to_string()),
                });
            }
        };
        if msg.v != VERSION {
            return Err(DecodeError::UnsupportedVersion(msg.v));
        }
        if msg.seq < 1 || msg.target_id < 1 || msg.batch_id.0 < 1 {
            return Err(DecodeError::Malformed("ids must be positive".into()));
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_carries_ids_only() {
        let m = WorkMessage::new(Op::CreateSalesRecord, BatchId(7), 3, 42);
        let body = m.encode();
        let text = String::from_utf8(body.clone()).unwrap();
        assert_eq!(
            text,
            r#"{"v":1,"op":"create_sales_record","batch_id":7,"seq":3,"target_id":42}"#
        );
        assert_eq!(WorkMessage::decode(&body).unwrap(), m);
    }

    #[test]
    fn rejects_garbage_unknown_versions_and_bad_ids() {
        assert!(matches!(
            WorkMessage::decode(b"not json"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            WorkMessage::decode(br#"{"v":2,"op":"x"}"#),
            Err(DecodeError::UnsupportedVersion(2))
        ));
        assert!(matches!(
            WorkMessage::decode(
                br#"{"v":1,"op":"delete_everything","batch_id":1,"seq":1,"target_id":1}"#
            ),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            WorkMessage::decode(
                br#"{"v":1,"op":"convert_sales_record","batch_id":1,"seq":0,"target_id":1}"#
            ),
            Err(DecodeError::Malformed(_))
        ));
    }
}
