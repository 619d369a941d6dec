//! The pending set: insert a mark, snapshot a database's entries for a flush, forget what a
//! flush wrote, discard what a dropped database left.
//!
//! A flush does not remove ids when it copies them out. It forgets an id only after its UPDATE
//! committed, and only if the id was not marked again meanwhile. So a failed flush has nothing
//! to put back (its ids never left, and newer marks merged into them as usual), and a full set
//! cannot refuse the re-queue of a failed batch, because there is no re-queue.

use std::sync::atomic::Ordering;

use pgrx::pg_sys;

use crate::databases;
use crate::pending_table::Inserted;
use crate::rendezvous;
use crate::settings;
use crate::shmem::{self, Locked, Mode, PendingEntry, PendingKey};
use crate::stats;

/// Fraction of `wsusage.max_pending` at which a mark wakes the launcher to flush early.
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
    /// Every database slot serves another database that still has marks pending.
    NoSlot,
}

/// Record that each id was used at `now` in `database` (keeping each id's latest time).
pub fn mark_all(database: pg_sys::Oid, ids: &[[u8; 16]], now: i64) -> Result<(), MarkError> {
    // Markers hold the lock in shared mode, new ids included (see `pending_table`): they never
    // wait for one another, nor for one descheduled while holding the lock. Only the first mark
    // of a database without a slot takes it exclusively, to claim one.
    let marked = shmem::with_lock(Mode::Shared, |locked| {
        databases::find(locked, database).map(|slot| mark_in(locked, slot, database, ids, now))
    });
    let (result, wake) = match marked {
        None => return Err(MarkError::NotPreloaded),
        Some(Some(marked)) => marked,
        Some(None) => shmem::with_lock(Mode::Exclusive, |locked| match databases::claim(locked, database, now) {
            Some(slot) => mark_in(locked, slot, database, ids, now),
            None => {
                stats::count_marks(locked, None, 0, ids.len());
                (Err(MarkError::NoSlot), None)
            }
        })
        .ok_or(MarkError::NotPreloaded)?,
    };
    if let Some(latch) = wake {
        // SAFETY: a latch in a PGPROC, in shared memory for the server's lifetime; setting a
        // latch whose process has gone is harmless.
        unsafe { pg_sys::SetLatch(latch) };
    }
    result
}

/// Mark `ids` in `database`, whose slot is `slot`; returns the outcome and the launcher's latch
/// when this mark must wake it. Caller must hold the lock, in shared mode being enough: the
/// table takes concurrent inserts, and the counts change atomically (see `shmem`).
fn mark_in(
    locked: &mut Locked<'_>,
    slot: usize,
    database: pg_sys::Oid,
    ids: &[[u8; 16]],
    now: i64,
) -> (Result<(), MarkError>, Option<*mut pg_sys::Latch>) {
    let mut added = 0;
    let mut outcome = Ok(());
    for (i, id) in ids.iter().enumerate() {
        match locked.pending.insert(&PendingKey { database, id: *id }, now) {
            Inserted::New => added += 1,
            Inserted::Existing => {}
            Inserted::Full => {
                outcome = Err(MarkError::Full { marked: i });
                break;
            }
        }
    }
    let accepted = match outcome {
        Err(MarkError::Full { marked }) => marked,
        _ => ids.len(),
    };
    stats::count_marks(locked, Some(slot), accepted, ids.len() - accepted);
    if added == 0 {
        return (outcome, None);
    }
    let was_empty = locked.slots[slot].pending.fetch_add(added, Ordering::Relaxed) == 0;
    // Only a new id can take the set past its high-water mark, or give a database without a
    // worker its first pending id, for which the launcher starts one.
    let wake = if was_empty && locked.slots[slot].worker_pid == 0 {
        Some(locked.shared.launcher_latch).filter(|latch| !latch.is_null())
    } else {
        take_high_water_wake(locked)
    };
    (outcome, wake)
}

/// The launcher's latch when this mark is the one that passed the high-water mark. Caller must
/// hold the lock (either mode).
fn take_high_water_wake(locked: &Locked<'_>) -> Option<*mut pg_sys::Latch> {
    let latch = locked.shared.launcher_latch;
    if latch.is_null() || locked.pending.len() < high_water_mark() {
        return None;
    }
    // Of the markers passing it at once, one wakes the launcher.
    (!locked.shared.high_water_wake_sent.swap(true, Ordering::Relaxed)).then_some(latch)
}

/// Number of ids pending in all databases, or `None` when not preloaded.
pub fn len() -> Option<usize> {
    shmem::with_lock(Mode::Shared, |locked| locked.pending.len())
}

/// Whether the set has passed its high-water mark and `database` holds at least an even share
/// of it (its pending ids times the databases with ids pending reach the set's size): flushing
/// it early then frees a fair part of the set, while a database with few ids does not flush in a
/// loop because another database's ids (failing to flush, say) keep the set full.
pub fn past_high_water_for(database: pg_sys::Oid) -> bool {
    shmem::with_lock(Mode::Shared, |locked| {
        let total = locked.pending.len();
        if total < high_water_mark() {
            return false;
        }
        let busy = databases::in_use(locked).filter(|slot| slot.pending() > 0).count();
        databases::find(locked, database)
            .is_some_and(|index| holds_even_share(locked.slots[index].pending(), busy as u64, total as u64))
    })
    .unwrap_or(false)
}

