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

use crate::databases;
use crate::shmem::{self, Locked, Mode, MESSAGE_LEN, RECENT_FLUSHES};

/// What one flush did, as `wsusage_flush()` callers see it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlushOutcome {
    /// The flush covers the requests numbered `(after_request, up_to_request]`.
    pub after_request: u64,
    pub up_to_request: u64,
    /// Distinct ids the flush took from the set.
    pub ids: u64,
    pub failed: bool,
    /// SQLSTATE of the failure, as PostgreSQL packs it (`MAKE_SQLSTATE`).
    pub sqlstate: i32,
    /// NUL-terminated error message of the failure.
    pub message: [u8; MESSAGE_LEN],
}

const NO_OUTCOME: FlushOutcome =
    FlushOutcome { after_request: 0, up_to_request: 0, ids: 0, failed: false, sqlstate: 0, message: [0; MESSAGE_LEN] };

/// One database's requests and recent outcomes, in its slot.
#[repr(C)]
pub struct Requests {
    /// Number of `wsusage_flush()` requests made in this database; request n is the n-th.
    pub made: u64,
    /// Every request numbered up to this was covered by a flush that has completed.
    pub served: u64,
    /// Number of outcomes published; `recent[completed % RECENT_FLUSHES]` is the next written.
    pub completed: u64,
    pub recent: [FlushOutcome; RECENT_FLUSHES],
}

impl Requests {
    pub const fn new() -> Self {
        Requests { made: 0, served: 0, completed: 0, recent: [NO_OUTCOME; RECENT_FLUSHES] }
    }

    /// A caller waits for a flush.
    pub fn waiting(&self) -> bool {
        self.made > self.served
    }
}

/// How a flush ended, as the worker reports it.
pub enum Result {
    Applied { ids: u64 },
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
    let made = shmem::with_lock(Mode::Exclusive, |locked| {
        let index = databases::find(locked, database)?;
        let slot = &mut locked.slots[index];
        if slot.pending() == 0 {
            return None;
        }
        slot.requests.made += 1;
        Some((slot.requests.made, [locked.shared.launcher_latch, slot.worker_latch]))
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
    shmem::with_lock(Mode::Shared, |locked| {
        let launcher_attached = locked.shared.launcher_pid != 0;
        // A slot is recycled only when no caller waits on it: a missing slot has served us.
        let Some(index) = databases::find(locked, database) else { return Lookup::Forgotten };
        let requests = &locked.slots[index].requests;
        if requests.served < request {
            return Lookup::Waiting { launcher_attached };
        }
        let kept = requests.completed.min(RECENT_FLUSHES as u64);
        (0..kept)
            .map(|age| requests.recent[((requests.completed - 1 - age) % RECENT_FLUSHES as u64) as usize])
            .find(|outcome| outcome.after_request < request && request <= outcome.up_to_request)
            .map_or(Lookup::Forgotten, Lookup::Done)
    })
    .unwrap_or(Lookup::NotPreloaded)
}

/// The newest request of `database`, which a snapshot taken now covers. Caller must hold the
/// lock (either mode).
pub fn newest_request(locked: &Locked<'_>, database: pg_sys::Oid) -> u64 {
    databases::find(locked, database).map_or(0, |index| locked.slots[index].requests.made)
}

/// Whether a `wsusage_flush()` caller of `database` waits for a flush.
pub fn flush_requested(database: pg_sys::Oid) -> bool {
    shmem::with_lock(Mode::Shared, |locked| {
        databases::find(locked, database).is_some_and(|index| locked.slots[index].requests.waiting())
    })
    .unwrap_or(false)
}

/// Publish the outcome of the flush of `database` whose snapshot covered requests up to
/// `up_to_request`, and wake every waiting caller.
pub fn publish(database: pg_sys::Oid, up_to_request: u64, result: &Result) {
    let mut outcome = NO_OUTCOME;
    outcome.up_to_request = up_to_request;
    match result {
        Result::Applied { ids } => outcome.ids = *ids,
        Result::Failed { ids, sqlstate, message } => {
            outcome.ids = *ids;
            outcome.failed = true;
            outcome.sqlstate = *sqlstate;
            shmem::write_message(&mut outcome.message, message);
        }
    }
    let published = shmem::with_lock(Mode::Exclusive, |locked| {
        let Some(index) = databases::find(locked, database) else { return false };
        let requests = &mut locked.slots[index].requests;
        // A periodic tick that found nothing to do serves nobody: keep the ring for outcomes
        // that callers wait for.
        if outcome.ids == 0 && !outcome.failed && up_to_request <= requests.served {
            return false;
        }
        outcome.after_request = requests.served;
        requests.served = requests.served.max(up_to_request);
        requests.recent[(requests.completed % RECENT_FLUSHES as u64) as usize] = outcome;
        requests.completed += 1;
        true
    });
    if published != Some(true) {
        return;
    }
    if let Some(cv) = shmem::flushed_cv() {
        // SAFETY: our condition variable in shared memory, initialised at startup.
        unsafe { pg_sys::ConditionVariableBroadcast(cv) };
    }
}

/// Fail every request of `database` made so far: no worker could serve them. Launcher only.
pub fn fail_waiting(database: pg_sys::Oid, sqlstate: i32, message: &str) {
    let newest = shmem::with_lock(Mode::Shared, |locked| newest_request(locked, database)).unwrap_or(0);
    publish(database, newest, &Result::Failed { ids: 0, sqlstate, message: message.to_owned() });
}

/// Announce this process as the flush worker of `database`: marks and requests now wake it.
/// Returns false when the database has no slot (nothing to flush) or another worker serves it.
pub fn attach_worker(database: pg_sys::Oid) -> bool {
    shmem::with_lock(Mode::Exclusive, |locked| {
        let Some(index) = databases::find(locked, database) else { return false };
        let slot = &mut locked.slots[index];
        slot.worker_starts += 1;
        if slot.worker_pid != 0 {
            return false;
        }
        slot.yield_requested = false;
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
    shmem::with_lock(Mode::Exclusive, |locked| {
        let Some(index) = databases::find(locked, database) else { return };
        let slot = &mut locked.slots[index];
        // SAFETY: a plain read of this process's pid.
        if slot.worker_pid == unsafe { pg_sys::MyProcPid } {
            slot.worker_pid = 0;
            slot.worker_latch = null_mut();
        }
    });
}

/// Announce this process as the launcher: marks past the high-water mark and flush requests now
/// wake it.
pub fn attach_launcher() {
    shmem::with_lock(Mode::Exclusive, |locked| {
        // SAFETY: plain reads of this process's globals, set before any extension code runs.
        unsafe {
            locked.shared.launcher_pid = pg_sys::MyProcPid;
            locked.shared.launcher_latch = pg_sys::MyLatch;
        }
    });
}

/// Undo [`attach_launcher`] if this process is still the one attached.
pub fn detach_launcher() {
    shmem::with_lock(Mode::Exclusive, |locked| {
        // SAFETY: a plain read of this process's pid.
        if locked.shared.launcher_pid == unsafe { pg_sys::MyProcPid } {
            locked.shared.launcher_pid = 0;
            locked.shared.launcher_latch = null_mut();
        }
    });
}
