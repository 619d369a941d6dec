//! One flush: snapshot the pending set, write it in chunks of `wsusage.batch_size` ids, each
//! chunk one parameterised UPDATE in its own transaction, and forget what each committed chunk
//! wrote. Runs in the worker only.
//!
//! The statement writes each id's own latest mark time, and only over NULL or an older value, so
//! a row never moves backwards whatever races with it (under READ COMMITTED a concurrently
//! updated row is re-checked against the WHERE clause). Ids are sorted, so every flush takes row
//! locks in one order, the order an application updating several workspaces by id also uses:
//! no deadlock between them. Each chunk runs under `wsusage.lock_timeout` and
//! `wsusage.statement_timeout`: an application holding a row lock delays only the chunk with that
//! row, which stays pending and is retried, while the other chunks commit. The pending lock is
//! never held here while the database is touched.

use std::ffi::{c_int, CStr, CString};
use std::panic::AssertUnwindSafe;
use std::ptr::null_mut;
use std::time::{SystemTime, UNIX_EPOCH};

use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::pg_sys::{self, PgTryBuilder};
use pgrx::prelude::*;
use pgrx::PgLogLevel;

use crate::databases;
use crate::errors::{self, Failure};
use crate::pending;
use crate::rendezvous;
use crate::settings;
use crate::stats::{self, ChunkOutcome};
use crate::target::Target;
use wsusage_pending_table::Entry;

/// What writing one chunk did.
enum Written {
    Rows {
        updated: u64,
        without_row: u64,
    },
    /// The extension is not installed in the worker's database: nothing was written.
    ExtensionMissing,
}

/// The worker's flush state: its database, the statements, prepared once, and a buffer big
/// enough for the whole set, allocated once so the snapshot never allocates under the pending
/// lock.
pub struct Flusher {
    database: pg_sys::Oid,
    database_name: String,
    statements: Statements,
    batch: Vec<Entry>,
    /// The last failure message logged, so a repeated failure is not logged every interval.
    last_logged_failure: Option<String>,
    extension_missing_logged: bool,
    /// The target problem last logged by a start-up or reload check, so a reload that changes
    /// nothing does not repeat it.
    last_target_problem: Option<String>,
}

impl Flusher {
    /// Call once connected to `database`.
    pub fn new(database: pg_sys::Oid) -> Self {
        Flusher {
            database,
            database_name: database_name(database),
            statements: Statements::default(),
            batch: Vec::with_capacity(settings::max_pending()),
            last_logged_failure: None,
            extension_missing_logged: false,
            last_target_problem: None,
        }
    }

    pub fn database_name(&self) -> &str {
        &self.database_name
    }

    /// Whether the last flush found the extension missing from the database.
    pub fn extension_is_missing(&self) -> bool {
        self.extension_missing_logged
    }

    /// Flush whatever of the database is pending and publish the outcome to `wsusage_flush()`
    /// callers; returns the number of ids taken from the set.
    pub fn flush(&mut self) -> u64 {
        let database = self.database;
        let started_at = now();
        let up_to_request = pending::snapshot(database, &mut self.batch, started_at);
        if self.batch.is_empty() {
            rendezvous::publish(database, up_to_request, &rendezvous::Result::Applied { ids: 0 });
            return 0;
        }
        let ids = self.batch.len() as u64;
        self.batch.sort_unstable_by_key(|entry| entry.key.id);

        let mut failure: Option<Failure> = None;
        let mut extension_missing = false;
        match settings::target() {
            // The check hooks keep invalid names out; this is a last line of defence.
            Err(detail) => {
                stats::record_chunk(database, &ChunkOutcome::Failed { message: &detail }, now());
                failure =
                    Some(Failure { sqlstate: PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE as i32, message: detail });
            }
            Ok(target) => {
                self.statements.use_target(&target);
                for (n, chunk) in self.batch.chunks(settings::batch_size()).enumerate() {
                    // A DROP DATABASE (or RENAME) waits for this process to leave: do not make it
                    // wait for the remaining chunks, which stay pending.
                    if n > 0 && databases::is_being_changed(database) {
                        failure.get_or_insert(Failure {
                            sqlstate: PgSqlErrorCode::ERRCODE_OBJECT_IN_USE as i32,
                            message: "the database is being dropped, renamed or copied".into(),
                        });
                        break;
                    }
                    let statements = &mut self.statements;
                    match in_transaction(|| write_chunk(statements, chunk, n == 0)) {
                        Ok(Written::Rows { updated, without_row }) => {
                            pending::forget(database, chunk);
                            let outcome = ChunkOutcome::Committed {
                                ids: chunk.len() as u64,
                                rows_updated: updated,
                                ids_without_row: without_row,
                            };
                            stats::record_chunk(database, &outcome, now());
                        }
                        Ok(Written::ExtensionMissing) => {
                            extension_missing = true;
                            break;
                        }
                        Err(chunk_failure) => {
                            let failed = ChunkOutcome::Failed { message: &chunk_failure.message };
                            stats::record_chunk(database, &failed, now());
                            let local = chunk_failure.is_local_to_chunk();
                            failure.get_or_insert(chunk_failure);
                            if !local {
                                break;
                            }
                        }
                    }
                }
            }
        }

        if extension_missing {
            failure = Some(self.extension_missing());
        } else {
            self.extension_missing_logged = false;
        }
        let failed_before = stats::consecutive_failures(database);
        let consecutive = stats::record_flush(database, failure.is_some(), started_at, now());
        let result = match failure {
            None => {
                self.report_success(ids, failed_before);
                rendezvous::Result::Applied { ids }
            }
            Some(failure) => {
                if !extension_missing {
                    self.report_failure(ids, consecutive, &failure);
                }
                rendezvous::Result::Failed { ids, sqlstate: failure.sqlstate, message: failure.message }
            }
        };
        rendezvous::publish(database, up_to_request, &result);
        ids
    }

