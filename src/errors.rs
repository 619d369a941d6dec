//! The errors and warnings of the SQL functions and of a flush, each with its SQLSTATE, detail
//! and hint, worded after PostgreSQL's error message style guide. (The processes' own log lines
//! live beside what they report: the launcher's in `launcher`, a worker's in `worker` and
//! `flush::round`, the saved set's in `saved_set`, the trigger's in `targets::table`.)

use std::time::Duration;

use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::PgLogLevel;

use wsusage_pending_table::{Key, Stuck};

use crate::memory::key::{self, Kind};
use crate::settings;
use crate::targets::definition::Problem;

/// A database error that ended a chunk of a flush, or a check, with what the DBA and the caller
/// need to know.
pub struct Failure {
    pub sqlstate: i32,
    pub message: String,
}

/// How far a failed statement's cause reaches.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Scope {
    /// This chunk, this time (a lock held by an application, a timeout, a deadlock): it stays
    /// pending and is retried at the next flush, the other chunks go on.
    Chunk,
    /// Maybe one row of the chunk (a trigger or check raising for it, a value its column
    /// refuses): split the chunk to find it, and write the others.
    Rows,
    /// Every chunk alike (the table or a column missing, a privilege, a read-only server): stop
    /// the round; nothing is split.
    Round,
}

impl Failure {
    /// The SQLSTATE's two-character class, unpacked from PostgreSQL's `MAKE_SQLSTATE`.
    fn class(&self) -> [u8; 2] {
        let char_at = |n: u32| (((self.sqlstate >> (6 * n)) & 0x3F) as u8).wrapping_add(b'0');
        [char_at(0), char_at(1)]
    }

    pub fn scope(&self) -> Scope {
        use PgSqlErrorCode::*;
        let chunk = [
            ERRCODE_LOCK_NOT_AVAILABLE,
            ERRCODE_QUERY_CANCELED,
            ERRCODE_T_R_DEADLOCK_DETECTED,
            ERRCODE_T_R_SERIALIZATION_FAILURE,
        ];
        if chunk.iter().any(|code| *code as i32 == self.sqlstate) {
            return Scope::Chunk;
        }
        match &self.class() {
            // data exception, integrity constraint violation, PL/pgSQL RAISE, triggered action and
            // data change, WITH CHECK OPTION, SQL and external routines (a trigger's function)
            b"22" | b"23" | b"P0" | b"09" | b"27" | b"44" | b"2F" | b"38" | b"39" => Scope::Rows,
            _ => Scope::Round,
        }
    }
}

pub enum UsageError {
    NotPreloaded,
    /// A NULL id; `element` is the 1-based array position when it came in an array.
    NullId {
        element: Option<usize>,
    },
    SetFull {
        capacity: usize,
        marked: usize,
        requested: usize,
    },
    TooManyDatabases {
        capacity: usize,
    },
    WrongDatabase {
        current: String,
    },
    InRecovery {
        action: &'static str,
    },
    LauncherNotRunning {
        waited: Duration,
    },
    FlushFailed {
        sqlstate: i32,
        message: String,
    },
    FlushOutcomeLost,
    /// A flush wrote the others, but held these back.
    HeldBack {
        held_back: u64,
    },
    /// The configuration file's value of `setting` was refused at server start.
    SettingRefused {
        setting: &'static str,
    },
    /// A NULL target name.
    NullTarget,
    UnknownTarget {
        name: String,
    },
    /// The target's keys are of another type than the function takes.
    WrongKeyType {
        name: String,
        column_type: String,
        takes: Kind,
    },
    /// The target does not fit (its table or a column gone, a wrong type): marks of it could
    /// never be written.
    TargetProblem {
        name: String,
        problem: Problem,
    },
    /// The role may not make the UPDATE a mark of the target defers, so may not mark it.
    NoPrivilege {
        name: String,
        table: String,
        id_column: String,
        column: String,
    },
    TooManyTargets {
        capacity: usize,
    },
}

