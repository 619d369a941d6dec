//! The meeting point of `wsusage_flush()` callers and the worker.
//!
//! A caller takes a request number n (under the lock, after all of its marks are in the set) and
//! wakes the worker. The worker's next snapshot records the newest request it saw, m >= n; every
//! mark made before request n is in that snapshot. When the flush ends, the worker publishes an
//! outcome covering the requests (previous m, m] and broadcasts the condition variable; the
//! caller finds the one outcome covering n. Outcomes are kept in a ring, so a caller that wakes
//! late still finds its own, not a later flush's.

use std::ptr::null_mut;

use pgrx::pg_sys;

use crate::shmem::{self, FlushOutcome, Mode, MESSAGE_LEN, RECENT_FLUSHES};

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
    /// Not served yet; `worker_attached` tells whether a worker is there to serve it.
    Waiting {
        worker_attached: bool,
    },
    /// Served, but so many flushes completed since that its outcome left the ring.
    Forgotten,
    NotPreloaded,
}

/// Register a `wsusage_flush()` request and wake the worker. Returns the request number, or
/// `None` when not preloaded.
pub fn request() -> Option<u64> {
    let (request, latch) = shmem::with_lock(Mode::Exclusive, |locked| {
        locked.shared.requests += 1;
        (locked.shared.requests, locked.shared.worker_latch)
    })?;
    if !latch.is_null() {
        // SAFETY: a latch in a PGPROC, in shared memory for the server's lifetime.
        unsafe { pg_sys::SetLatch(latch) };
    }
    Some(request)
}

pub fn lookup(request: u64) -> Lookup {
    shmem::with_lock(Mode::Shared, |locked| {
        let shared = &*locked.shared;
        if shared.served < request {
            return Lookup::Waiting { worker_attached: shared.worker_pid != 0 };
        }
        let kept = shared.completed.min(RECENT_FLUSHES as u64);
        (0..kept)
            .map(|age| shared.recent[((shared.completed - 1 - age) % RECENT_FLUSHES as u64) as usize])
            .find(|outcome| outcome.after_request < request && request <= outcome.up_to_request)
            .map_or(Lookup::Forgotten, Lookup::Done)
    })
    .unwrap_or(Lookup::NotPreloaded)
}

/// Whether a `wsusage_flush()` request is waiting for a flush. Worker only.
pub fn flush_requested() -> bool {
    shmem::with_lock(Mode::Shared, |locked| locked.shared.requests > locked.shared.served).unwrap_or(false)
}

/// Publish the outcome of the flush whose snapshot covered requests up to `up_to_request`, and
/// wake every waiting caller. Worker only.
pub fn publish(up_to_request: u64, result: &Result) {
    let mut outcome =
        FlushOutcome { after_request: 0, up_to_request, ids: 0, failed: false, sqlstate: 0, message: [0; MESSAGE_LEN] };
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
        let shared = &mut *locked.shared;
        // A periodic tick that found nothing to do serves nobody: keep the ring for outcomes
        // that callers wait for.
        if outcome.ids == 0 && !outcome.failed && up_to_request <= shared.served {
            return false;
        }
        outcome.after_request = shared.served;
        shared.served = shared.served.max(up_to_request);
        shared.recent[(shared.completed % RECENT_FLUSHES as u64) as usize] = outcome;
        shared.completed += 1;
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

/// Announce this process as the worker: marks and requests now wake it. Worker only.
pub fn attach_worker() {
    shmem::with_lock(Mode::Exclusive, |locked| {
        // SAFETY: plain reads of this process's globals, set before any extension code runs.
        unsafe {
            locked.shared.worker_pid = pg_sys::MyProcPid;
            locked.shared.worker_latch = pg_sys::MyLatch;
        }
    });
}

/// Undo [`attach_worker`] if this process is still the one attached. Worker only.
pub fn detach_worker() {
    shmem::with_lock(Mode::Exclusive, |locked| {
        // SAFETY: a plain read of this process's pid.
        if locked.shared.worker_pid == unsafe { pg_sys::MyProcPid } {
            locked.shared.worker_pid = 0;
            locked.shared.worker_latch = null_mut();
        }
    });
}

/// Pid of the attached worker, or 0.
pub fn worker_pid() -> i32 {
    shmem::with_lock(Mode::Shared, |locked| locked.shared.worker_pid).unwrap_or(0)
}
