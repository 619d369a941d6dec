//! The SQL functions. All are VOLATILE and PARALLEL UNSAFE: they act on shared state, not data.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use pgrx::prelude::*;
use pgrx::{Array, Uuid};

use crate::clock;
use crate::errors::{self, UsageError};
use crate::memory::key::{self, Kind};
use crate::memory::layout;
use crate::memory::message;
use crate::settings;
use crate::sql::resolve;
use crate::state::databases;
use crate::state::pending::{self, MarkError, Marking};
use crate::state::rendezvous::{self, Lookup, Request};

/// The target `wsusage_mark(uuid)` and `wsusage_mark_many(uuid[])` mark.
const DEFAULT_TARGET: &str = "default";

/// How long `wsusage_flush()` waits for the launcher to attach before giving up. Longer than the
/// launcher's restart delay, so a launcher that was just terminated comes back within it.
const LAUNCHER_ATTACH_WAIT: Duration = Duration::from_secs(15);

/// Record that a workspace (a key of the `default` target) was used now. Not transactional:
/// the mark stands even if the caller's transaction rolls back.
#[pg_extern(volatile, parallel_unsafe)]
fn wsusage_mark(workspace_id: Option<Uuid>) {
    const FUNCTION: &str = "wsusage_mark";
    check_active_here(FUNCTION, "mark usage");
    let Some(id) = workspace_id else { UsageError::NullId { element: None }.raise(FUNCTION) };
    mark(DEFAULT_TARGET, Kind::Uuid, &[*id.as_bytes()], FUNCTION);
}

/// Record that each workspace of the array (keys of the `default` target) was used now; an
/// empty array does nothing. Either every id is marked or, on a NULL element, none.
#[pg_extern(volatile, parallel_unsafe)]
fn wsusage_mark_many(workspace_ids: Option<Array<Uuid>>) {
    const FUNCTION: &str = "wsusage_mark_many";
    check_active_here(FUNCTION, "mark usage");
    let ids = uuids(workspace_ids, FUNCTION);
    if !ids.is_empty() {
        mark(DEFAULT_TARGET, Kind::Uuid, &ids, FUNCTION);
    }
}

/// Record that key `id` of `target` (a row of `wsusage_target`, or `default`) was used now.
#[pg_extern(name = "wsusage_mark", volatile, parallel_unsafe)]
fn wsusage_mark_target(target: Option<&str>, id: Option<Uuid>) {
    const FUNCTION: &str = "wsusage_mark";
    check_active_here(FUNCTION, "mark usage");
    let target = target_name(target, FUNCTION);
    let Some(id) = id else { UsageError::NullId { element: None }.raise(FUNCTION) };
    mark(target, Kind::Uuid, &[*id.as_bytes()], FUNCTION);
}

/// Record that each key of `ids` of `target` was used now; all or, on a NULL element, none.
#[pg_extern(name = "wsusage_mark_many", volatile, parallel_unsafe)]
fn wsusage_mark_many_target(target: Option<&str>, ids: Option<Array<Uuid>>) {
    const FUNCTION: &str = "wsusage_mark_many";
    check_active_here(FUNCTION, "mark usage");
    let target = target_name(target, FUNCTION);
    let ids = uuids(ids, FUNCTION);
    if !ids.is_empty() {
        mark(target, Kind::Uuid, &ids, FUNCTION);
    }
}

/// Record that key `id` of `target`, whose key column is `bigint` or `integer`, was used now.
#[pg_extern(volatile, parallel_unsafe)]
fn wsusage_mark_bigint(target: Option<&str>, id: Option<i64>) {
    const FUNCTION: &str = "wsusage_mark_bigint";
    check_active_here(FUNCTION, "mark usage");
    let target = target_name(target, FUNCTION);
    let Some(id) = id else { UsageError::NullId { element: None }.raise(FUNCTION) };
    mark(target, Kind::Bigint, &[key::from_bigint(id)], FUNCTION);
}

