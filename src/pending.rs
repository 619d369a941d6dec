//! The pending set: insert a mark, snapshot the set for a flush, forget what a flush wrote.
//!
//! A flush does not remove ids when it copies them out. It forgets an id only after its UPDATE
//! committed, and only if the id was not marked again meanwhile. So a failed flush has nothing
//! to put back (its ids never left, and newer marks merged into them as usual), and a full set
//! cannot refuse the re-queue of a failed batch, because there is no re-queue.

use std::ffi::c_void;
use std::ptr::null_mut;

use pgrx::pg_sys;

use crate::settings;
use crate::shmem::{self, Locked, Mode, PendingEntry};
use crate::stats;

/// Fraction of `wsusage.max_pending` at which a mark wakes the worker to flush early.
const HIGH_WATER_NUMERATOR: usize = 1;
const HIGH_WATER_DENOMINATOR: usize = 2;

pub fn high_water_mark() -> usize {
    (settings::max_pending() * HIGH_WATER_NUMERATOR / HIGH_WATER_DENOMINATOR).max(1)
}

/// Why [`mark_all`] stopped early.
pub enum MarkError {
    NotPreloaded,
    /// The set is full; `marked` ids (a prefix of the input) were recorded before it filled.
    Full {
        marked: usize,
    },
}

/// Record that each id was used at `now` (keeping each id's latest time).
pub fn mark_all(ids: &[[u8; 16]], now: i64) -> Result<(), MarkError> {
    let result = shmem::with_lock(Mode::Exclusive, |locked| {
        let mut added = false;
        for (i, id) in ids.iter().enumerate() {
            match insert(locked, id, now) {
                Inserted::New => added = true,
                Inserted::Existing => {}
                Inserted::Full => {
                    stats::count_marks(locked, i, ids.len() - i);
                    return (Err(MarkError::Full { marked: i }), None);
                }
            }
        }
        stats::count_marks(locked, ids.len(), 0);
        // Only a new id can take the set past its high-water mark.
        (Ok(()), if added { take_high_water_wake(locked) } else { None })
    });
    let Some((result, wake)) = result else {
        return Err(MarkError::NotPreloaded);
    };
    if let Some(latch) = wake {
        // SAFETY: a latch in a PGPROC, in shared memory for the server's lifetime; setting a
        // latch whose process has gone is harmless.
        unsafe { pg_sys::SetLatch(latch) };
    }
    result
}

enum Inserted {
    New,
    Existing,
    /// The set is full and the id is new: nothing was recorded.
    Full,
}

/// Insert or refresh one id. Caller must hold the lock exclusively.
fn insert(locked: &mut Locked<'_>, id: &[u8; 16], now: i64) -> Inserted {
    let mut found = false;
    // SAFETY: `pending` is our shared hash, keyed by 16 bytes, and we hold its lock exclusively.
    // HASH_ENTER_NULL returns NULL instead of raising when no entry is free.
    let entry = unsafe {
        pg_sys::hash_search(
            locked.pending,
            id.as_ptr().cast::<c_void>(),
            pg_sys::HASHACTION::HASH_ENTER_NULL,
            &mut found,
        )
        .cast::<PendingEntry>()
    };
    if entry.is_null() {
        return Inserted::Full;
    }
    // SAFETY: dynahash returned a valid entry; a new one has its key set and the rest unset.
    unsafe {
        if !found || (*entry).marked_at < now {
            (*entry).marked_at = now;
        }
    }
    if found {
        Inserted::Existing
    } else {
        Inserted::New
    }
}

/// The worker's latch when this mark is the one that passed the high-water mark.
/// Caller must hold the lock exclusively.
fn take_high_water_wake(locked: &mut Locked<'_>) -> Option<*mut pg_sys::Latch> {
    if locked.shared.high_water_wake_sent || len_locked(locked) < high_water_mark() {
        return None;
    }
    let latch = locked.shared.worker_latch;
    if latch.is_null() {
        return None;
    }
    locked.shared.high_water_wake_sent = true;
    Some(latch)
}

