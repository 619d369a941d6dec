//! Keys held back: pending keys whose own row makes the flush's UPDATE fail (a trigger or check
//! that raises for that row, a value the column refuses), isolated by splitting the failing chunk
//! (see `flush::round`). Each stays pending and is retried by the worker's rounds at a slowing pace — one
//! interval after the first failure, then 2, 4 … up to [`MAX_BACKOFF_INTERVALS`] — and at once by
//! a round a `wsusage_flush()` caller waits for (an operator who fixed the row), while every other
//! id is written at once; the error is shown by `wsusage_pending()` and the count by the stats.
//!
//! Kept in shared memory, in the layout's header, for backends to read: a fixed pool of
//! [`HELD_MAX`] places for the whole cluster, changed only with the lock held exclusively (by
//! the worker of the id's database) and read under either mode. Poison rows are rare; should
//! more be isolated than the pool holds, the extra ones are isolated again at every flush
//! (log2 of a chunk's size in statements each), never written wrong nor lost.

use pgrx::pg_sys;
use wsusage_pending_table::Key;

use crate::memory::message::{self, Message};

/// Places in the pool, for every database together.
pub const HELD_MAX: usize = 256;

/// The longest wait between retries of a held-back id, in flush intervals.
pub const MAX_BACKOFF_INTERVALS: i64 = 64;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct HeldId {
    /// Its database is 0 when the place is free.
    pub key: Key,
    /// Failed attempts in a row.
    pub failures: u32,
    /// When the last attempt failed (`TimestampTz`).
    pub failed_at: i64,
    /// The error of the last attempt.
    pub message: Message,
}

impl HeldId {
    const FREE: HeldId = HeldId {
        key: Key { database: 0, target: 0, kind: 0, id: [0; 16] },
        failures: 0,
        failed_at: 0,
        message: message::EMPTY,
    };

    fn is_free(&self) -> bool {
        self.key.database == 0
    }

    fn in_database(&self, database: pg_sys::Oid) -> bool {
        self.key.database == database.to_u32()
    }

    /// When the next flush may try it again, at the current flush interval: one interval after
    /// the first failure, twice as long after each further one. Computed when asked, so a
    /// shorter interval set by a reload applies at once.
    pub fn retry_at(&self, interval_us: i64) -> i64 {
        let intervals = 1i64 << self.failures.saturating_sub(1).min(MAX_BACKOFF_INTERVALS.trailing_zeros());
        self.failed_at.saturating_add(interval_us.saturating_mul(intervals))
    }
}

/// The pool. All-zero memory is an empty pool.
#[repr(C)]
pub struct HeldBack {
    places: [HeldId; HELD_MAX],
}

impl HeldBack {
    fn position(&self, key: &Key) -> Option<usize> {
        self.places.iter().position(|held| !held.is_free() && held.key == *key)
    }

    /// The held-back keys of `database`.
    pub fn of(&self, database: pg_sys::Oid) -> impl Iterator<Item = &HeldId> {
        self.places.iter().filter(move |held| held.in_database(database))
    }

    /// Hold `id` back after an attempt that failed at `now` with `error`. Returns its failed
    /// attempts in a row, or `None` when the pool is full (nothing recorded).
    pub fn hold(&mut self, key: Key, error: &str, now: i64) -> Option<u32> {
        let index = match self.position(&key) {
            Some(index) => index,
            None => match self.places.iter().position(HeldId::is_free) {
                Some(index) => {
                    self.places[index] = HeldId { key, ..HeldId::FREE };
                    index
                }
                None => return None,
            },
        };
        let held = &mut self.places[index];
        held.failures = held.failures.saturating_add(1);
        held.failed_at = now;
        message::write(&mut held.message, error);
        Some(held.failures)
    }

    /// Forget the keys of `database` for which `keep` is false (written at last, or no longer
    /// pending).
    pub fn retain(&mut self, database: pg_sys::Oid, mut keep: impl FnMut(&Key) -> bool) {
        for held in self.places.iter_mut().filter(|held| held.in_database(database)) {
            if !keep(&held.key) {
                *held = HeldId::FREE;
            }
        }
    }

    /// Forget every id of `database` (dropped).
    pub fn forget_database(&mut self, database: pg_sys::Oid) {
        self.retain(database, |_| false);
    }

    /// How many ids are held back, in `database` or in every database.
    pub fn count(&self, database: Option<pg_sys::Oid>) -> u64 {
        self.places.iter().filter(|held| !held.is_free() && database.is_none_or(|d| held.in_database(d))).count() as u64
    }
}
