//! Every `wsusage.*` setting: private statics, typed getters, and one table of them that [`init`]
//! gives PostgreSQL (`registry`).
//!
//! The prefix is reserved, so a misspelt `wsusage.*` name in postgresql.conf is reported instead of
//! silently becoming a placeholder. The settings' table and column [`names`] are SQL
//! identifiers, parsed there; a [`nest_level`] of our own scopes what wsusage sets for a while.

pub mod names;
pub mod nest_level;
mod registry;

pub use registry::init;

use std::ffi::{c_char, CStr, CString};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use pgrx::guc::GucSetting;
use pgrx::pg_sys;
use pgrx::prelude::*;

use names::Target;

pub const FLUSH_INTERVAL_MS_DEFAULT: i32 = 60_000;
pub const FLUSH_INTERVAL_MS_MIN: i32 = 10;
/// One day: a longer interval is a misconfiguration (the marks would sit in memory for days).
pub const FLUSH_INTERVAL_MS_MAX: i32 = 86_400_000;

pub const MAX_PENDING_DEFAULT: i32 = 65_536;
pub const MAX_PENDING_MIN: i32 = 16;
/// 16M ids is about 1 GiB of shared memory; beyond that a shorter flush interval is the answer.
pub const MAX_PENDING_MAX: i32 = 16 * 1024 * 1024;

pub const MAX_DATABASES_DEFAULT: i32 = 64;
pub const MAX_DATABASES_MIN: i32 = 1;
pub const MAX_DATABASES_MAX: i32 = 4_096;

pub const MAX_TARGETS_DEFAULT: i32 = 256;
pub const MAX_TARGETS_MIN: i32 = 1;
/// A target's index in the pending set's keys is 16 bits.
pub const MAX_TARGETS_MAX: i32 = 32_767;

pub const MAX_WORKERS_DEFAULT: i32 = 4;
pub const MAX_WORKERS_MIN: i32 = 1;
/// PostgreSQL's own ceiling for max_worker_processes.
pub const MAX_WORKERS_MAX: i32 = 262_143;

pub const BATCH_SIZE_DEFAULT: i32 = 5_000;
pub const BATCH_SIZE_MIN: i32 = 1;
pub const BATCH_SIZE_MAX: i32 = 1_000_000;

pub const LOCK_TIMEOUT_MS_DEFAULT: i32 = 1_000;
pub const STATEMENT_TIMEOUT_MS_DEFAULT: i32 = 60_000;
/// One hour; 0 (no limit) is also accepted, as for PostgreSQL's own timeouts.
pub const TIMEOUT_MS_MAX: i32 = 3_600_000;

/// Three times the launcher's restart delay: a launcher that was just terminated comes back
/// within it.
pub const LAUNCHER_WAIT_MS_DEFAULT: i32 = 15_000;

/// Time between flushes of the pending set.
static FLUSH_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(FLUSH_INTERVAL_MS_DEFAULT);

/// If set, the only database where marks are accepted; empty: every database. A raw GUC
/// variable rather than a `GucSetting`, because it needs a check hook (an over-long name is
/// refused).
static mut DATABASE: *mut c_char = null_mut();

/// Capacity of the pending set, in distinct ids; sizes the shared memory at server start.
static MAX_PENDING: GucSetting<i32> = GucSetting::<i32>::new(MAX_PENDING_DEFAULT);

/// Databases that can have marks pending at once; sizes the shared memory at server start.
static MAX_DATABASES: GucSetting<i32> = GucSetting::<i32>::new(MAX_DATABASES_DEFAULT);
static MAX_TARGETS: GucSetting<i32> = GucSetting::<i32>::new(MAX_TARGETS_DEFAULT);

/// Flush workers (one per database) running at once.
static MAX_WORKERS: GucSetting<i32> = GucSetting::<i32>::new(MAX_WORKERS_DEFAULT);

/// Ids written per transaction.
static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(BATCH_SIZE_DEFAULT);

/// `lock_timeout` of the worker's transactions.
static LOCK_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(LOCK_TIMEOUT_MS_DEFAULT);

/// Longest a chunk's UPDATE may run.
static STATEMENT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(STATEMENT_TIMEOUT_MS_DEFAULT);
/// How long `wsusage_flush()` waits for a launcher to attach.
static LAUNCHER_WAIT_MS: GucSetting<i32> = GucSetting::<i32>::new(LAUNCHER_WAIT_MS_DEFAULT);

