//! The launcher: a background worker, started with the server, that connects to no database and
//! starts one flush worker per database with marks pending (dynamic background workers,
//! connected by OID), at most `wsusage.max_workers` at once. The first mark of a database wakes
//! it, so a worker is there for the final flush at shutdown, when no worker can start any more;
//! the worker itself times its flushes. Beyond the cap, a database whose flush is due (its
//! interval has passed, a `wsusage_flush()` caller waits, or the set is past its high-water
//! mark) gets a place from a worker whose database is not due, which leaves without flushing.
//!
//! Each round the launcher also reads `pg_database` (a shared catalog, so no
//! database connection is needed, as for PostgreSQL's own logical replication launcher): the
//! marks of a database that no longer exists are discarded and counted (`ids_discarded`), never
//! applied elsewhere. A database whose worker cannot start or connect is retried after a delay,
//! and its `wsusage_flush()` callers are told why; it never holds up another database, since
//! each has its own worker.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::prelude::*;

use crate::clock::now;
use crate::processes::plan::{plan, Round};
use crate::processes::worker;
use crate::settings;
use crate::state::counting;
use crate::state::databases;
use crate::state::pending;
use crate::state::rendezvous;

/// Seconds the postmaster waits before restarting the launcher after it exits or fails.
const RESTART_DELAY: Duration = Duration::from_secs(5);

/// Longest the launcher sleeps: it notices due databases, dropped ones and stopped workers at
/// least this often (a stopped worker or a mark past the high-water mark wakes it at once).
const ROUND_INTERVAL: Duration = Duration::from_secs(1);

/// How long a database whose worker could not start or connect waits before the next attempt.
const RETRY_DELAY: Duration = Duration::from_secs(5);

/// Attempts to connect, a second apart, before a database's `wsusage_flush()` callers are told
/// its worker cannot connect: a worker that starts while ALTER DATABASE … RENAME runs is turned
/// away once ("it seems to have just been dropped or renamed") and connects at the next try.
const CONNECT_ATTEMPTS: u32 = 3;
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// How often a database whose extension was dropped with marks pending is looked at again (at
/// least every flush interval): a worker that finds the extension back flushes the marks.
const EXTENSION_RETRY: Duration = Duration::from_secs(60);

fn extension_retry_delay() -> Duration {
    EXTENSION_RETRY.max(settings::flush_interval())
}

/// `datconnlimit` of a database left invalid by an interrupted DROP DATABASE.
const DATCONNLIMIT_INVALID_DB: i32 = -2;

pub fn register() {
    BackgroundWorkerBuilder::new("wsusage launcher")
        .set_type("wsusage launcher")
        .set_library("wsusage")
        .set_function("wsusage_launcher_main")
        .enable_spi_access()
        // Never on a hot standby (nothing could be written); it starts when the standby is
        // promoted.
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(RESTART_DELAY))
        .load();
}

#[pg_guard]
unsafe extern "C-unwind" fn detach_on_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    rendezvous::detach_launcher();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn wsusage_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // No database: the launcher reads only the shared catalog pg_database.
    BackgroundWorker::connect_worker_to_spi(None, None);
    rendezvous::attach_launcher();
    // SAFETY: registers our exit callback once, in this process.
    unsafe { pg_sys::before_shmem_exit(Some(detach_on_exit), pg_sys::Datum::from(0)) };
    log!(
        "wsusage launcher started: flushing pending marks every {} ms with up to {} workers",
        settings::flush_interval().as_millis(),
        settings::max_workers()
    );
    let mut launcher = Launcher::default();
    while !worker::shutdown_requested() {
        worker::reload_settings_if_asked();
        launcher.round();
        worker::wait(ROUND_INTERVAL);
    }
    // Running workers get the shutdown signal from the postmaster themselves and make their
    // final flushes; no new worker can start during a shutdown.
    // SAFETY: ends this process; exit code 1 asks the postmaster to restart the launcher unless
    // the server is shutting down.
    unsafe { pg_sys::proc_exit(1) }
}

struct Started {
    handle: worker::Handle,
    /// The slot's `worker_starts` when this worker was launched: unchanged after it stopped
    /// means it never got connected.
    starts_before: u64,
}

