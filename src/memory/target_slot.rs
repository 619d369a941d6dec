//! One target's state in shared memory: a [`TargetSlot`] per (database, target name) with keys
//! pending or counters kept, and its declaration as a backend published it (see `targets::published`). The slot's index is the `target` of its keys in the pending set, so
//! a key names its target in two bytes.
//!
//! A slot is claimed by the first mark of a target in a database, freed by that database's
//! worker once the target's row is deleted (its keys discarded) or with the database, and given
//! to another target when it is idle and no slot is free. Backends remember the index of the
//! slot they mark into, with its `generation`: a slot given to another target meanwhile has
//! another generation, so a remembered index never sends a mark to the wrong target.
//!
//! Who changes what (the lock is `layout`'s): markers, holding the lock in shared mode, only add
//! to `pending`, atomically; every other field changes only under the lock held exclusively.

use std::sync::atomic::{AtomicU64, Ordering};

use pgrx::pg_sys;

use crate::memory::publication::Publication;
use crate::memory::stats::Stats;

/// Longest target name, in bytes (PostgreSQL's identifier limit).
pub const NAME_MAX: usize = 63;

#[repr(C)]
pub struct TargetSlot {
    /// The database of the target this slot serves; `InvalidOid` when free.
    pub database: pg_sys::Oid,
    /// Changed whenever the slot is given to a target.
    pub generation: u32,
    name_len: u8,
    name: [u8; NAME_MAX],
    /// Keys of this target in the pending set; markers add to it.
    pub pending: AtomicU64,
    /// This target's counters (of which the flush's ones are kept: `marks` and `rejected` are
    /// per database).
    pub stats: Stats,
    /// Its declaration, as a backend read it from the catalogs (see `targets::published`).
    pub published: Publication,
}

impl TargetSlot {
    pub fn in_use(&self) -> bool {
        self.database != pg_sys::InvalidOid
    }

    pub fn name(&self) -> &str {
        std::str::from_utf8(&self.name[..usize::from(self.name_len).min(NAME_MAX)]).unwrap_or_default()
    }

    pub fn is(&self, database: pg_sys::Oid, name: &str) -> bool {
        self.database == database && self.name() == name
    }

    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Serve the target `name` of `database` from now on, with counters from `now`. `name` is
    /// at most [`NAME_MAX`] bytes (the caller checked).
    pub fn assign(&mut self, database: pg_sys::Oid, name: &str, now: i64) {
        let len = name.len().min(NAME_MAX);
        self.database = database;
        self.generation = self.generation.wrapping_add(1);
        self.name = [0; NAME_MAX];
        self.name[..len].copy_from_slice(&name.as_bytes()[..len]);
        self.name_len = len as u8;
        *self.pending.get_mut() = 0;
        self.stats = Stats::since(now);
        self.published = Publication::NONE;
    }

    pub fn free(&mut self) {
        self.database = pg_sys::InvalidOid;
        self.published = Publication::NONE;
        self.generation = self.generation.wrapping_add(1);
    }
}
