//! The statements a flush worker runs for a target, prepared once per definition (see
//! `targets::definition`): the chunk's UPDATE, the count of ids without a row, the lock-skipping variant and
//! the call of the target's `after_flush` function, with what they need around them (SPI, and
//! running as the table's owner: see `run_as`). Each function here runs inside a transaction of
//! `transaction`.

use std::cell::Cell;
use std::ffi::{c_int, CStr, CString};
use std::ptr::null_mut;

use pgrx::prelude::*;
use pgrx::FromDatum;
use wsusage_pending_table::Entry;

use crate::flush::run_as::{Expect, RunAs};
use crate::memory::key::{self, Kind};
use crate::targets::definition::Definition;

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

/// A target's prepared statements, for the definition they were built for.
#[derive(Default)]
pub struct Statements {
    definition: Option<Definition>,
    update_sql: CString,
    without_row_sql: CString,
    skip_locked_sql: CString,
    after_flush_sql: Option<CString>,
    update: Plan,
    without_row: Plan,
    skip_locked: Plan,
    after_flush: Plan,
}

/// How a chunk's statement meets row locks held by other transactions.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Locking {
    /// The plain UPDATE, waiting at most [`FAIL_FAST_LOCK_TIMEOUT_MS`] for any lock: no contention,
    /// no extra cost; a lock held elsewhere fails it at once (55P03).
    FailFast,
    /// Lock the rows in id order first, skipping those held (see
    /// `Definition::skip_locked_sql`), under `wsusage.lock_timeout` for the table's lock.
    SkipLocked,
}

/// The lock timeout of the first attempt at a chunk, in milliseconds.
const FAIL_FAST_LOCK_TIMEOUT_MS: i32 = 10;

const ALL_CONSTRAINTS_IMMEDIATE: &CStr = c"SET CONSTRAINTS ALL IMMEDIATE";

thread_local! {
    /// The target's `after_flush` function is running: an ERROR now is the function's, not a
    /// row's (see [`failed_in_after_flush`]).
    static IN_AFTER_FLUSH: Cell<bool> = const { Cell::new(false) };
}

/// Whether the last chunk written failed inside the target's `after_flush` function; clears it.
pub fn failed_in_after_flush() -> bool {
    IN_AFTER_FLUSH.with(|flag| flag.replace(false))
}

/// A statement prepared once and kept for the worker's lifetime (or until the definition
/// changes). A kept plan survives transactions, and the plan cache re-plans it if the table is
/// altered, dropped, or renamed away and back.
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

impl Drop for Statements {
    fn drop(&mut self) {
        self.forget_plans();
    }
}

impl Statements {
    /// Point the statements at `definition`, dropping the plans made for another one.
    pub fn use_definition(&mut self, definition: &Definition) {
        if self.definition.as_ref() == Some(definition) {
            return;
        }
        self.forget_plans();
        self.update_sql = CString::new(definition.update_sql()).unwrap_or_default();
        self.without_row_sql = CString::new(definition.without_row_sql()).unwrap_or_default();
        self.skip_locked_sql = CString::new(definition.skip_locked_sql()).unwrap_or_default();
        self.after_flush_sql = definition.after_flush_sql().and_then(|sql| CString::new(sql).ok());
        self.definition = Some(definition.clone());
    }

    fn forget_plans(&mut self) {
        for plan in [&mut self.update, &mut self.without_row, &mut self.skip_locked, &mut self.after_flush] {
            plan.forget();
        }
    }

    fn kind(&self) -> Kind {
        self.definition.as_ref().and_then(Definition::kind).unwrap_or(Kind::Uuid)
    }

    /// The array types of the statements' parameters: the keys, their times.
    fn array_types(&self) -> [pg_sys::Oid; 2] {
        let keys = match self.kind() {
            Kind::Uuid => pg_sys::UUIDARRAYOID,
            Kind::Bigint => pg_sys::INT8ARRAYOID,
        };
        [keys, pg_sys::TIMESTAMPTZARRAYOID]
    }
}

