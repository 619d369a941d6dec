//! The meeting point of `wsusage_flush()` callers and the flush worker of their database.
//!
//! A caller takes a request number n in its database's slot (under the lock, after all of its
//! marks are in the set) and wakes the launcher and that database's worker. The worker's next
//! snapshot records the newest request it saw, m >= n; every mark made before request n is in
//! that snapshot. When the flush ends, the worker publishes an outcome covering the requests
//! (previous m, m] and broadcasts the condition variable; the caller finds the one outcome
//! covering n. Outcomes are kept in a ring per database, so a caller that wakes late still finds
//! its own, not a later flush's. When no worker can serve a database (none could be started, or
//! the one started could not connect), the launcher publishes that failure the same way.

use std::ptr::null_mut;

use pgrx::pg_sys;

use crate::memory::layout::{self, View};
use crate::memory::message;
use crate::memory::requests::FlushOutcome;
use crate::state::databases;

/// How a flush ended, as the worker reports it.
pub enum Flushed {
    Applied { ids: u64, held_back: u64 },
    Failed { ids: u64, sqlstate: i32, message: String },
}

/// What a `wsusage_flush()` caller learns about its request.
// Built under the lock and returned by value once per wake-up; boxing the outcome would allocate
// under the lock.
#[allow(clippy::large_enum_variant)]
pub enum Lookup {
    Done(FlushOutcome),
    /// Not served yet; `launcher_attached` tells whether a launcher is there to serve it.
    Waiting {
        launcher_attached: bool,
    },
    /// Served, but so many flushes completed since that its outcome left the ring.
    Forgotten,
    NotPreloaded,
}

/// What [`request`] did.
pub enum Request {
    /// Nothing of this database is pending: there is nothing to wait for.
    NothingPending,
    Made(u64),
    NotPreloaded,
}

/// Register a `wsusage_flush()` request of `database` and wake the launcher and the database's
/// worker, if it has one.
pub fn request(database: pg_sys::Oid) -> Request {
    let made = layout::with_exclusive(|state| {
        let index = databases::find(state.slots, database)?;
        let slot = &mut state.slots[index];
        if slot.pending() == 0 {
            return None;
        }
        slot.requests.made += 1;
        Some((slot.requests.made, [state.header.launcher_latch, slot.worker_latch]))
    });
    match made {
        None => Request::NotPreloaded,
        Some(None) => Request::NothingPending,
        Some(Some((request, latches))) => {
            for latch in latches.into_iter().filter(|latch| !latch.is_null()) {
                // SAFETY: a latch in a PGPROC, in shared memory for the server's lifetime.
                unsafe { pg_sys::SetLatch(latch) };
            }
            Request::Made(request)
        }
    }
}

pub fn lookup(database: pg_sys::Oid, request: u64) -> Lookup {
    layout::with_shared(|state| {
        let launcher_attached = state.header.launcher_pid != 0;
        // A slot is recycled only when no caller waits on it: a missing slot has served us.
        let Some(index) = databases::find(state.slots, database) else { return Lookup::Forgotten };
        let requests = &state.slots[index].requests;
        if !requests.served(request) {
            return Lookup::Waiting { launcher_attached };
        }
        requests.outcome_of(request).map_or(Lookup::Forgotten, Lookup::Done)
    })
    .unwrap_or(Lookup::NotPreloaded)
}

/// The newest request of `database`, which a snapshot taken now covers. Caller must hold the
/// lock (either mode).
pub fn newest_request(state: &View<'_>, database: pg_sys::Oid) -> u64 {
    databases::find(state.slots, database).map_or(0, |index| state.slots[index].requests.made)
}

/// Whether a `wsusage_flush()` caller of `database` waits for a flush. Caller must hold the lock
/// (either mode).
pub fn waiting(state: &View<'_>, database: pg_sys::Oid) -> bool {
    databases::find(state.slots, database).is_some_and(|index| state.slots[index].requests.waiting())
}

/// Whether a `wsusage_flush()` caller of `database` waits for a flush.
pub fn flush_requested(database: pg_sys::Oid) -> bool {
    layout::with_shared(|state| waiting(state, database)).unwrap_or(false)
}