    fn extension_missing(&mut self) -> Failure {
        let message = format!("extension \"wsusage\" does not exist in database \"{}\"", self.database_name);
        if !self.extension_missing_logged {
            log!(
                "wsusage flush worker is leaving: {message}; its pending marks are kept until CREATE EXTENSION wsusage"
            );
            self.extension_missing_logged = true;
        }
        stats::record_chunk(self.database, &ChunkOutcome::Failed { message: &message }, now());
        Failure { sqlstate: PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT as i32, message }
    }

    fn report_success(&mut self, ids: u64, failed_before: u64) {
        self.last_logged_failure = None;
        if failed_before > 0 {
            log!(
                "wsusage flush succeeded again: {ids} pending ids, carried over from the failed flushes, were applied"
            );
        }
    }

    /// WARNING on the first failure, when the error changes, and at the 2nd, 4th, 8th …
    /// consecutive failure, so a lasting fault is visible without flooding the log.
    fn report_failure(&mut self, ids: u64, consecutive: u64, failure: &Failure) {
        let changed = self.last_logged_failure.as_deref() != Some(failure.message.as_str());
        if changed || (consecutive > 1 && consecutive.is_power_of_two()) {
            errors::report_flush_failure(ids, consecutive, failure);
            self.last_logged_failure = Some(failure.message.clone());
        }
    }
}

/// The name of `database`, for messages; its OID if it has none (being dropped).
fn database_name(database: pg_sys::Oid) -> String {
    // SAFETY: a transaction of its own around the catalog lookup, outside any other.
    unsafe { pg_sys::StartTransactionCommand() };
    let name = databases::name(database).unwrap_or_else(|| database.to_u32().to_string());
    // SAFETY: ends the transaction started above.
    unsafe { pg_sys::CommitTransactionCommand() };
    name
}

/// The current time as a `TimestampTz` (microseconds since 2000-01-01), from the clock
/// `GetCurrentTimestamp` reads, but without a call into PostgreSQL through pgrx's error guard:
/// every mark reads it.
pub fn now() -> i64 {
    const UNIX_TO_POSTGRES_EPOCH_US: i64 = 946_684_800_000_000;
    let since_unix_epoch = match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_micros()).unwrap_or(i64::MAX),
    };
    since_unix_epoch.saturating_sub(UNIX_TO_POSTGRES_EPOCH_US)
}

/// The worker's prepared statements, for the target they were built for.
#[derive(Default)]
struct Statements {
    target: Option<Target>,
    update_sql: CString,
    without_row_sql: CString,
    update: Plan,
    without_row: Plan,
    check: Plan,
}

/// A statement prepared once and kept for the worker's lifetime (or until the target changes).
/// A kept plan survives transactions, and the plan cache re-plans it if the table is altered,
/// dropped, or renamed away and back.
struct Plan(pg_sys::SPIPlanPtr);

impl Default for Plan {
    fn default() -> Self {
        Plan(null_mut())
    }
}

