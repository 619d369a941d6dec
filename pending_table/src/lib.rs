//! The pending set's storage: a hash table of our own in one block of shared memory, open
//! addressing with linear probing and backward-shift deletion. It knows nothing of PostgreSQL:
//! the extension hands it the memory and the proof that it holds its lock, and the tests in
//! `tests/` hand it a heap allocation and threads standing in for backends.
//!
//! Why not PostgreSQL's dynahash, which earlier releases used: a lookup there reads a bucket
//! array, then an element allocated elsewhere — in a set of tens of MB two cache misses and two
//! TLB misses per mark — through an FFI call that pgrx guards. Here the hash of an id names its
//! place and the entry is stored there (or a place or two on), so a lookup reads one cache line.
//!
//! Size. There are half again as many places as the table's limit (`wsusage.max_pending`), and a
//! new key is refused once `limit` are held, so the table is never more than two-thirds full:
//! probe runs stay short, "the set is full" is exact, and a free place always exists, so a probe
//! always ends. 32 bytes a place, 48 per key of the limit.
//!
//! Deletion moves later entries of the same run back into the hole instead of leaving a
//! tombstone, so lookups do not slow down as keys come and go over weeks of flushes. The hash is
//! keyed by a seed the caller draws at random, so keys chosen to collide cannot pile into one run.
//!
//! # Concurrency
//!
//! The caller's lock has two modes. Shared holders ([`Table::insert`], [`Table::marked_at`],
//! [`Table::entries`], and [`Table::len`]) may run at the same time as one another; an exclusive holder, proven by an
//! [`Exclusive`] token, excludes every other user and may remove entries, which moves others. The
//! rules that make concurrent inserts safe:
//! - a place only goes from free to held while the lock is shared, never back (except a claim
//!   withdrawn before it was published), so an entry a shared holder has seen stays where it is;
//! - an inserter claims a free place with a compare-and-swap of its `state` (free → claimed),
//!   writes the key and time, then publishes it (claimed → held, release ordering); a reader
//!   acquires the state before it reads a key, and waits while a place it must look at is claimed;
//! - two inserters of the same new key walk the same run from the same home, so whichever claims
//!   the first free place of the run, the other one waits for it there and finds the key: a key is
//!   never held twice;
//! - the count of entries is reserved atomically before a claim is published, so the table
//!   refuses a new key exactly when `limit` are held.
//!
//! Everything several holders change at once is an atomic; a place's key, which only the holder
//! of its claim or an exclusive holder writes, is in an `UnsafeCell`. No `&mut` to the table's
//! memory is ever made: the memory is shared with other processes for as long as the table lives.
//!
//! The protocol is model-checked with loom (tests/loom.rs, through `sync`); the threads of
//! tests/threads.rs run it on the machine, and Miri checks the operations' memory accesses.
//!
//! Waiting on a claimed place is bounded: a claim is published a few instructions after it is
//! made, so the waiter spins, then yields, then sleeps, and after [`STUCK_AFTER`] gives up with
//! [`Stuck`] instead of waiting forever.

use std::marker::PhantomData;
use std::mem::{align_of, size_of};
use std::time::{Duration, Instant};

mod sync;
use sync::{fence, AtomicBool, AtomicI64, AtomicU8, AtomicUsize, KeyCell, Ordering};

/// What the table is keyed by: a key is pending per database (an OID) and target (the index of
/// the target's slot, which the extension keeps). `kind` says how `id` holds the key (a uuid, a
/// bigint), so a key marked under one kind is never read as the other. Packed, so that a place,
/// its state and its time fill 32 bytes.
#[repr(C, packed)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Key {
    pub database: u32,
    pub target: u16,
    pub kind: u8,
    pub id: [u8; 16],
}

/// One entry, as copied out of the table.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Entry {
    pub key: Key,
    /// Latest mark time, microseconds since 2000-01-01 (PostgreSQL's `TimestampTz`).
    pub marked_at: i64,
}

