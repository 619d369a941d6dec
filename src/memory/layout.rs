//! wsusage's shared memory: what lives there, how big it is, and who may touch it.
//!
//! Two allocations, both made at server start (by `processes::postmaster`):
//!
//! - **"wsusage pending"**, the pending set's hash table (the `wsusage-pending-table` crate) from
//!   (database OID, target slot, key) to the latest time that key was marked, with
//!   `1.5 × wsusage.max_pending` places allocated up front. It refuses a new id exactly when
//!   `max_pending` are held: the set never borrows from the server's spare shared memory, and a
//!   full set is a clean, reportable condition. All databases share it.
//! - **"wsusage"**, one [`Shared`] struct followed by `wsusage.max_databases` [`DatabaseSlot`]s
//!   and `wsusage.max_targets` [`TargetSlot`]s.
//!   `Shared` holds the lock's address, a condition variable broadcast after every flush, and the
//!   [`Header`]: the launcher's identity and latch, the cluster-wide counters and the last declarations ticket. A slot holds what
//!   is per database (see `database_slot`), a target slot what is per target (see `target_slot`).
//!
//! Locking. One lock (see `lock`: striped, shared or exclusive) guards the table, the header and
//! every slot; the condition variable synchronises itself, and the lock's address and the slot
//! count never change after creation.
//! - Shared mode ([`with_shared`], a [`View`] of `&` references): readers, and markers, new ids
//!   included. Markers insert into the table at the same time as one another (how, in the table's
//!   crate), raise an entry's time, add to their slot's `pending`, `marks` and `rejected`, the
//!   header's `rejected`, set `high_water_wake_sent` and clear their slot's `extension_missing`; a
//!   commit that changed `wsusage_target`, and
//!   each flush round, replaces a database's declarations ticket with a new one from the header's
//!   counter (see `targets::published`) — all atomics.
//!   Nothing else changes under the shared lock, so everything else may be read plainly.
//! - Exclusive mode ([`with_exclusive`], a [`ViewMut`]: `&mut` to the header and slots, and the
//!   table's [`Exclusive`] token): whatever removes entries or changes a slot — a worker's
//!   snapshot of its database's entries (a copy into a buffer it allocated beforehand), a worker
//!   forgetting what it wrote or discarding a deleted target's keys, the launcher discarding a
//!   dropped database's entries, the rendezvous bookkeeping, counters of a flush, a stats reset,
//!   holding a key back, the first mark of a database or target, which claims it a slot, and a
//!   target's declaration published (see `targets::published`). No other process touches the guarded
//!   memory meanwhile, so `&mut` is sound; the condition variable, which other processes use
//!   without the lock, lies outside what it covers.
//!
//! A mark thus waits for nothing but an exclusive holder (mostly a flush's snapshot or forget: a
//! copy or a walk of the set, once per interval; the rest is short bookkeeping). Nothing done under the lock can raise an error,
//! allocate, log or wait on the database: a flush's UPDATE runs with the lock released, so a mark
//! never waits on a table lock, an fsync or a slow query.
//!
//! What survives what: the set lives as long as the postmaster's shared memory. A worker or
//! launcher exit or restart loses nothing; at a shutdown, what the workers' final flushes leave is
//! saved to a file by the postmaster and restored at the next start (see `state::saved_set`); a crash of
//! any backend makes the postmaster reinitialise shared memory, which loses the marks made since
//! the last flush (at most one interval's worth).

use std::mem::{align_of, size_of};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

use pgrx::pg_sys;
use wsusage_pending_table::{self as pending_table, ChangeMark, Exclusive, Table};

use crate::memory::database_slot::DatabaseSlot;
use crate::memory::held_back::HeldBack;
use crate::memory::lock::{self, Mode};
use crate::memory::stats::Stats;
use crate::memory::target_slot::TargetSlot;

/// What the lock guards besides the slots and the table. All-zero is its empty state.
#[repr(C)]
pub struct Header {
    /// Pid of the running launcher, 0 when none is attached.
    pub launcher_pid: i32,
    /// The running launcher's latch (in its PGPROC), null when none is attached.
    pub launcher_latch: *mut pg_sys::Latch,
    /// A mark already woke the launcher because the set passed its high-water mark; cleared when
    /// a worker takes its next snapshot, so a busy set wakes it once per flush, not per mark.
    pub high_water_wake_sent: AtomicBool,
    /// Cluster-wide counters (every database, dropped ones included); `marks` only of the
    /// databases whose slot was given up, the rest being in the slots; `rejected` in the next
    /// field.
    pub stats: Stats,
    /// Ids refused in every database; markers add to it.
    pub rejected: AtomicU64,
    /// Ids whose row makes the flush fail, held back from the others (see `held_back`).
    pub held: HeldBack,
    /// The last ticket of targets' declarations handed out (see `targets::published`); bumped under the
    /// lock in either mode.
    pub declarations_ticket: AtomicU64,
}