impl Plan {
    /// # Safety
    /// Inside a transaction, connected to SPI.
    unsafe fn get(&mut self, sql: &CStr, argtypes: &mut [pg_sys::Oid]) -> pg_sys::SPIPlanPtr {
        if self.0.is_null() {
            // SAFETY: the caller guarantees the SPI connection; errors raise and are caught by
            // in_transaction.
            unsafe {
                let fresh = pg_sys::SPI_prepare(sql.as_ptr(), argtypes.len() as c_int, argtypes.as_mut_ptr());
                if fresh.is_null() {
                    let code = (&raw const pg_sys::SPI_result).read();
                    error!("could not prepare a wsusage flush statement: SPI error {code}");
                }
                pg_sys::SPI_keepplan(fresh);
                self.0 = fresh;
            }
        }
        self.0
    }

    fn forget(&mut self) {
        if !self.0.is_null() {
            // SAFETY: a plan we prepared and kept; nothing else holds it.
            unsafe { pg_sys::SPI_freeplan(self.0) };
            self.0 = null_mut();
        }
    }
}

impl Statements {
    /// Point the statements at `target`, dropping the plans made for another one.
    fn use_target(&mut self, target: &Target) {
        if self.target.as_ref() == Some(target) {
            return;
        }
        self.update.forget();
        self.without_row.forget();
        self.update_sql = CString::new(target.update_sql()).unwrap_or_default();
        self.without_row_sql = CString::new(target.without_row_sql()).unwrap_or_default();
        self.target = Some(target.clone());
    }
}

/// Build a text datum for SPI (palloc'd in the current memory context).
///
/// # Safety
/// Inside a transaction.
unsafe fn text_datum(value: &str) -> pg_sys::Datum {
    // SAFETY: cstring_to_text_with_len copies `len` bytes into a fresh varlena.
    unsafe { pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(value.as_ptr().cast(), value.len() as c_int)) }
}

/// Raise an ERROR when the target does not fit: missing table or column, or a wrong type.
///
/// # Safety
/// Inside a transaction, connected to SPI.
unsafe fn check_target(statements: &mut Statements) {
    let Some(target) = statements.target.clone() else { return };
    // SAFETY: as the caller guarantees; the datums live in the transaction's memory.
    unsafe {
        let plan = statements.check.get(Target::CHECK_SQL, &mut [pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::TEXTOID]);
        let mut values = [
            text_datum(&target.table.quoted()),
            text_datum(target.id_column.last()),
            text_datum(target.timestamp_column.last()),
        ];
        let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), std::ptr::null(), true, 1);
        if rc == pg_sys::SPI_OK_SELECT as i32 && pg_sys::SPI_processed == 1 {
            let table = *pg_sys::SPI_tuptable;
            let column = |n| {
                let value = pg_sys::SPI_getvalue(*table.vals, table.tupdesc, n);
                if value.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(value).to_string_lossy().into_owned()
                }
            };
            let (sqlstate, message) = (column(1), column(2));
            ErrorReport::new(PgSqlErrorCode::from(make_sqlstate(&sqlstate)), message, "wsusage worker")
                .set_hint(
                    "Fix the table, or set \"wsusage.table\", \"wsusage.id_column\" and \"wsusage.timestamp_column\" and reload.",
                )
                .report(PgLogLevel::ERROR);
        }
    }
}

/// PostgreSQL's MAKE_SQLSTATE: five characters packed six bits each.
fn make_sqlstate(code: &str) -> i32 {
    code.bytes()
        .take(5)
        .enumerate()
        .fold(0, |packed, (i, b)| packed | ((i32::from(b.wrapping_sub(b'0')) & 0x3F) << (6 * i)))
}

/// Check the configured target in a transaction of its own (at start and after a reload), so a
/// misconfiguration is reported before any mark waits on it.
pub fn validate_target(flusher: &mut Flusher) {
    let Ok(target) = settings::target() else { return };
    flusher.statements.use_target(&target);
    let statements = &mut flusher.statements;
    // SAFETY: check_target runs inside in_transaction, connected to SPI there.
    let checked = in_transaction(|| unsafe {
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            error!("could not connect to SPI");
        }
        check_target(statements);
        pg_sys::SPI_finish();
    });
    if let Err(failure) = checked {
        stats::record_problem(flusher.database, &failure.message, now());
        if flusher.last_target_problem.as_deref() != Some(failure.message.as_str()) {
            errors::report_target_problem(&failure);
            flusher.last_target_problem = Some(failure.message);
        }
    } else {
        flusher.last_target_problem = None;
    }
}

