//! One flush: snapshot the pending set, write it with one parameterised UPDATE in one
//! transaction, then forget what was written. Runs in the worker only.
//!
//! The statement writes each id's own latest mark time, and only over NULL or an older value, so
//! a row never moves backwards whatever races with it (under READ COMMITTED a concurrently
//! updated row is re-checked against the WHERE clause). The pending lock is never held here
//! while the database is touched: the snapshot and the forget are short critical sections of
//! their own, in `pending`.

use std::ffi::CStr;
use std::panic::AssertUnwindSafe;
use std::ptr::null_mut;

use pgrx::pg_sys::{self, PgTryBuilder};
use pgrx::prelude::*;

use crate::errors;
use crate::pending;
use crate::rendezvous;
use crate::settings;
use crate::shmem::PendingEntry;

const UPDATE_SQL: &CStr = c"UPDATE workspaces AS t SET last_used_at = v.marked_at \
    FROM unnest($1::uuid[], $2::timestamptz[]) AS v(id, marked_at) \
    WHERE t.id = v.id AND (t.last_used_at IS NULL OR t.last_used_at < v.marked_at)";

/// A database error that ended a flush, with what the DBA and the caller need to know.
pub struct Failure {
    pub sqlstate: i32,
    pub message: String,
}

/// The worker's flush state: the statement, prepared once, and a buffer big enough for the
/// whole set, allocated once so the snapshot never allocates under the pending lock.
pub struct Flusher {
    plan: pg_sys::SPIPlanPtr,
    batch: Vec<PendingEntry>,
    consecutive_failures: u64,
}

impl Flusher {
    pub fn new() -> Self {
        Flusher {
            plan: null_mut(),
            batch: Vec::with_capacity(settings::max_pending()),
            consecutive_failures: 0,
        }
    }

    pub fn consecutive_failures(&self) -> u64 {
        self.consecutive_failures
    }

    /// Flush whatever is pending and publish the outcome to `wsusage_flush()` callers.
    pub fn flush(&mut self) {
        let up_to_request = pending::snapshot(&mut self.batch);
        let ids = self.batch.len() as u64;
        let result = if self.batch.is_empty() {
            rendezvous::Result::Applied { ids: 0 }
        } else {
            let plan = &mut self.plan;
            let batch = &self.batch;
            match in_transaction(|| apply(plan, batch)) {
                Ok(rows) => {
                    pending::forget(&self.batch);
                    self.report_success(ids, rows);
                    rendezvous::Result::Applied { ids }
                }
                Err(failure) => {
                    self.consecutive_failures += 1;
                    errors::report_flush_failure(ids, self.consecutive_failures, &failure);
                    rendezvous::Result::Failed {
                        ids,
                        sqlstate: failure.sqlstate,
                        message: failure.message,
                    }
                }
            }
        };
        rendezvous::publish(up_to_request, &result);
    }

    fn report_success(&mut self, ids: u64, rows: u64) {
        if self.consecutive_failures > 0 {
            log!(
                "wsusage flush succeeded after {} failed attempts: {} pending ids carried over were applied",
                self.consecutive_failures,
                ids
            );
            self.consecutive_failures = 0;
        }
        debug1!("wsusage flushed {ids} ids, {rows} rows updated");
    }
}

/// Write `batch` with the prepared statement (preparing it first if needed). Returns the number
/// of rows updated. Raises a PostgreSQL ERROR on failure; call inside [`in_transaction`].
fn apply(plan: &mut pg_sys::SPIPlanPtr, batch: &[PendingEntry]) -> u64 {
    // SAFETY: we are in a transaction with an active snapshot (in_transaction); SPI calls raise
    // ERROR on failure, which in_transaction catches and rolls back. The datums handed to
    // construct_array point into `batch`, alive across the call; construct_array copies them.
    unsafe {
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            error!("could not connect to SPI");
        }
        if plan.is_null() {
            let mut argtypes = [pg_sys::UUIDARRAYOID, pg_sys::TIMESTAMPTZARRAYOID];
            let prepared = pg_sys::SPI_prepare(UPDATE_SQL.as_ptr(), 2, argtypes.as_mut_ptr());
            if prepared.is_null() {
                let code = (&raw const pg_sys::SPI_result).read();
                error!("could not prepare the wsusage flush statement: SPI error {code}");
            }
            // A kept plan survives the transaction, and is re-planned by the plan cache if the
            // table is altered, dropped or renamed and back.
            pg_sys::SPI_keepplan(prepared);
            *plan = prepared;
        }

        let nelems = i32::try_from(batch.len()).unwrap_or(i32::MAX);
        let mut ids: Vec<pg_sys::Datum> = batch
            .iter()
            .map(|e| pg_sys::Datum::from(e.id.as_ptr()))
            .collect();
        let mut times: Vec<pg_sys::Datum> = batch
            .iter()
            .map(|e| pg_sys::Datum::from(e.marked_at))
            .collect();
        let id_array = pg_sys::construct_array(
            ids.as_mut_ptr(),
            nelems,
            pg_sys::UUIDOID,
            16,
            false,
            pg_sys::TYPALIGN_CHAR as _,
        );
        let time_array = pg_sys::construct_array(
            times.as_mut_ptr(),
            nelems,
            pg_sys::TIMESTAMPTZOID,
            8,
            true,
            pg_sys::TYPALIGN_DOUBLE as _,
        );
        let mut values = [
            pg_sys::Datum::from(id_array),
            pg_sys::Datum::from(time_array),
        ];

        let rc = pg_sys::SPI_execute_plan(*plan, values.as_mut_ptr(), std::ptr::null(), false, 0);
        if rc != pg_sys::SPI_OK_UPDATE as i32 {
            error!("wsusage flush statement returned SPI code {rc}");
        }
        let rows = pg_sys::SPI_processed;
        pg_sys::SPI_finish();
        rows
    }
}

/// Run `body` in its own transaction. An ERROR inside it is caught, the transaction rolled back
/// and the error returned, so the worker lives on (`BackgroundWorker::transaction` would let the
/// error end the process).
fn in_transaction<R>(body: impl FnOnce() -> R) -> Result<R, Failure> {
    // SAFETY: the worker is connected to a database and outside any transaction; every path
    // below either commits or aborts the transaction it starts, and returns to the memory
    // context it started in.
    unsafe {
        let caller_context = pg_sys::CurrentMemoryContext;
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, UPDATE_SQL.as_ptr());

        let result = PgTryBuilder::new(AssertUnwindSafe(|| {
            let value = body();
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
            Ok(value)
        }))
        .catch_others(|caught| {
            let report = match &caught {
                pg_sys::panic::CaughtError::PostgresError(report)
                | pg_sys::panic::CaughtError::ErrorReport(report)
                | pg_sys::panic::CaughtError::RustPanic {
                    ereport: report, ..
                } => report,
            };
            let failure = Failure {
                sqlstate: report.sql_error_code() as i32,
                message: report.message().to_owned(),
            };
            pg_sys::AbortCurrentTransaction();
            Err(failure)
        })
        .execute();

        pg_sys::MemoryContextSwitchTo(caller_context);
        // Report the UPDATE's row counts now: autovacuum learns of the dead tuples the flush
        // made, and pg_stat_user_tables shows the writes, without waiting for an idle moment
        // that a busy worker may never have.
        let _ = pg_sys::pgstat_report_stat(true);
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, std::ptr::null());
        result
    }
}