impl UsageError {
    fn to_report(&self, function: &'static str) -> ErrorReport {
        use PgSqlErrorCode::*;
        match self {
            UsageError::NotPreloaded => {
                ErrorReport::new(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, "wsusage must be loaded via shared_preload_libraries", function)
                    .set_hint("Add \"wsusage\" to \"shared_preload_libraries\" and restart the server.")
            }
            UsageError::NullTarget => ErrorReport::new(ERRCODE_NULL_VALUE_NOT_ALLOWED, "target must not be null", function)
                .set_hint("Name a target of wsusage_target, or call the function without one to mark the \"default\" target."),
            UsageError::UnknownTarget { name } => ErrorReport::new(
                ERRCODE_UNDEFINED_OBJECT,
                format!("wsusage target \"{name}\" does not exist"),
                function,
            )
            .set_hint("Targets are the rows of the table wsusage_target in this database; \"default\" is also defined by the settings wsusage.table, wsusage.id_column and wsusage.timestamp_column."),
            UsageError::WrongKeyType { name, column_type, takes } => {
                let other = match function {
                    "wsusage_mark" => "wsusage_mark_bigint",
                    "wsusage_mark_many" => "wsusage_mark_many_bigint",
                    "wsusage_mark_bigint" => "wsusage_mark",
                    _ => "wsusage_mark_many",
                };
                ErrorReport::new(
                    ERRCODE_DATATYPE_MISMATCH,
                    format!("wsusage target \"{name}\" has keys of type {column_type}, but {function} takes {}", takes.sql_type()),
                    function,
                )
                .set_hint(format!("Mark the keys of this target with {other}()."))
            }
            UsageError::TargetProblem { name, problem } => ErrorReport::new(
                problem.sqlstate,
                format!("wsusage target \"{name}\" cannot be written: {}", problem.message),
                function,
            )
            .set_hint(problem.hint.clone()),
            UsageError::NoPrivilege { name, table, id_column, column } => ErrorReport::new(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("permission denied to mark wsusage target \"{name}\": no privilege to update column \"{column}\" of table {table}"),
                function,
            )
            .set_detail("A mark is an UPDATE of that column made later by the flush worker, so it needs what the UPDATE would: USAGE on the table's schema, SELECT on the id and timestamp columns, UPDATE on the timestamp column.")
            .set_hint(format!(
                "GRANT SELECT ({id}, {ts}), UPDATE ({ts}) ON {table} TO the role that marks.",
                id = quote_identifier(id_column),
                ts = quote_identifier(column)
            )),
            UsageError::TooManyTargets { capacity } => {
                ErrorReport::new(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED, "wsusage cannot track marks of more targets", function)
                    .set_detail(format!("Marks are pending for {capacity} other targets, the maximum (\"wsusage.max_targets\")."))
                    .set_hint("Increase \"wsusage.max_targets\" (needs a restart), or shorten \"wsusage.flush_interval\" so that targets free their places sooner.")
            }
            UsageError::NullId { element } => {
                let report = ErrorReport::new(ERRCODE_NULL_VALUE_NOT_ALLOWED, "id must not be null", function);
                match element {
                    Some(n) => report.set_detail(format!("Element {n} of the array is null; no id of the array was marked.")),
                    None => report,
                }
            }
            UsageError::SetFull { capacity, marked, requested } => {
                let mut detail = format!("The set holds its maximum of {capacity} distinct ids until the next flush.");
                if *requested > 1 {
                    detail.push_str(&format!(" {marked} of the {requested} ids were marked before it filled."));
                }
                ErrorReport::new(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED, "wsusage pending set is full", function)
                    .set_detail(detail)
                    .set_hint("Increase \"wsusage.max_pending\" (needs a restart) or shorten \"wsusage.flush_interval\".")
            }
            UsageError::TooManyDatabases { capacity } => {
                ErrorReport::new(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED, "wsusage cannot track marks in more databases", function)
                    .set_detail(format!("Marks are pending in {capacity} other databases, the maximum (\"wsusage.max_databases\")."))
                    .set_hint("Increase \"wsusage.max_databases\" (needs a restart), or shorten \"wsusage.flush_interval\" so that databases free their places sooner.")
            }
            UsageError::WrongDatabase { current } => {
                let configured = settings::database().unwrap_or_default();
                ErrorReport::new(
                    ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!("wsusage is not active in database \"{current}\""),
                    function,
                )
                .set_detail(format!(
                    "\"wsusage.database\" restricts wsusage to database \"{configured}\", so marks are accepted only there."
                ))
                .set_hint(format!(
                    "Connect to database \"{configured}\", or set \"wsusage.database\" to \"{current}\" or to an empty string (every database) and restart the server."
                ))
            }
            UsageError::InRecovery { action } => ErrorReport::new(
                ERRCODE_READ_ONLY_SQL_TRANSACTION,
                format!("cannot {action} during recovery"),
                function,
            )
            .set_hint("Run it on the primary server; the worker starts on a standby once it is promoted."),
            UsageError::LauncherNotRunning { waited } => ErrorReport::new(
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "wsusage launcher is not running",
                function,
            )
            .set_detail(format!(
                "No wsusage launcher was attached during {} seconds; the marks stay pending.",
                waited.as_secs()
            ))
            .set_hint("Check the server log for messages from the \"wsusage launcher\", and that \"max_worker_processes\" leaves room for it and \"wsusage.max_workers\" flush workers."),
            UsageError::FlushFailed { sqlstate, message } => ErrorReport::new(
                PgSqlErrorCode::from(*sqlstate),
                format!("wsusage flush failed: {message}"),
                function,
            )
            .set_detail("The marks stay pending; the worker retries them every \"wsusage.flush_interval\".")
            .set_hint("Fix the cause reported above; the server log has the worker's messages."),
            UsageError::FlushOutcomeLost => ErrorReport::new(
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "wsusage flush completed but its outcome is no longer available",
                function,
            )
            .set_detail("More flushes completed than wsusage remembers before this call could read its own.")
            .set_hint("Call the function again."),
            UsageError::HeldBack { held_back } => ErrorReport::new(
                ERRCODE_WARNING,
                format!("wsusage held back {held_back} ids whose rows make the flush fail"),
                function,
            )
            .set_detail("They stay pending, shown with their errors by wsusage_pending(), and are retried at a slowing pace; every other id was written.")
            .set_hint("Fix those rows, or what rejects them (a trigger, a check)."),
            UsageError::SettingRefused { setting } => ErrorReport::new(
                ERRCODE_INVALID_PARAMETER_VALUE,
                format!("wsusage is disabled: the server refused the value of \"{setting}\""),
                function,
            )
            .set_detail(setting_refused_detail(setting))
            .set_hint(format!("Fix \"{setting}\" in the configuration file (see the WARNING in the server log) and restart the server.")),
        }
    }

