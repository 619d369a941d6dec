//! The SQL functions. All are VOLATILE and PARALLEL UNSAFE: they act on shared state, not data.

use std::time::Instant;

use pgrx::prelude::*;
use pgrx::{Array, Uuid};

use crate::clock;
use crate::memory::key::{self, Kind};
use crate::memory::layout;
use crate::memory::message;
use crate::settings;
use crate::sql::access::Access;
use crate::sql::availability::{check_active_here, this_database, Unavailable};
use crate::sql::flush_errors::FlushError;
use crate::sql::mark_errors::MarkRefused;
use crate::sql::report::Report;
use crate::sql::resolve;
use crate::state::pending::{self, MarkError, Marking};
use crate::state::rendezvous::{self, Lookup, Request};

/// The target `wsusage_mark(uuid)` and `wsusage_mark_many(uuid[])` mark.
pub const DEFAULT_TARGET: &str = "default";

/// Record that a workspace (a key of the `default` target) was used now. Not transactional:
/// the mark stands even if the caller's transaction rolls back.
#[pg_extern(volatile, parallel_unsafe)]
fn wsusage_mark(workspace_id: Option<Uuid>) {
    const FUNCTION: &str = "wsusage_mark";
    check_active_here(FUNCTION, "mark usage");
    let Some(id) = workspace_id else { MarkRefused::NullId { element: None }.raise(FUNCTION) };
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
    let Some(id) = id else { MarkRefused::NullId { element: None }.raise(FUNCTION) };
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
    let Some(id) = id else { MarkRefused::NullId { element: None }.raise(FUNCTION) };
    mark(target, Kind::Bigint, &[key::from_bigint(id)], FUNCTION);
}

/// Record that each key of `ids` of `target`, whose key column is `bigint` or `integer`, was
/// used now; all or, on a NULL element, none.
#[pg_extern(volatile, parallel_unsafe)]
fn wsusage_mark_many_bigint(target: Option<&str>, ids: Option<Array<i64>>) {
    const FUNCTION: &str = "wsusage_mark_many_bigint";
    check_active_here(FUNCTION, "mark usage");
    let target = target_name(target, FUNCTION);
    let Some(array) = ids else { MarkRefused::NullId { element: None }.raise(FUNCTION) };
    let mut keys = Vec::with_capacity(array.len());
    for (i, element) in array.iter().enumerate() {
        match element {
            Some(id) => keys.push(key::from_bigint(id)),
            None => MarkRefused::NullId { element: Some(i + 1) }.raise(FUNCTION),
        }
    }
    if !keys.is_empty() {
        mark(target, Kind::Bigint, &keys, FUNCTION);
    }
}

fn target_name<'a>(target: Option<&'a str>, function: &'static str) -> &'a str {
    target.unwrap_or_else(|| MarkRefused::NullTarget.raise(function))
}

/// The ids of a uuid array; raises on a NULL array or element.
fn uuids(array: Option<Array<Uuid>>, function: &'static str) -> Vec<[u8; 16]> {
    let Some(array) = array else { MarkRefused::NullId { element: None }.raise(function) };
    let mut ids = Vec::with_capacity(array.len());
    for (i, element) in array.iter().enumerate() {
        match element {
            Some(id) => ids.push(*id.as_bytes()),
            None => MarkRefused::NullId { element: Some(i + 1) }.raise(function),
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
        Request::NotPreloaded => Unavailable::NotPreloaded.raise(FUNCTION),
    };
    let Some(cv) = layout::flushed_cv() else { Unavailable::NotPreloaded.raise(FUNCTION) };
    let mut launcher_absent_since: Option<Instant> = None;
    // SAFETY: our condition variable in shared memory; every exit path below cancels the sleep
    // (and an ERROR from check_for_interrupts! is cleaned up by transaction abort).
    unsafe { pg_sys::ConditionVariablePrepareToSleep(cv) };
    let outcome = loop {
        let failure: Option<Box<dyn Report>> = match rendezvous::lookup(database, request) {
            Lookup::Done(outcome) => break outcome,
            Lookup::Waiting { launcher_attached: true } => {
                launcher_absent_since = None;
                None
            }
            Lookup::Waiting { launcher_attached: false } => {
                let since = *launcher_absent_since.get_or_insert_with(Instant::now);
                let waited = settings::launcher_wait();
                (since.elapsed() >= waited)
                    .then(|| Box::new(FlushError::LauncherNotRunning { waited }) as Box<dyn Report>)
            }
            Lookup::Forgotten => Some(Box::new(FlushError::FlushOutcomeLost)),
            Lookup::NotPreloaded => Some(Box::new(Unavailable::NotPreloaded)),
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
        FlushError::FlushFailed { sqlstate: outcome.sqlstate, message }.raise(FUNCTION);
    }
    if outcome.held_back > 0 {
        FlushError::HeldBack { held_back: outcome.held_back }.warn(FUNCTION);
    }
    i64::try_from(outcome.ids).unwrap_or(i64::MAX)
}

fn mark(target: &str, kind: Kind, ids: &[[u8; 16]], function: &'static str) {
    resolve::with_target(target, kind, Access::Mark, function, |target| {
        // The time of the call (clock_timestamp()), not the transaction's start.
        let now = clock::now();
        let mut marking = Marking { database: this_database(), name: &target.name, slot: &mut target.slot, kind };
        match pending::mark_all(&mut marking, ids, now) {
            Ok(()) => {}
            Err(MarkError::NotPreloaded) => Unavailable::NotPreloaded.raise(function),
            Err(MarkError::NoSlot) => {
                MarkRefused::TooManyDatabases { capacity: settings::max_databases() }.raise(function)
            }
            Err(MarkError::NoTargetSlot) => {
                MarkRefused::TooManyTargets { capacity: settings::max_targets() }.raise(function)
            }
            Err(MarkError::Full { marked }) => {
                MarkRefused::SetFull { capacity: settings::max_pending(), marked, requested: ids.len() }.raise(function)
            }
            Err(MarkError::Stuck { stuck, marked }) => {
                MarkRefused::Stuck { stuck, marked, requested: ids.len() }.raise(function)
            }
        }
    })
}