/// Record that each key of `ids` of `target`, whose key column is `bigint` or `integer`, was
/// used now; all or, on a NULL element, none.
#[pg_extern(volatile, parallel_unsafe)]
fn wsusage_mark_many_bigint(target: Option<&str>, ids: Option<Array<i64>>) {
    const FUNCTION: &str = "wsusage_mark_many_bigint";
    check_active_here(FUNCTION, "mark usage");
    let target = target_name(target, FUNCTION);
    let Some(array) = ids else { UsageError::NullId { element: None }.raise(FUNCTION) };
    let mut keys = Vec::with_capacity(array.len());
    for (i, element) in array.iter().enumerate() {
        match element {
            Some(id) => keys.push(key::from_bigint(id)),
            None => UsageError::NullId { element: Some(i + 1) }.raise(FUNCTION),
        }
    }
    if !keys.is_empty() {
        mark(target, Kind::Bigint, &keys, FUNCTION);
    }
}

fn target_name<'a>(target: Option<&'a str>, function: &'static str) -> &'a str {
    target.unwrap_or_else(|| UsageError::NullTarget.raise(function))
}

/// The ids of a uuid array; raises on a NULL array or element.
fn uuids(array: Option<Array<Uuid>>, function: &'static str) -> Vec<[u8; 16]> {
    let Some(array) = array else { UsageError::NullId { element: None }.raise(function) };
    let mut ids = Vec::with_capacity(array.len());
    for (i, element) in array.iter().enumerate() {
        match element {
            Some(id) => ids.push(*id.as_bytes()),
            None => UsageError::NullId { element: Some(i + 1) }.raise(function),
        }
    }
    ids
}

/// Wake this database's worker, wait until a flush holding every mark made here before this
/// call has committed, and return the number of distinct ids that flush took from the pending
/// set (0 at once when nothing of this database is pending).
#[pg_extern(volatile, parallel_unsafe)]
fn wsusage_flush() -> i64 {
    const FUNCTION: &str = "wsusage_flush";
    check_active_here(FUNCTION, "flush usage");
    let database = this_database();
    let request = match rendezvous::request(database) {
        Request::Made(request) => request,
        Request::NothingPending => return 0,
        Request::NotPreloaded => UsageError::NotPreloaded.raise(FUNCTION),
    };
    let Some(cv) = layout::flushed_cv() else { UsageError::NotPreloaded.raise(FUNCTION) };
    let mut launcher_absent_since: Option<Instant> = None;
    // SAFETY: our condition variable in shared memory; every exit path below cancels the sleep
    // (and an ERROR from check_for_interrupts! is cleaned up by transaction abort).
    unsafe { pg_sys::ConditionVariablePrepareToSleep(cv) };
    let outcome = loop {
        let failure = match rendezvous::lookup(database, request) {
            Lookup::Done(outcome) => break outcome,
            Lookup::Waiting { launcher_attached: true } => {
                launcher_absent_since = None;
                None
            }
            Lookup::Waiting { launcher_attached: false } => {
                let since = *launcher_absent_since.get_or_insert_with(Instant::now);
                (since.elapsed() >= LAUNCHER_ATTACH_WAIT)
                    .then_some(UsageError::LauncherNotRunning { waited: LAUNCHER_ATTACH_WAIT })
            }
            Lookup::Forgotten => Some(UsageError::FlushOutcomeLost),
            Lookup::NotPreloaded => Some(UsageError::NotPreloaded),
        };
        if let Some(error) = failure {
            // SAFETY: we prepared to sleep on the CV above.
            unsafe { pg_sys::ConditionVariableCancelSleep() };
            error.raise(FUNCTION);
        }
        // SAFETY: sleeping on our CV, prepared above; wakes on broadcast, timeout or latch.
        unsafe { pg_sys::ConditionVariableTimedSleep(cv, 1000, pg_sys::PG_WAIT_EXTENSION) };
        check_for_interrupts!();
    };
    // SAFETY: we prepared to sleep on the CV above.
    unsafe { pg_sys::ConditionVariableCancelSleep() };
    if outcome.failed {
        let message = message::read(&outcome.message);
        UsageError::FlushFailed { sqlstate: outcome.sqlstate, message }.raise(FUNCTION);
    }
    if outcome.held_back > 0 {
        UsageError::HeldBack { held_back: outcome.held_back }.warn(FUNCTION);
    }
    i64::try_from(outcome.ids).unwrap_or(i64::MAX)
}

