//! What a DBA reads: `wsusage_stats()` (cluster-wide, and the `wsusage_stats` view),
//! `wsusage_stats_by_database()` and `wsusage_stats_by_target()` (and their views),
//! `wsusage_pending()`, and `wsusage_stats_reset()`. Reading works in any database and on a standby: it touches only
//! shared memory.
//!
//! The four set-returning functions are C entry points of our own rather than `#[pg_extern]`s,
//! and fill whatever columns the database's declaration of them asks for, by name (see `rows`):
//! every released version's SQL keeps working against this library, between a restart and
//! `ALTER EXTENSION wsusage UPDATE`. Their SQL, the current version's, is below.

use pgrx::pg_sys;
use pgrx::prelude::*;

use wsusage_pending_table::{Entry, Key};

use crate::memory::key::{self, Kind};
use crate::memory::message;
use crate::memory::stats::Stats;
use crate::settings;
use crate::sql::availability::this_database;
use crate::sql::availability::Unavailable;
use crate::sql::report::Report;
use crate::sql::rows::{self, Column, Value};
use crate::state::counting;
use crate::state::databases;
use crate::state::pending;

fn timestamp(micros: i64) -> Value {
    if micros == 0 {
        Value::Null
    } else {
        Value::Timestamptz(micros)
    }
}

fn count(value: u64) -> Value {
    Value::Int8(i64::try_from(value).unwrap_or(i64::MAX))
}

fn pid(pid: i32) -> Value {
    if pid == 0 {
        Value::Null
    } else {
        Value::Int4(pid)
    }
}

const fn column(name: &'static str, type_oid: pg_sys::Oid) -> Column {
    Column { name, type_oid }
}

/// The counters both views show, by column name.
fn counter(s: &Stats, name: &str) -> Option<Value> {
    Some(match name {
        "marks" => count(s.marks),
        "flushes" => count(s.flushes),
        "ids_flushed" => count(s.ids_flushed),
        "rows_updated" => count(s.rows_updated),
        "ids_without_row" => count(s.ids_without_row),
        "ids_skipped_locked" => count(s.ids_skipped_locked),
        "ids_skipped_by_min_change" => count(s.ids_skipped_by_min_change),
        "ids_discarded" => count(s.ids_discarded),
        "failures" => count(s.failures),
        "consecutive_failures" => count(s.consecutive_failures),
        "rejected" => count(s.rejected),
        "last_flush_at" => timestamp(s.last_flush_at),
        "last_flush_duration" if s.last_flush_at != 0 => Value::Interval(s.last_flush_duration_us),
        "last_flush_duration" => Value::Null,
        "last_error" => Some(message::read(&s.last_error)).filter(|m| !m.is_empty()).map_or(Value::Null, Value::Text),
        "last_error_at" => timestamp(s.last_error_at),
        "stats_reset" => timestamp(s.stats_reset),
        _ => return None,
    })
}

/// The counters both views return (see `memory::stats`).
const COUNTER_COLUMNS: &[Column] = &[
    column("marks", pg_sys::INT8OID),
    column("flushes", pg_sys::INT8OID),
    column("ids_flushed", pg_sys::INT8OID),
    column("rows_updated", pg_sys::INT8OID),
    column("ids_without_row", pg_sys::INT8OID),
    column("ids_skipped_locked", pg_sys::INT8OID),
    column("ids_skipped_by_min_change", pg_sys::INT8OID),
    column("ids_discarded", pg_sys::INT8OID),
    column("failures", pg_sys::INT8OID),
    column("consecutive_failures", pg_sys::INT8OID),
    column("rejected", pg_sys::INT8OID),
    column("last_flush_at", pg_sys::TIMESTAMPTZOID),
    column("last_flush_duration", pg_sys::INTERVALOID),
    column("last_error", pg_sys::TEXTOID),
    column("last_error_at", pg_sys::TIMESTAMPTZOID),
    column("stats_reset", pg_sys::TIMESTAMPTZOID),
];

const STATS_COLUMNS: &[Column] = &[
    column("pending", pg_sys::INT8OID),
    column("capacity", pg_sys::INT8OID),
    column("held_back", pg_sys::INT8OID),
    column("databases", pg_sys::INT8OID),
    column("workers", pg_sys::INT8OID),
    column("launcher_pid", pg_sys::INT4OID),
    // 0.1.0, one database: the flush worker's pid, which is now per database.
    column("worker_pid", pg_sys::INT4OID),
];

/// One row: what wsusage holds, has done and last failed at in the whole cluster, since server
/// start or the last `wsusage_stats_reset()`.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn wsusage_stats_wrapper(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    const FUNCTION: &str = "wsusage_stats";
    let Some(totals) = counting::totals() else { Unavailable::NotPreloaded.raise(FUNCTION) };
    let this_worker = || {
        counting::by_database()
            .and_then(|rows| rows.into_iter().find(|row| row.database == this_database()))
            .map_or(0, |row| row.worker_pid)
    };
    let value = |totals: &counting::Totals, name: &str| match name {
        "pending" => count(totals.pending),
        "capacity" => count(settings::max_pending() as u64),
        "databases" => count(totals.databases),
        "workers" => count(totals.workers),
        "launcher_pid" => pid(totals.launcher_pid),
        "held_back" => count(totals.held_back),
        "worker_pid" => pid(this_worker()),
        _ => counter(&totals.stats, name).unwrap_or(Value::Null),
    };
    // SAFETY: called by PostgreSQL as the C function the SQL below declares, returning a set.
    unsafe { rows::materialize(fcinfo, FUNCTION, &[STATS_COLUMNS, COUNTER_COLUMNS], [totals], value) }
}