impl Header {
    /// A new ticket of targets' declarations, larger than every one taken before (see
    /// `published`).
    pub fn new_declarations_ticket(&self) -> u64 {
        self.declarations_ticket.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The cluster-wide counters, with what markers count here added in (not the slots' marks).
    pub fn stats(&self) -> Stats {
        Stats { rejected: self.rejected.load(Ordering::Relaxed), ..self.stats }
    }
}

#[repr(C)]
struct Shared {
    /// The first of the lock's LWLocks. Set at creation, never changed.
    locks: *mut pg_sys::LWLockPadded,
    /// Number of [`DatabaseSlot`]s following this struct. Set at creation, never changed.
    slot_count: usize,
    /// Number of [`TargetSlot`]s following those. Set at creation, never changed.
    target_count: usize,
    /// Broadcast after every flush (success or failure) of any database. Not guarded by the lock.
    flushed: pg_sys::ConditionVariable,
    /// An exclusive holder is at work: found set when every process has gone, it was killed
    /// there (an immediate shutdown) and what it was changing may be half done.
    changing: AtomicBool,
    header: Header,
}

// Set in the postmaster by the shmem startup hook and inherited by every child on fork.
static SHARED: AtomicPtr<Shared> = AtomicPtr::new(null_mut());
static PENDING: AtomicPtr<u8> = AtomicPtr::new(null_mut());

/// Bytes of the "wsusage" allocation for `max_databases` database slots and `max_targets`
/// target slots.
pub fn shared_size(max_databases: usize, max_targets: usize) -> usize {
    targets_offset(max_databases) + max_targets * size_of::<TargetSlot>()
}

/// Where the target slots start in the "wsusage" allocation.
fn targets_offset(max_databases: usize) -> usize {
    (size_of::<Shared>() + max_databases * size_of::<DatabaseSlot>()).next_multiple_of(align_of::<TargetSlot>())
}

/// Bytes of the "wsusage pending" allocation for `max_pending` ids.
pub fn pending_size(max_pending: usize) -> usize {
    pending_table::size(max_pending)
}

/// Make the empty state in `memory` ([`shared_size`] bytes): no slot in use, counters from `now`.
///
/// # Safety
/// `memory` is a fresh shared-memory allocation of that size, which nobody else uses yet;
/// `locks` is the lock's tranche.
pub unsafe fn create_shared(
    memory: *mut u8,
    max_databases: usize,
    max_targets: usize,
    locks: *mut pg_sys::LWLockPadded,
    now: i64,
) {
    // SAFETY: the caller's promise. All-zero is the valid empty state of every field but those set
    // below, and of every slot (database InvalidOid: free).
    unsafe {
        std::ptr::write_bytes(memory, 0, shared_size(max_databases, max_targets));
        let shared = memory.cast::<Shared>();
        (*shared).locks = locks;
        (*shared).slot_count = max_databases;
        (*shared).target_count = max_targets;
        pg_sys::ConditionVariableInit(&raw mut (*shared).flushed);
        (*shared).header.stats.stats_reset = now;
    }
}

/// Make the empty pending table in `memory` ([`pending_size`] bytes).
///
/// # Safety
/// As for [`create_shared`]; `memory` is 8-byte aligned (as ShmemInitStruct's memory is).
pub unsafe fn create_pending(memory: *mut u8, max_pending: usize, seed: [u64; 2]) {
    // SAFETY: the caller's promise.
    unsafe { pending_table::create(memory, max_pending, seed) };
}

/// Remember where the two allocations are, for every process forked from this one.
///
/// # Safety
/// `shared` and `pending` are the "wsusage" and "wsusage pending" allocations, made by
/// [`create_shared`] and [`create_pending`] (in this process or the postmaster) with the sizes the
/// settings give, and live as long as this process: every function here trusts what they point to.
pub unsafe fn publish(shared: *mut u8, pending: *mut u8) {
    PENDING.store(pending, Ordering::Release);
    SHARED.store(shared.cast(), Ordering::Release);
}

/// Whether the library was preloaded and its shared memory exists in this process.
pub fn is_ready() -> bool {
    !SHARED.load(Ordering::Acquire).is_null()
}

/// The state as a shared-mode holder sees it.
pub struct View<'a> {
    pub header: &'a Header,
    pub slots: &'a [DatabaseSlot],
    pub targets: &'a [TargetSlot],
    pub pending: Table<'a>,
}

/// The state as the exclusive holder sees it.
pub struct ViewMut<'a> {
    pub header: &'a mut Header,
    pub slots: &'a mut [DatabaseSlot],
    pub targets: &'a mut [TargetSlot],
    pub pending: Table<'a>,
    pub exclusive: Exclusive<'a>,
}

impl ViewMut<'_> {
    /// What a shared-mode holder could do, the exclusive holder can too.
    pub fn view(&self) -> View<'_> {
        View { header: self.header, slots: self.slots, targets: self.targets, pending: self.pending }
    }
}

