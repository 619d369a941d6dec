//! Counters for the DBA (`wsusage_stats`, `wsusage_stats_by_database`), kept in shared memory
//! under the wsusage lock, so they are exact however many backends mark at once. Each event is
//! counted twice: in the cluster-wide totals, which outlive databases, and in its database's
//! slot. Marks are the exception: counted in their database's slot only, in a counter striped
//! like the lock (see `stripes`), they join the totals' own count when the slot is given up, and
//! the totals add the slots in use when read. Every mark would otherwise change one more cache
//! line, and one that every marking backend shares.
//!
//! Definitions:
//! - `marks`: ids marked (a `wsusage_mark` call is one, a `wsusage_mark_many` call one per
//!   element), `rejected`: ids refused because the set (or every database slot) was full;
//! - a *flush* is one round of a database's worker that took ids from the set; it writes them in
//!   chunks of `wsusage.batch_size`, each its own transaction; `failures` counts failed chunks,
//!   `consecutive_failures` the rounds in a row with at least one failed chunk;
//! - `ids_flushed`: ids written by committed chunks, of which `rows_updated` changed a row and
//!   `ids_without_row` had no row (the rest had a newer time already);
//! - `ids_discarded`: pending ids of databases dropped before they were flushed.

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

use pgrx::pg_sys;

use crate::databases;
use crate::shmem::{self, Locked, Mode, MESSAGE_LEN};

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Stats {
    pub marks: u64,
    pub rejected: u64,
    pub flushes: u64,
    pub ids_flushed: u64,
    pub rows_updated: u64,
    pub ids_without_row: u64,
    pub ids_discarded: u64,
    pub failures: u64,
    pub consecutive_failures: u64,
    /// `TimestampTz`; 0 = never.
    pub last_flush_at: i64,
    pub last_flush_duration_us: i64,
    pub last_error_at: i64,
    /// NUL-terminated.
    pub last_error: [u8; MESSAGE_LEN],
    pub stats_reset: i64,
}

/// What one chunk of a flush did.
pub enum ChunkOutcome<'a> {
    Committed { ids: u64, rows_updated: u64, ids_without_row: u64 },
    Failed { message: &'a str },
}

/// Apply `update` to the totals and to `database`'s counters (if it has a slot). Caller must
/// hold the lock exclusively.
fn update_locked(locked: &mut Locked<'_>, slot: Option<usize>, mut update: impl FnMut(&mut Stats)) {
    update(&mut locked.shared.stats);
    if let Some(slot) = slot {
        update(&mut locked.slots[slot].stats);
    }
}

fn update(database: pg_sys::Oid, update: impl FnMut(&mut Stats)) {
    shmem::with_lock(Mode::Exclusive, |locked| {
        let slot = databases::find(locked, database);
        update_locked(locked, slot, update);
    });
}

/// Count marks accepted and refused by one call. Caller must hold the lock, in shared mode
/// being enough: markers holding it so count at the same time, atomically, and an exclusive
/// holder (who reads and writes the counters plainly) excludes them.
pub fn count_marks(locked: &mut Locked<'_>, slot: Option<usize>, accepted: usize, refused: usize) {
    let add = |counter: *mut u64, n: usize| {
        if n > 0 {
            // SAFETY: an 8-byte aligned counter in shared memory, changed only atomically while
            // the lock is shared (see above).
            unsafe { AtomicU64::from_ptr(counter).fetch_add(n as u64, AtomicOrdering::Relaxed) };
        }
    };
    add(&raw mut locked.shared.stats.rejected, refused);
    match slot {
        Some(slot) => {
            if accepted > 0 {
                locked.slots[slot].marks.add(accepted as u64);
            }
            add(&raw mut locked.slots[slot].stats.rejected, refused);
        }
        None => add(&raw mut locked.shared.stats.marks, accepted),
    }
}

/// Move the marks counted in a slot being given up into the totals' own count. Caller must
/// hold the lock exclusively.
pub fn retire_marks(locked: &mut Locked<'_>, slot: usize) {
    locked.shared.stats.marks += locked.slots[slot].marks.take();
}

/// Count ids discarded with their dropped database. Caller must hold the lock exclusively.
pub fn count_discarded(locked: &mut Locked<'_>, discarded: u64) {
    locked.shared.stats.ids_discarded += discarded;
}