const BY_DATABASE_COLUMNS: &[Column] = &[
    column("datid", pg_sys::OIDOID),
    column("datname", pg_sys::TEXTOID),
    column("pending", pg_sys::INT8OID),
    column("held_back", pg_sys::INT8OID),
    column("worker_pid", pg_sys::INT4OID),
];

/// One row per database with marks pending or counted since its first mark: the same counters
/// as `wsusage_stats`, for that database alone.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn wsusage_stats_by_database_wrapper(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    const FUNCTION: &str = "wsusage_stats_by_database";
    let Some(rows) = counting::by_database() else { Unavailable::NotPreloaded.raise(FUNCTION) };
    let value = |row: &counting::DatabaseStats, name: &str| match name {
        "datid" => Value::Oid(row.database),
        "datname" => databases::name(row.database).map_or(Value::Null, Value::Text),
        "pending" => count(row.pending),
        "held_back" => count(row.held_back),
        "worker_pid" => pid(row.worker_pid),
        _ => counter(&row.stats, name).unwrap_or(Value::Null),
    };
    // SAFETY: as for wsusage_stats.
    unsafe { rows::materialize(fcinfo, FUNCTION, &[BY_DATABASE_COLUMNS, COUNTER_COLUMNS], rows, value) }
}

const BY_TARGET_COLUMNS: &[Column] =
    &[column("database", pg_sys::TEXTOID), column("target", pg_sys::TEXTOID), column("pending", pg_sys::INT8OID)];

/// One row per target with keys pending or counters kept, in every database: what its flushes
/// did and last failed at.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn wsusage_stats_by_target_wrapper(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    const FUNCTION: &str = "wsusage_stats_by_target";
    let Some(rows) = counting::by_target() else { Unavailable::NotPreloaded.raise(FUNCTION) };
    let value = |row: &counting::TargetStats, name: &str| match name {
        "database" => databases::name(row.database).map_or(Value::Null, Value::Text),
        "target" => Value::Text(row.name.clone()),
        "pending" => count(row.pending),
        _ => counter(&row.stats, name).unwrap_or(Value::Null),
    };
    // SAFETY: as for wsusage_stats.
    unsafe { rows::materialize(fcinfo, FUNCTION, &[BY_TARGET_COLUMNS, COUNTER_COLUMNS], rows, value) }
}

const PENDING_COLUMNS: &[Column] = &[
    column("target", pg_sys::TEXTOID),
    column("key", pg_sys::TEXTOID),
    column("workspace_id", pg_sys::UUIDOID),
    column("last_used_at", pg_sys::TIMESTAMPTZOID),
    column("error", pg_sys::TEXTOID),
    column("retry_at", pg_sys::TIMESTAMPTZOID),
];

/// What the next flush of this database will write: each pending key of each target with its
/// latest mark time.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn wsusage_pending_wrapper(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    const FUNCTION: &str = "wsusage_pending";
    let Some(mut entries) = pending::entries(this_database()) else { Unavailable::NotPreloaded.raise(FUNCTION) };
    entries.sort_unstable_by_key(|entry| entry.key);
    let names = counting::target_names().unwrap_or_default();
    let mut held = pending::held_of(this_database());
    held.sort_unstable_by_key(|held| held.key);
    let held_of = |key: &Key| held.binary_search_by_key(key, |held| held.key).ok().map(|index| &held[index]);
    let value = |entry: &Entry, name: &str| {
        let kind = Kind::of(entry.key.kind).unwrap_or(Kind::Uuid);
        match name {
            "target" => names.get(usize::from(entry.key.target)).cloned().map_or(Value::Null, Value::Text),
            "key" => Value::Text(key::display(kind, &entry.key.id)),
            "workspace_id" if kind == Kind::Uuid => Value::Uuid(entry.key.id),
            "workspace_id" => Value::Null,
            "last_used_at" => timestamp(entry.marked_at),
            "error" => held_of(&entry.key).map_or(Value::Null, |held| Value::Text(message::read(&held.message))),
            _ => {
                held_of(&entry.key).map_or(Value::Null, |held| timestamp(held.retry_at(settings::flush_interval_us())))
            }
        }
    };
    // SAFETY: as for wsusage_stats.
    unsafe { rows::materialize(fcinfo, FUNCTION, &[PENDING_COLUMNS], entries, value) }
}

