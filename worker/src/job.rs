//! The kinds of work a batch can be, behind one trait, so that the chunk pipeline
//! ([`crate::process`]) never branches on a batch's kind.
//!
//! A job says which records an item must be locked as ([`Job::lock_targets`], with what
//! [`Job::prepare`] read before locking), and runs its rules over a chunk of locked items
//! in the pipeline's one transaction ([`Job::apply`]), recording each item's outcome and
//! returning the outcomes newly recorded. The pipeline owns everything around that: the
//! locks, the transaction and its timeout, the batch counters, the acks, retries and dead
//! letters.
//!
//! Adding a kind of batch is one new module implementing [`Job`] and one arm in
//! [`for_kind`].

use std::collections::HashMap;

use bulkops_shared::batch::BatchKind;
use bulkops_shared::lock::LockTarget;
use bulkops_shared::progress::OutcomeDelta;
use futures_util::future::BoxFuture;
use sea_orm::{DatabaseConnection, DatabaseTransaction, DbErr};

use crate::meta::BatchMeta;

/// What a job read before locking, outside the chunk's transaction: for each target, a
/// second record its item touches (a conversion's Individual to merge into). A hint for
/// the locks only; the transaction's row locks decide if it changed meanwhile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prepared {
    /// Target → the Individual it also touches.
    pub touches: HashMap<i64, i64>,
}

/// One kind of batch's work over a chunk of items.
pub trait Job: Send + Sync {
    /// The batch kind this job carries out.
    fn kind(&self) -> BatchKind;

    /// Reads what the locks need, before they are taken (default: nothing).
    ///
    /// # Errors
    /// Database errors.
    fn prepare<'a>(
        &'a self,
        db: &'a DatabaseConnection,
        meta: &'a BatchMeta,
        targets: &'a [i64],
    ) -> BoxFuture<'a, Result<Prepared, DbErr>> {
        let _ = (db, meta, targets);
        Box::pin(async { Ok(Prepared::default()) })
    }

    /// The records the item of `target` must hold locks on.
    fn lock_targets(&self, target: i64, prepared: &Prepared) -> Vec<LockTarget>;

    /// Runs the rules over `items` (seq, target) of `meta`'s batch in the caller's
    /// transaction and records the items' outcomes (only for items still pending).
    /// Returns the outcomes newly recorded; the caller adds them to the batch counters and
    /// commits.
    ///
    /// # Errors
    /// Database errors; the caller rolls back.
    fn apply<'a>(
        &'a self,
        tx: &'a DatabaseTransaction,
        meta: &'a BatchMeta,
        items: &'a [(i64, i64)],
    ) -> BoxFuture<'a, Result<OutcomeDelta, DbErr>>;
}

/// The job of a batch kind: the one place a kind picks its code.
pub fn for_kind(kind: BatchKind) -> &'static dyn Job {
    match kind {
        BatchKind::CreateSalesRecords => &crate::create::CreateJob,
        BatchKind::ConvertSalesRecords => &crate::convert::ConvertJob,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_job_and_its_locks() {
        let prepared = Prepared {
            touches: HashMap::from([(7, 70)]),
        };
        let create = for_kind(BatchKind::CreateSalesRecords);
        assert_eq!(create.kind(), BatchKind::CreateSalesRecords);
        assert_eq!(
            create.lock_targets(7, &prepared),
            vec![LockTarget::Individual(7)]
        );
        let convert = for_kind(BatchKind::ConvertSalesRecords);
        assert_eq!(convert.kind(), BatchKind::ConvertSalesRecords);
        assert_eq!(
            convert.lock_targets(7, &prepared),
            vec![LockTarget::SalesRecord(7), LockTarget::Individual(70)]
        );
        assert_eq!(
            convert.lock_targets(8, &prepared),
            vec![LockTarget::SalesRecord(8)]
        );
    }
}
