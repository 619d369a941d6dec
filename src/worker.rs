//! The background worker: registration, and a main loop in autoprewarm's order.
//!
//! 1. install signal handlers (SIGHUP: reload settings; SIGTERM: final flush, then exit);
//! 2. connect to `wsusage.database` and announce itself in shared memory (marks can now wake it);
//! 3. loop until SIGTERM: reload settings if asked, flush when the interval has passed, a
//!    `wsusage_flush()` caller is waiting, or the set passed its high-water mark; otherwise sleep
//!    on the latch until the next deadline;
//! 4. one final flush, so a clean shutdown loses nothing, then exit with code 1 so that the
//!    postmaster restarts it after `pg_terminate_backend` (exit code 0 would unregister it).

use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;

use crate::flush::{self, Flusher};
use crate::pending;
use crate::rendezvous;
use crate::settings;
use crate::stats;

/// Seconds the postmaster waits before restarting the worker after it exits or fails. Short,
/// because marks wait in memory while no worker runs; long enough that a worker failing at once
/// (its database dropped, say) does not flood the log.
const RESTART_DELAY: Duration = Duration::from_secs(5);

pub fn register() {
    BackgroundWorkerBuilder::new("wsusage flush worker")
        .set_type("wsusage")
        .set_library("wsusage")
        .set_function("wsusage_worker_main")
        .enable_spi_access()
        // Never on a hot standby (it could not write); it starts when the standby is promoted.
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(RESTART_DELAY))
        .load();
}

fn shutdown_requested() -> bool {
    // SAFETY: a sig_atomic_t set by the SIGTERM handler pgrx installs; a plain volatile read.
    unsafe { (&raw const pg_sys::ShutdownRequestPending).read_volatile() != 0 }
}

/// Returns whether the settings were reloaded.
fn reload_settings_if_asked() -> bool {
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

/// Make the session follow the settings, and say at once if the target does not fit: at start
/// and after every reload.
fn apply_settings(flusher: &mut Flusher) {
    flush::apply_session_settings();
    flush::validate_target(flusher);
}

#[pg_guard]
unsafe extern "C-unwind" fn detach_on_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    rendezvous::detach_worker();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn wsusage_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = settings::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    // SAFETY: plain calls on this process's own state; the exit callback is registered once.
    unsafe {
        pg_sys::pgstat_report_appname(c"wsusage".as_ptr());
        rendezvous::attach_worker();
        pg_sys::before_shmem_exit(Some(detach_on_exit), pg_sys::Datum::from(0));
    }
    log!(
        "wsusage worker started: flushing pending marks to database \"{database}\" every {} ms",
        settings::flush_interval().as_millis()
    );

    let mut flusher = Flusher::new();
    apply_settings(&mut flusher);
    // Marks carried over from a previous worker (or made before this one started) go out at once.
    let mut last_flush: Option<Instant> = None;
    while !shutdown_requested() {
        if reload_settings_if_asked() {
            apply_settings(&mut flusher);
        }
        let interval = settings::flush_interval();
        let next_flush = last_flush.map_or_else(Instant::now, |at| at + interval);
        let past_high_water =
            stats::consecutive_failures() == 0 && pending::len().unwrap_or(0) >= pending::high_water_mark();
        if Instant::now() >= next_flush || rendezvous::flush_requested() || past_high_water {
            flusher.flush();
            last_flush = Some(Instant::now());
            continue;
        }
        let timeout_ms = next_flush.saturating_duration_since(Instant::now()).as_millis().max(1);
        // SAFETY: waiting on our own latch; WL_EXIT_ON_PM_DEATH ends the process should the
        // postmaster die. The latch is reset before the loop re-checks every condition, so no
        // wake-up is lost.
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                std::ffi::c_long::try_from(timeout_ms).unwrap_or(std::ffi::c_long::MAX),
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
            // A cancel (pg_cancel_backend, or a statement timeout that fired just after a chunk
            // ended) has no statement to cancel while idle: drop it instead of raising an ERROR
            // that would end the worker.
            (&raw mut pg_sys::QueryCancelPending).write_volatile(0);
        }
        check_for_interrupts!();
    }

    // Whatever was marked up to now must not wait for the next server start (or be lost).
    flusher.flush();
    log!("wsusage worker shutting down after its final flush");
    // SAFETY: ends this process; exit code 1 asks the postmaster to restart the worker unless
    // the server is shutting down.
    unsafe { pg_sys::proc_exit(1) }
}
