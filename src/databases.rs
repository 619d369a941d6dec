//! Per-database state: one [`DatabaseSlot`] in shared memory for each database with marks.
//!
//! A slot is claimed by the first mark made in a database (or its first `wsusage_flush()`),
//! holds that database's pending count, flush worker, rendezvous and counters, and is recycled
//! when idle and another database needs one, or freed by the launcher once the database is
//! dropped. Functions taking a `Locked` run under the wsusage lock (see `shmem`); the others take
//! it themselves. [`is_being_changed`] tells a worker when a DDL command waits for it to leave
//! its database.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use pgrx::pg_sys;

use crate::rendezvous::Requests;
use crate::shmem::{self, Locked, Mode};
use crate::stats::{self, Stats};
use crate::stripes::StripedCounter;

#[repr(C)]
pub struct DatabaseSlot {
    /// The database this slot serves; `InvalidOid` when free.
    pub database: pg_sys::Oid,
    /// Ids of this database in the pending set; markers holding the lock in shared mode add to
    /// it atomically.
    pub pending: AtomicU64,
    /// Start of the database's current interval (`TimestampTz`): when the slot was claimed, then
    /// when each flush took its snapshot. The next flush is due one interval later.
    pub interval_start: i64,
    /// Pid of the flush worker connected to this database, 0 when none is attached.
    pub worker_pid: i32,
    /// That worker's latch, null when none is attached.
    pub worker_latch: *mut pg_sys::Latch,
    /// Incremented by every worker that attaches, so the launcher can tell a worker that ran from
    /// one that never got connected.
    pub worker_starts: u64,
    /// The launcher asks this database's worker to give its place to a database that is due.
    pub yield_requested: bool,
    pub requests: Requests,
    /// This database's counters, but for `marks`, which stays 0 here: see the next field.
    pub stats: Stats,
    /// Ids marked in this database, counted by markers holding the lock in shared mode, each in
    /// its stripe.
    pub marks: StripedCounter,
}

impl DatabaseSlot {
    /// Ids of this database in the pending set (markers may be adding to it).
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    fn in_use(&self) -> bool {
        self.database != pg_sys::InvalidOid
    }

    /// Nothing depends on this slot: it may be given to another database.
    fn is_idle(&self) -> bool {
        self.pending() == 0 && self.worker_pid == 0 && !self.requests.waiting()
    }
}

/// The slots serving a database. Caller must hold the lock (either mode).
pub fn in_use<'a>(locked: &'a Locked<'_>) -> impl Iterator<Item = &'a DatabaseSlot> {
    locked.slots.iter().filter(|slot| slot.in_use())
}

/// The name of `database`, or `None` when it does not exist (any more). Inside a transaction.
pub fn name(database: pg_sys::Oid) -> Option<String> {
    // SAFETY: a catalog lookup in the caller's transaction; get_database_name returns a palloc'd
    // copy, or NULL for a database that does not exist.
    unsafe {
        let name = pg_sys::get_database_name(database);
        (!name.is_null()).then(|| std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned())
    }
}

/// Index of this backend's slot, as last found: a backend's database never changes, so a mark
/// usually checks one slot instead of searching them all.
static LAST_FOUND: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Index of `database`'s slot. Caller must hold the lock (either mode).
pub fn find(locked: &Locked<'_>, database: pg_sys::Oid) -> Option<usize> {
    let cached = LAST_FOUND.load(Ordering::Relaxed);
    if locked.slots.get(cached).is_some_and(|slot| slot.database == database) {
        return Some(cached);
    }
    let found = locked.slots.iter().position(|slot| slot.database == database)?;
    LAST_FOUND.store(found, Ordering::Relaxed);
    Some(found)
}

/// Index of `database`'s slot, claiming a free or idle one if it has none; `None` when every
/// slot serves another database that still needs it. Caller must hold the lock exclusively.
pub fn claim(locked: &mut Locked<'_>, database: pg_sys::Oid, now: i64) -> Option<usize> {
    if let Some(index) = find(locked, database) {
        return Some(index);
    }
    let free = locked.slots.iter().position(|slot| !slot.in_use());
    let index = free.or_else(|| locked.slots.iter().position(DatabaseSlot::is_idle))?;
    if locked.slots[index].in_use() {
        stats::retire_marks(locked, index);
    }
    let slot = &mut locked.slots[index];
    slot.database = database;
    *slot.pending.get_mut() = 0;
    slot.interval_start = now;
    slot.worker_pid = 0;
    slot.worker_latch = std::ptr::null_mut();
    slot.worker_starts = 0;
    slot.yield_requested = false;
    slot.requests = Requests::new();
    slot.stats = Stats::since(now);
    slot.marks.clear();
    LAST_FOUND.store(index, Ordering::Relaxed);
    Some(index)
}

/// Give the slot back. Caller must hold the lock exclusively.
pub fn free(locked: &mut Locked<'_>, index: usize) {
    stats::retire_marks(locked, index);
    locked.slots[index].database = pg_sys::InvalidOid;
}

/// Ask the worker of `database` to give its place up (launcher only); it leaves unless its own
/// flush is due.
pub fn request_yield(database: pg_sys::Oid) {
    let latch = shmem::with_lock(Mode::Exclusive, |locked| {
        let index = find(locked, database)?;
        let slot = &mut locked.slots[index];
        slot.yield_requested = true;
        Some(slot.worker_latch).filter(|latch| !latch.is_null())
    });
    if let Some(Some(latch)) = latch {
        // SAFETY: a latch in a PGPROC, in shared memory for the server's lifetime.
        unsafe { pg_sys::SetLatch(latch) };
    }
}

/// Whether the launcher asked the worker of `database` to give its place up.
pub fn yield_requested(database: pg_sys::Oid) -> bool {
    shmem::with_lock(Mode::Shared, |locked| {
        find(locked, database).is_some_and(|index| locked.slots[index].yield_requested)
    })
    .unwrap_or(false)
}

/// Whether DROP DATABASE, ALTER DATABASE (RENAME, SET TABLESPACE) or CREATE DATABASE … TEMPLATE
/// is waiting for the sessions of `database` to leave. Each holds a lock on the database that
/// conflicts with the one every session takes when it connects (RowExclusiveLock), then waits
/// a few seconds for the others to go; probing for that lock, without waiting, tells us.
pub fn is_being_changed(database: pg_sys::Oid) -> bool {
    // SET_LOCKTAG_OBJECT for a shared object, as LockSharedObject builds it.
    let tag = pg_sys::LOCKTAG {
        locktag_field1: pg_sys::InvalidOid.to_u32(),
        locktag_field2: pg_sys::DatabaseRelationId.to_u32(),
        locktag_field3: database.to_u32(),
        locktag_field4: 0,
        locktag_type: pg_sys::LockTagType::LOCKTAG_OBJECT as u8,
        locktag_lockmethodid: pg_sys::DEFAULT_LOCKMETHOD as u8,
    };
    let mode = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
    // SAFETY: a session-level lock (no transaction needed), taken without waiting and released
    // at once when granted.
    unsafe {
        if pg_sys::LockAcquire(&tag, mode, true, true) == pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL {
            return true;
        }
        pg_sys::LockRelease(&tag, mode, true);
    }
    false
}
