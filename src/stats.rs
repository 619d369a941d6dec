//! Counters for the DBA (`wsusage_stats`), kept in shared memory under the wsusage lock, so they
//! are exact however many backends mark at once.
//!
//! Definitions:
//! - `marks`: ids marked (a `wsusage_mark` call is one, a `wsusage_mark_many` call one per
//!   element), `rejected`: ids refused because the set was full;
//! - a *flush* is one round of the worker that took ids from the set; it writes them in chunks of
//!   `wsusage.batch_size`, each its own transaction; `failures` counts failed chunks,
//!   `consecutive_failures` the rounds in a row with at least one failed chunk;
//! - `ids_flushed`: ids written by committed chunks, of which `rows_updated` changed a row and
//!   `ids_without_row` had no row (the rest had a newer time already).

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

/// Count marks accepted and refused by one call. Caller must hold the lock exclusively.
pub fn count_marks(locked: &mut Locked<'_>, accepted: usize, refused: usize) {
    let stats = &mut locked.shared.stats;
    stats.marks += accepted as u64;
    stats.rejected += refused as u64;
}

pub fn record_chunk(outcome: &ChunkOutcome<'_>, now: i64) {
    shmem::with_lock(Mode::Exclusive, |locked| {
        let stats = &mut locked.shared.stats;
        match outcome {
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
        }
    });
}

/// Record a problem found outside a flush (the target checked at start or on reload): it shows
/// as `last_error` without counting as a failed flush.
pub fn record_problem(message: &str, now: i64) {
    shmem::with_lock(Mode::Exclusive, |locked| {
        let stats = &mut locked.shared.stats;
        stats.last_error_at = now;
        shmem::write_message(&mut stats.last_error, message);
    });
}

/// Record the end of a flush round; returns the consecutive failed rounds so far.
pub fn record_flush(failed: bool, started_at: i64, now: i64) -> u64 {
    shmem::with_lock(Mode::Exclusive, |locked| {
        let stats = &mut locked.shared.stats;
        stats.flushes += 1;
        stats.last_flush_at = now;
        stats.last_flush_duration_us = now - started_at;
        stats.consecutive_failures = if failed { stats.consecutive_failures + 1 } else { 0 };
        stats.consecutive_failures
    })
    .unwrap_or(0)
}

pub fn consecutive_failures() -> u64 {
    shmem::with_lock(Mode::Shared, |locked| locked.shared.stats.consecutive_failures).unwrap_or(0)
}

pub fn read() -> Option<Stats> {
    shmem::with_lock(Mode::Shared, |locked| locked.shared.stats)
}

/// Zero every counter; `stats_reset` becomes `now`.
pub fn reset(now: i64) -> bool {
    shmem::with_lock(Mode::Exclusive, |locked| {
        locked.shared.stats = Stats { stats_reset: now, ..zeroed() };
    })
    .is_some()
}

pub const fn zeroed() -> Stats {
    Stats {
        marks: 0,
        rejected: 0,
        flushes: 0,
        ids_flushed: 0,
        rows_updated: 0,
        ids_without_row: 0,
        failures: 0,
        consecutive_failures: 0,
        last_flush_at: 0,
        last_flush_duration_us: 0,
        last_error_at: 0,
        last_error: [0; MESSAGE_LEN],
        stats_reset: 0,
    }
}
