//! wsusage's shared memory: what lives there, how big it is, and who may touch it.
//!
//! Two allocations, both made at server start:
//!
//! - **"wsusage pending"**, a hash table of our own (see `pending_table`) from (database OID,
//!   workspace id) ([`PendingKey`], 20 bytes) to the latest time that id was marked in that
//!   database (32 bytes a place), with `1.5 × wsusage.max_pending` places allocated up front. It
//!   refuses a new id exactly when `max_pending` are held: the set never borrows from the
//!   server's spare shared memory, and a full set is a clean, reportable condition. All
//!   databases share it, so one busy database can use what quiet ones do not.
//! - **"wsusage"**, one [`Shared`] struct followed by `wsusage.max_databases`
//!   [`DatabaseSlot`]s. `Shared` holds the launcher's identity and latch, the cluster-wide
//!   counters and a condition variable broadcast after every flush; a slot holds what is per
//!   database: how many of its ids are pending, its flush worker's identity and latch, its
//!   `wsusage_flush()` rendezvous and its counters. A slot is claimed by the first mark made in
//!   a database and recycled only when idle (nothing pending, no worker, no waiting caller).
//!
//! Locking. One lock guards the table, every field of [`Shared`] except `flushed`, the condition
//! variable, which synchronises itself, and every slot. It is striped (see `stripes`): the named
//! tranche "wsusage" holds one LWLock per stripe, a process takes it in shared mode by taking its
//! stripe's LWLock shared, and in exclusive mode by taking every stripe's, in order; so exclusive
//! excludes every shared holder, and shared holders on different stripes write no common line to
//! get in. The lock is taken in exclusive mode by everything that removes entries or changes a
//! slot: a worker's snapshot of its database's entries (a copy into a buffer it allocated
//! beforehand), a worker forgetting what it wrote, the launcher discarding a dropped database's
//! entries, the rendezvous bookkeeping, and the first mark of a database, which claims it a slot.
//! Readers take it shared, and so do marks, new ids included: markers insert into the table at the
//! same time as one another (how, in `pending_table`), raise an entry's `marked_at` with an atomic
//! max, and add to their slot's `pending`, `marks` (striped too) and `rejected`, the totals'
//! `rejected` and `marks`, and set `high_water_wake_sent`, atomically. Those are the only things a
//! shared holder may change, and only atomically; exclusive holders exclude them, and read and
//! write them plainly. A mark thus waits for nothing but a flush's snapshot or forget (a copy or a
//! walk of the set, once per interval), and the first marks after a flush, most of which insert, do
//! not queue behind one another for an exclusive lock. Nothing done under the lock can raise an
//! error, allocate, log or wait on the database: a flush's UPDATE runs with the lock released, so a
//! mark never waits on a table lock, an fsync or a slow query. Use [`with_lock`]; helpers taking a
//! [`Locked`] are "caller must hold the lock" by construction.
//!
//! What survives what: the set lives as long as the postmaster's shared memory. A worker or
//! launcher exit or restart loses nothing; at a shutdown, what the workers' final flushes leave is
//! saved to a file by the postmaster and restored at the next start (see `persist`); a crash of
//! any backend makes the postmaster reinitialise shared memory, which loses the marks made since
//! the last flush (at most one interval's worth).

use std::ffi::CStr;
use std::mem::size_of;
use std::ptr::{addr_of_mut, null_mut};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::databases::DatabaseSlot;
use crate::pending_table::{self, PendingTable, TableHeader};
use crate::persist;
use crate::settings;
use crate::stats::Stats;
use crate::stripes::{self, STRIPES};

const SHARED_NAME: &CStr = c"wsusage";
const PENDING_NAME: &CStr = c"wsusage pending";
const TRANCHE_NAME: &CStr = c"wsusage";

/// How many flush outcomes a database slot remembers for `wsusage_flush()` callers that have
/// not yet woken up to read theirs. A caller misses its outcome only if this many flushes of its
/// database complete between the worker's broadcast and the caller being scheduled.
pub const RECENT_FLUSHES: usize = 16;