pub fn record_chunk(database: pg_sys::Oid, outcome: &ChunkOutcome<'_>, now: i64) {
    update(database, |stats| match outcome {
        ChunkOutcome::Committed { ids, rows_updated, ids_without_row } => {
            stats.ids_flushed += ids;
            stats.rows_updated += rows_updated;
            stats.ids_without_row += ids_without_row;
        }
        ChunkOutcome::Failed { message } => {
            stats.failures += 1;
            stats.last_error_at = now;
            shmem::write_message(&mut stats.last_error, message);
        }
    });
}

/// Record a problem found outside a flush (the target checked at start or on reload, a worker
/// that could not start): it shows as `last_error` without counting as a failed flush.
pub fn record_problem(database: pg_sys::Oid, message: &str, now: i64) {
    update(database, |stats| {
        stats.last_error_at = now;
        shmem::write_message(&mut stats.last_error, message);
    });
}

/// Record the end of a flush round of `database`; returns its consecutive failed rounds so far.
pub fn record_flush(database: pg_sys::Oid, failed: bool, started_at: i64, now: i64) -> u64 {
    shmem::with_lock(Mode::Exclusive, |locked| {
        let slot = databases::find(locked, database);
        update_locked(locked, slot, |stats| {
            stats.flushes += 1;
            stats.last_flush_at = now;
            stats.last_flush_duration_us = now - started_at;
            stats.consecutive_failures = if failed { stats.consecutive_failures + 1 } else { 0 };
        });
        slot.map_or(0, |slot| locked.slots[slot].stats.consecutive_failures)
    })
    .unwrap_or(0)
}

pub fn consecutive_failures(database: pg_sys::Oid) -> u64 {
    shmem::with_lock(Mode::Shared, |locked| {
        databases::find(locked, database).map_or(0, |index| locked.slots[index].stats.consecutive_failures)
    })
    .unwrap_or(0)
}

/// The cluster-wide view.
pub struct Totals {
    pub stats: Stats,
    /// Databases with a slot (marks pending, or counters kept).
    pub databases: u64,
    /// Flush workers attached now.
    pub workers: u64,
    pub launcher_pid: i32,
}

pub fn totals() -> Option<Totals> {
    shmem::with_lock(Mode::Shared, |locked| {
        let in_use = || databases::in_use(locked);
        let mut stats = locked.shared.stats;
        stats.marks += in_use().map(|slot| slot.marks.sum()).sum::<u64>();
        // Across databases, "in a row" means the longest current run of any database.
        stats.consecutive_failures = in_use().map(|slot| slot.stats.consecutive_failures).max().unwrap_or(0);
        Totals {
            stats,
            databases: in_use().count() as u64,
            workers: in_use().filter(|slot| slot.worker_pid != 0).count() as u64,
            launcher_pid: locked.shared.launcher_pid,
        }
    })
}

/// One database's view.
pub struct DatabaseStats {
    pub database: pg_sys::Oid,
    pub pending: u64,
    pub worker_pid: i32,
    pub stats: Stats,
}

pub fn by_database() -> Option<Vec<DatabaseStats>> {
    // Collected under the lock into a buffer sized beforehand: nothing allocates under it.
    let mut out = Vec::with_capacity(crate::settings::max_databases());
    shmem::with_lock(Mode::Shared, |locked| {
        for slot in databases::in_use(locked) {
            out.push(DatabaseStats {
                database: slot.database,
                pending: slot.pending(),
                worker_pid: slot.worker_pid,
                stats: Stats { marks: slot.marks.sum(), ..slot.stats },
            });
        }
    })?;
    Some(out)
}

/// Zero every counter, cluster-wide and per database; `stats_reset` becomes `now`.
pub fn reset(now: i64) -> bool {
    shmem::with_lock(Mode::Exclusive, |locked| {
        locked.shared.stats = Stats::since(now);
        for slot in locked.slots.iter_mut() {
            slot.stats = Stats::since(now);
            slot.marks.clear();
        }
    })
    .is_some()
}

impl Stats {
    /// Every counter at zero, counting from `now` (`stats_reset`).
    pub const fn since(now: i64) -> Stats {
        Stats {
            marks: 0,
            rejected: 0,
            flushes: 0,
            ids_flushed: 0,
            rows_updated: 0,
            ids_without_row: 0,
            ids_discarded: 0,
            failures: 0,
            consecutive_failures: 0,
            last_flush_at: 0,
            last_flush_duration_us: 0,
            last_error_at: 0,
            last_error: [0; MESSAGE_LEN],
            stats_reset: now,
        }
    }
}
