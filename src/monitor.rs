//! What a DBA reads: `wsusage_stats()` (cluster-wide, and the `wsusage_stats` view),
//! `wsusage_stats_by_database()` (and its view), `wsusage_pending()`, and
//! `wsusage_stats_reset()`. Reading works in any database and on a standby: it touches only
//! shared memory.

use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::Uuid;

use crate::api::this_database;
use crate::databases;
use crate::errors::UsageError;
use crate::pending;
use crate::settings;
use crate::shmem;
use crate::stats::{self, Stats};

fn timestamp(micros: i64) -> Option<TimestampWithTimeZone> {
    (micros != 0).then(|| TimestampWithTimeZone::try_from(micros).ok()).flatten()
}

fn count(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn duration(s: &Stats) -> Option<Interval> {
    (s.last_flush_at != 0).then(|| Interval::from_micros(s.last_flush_duration_us))
}

fn last_error(s: &Stats) -> Option<String> {
    Some(shmem::read_message(&s.last_error)).filter(|message| !message.is_empty())
}

/// One row: what wsusage holds, has done and last failed at in the whole cluster, since server
/// start or the last `wsusage_stats_reset()`.
#[pg_extern(volatile, parallel_unsafe)]
// pgrx reads the column names from the signature, so the row type cannot be an alias.
#[allow(clippy::type_complexity)]
fn wsusage_stats() -> TableIterator<
    'static,
    (
        name!(pending, i64),
        name!(capacity, i64),
        name!(marks, i64),
        name!(flushes, i64),
        name!(ids_flushed, i64),
        name!(rows_updated, i64),
        name!(ids_without_row, i64),
        name!(ids_discarded, i64),
        name!(failures, i64),
        name!(consecutive_failures, i64),
        name!(rejected, i64),
        name!(last_flush_at, Option<TimestampWithTimeZone>),
        name!(last_flush_duration, Option<Interval>),
        name!(last_error, Option<String>),
        name!(last_error_at, Option<TimestampWithTimeZone>),
        name!(databases, i64),
        name!(workers, i64),
        name!(launcher_pid, Option<i32>),
        name!(stats_reset, Option<TimestampWithTimeZone>),
    ),
> {
    let (Some(pending), Some(totals)) = (pending::len(), stats::totals()) else {
        UsageError::NotPreloaded.raise("wsusage_stats")
    };
    let s = &totals.stats;
    TableIterator::once((
        count(pending as u64),
        count(settings::max_pending() as u64),
        count(s.marks),
        count(s.flushes),
        count(s.ids_flushed),
        count(s.rows_updated),
        count(s.ids_without_row),
        count(s.ids_discarded),
        count(s.failures),
        count(s.consecutive_failures),
        count(s.rejected),
        timestamp(s.last_flush_at),
        duration(s),
        last_error(s),
        timestamp(s.last_error_at),
        count(totals.databases),
        count(totals.workers),
        (totals.launcher_pid != 0).then_some(totals.launcher_pid),
        timestamp(s.stats_reset),
    ))
}

/// One row per database with marks pending or counted since its first mark: the same counters
/// as `wsusage_stats`, for that database alone.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
fn wsusage_stats_by_database() -> TableIterator<
    'static,
    (
        name!(datid, pg_sys::Oid),
        name!(datname, Option<String>),
        name!(pending, i64),
        name!(marks, i64),
        name!(flushes, i64),
        name!(ids_flushed, i64),
        name!(rows_updated, i64),
        name!(ids_without_row, i64),
        name!(failures, i64),
        name!(consecutive_failures, i64),
        name!(rejected, i64),
        name!(last_flush_at, Option<TimestampWithTimeZone>),
        name!(last_flush_duration, Option<Interval>),
        name!(last_error, Option<String>),
        name!(last_error_at, Option<TimestampWithTimeZone>),
        name!(worker_pid, Option<i32>),
        name!(stats_reset, Option<TimestampWithTimeZone>),
    ),
> {
    let Some(rows) = stats::by_database() else { UsageError::NotPreloaded.raise("wsusage_stats_by_database") };
    TableIterator::new(rows.into_iter().map(|row| {
        let s = &row.stats;
        (
            row.database,
            databases::name(row.database),
            count(row.pending),
            count(s.marks),
            count(s.flushes),
            count(s.ids_flushed),
            count(s.rows_updated),
            count(s.ids_without_row),
            count(s.failures),
            count(s.consecutive_failures),
            count(s.rejected),
            timestamp(s.last_flush_at),
            duration(s),
            last_error(s),
            timestamp(s.last_error_at),
            (row.worker_pid != 0).then_some(row.worker_pid),
            timestamp(s.stats_reset),
        )
    }))
}

/// Zero the counters of `wsusage_stats` and `wsusage_stats_by_database`; what is pending stays
/// pending.
#[pg_extern(volatile, parallel_unsafe)]
fn wsusage_stats_reset() {
    // SAFETY: reads the clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    if !stats::reset(now) {
        UsageError::NotPreloaded.raise("wsusage_stats_reset");
    }
}

/// What the next flush of this database will write: each pending id with its latest mark time.
#[pg_extern(volatile, parallel_unsafe)]
fn wsusage_pending(
) -> TableIterator<'static, (name!(workspace_id, Uuid), name!(last_used_at, Option<TimestampWithTimeZone>))> {
    let Some(entries) = pending::entries(this_database()) else { UsageError::NotPreloaded.raise("wsusage_pending") };
    TableIterator::new(entries.into_iter().map(|e| (Uuid::from_bytes(e.key.id), timestamp(e.marked_at))))
}

extension_sql!(
    r#"
CREATE VIEW wsusage_stats AS SELECT * FROM wsusage_stats();
COMMENT ON VIEW wsusage_stats IS 'What wsusage holds, has done and last failed at, in the whole cluster';
CREATE VIEW wsusage_stats_by_database AS SELECT * FROM wsusage_stats_by_database();
COMMENT ON VIEW wsusage_stats_by_database IS 'What wsusage holds, has done and last failed at, per database';

-- Least privilege: nothing is callable by PUBLIC. Applications get the marking functions by
-- GRANT (see the README); monitoring roles read the stats.
REVOKE EXECUTE ON FUNCTION wsusage_mark(uuid), wsusage_mark_many(uuid[]), wsusage_flush(),
    wsusage_stats(), wsusage_stats_by_database(), wsusage_stats_reset(), wsusage_pending() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION wsusage_stats(), wsusage_stats_by_database(), wsusage_pending() TO pg_monitor;
GRANT SELECT ON wsusage_stats, wsusage_stats_by_database TO pg_monitor;
"#,
    name = "privileges_and_views",
    finalize
);