/// Longest error message kept for `wsusage_flush()` callers (bytes, including the terminator).
pub const MESSAGE_LEN: usize = 256;

/// The table's key: an id is pending per database, and flushed only in the database it was marked in.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PendingKey {
    pub database: pg_sys::Oid,
    pub id: [u8; 16],
}

/// One pending id, as copied out of the table: for a flush, a look at the set, the saved file.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingEntry {
    pub key: PendingKey,
    /// Latest mark time, microseconds since 2000-01-01 (PostgreSQL's `TimestampTz`).
    pub marked_at: i64,
}

#[repr(C)]
pub struct Shared {
    /// The first of the tranche's [`STRIPES`] LWLocks, one per stripe (see `stripes`).
    locks: *mut pg_sys::LWLockPadded,
    /// Broadcast after every flush (success or failure) of any database. Not guarded by the lock.
    pub flushed: pg_sys::ConditionVariable,
    /// Pid of the running launcher, 0 when none is attached.
    pub launcher_pid: i32,
    /// The running launcher's latch (in its PGPROC), null when none is attached.
    pub launcher_latch: *mut pg_sys::Latch,
    /// A mark already woke the launcher because the set passed its high-water mark; cleared when
    /// a worker takes its next snapshot, so a busy set wakes it once per flush, not per mark.
    pub high_water_wake_sent: AtomicBool,
    /// Cluster-wide counters (every database, including dropped ones); `marks` only of the
    /// databases whose slot was given up, the rest being in the slots (see `stats`).
    pub stats: Stats,
    /// Number of [`DatabaseSlot`]s following this struct.
    slot_count: usize,
}
// Set in the postmaster by the shmem startup hook and inherited by every child on fork.
static SHARED: AtomicPtr<Shared> = AtomicPtr::new(null_mut());
static PENDING: AtomicPtr<TableHeader> = AtomicPtr::new(null_mut());

static mut PREV_SHMEM_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;
#[cfg(not(feature = "pg14"))]
static mut PREV_SHMEM_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;

/// Install the hooks that reserve and create our shared memory. Called from `_PG_init`.
pub fn init() {
    // SAFETY: _PG_init runs single-threaded in the postmaster before shared memory exists; we
    // chain whatever hook was installed before ours.
    unsafe {
        PREV_SHMEM_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
    }
    #[cfg(feature = "pg14")]
    request_shmem();
    // SAFETY: as above; PostgreSQL 15+ accepts requests only from this hook.
    #[cfg(not(feature = "pg14"))]
    unsafe {
        PREV_SHMEM_REQUEST_HOOK = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(shmem_request);
    }
}

#[cfg(not(feature = "pg14"))]
#[pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    // SAFETY: reading the hook we saved in init(), in the postmaster.
    if let Some(prev) = unsafe { PREV_SHMEM_REQUEST_HOOK } {
        // SAFETY: a hook PostgreSQL or another library installed; called as PostgreSQL would.
        unsafe { prev() };
    }
    request_shmem();
}

fn pending_table_size() -> usize {
    pending_table::size(settings::max_pending())
}

fn shared_size() -> usize {
    size_of::<Shared>() + settings::max_databases() * size_of::<DatabaseSlot>()
}

/// Bytes of shared memory the extension reserves for `wsusage.max_pending` ids and
/// `wsusage.max_databases` databases.
pub fn total_size() -> usize {
    shared_size() + pending_table_size()
}

