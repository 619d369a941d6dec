//! The worker's transactions: each chunk of a flush (and each check of the target) runs in its
//! own, under `wsusage.statement_timeout` and `wsusage.lock_timeout`, and an ERROR inside one is
//! caught and rolled back, so the worker lives on.

use std::ffi::{c_int, CString};
use std::panic::AssertUnwindSafe;

use pgrx::pg_sys::{self, PgTryBuilder};

use crate::flush::failure::Failure;
use crate::settings;

/// Send this process's table counters to the cumulative statistics now.
fn report_stat() {
    // SAFETY: a plain call, outside any transaction, in a process connected to a database.
    #[cfg(feature = "pg14")]
    unsafe {
        pg_sys::pgstat_report_stat(true)
    };
    // SAFETY: as above; from PostgreSQL 15 it returns how long to wait before the next forced
    // report, which a flush (forced, once per chunk) has no use for.
    #[cfg(not(feature = "pg14"))]
    let _ = unsafe { pg_sys::pgstat_report_stat(true) };
}

// utils/timeout.h, which pgrx does not bind. The TimeoutId values are stable across 14–18.
const STATEMENT_TIMEOUT: c_int = 3;
unsafe extern "C-unwind" {
    #[link_name = "enable_timeout_after"]
    fn enable_timeout_after_unguarded(id: c_int, delay_ms: c_int);
    #[link_name = "disable_timeout"]
    fn disable_timeout_unguarded(id: c_int, keep_indicator: bool);
}

/// # Safety
/// In a backend whose timeouts are initialised (any process connected to a database).
unsafe fn enable_timeout_after(id: c_int, delay_ms: c_int) {
    // SAFETY: the guard turns an ERROR raised inside into a Rust panic instead of a longjmp
    // across Rust frames.
    unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| enable_timeout_after_unguarded(id, delay_ms)) }
}

/// # Safety
/// As [`enable_timeout_after`].
unsafe fn disable_timeout(id: c_int, keep_indicator: bool) {
    // SAFETY: as in enable_timeout_after.
    unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| disable_timeout_unguarded(id, keep_indicator)) }
}

/// Apply the reloadable timeouts to the worker's session; called at start and after a reload.
/// lock_timeout is enforced by the lock manager for SPI too; statement_timeout is armed per
/// chunk by [`in_transaction`], as only the client protocol arms it by itself.
pub fn apply_session_settings() {
    let lock_timeout = CString::new(settings::lock_timeout_ms().to_string()).unwrap_or_default();
    // SAFETY: sets a user-settable GUC of this session to a valid integer.
    unsafe {
        pg_sys::SetConfigOption(
            c"lock_timeout".as_ptr(),
            lock_timeout.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
        );
    }
}

/// Run `body` in its own transaction, under `wsusage.statement_timeout`. An ERROR inside it is
/// caught, the transaction rolled back and the error returned, so the worker lives on
/// (`BackgroundWorker::transaction` would let the error end the process).
pub fn in_transaction<R>(body: impl FnOnce() -> R) -> Result<R, Failure> {
    let statement_timeout = settings::statement_timeout_ms();
    // SAFETY: the worker is connected to a database and outside any transaction; every path
    // below either commits or aborts the transaction it starts, disarms the timeout it armed,
    // and returns to the memory context it started in.
    unsafe {
        let caller_context = pg_sys::CurrentMemoryContext;
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, c"wsusage: flush pending marks".as_ptr());
        if statement_timeout > 0 {
            enable_timeout_after(STATEMENT_TIMEOUT, statement_timeout);
        }

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
                | pg_sys::panic::CaughtError::RustPanic { ereport: report, .. } => report,
            };
            let failure = Failure { sqlstate: report.sql_error_code() as i32, message: report.message().to_owned() };
            pg_sys::AbortCurrentTransaction();
            Err(failure)
        })
        .execute();

        if statement_timeout > 0 {
            disable_timeout(STATEMENT_TIMEOUT, false);
            // A timeout that fired after the work ended must not cancel what comes next.
            (&raw mut pg_sys::QueryCancelPending).write_volatile(0);
        }
        pg_sys::MemoryContextSwitchTo(caller_context);
        // Report the UPDATE's row counts now: autovacuum learns of the dead tuples the flush
        // made, and pg_stat_user_tables shows the writes, without waiting for an idle moment
        // that a busy worker may never have.
        report_stat();
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, std::ptr::null());
        result
    }
}