/// What the launcher keeps of one database from a round to the next.
#[derive(Default)]
struct Known {
    /// The worker this launcher started and has not yet seen stop.
    started: Option<Started>,
    /// Its worker could not start or connect: when to try again.
    retry_at: Option<Instant>,
    /// Its extension was dropped with marks pending: when to look again.
    extension_retry_at: Option<Instant>,
    /// How many of its workers in a row could not connect.
    connect_failures: u32,
}

impl Known {
    fn is_forgettable(&self) -> bool {
        self.started.is_none()
            && self.retry_at.is_none()
            && self.extension_retry_at.is_none()
            && self.connect_failures == 0
    }
}

#[derive(Default)]
struct Launcher {
    databases: HashMap<pg_sys::Oid, Known>,
    /// Whether the last failure to register a worker was logged, so a lasting shortage of
    /// background worker slots is said once.
    register_failure_logged: bool,
    /// Whether a refused `wsusage.role` (or `wsusage.database`) was logged.
    refused_setting_logged: bool,
}

impl Launcher {
    fn round(&mut self) {
        let mut views = databases::views(settings::max_databases());
        let failed = self.reap(&views);
        self.forget_dropped(&mut views);
        for database in failed {
            if !views.iter().any(|view| view.database == database) {
                continue;
            }
            let known = self.databases.entry(database).or_default();
            known.connect_failures += 1;
            if known.connect_failures < CONNECT_ATTEMPTS {
                known.retry_at = Some(Instant::now() + RECONNECT_DELAY);
            } else {
                let message = format!("wsusage flush worker could not connect to database {}", database.to_u32());
                self.worker_unavailable(database, PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE, &message);
            }
        }
        self.start_due(&views);
        self.databases.retain(|_, known| !known.is_forgettable());
    }

    /// Forget the workers that stopped; returns the databases whose worker stopped without ever
    /// attaching (it could not connect).
    fn reap(&mut self, views: &[databases::SlotView]) -> Vec<pg_sys::Oid> {
        let mut failed = Vec::new();
        for (database, known) in &mut self.databases {
            let Some(started) = known.started.take_if(|started| started.handle.stopped()) else { continue };
            let starts = views.iter().find(|view| view.database == *database).map(|view| view.worker_starts);
            if starts.is_some_and(|starts| starts == started.starts_before) {
                failed.push(*database);
            } else {
                known.connect_failures = 0;
            }
        }
        failed
    }

    /// Discard the marks of databases that no longer exist.
    fn forget_dropped(&mut self, views: &mut Vec<databases::SlotView>) {
        if views.is_empty() {
            return;
        }
        let existing = existing_databases();
        views.retain(|view| {
            // A worker still attached is connected to its database: it exists, or is being
            // dropped and the worker is on its way out.
            if existing.contains(&view.database) || view.worker_pid != 0 {
                return true;
            }
            let discarded = pending::discard(view.database);
            // Said in the log before it shows in wsusage_stats: whoever sees the count finds the
            // message.
            log!(
                "wsusage discarded {discarded} pending ids of database {}, which no longer exists",
                view.database.to_u32()
            );
            counting::count_discarded(discarded);
            if let Some(known) = self.databases.get_mut(&view.database) {
                // What it started, if anything, is still reaped.
                *known = Known { started: known.started.take(), ..Known::default() };
            }
            false
        });
    }

    /// Tell the database's callers and the DBA that no worker could serve it, and wait a while
    /// before the next attempt.
    fn worker_unavailable(&mut self, database: pg_sys::Oid, code: PgSqlErrorCode, message: &str) {
        counting::record_problem(database, None, message, now());
        rendezvous::fail_waiting(database, code as i32, message);
        self.databases.entry(database).or_default().retry_at = Some(Instant::now() + RETRY_DELAY);
    }

