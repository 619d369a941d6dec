//! Finding, claiming and giving up a database's slot (see `memory::database_slot`), and the launcher's requests
//! to a database's worker. Functions taking a view run under the wsusage lock (see `memory::layout`); the
//! others take it themselves. [`is_being_changed`] tells a worker, or the launcher, when a DDL
//! command waits for the database's sessions to leave.

use std::sync::atomic::{AtomicUsize, Ordering};

use pgrx::pg_sys;

use crate::memory::database_slot::DatabaseSlot;
use crate::memory::layout::{self, ViewMut};

/// The slots serving a database.
pub fn in_use(slots: &[DatabaseSlot]) -> impl Iterator<Item = &DatabaseSlot> {
    slots.iter().filter(|slot| slot.in_use())
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
pub fn find(slots: &[DatabaseSlot], database: pg_sys::Oid) -> Option<usize> {
    let cached = LAST_FOUND.load(Ordering::Relaxed);
    if slots.get(cached).is_some_and(|slot| slot.database == database) {
        return Some(cached);
    }
    let found = slots.iter().position(|slot| slot.database == database)?;
    LAST_FOUND.store(found, Ordering::Relaxed);
    Some(found)
}

/// Index of `database`'s slot, claiming a free or idle one if it has none; `None` when every
/// slot serves another database that still needs it.
pub fn claim(state: &mut ViewMut<'_>, database: pg_sys::Oid, now: i64) -> Option<usize> {
    if let Some(index) = find(state.slots, database) {
        return Some(index);
    }
    let free = state.slots.iter().position(|slot| !slot.in_use());
    let index = free.or_else(|| state.slots.iter().position(DatabaseSlot::is_idle))?;
    if state.slots[index].in_use() {
        retire_marks(state, index);
    }
    let ticket = state.header.new_declarations_ticket();
    state.slots[index].assign(database, now, ticket);
    LAST_FOUND.store(index, Ordering::Relaxed);
    Some(index)
}

/// Give the slot back.
pub fn free(state: &mut ViewMut<'_>, index: usize) {
    retire_marks(state, index);
    state.slots[index].database = pg_sys::InvalidOid;
}

/// Move the marks counted in a slot being given up into the totals' own count.
fn retire_marks(state: &mut ViewMut<'_>, index: usize) {
    state.header.stats.marks += state.slots[index].marks.take();
}

/// Ask the worker of `database` to give its place up (launcher only); it leaves unless its own
/// flush is due.
pub fn request_yield(database: pg_sys::Oid) {
    let latch = layout::with_exclusive(|state| {
        let index = find(state.slots, database)?;
        let slot = &mut state.slots[index];
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
    layout::with_shared(|state| find(state.slots, database).is_some_and(|index| state.slots[index].yield_requested))
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

/// A slot as the launcher sees it in one round.
pub struct SlotView {
    pub database: pg_sys::Oid,
    pub pending: u64,
    pub waiting: bool,
    pub worker_pid: i32,
    pub worker_latch: *mut pg_sys::Latch,
    pub worker_starts: u64,
    pub yield_requested: bool,
    pub interval_start: i64,
    pub extension_missing: bool,
}

/// What the launcher reads of each slot in use, copied under the lock into a buffer with a place
/// for each of `max_databases` slots.
pub fn views(max_databases: usize) -> Vec<SlotView> {
    let mut out = Vec::with_capacity(max_databases);
    layout::with_shared(|state| {
        for slot in in_use(state.slots) {
            // The buffer has a place per slot: no push allocates under the lock.
            out.push(SlotView {
                database: slot.database,
                pending: slot.pending(),
                waiting: slot.requests.waiting(),
                worker_pid: slot.worker_pid,
                worker_latch: slot.worker_latch,
                worker_starts: slot.worker_starts,
                yield_requested: slot.yield_requested,
                interval_start: slot.interval_start,
                extension_missing: slot.extension_missing(),
            });
        }
    });
    out
}