/// When the current interval of `database` started (`TimestampTz`), if it has a slot.
pub fn interval_start(database: pg_sys::Oid) -> Option<i64> {
    shmem::with_lock(Mode::Shared, |locked| {
        databases::find(locked, database).map(|index| locked.slots[index].interval_start)
    })
    .flatten()
}

/// Whether a database with `own` ids pending holds at least an even share of a set of `total`
/// ids spread over `busy` databases: the rule for flushing early past the high-water mark.
pub fn holds_even_share(own: u64, busy: u64, total: u64) -> bool {
    own.saturating_mul(busy.max(1)) >= total
}

/// Number of ids of `database` pending.
pub fn len_of(database: pg_sys::Oid) -> usize {
    shmem::with_lock(Mode::Shared, |locked| {
        databases::find(locked, database).map_or(0, |index| locked.slots[index].pending() as usize)
    })
    .unwrap_or(0)
}

/// Copy the entries of `database` (every database: `None`) into `out` (cleared first). Returns
/// false, with `out` incomplete, when `out` has not the capacity for all of them: the copy never
/// allocates under the lock, and while the lock is shared markers may add entries during the
/// copy. Caller must hold the lock (either mode).
fn copy_locked(locked: &Locked<'_>, database: Option<pg_sys::Oid>, out: &mut Vec<PendingEntry>) -> bool {
    out.clear();
    for entry in locked.pending.entries().filter(|entry| database.is_none_or(|database| entry.key.database == database))
    {
        if out.len() == out.capacity() {
            return false;
        }
        out.push(entry);
    }
    true
}

/// Copy the entries of `database` into `out`, whose capacity must be `max_pending` (the
/// worker's buffer), start the database's next interval at `now`, and return the newest
/// `wsusage_flush()` request the copy covers.
pub fn snapshot(database: pg_sys::Oid, out: &mut Vec<PendingEntry>, now: i64) -> u64 {
    shmem::with_lock(Mode::Exclusive, |locked| {
        let copied = copy_locked(locked, Some(database), out);
        debug_assert!(copied, "the worker's buffer holds max_pending entries");
        locked.shared.high_water_wake_sent.store(false, Ordering::Relaxed);
        if let Some(index) = databases::find(locked, database) {
            locked.slots[index].interval_start = now;
        }
        rendezvous::newest_request(locked, database)
    })
    .unwrap_or(0)
}

/// A copy of the pending entries of `database`, for inspection; `None` when not preloaded.
pub fn entries(database: pg_sys::Oid) -> Option<Vec<PendingEntry>> {
    let mut out = Vec::new();
    loop {
        // Sized outside the lock, with room for the marks that may arrive meanwhile.
        out.reserve(len()? + 1024);
        if shmem::with_lock(Mode::Shared, |locked| copy_locked(locked, Some(database), &mut out))? {
            return Some(out);
        }
    }
}

/// Every pending entry, of every database. Postmaster only (see `persist`): the copy allocates,
/// and nothing else runs. The walk is bounded by the table (at most `max_pending` entries), so a
/// set damaged by a process killed in the middle of an insert (an immediate shutdown) cannot
/// keep the postmaster from exiting.
pub fn all_entries(locked: &Locked<'_>) -> Vec<PendingEntry> {
    let mut out = Vec::with_capacity(locked.pending.len().min(settings::max_pending()));
    out.extend(locked.pending.entries());
    out
}

/// Put saved entries back into the set, claiming their databases' slots; returns how many could
/// not be (set or slots full). Postmaster only (see `persist`).
pub fn restore(locked: &mut Locked<'_>, entries: &[PendingEntry], now: i64) -> usize {
    let mut refused = 0;
    for entry in entries {
        // No mark is made outside a database: such an entry could only come from a damaged file.
        let claimed = if entry.key.database == pg_sys::InvalidOid {
            None
        } else {
            databases::claim(locked, entry.key.database, now)
        };
        let Some(slot) = claimed else {
            refused += 1;
            continue;
        };
        match locked.pending.insert(&entry.key, entry.marked_at) {
            Inserted::New => *locked.slots[slot].pending.get_mut() += 1,
            Inserted::Existing => {}
            Inserted::Full => refused += 1,
        }
    }
    refused
}

/// Forget the entries a committed flush of `database` wrote, except those marked again since
/// the snapshot.
pub fn forget(database: pg_sys::Oid, written: &[PendingEntry]) {
    shmem::with_lock(Mode::Exclusive, |locked| {
        let mut forgotten = 0;
        for entry in written {
            if let Some(index) = locked.pending.find(&entry.key) {
                if locked.pending.entry(index).marked_at <= entry.marked_at {
                    locked.pending.remove_at(index);
                    forgotten += 1;
                }
            }
        }
        if let Some(index) = databases::find(locked, database) {
            let pending = locked.slots[index].pending.get_mut();
            *pending = pending.saturating_sub(forgotten);
        }
    });
}

/// Discard every entry of a database that no longer exists, and free its slot; returns how many
/// ids were discarded. Launcher only.
pub fn discard(database: pg_sys::Oid) -> u64 {
    shmem::with_lock(Mode::Exclusive, |locked| {
        let discarded = locked.pending.retain(|entry| entry.key.database != database);
        if let Some(index) = databases::find(locked, database) {
            stats::count_discarded(locked, discarded);
            databases::free(locked, index);
        }
        discarded
    })
    .unwrap_or(0)
}