/// How long a reader waits on a place another process claimed before it reports [`Stuck`].
///
/// A claim is published a few instructions after it is made, so a claim this old means its
/// process is not running: stopped (SIGSTOP, a debugger), or descheduled on a starved machine, or
/// in a VM that was paused. It runs again some day and publishes its claim, and nothing is lost
/// meanwhile, so a wait that ends here is not damage: the waiter reports it to its caller and
/// goes (an ERROR for a mark), unlike PostgreSQL's stuck spinlock, which PANICs after about a
/// minute and would lose every pending mark with the shared memory. The bound is short because
/// the waiter cannot be interrupted meanwhile (it holds the lock, and PostgreSQL holds interrupts
/// with an LWLock): ten seconds is as long as a client should wait for a mark with neither
/// statement_timeout nor a cancel reaching it, and far longer than any running process takes.
#[cfg(not(test))]
pub const STUCK_AFTER: Duration = Duration::from_secs(10);
#[cfg(test)]
pub const STUCK_AFTER: Duration = Duration::from_millis(200);

/// A change in progress, marked in `flag` for as long as this lives: set when made, cleared when
/// dropped. A process killed in the middle of the change (an immediate shutdown: SIGQUIT, then
/// SIGKILL, at any instruction) never drops it, and leaves the flag set for whoever checks the
/// memory after every process has gone. A panic unwinding through the change drops it: the
/// change stopped between two of its steps, each of which leaves the memory whole (callers make
/// no call that can panic in the middle of one), and the server goes on using that memory, so
/// that memory is whole as far as the flag can tell.
pub struct ChangeMark<'a>(&'a AtomicBool);

impl<'a> ChangeMark<'a> {
    pub fn new(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::Relaxed);
        // The flag is set before any write of the change: a process killed after one of them
        // was made leaves the flag set with it.
        fence(Ordering::SeqCst);
        ChangeMark(flag)
    }
}

impl Drop for ChangeMark<'_> {
    fn drop(&mut self) {
        // Every write of the change comes before the flag is cleared (see `is_marked`).
        self.0.store(false, Ordering::Release);
    }
}

/// Whether `flag` says a change was interrupted; what the change wrote before the flag was
/// cleared is visible to whoever finds it clear.
pub fn is_marked(flag: &AtomicBool) -> bool {
    flag.load(Ordering::Acquire)
}

/// Alignment the table's memory needs.
pub const ALIGN: usize = align_of::<Header>();

/// Places for a table of `limit` keys: half again as many, so a free place always exists.
fn places_for(limit: usize) -> usize {
    limit + limit.div_ceil(2)
}

/// Bytes of memory for a table of `limit` keys.
pub fn size(limit: usize) -> usize {
    size_of::<Header>() + places_for(limit) * size_of::<Place>()
}

/// A multiplier with well spread bits (2^64 / golden ratio), for the final mix.
const MIX: u64 = 0x9e37_79b9_7f4a_7c15;

/// The table's fixed part, followed in the same allocation by its places.
#[repr(C)]
struct Header {
    /// Entries held, and claims being published; changed by shared holders too.
    len: AtomicUsize,
    /// An exclusive holder is moving entries: were it killed now, the table would be damaged.
    changing: AtomicBool,
    /// Most entries held at once. Set by [`create`], never changed.
    limit: usize,
    /// Number of places following this header. Set by [`create`], never changed.
    places: usize,
    seed: [u64; 2],
}

/// A place's `state`: nothing there (all-zero memory is a free place).
const FREE: u8 = 0;
/// An inserter holding the lock in shared mode won the place and is writing its entry.
const CLAIMED: u8 = 1;
/// An entry is there: its key no longer changes while the lock is held in either mode.
const HELD: u8 = 2;

/// One place of the table, 32 bytes (the state fills what would be padding).
#[repr(C)]
struct Place {
    /// Written only by the holder of the place's claim (no one reads it until the claim is
    /// published) or by an exclusive holder.
    key: KeyCell,
    state: AtomicU8,
    /// Latest mark time; raised atomically, by shared holders too.
    marked_at: AtomicI64,
}

#[cfg(not(loom))]
const _: () = assert!(size_of::<Place>() == 32);

// SAFETY: the only non-atomic field, `key`, is written by one party at a time (the holder of the
// place's claim, whose writes are published by the release store of HELD and read only after an
// acquire load of it; or an exclusive holder, when no one else uses the table), per the module's
// rules.
unsafe impl Sync for Place {}

impl Place {
    /// The key of a place whose HELD state the caller has loaded with acquire ordering (or that
    /// it holds exclusively).
    fn key(&self) -> Key {
        // SAFETY: a held place's key changes only under exclusive access, which the caller either
        // has or is excluded by; the acquire load of its state made the write visible.
        unsafe { self.key.read() }
    }