/// Caller must hold the lock (either mode).
fn len_locked(locked: &Locked<'_>) -> usize {
    // SAFETY: our shared hash, read under its lock.
    usize::try_from(unsafe { pg_sys::hash_get_num_entries(locked.pending) }).unwrap_or(0)
}

/// Number of ids pending, or `None` when not preloaded.
pub fn len() -> Option<usize> {
    shmem::with_lock(Mode::Shared, |locked| len_locked(locked))
}

/// Copy every pending entry into `out` (cleared first). Returns false, with `out` left empty,
/// when `out` has not the capacity for all of them: the copy never allocates under the lock.
/// Caller must hold the lock (either mode).
fn copy_locked(locked: &Locked<'_>, out: &mut Vec<PendingEntry>) -> bool {
    out.clear();
    if out.capacity() < len_locked(locked) {
        return false;
    }
    // SAFETY: HASH_SEQ_STATUS is plain data that hash_seq_init fills in.
    let mut scan: pg_sys::HASH_SEQ_STATUS = unsafe { std::mem::zeroed() };
    // SAFETY: a full scan of our shared hash under its lock; the scan runs to its end
    // (hash_seq_search returning NULL), which releases the scan's registration.
    unsafe { pg_sys::hash_seq_init(&mut scan, locked.pending) };
    loop {
        // SAFETY: as above.
        let entry = unsafe { pg_sys::hash_seq_search(&mut scan) }.cast::<PendingEntry>();
        if entry.is_null() {
            return true;
        }
        // SAFETY: dynahash hands out valid entries of our type; the capacity check above
        // guarantees the push does not allocate.
        out.push(unsafe { *entry });
    }
}

/// Copy every pending entry into `out`, whose capacity must be `max_pending` (the worker's
/// buffer), and return the newest `wsusage_flush()` request the copy covers.
pub fn snapshot(out: &mut Vec<PendingEntry>) -> u64 {
    shmem::with_lock(Mode::Exclusive, |locked| {
        let copied = copy_locked(locked, out);
        debug_assert!(copied, "the worker's buffer holds max_pending entries");
        locked.shared.high_water_wake_sent = false;
        locked.shared.requests
    })
    .unwrap_or(0)
}

/// A copy of the pending set, for inspection; `None` when not preloaded.
pub fn entries() -> Option<Vec<PendingEntry>> {
    let mut out = Vec::new();
    loop {
        // Sized outside the lock, with room for the marks that may arrive meanwhile.
        out.reserve(len()? + 1024);
        if shmem::with_lock(Mode::Shared, |locked| copy_locked(locked, &mut out))? {
            return Some(out);
        }
    }
}

/// Forget the entries a committed flush wrote, except those marked again since the snapshot.
pub fn forget(written: &[PendingEntry]) {
    shmem::with_lock(Mode::Exclusive, |locked| {
        for entry in written {
            let mut found = false;
            // SAFETY: lookup in our shared hash under its exclusive lock.
            let current = unsafe {
                pg_sys::hash_search(
                    locked.pending,
                    entry.id.as_ptr().cast::<c_void>(),
                    pg_sys::HASHACTION::HASH_FIND,
                    &mut found,
                )
                .cast::<PendingEntry>()
            };
            // SAFETY: a found entry is valid until removed, which only we do, below.
            if !current.is_null() && unsafe { (*current).marked_at } <= entry.marked_at {
                // SAFETY: removing an existing key under the exclusive lock.
                unsafe {
                    pg_sys::hash_search(
                        locked.pending,
                        entry.id.as_ptr().cast::<c_void>(),
                        pg_sys::HASHACTION::HASH_REMOVE,
                        null_mut(),
                    )
                };
            }
        }
    });
}
