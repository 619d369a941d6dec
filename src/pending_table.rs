//! The pending set's storage: a hash table of our own in one shared-memory allocation, open
//! addressing with linear probing and backward-shift deletion.
//!
//! Why not PostgreSQL's dynahash, which earlier releases used: a lookup there reads a bucket
//! array, then an element allocated elsewhere — in a set of tens of MB two cache misses and two
//! TLB misses per mark — through an FFI call that pgrx guards. The profile of a mark at 64
//! clients put that lookup at 3% of the whole round trip. Here the hash of an id names its place
//! and the entry is stored there (or a place or two on), so a lookup reads one cache line and
//! never leaves Rust.
//!
//! Size. There are half again as many places as `wsusage.max_pending`, and a new id is refused
//! once `max_pending` are held, so the table is never more than two-thirds full, and in use
//! rarely more than a third (the set flushes early past half of `max_pending`): probe runs stay
//! short. "The set is full" is exact, as it was with dynahash's `HASH_FIXED_SIZE`, and a free
//! place always exists, so a probe always ends. 32 bytes a place, 48 per id of `max_pending`:
//! less than the dynahash took (56) with its element headers and bucket array.
//!
//! Deletion moves later entries of the same run back into the hole instead of leaving a
//! tombstone, so lookups do not slow down as ids come and go over weeks of flushes.
//!
//! The hash is keyed by a random seed drawn when shared memory is created, so ids chosen to
//! collide cannot pile into one run; nothing depends on places across a restart (the saved set
//! is re-inserted).
//!
//! Locking is the caller's (see `shmem`): lookups and [`PendingTable::raise`] need the wsusage
//! lock in either mode, everything that adds or removes an entry needs it exclusively. An
//! entry's time is an atomic so that markers holding the lock in shared mode can raise it.

use std::mem::size_of;
use std::sync::atomic::{AtomicI64, Ordering};

use pgrx::pg_sys;

use crate::shmem::{PendingEntry, PendingKey};

/// Places for a table of `limit` ids: half again as many, so a free place always exists.
fn places_for(limit: usize) -> usize {
    limit + limit.div_ceil(2)
}

/// A multiplier with well spread bits (2^64 / golden ratio), for the final mix.
const MIX: u64 = 0x9e37_79b9_7f4a_7c15;

/// The table's fixed part, followed in the same allocation by its places.
#[repr(C)]
pub struct TableHeader {
    /// Entries held.
    len: usize,
    /// Most entries held at once: `wsusage.max_pending`.
    limit: usize,
    /// Number of places following this header.
    places: usize,
    seed: [u64; 2],
}

/// One place of the table: free when `key.database` is `InvalidOid` (no mark is made outside a
/// database), as all-zero memory is.
#[repr(C)]
pub struct Place {
    key: PendingKey,
    /// Latest mark time (`TimestampTz`); raised atomically, by shared-mode holders too.
    marked_at: AtomicI64,
}

impl Place {
    fn free() -> Self {
        Place { key: PendingKey { database: pg_sys::InvalidOid, id: [0; 16] }, marked_at: AtomicI64::new(0) }
    }

    fn is_free(&self) -> bool {
        self.key.database == pg_sys::InvalidOid
    }

    fn entry(&self) -> PendingEntry {
        PendingEntry { key: self.key, marked_at: self.marked_at.load(Ordering::Relaxed) }
    }
}

pub enum Inserted {
    New,
    Existing,
    /// The table holds `max_pending` ids and this one is new: nothing was recorded.
    Full,
}

/// Bytes of shared memory for a table of `limit` ids.
pub fn size(limit: usize) -> usize {
    size_of::<TableHeader>() + places_for(limit) * size_of::<Place>()
}

/// Make an empty table for `limit` ids in `memory`.
///
/// # Safety
/// `memory` is 8-byte aligned, [`size`]`(limit)` bytes, and not in use by anyone else.
pub unsafe fn create(memory: *mut TableHeader, limit: usize, seed: [u64; 2]) {
    // SAFETY: the caller's promise; all-zero places are free.
    unsafe {
        std::ptr::write_bytes(memory.cast::<u8>(), 0, size(limit));
        *memory = TableHeader { len: 0, limit, places: places_for(limit), seed };
    }
}

/// The table in `memory`, while the caller holds the wsusage lock.
pub struct PendingTable<'a> {
    header: &'a mut TableHeader,
    places: &'a mut [Place],
}

