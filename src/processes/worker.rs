//! A flush worker: one per database with marks pending, started by the launcher as soon as the
//! database has some, connected to that database by OID. Being there before it is needed, it
//! makes the final flush of its database when the server shuts down. Its main loop follows autoprewarm's order:
//!
//! 1. install signal handlers (SIGHUP: reload settings; SIGTERM: final flush, then exit);
//! 2. connect to its database and announce itself in the database's slot (requests now wake it);
//! 3. loop until SIGTERM: reload settings if asked, flush when the interval has passed, a
//!    `wsusage_flush()` caller is waiting, or the set passed its high-water mark; otherwise sleep
//!    on the latch until the next deadline;
//! 4. one final flush, so a clean shutdown loses nothing, then exit.
//!
//! A worker also leaves, without a final flush, when the database is being dropped, renamed or
//! copied (so `DROP DATABASE` never waits for it), after a flush that found nothing marked for a
//! whole interval (a quiet database gives its place back), when the extension is not installed
//! in the database (dropped with marks pending: they stay, and need no worker until it is back),
//! and when the launcher asks it to give
//! its place to a database whose flush is due while its own is not (so that, with more databases
//! than `wsusage.max_workers`, they take turns). The launcher starts a new one when the database
//! has marks again.

use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;

use crate::clock::now;
use crate::flush::round::{self, Flusher};
use crate::flush::transaction;
use crate::settings;
use crate::state::counting;
use crate::state::databases;
use crate::state::pending;
use crate::state::rendezvous;

/// Longest a worker sleeps without checking whether its database is being dropped: well inside
/// the 5 seconds `DROP DATABASE` waits for other sessions to leave.
const DATABASE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A started flush worker, as the launcher that started it sees it.
pub struct Handle(*mut pg_sys::BackgroundWorkerHandle);

impl Handle {
    /// Whether the worker has stopped (or the postmaster died).
    pub fn stopped(&self) -> bool {
        let mut pid = 0;
        // SAFETY: a handle RegisterDynamicBackgroundWorker gave us, not yet freed.
        let status = unsafe { pg_sys::GetBackgroundWorkerPid(self.0, &mut pid) };
        matches!(status, pg_sys::BgwHandleStatus::BGWH_STOPPED | pg_sys::BgwHandleStatus::BGWH_POSTMASTER_DIED)
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The launcher starts workers for as long as the server runs: give each handle back.
        // SAFETY: palloc'd by RegisterDynamicBackgroundWorker, freed once, here.
        unsafe { pg_sys::pfree(self.0.cast()) }
    }
}

/// Start a flush worker for `database`; the launcher (`notify_pid`) is told when it stops.
/// `None` when no background worker slot is free.
pub fn start(database: pg_sys::Oid, notify_pid: i32) -> Option<Handle> {
    let builder = BackgroundWorkerBuilder::new(&format!("wsusage flush worker for database {}", database.to_u32()))
        .set_type("wsusage")
        .set_library("wsusage")
        .set_function("wsusage_worker_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .set_argument(Some(pg_sys::Datum::from(database.to_u32())))
        .set_notify_pid(notify_pid);
    let mut worker = pg_sys::BackgroundWorker::from(&builder);
    let mut handle = std::ptr::null_mut();
    // SAFETY: a fully built registration; on success PostgreSQL sets `handle` to a palloc'd
    // handle, which Handle frees.
    unsafe { pg_sys::RegisterDynamicBackgroundWorker(&mut worker, &mut handle) }.then(|| Handle(handle))
}

pub(crate) fn shutdown_requested() -> bool {
    // SAFETY: a sig_atomic_t set by the SIGTERM handler pgrx installs; a plain volatile read.
    unsafe { (&raw const pg_sys::ShutdownRequestPending).read_volatile() != 0 }
}

/// Returns whether the settings were reloaded.
pub(crate) fn reload_settings_if_asked() -> bool {
    // SAFETY: ConfigReloadPending is a sig_atomic_t set by the SIGHUP handler; we clear it
    // before reloading, as PostgreSQL's own processes do, so a signal arriving during the
    // reload triggers another one.
    unsafe {
        if (&raw const pg_sys::ConfigReloadPending).read_volatile() == 0 {
            return false;
        }
        (&raw mut pg_sys::ConfigReloadPending).write_volatile(0);
        pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
    }
    true
}

/// Sleep on this process's latch for at most `timeout`; exits the process should the
/// postmaster die.
pub(crate) fn wait(timeout: Duration) {
    let timeout_ms = std::ffi::c_long::try_from(timeout.as_millis().max(1)).unwrap_or(std::ffi::c_long::MAX);
    // SAFETY: waiting on our own latch; WL_EXIT_ON_PM_DEATH ends the process should the
    // postmaster die. The latch is reset before the caller re-checks every condition, so no
    // wake-up is lost.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            timeout_ms,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
        // A cancel (pg_cancel_backend, or a statement timeout that fired just after a chunk
        // ended) has no statement to cancel while idle: drop it instead of raising an ERROR
        // that would end the process.
        (&raw mut pg_sys::QueryCancelPending).write_volatile(0);
    }
    check_for_interrupts!();
}