fn request_shmem() {
    // SAFETY: called from _PG_init (14) or the shmem request hook (15+), the only places where
    // PostgreSQL accepts these requests.
    unsafe {
        pg_sys::RequestAddinShmemSpace(total_size());
        pg_sys::RequestNamedLWLockTranche(TRANCHE_NAME.as_ptr(), STRIPES as i32);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    // SAFETY: reading the hook we saved in init(), in the postmaster (or a backend under
    // EXEC_BACKEND).
    if let Some(prev) = unsafe { PREV_SHMEM_STARTUP_HOOK } {
        // SAFETY: a hook PostgreSQL or another library installed; called as PostgreSQL would.
        unsafe { prev() };
    }
    // SAFETY: AddinShmemInitLock (MainLWLockArray[21], a C macro without a binding) serialises
    // shared-memory creation against other libraries; ShmemInitStruct/ShmemInitHash return
    // memory of the requested size, initialised by whoever finds it new.
    unsafe {
        let addin_shmem_init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(addin_shmem_init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);

        let mut found = false;
        let shared = pg_sys::ShmemInitStruct(SHARED_NAME.as_ptr(), shared_size(), &mut found).cast::<Shared>();
        if !found {
            // All-zero is the valid empty state of every field but those set below, and of every
            // slot (database InvalidOid: free).
            std::ptr::write_bytes(shared.cast::<u8>(), 0, shared_size());
            (*shared).slot_count = settings::max_databases();
            (*shared).locks = pg_sys::GetNamedLWLockTranche(TRANCHE_NAME.as_ptr());
            pg_sys::ConditionVariableInit(addr_of_mut!((*shared).flushed));
            (*shared).stats.stats_reset = pg_sys::GetCurrentTimestamp();
        }

        let mut table_found = false;
        let pending = pg_sys::ShmemInitStruct(PENDING_NAME.as_ptr(), pending_table_size(), &mut table_found)
            .cast::<TableHeader>();
        if !table_found {
            pending_table::create(pending, settings::max_pending(), random_seed());
        }

        pg_sys::LWLockRelease(addin_shmem_init_lock);

        SHARED.store(shared, Ordering::Release);
        PENDING.store(pending, Ordering::Release);

        // The postmaster, alone at this point, brings back what the last clean shutdown saved,
        // and saves what is pending when it exits.
        if !pg_sys::IsUnderPostmaster {
            if !found {
                postmaster_access(|locked| persist::load(locked, pg_sys::GetCurrentTimestamp()));
            }
            pg_sys::on_shmem_exit(Some(save_at_exit), pg_sys::Datum::from(0));
        }
    }
}

/// A key for the pending table's hash, new at every start of shared memory.
fn random_seed() -> [u64; 2] {
    let mut bytes = [0u8; 16];
    // SAFETY: fills the buffer we pass, of the length we pass.
    if !unsafe { pg_sys::pg_strong_random(bytes.as_mut_ptr().cast(), bytes.len()) } {
        // Without a strong source the clock still differs from one start to the next.
        // SAFETY: reads the clock.
        bytes[..8].copy_from_slice(&unsafe { pg_sys::GetCurrentTimestamp() }.to_le_bytes());
    }
    let seed = u128::from_le_bytes(bytes);
    [seed as u64, (seed >> 64) as u64]
}

#[pg_guard]
unsafe extern "C-unwind" fn save_at_exit(code: std::ffi::c_int, _arg: pg_sys::Datum) {
    // After a crash (non-zero code) shared memory is suspect, and reinitialised.
    if code == 0 {
        postmaster_access(|locked| persist::save(locked));
    }
}

/// Run `f` on the shared state without the lock: only for the postmaster, at start before any
/// other process exists and at exit after every other process has gone. (The postmaster never
/// takes LWLocks.)
fn postmaster_access<R>(f: impl FnOnce(&mut Locked<'_>) -> R) -> Option<R> {
    let shared = SHARED.load(Ordering::Acquire);
    if shared.is_null() {
        return None;
    }
    // SAFETY: no other process can touch the memory meanwhile: the caller is the postmaster
    // with no children.
    Some(f(&mut unsafe { locked_view(shared) }))
}

/// The shared state, its slots and the pending table, as one borrow.
///
/// # Safety
/// `shared` is the struct made in shmem_startup, and the caller has the access the lock gives
/// (or the postmaster's solitude), for as long as the result lives.
unsafe fn locked_view<'a>(shared: *mut Shared) -> Locked<'a> {
    // SAFETY: the slots follow the struct in the same allocation, `slot_count` of them
    // (shared_size); exclusivity is the caller's promise.
    unsafe {
        let slots = std::slice::from_raw_parts_mut(shared.add(1).cast::<DatabaseSlot>(), (*shared).slot_count);
        Locked { shared: &mut *shared, slots, pending: PendingTable::attach(PENDING.load(Ordering::Acquire)) }
    }
}

/// Whether the library was preloaded and its shared memory exists in this process.
pub fn is_ready() -> bool {
    !SHARED.load(Ordering::Acquire).is_null()
}

/// Store `message` in a fixed, NUL-terminated shared buffer, cut at a character boundary.
pub fn write_message(buffer: &mut [u8; MESSAGE_LEN], message: &str) {
    let mut end = message.len().min(MESSAGE_LEN - 1);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    *buffer = [0; MESSAGE_LEN];
    buffer[..end].copy_from_slice(&message.as_bytes()[..end]);
}

/// The message stored by [`write_message`].
pub fn read_message(buffer: &[u8; MESSAGE_LEN]) -> String {
    let len = buffer.iter().position(|&b| b == 0).unwrap_or(MESSAGE_LEN);
    String::from_utf8_lossy(&buffer[..len]).into_owned()
}

/// The shared state while the lock is held; only [`with_lock`] makes one.
pub struct Locked<'a> {
    pub shared: &'a mut Shared,
    pub slots: &'a mut [DatabaseSlot],
    pub pending: PendingTable<'a>,
}

/// The stripes' locks this process holds, released when dropped (last taken, first released).
struct ReleaseOnDrop {
    locks: *mut pg_sys::LWLockPadded,
    held: std::ops::Range<usize>,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        for stripe in self.held.clone().rev() {
            // SAFETY: a lock of our tranche that with_lock acquired, released exactly once.
            unsafe { pg_sys::LWLockRelease(&raw mut (*self.locks.add(stripe)).lock) }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Shared,
    Exclusive,
}

/// Run `f` with the wsusage lock held. `f` must not raise, allocate, log or wait.
/// Returns `None` when the library was not preloaded (no shared memory).
pub fn with_lock<R>(mode: Mode, f: impl FnOnce(&mut Locked<'_>) -> R) -> Option<R> {
    let shared = SHARED.load(Ordering::Acquire);
    if shared.is_null() {
        return None;
    }
    // SAFETY: `shared` points at the struct created in shmem_startup, alive as long as the
    // postmaster's shared memory; its `locks` was set there and never changes.
    let locks = unsafe { (*shared).locks };
    // A shared holder takes its stripe's lock; an exclusive one takes them all, in stripe order,
    // so exclusive holders cannot deadlock one another.
    let (held, lw_mode) = match mode {
        Mode::Shared => {
            let mine = stripes::mine();
            (mine..mine + 1, pg_sys::LWLockMode::LW_SHARED)
        }
        Mode::Exclusive => (0..STRIPES, pg_sys::LWLockMode::LW_EXCLUSIVE),
    };
    for stripe in held.clone() {
        // SAFETY: one of the tranche's STRIPES locks; released by the guard below, or by
        // PostgreSQL's LWLockReleaseAll should this process error out.
        unsafe { pg_sys::LWLockAcquire(&raw mut (*locks.add(stripe)).lock, lw_mode) };
    }
    let _release = ReleaseOnDrop { locks, held };
    // SAFETY: holding the lock gives us the access the module header promises; a shared-mode
    // holder changes only what the header lists, atomically (and a place it claimed in the table,
    // which no other process reads until it is published). Other processes' references live in
    // other address spaces; in this one, no other Locked exists while the lock is held.
    Some(f(&mut unsafe { locked_view(shared) }))
}

/// The condition variable broadcast after every flush, or `None` when not preloaded.
pub fn flushed_cv() -> Option<*mut pg_sys::ConditionVariable> {
    let shared = SHARED.load(Ordering::Acquire);
    // SAFETY: as in with_lock; we take the address only, the CV synchronises itself.
    (!shared.is_null()).then(|| unsafe { addr_of_mut!((*shared).flushed) })
}
