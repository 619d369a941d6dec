//! When a transaction that wrote `wsusage_target` commits, the targets' published declarations
//! of its database are invalidated (see `published`) — after the commit, once what it wrote is
//! visible to every new snapshot, so that no backend can read the old rows under the new ticket.
//!
//! `wsusage_target`'s trigger notes the change ([`note`]); a transaction callback acts on it at
//! the end of the transaction. A transaction that wrote `wsusage_target` cannot be prepared for
//! two-phase commit: its commit would happen in another session (COMMIT PREPARED), which knows
//! nothing of the change.

use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::pg_sys;
use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::PgLogLevel;

use crate::targets::published;

/// The current transaction wrote `wsusage_target`.
static CHANGED: AtomicBool = AtomicBool::new(false);
static CALLBACK_REGISTERED: AtomicBool = AtomicBool::new(false);

/// Whether the current transaction has written `wsusage_target`: it sees rows nobody else does
/// (yet, or ever, if it rolls back), so what it reads must not be published, and what was
/// published may not be what it sees.
pub fn uncommitted() -> bool {
    CHANGED.load(Ordering::Relaxed)
}

/// The current transaction writes `wsusage_target`: invalidate the database's published
/// declarations once it commits.
pub fn note() {
    CHANGED.store(true, Ordering::Relaxed);
    if !CALLBACK_REGISTERED.swap(true, Ordering::Relaxed) {
        // SAFETY: a callback with static lifetime, registered once per process.
        unsafe { pg_sys::RegisterXactCallback(Some(at_end_of_transaction), std::ptr::null_mut()) };
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn at_end_of_transaction(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_PREPARE if CHANGED.load(Ordering::Relaxed) => {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "cannot PREPARE a transaction that has written wsusage_target",
                "changes::at_end_of_transaction",
            )
            .set_hint("Change wsusage_target in a transaction of its own, committed directly.")
            .report(PgLogLevel::ERROR);
        }
        // After the commit: what it wrote is visible to every snapshot taken from now on.
        XACT_EVENT_COMMIT if CHANGED.swap(false, Ordering::Relaxed) => {
            // SAFETY: a plain read of the backend's database, set once it connected.
            published::invalidate(unsafe { pg_sys::MyDatabaseId });
        }
        XACT_EVENT_COMMIT
        | XACT_EVENT_PARALLEL_COMMIT
        | XACT_EVENT_ABORT
        | XACT_EVENT_PARALLEL_ABORT
        | XACT_EVENT_PREPARE => CHANGED.store(false, Ordering::Relaxed),
        _ => {}
    }
}