    fn entry(&self) -> Entry {
        Entry { key: self.key(), marked_at: self.marked_at.load(Ordering::Relaxed) }
    }

    /// The place's state once no claim is in progress: `FREE` or `HELD`, waiting (bounded) while
    /// it is claimed.
    fn settled_state(&self, index: usize) -> Result<u8, Stuck> {
        let mut backoff = Backoff::default();
        loop {
            let state = self.state.load(Ordering::Acquire);
            if state != CLAIMED {
                return Ok(state);
            }
            backoff.wait().map_err(|waited| Stuck { place: index, waited })?;
        }
    }
}

/// Spin, then yield, then sleep a little longer each time; after [`STUCK_AFTER`], give up.
#[derive(Default)]
struct Backoff {
    turns: u32,
    since: Option<Instant>,
}

impl Backoff {
    const SPINS: u32 = 100;
    const YIELDS: u32 = 100;

    fn wait(&mut self) -> Result<(), Duration> {
        self.turns = self.turns.saturating_add(1);
        // Under loom every claim is published in the end: no time passes there, and none is waited.
        if cfg!(loom) || self.turns <= Self::SPINS + Self::YIELDS {
            sync::pause(self.turns <= Self::SPINS);
        } else {
            let since = *self.since.get_or_insert_with(Instant::now);
            let waited = since.elapsed();
            if waited >= STUCK_AFTER {
                return Err(waited);
            }
            let sleeps = self.turns - Self::SPINS - Self::YIELDS;
            std::thread::sleep(Duration::from_micros(u64::from(sleeps.min(100)) * 10));
        }
        Ok(())
    }
}

/// A place stayed claimed for [`STUCK_AFTER`]: the process that claimed it has not run since
/// (see there). The table is whole; the claim is published when that process runs again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stuck {
    pub place: usize,
    pub waited: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    New,
    Existing,
    /// The table holds `limit` keys and this one is new: nothing was recorded.
    Full,
}

/// What [`Table::verify`] found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// An exclusive holder was moving entries and never finished.
    ChangeInterrupted,
    /// A place is claimed although no inserter can be at work.
    Claimed { place: usize },
    /// An entry cannot be found from its home: a lookup would miss it, an insert duplicate it.
    Unreachable { place: usize },
    /// The count of entries disagrees with the places.
    Count { counted: usize, recorded: usize },
}

/// Proof that its holder excludes every other user of the table (the extension: the wsusage lock
/// held exclusively; tests: a write guard).
pub struct Exclusive<'a>(PhantomData<&'a mut ()>);

impl Exclusive<'_> {
    /// # Safety
    /// For as long as the token lives, no other thread or process uses the table.
    pub unsafe fn new() -> Self {
        Exclusive(PhantomData)
    }
}

/// Make an empty table for `limit` keys in `memory`, hashing with `seed`. Not under loom, whose
/// atomics zeroed memory does not make (see [`create_in_model`]).
///
/// # Safety
/// `memory` is [`ALIGN`]-aligned, [`size`]`(limit)` writable bytes, used by no one else until
/// this returns, and lives as long as `'a`.
#[cfg(not(loom))]
pub unsafe fn create<'a>(memory: *mut u8, limit: usize, seed: [u64; 2]) -> Table<'a> {
    // SAFETY: the caller's promise; all-zero places are free.
    unsafe {
        std::ptr::write_bytes(memory, 0, size(limit));
        memory.cast::<Header>().write(Header {
            len: AtomicUsize::new(0),
            changing: AtomicBool::new(false),
            limit,
            places: places_for(limit),
            seed,
        });
        attach(memory)
    }
}

/// A table of `limit` keys for loom's model, whose atomics cannot be laid over zeroed memory as
/// [`create`] lays std's: built on the heap and leaked (a model's tables are a few places each).
#[cfg(loom)]
pub fn create_in_model(limit: usize, seed: [u64; 2]) -> Table<'static> {
    let header = Box::leak(Box::new(Header {
        len: AtomicUsize::new(0),
        changing: AtomicBool::new(false),
        limit,
        places: places_for(limit),
        seed,
    }));
    let places = (0..places_for(limit))
        .map(|_| Place {
            key: KeyCell::new(Key { database: 0, target: 0, kind: 0, id: [0; 16] }),
            state: AtomicU8::new(FREE),
            marked_at: AtomicI64::new(0),
        })
        .collect::<Vec<_>>()
        .leak();
    Table { header, places }
}

