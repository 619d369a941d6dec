//! Getting shared memory from PostgreSQL: the hooks that reserve it (with the lock's tranche) at
//! server start, create the layout (see `memory::layout`) in it, bring back the set saved at the last
//! clean shutdown, and save it again when the postmaster exits (see `state::saved_set`).

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::memory::layout;
use crate::memory::lock;
use crate::settings;
use crate::state::saved_set;

const SHARED_NAME: &CStr = c"wsusage";
const PENDING_NAME: &CStr = c"wsusage pending";

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

/// Bytes of shared memory the extension reserves for `wsusage.max_pending` ids,
/// `wsusage.max_databases` databases and `wsusage.max_targets` targets.
pub fn total_size() -> usize {
    layout::shared_size(settings::max_databases(), settings::max_targets())
        + layout::pending_size(settings::max_pending())
}

fn request_shmem() {
    // SAFETY: called from _PG_init (14) or the shmem request hook (15+), the only places where
    // PostgreSQL accepts these requests.
    unsafe {
        pg_sys::RequestAddinShmemSpace(total_size());
        lock::request();
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
    // shared-memory creation against other libraries; ShmemInitStruct returns memory of the
    // requested size (MAXALIGNed), initialised by whoever finds it new; `publish` is given those
    // two allocations, and `postmaster_exclusive` runs in the postmaster before it forks a child.
    unsafe {
        let addin_shmem_init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(addin_shmem_init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);

        let (max_databases, max_targets) = (settings::max_databases(), settings::max_targets());
        let size = layout::shared_size(max_databases, max_targets);
        let mut found = false;
        let shared = pg_sys::ShmemInitStruct(SHARED_NAME.as_ptr(), size, &mut found).cast::<u8>();
        if !found {
            layout::create_shared(shared, max_databases, max_targets, lock::tranche(), pg_sys::GetCurrentTimestamp());
        }
        let max_pending = settings::max_pending();
        let mut table_found = false;
        let pending =
            pg_sys::ShmemInitStruct(PENDING_NAME.as_ptr(), layout::pending_size(max_pending), &mut table_found)
                .cast::<u8>();
        if !table_found {
            layout::create_pending(pending, max_pending, random_seed());
        }
        pg_sys::LWLockRelease(addin_shmem_init_lock);
        // The two allocations, made or found above with the sizes the settings give.
        layout::publish(shared, pending);

        // The postmaster, alone at this point, brings back what the last clean shutdown saved,
        // and saves what is pending when it exits.
        if !pg_sys::IsUnderPostmaster {
            if !found {
                // The postmaster at start: no child exists yet.
                layout::postmaster_exclusive(|state| saved_set::load(state, pg_sys::GetCurrentTimestamp()));
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
    // After a crash (non-zero code) shared memory is suspect, and reinitialised. An immediate
    // shutdown exits with 0 too, its children killed at any instruction: saved_set::save checks the
    // set itself before writing it.
    if code == 0 {
        // SAFETY: reads the clock.
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        // SAFETY: the postmaster's exit, after every child has gone (on_shmem_exit, registered
        // by the postmaster only).
        unsafe { layout::postmaster_exclusive(|state| saved_set::save(state, now)) };
    }
}