/// Publish the outcome of the flush of `database` whose snapshot covered requests up to
/// `up_to_request`, and wake every waiting caller.
pub fn publish(database: pg_sys::Oid, up_to_request: u64, result: &Flushed) {
    let mut outcome = FlushOutcome::NONE;
    outcome.up_to_request = up_to_request;
    match result {
        Flushed::Applied { ids, held_back } => {
            outcome.ids = *ids;
            outcome.held_back = *held_back;
        }
        Flushed::Failed { ids, sqlstate, message } => {
            outcome.ids = *ids;
            outcome.failed = true;
            outcome.sqlstate = *sqlstate;
            message::write(&mut outcome.message, message);
        }
    }
    let published = layout::with_exclusive(|state| {
        let Some(index) = databases::find(state.slots, database) else { return false };
        state.slots[index].requests.publish(outcome)
    });
    if published != Some(true) {
        return;
    }
    if let Some(cv) = layout::flushed_cv() {
        // SAFETY: our condition variable in shared memory, initialised at startup.
        unsafe { pg_sys::ConditionVariableBroadcast(cv) };
    }
}

/// Fail every request of `database` made so far: no worker could serve them. Launcher only.
pub fn fail_waiting(database: pg_sys::Oid, sqlstate: i32, message: &str) {
    let newest = layout::with_shared(|state| newest_request(state, database)).unwrap_or(0);
    publish(database, newest, &Flushed::Failed { ids: 0, sqlstate, message: message.to_owned() });
}

/// Announce this process as the flush worker of `database`: marks and requests now wake it.
/// Returns false when the database has no slot (nothing to flush) or another worker serves it.
pub fn attach_worker(database: pg_sys::Oid) -> bool {
    layout::with_exclusive(|state| {
        let Some(index) = databases::find(state.slots, database) else { return false };
        let slot = &mut state.slots[index];
        slot.worker_starts += 1;
        if slot.worker_pid != 0 {
            return false;
        }
        slot.yield_requested = false;
        // This worker finds out again whether the extension is there.
        *slot.extension_missing.get_mut() = false;
        // SAFETY: plain reads of this process's globals, set before any extension code runs.
        unsafe {
            slot.worker_pid = pg_sys::MyProcPid;
            slot.worker_latch = pg_sys::MyLatch;
        }
        true
    })
    .unwrap_or(false)
}

/// Undo [`attach_worker`] if this process is still the one attached.
pub fn detach_worker(database: pg_sys::Oid) {
    layout::with_exclusive(|state| {
        let Some(index) = databases::find(state.slots, database) else { return };
        let slot = &mut state.slots[index];
        // SAFETY: a plain read of this process's pid.
        if slot.worker_pid == unsafe { pg_sys::MyProcPid } {
            slot.worker_pid = 0;
            slot.worker_latch = null_mut();
        }
    });
}

/// Leave word that the worker of `database` leaves because the extension is not installed
/// there: the launcher starts no other until the database is marked in again.
pub fn detach_worker_for_missing_extension(database: pg_sys::Oid) {
    layout::with_exclusive(|state| {
        if let Some(index) = databases::find(state.slots, database) {
            *state.slots[index].extension_missing.get_mut() = true;
        }
    });
    detach_worker(database);
}

/// Announce this process as the launcher: marks past the high-water mark and flush requests now
/// wake it.
pub fn attach_launcher() {
    layout::with_exclusive(|state| {
        // SAFETY: plain reads of this process's globals, set before any extension code runs.
        unsafe {
            state.header.launcher_pid = pg_sys::MyProcPid;
            state.header.launcher_latch = pg_sys::MyLatch;
        }
    });
}

/// Undo [`attach_launcher`] if this process is still the one attached.
pub fn detach_launcher() {
    layout::with_exclusive(|state| {
        // SAFETY: a plain read of this process's pid.
        if state.header.launcher_pid == unsafe { pg_sys::MyProcPid } {
            state.header.launcher_pid = 0;
            state.header.launcher_latch = null_mut();
        }
    });
}