/// The table [`create`] made in `memory`.
///
/// # Safety
/// `memory` was made by [`create`] and lives as long as `'a`.
#[cfg(not(loom))]
pub unsafe fn attach<'a>(memory: *const u8) -> Table<'a> {
    // SAFETY: the places follow the header in the same allocation (see `size`); every access goes
    // through shared references to atomics or UnsafeCells.
    unsafe {
        let header = &*memory.cast::<Header>();
        let places = std::slice::from_raw_parts(memory.add(size_of::<Header>()).cast::<Place>(), header.places);
        Table { header, places }
    }
}

/// The table in its memory.
#[derive(Clone, Copy)]
pub struct Table<'a> {
    header: &'a Header,
    places: &'a [Place],
}

impl Table<'_> {
    /// Entries held; while inserters are at work, a count that includes claims being published.
    pub fn len(&self) -> usize {
        self.header.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Most entries held at once.
    pub fn limit(&self) -> usize {
        self.header.limit
    }

    /// Number of places: probes wrap from the last to the first.
    pub fn places(&self) -> usize {
        self.places.len()
    }

    /// The place where the probe for `key` starts (tests use it to build runs that wrap).
    pub fn home(&self, key: &Key) -> usize {
        let [seed0, seed1] = self.header.seed;
        let id = u128::from_le_bytes(key.id);
        let (low, high) = (id as u64, (id >> 64) as u64);
        let scope = u64::from(key.database) | u64::from(key.target) << 32 | u64::from(key.kind) << 48;
        let hash = fold(fold(low ^ seed0, high ^ seed1) ^ scope, MIX);
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

    /// Insert `key` marked `at`, or raise its time if present. Shared holders may insert at the
    /// same time (see the module's rules).
    pub fn insert(&self, key: &Key, at: i64) -> Result<Inserted, Stuck> {
        let mut index = self.home(key);
        // The walk is bounded by places walked, not by attempts: losing a claim to another
        // inserter looks at the same place again without using up the bound. A free place always
        // ends the run; the bound only keeps damaged memory from looping.
        let mut walked = 0;
        while walked < self.places.len() {
            let place = &self.places[index];
            match place.settled_state(index)? {
                FREE => {
                    if place.state.compare_exchange(FREE, CLAIMED, Ordering::Acquire, Ordering::Relaxed).is_err() {
                        continue;
                    }
                    if self.header.len.fetch_add(1, Ordering::Relaxed) >= self.header.limit {
                        self.header.len.fetch_sub(1, Ordering::Relaxed);
                        // Withdrawn before it was published: whoever waits on the place finds it
                        // free, as it was.
                        place.state.store(FREE, Ordering::Release);
                        return Ok(Inserted::Full);
                    }
                    // SAFETY: we hold the place's claim: no one reads or writes its key until the
                    // release store below publishes it.
                    unsafe { place.key.write(*key) };
                    place.marked_at.store(at, Ordering::Relaxed);
                    place.state.store(HELD, Ordering::Release);
                    return Ok(Inserted::New);
                }
                _ if place.key() == *key => {
                    place.marked_at.fetch_max(at, Ordering::Relaxed);
                    return Ok(Inserted::Existing);
                }
                _ => {
                    index = self.next(index);
                    walked += 1;
                }
            }
        }
        Ok(Inserted::Full)
    }

    /// The time `key` was last marked, if it is in the table. Shared holders may call it while
    /// others insert: a claim on its way waits to be published (bounded, as an insert waits), so
    /// a key whose insert returned before this call began is always found.
    pub fn marked_at(&self, key: &Key) -> Result<Option<i64>, Stuck> {
        let found = self.probe(key, |place, index| place.settled_state(index))?;
        Ok(found.map(|index| self.places[index].marked_at.load(Ordering::Relaxed)))
    }

    /// The place holding `key`: its run walked from its home, each place's state as `state` reads
    /// it, until the key or a free place (or, in damaged memory, every place) is met.
    fn probe(&self, key: &Key, state: impl Fn(&Place, usize) -> Result<u8, Stuck>) -> Result<Option<usize>, Stuck> {
        let mut index = self.home(key);
        for _ in 0..self.places.len() {
            let place = &self.places[index];
            if state(place, index)? == FREE {
                return Ok(None);
            }
            if place.key() == *key {
                return Ok(Some(index));
            }
            index = self.next(index);
        }
        Ok(None)
    }

    /// A copy of each published entry; at most `limit` of them, so that damaged memory cannot
    /// make a walk overlong. Shared holders may call it while others insert: it skips claims not
    /// yet published.
    pub fn entries(&self) -> impl Iterator<Item = Entry> + '_ {
        self.places
            .iter()
            .filter(|place| place.state.load(Ordering::Acquire) == HELD)
            .map(Place::entry)
            .take(self.header.limit)
    }

    /// The place holding `key`, if it is in the table.
    pub fn find(&self, _: &Exclusive<'_>, key: &Key) -> Option<usize> {
        // No claim is in progress while the table is held exclusively: a state is read as it is.
        self.probe(key, |place, _| Ok(place.state.load(Ordering::Acquire))).unwrap_or(None)
    }

    /// The entry at `index`, a place [`Table::find`] returned.
    pub fn entry(&self, _: &Exclusive<'_>, index: usize) -> Entry {
        self.places[index].entry()
    }

    /// Remove the entry at `index`, moving later entries of its run back into the hole so that
    /// every remaining entry stays reachable from its home.
    pub fn remove_at(&self, exclusive: &Exclusive<'_>, index: usize) {
        let _changing = ChangeMark::new(&self.header.changing);
        self.remove_at_unmarked(exclusive, index);
    }

    fn remove_at_unmarked(&self, _: &Exclusive<'_>, index: usize) {
        let places = self.places.len();
        let mut hole = index;
        let mut next = self.next(hole);
        // A free place ends the run; the bound only keeps damaged memory from looping.
        for _ in 0..places {
            let candidate = &self.places[next];
            if candidate.state.load(Ordering::Relaxed) != HELD {
                break;
            }
            let home = self.home(&candidate.key());
            // The entry at `next` may fill the hole unless its home lies cyclically in
            // (hole, next]: moved there, it could not be found from its home.
            let distance_to_hole = (hole + places - home) % places;
            let distance_to_next = (next + places - home) % places;
            if distance_to_hole < distance_to_next {
                let target = &self.places[hole];
                // SAFETY: the caller excludes every other user (the Exclusive token).
                unsafe { target.key.write(candidate.key()) };
                target.marked_at.store(candidate.marked_at.load(Ordering::Relaxed), Ordering::Relaxed);
                target.state.store(HELD, Ordering::Relaxed);
                hole = next;
            }
            next = self.next(next);
        }
        let emptied = &self.places[hole];
        // SAFETY: as above.
        unsafe { emptied.key.write(Key { database: 0, target: 0, kind: 0, id: [0; 16] }) };
        emptied.marked_at.store(0, Ordering::Relaxed);
        emptied.state.store(FREE, Ordering::Relaxed);
        let len = self.header.len.load(Ordering::Relaxed);
        self.header.len.store(len.saturating_sub(1), Ordering::Relaxed);
    }

    /// Remove every entry for which `keep` is false; returns how many were removed.
    pub fn retain(&self, exclusive: &Exclusive<'_>, mut keep: impl FnMut(&Entry) -> bool) -> u64 {
        let places = self.places.len();
        let held = |index: usize| self.places[index].state.load(Ordering::Relaxed) == HELD;
        // Walk once round from a free place: no run crosses it, so a removal only moves entries
        // not yet visited back into the place being visited, which is then looked at again.
        let Some(start) = (0..places).position(|index| !held(index)) else { return 0 };
        // `keep` runs between two removals, each of which leaves the table whole: should it
        // panic, the mark's drop says so.
        let _changing = ChangeMark::new(&self.header.changing);
        let mut removed = 0;
        let mut step = 1;
        while step < places {
            let index = (start + step) % places;
            if held(index) && !keep(&self.places[index].entry()) {
                self.remove_at_unmarked(exclusive, index);
                removed += 1;
            } else {
                step += 1;
            }
        }
        removed
    }

    /// Check the table's invariants, for memory that a process killed at an arbitrary
    /// instruction may have left behind (an immediate shutdown): no removal interrupted, no claim
    /// pending, every entry reachable from its home, the count right. Returns the entries held.
    pub fn verify(&self, exclusive: &Exclusive<'_>) -> Result<usize, Damage> {
        if is_marked(&self.header.changing) {
            return Err(Damage::ChangeInterrupted);
        }
        let mut counted = 0;
        for (index, place) in self.places.iter().enumerate() {
            match place.state.load(Ordering::Relaxed) {
                FREE => {}
                HELD => {
                    if self.find(exclusive, &place.key()) != Some(index) {
                        return Err(Damage::Unreachable { place: index });
                    }
                    counted += 1;
                }
                _ => return Err(Damage::Claimed { place: index }),
            }
        }
        let recorded = self.len();
        if counted != recorded || counted > self.header.limit {
            return Err(Damage::Count { counted, recorded });
        }
        Ok(counted)
    }
}

