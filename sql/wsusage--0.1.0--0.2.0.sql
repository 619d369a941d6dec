-- wsusage 0.1.0 -> 0.2.0: every database.
-- wsusage_stats gains ids_discarded, databases, workers and launcher_pid; worker_pid moves to the
-- new wsusage_stats_by_database (each database has its own flush worker).
\echo Use "ALTER EXTENSION wsusage UPDATE TO '0.2.0'" to load this file. \quit

DROP VIEW wsusage_stats;
DROP FUNCTION wsusage_stats();

CREATE FUNCTION "wsusage_stats"() RETURNS TABLE (
	"pending" bigint,  /* i64 */
	"capacity" bigint,  /* i64 */
	"marks" bigint,  /* i64 */
	"flushes" bigint,  /* i64 */
	"ids_flushed" bigint,  /* i64 */
	"rows_updated" bigint,  /* i64 */
	"ids_without_row" bigint,  /* i64 */
	"ids_discarded" bigint,  /* i64 */
	"failures" bigint,  /* i64 */
	"consecutive_failures" bigint,  /* i64 */
	"rejected" bigint,  /* i64 */
	"last_flush_at" timestamp with time zone,  /* Option < TimestampWithTimeZone > */
	"last_flush_duration" interval,  /* Option < Interval > */
	"last_error" TEXT,  /* Option < String > */
	"last_error_at" timestamp with time zone,  /* Option < TimestampWithTimeZone > */
	"databases" bigint,  /* i64 */
	"workers" bigint,  /* i64 */
	"launcher_pid" INT,  /* Option < i32 > */
	"stats_reset" timestamp with time zone  /* Option < TimestampWithTimeZone > */
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'wsusage_stats_wrapper';

CREATE FUNCTION "wsusage_stats_by_database"() RETURNS TABLE (
	"datid" oid,  /* pg_sys :: Oid */
	"datname" TEXT,  /* Option < String > */
	"pending" bigint,  /* i64 */
	"marks" bigint,  /* i64 */
	"flushes" bigint,  /* i64 */
	"ids_flushed" bigint,  /* i64 */
	"rows_updated" bigint,  /* i64 */
	"ids_without_row" bigint,  /* i64 */
	"failures" bigint,  /* i64 */
	"consecutive_failures" bigint,  /* i64 */
	"rejected" bigint,  /* i64 */
	"last_flush_at" timestamp with time zone,  /* Option < TimestampWithTimeZone > */
	"last_flush_duration" interval,  /* Option < Interval > */
	"last_error" TEXT,  /* Option < String > */
	"last_error_at" timestamp with time zone,  /* Option < TimestampWithTimeZone > */
	"worker_pid" INT,  /* Option < i32 > */
	"stats_reset" timestamp with time zone  /* Option < TimestampWithTimeZone > */
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'wsusage_stats_by_database_wrapper';

CREATE VIEW wsusage_stats AS SELECT * FROM wsusage_stats();
COMMENT ON VIEW wsusage_stats IS 'What wsusage holds, has done and last failed at, in the whole cluster';
CREATE VIEW wsusage_stats_by_database AS SELECT * FROM wsusage_stats_by_database();
COMMENT ON VIEW wsusage_stats_by_database IS 'What wsusage holds, has done and last failed at, per database';

REVOKE EXECUTE ON FUNCTION wsusage_stats(), wsusage_stats_by_database() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION wsusage_stats(), wsusage_stats_by_database() TO pg_monitor;
GRANT SELECT ON wsusage_stats, wsusage_stats_by_database TO pg_monitor;