/// The role every flush runs as instead of the owner of each target's table; empty: the owner.
static mut ROLE: *mut c_char = null_mut();

/// The table the worker writes, and its two columns, in SQL identifier syntax (see `names`).
static mut TABLE: *mut c_char = null_mut();
static mut ID_COLUMN: *mut c_char = null_mut();
static mut TIMESTAMP_COLUMN: *mut c_char = null_mut();

/// Changed whenever `wsusage.table`, `wsusage.id_column` or `wsusage.timestamp_column` is set (in
/// this process: at start and on a reload), so that what a backend checked of the `default`
/// target is checked again.
static TARGET_GENERATION: AtomicU64 = AtomicU64::new(0);

#[pg_guard]
unsafe extern "C-unwind" fn target_changed(_newval: *const c_char, _extra: *mut std::ffi::c_void) {
    TARGET_GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// See [`TARGET_GENERATION`].
pub fn target_generation() -> u64 {
    TARGET_GENERATION.load(Ordering::Relaxed)
}

/// Refuse a database or role name longer than PostgreSQL's identifiers allow (empty means
/// "none"); the error is the detail for the user.
fn check_plain_name(value: &str) -> Result<(), String> {
    if value.len() >= pg_sys::NAMEDATALEN as usize {
        Err("Names are at most 63 bytes long.".into())
    } else {
        Ok(())
    }
}

/// Run `validate` on the candidate value of a string setting; on refusal, hand its reason to GUC
/// code as the error's detail.
///
/// # Safety
/// Called by PostgreSQL's GUC code with a valid (possibly NULL) string.
unsafe fn check_string(newval: *mut *mut c_char, validate: fn(&str) -> Result<(), String>) -> bool {
    // SAFETY: GUC code passes a pointer to the candidate value, a NUL-terminated string or NULL.
    let value = unsafe { (*newval).as_ref().map(|v| CStr::from_ptr(v)) }.unwrap_or(c"");
    match validate(&value.to_string_lossy()) {
        Ok(()) => true,
        Err(detail) => {
            let detail = CString::new(detail).unwrap_or_default();
            // SAFETY: the documented way for a check hook to explain a refusal: GUC code reads
            // this string (palloc'd in the current context) when it reports the error.
            unsafe { pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(detail.as_ptr()) };
            false
        }
    }
}

/// A GUC check hook (a C function pointer) that applies a validation to the candidate value.
macro_rules! string_check_hook {
    ($name:ident, $validate:expr) => {
        #[pg_guard]
        unsafe extern "C-unwind" fn $name(
            newval: *mut *mut c_char,
            _extra: *mut *mut std::ffi::c_void,
            _source: pg_sys::GucSource::Type,
        ) -> bool {
            // SAFETY: called by GUC code with its candidate value, as check_string requires.
            unsafe { check_string(newval, $validate) }
        }
    };
}

/// Whether the postmaster refused the configuration file's `wsusage.database` / `wsusage.role`
/// at start. PostgreSQL then keeps the default, with a WARNING; but the default is not what the
/// DBA asked for (every database; each table's owner rather than the role named), so wsusage
/// refuses to act on it instead (see [`refused`]). Set in the postmaster only, inherited by
/// every process it forks.
static DATABASE_REFUSED: AtomicBool = AtomicBool::new(false);
static ROLE_REFUSED: AtomicBool = AtomicBool::new(false);

/// A check that remembers, in the postmaster at start, that it refused a value. Only then: the
/// postmaster runs the check again at each reload, where a refused value of these settings
/// (which change only at a restart) leaves the value in force as it is — remembering that refusal
/// would refuse marks or flushes in every process started afterwards, for a value never in force.
fn check_remembered(value: &str, refused: &AtomicBool) -> Result<(), String> {
    let checked = check_plain_name(value);
    // SAFETY: plain reads of globals: whether this is the postmaster, and whether it is loading
    // the preloaded libraries, which is when it defines our settings from the configuration
    // file at start (a reload comes later).
    let at_start = unsafe { !pg_sys::IsUnderPostmaster && pg_sys::process_shared_preload_libraries_in_progress };
    if checked.is_err() && at_start {
        refused.store(true, Ordering::Relaxed);
    }
    checked
}

string_check_hook!(check_database, |value| check_remembered(value, &DATABASE_REFUSED));
string_check_hook!(check_role, |value| check_remembered(value, &ROLE_REFUSED));
string_check_hook!(check_table, |value| names::parse(value, 2).map(drop));
string_check_hook!(check_column, |value| names::parse(value, 1).map(drop));

/// The current value of a string setting defined above.
fn string_setting(variable: *const *mut c_char) -> String {
    // SAFETY: GUC code keeps the variable pointing at a valid NUL-terminated string (or NULL);
    // it changes only in this process's own configuration processing, never concurrently.
    unsafe { variable.read().as_ref().map(|v| CStr::from_ptr(v).to_string_lossy().into_owned()) }.unwrap_or_default()
}

#[cfg(feature = "pg14")]
fn reserve_prefix() {
    // SAFETY: called from _PG_init after our variables are defined, as the function requires.
    unsafe { pg_sys::EmitWarningsOnPlaceholders(c"wsusage".as_ptr()) }
}

#[cfg(not(feature = "pg14"))]
fn reserve_prefix() {
    // SAFETY: called from _PG_init after our variables are defined, as the function requires.
    unsafe { pg_sys::MarkGUCPrefixReserved(c"wsusage".as_ptr()) }
}

pub fn flush_interval() -> Duration {
    Duration::from_millis(u64::try_from(FLUSH_INTERVAL_MS.get()).unwrap_or(FLUSH_INTERVAL_MS_DEFAULT as u64))
}

/// `flush_interval` in microseconds, the unit of `TimestampTz`, to compare with mark times.
pub fn flush_interval_us() -> i64 {
    i64::try_from(flush_interval().as_micros()).unwrap_or(i64::MAX)
}

/// The one database wsusage is restricted to, if any.
pub fn database() -> Option<String> {
    Some(string_setting(&raw const DATABASE)).filter(|d| !d.is_empty())
}

pub fn max_databases() -> usize {
    usize::try_from(MAX_DATABASES.get()).unwrap_or(MAX_DATABASES_DEFAULT as usize)
}

pub fn max_targets() -> usize {
    usize::try_from(MAX_TARGETS.get()).unwrap_or(MAX_TARGETS_DEFAULT as usize)
}

pub fn max_workers() -> usize {
    usize::try_from(MAX_WORKERS.get()).unwrap_or(MAX_WORKERS_DEFAULT as usize)
}

pub fn batch_size() -> usize {
    usize::try_from(BATCH_SIZE.get()).unwrap_or(BATCH_SIZE_DEFAULT as usize).max(1)
}

pub fn lock_timeout_ms() -> i32 {
    LOCK_TIMEOUT_MS.get()
}

pub fn statement_timeout_ms() -> i32 {
    STATEMENT_TIMEOUT_MS.get()
}

pub fn launcher_wait() -> std::time::Duration {
    std::time::Duration::from_millis(u64::try_from(LAUNCHER_WAIT_MS.get()).unwrap_or(0))
}

/// The setting whose value the server refused at start, if any: with it, no mark is accepted
/// (`wsusage.database`) or no flush runs (`wsusage.role`) until it is fixed and the server
/// restarted.
pub fn refused() -> Option<&'static str> {
    if DATABASE_REFUSED.load(Ordering::Relaxed) {
        Some("wsusage.database")
    } else if ROLE_REFUSED.load(Ordering::Relaxed) {
        Some("wsusage.role")
    } else {
        None
    }
}

/// Why wsusage will not act on the default PostgreSQL put in place of a refused `setting`.
pub fn refused_detail(setting: &str) -> String {
    let instead = if setting == "wsusage.role" {
        "flushing as each table's owner instead of the role named"
    } else {
        "accepting marks in every database instead of the one named"
    };
    format!("PostgreSQL kept the default in its place, and acting on it would mean {instead}.")
}

/// The role flushes run as instead of each table's owner, if one is set.
pub fn role() -> Option<String> {
    Some(string_setting(&raw const ROLE)).filter(|r| !r.is_empty())
}

/// The table and columns the worker writes, parsed; the detail of the problem otherwise.
pub fn target() -> Result<Target, String> {
    Ok(Target {
        table: names::parse(&string_setting(&raw const TABLE), 2)?,
        id_column: names::parse(&string_setting(&raw const ID_COLUMN), 1)?,
        timestamp_column: names::parse(&string_setting(&raw const TIMESTAMP_COLUMN), 1)?,
    })
}

pub fn max_pending() -> usize {
    usize::try_from(MAX_PENDING.get()).unwrap_or(MAX_PENDING_DEFAULT as usize)
}
