//! The table `wsusage_target`, one row per target of the database, and its trigger: a row is
//! checked when written (its table, columns, their types, its `after_flush` function), worded as
//! PostgreSQL words the same errors, and every change — row or TRUNCATE — tells the backends
//! that remember targets (see `sql::resolve`) to read them again once it commits, and invalidates the
//! declarations published for new backends at its commit (see `changes`; such a transaction
//! cannot be prepared).

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::PgLogLevel;

use crate::targets::lookup;

/// The trigger function of `wsusage_target` (AFTER, for each row and for TRUNCATE).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn wsusage_target_check(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: PostgreSQL calls this as the trigger function the SQL below declares: `context`
    // is its TriggerData (checked), whose relation and tuples live through the call.
    unsafe {
        let context = (*fcinfo).context;
        if context.is_null() || (*context).type_ != pg_sys::NodeTag::T_TriggerData {
            error!("wsusage_target_check() must be called as a trigger");
        }
        let trigger = context.cast::<pg_sys::TriggerData>();
        let relation = (*trigger).tg_relation;
        // Sent to every backend of the database at commit (and to this one at once); and once
        // committed, what new backends take from shared memory is read again (see `changes`).
        pg_sys::CacheInvalidateRelcacheByRelid((*relation).rd_id);
        crate::targets::changes::note();
        let event = (*trigger).tg_event;
        let row = event & pg_sys::TRIGGER_EVENT_ROW != 0;
        let new = match event & pg_sys::TRIGGER_EVENT_OPMASK {
            pg_sys::TRIGGER_EVENT_INSERT if row => (*trigger).tg_trigtuple,
            pg_sys::TRIGGER_EVENT_UPDATE if row => (*trigger).tg_newtuple,
            _ => return pg_sys::Datum::from(0),
        };
        let tupdesc = (*relation).rd_att;
        let name = pg_sys::SPI_getvalue(new, tupdesc, pg_sys::SPI_fnumber(tupdesc, c"name".as_ptr()));
        if name.is_null() {
            return pg_sys::Datum::from(0);
        }
        let name = CStr::from_ptr(name).to_string_lossy().into_owned();
        check(&name);
    }
    pg_sys::Datum::from(0)
}

/// Raise the problem of target `name`, as its row now reads, if it has one.
fn check(name: &str) {
    // SAFETY: a plain read of this backend's current role.
    let user = unsafe { pg_sys::GetUserId() };
    // The row this trigger fires for was written by the current command: make it visible to the
    // read below, as a query run from here through SPI would.
    // SAFETY: within the trigger's transaction, as SPI does before each query of a function that
    // writes.
    unsafe { pg_sys::CommandCounterIncrement() };
    let catalog = lookup::read(Some(name), user);
    let Some(problem) = catalog.definitions.first().and_then(|definition| definition.problem()) else { return };
    ErrorReport::new(
        problem.sqlstate,
        format!("wsusage target \"{name}\" cannot be written: {}", problem.message),
        "wsusage_target_check",
    )
    .set_hint(problem.hint)
    .report(PgLogLevel::ERROR);
}

#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_wsusage_target_check() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

extension_sql!(
    r#"
-- Every function, operator and type below is qualified. PostgreSQL runs this script with pg_catalog
-- first on its search path, before the extension's schema, and nothing here is polymorphic, so a
-- look-alike planted there beforehand could not be taken anyway (tests/tests/security.rs); written
-- out, that holds without knowing it.
CREATE TABLE wsusage_target (
	name pg_catalog.text PRIMARY KEY
		CONSTRAINT wsusage_target_name_length
		CHECK (pg_catalog.length(name) OPERATOR(pg_catalog.>=) 1
		       AND pg_catalog.octet_length(name) OPERATOR(pg_catalog.<=) 63),
	relation pg_catalog.regclass NOT NULL,
	id_column pg_catalog.name NOT NULL,
	timestamp_column pg_catalog.name NOT NULL,
	min_change pg_catalog.interval NOT NULL DEFAULT '0'
		CONSTRAINT wsusage_target_min_change_not_negative
		CHECK (min_change OPERATOR(pg_catalog.>=) '0'::pg_catalog.interval),
	after_flush pg_catalog.text
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
"#,
    name = "targets"
);