impl<'a> PendingTable<'a> {
    /// # Safety
    /// `memory` was made by [`create`], and the caller has the access the wsusage lock gives
    /// (or the postmaster's solitude) for as long as the result lives.
    pub unsafe fn attach(memory: *mut TableHeader) -> Self {
        // SAFETY: the places follow the header in the same allocation (see `size`).
        unsafe {
            let places = std::slice::from_raw_parts_mut(memory.add(1).cast::<Place>(), (*memory).places);
            PendingTable { header: &mut *memory, places }
        }
    }

    pub fn len(&self) -> usize {
        self.header.len
    }

    fn home(&self, key: &PendingKey) -> usize {
        let [seed0, seed1] = self.header.seed;
        let id = u128::from_le_bytes(key.id);
        let (low, high) = (id as u64, (id >> 64) as u64);
        let hash = fold(fold(low ^ seed0, high ^ seed1) ^ u64::from(key.database.to_u32()), MIX);
        // Maps the hash onto 0..places by its high bits, without a division or a power of two.
        ((u128::from(hash) * self.places.len() as u128) >> 64) as usize
    }

    fn next(&self, index: usize) -> usize {
        if index + 1 == self.places.len() {
            0
        } else {
            index + 1
        }
    }

    /// The place holding `key`, if it is in the table.
    pub fn find(&self, key: &PendingKey) -> Option<usize> {
        let mut index = self.home(key);
        // A free place always ends the run; the bound only keeps damaged memory from looping.
        for _ in 0..self.places.len() {
            let place = &self.places[index];
            if place.is_free() {
                return None;
            }
            if place.key == *key {
                return Some(index);
            }
            index = self.next(index);
        }
        None
    }

    /// Raise the mark time of the entry at `index` to `at` (never lower it).
    pub fn raise(&self, index: usize, at: i64) {
        self.places[index].marked_at.fetch_max(at, Ordering::Relaxed);
    }

    pub fn entry(&self, index: usize) -> PendingEntry {
        self.places[index].entry()
    }

    /// Insert `key` marked `at`, or raise its time if present. Caller holds the lock exclusively.
    pub fn insert(&mut self, key: &PendingKey, at: i64) -> Inserted {
        let mut index = self.home(key);
        for _ in 0..self.places.len() {
            let place = &mut self.places[index];
            if place.is_free() {
                if self.header.len >= self.header.limit {
                    return Inserted::Full;
                }
                place.key = *key;
                place.marked_at = AtomicI64::new(at);
                self.header.len += 1;
                return Inserted::New;
            }
            if place.key == *key {
                place.marked_at.fetch_max(at, Ordering::Relaxed);
                return Inserted::Existing;
            }
            index = self.next(index);
        }
        Inserted::Full
    }

    /// Remove the entry at `index`, moving later entries of its run back into the hole so
    /// that every remaining entry stays reachable from its home. Caller holds the lock
    /// exclusively.
    pub fn remove_at(&mut self, index: usize) {
        let places = self.places.len();
        let mut hole = index;
        let mut next = self.next(hole);
        // A free place ends the run; the bound only keeps damaged memory from looping.
        for _ in 0..places {
            if self.places[next].is_free() {
                break;
            }
            let home = self.home(&self.places[next].key);
            // The entry at `next` may fill the hole unless its home lies cyclically in
            // (hole, next]: moved there, it could not be found from its home.
            let distance_to_hole = (hole + places - home) % places;
            let distance_to_next = (next + places - home) % places;
            if distance_to_hole < distance_to_next {
                self.places.swap(hole, next);
                hole = next;
            }
            next = self.next(next);
        }
        self.places[hole] = Place::free();
        self.header.len = self.header.len.saturating_sub(1);
    }

    /// A copy of each entry; at most `limit` of them, so that damaged memory cannot make a walk
    /// overlong.
    pub fn entries(&self) -> impl Iterator<Item = PendingEntry> + '_ {
        self.places.iter().filter(|place| !place.is_free()).map(Place::entry).take(self.header.limit)
    }

    /// Remove every entry for which `keep` is false; returns how many were removed. Caller
    /// holds the lock exclusively.
    pub fn retain(&mut self, mut keep: impl FnMut(&PendingEntry) -> bool) -> u64 {
        let places = self.places.len();
        // Walk once round from a free place: no run crosses it, so a removal only moves
        // entries not yet visited back into the place being visited, which is then looked at
        // again.
        let Some(start) = self.places.iter().position(Place::is_free) else { return 0 };
        let mut removed = 0;
        let mut step = 1;
        while step < places {
            let index = (start + step) % places;
            if !self.places[index].is_free() && !keep(&self.places[index].entry()) {
                self.remove_at(index);
                removed += 1;
            } else {
                step += 1;
            }
        }
        removed
    }
}

/// Multiply two words into 128 bits and fold the halves together: every input bit reaches
/// the output's high bits, which pick the place.
fn fold(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}
