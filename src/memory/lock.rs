//! The wsusage lock: one LWLock per stripe (see `stripes`) in the named tranche "wsusage".
//!
//! A process takes it in shared mode by taking its stripe's LWLock shared, and in exclusive mode
//! by taking every stripe's, in stripe order (so exclusive holders cannot deadlock one another),
//! releasing them in reverse. Exclusive thus excludes every shared holder, and shared holders on
//! different stripes write no common cache line to get in. What the lock guards, and what each
//! mode allows, is `layout`'s to say.

use std::ffi::CStr;

use pgrx::pg_sys;

use crate::memory::stripes::{self, STRIPES};

const TRANCHE_NAME: &CStr = c"wsusage";

// PostgreSQL's LWLockAcquire and LWLockRelease, declared here without pgrx's guard, which costs
// each call a sigsetjmp: every mark takes and releases the lock once, and the two guards were 2.7% of
// the profile of a statement marking pending ids (the LWLock calls themselves 9%). Neither raises an ERROR where we call them: LWLockAcquire raises only when
// a process already holds MAX_SIMULTANEOUS_LWLOCKS (200) LWLocks, and we take at most STRIPES (16)
// and never within another hold of ours, from code that holds no LWLock of its own (a SQL
// function, the worker's or the launcher's loop, a transaction callback after the commit);
// LWLockRelease only for a lock not held, and `Guard` releases exactly what was taken. (A failure
// to wait on the process's semaphore is FATAL, which exits the process without unwinding.)
unsafe extern "C" {
    #[link_name = "LWLockAcquire"]
    fn lwlock_acquire_unguarded(lock: *mut pg_sys::LWLock, mode: pg_sys::LWLockMode::Type) -> bool;
    #[link_name = "LWLockRelease"]
    fn lwlock_release_unguarded(lock: *mut pg_sys::LWLock);
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Shared,
    Exclusive,
}

/// Ask for the tranche. Only where PostgreSQL accepts it: `_PG_init` (14) or the shmem request
/// hook (15+).
///
/// # Safety
/// Called from one of those two places.
pub unsafe fn request() {
    // SAFETY: the caller's promise.
    unsafe { pg_sys::RequestNamedLWLockTranche(TRANCHE_NAME.as_ptr(), STRIPES as i32) };
}

/// The tranche's first LWLock, once shared memory exists.
///
/// # Safety
/// In the shmem startup hook, after [`request`] was honoured.
pub unsafe fn tranche() -> *mut pg_sys::LWLockPadded {
    // SAFETY: the caller's promise; the tranche was requested with STRIPES locks.
    unsafe { pg_sys::GetNamedLWLockTranche(TRANCHE_NAME.as_ptr()) }
}

/// The stripes' locks this process holds, released when dropped (last taken, first released).
pub struct Guard {
    locks: *mut pg_sys::LWLockPadded,
    stripes: std::ops::Range<usize>,
}

/// Whether this process holds the lock, in debug builds (the tests'): taking it again while
/// holding it would wait on ourselves forever, with interrupts held (an exclusive request behind
/// our own shared hold, or our own exclusive hold), so a nested `with_*` is caught at once.
#[cfg(debug_assertions)]
static HOLDING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Drop for Guard {
    fn drop(&mut self) {
        #[cfg(debug_assertions)]
        HOLDING.store(false, std::sync::atomic::Ordering::Relaxed);
        for stripe in self.stripes.clone().rev() {
            // SAFETY: a lock of our tranche that acquire() took, released exactly once; it cannot
            // raise (see the declaration).
            unsafe { lwlock_release_unguarded(&raw mut (*self.locks.add(stripe)).lock) }
        }
    }
}

/// Take the lock in `mode`.
///
/// # Safety
/// `locks` is what [`tranche`] returned.
pub unsafe fn acquire(locks: *mut pg_sys::LWLockPadded, mode: Mode) -> Guard {
    #[cfg(debug_assertions)]
    assert!(
        !HOLDING.swap(true, std::sync::atomic::Ordering::Relaxed),
        "the wsusage lock taken again by the process that holds it: it would wait on itself"
    );
    let (stripes, lw_mode) = match mode {
        Mode::Shared => {
            let mine = stripes::mine();
            (mine..mine + 1, pg_sys::LWLockMode::LW_SHARED)
        }
        Mode::Exclusive => (0..STRIPES, pg_sys::LWLockMode::LW_EXCLUSIVE),
    };
    for stripe in stripes.clone() {
        // SAFETY: one of the tranche's STRIPES locks (the caller's promise); released by Guard,
        // or by PostgreSQL's LWLockReleaseAll should this process error out. It cannot raise
        // here (see the declaration).
        unsafe { lwlock_acquire_unguarded(&raw mut (*locks.add(stripe)).lock, lw_mode) };
    }
    Guard { locks, stripes }
}