    /// Report this as a WARNING to the caller, who goes on.
    pub fn warn(&self, function: &'static str) {
        self.to_report(function).report(PgLogLevel::WARNING);
    }

    /// Raise this error as a PostgreSQL ERROR in the calling SQL function.
    pub fn raise(&self, function: &'static str) -> ! {
        self.to_report(function).report(PgLogLevel::ERROR);
        unreachable!("an ERROR report does not return")
    }
}

/// Tell the DBA a flush failed: a WARNING with the SQL error and how many failures in a row.
pub fn report_flush_failure(ids: u64, consecutive_failures: u64, failure: &Failure) {
    ErrorReport::new(
        PgSqlErrorCode::from(failure.sqlstate),
        format!("wsusage could not flush {ids} pending ids: {}", failure.message),
        "wsusage worker",
    )
    .set_detail(format!(
        "Consecutive failed flushes: {consecutive_failures}. The ids stay pending and are retried every \"wsusage.flush_interval\", merged with newer marks."
    ))
    .report(PgLogLevel::WARNING);
}

/// Tell the DBA, once, that the configured table does not fit (found at start or on reload).
pub fn report_target_problem(failure: &Failure) {
    ErrorReport::new(
        PgSqlErrorCode::from(failure.sqlstate),
        format!("wsusage cannot write its target: {}", failure.message),
        "wsusage worker",
    )
    .set_detail("Marks are kept until the table, or the wsusage.table, wsusage.id_column and wsusage.timestamp_column settings, are fixed.")
    .report(PgLogLevel::WARNING);
}

/// A place of the pending set stayed claimed by a process that has not run since (see
/// `wsusage_pending_table::STUCK_AFTER`): this call's marks from that id on are refused, those
/// before it were recorded, and the set is whole, so an ERROR for this caller, nothing for the
/// server (a PANIC would lose every pending mark with the shared memory).
pub fn report_stuck(stuck: Stuck, function: &'static str, marked: usize, requested: usize) -> ! {
    let detail = if requested == 1 {
        "The id was not marked.".to_owned()
    } else {
        format!("{marked} of the {requested} ids were marked; the others were not.")
    };
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
        format!(
            "{function}: a place of the wsusage pending set was held by another process for {} ms",
            stuck.waited.as_millis()
        ),
        function,
    )
    .set_detail(format!(
        "{detail} The process that claimed place {} has not run since: stopped (SIGSTOP, a debugger) or \
         starved of CPU. Marks already pending are kept.",
        stuck.place
    ))
    .set_hint("Mark again. If it keeps failing, look for a stopped server process (pg_stat_activity, ps).")
    .report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}

/// `name` as an SQL identifier, quoted when it must be.
fn quote_identifier(name: &str) -> String {
    let plain = name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// Why wsusage will not act on the default PostgreSQL put in place of a refused `setting`.
pub fn setting_refused_detail(setting: &str) -> String {
    let instead = if setting == "wsusage.role" {
        "flushing as each table's owner instead of the role named"
    } else {
        "accepting marks in every database instead of the one named"
    };
    format!("PostgreSQL kept the default in its place, and acting on it would mean {instead}.")
}

/// Tell the DBA an id is held back: its row makes the UPDATE fail (`failures`: attempts in a
/// row, `None` when the pool of held-back ids is full).
pub fn report_held_back(database: &str, key: Key, failures: Option<u32>, failure: &Failure) {
    let detail = match failures {
        Some(failures) => format!(
            "Failed attempts in a row: {failures}. The id stays pending, shown with its error by wsusage_pending(), and is retried at a slowing pace; the other ids are written."
        ),
        None => format!(
            "wsusage holds back at most {} ids, so this one is isolated again at every flush; the other ids are written.",
            crate::memory::held_back::HELD_MAX
        ),
    };
    ErrorReport::new(
        PgSqlErrorCode::from(failure.sqlstate),
        format!(
            "wsusage holds back id {} of database \"{database}\": its row makes the flush fail: {}",
            key::display(Kind::of(key.kind).unwrap_or(Kind::Uuid), &key.id),
            failure.message
        ),
        "wsusage worker",
    )
    .set_detail(detail)
    .set_hint("Fix the row, or what rejects it (a trigger, a check); the next try writes it.")
    .report(PgLogLevel::WARNING);
}