/// Make the session follow the settings, and say at once if the target does not fit: at start
/// and after every reload.
fn apply_settings(flusher: &mut Flusher) {
    transaction::apply_session_settings();
    round::validate_targets(flusher);
}

#[pg_guard]
unsafe extern "C-unwind" fn detach_on_exit(_code: std::ffi::c_int, arg: pg_sys::Datum) {
    rendezvous::detach_worker(pg_sys::Oid::from(arg.value() as u32));
}

/// Why the main loop ended.
enum Exit {
    Shutdown,
    DatabaseChanging,
    Idle,
    GaveWay,
    ExtensionMissing,
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn wsusage_worker_main(arg: pg_sys::Datum) {
    let database = pg_sys::Oid::from(arg.value() as u32);
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // Read the configuration once more, at the loop's first turn (which also applies it): a
    // reload signalled while the postmaster was forking this process reached neither the
    // postmaster's copy of the settings that this process inherited nor a handler of its own.
    // SAFETY: sets the flag our SIGHUP handler would set; the loop below reloads on it.
    unsafe { (&raw mut pg_sys::ConfigReloadPending).write_volatile(1) };
    // A database dropped meanwhile ends this process here (FATAL); the launcher sees it stop.
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database), None);
    if !rendezvous::attach_worker(database) {
        // Another worker serves the database, or nothing of it is pending any more.
        // SAFETY: ends this process; a dynamic worker is never restarted by the postmaster.
        unsafe { pg_sys::proc_exit(0) }
    }
    // SAFETY: plain calls on this process's own state; the exit callback is registered once.
    unsafe {
        pg_sys::pgstat_report_appname(c"wsusage".as_ptr());
        pg_sys::before_shmem_exit(Some(detach_on_exit), pg_sys::Datum::from(database.to_u32()));
    }
    let mut flusher = Flusher::new(database);
    debug1!("wsusage flush worker started in database \"{}\"", flusher.database_name());

    let mut last_took = true;
    let exit = loop {
        if shutdown_requested() {
            break Exit::Shutdown;
        }
        if reload_settings_if_asked() {
            apply_settings(&mut flusher);
        }
        if databases::is_being_changed(database) {
            break Exit::DatabaseChanging;
        }
        // The interval runs from the database's first mark or last flush, whichever worker made it.
        let interval_us = settings::flush_interval_us();
        let until_due = pending::interval_start(database)
            .map_or(0, |start| start.saturating_add(interval_us).saturating_sub(now()));
        // Early only after a round that took ids: a set kept full by ids that cannot be written
        // now (rows locked, held back, a failing table) waits for the interval, not a busy loop.
        let past_high_water =
            last_took && counting::consecutive_failures(database) == 0 && pending::past_high_water_for(database);
        if until_due <= 0 || rendezvous::flush_requested(database) || past_high_water {
            let taken = flusher.flush();
            last_took = taken > 0;
            if flusher.extension_was_missing() {
                break Exit::ExtensionMissing;
            }
            if taken == 0 && pending::len_of(database) == 0 {
                break Exit::Idle;
            }
            continue;
        }
        // Not due: a database that is may have this place.
        if databases::yield_requested(database) {
            break Exit::GaveWay;
        }
        wait(Duration::from_micros(until_due.unsigned_abs()).min(DATABASE_CHECK_INTERVAL));
    };

    match exit {
        Exit::Shutdown if !databases::is_being_changed(database) => {
            // Whatever was marked up to now must not wait for the next server start (or be lost).
            flusher.flush();
            log!(
                "wsusage flush worker for database \"{}\" shutting down after its final flush",
                flusher.database_name()
            );
        }
        Exit::Shutdown | Exit::DatabaseChanging => log!(
            "wsusage flush worker is leaving database \"{}\": the database is being dropped, renamed or copied",
            flusher.database_name()
        ),
        Exit::Idle => debug1!("wsusage flush worker exiting: nothing was marked for a whole interval"),
        Exit::GaveWay => debug1!("wsusage flush worker giving its place to a database whose flush is due"),
        // Said by the flush; the launcher starts a worker again once the database is marked in.
        Exit::ExtensionMissing => rendezvous::detach_worker_for_missing_extension(database),
    }
    // SAFETY: ends this process; a dynamic worker is never restarted by the postmaster, the
    // launcher starts a new one when the database is due again.
    unsafe { pg_sys::proc_exit(0) }
}
