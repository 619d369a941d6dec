//! The statements a flush worker runs, prepared once per target: the chunk's UPDATE (see
//! `target`) and the check that the target fits, with what they need around them (SPI, the
//! `wsusage.role` switch). Each function here runs inside a transaction of `transaction`.

use std::ffi::{c_int, CStr, CString};
use std::ptr::null_mut;

use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{FromDatum, PgLogLevel};
use wsusage_pending_table::Entry;

use crate::settings;
use crate::target::Target;

/// What writing one chunk did.
pub enum Written {
    Rows {
        /// Rows the UPDATE changed.
        updated: u64,
        /// Ids without a row (done: nothing to write).
        without_row: u64,
        /// Ids whose row another transaction held locked: not written, they stay pending.
        skipped: Vec<[u8; 16]>,
    },
    /// The extension is not installed in the worker's database: nothing was written.
    ExtensionMissing,
}

/// The worker's prepared statements, for the target they were built for.
#[derive(Default)]
pub struct Statements {
    target: Option<Target>,
    update_sql: CString,
    without_row_sql: CString,
    skip_locked_sql: CString,
    update: Plan,
    without_row: Plan,
    skip_locked: Plan,
    check: Plan,
}

/// How a chunk's statement meets row locks held by other transactions.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Locking {
    /// The plain UPDATE, waiting at most [`FAIL_FAST_LOCK_TIMEOUT`] for any lock: no contention,
    /// no extra cost; a lock held elsewhere fails it at once (55P03).
    FailFast,
    /// Lock the rows in id order first, skipping those held (see `Target::skip_locked_sql`),
    /// under `wsusage.lock_timeout` for the table's lock.
    SkipLocked,
}

/// The lock timeout of the first attempt at a chunk, as `SET LOCAL` takes it (milliseconds).
const FAIL_FAST_LOCK_TIMEOUT: &CStr = c"SET LOCAL lock_timeout = 10";

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
    pub fn use_target(&mut self, target: &Target) {
        if self.target.as_ref() == Some(target) {
            return;
        }
        self.update.forget();
        self.without_row.forget();
        self.skip_locked.forget();
        self.update_sql = CString::new(target.update_sql()).unwrap_or_default();
        self.without_row_sql = CString::new(target.without_row_sql()).unwrap_or_default();
        self.skip_locked_sql = CString::new(target.skip_locked_sql()).unwrap_or_default();
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

/// Write one chunk (checking the target first when `first`). Raises a PostgreSQL ERROR on
/// failure; call inside `transaction::in_transaction`.
pub fn write(statements: &mut Statements, chunk: &[Entry], first: bool, locking: Locking) -> Written {
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
        let arrays = [pg_sys::Datum::from(id_array), pg_sys::Datum::from(time_array)];
        let written = match locking {
            Locking::FailFast => update(statements, arrays, chunk.len()),
            Locking::SkipLocked => update_skipping_locked(statements, arrays),
        };
        pg_sys::SPI_finish();
        if let Some((user, context)) = restore_user {
            pg_sys::SetUserIdAndSecContext(user, context);
        }
        written
    }
}

/// Column `n` of the first row SPI returned, as a count.
///
/// # Safety
/// Connected to SPI, after a statement that returned at least one row with a bigint there.
unsafe fn count_in_result(n: c_int) -> u64 {
    // SAFETY: the caller's promise.
    unsafe {
        let table = *pg_sys::SPI_tuptable;
        let mut is_null = false;
        let datum = pg_sys::SPI_getbinval(*table.vals, table.tupdesc, n, &mut is_null);
        if is_null {
            0
        } else {
            u64::try_from(datum.value() as i64).unwrap_or(0)
        }
    }
}

/// The plain UPDATE of `Locking::FailFast`, and the count of ids without a row when it updated
/// fewer rows than `ids`.
///
/// # Safety
/// As in [`write`]: connected to SPI; `arrays` are the chunk's id and time arrays.
unsafe fn update(statements: &mut Statements, mut arrays: [pg_sys::Datum; 2], ids: usize) -> Written {
    // SAFETY: the caller's promise; SPI errors raise.
    unsafe {
        if pg_sys::SPI_execute(FAIL_FAST_LOCK_TIMEOUT.as_ptr(), false, 0) != pg_sys::SPI_OK_UTILITY as i32 {
            error!("could not set the lock timeout of a wsusage flush");
        }
        let plan =
            statements.update.get(&statements.update_sql, &mut [pg_sys::UUIDARRAYOID, pg_sys::TIMESTAMPTZARRAYOID]);
        let rc = pg_sys::SPI_execute_plan(plan, arrays.as_mut_ptr(), std::ptr::null(), false, 0);
        if rc != pg_sys::SPI_OK_UPDATE as i32 {
            error!("wsusage flush statement returned SPI code {rc}");
        }
        let updated = pg_sys::SPI_processed;
        let mut without_row = 0;
        if updated < ids as u64 {
            let plan = statements.without_row.get(&statements.without_row_sql, &mut [pg_sys::UUIDARRAYOID]);
            let rc = pg_sys::SPI_execute_plan(plan, arrays.as_mut_ptr(), std::ptr::null(), true, 1);
            if rc == pg_sys::SPI_OK_SELECT as i32 && pg_sys::SPI_processed == 1 {
                without_row = count_in_result(1);
            }
        }
        Written::Rows { updated, without_row, skipped: Vec::new() }
    }
}

/// The statement of `Locking::SkipLocked`.
///
/// # Safety
/// As in [`update`].
unsafe fn update_skipping_locked(statements: &mut Statements, mut arrays: [pg_sys::Datum; 2]) -> Written {
    // SAFETY: the caller's promise; the result row is read, and copied out, before the caller's
    // SPI_finish frees it.
    unsafe {
        let plan = statements
            .skip_locked
            .get(&statements.skip_locked_sql, &mut [pg_sys::UUIDARRAYOID, pg_sys::TIMESTAMPTZARRAYOID]);
        let rc = pg_sys::SPI_execute_plan(plan, arrays.as_mut_ptr(), std::ptr::null(), false, 0);
        let rows = pg_sys::SPI_processed;
        if rc != pg_sys::SPI_OK_SELECT as i32 || rows != 1 {
            error!("wsusage flush statement returned SPI code {rc} and {rows} rows");
        }
        let updated = count_in_result(1);
        let table = *pg_sys::SPI_tuptable;
        let mut is_null = false;
        let skipped = pg_sys::SPI_getbinval(*table.vals, table.tupdesc, 2, &mut is_null);
        let skipped: Vec<[u8; 16]> = <Vec<pgrx::Uuid> as FromDatum>::from_datum(skipped, is_null)
            .unwrap_or_default()
            .iter()
            .map(|id| *id.as_bytes())
            .collect();
        let not_locked = count_in_result(3);
        Written::Rows { updated, without_row: not_locked.saturating_sub(skipped.len() as u64), skipped }
    }
}

/// Check the target alone (at start and after a reload). Raises an ERROR when it does not fit;
/// call inside `transaction::in_transaction`.
pub fn check(statements: &mut Statements) {
    // SAFETY: inside a transaction (the caller's promise); SPI connected and finished here.
    unsafe {
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            error!("could not connect to SPI");
        }
        check_target(statements);
        pg_sys::SPI_finish();
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
