//! The settings as PostgreSQL learns them: one table, each setting's name, texts, limits and
//! hooks in one place, given to PostgreSQL once from `_PG_init`.

use std::ffi::{c_char, CStr};

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;

use super::*;

/// An integer setting, as [`init`] defines it.
struct IntSetting {
    name: &'static CStr,
    short: &'static CStr,
    long: &'static CStr,
    variable: &'static GucSetting<i32>,
    min: i32,
    max: i32,
    context: GucContext,
    flags: GucFlags,
}

/// A text setting: a raw GUC variable rather than a `GucSetting`, because each has a check hook.
struct TextSetting {
    name: &'static CStr,
    short: &'static CStr,
    long: &'static CStr,
    variable: *mut *mut c_char,
    boot: &'static CStr,
    context: pg_sys::GucContext::Type,
    check: pg_sys::GucStringCheckHook,
    assign: pg_sys::GucStringAssignHook,
}

const IDENTIFIER_SYNTAX: &CStr =
    c"SQL identifier syntax: unquoted names are folded to lower case, double-quoted ones kept as written.";

/// Every setting, defined once from `_PG_init`.
pub fn init() {
    let integers = [
        IntSetting {
            name: c"wsusage.flush_interval",
            short: c"Time between flushes of pending marks to the table.",
            long: c"A shorter interval makes last-used times fresher and costs one more write transaction each time.",
            variable: &FLUSH_INTERVAL_MS,
            min: FLUSH_INTERVAL_MS_MIN,
            max: FLUSH_INTERVAL_MS_MAX,
            context: GucContext::Sighup,
            flags: GucFlags::UNIT_MS,
        },
        IntSetting {
            name: c"wsusage.max_pending",
            short: c"Maximum number of distinct ids waiting for the next flush.",
            long: c"Sizes the shared memory reserved at server start; a mark of a new id fails when the set is full.",
            variable: &MAX_PENDING,
            min: MAX_PENDING_MIN,
            max: MAX_PENDING_MAX,
            context: GucContext::Postmaster,
            flags: GucFlags::empty(),
        },
        IntSetting {
            name: c"wsusage.max_databases",
            short: c"Maximum number of databases that can have marks pending at once.",
            long: c"Sizes the shared memory reserved at server start; a database with no marks pending gives its place up.",
            variable: &MAX_DATABASES,
            min: MAX_DATABASES_MIN,
            max: MAX_DATABASES_MAX,
            context: GucContext::Postmaster,
            flags: GucFlags::empty(),
        },
        IntSetting {
            name: c"wsusage.max_targets",
            short: c"Maximum number of targets, of every database together, that can have marks pending or counters at once.",
            long: c"Sizes the shared memory reserved at server start; a target with nothing pending gives its place up when another needs one.",
            variable: &MAX_TARGETS,
            min: MAX_TARGETS_MIN,
            max: MAX_TARGETS_MAX,
            context: GucContext::Postmaster,
            flags: GucFlags::empty(),
        },
        IntSetting {
            name: c"wsusage.max_workers",
            short: c"Maximum number of flush workers running at once, each serving one database.",
            long: c"Beyond it, databases take turns. Each worker takes a max_worker_processes slot, as does the launcher.",
            variable: &MAX_WORKERS,
            min: MAX_WORKERS_MIN,
            max: MAX_WORKERS_MAX,
            context: GucContext::Postmaster,
            flags: GucFlags::empty(),
        },
        IntSetting {
            name: c"wsusage.batch_size",
            short: c"Ids the worker writes per transaction.",
            long: c"Smaller transactions hold row locks for less time. A chunk failing on a lock or timeout stays pending alone; one failing on a row's error is split until that row is found.",
            variable: &BATCH_SIZE,
            min: BATCH_SIZE_MIN,
            max: BATCH_SIZE_MAX,
            context: GucContext::Sighup,
            flags: GucFlags::empty(),
        },
        IntSetting {
            name: c"wsusage.lock_timeout",
            short: c"How long a flush's second attempt at a chunk waits for a lock on the table before it retries that chunk later; 0 waits forever.",
            long: c"A chunk's first statement waits at most 10 ms for any lock; a row an application holds locked is then skipped and stays pending.",
            variable: &LOCK_TIMEOUT_MS,
            min: 0,
            max: TIMEOUT_MS_MAX,
            context: GucContext::Sighup,
            flags: GucFlags::UNIT_MS,
        },
        IntSetting {
            name: c"wsusage.statement_timeout",
            short: c"Longest time each attempt at a chunk of a flush may run before it is cancelled and retried; 0: no limit.",
            long: c"",
            variable: &STATEMENT_TIMEOUT_MS,
            min: 0,
            max: TIMEOUT_MS_MAX,
            context: GucContext::Sighup,
            flags: GucFlags::UNIT_MS,
        },
        IntSetting {
            name: c"wsusage.launcher_wait",
            short: c"How long wsusage_flush() waits for the wsusage launcher to run before it gives up; 0: it gives up at once.",
            long: c"The postmaster restarts a launcher that exited 5 s later; the default waits for that.",
            variable: &LAUNCHER_WAIT_MS,
            min: 0,
            max: TIMEOUT_MS_MAX,
            context: GucContext::Userset,
            flags: GucFlags::UNIT_MS,
        },
    ];
    let texts = [
        TextSetting {
            name: c"wsusage.database",
            short: c"Restricts wsusage to one database; empty: every database where the extension is installed.",
            long: c"When set, marks are accepted only in this database.",
            variable: &raw mut DATABASE,
            boot: c"",
            context: pg_sys::GucContext::PGC_POSTMASTER,
            check: Some(check_database),
            assign: None,
        },
        TextSetting {
            name: c"wsusage.role",
            short: c"Role every flush runs as, instead of the owner of each target's table; empty: the table's owner.",
            long: c"The tables' triggers, checks and after_flush functions then run with this role's privileges, whoever wrote them: never name a role with more privileges than the tables' owners (a superuser makes every table owner one). It needs SELECT and UPDATE on the tables.",
            variable: &raw mut ROLE,
            boot: c"",
            context: pg_sys::GucContext::PGC_POSTMASTER,
            check: Some(check_role),
            assign: None,
        },
        TextSetting {
            name: c"wsusage.table",
            short: c"Table the worker writes last-used times to; may be schema-qualified.",
            long: IDENTIFIER_SYNTAX,
            variable: &raw mut TABLE,
            boot: c"workspaces",
            context: pg_sys::GucContext::PGC_SIGHUP,
            check: Some(check_table),
            assign: Some(target_changed),
        },
        TextSetting {
            name: c"wsusage.id_column",
            short: c"Column of wsusage.table that holds the id (type uuid) of the default target.",
            long: IDENTIFIER_SYNTAX,
            variable: &raw mut ID_COLUMN,
            boot: c"id",
            context: pg_sys::GucContext::PGC_SIGHUP,
            check: Some(check_column),
            assign: Some(target_changed),
        },
        TextSetting {
            name: c"wsusage.timestamp_column",
            short: c"Column of wsusage.table that holds the last-used time (timestamptz, timestamp or date) of the default target.",
            long: IDENTIFIER_SYNTAX,
            variable: &raw mut TIMESTAMP_COLUMN,
            boot: c"last_used_at",
            context: pg_sys::GucContext::PGC_SIGHUP,
            check: Some(check_column),
            assign: Some(target_changed),
        },
    ];
    for setting in integers {
        GucRegistry::define_int_guc(
            setting.name,
            setting.short,
            setting.long,
            setting.variable,
            setting.min,
            setting.max,
            setting.context,
            setting.flags,
        );
    }
    for setting in texts {
        // SAFETY: _PG_init, single-threaded; the variable is a static that lives forever, the
        // texts static strings GUC code copies or keeps, the hooks functions of ours.
        unsafe {
            pg_sys::DefineCustomStringVariable(
                setting.name.as_ptr(),
                setting.short.as_ptr(),
                setting.long.as_ptr(),
                setting.variable,
                setting.boot.as_ptr(),
                setting.context,
                0,
                setting.check,
                setting.assign,
                None,
            );
        }
    }
    reserve_prefix();
}