/// Write one chunk of the statements' target (every entry of it of the target's kind). Raises a
/// PostgreSQL ERROR on failure; call inside `transaction::in_transaction`.
pub fn write(statements: &mut Statements, chunk: &[Entry], locking: Locking) -> Written {
    // SAFETY: in a transaction with an active snapshot (in_transaction); SPI calls raise ERROR on
    // failure, which in_transaction catches and rolls back. The datums handed to
    // construct_array point into `ids` and `times`, alive across the calls; construct_array
    // copies them.
    unsafe {
        if pg_sys::get_extension_oid(c"wsusage".as_ptr(), true) == pg_sys::InvalidOid {
            return Written::ExtensionMissing;
        }
        let Some(relation) = statements.definition.as_ref().and_then(|definition| definition.relation.clone()) else {
            error!("a wsusage flush statement has no table");
        };
        let lock_timeout = (locking == Locking::FailFast).then_some(FAIL_FAST_LOCK_TIMEOUT_MS);
        let run_as = RunAs::begin(&relation, lock_timeout);
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            error!("could not connect to SPI");
        }
        // PostgreSQL refuses to queue a deferred trigger in a restricted operation (it would fire
        // at the commit, after the chunk is itself again): the owner's deferred constraint
        // triggers fire at the end of each statement instead, as the owner — the same moment, for
        // a transaction of one UPDATE.
        if pg_sys::SPI_execute(ALL_CONSTRAINTS_IMMEDIATE.as_ptr(), false, 0) != pg_sys::SPI_OK_UTILITY as i32 {
            error!("could not make the constraints of a wsusage flush immediate");
        }
        let nelems = c_int::try_from(chunk.len()).unwrap_or(c_int::MAX);
        let key_array = match statements.kind() {
            Kind::Uuid => {
                let mut ids: Vec<pg_sys::Datum> =
                    chunk.iter().map(|e| pg_sys::Datum::from(e.key.id.as_ptr())).collect();
                pg_sys::construct_array(
                    ids.as_mut_ptr(),
                    nelems,
                    pg_sys::UUIDOID,
                    16,
                    false,
                    pg_sys::TYPALIGN_CHAR as _,
                )
            }
            Kind::Bigint => {
                let mut ids: Vec<pg_sys::Datum> =
                    chunk.iter().map(|e| pg_sys::Datum::from(key::to_bigint(&e.key.id))).collect();
                pg_sys::construct_array(
                    ids.as_mut_ptr(),
                    nelems,
                    pg_sys::INT8OID,
                    8,
                    true,
                    pg_sys::TYPALIGN_DOUBLE as _,
                )
            }
        };
        let mut times: Vec<pg_sys::Datum> = chunk.iter().map(|e| pg_sys::Datum::from(e.marked_at)).collect();
        let time_array = pg_sys::construct_array(
            times.as_mut_ptr(),
            nelems,
            pg_sys::TIMESTAMPTZOID,
            8,
            true,
            pg_sys::TYPALIGN_DOUBLE as _,
        );
        let arrays = [pg_sys::Datum::from(key_array), pg_sys::Datum::from(time_array)];
        let (written, flushed) = match locking {
            Locking::FailFast => update(statements, &run_as, arrays, chunk.len()),
            Locking::SkipLocked => update_skipping_locked(statements, &run_as, arrays),
        };
        if let Some(flushed) = flushed {
            call_after_flush(statements, &run_as, flushed);
        }
        pg_sys::SPI_finish();
        run_as.end();
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
        let (datum, is_null) = datum_in_result(n);
        if is_null {
            0
        } else {
            u64::try_from(datum.value() as i64).unwrap_or(0)
        }
    }
}

/// Column `n` of the first row SPI returned, valid until SPI_finish.
///
/// # Safety
/// Connected to SPI, after a statement that returned at least one row with `n` columns.
unsafe fn datum_in_result(n: c_int) -> (pg_sys::Datum, bool) {
    // SAFETY: the caller's promise.
    unsafe {
        let table = *pg_sys::SPI_tuptable;
        let mut is_null = false;
        let datum = pg_sys::SPI_getbinval(*table.vals, table.tupdesc, n, &mut is_null);
        (datum, is_null)
    }
}

/// The ids a statement wrote and their times, as arrays for `after_flush` (`None`: no row
/// written, or no function to call).
type Flushed = Option<[pg_sys::Datum; 2]>;

/// The arrays in columns `ids` and `times` of the first row SPI returned, when not NULL.
///
/// # Safety
/// As for [`datum_in_result`].
unsafe fn flushed_in_result(ids: c_int, times: c_int) -> Flushed {
    // SAFETY: the caller's promise.
    unsafe {
        let (ids, ids_null) = datum_in_result(ids);
        let (times, times_null) = datum_in_result(times);
        (!ids_null && !times_null).then_some([ids, times])
    }
}

