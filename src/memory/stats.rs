//! The counters a DBA reads (`wsusage_stats`, `wsusage_stats_by_database`), as kept in shared
//! memory: once cluster-wide, in the layout's header, and once per database, in its slot.
//!
//! Definitions:
//! - `marks`: ids marked (a `wsusage_mark` call is one, a `wsusage_mark_many` call one per
//!   element), `rejected`: ids refused because the set (or every database slot) was full;
//! - a *flush* is one round of a database's worker that took ids from the set; it writes them in
//!   chunks of `wsusage.batch_size`, each its own transaction; `failures` counts failed chunks,
//!   `consecutive_failures` the rounds in a row with at least one failed chunk;
//! - `ids_flushed`: ids written by committed chunks, of which `rows_updated` changed a row and
//!   `ids_without_row` had no row (the rest had a newer time already);
//! - `ids_skipped_by_min_change`: ids whose row was written less than the target's
//!   `min_change` before the mark (or on the mark's day, for a date column): done, not written;
//! - `ids_skipped_locked`: ids a committed chunk skipped because another transaction held their
//!   row locked; they stayed pending for the next flush;
//! - `ids_discarded`: pending ids of databases dropped, or targets deleted, before they were
//!   flushed;
//! - `held_back` (not kept here: read from the pool, see `held_back`): ids whose own row makes the
//!   UPDATE fail, isolated from the others and retried at a slowing pace. Each isolation counts
//!   as a failure.
//!
//! Markers count with the lock in shared mode, so what they count (`marks`, `rejected`) is kept
//! beside this struct in atomics (see `database_slot` and `layout`), and filled into a copy of it when read.

use crate::memory::message::{self, Message};

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Stats {
    pub marks: u64,
    pub rejected: u64,
    pub flushes: u64,
    pub ids_flushed: u64,
    pub rows_updated: u64,
    pub ids_without_row: u64,
    pub ids_skipped_locked: u64,
    pub ids_skipped_by_min_change: u64,
    pub ids_discarded: u64,
    pub failures: u64,
    pub consecutive_failures: u64,
    /// `TimestampTz`; 0 = never.
    pub last_flush_at: i64,
    pub last_flush_duration_us: i64,
    pub last_error_at: i64,
    pub last_error: Message,
    pub stats_reset: i64,
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
            ids_skipped_locked: 0,
            ids_skipped_by_min_change: 0,
            ids_discarded: 0,
            failures: 0,
            consecutive_failures: 0,
            last_flush_at: 0,
            last_flush_duration_us: 0,
            last_error_at: 0,
            last_error: message::EMPTY,
            stats_reset: now,
        }
    }

    /// Record a problem: `last_error` and its time.
    pub fn record_error(&mut self, message: &str, now: i64) {
        self.last_error_at = now;
        message::write(&mut self.last_error, message);
    }
}
