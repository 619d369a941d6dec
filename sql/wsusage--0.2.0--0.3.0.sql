-- wsusage 0.2.0 -> 0.3.0 (in development; frozen when released).
-- wsusage_stats and wsusage_stats_by_database gain ids_skipped_locked (ids whose row another
-- transaction held locked: skipped without waiting, left pending) and held_back (ids whose own row
-- makes the flush fail, isolated from the others); wsusage_pending gains error and retry_at for
-- those. The library fills each function's columns by name, so the 0.2.0 declarations keep
-- working until this update runs.
\echo Use "ALTER EXTENSION wsusage UPDATE TO '0.3.0'" to load this file. \quit

DROP VIEW wsusage_stats;
DROP VIEW wsusage_stats_by_database;
DROP FUNCTION wsusage_stats();
DROP FUNCTION wsusage_stats_by_database();
DROP FUNCTION wsusage_pending();

CREATE FUNCTION wsusage_stats() RETURNS TABLE (
	"pending" bigint,
	"capacity" bigint,
	"marks" bigint,
	"flushes" bigint,
	"ids_flushed" bigint,
	"rows_updated" bigint,
	"ids_without_row" bigint,
	"ids_skipped_locked" bigint,
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

CREATE FUNCTION wsusage_pending() RETURNS TABLE (
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

REVOKE EXECUTE ON FUNCTION wsusage_stats(), wsusage_stats_by_database(), wsusage_pending() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION wsusage_stats(), wsusage_stats_by_database(), wsusage_pending() TO pg_monitor;
GRANT SELECT ON wsusage_stats, wsusage_stats_by_database TO pg_monitor;