fn mark(target: &str, kind: Kind, ids: &[[u8; 16]], function: &'static str) {
    resolve::with_target(target, kind, function, |target| {
        // The time of the call (clock_timestamp()), not the transaction's start.
        let now = clock::now();
        let mut marking = Marking { database: this_database(), name: &target.name, slot: &mut target.slot, kind };
        match pending::mark_all(&mut marking, ids, now) {
            Ok(()) => {}
            Err(MarkError::NotPreloaded) => UsageError::NotPreloaded.raise(function),
            Err(MarkError::NoSlot) => {
                UsageError::TooManyDatabases { capacity: settings::max_databases() }.raise(function)
            }
            Err(MarkError::NoTargetSlot) => {
                UsageError::TooManyTargets { capacity: settings::max_targets() }.raise(function)
            }
            Err(MarkError::Full { marked }) => {
                UsageError::SetFull { capacity: settings::max_pending(), marked, requested: ids.len() }.raise(function)
            }
            Err(MarkError::Stuck { stuck, marked }) => errors::report_stuck(stuck, function, marked, ids.len()),
        }
    })
}

/// Raise unless marks made here can be flushed: the library is preloaded, the server is not
/// in recovery, and `wsusage.database` does not restrict wsusage to another database.
fn check_active_here(function: &'static str, action: &'static str) {
    if !layout::is_ready() {
        UsageError::NotPreloaded.raise(function);
    }
    if in_recovery() {
        UsageError::InRecovery { action }.raise(function);
    }
    if let Some(setting @ "wsusage.database") = settings::refused() {
        UsageError::SettingRefused { setting }.raise(function);
    }
    if !in_allowed_database() {
        UsageError::WrongDatabase { current: current_database() }.raise(function);
    }
}

/// Recovery ends once and never comes back for a running server, so once this backend has seen
/// it over, the hot path skips the check.
static RECOVERY_OVER: AtomicBool = AtomicBool::new(false);

fn in_recovery() -> bool {
    if RECOVERY_OVER.load(Ordering::Relaxed) {
        return false;
    }
    // SAFETY: a plain query of the server's state.
    let in_recovery = unsafe { pg_sys::RecoveryInProgress() };
    if !in_recovery {
        RECOVERY_OVER.store(true, Ordering::Relaxed);
    }
    in_recovery
}

const UNKNOWN: u8 = 0;
const YES: u8 = 1;
const NO: u8 = 2;
/// Whether `wsusage.database` allows this backend's database; both are fixed for the backend's
/// life, so the answer is computed once.
static IN_ALLOWED_DATABASE: AtomicU8 = AtomicU8::new(UNKNOWN);

fn in_allowed_database() -> bool {
    match IN_ALLOWED_DATABASE.load(Ordering::Relaxed) {
        YES => true,
        NO => false,
        _ => {
            let allowed = settings::database().is_none_or(|only| only == current_database());
            IN_ALLOWED_DATABASE.store(if allowed { YES } else { NO }, Ordering::Relaxed);
            allowed
        }
    }
}

/// This backend's database: marks made here are flushed here.
pub fn this_database() -> pg_sys::Oid {
    // SAFETY: a plain read of a global set once the backend is connected, as every caller of
    // our SQL functions is.
    unsafe { pg_sys::MyDatabaseId }
}

fn current_database() -> String {
    databases::name(this_database()).unwrap_or_default()
}
