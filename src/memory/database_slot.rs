//! One database's state in shared memory: a [`DatabaseSlot`] per database with marks.
//!
//! A slot is claimed by the first mark made in a database (or its first `wsusage_flush()`),
//! holds that database's pending count, flush worker, rendezvous and counters, and is recycled
//! when idle and another database needs one, or freed by the launcher once the database is
//! dropped (see `state::databases`).
//!
//! Who changes what (the lock is `layout`'s): markers, holding the lock in shared mode, only add
//! to `pending`, `marks` and `rejected` and clear `extension_missing`, atomically; a commit that
//! wrote `wsusage_target` and each flush round also replace `declarations_ticket` under the shared
//! lock (`fetch_max`), and a claim sets it under the exclusive one; every other
//! field changes only under the lock held exclusively (then through `&mut`), and is read plainly
//! under either mode.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use pgrx::pg_sys;

use crate::memory::requests::Requests;
use crate::memory::stats::Stats;
use crate::memory::stripes::StripedCounter;

#[repr(C)]
pub struct DatabaseSlot {
    /// The database this slot serves; `InvalidOid` when free.
    pub database: pg_sys::Oid,
    /// Ids of this database in the pending set; markers add to it.
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
    /// The last worker left because the extension is not installed in the database (dropped with
    /// marks pending): the launcher starts no other until a mark, which needs the extension,
    /// clears this, or a `wsusage_flush()` caller waits.
    pub extension_missing: AtomicBool,
    pub requests: Requests,
    /// This database's counters, but for `marks` and `rejected`: see the next fields.
    pub stats: Stats,
    /// Ids of this database refused because the set was full; markers add to it.
    pub rejected: AtomicU64,
    /// Ids marked in this database, counted by markers each in its stripe.
    pub marks: StripedCounter,
    /// The ticket of this database's targets' declarations (see `targets::published`); bumped under the
    /// lock in either mode.
    pub declarations_ticket: AtomicU64,
}

impl DatabaseSlot {
    /// Ids of this database in the pending set (markers may be adding to it).
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    pub fn in_use(&self) -> bool {
        self.database != pg_sys::InvalidOid
    }

    /// Nothing depends on this slot: it may be given to another database.
    pub fn is_idle(&self) -> bool {
        self.pending() == 0 && self.worker_pid == 0 && !self.requests.waiting()
    }

    pub fn extension_missing(&self) -> bool {
        self.extension_missing.load(Ordering::Relaxed)
    }

    /// The database's counters, with what markers count added in.
    pub fn stats(&self) -> Stats {
        Stats { marks: self.marks.sum(), rejected: self.rejected.load(Ordering::Relaxed), ..self.stats }
    }

    /// Zero the counters, counting from `now`.
    pub fn reset_stats(&mut self, now: i64) {
        self.stats = Stats::since(now);
        self.marks.clear();
        *self.rejected.get_mut() = 0;
    }

    /// Serve `database` from now on, as a slot never used before, its declarations' ticket
    /// `ticket` (a new one: what was published under an earlier one is never taken).
    pub fn assign(&mut self, database: pg_sys::Oid, now: i64, ticket: u64) {
        self.database = database;
        *self.declarations_ticket.get_mut() = ticket;
        *self.pending.get_mut() = 0;
        self.interval_start = now;
        self.worker_pid = 0;
        self.worker_latch = std::ptr::null_mut();
        self.worker_starts = 0;
        self.yield_requested = false;
        *self.extension_missing.get_mut() = false;
        self.requests = Requests::new();
        self.reset_stats(now);
    }
}