/// Write one chunk (checking the target first when `first`). Raises a PostgreSQL ERROR on
/// failure; call inside [`in_transaction`].
fn write_chunk(statements: &mut Statements, chunk: &[Entry], first: bool) -> Written {
    // SAFETY: in a transaction with an active snapshot (in_transaction); SPI calls raise ERROR on
    // failure, which in_transaction catches and rolls back. The datums handed to
    // construct_array point into `chunk`, alive across the calls; construct_array copies them.
    unsafe {
        if pg_sys::get_extension_oid(c"wsusage".as_ptr(), true) == pg_sys::InvalidOid {
            return Written::ExtensionMissing;
        }
        let restore_user = become_configured_role();
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            error!("could not connect to SPI");
        }
        if first {
            check_target(statements);
        }
        let nelems = c_int::try_from(chunk.len()).unwrap_or(c_int::MAX);
        let mut ids: Vec<pg_sys::Datum> = chunk.iter().map(|e| pg_sys::Datum::from(e.key.id.as_ptr())).collect();
        let mut times: Vec<pg_sys::Datum> = chunk.iter().map(|e| pg_sys::Datum::from(e.marked_at)).collect();
        let id_array =
            pg_sys::construct_array(ids.as_mut_ptr(), nelems, pg_sys::UUIDOID, 16, false, pg_sys::TYPALIGN_CHAR as _);
        let time_array = pg_sys::construct_array(
            times.as_mut_ptr(),
            nelems,
            pg_sys::TIMESTAMPTZOID,
            8,
            true,
            pg_sys::TYPALIGN_DOUBLE as _,
        );

        let plan =
            statements.update.get(&statements.update_sql, &mut [pg_sys::UUIDARRAYOID, pg_sys::TIMESTAMPTZARRAYOID]);
        let mut values = [pg_sys::Datum::from(id_array), pg_sys::Datum::from(time_array)];
        let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), std::ptr::null(), false, 0);
        if rc != pg_sys::SPI_OK_UPDATE as i32 {
            error!("wsusage flush statement returned SPI code {rc}");
        }
        let updated = pg_sys::SPI_processed;

        let mut missing = 0;
        if updated < chunk.len() as u64 {
            let plan = statements.without_row.get(&statements.without_row_sql, &mut [pg_sys::UUIDARRAYOID]);
            let mut values = [pg_sys::Datum::from(id_array)];
            let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), std::ptr::null(), true, 1);
            if rc == pg_sys::SPI_OK_SELECT as i32 && pg_sys::SPI_processed == 1 {
                let table = *pg_sys::SPI_tuptable;
                let mut is_null = false;
                let count = pg_sys::SPI_getbinval(*table.vals, table.tupdesc, 1, &mut is_null);
                missing = if is_null { 0 } else { u64::try_from(count.value() as i64).unwrap_or(0) };
            }
        }
        pg_sys::SPI_finish();
        if let Some((user, context)) = restore_user {
            pg_sys::SetUserIdAndSecContext(user, context);
        }
        Written::Rows { updated, without_row: missing }
    }
}

/// Run the rest of the transaction with the privileges of `wsusage.role`, if set; returns what
/// to restore before commit (an abort restores it by itself). The worker's process connects as
/// the bootstrap superuser only so that a missing role or privilege is an ordinary, logged and
/// retried error rather than a worker that cannot start; the UPDATE, and any trigger it fires,
/// run as the role, as logical replication runs a subscription's changes as the table owner.
///
/// # Safety
/// Inside a transaction.
unsafe fn become_configured_role() -> Option<(pg_sys::Oid, c_int)> {
    let role = settings::role()?;
    let name = CString::new(role.as_str()).unwrap_or_default();
    // SAFETY: catalog lookup and user switch inside a transaction, as the caller guarantees.
    unsafe {
        let role_oid = pg_sys::get_role_oid(name.as_ptr(), true);
        if role_oid == pg_sys::InvalidOid {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!("role \"{role}\" named by \"wsusage.role\" does not exist"),
                "Create the role and grant it UPDATE on the table, or change \"wsusage.role\" and restart the server."
            );
        }
        let (mut user, mut context) = (pg_sys::InvalidOid, 0);
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(role_oid, context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as c_int);
        Some((user, context))
    }
}

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
fn in_transaction<R>(body: impl FnOnce() -> R) -> Result<R, Failure> {
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
