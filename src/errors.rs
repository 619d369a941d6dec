//! Every error and warning a user or DBA sees, each with its SQLSTATE, detail and hint, worded
//! after PostgreSQL's error message style guide.

use std::time::Duration;

use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::PgLogLevel;

use pgrx::pg_sys::errcodes::PgSqlErrorCode as Code;
use wsusage_pending_table::Stuck;

use crate::settings;

/// A database error that ended a chunk of a flush, or a check, with what the DBA and the caller
/// need to know.
pub struct Failure {
    pub sqlstate: i32,
    pub message: String,
}

impl Failure {
    /// Errors that concern one chunk only (a lock held by an application, a timeout, a
    /// deadlock); after any other error the remaining chunks would fail the same way.
    pub fn is_local_to_chunk(&self) -> bool {
        [
            Code::ERRCODE_LOCK_NOT_AVAILABLE,
            Code::ERRCODE_QUERY_CANCELED,
            Code::ERRCODE_T_R_DEADLOCK_DETECTED,
            Code::ERRCODE_T_R_SERIALIZATION_FAILURE,
        ]
        .iter()
        .any(|code| *code as i32 == self.sqlstate)
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
    /// The configuration file's value of `setting` was refused at server start.
    SettingRefused {
        setting: &'static str,
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
            UsageError::NullId { element } => {
                let report = ErrorReport::new(ERRCODE_NULL_VALUE_NOT_ALLOWED, "workspace id must not be null", function);
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
            UsageError::SettingRefused { setting } => ErrorReport::new(
                ERRCODE_INVALID_PARAMETER_VALUE,
                format!("wsusage is disabled: the server refused the value of \"{setting}\""),
                function,
            )
            .set_detail(setting_refused_detail(setting))
            .set_hint(format!("Fix \"{setting}\" in the configuration file (see the WARNING in the server log) and restart the server.")),
        }
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

/// A place of the pending set stayed claimed, by a process that stopped between two
/// instructions that cannot fail: shared memory can no longer be trusted, so, as PostgreSQL does
/// for a stuck spinlock, PANIC, which makes the postmaster reinitialise it.
pub fn report_stuck(stuck: Stuck) -> ! {
    ErrorReport::new(
        Code::ERRCODE_INTERNAL_ERROR,
        format!("wsusage pending set place {} stuck for {} ms", stuck.place, stuck.waited.as_millis()),
        "wsusage_mark",
    )
    .set_detail("Another process claimed the place and never published it.")
    .report(PgLogLevel::PANIC);
    unreachable!("a PANIC report does not return")
}

/// Why wsusage will not act on the default PostgreSQL put in place of a refused `setting`.
pub fn setting_refused_detail(setting: &str) -> String {
    let wider = if setting == "wsusage.role" {
        "flushing as the bootstrap superuser instead of the role"
    } else {
        "accepting marks in every database instead of the one named"
    };
    format!("PostgreSQL kept the default in its place, and acting on it would mean {wider}.")
}
