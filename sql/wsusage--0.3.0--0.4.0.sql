-- wsusage 0.3.0 -> 0.4.0.
-- No code runs with more privilege than its author has. The CHECK constraints of wsusage_target
-- are made again with every function, operator and type qualified with pg_catalog, as 0.4.0
-- creates them: made by 0.3.0's script, on the search path of CREATE EXTENSION (or of this
-- update), a look-alike planted beforehand in the extension's schema (an operator >= taking text,
-- which the literal '0' would have preferred) could have become part of them.
-- Behaviour from the 0.4.0 library on (before this update too): each flush of a target runs as
-- the owner of the target's table (or as "wsusage.role" when a DBA set it), under
-- SECURITY_RESTRICTED_OPERATION, in statements whose every name is qualified; wsusage_target is
-- found as the extension's member, never by name; an after_flush function must be owned by a role
-- with the privileges of the role the flush runs as (a superuser has them all).
\echo Use "ALTER EXTENSION wsusage UPDATE TO '0.4.0'" to load this file. \quit

ALTER TABLE @extschema@.wsusage_target
	DROP CONSTRAINT wsusage_target_name_length,
	ADD CONSTRAINT wsusage_target_name_length
		CHECK (pg_catalog.length(name) OPERATOR(pg_catalog.>=) 1
		       AND pg_catalog.octet_length(name) OPERATOR(pg_catalog.<=) 63),
	DROP CONSTRAINT wsusage_target_min_change_not_negative,
	ADD CONSTRAINT wsusage_target_min_change_not_negative
		CHECK (min_change OPERATOR(pg_catalog.>=) '0'::pg_catalog.interval);