/// Multiply two words into 128 bits and fold the halves together: every input bit reaches the
/// output's high bits, which pick the place.
fn fold(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_memory(limit: usize) -> Vec<u64> {
        vec![0u64; size(limit).div_ceil(8)]
    }

    #[test]
    fn a_reader_waiting_on_a_claim_that_is_never_published_reports_it_stuck_instead_of_spinning_forever() {
        let mut memory = table_memory(16);
        // SAFETY: a fresh, aligned, large enough buffer that outlives the table.
        let table = unsafe { create(memory.as_mut_ptr().cast(), 16, [1, 2]) };
        let key = Key { database: 1, target: 0, kind: 0, id: [7; 16] };
        // A claimant that stops between its claim and the publication.
        table.places[table.home(&key)].state.store(CLAIMED, Ordering::Release);
        let stuck = table.insert(&key, 1).expect_err("the claim is never published");
        assert_eq!(stuck.place, table.home(&key));
        assert!(stuck.waited >= STUCK_AFTER);
        // SAFETY: this thread is the table's only user.
        let exclusive = unsafe { Exclusive::new() };
        assert_eq!(table.verify(&exclusive), Err(Damage::Claimed { place: table.home(&key) }));
    }

    #[test]
    fn an_interrupted_removal_is_seen_as_damage() {
        let mut memory = table_memory(16);
        // SAFETY: as above.
        let table = unsafe { create(memory.as_mut_ptr().cast(), 16, [1, 2]) };
        table.insert(&Key { database: 1, target: 0, kind: 0, id: [1; 16] }, 1).unwrap();
        // SAFETY: this thread is the table's only user.
        let exclusive = unsafe { Exclusive::new() };
        assert_eq!(table.verify(&exclusive), Ok(1));
        // A process killed in the middle of a removal never drops its mark.
        std::mem::forget(ChangeMark::new(&table.header.changing));
        assert_eq!(table.verify(&exclusive), Err(Damage::ChangeInterrupted));
    }

    #[test]
    fn a_panic_in_the_middle_of_a_retain_leaves_the_table_whole_and_says_so() {
        let mut memory = table_memory(64);
        // SAFETY: as above.
        let table = unsafe { create(memory.as_mut_ptr().cast(), 64, [3, 4]) };
        for n in 0..40u8 {
            table.insert(&Key { database: 1, target: 0, kind: 0, id: [n; 16] }, i64::from(n)).unwrap();
        }
        // SAFETY: this thread is the table's only user.
        let exclusive = unsafe { Exclusive::new() };
        let mut seen = 0;
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            table.retain(&exclusive, |entry| {
                seen += 1;
                assert!(seen < 20, "a bug in the caller's predicate");
                entry.key.id[0] % 2 == 0
            })
        }));
        assert!(panicked.is_err());
        // Not taken for an interrupted change (which would discard the whole set at the next
        // clean shutdown), and rightly so: every entry kept is still found, the count is exact.
        let left = table.verify(&exclusive).expect("the table is whole after the panic");
        assert_eq!(left, table.len());
        assert!((20..40).contains(&left), "some odd ids were removed before the panic, not all: {left}");
        for entry in table.entries() {
            assert_eq!(table.find(&exclusive, &entry.key).map(|index| table.entry(&exclusive, index)), Some(entry));
        }
        // And the table goes on: the rest removed by the next retain.
        assert_eq!(table.retain(&exclusive, |entry| entry.key.id[0] % 2 == 0) as usize, left - 20);
        assert_eq!(table.verify(&exclusive), Ok(20));
    }
}