/// The version-1 calling convention record PostgreSQL looks up for each C function.
macro_rules! finfo_v1 {
    ($($name:ident),*) => {
        $(
            #[unsafe(no_mangle)]
            pub extern "C" fn $name() -> &'static pg_sys::Pg_finfo_record {
                const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
                &V1
            }
        )*
    };
}
finfo_v1!(
    pg_finfo_wsusage_stats_wrapper,
    pg_finfo_wsusage_stats_by_database_wrapper,
    pg_finfo_wsusage_stats_by_target_wrapper,
    pg_finfo_wsusage_pending_wrapper
);

/// Zero the counters of `wsusage_stats`, `wsusage_stats_by_database` and
/// `wsusage_stats_by_target`; what is pending stays pending.
#[pg_extern(volatile, parallel_unsafe)]
fn wsusage_stats_reset() {
    // SAFETY: reads the clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    if !counting::reset(now) {
        Unavailable::NotPreloaded.raise("wsusage_stats_reset");
    }
}

extension_sql!(
    r#"
CREATE FUNCTION wsusage_stats() RETURNS TABLE (
	"pending" bigint,
	"capacity" bigint,
	"marks" bigint,
	"flushes" bigint,
	"ids_flushed" bigint,
	"rows_updated" bigint,
	"ids_without_row" bigint,
	"ids_skipped_locked" bigint,
	"ids_skipped_by_min_change" bigint,
	"ids_discarded" bigint,
	"failures" bigint,
	"consecutive_failures" bigint,
	"rejected" bigint,
	"held_back" bigint,
	"last_flush_at" timestamp with time zone,
	"last_flush_duration" interval,
	"last_error" TEXT,
	"last_error_at" timestamp with time zone,
	"databases" bigint,
	"workers" bigint,
	"launcher_pid" INT,
	"stats_reset" timestamp with time zone
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'wsusage_stats_wrapper';

CREATE FUNCTION wsusage_stats_by_database() RETURNS TABLE (
	"datid" oid,
	"datname" TEXT,
	"pending" bigint,
	"marks" bigint,
	"flushes" bigint,
	"ids_flushed" bigint,
	"rows_updated" bigint,
	"ids_without_row" bigint,
	"ids_skipped_locked" bigint,
	"ids_skipped_by_min_change" bigint,
	"failures" bigint,
	"consecutive_failures" bigint,
	"rejected" bigint,
	"held_back" bigint,
	"last_flush_at" timestamp with time zone,
	"last_flush_duration" interval,
	"last_error" TEXT,
	"last_error_at" timestamp with time zone,
	"worker_pid" INT,
	"stats_reset" timestamp with time zone
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'wsusage_stats_by_database_wrapper';

CREATE FUNCTION wsusage_stats_by_target() RETURNS TABLE (
	"database" TEXT,
	"target" TEXT,
	"pending" bigint,
	"ids_flushed" bigint,
	"rows_updated" bigint,
	"ids_skipped_by_min_change" bigint,
	"ids_without_row" bigint,
	"ids_skipped_locked" bigint,
	"failures" bigint,
	"consecutive_failures" bigint,
	"last_error" TEXT,
	"last_error_at" timestamp with time zone,
	"last_flush_at" timestamp with time zone
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'wsusage_stats_by_target_wrapper';

CREATE FUNCTION wsusage_pending() RETURNS TABLE (
	"target" TEXT,
	"key" TEXT,
	"workspace_id" uuid,
	"last_used_at" timestamp with time zone,
	"error" TEXT,
	"retry_at" timestamp with time zone
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'wsusage_pending_wrapper';

CREATE VIEW wsusage_stats AS SELECT * FROM wsusage_stats();
COMMENT ON VIEW wsusage_stats IS 'What wsusage holds, has done and last failed at, in the whole cluster';
CREATE VIEW wsusage_stats_by_database AS SELECT * FROM wsusage_stats_by_database();
COMMENT ON VIEW wsusage_stats_by_database IS 'What wsusage holds, has done and last failed at, per database';
CREATE VIEW wsusage_stats_by_target AS SELECT * FROM wsusage_stats_by_target();
COMMENT ON VIEW wsusage_stats_by_target IS 'What wsusage holds, has done and last failed at, per target of each database';

-- Least privilege: nothing is callable by PUBLIC. Applications get the marking and reading
-- functions by GRANT (see the README); monitoring roles read the stats.
REVOKE EXECUTE ON FUNCTION wsusage_mark(uuid), wsusage_mark_many(uuid[]), wsusage_flush(),
    wsusage_mark(text, uuid), wsusage_mark_many(text, uuid[]), wsusage_mark_bigint(text, bigint),
    wsusage_mark_many_bigint(text, bigint[]),
    wsusage_pending_at(uuid), wsusage_pending_at(text, uuid), wsusage_pending_at_bigint(text, bigint),
    wsusage_stats(), wsusage_stats_by_database(), wsusage_stats_by_target(), wsusage_stats_reset(),
    wsusage_pending() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION wsusage_stats(), wsusage_stats_by_database(), wsusage_stats_by_target(),
    wsusage_pending() TO pg_monitor;
GRANT SELECT ON wsusage_stats, wsusage_stats_by_database, wsusage_stats_by_target TO pg_monitor;
"#,
    name = "privileges_and_views",
    finalize
);
