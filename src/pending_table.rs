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
//! Locking is the caller's (see `shmem`). Removing an entry moves others, so it needs the wsusage
//! lock exclusively. Adding one does not: markers hold the lock in shared mode and insert
//! concurrently, which is what keeps the first marks after a flush (when most ids are new) from
//! queueing behind one another. The rules that make this safe:
//! - a place only goes from free to held while the lock is shared, never back (except a claim
//!   withdrawn before it was published), so an entry a shared holder has seen stays where it is;
//! - a marker claims a free place with a compare-and-swap of its `state` (free → claimed), writes
//!   the key and time, then publishes it (claimed → held, release ordering); a reader acquires
//!   the state before it reads a key, and waits while a place it must look at is claimed;
//! - two markers of the same new id walk the same run from the same home, so whichever claims
//!   the first free place of the run, the other one waits for it there and finds the id; an id
//!   is never held twice;
//! - the count of entries is reserved atomically before a claim is published, so the set still
//!   refuses a new id exactly when `max_pending` are held.
//!
//! An entry's time is an atomic so that markers holding the lock in shared mode can raise it.

use std::mem::size_of;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicUsize, Ordering};

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
    /// Entries held, and claims being published; changed by shared-mode holders too.
    len: AtomicUsize,
    /// Most entries held at once: `wsusage.max_pending`.
    limit: usize,
    /// Number of places following this header.
    places: usize,
    seed: [u64; 2],
}

/// A place's `state`: nothing there (all-zero memory is a free place).
const FREE: u32 = 0;
/// A marker holding the lock in shared mode won the place and is writing its entry.
const CLAIMED: u32 = 1;
/// An entry is there: its key no longer changes while the lock is held in either mode.
const HELD: u32 = 2;

/// One place of the table, 32 bytes (the state fills what would be padding).
#[repr(C)]
pub struct Place {
    key: PendingKey,
    state: AtomicU32,
    /// Latest mark time (`TimestampTz`); raised atomically, by shared-mode holders too.
    marked_at: AtomicI64,
}

const _: () = assert!(size_of::<Place>() == 32);

impl Place {
    fn free() -> Self {
        Place {
            key: PendingKey { database: pg_sys::InvalidOid, id: [0; 16] },
            state: AtomicU32::new(FREE),
            marked_at: AtomicI64::new(0),
        }
    }

    /// Whether an entry is here, for walks that take only published entries.
    fn is_held(&self) -> bool {
        self.state.load(Ordering::Acquire) == HELD
    }

    fn entry(&self) -> PendingEntry {
        PendingEntry { key: self.key, marked_at: self.marked_at.load(Ordering::Relaxed) }
    }

    /// The place's state once no claim is in progress: `FREE` or `HELD`. A claim is published a
    /// few instructions after it is made, none of which can fail or wait, so this waits only as
    /// long as the claiming process takes to be scheduled again.
    fn settled_state(&self) -> u32 {
        let mut spins = 0u32;
        loop {
            let state = self.state.load(Ordering::Acquire);
            if state != CLAIMED {
                return state;
            }
            spins = spins.saturating_add(1);
            if spins < 100 {
                std::hint::spin_loop();
            } else {
                // The claimant may be descheduled on this very core: give it the processor.
                std::thread::yield_now();
            }
        }
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
        *memory = TableHeader { len: AtomicUsize::new(0), limit, places: places_for(limit), seed };
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

    /// Entries held; while the lock is shared, markers may be adding more.
    pub fn len(&self) -> usize {
        self.header.len.load(Ordering::Relaxed)
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
            if place.settled_state() == FREE {
                return None;
            }
            if place.key == *key {
                return Some(index);
            }
            index = self.next(index);
        }
        None
    }

    pub fn entry(&self, index: usize) -> PendingEntry {
        self.places[index].entry()
    }

    /// Insert `key` marked `at`, or raise its time if present. Caller holds the lock, in shared
    /// mode being enough: other markers may insert at the same time (see the module's rules).
    pub fn insert(&mut self, key: &PendingKey, at: i64) -> Inserted {
        let mut index = self.home(key);
        // A free place always ends the run; the bound only keeps damaged memory from looping.
        for _ in 0..self.places.len() {
            let place = &mut self.places[index];
            match place.settled_state() {
                FREE => {
                    if place.state.compare_exchange(FREE, CLAIMED, Ordering::Acquire, Ordering::Relaxed).is_err() {
                        // Another marker claimed it first: look at the same place again.
                        continue;
                    }
                    if self.header.len.fetch_add(1, Ordering::Relaxed) >= self.header.limit {
                        self.header.len.fetch_sub(1, Ordering::Relaxed);
                        // Withdrawn before it was published: whoever waits on the place finds
                        // it free, as it was.
                        place.state.store(FREE, Ordering::Release);
                        return Inserted::Full;
                    }
                    place.key = *key;
                    place.marked_at.store(at, Ordering::Relaxed);
                    place.state.store(HELD, Ordering::Release);
                    return Inserted::New;
                }
                _ if place.key == *key => {
                    place.marked_at.fetch_max(at, Ordering::Relaxed);
                    return Inserted::Existing;
                }
                _ => index = self.next(index),
            }
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
            if !self.places[next].is_held() {
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
        let len = self.header.len.get_mut();
        *len = len.saturating_sub(1);
    }

    /// A copy of each entry; at most `limit` of them, so that damaged memory cannot make a walk
    /// overlong.
    pub fn entries(&self) -> impl Iterator<Item = PendingEntry> + '_ {
        self.places.iter().filter(|place| place.is_held()).map(Place::entry).take(self.header.limit)
    }

    /// Remove every entry for which `keep` is false; returns how many were removed. Caller
    /// holds the lock exclusively.
    pub fn retain(&mut self, mut keep: impl FnMut(&PendingEntry) -> bool) -> u64 {
        let places = self.places.len();
        // Walk once round from a free place: no run crosses it, so a removal only moves
        // entries not yet visited back into the place being visited, which is then looked at
        // again.
        let Some(start) = self.places.iter().position(|place| !place.is_held()) else { return 0 };
        let mut removed = 0;
        let mut step = 1;
        while step < places {
            let index = (start + step) % places;
            if self.places[index].is_held() && !keep(&self.places[index].entry()) {
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