    /// Start a worker for each database that needs one, as [`plan`] says, and ask workers to
    /// give their places to due databases.
    fn start_due(&mut self, views: &[databases::SlotView]) {
        let now_instant = Instant::now();
        // A database whose extension was dropped (its last worker left for want of it) gets a
        // worker again at once when someone marks there or waits on wsusage_flush(), both of
        // which need the extension back; otherwise only now and then, to find it re-created.
        for view in views {
            let known = self.databases.entry(view.database).or_default();
            if view.extension_missing {
                known.extension_retry_at.get_or_insert_with(|| now_instant + extension_retry_delay());
            } else {
                known.extension_retry_at = None;
            }
        }
        let known = &self.databases;
        let round = Round {
            now: now(),
            interval_us: settings::flush_interval_us(),
            high_water: pending::high_water_mark(),
            max_workers: settings::max_workers(),
        };
        let decided = plan(
            views,
            &round,
            |database| known.get(&database).is_some_and(|known| known.started.is_some()),
            |view| {
                let known = known.get(&view.database);
                let retry_due = known.and_then(|known| known.retry_at).is_none_or(|at| now_instant >= at);
                let extension_looked_for = !view.extension_missing
                    || view.waiting
                    || known.and_then(|known| known.extension_retry_at).is_some_and(|at| now_instant >= at);
                // A database being dropped, renamed or copied would turn a new worker away
                // (FATAL); once dropped, its marks are discarded in a later round.
                retry_due && extension_looked_for && !databases::is_being_changed(view.database)
            },
        );
        for database in decided.start {
            if let Some(view) = views.iter().find(|view| view.database == database) {
                self.start(view);
            }
        }
        for database in decided.ask_to_yield {
            databases::request_yield(database);
        }
        // Running workers flush early too when the set is past its high-water mark.
        if decided.wake_running {
            for view in views.iter().filter(|view| !view.worker_latch.is_null()) {
                // SAFETY: a latch in a PGPROC, in shared memory for the server's lifetime.
                unsafe { pg_sys::SetLatch(view.worker_latch) };
            }
        }
    }

    fn start(&mut self, view: &databases::SlotView) {
        if let Some(setting) = settings::refused() {
            let message = format!("no wsusage flush worker runs: the server refused the value of \"{setting}\"");
            if !self.refused_setting_logged {
                warning!("{message}; {} The marks stay pending.", settings::refused_detail(setting));
                self.refused_setting_logged = true;
            }
            self.worker_unavailable(view.database, PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, &message);
            return;
        }
        // SAFETY: a plain read of this process's pid.
        let launcher_pid = unsafe { pg_sys::MyProcPid };
        match worker::start(view.database, launcher_pid) {
            Some(handle) => {
                let known = self.databases.entry(view.database).or_default();
                known.started = Some(Started { handle, starts_before: view.worker_starts });
                known.retry_at = None;
                known.extension_retry_at = None;
                self.register_failure_logged = false;
            }
            None => {
                let message = "could not start a wsusage flush worker: no background worker slot is free";
                if !self.register_failure_logged {
                    warning!("{message}; raise \"max_worker_processes\" (the marks stay pending)");
                    self.register_failure_logged = true;
                }
                self.worker_unavailable(view.database, PgSqlErrorCode::ERRCODE_INSUFFICIENT_RESOURCES, message);
            }
        }
    }
}

/// OIDs of the databases that exist and are valid, read from the shared catalog pg_database.
fn existing_databases() -> HashSet<pg_sys::Oid> {
    let mut existing = HashSet::new();
    // SAFETY: a catalog scan in a transaction of its own, as autovacuum's launcher reads the
    // database list; pg_database is a shared catalog, readable without a database connection.
    // GETSTRUCT points at the tuple's fixed-size columns, which FormData_pg_database describes.
    unsafe {
        pg_sys::StartTransactionCommand();
        let _ = pg_sys::GetTransactionSnapshot();
        let lockmode = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let relation = pg_sys::table_open(pg_sys::DatabaseRelationId, lockmode);
        let scan = pg_sys::table_beginscan_catalog(relation, 0, std::ptr::null_mut());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let form = pg_sys::GETSTRUCT(tuple).cast::<pg_sys::FormData_pg_database>();
            if (*form).datconnlimit != DATCONNLIMIT_INVALID_DB {
                existing.insert((*form).oid);
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(relation, lockmode);
        pg_sys::CommitTransactionCommand();
    }
    existing
}