/// The plain UPDATE of `Locking::FailFast`, and the count of ids without a row when it updated
/// fewer rows than `ids`.
///
/// # Safety
/// As in [`write`]: connected to SPI; `arrays` are the chunk's key and time arrays.
unsafe fn update(
    statements: &mut Statements,
    run_as: &RunAs,
    mut arrays: [pg_sys::Datum; 2],
    ids: usize,
) -> (Written, Flushed) {
    let mut types = statements.array_types();
    let returns_rows = statements.after_flush_sql.is_some();
    // SAFETY: the caller's promise; SPI errors raise.
    unsafe {
        let plan = statements.update.get(&statements.update_sql, &mut types);
        run_as.check_plan(plan, Expect::Table);
        let rc = pg_sys::SPI_execute_plan(plan, arrays.as_mut_ptr(), std::ptr::null(), false, 0);
        let (updated, flushed) = if returns_rows {
            if rc != pg_sys::SPI_OK_SELECT as i32 || pg_sys::SPI_processed != 1 {
                error!("wsusage flush statement returned SPI code {rc}");
            }
            (count_in_result(1), flushed_in_result(2, 3))
        } else {
            if rc != pg_sys::SPI_OK_UPDATE as i32 {
                error!("wsusage flush statement returned SPI code {rc}");
            }
            (pg_sys::SPI_processed, None)
        };
        let mut without_row = 0;
        if updated < ids as u64 {
            let plan = statements.without_row.get(&statements.without_row_sql, &mut types[..1]);
            run_as.check_plan(plan, Expect::Table);
            let rc = pg_sys::SPI_execute_plan(plan, arrays.as_mut_ptr(), std::ptr::null(), true, 1);
            if rc == pg_sys::SPI_OK_SELECT as i32 && pg_sys::SPI_processed == 1 {
                without_row = count_in_result(1);
            }
        }
        (Written::Rows { updated, without_row, skipped: Vec::new() }, flushed)
    }
}

/// The statement of `Locking::SkipLocked`.
///
/// # Safety
/// As in [`update`].
unsafe fn update_skipping_locked(
    statements: &mut Statements,
    run_as: &RunAs,
    mut arrays: [pg_sys::Datum; 2],
) -> (Written, Flushed) {
    let mut types = statements.array_types();
    let kind = statements.kind();
    // SAFETY: the caller's promise; the result row is read, and copied out, before the caller's
    // SPI_finish frees it.
    unsafe {
        let plan = statements.skip_locked.get(&statements.skip_locked_sql, &mut types);
        run_as.check_plan(plan, Expect::Table);
        let rc = pg_sys::SPI_execute_plan(plan, arrays.as_mut_ptr(), std::ptr::null(), false, 0);
        let rows = pg_sys::SPI_processed;
        if rc != pg_sys::SPI_OK_SELECT as i32 || rows != 1 {
            error!("wsusage flush statement returned SPI code {rc} and {rows} rows");
        }
        let updated = count_in_result(1);
        let (skipped, is_null) = datum_in_result(2);
        let skipped: Vec<[u8; 16]> = match kind {
            Kind::Uuid => <Vec<pgrx::Uuid> as FromDatum>::from_datum(skipped, is_null)
                .unwrap_or_default()
                .iter()
                .map(|id| *id.as_bytes())
                .collect(),
            Kind::Bigint => <Vec<i64> as FromDatum>::from_datum(skipped, is_null)
                .unwrap_or_default()
                .into_iter()
                .map(key::from_bigint)
                .collect(),
        };
        let not_locked = count_in_result(3);
        let flushed = if statements.after_flush_sql.is_some() { flushed_in_result(4, 5) } else { None };
        (Written::Rows { updated, without_row: not_locked.saturating_sub(skipped.len() as u64), skipped }, flushed)
    }
}

/// Call the target's `after_flush` function with the ids the chunk wrote and their times, in the
/// chunk's transaction: its ERROR rolls the chunk back.
///
/// # Safety
/// As in [`write`]; `flushed` are arrays of the id column's type and timestamptz.
unsafe fn call_after_flush(statements: &mut Statements, run_as: &RunAs, mut flushed: [pg_sys::Datum; 2]) {
    let Some(sql) = statements.after_flush_sql.clone() else { return };
    let Some(after_flush) = statements.definition.as_ref().and_then(|d| d.after_flush.clone()) else { return };
    let Some(function) = after_flush.function else {
        error!("the after_flush function of a wsusage flush was not read from the catalogs");
    };
    let ids_type =
        statements.definition.as_ref().and_then(|d| d.id_type.as_ref()).map_or(pg_sys::InvalidOid, |t| t.array);
    IN_AFTER_FLUSH.with(|flag| flag.set(true));
    // SAFETY: the caller's promise; the arrays live until SPI_finish.
    unsafe {
        run_as.check_function(function, &after_flush.signature);
        let plan = statements.after_flush.get(&sql, &mut [ids_type, pg_sys::TIMESTAMPTZARRAYOID]);
        run_as.check_plan(plan, Expect::Function(function));
        let rc = pg_sys::SPI_execute_plan(plan, flushed.as_mut_ptr(), std::ptr::null(), false, 0);
        if rc < 0 {
            error!("the after_flush call of a wsusage flush returned SPI code {rc}");
        }
    }
    IN_AFTER_FLUSH.with(|flag| flag.set(false));
}
