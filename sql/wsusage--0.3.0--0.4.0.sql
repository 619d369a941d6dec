-- wsusage 0.3.0 -> 0.4.0.
-- Fresh reads: wsusage_pending_at(uuid), wsusage_pending_at(text, uuid) and
-- wsusage_pending_at_bigint(text, bigint) return the time of a key's pending mark in this
-- database (NULL when none is pending), which the next flush writes; reading one needs SELECT on
-- the target's id and timestamp columns, as reading the column does, and EXECUTE, which PUBLIC
-- does not have.
-- No code runs with more privilege than its author has. From the 0.4.0 library on (before this
-- update too), each flush of a target runs as the owner of the target's table (or as
-- "wsusage.role" when a DBA set it), under SECURITY_RESTRICTED_OPERATION, in statements whose every
-- name is qualified; wsusage_target is found as the extension's member, never by name; an
-- after_flush function must be owned by a role with the privileges of the role the flush runs as
-- (a superuser has them all). 0.4.0's install script writes wsusage_target's CHECKs with
-- pg_catalog's operators named; 0.3.0's resolved to the same ones (its script ran with pg_catalog
-- first on the search path), so the catalog is the same and nothing needs to be made again.
\echo Use "ALTER EXTENSION wsusage UPDATE TO '0.4.0'" to load this file. \quit

CREATE FUNCTION "wsusage_pending_at"(
	"workspace_id" uuid
) RETURNS timestamp with time zone
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'wsusage_pending_at_wrapper';

CREATE FUNCTION "wsusage_pending_at"(
	"target" TEXT,
	"id" uuid
) RETURNS timestamp with time zone
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'wsusage_pending_at_target_wrapper';

CREATE FUNCTION "wsusage_pending_at_bigint"(
	"target" TEXT,
	"id" bigint
) RETURNS timestamp with time zone
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'wsusage_pending_at_bigint_wrapper';

-- Least privilege, as for every function of the extension: granted by the DBA to the roles that
-- read.
REVOKE EXECUTE ON FUNCTION wsusage_pending_at(uuid), wsusage_pending_at(text, uuid),
    wsusage_pending_at_bigint(text, bigint) FROM PUBLIC;