/// Run `f` with the lock held in shared mode. `f` must not raise, allocate, log or wait.
/// Returns `None` when the library was not preloaded (no shared memory).
pub fn with_shared<R>(f: impl FnOnce(&View<'_>) -> R) -> Option<R> {
    let shared = SHARED.load(Ordering::Acquire);
    if shared.is_null() {
        return None;
    }
    // SAFETY: `shared` is the struct made at startup, alive as long as the postmaster's shared
    // memory; `locks` never changes after creation.
    let _held = unsafe { lock::acquire((*shared).locks, Mode::Shared) };
    // SAFETY: with the lock shared, what others change at the same time is atomic (see the module
    // header), and `&` references to it are what the atomics are for; the rest is not written
    // until we release the lock.
    let view = unsafe {
        View {
            header: &(*shared).header,
            slots: std::slice::from_raw_parts(slots_of(shared), (*shared).slot_count),
            targets: std::slice::from_raw_parts(targets_of(shared), (*shared).target_count),
            pending: pending_table::attach(PENDING.load(Ordering::Acquire)),
        }
    };
    Some(f(&view))
}

/// Run `f` with the lock held exclusively. `f` must not raise, allocate, log or wait.
/// Returns `None` when the library was not preloaded.
pub fn with_exclusive<R>(f: impl FnOnce(&mut ViewMut<'_>) -> R) -> Option<R> {
    let shared = SHARED.load(Ordering::Acquire);
    if shared.is_null() {
        return None;
    }
    // SAFETY: as in with_shared.
    let _held = unsafe { lock::acquire((*shared).locks, Mode::Exclusive) };
    // SAFETY: `changing` is an atomic outside what the view covers. Declared after `_held`, the
    // mark is dropped first: cleared while the lock is still held, also when `f` panics.
    let _changing = ChangeMark::new(unsafe { &(*shared).changing });
    // SAFETY: with the lock exclusive, no other process touches the header, the slots or the
    // table until we release it.
    Some(f(&mut unsafe { exclusive_view(shared) }))
}

/// Whether a process was killed while it held the lock exclusively (read by the postmaster once
/// every other process has gone; see `state::saved_set`).
pub fn exclusive_holder_was_interrupted() -> bool {
    let shared = SHARED.load(Ordering::Acquire);
    // SAFETY: as in with_shared; an atomic read.
    !shared.is_null() && pending_table::is_marked(unsafe { &(*shared).changing })
}

/// Run `f` on the state without the lock, as the postmaster does at start, before any other
/// process exists, and at exit, after every other process has gone. (The postmaster never takes
/// LWLocks.)
///
/// # Safety
/// No other process uses wsusage's shared memory while this runs: the caller is the postmaster
/// and has no child, or none left.
pub unsafe fn postmaster_exclusive<R>(f: impl FnOnce(&mut ViewMut<'_>) -> R) -> Option<R> {
    let shared = SHARED.load(Ordering::Acquire);
    if shared.is_null() {
        return None;
    }
    // SAFETY: no other process can touch the memory meanwhile (the caller's promise).
    Some(f(&mut unsafe { exclusive_view(shared) }))
}

/// # Safety
/// The caller excludes every other user of the guarded memory while the view lives.
unsafe fn exclusive_view<'a>(shared: *mut Shared) -> ViewMut<'a> {
    // SAFETY: the caller's promise; `&mut` covers the header and the slots, not the condition
    // variable beside them, which others use without the lock.
    unsafe {
        ViewMut {
            header: &mut (*shared).header,
            slots: std::slice::from_raw_parts_mut(slots_of(shared), (*shared).slot_count),
            targets: std::slice::from_raw_parts_mut(targets_of(shared), (*shared).target_count),
            pending: pending_table::attach(PENDING.load(Ordering::Acquire)),
            exclusive: Exclusive::new(),
        }
    }
}

/// # Safety
/// `shared` is the struct made at startup.
unsafe fn slots_of(shared: *mut Shared) -> *mut DatabaseSlot {
    // SAFETY: the slots follow the struct in the same allocation (see shared_size).
    unsafe { shared.add(1).cast::<DatabaseSlot>() }
}

/// # Safety
/// `shared` is the struct made at startup.
unsafe fn targets_of(shared: *mut Shared) -> *mut TargetSlot {
    // SAFETY: the target slots follow the database slots in the same allocation, aligned (see
    // shared_size).
    unsafe { shared.cast::<u8>().add(targets_offset((*shared).slot_count)).cast::<TargetSlot>() }
}

/// The condition variable broadcast after every flush, or `None` when not preloaded.
pub fn flushed_cv() -> Option<*mut pg_sys::ConditionVariable> {
    let shared = SHARED.load(Ordering::Acquire);
    // SAFETY: as in with_shared; we take the address only, the CV synchronises itself.
    (!shared.is_null()).then(|| unsafe { &raw mut (*shared).flushed })
}
