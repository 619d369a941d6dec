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
use crate::errors;
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

#[derive(Default)]
struct Launcher {
    /// Workers this launcher started and has not yet seen stop.
    started: HashMap<pg_sys::Oid, Started>,
    /// Databases whose worker could not start or connect, and when to try again.
    retry_at: HashMap<pg_sys::Oid, Instant>,
    /// Databases whose extension was dropped with marks pending, and when to look again.
    extension_retry_at: HashMap<pg_sys::Oid, Instant>,
    /// Databases whose last workers could not connect, and how many in a row.
    connect_failures: HashMap<pg_sys::Oid, u32>,
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
            let failures = self.connect_failures.entry(database).or_default();
            *failures += 1;
            if *failures < CONNECT_ATTEMPTS {
                self.retry_at.insert(database, Instant::now() + RECONNECT_DELAY);
            } else {
                let message = format!("wsusage flush worker could not connect to database {}", database.to_u32());
                self.worker_unavailable(database, PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE, &message);
            }
        }
        self.start_due(&views);
    }

    /// Forget the workers that stopped; returns the databases whose worker stopped without ever
    /// attaching (it could not connect).
    fn reap(&mut self, views: &[databases::SlotView]) -> Vec<pg_sys::Oid> {
        let mut failed = Vec::new();
        self.started.retain(|database, started| {
            if !started.handle.stopped() {
                return true;
            }
            let starts = views.iter().find(|view| view.database == *database).map(|view| view.worker_starts);
            if starts.is_some_and(|starts| starts == started.starts_before) {
                failed.push(*database);
            } else {
                self.connect_failures.remove(database);
            }
            false
        });
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
            self.retry_at.remove(&view.database);
            self.extension_retry_at.remove(&view.database);
            self.connect_failures.remove(&view.database);
            false
        });
    }

    /// Tell the database's callers and the DBA that no worker could serve it, and wait a while
    /// before the next attempt.
    fn worker_unavailable(&mut self, database: pg_sys::Oid, code: PgSqlErrorCode, message: &str) {
        counting::record_problem(database, None, message, now());
        rendezvous::fail_waiting(database, code as i32, message);
        self.retry_at.insert(database, Instant::now() + RETRY_DELAY);
    }

    fn start_due(&mut self, views: &[databases::SlotView]) {
        // A database whose extension was dropped (its last worker left for want of it) gets a
        // worker again at once when someone marks there or waits on wsusage_flush(), both of
        // which need the extension back; otherwise only now and then, to find it re-created.
        for view in views {
            if view.extension_missing {
                self.extension_retry_at
                    .entry(view.database)
                    .or_insert_with(|| Instant::now() + extension_retry_delay());
            } else {
                self.extension_retry_at.remove(&view.database);
            }
        }
        let extension_looked_for = |view: &databases::SlotView| {
            !view.extension_missing
                || view.waiting
                || self.extension_retry_at.get(&view.database).is_some_and(|at| Instant::now() >= *at)
        };
        let now = now();
        let interval_us = settings::flush_interval_us();
        // Past the high-water mark, the databases holding an even share of the set or more are
        // due at once (see pending::past_high_water_for).
        let total: u64 = views.iter().map(|view| view.pending).sum();
        let busy = views.iter().filter(|view| view.pending > 0).count() as u64;
        let past_high_water = total as usize >= pending::high_water_mark();
        let is_due = |view: &databases::SlotView| {
            view.waiting
                || (past_high_water && pending::holds_even_share(view.pending, busy, total))
                || view.interval_start.saturating_add(interval_us) <= now
        };
        let has_place = |view: &&databases::SlotView| view.worker_pid != 0 || self.started.contains_key(&view.database);
        let mut running = views.iter().filter(has_place).count();
        let mut wanting: Vec<&databases::SlotView> = views
            .iter()
            .filter(|view| !has_place(view) && (view.waiting || view.pending > 0))
            .filter(|view| self.retry_at.get(&view.database).is_none_or(|at| Instant::now() >= *at))
            .filter(|view| extension_looked_for(view))
            // A database being dropped, renamed or copied would turn a new worker away (FATAL);
            // once dropped, its marks are discarded in a later round.
            .filter(|view| !databases::is_being_changed(view.database))
            .collect();
        // Due databases first, the longest waiting first among them.
        wanting.sort_by_key(|view| (!is_due(view), view.interval_start));
        // Places already being given up, and the workers that could give theirs: attached, not
        // due, the most recently flushed last (popped first).
        let mut being_freed = views.iter().filter(|view| view.worker_pid != 0 && view.yield_requested).count();
        let mut could_yield: Vec<&databases::SlotView> =
            views.iter().filter(|view| view.worker_pid != 0 && !view.yield_requested && !is_due(view)).collect();
        could_yield.sort_by_key(|view| view.interval_start);

        for view in wanting {
            if running < settings::max_workers() {
                self.start(view);
                running += 1;
            } else if is_due(view) {
                if being_freed > 0 {
                    being_freed -= 1;
                } else if let Some(yielding) = could_yield.pop() {
                    databases::request_yield(yielding.database);
                }
            }
        }

        // Running workers flush early too when the set is past its high-water mark.
        if past_high_water {
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
                warning!("{message}; {} The marks stay pending.", errors::setting_refused_detail(setting));
                self.refused_setting_logged = true;
            }
            self.worker_unavailable(view.database, PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, &message);
            return;
        }
        // SAFETY: a plain read of this process's pid.
        let launcher_pid = unsafe { pg_sys::MyProcPid };
        match worker::start(view.database, launcher_pid) {
            Some(handle) => {
                self.started.insert(view.database, Started { handle, starts_before: view.worker_starts });
                self.retry_at.remove(&view.database);
                self.extension_retry_at.remove(&view.database);
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
