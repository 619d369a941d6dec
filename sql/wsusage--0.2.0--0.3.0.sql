-- wsusage 0.2.0 -> 0.3.0.
-- Targets: the table wsusage_target (one row per debounced column of the database, checked by
-- its trigger), the functions marking a named target (wsusage_mark(text, uuid),
-- wsusage_mark_many(text, uuid[]), wsusage_mark_bigint(text, bigint),
-- wsusage_mark_many_bigint(text, bigint[])), and the view wsusage_stats_by_target.
-- wsusage_stats and wsusage_stats_by_database gain ids_skipped_locked (ids whose row another
-- transaction held locked: skipped without waiting, left pending), ids_skipped_by_min_change and
-- held_back (ids whose own row makes the flush fail, isolated from the others); wsusage_pending
-- gains target, key, error and retry_at. The library fills each function's columns by name, so
-- the 0.2.0 declarations keep working until this update runs.
-- Behaviour from the 0.3.0 library on (before this update too): a mark needs UPDATE privilege on
-- its target's timestamp column, wsusage_mark(uuid) included.
\echo Use "ALTER EXTENSION wsusage UPDATE TO '0.3.0'" to load this file. \quit

DROP VIEW wsusage_stats;
DROP VIEW wsusage_stats_by_database;
DROP FUNCTION wsusage_stats();
DROP FUNCTION wsusage_stats_by_database();
DROP FUNCTION wsusage_pending();

CREATE TABLE wsusage_target (
	name text PRIMARY KEY
		CONSTRAINT wsusage_target_name_length CHECK (length(name) >= 1 AND octet_length(name) <= 63),
	relation regclass NOT NULL,
	id_column name NOT NULL,
	timestamp_column name NOT NULL,
	min_change interval NOT NULL DEFAULT '0'
		CONSTRAINT wsusage_target_min_change_not_negative CHECK (min_change >= '0'),
	after_flush text
);
COMMENT ON TABLE wsusage_target IS 'The columns wsusage debounces in this database, besides the "default" target of its settings';
SELECT pg_catalog.pg_extension_config_dump('wsusage_target', '');

CREATE FUNCTION wsusage_target_check() RETURNS trigger
LANGUAGE c
AS 'MODULE_PATHNAME', 'wsusage_target_check';
-- after_flush is kept as text, its function's signature qualified with its schema: a regprocedure
-- column would stop pg_upgrade, which refuses reg* types other than regclass, regtype and regrole.
-- The function is named as the writer's search path finds it (a missing one is PostgreSQL's own
-- 42883), and stored qualified: the flush looks it up on no search path. Everything else here is
-- qualified, so only the function's name depends on that search path.
CREATE FUNCTION wsusage_target_normalize() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
	function_oid pg_catalog.oid;
BEGIN
	IF NEW.after_flush IS NOT NULL THEN
		function_oid := NEW.after_flush::pg_catalog.regprocedure;
		NEW.after_flush := (SELECT pg_catalog.format('%I.%I(%s)', n.nspname, p.proname,
		                                             pg_catalog.oidvectortypes(p.proargtypes))
		                      FROM pg_catalog.pg_proc AS p
		                      JOIN pg_catalog.pg_namespace AS n ON n.oid OPERATOR(pg_catalog.=) p.pronamespace
		                     WHERE p.oid OPERATOR(pg_catalog.=) function_oid);
	END IF;
	RETURN NEW;
END
$$;
CREATE TRIGGER wsusage_target_normalize BEFORE INSERT OR UPDATE OF after_flush ON wsusage_target
	FOR EACH ROW EXECUTE FUNCTION wsusage_target_normalize();
CREATE TRIGGER wsusage_target_check AFTER INSERT OR UPDATE OR DELETE ON wsusage_target
	FOR EACH ROW EXECUTE FUNCTION wsusage_target_check();
CREATE TRIGGER wsusage_target_truncate AFTER TRUNCATE ON wsusage_target
	FOR EACH STATEMENT EXECUTE FUNCTION wsusage_target_check();
REVOKE EXECUTE ON FUNCTION wsusage_target_check(), wsusage_target_normalize() FROM PUBLIC;
GRANT SELECT ON wsusage_target TO pg_monitor;

CREATE FUNCTION "wsusage_mark"(
	"target" TEXT,
	"id" uuid
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'wsusage_mark_target_wrapper';

CREATE FUNCTION "wsusage_mark_many"(
	"target" TEXT,
	"ids" uuid[]
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'wsusage_mark_many_target_wrapper';

CREATE FUNCTION "wsusage_mark_bigint"(
	"target" TEXT,
	"id" bigint
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'wsusage_mark_bigint_wrapper';

CREATE FUNCTION "wsusage_mark_many_bigint"(
	"target" TEXT,
	"ids" bigint[]
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'wsusage_mark_many_bigint_wrapper';

REVOKE EXECUTE ON FUNCTION wsusage_mark(text, uuid), wsusage_mark_many(text, uuid[]),
    wsusage_mark_bigint(text, bigint), wsusage_mark_many_bigint(text, bigint[]) FROM PUBLIC;

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

REVOKE EXECUTE ON FUNCTION wsusage_stats(), wsusage_stats_by_database(), wsusage_stats_by_target(),
    wsusage_pending() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION wsusage_stats(), wsusage_stats_by_database(), wsusage_stats_by_target(),
    wsusage_pending() TO pg_monitor;
GRANT SELECT ON wsusage_stats, wsusage_stats_by_database, wsusage_stats_by_target TO pg_monitor;
