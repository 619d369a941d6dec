//! Why a mark is refused: a NULL key or target, a target that does not exist, takes other keys
//! or cannot be written, a role without the privilege the mark defers, no room in the set or its
//! slots, or a place of the set held by a process that does not run. Raised by the marking
//! functions (`functions`) and by the resolution of their target (`resolve`); a read of pending
//! marks (`wsusage_pending_at`) is refused for the same reasons as far as they concern it.

use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::ErrorReport;
use wsusage_pending_table::Stuck;

use crate::memory::key::Kind;
use crate::sql::access::Access;
use crate::sql::report::Report;
use crate::targets::definition::Problem;

pub enum MarkRefused {
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
    /// The role may not make the UPDATE a mark of the target defers, so may not mark it; or, to
    /// read its pending marks, may not read the column.
    NoPrivilege {
        access: Access,
        name: String,
        table: String,
        id_column: String,
        column: String,
    },
    TooManyTargets {
        capacity: usize,
    },
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
    /// A place of the set stayed claimed by a process that has not run since (see
    /// `wsusage_pending_table::STUCK_AFTER`): this call's keys from that one on are refused,
    /// `marked` before it were recorded, and the set is whole.
    Stuck {
        stuck: Stuck,
        marked: usize,
        requested: usize,
    },
    /// As `Stuck`, for a read of a pending mark.
    StuckReading {
        stuck: Stuck,
    },
}

impl Report for MarkRefused {
    fn to_report(&self, function: &'static str) -> ErrorReport {
        use PgSqlErrorCode::*;
        match self {
            MarkRefused::NullTarget => {
                let without = match function {
                    "wsusage_mark" | "wsusage_mark_many" => ", or call the function without one to mark the \"default\" target",
                    "wsusage_pending_at" => ", or call the function without one to read the \"default\" target",
                    _ => "",
                };
                ErrorReport::new(ERRCODE_NULL_VALUE_NOT_ALLOWED, "target must not be null", function)
                    .set_hint(format!("Name a target of wsusage_target{without}."))
            }
            MarkRefused::UnknownTarget { name } => ErrorReport::new(
                ERRCODE_UNDEFINED_OBJECT,
                format!("wsusage target \"{name}\" does not exist"),
                function,
            )
            .set_hint("Targets are the rows of the table wsusage_target in this database; \"default\" is also defined by the settings wsusage.table, wsusage.id_column and wsusage.timestamp_column."),
            MarkRefused::WrongKeyType { name, column_type, takes } => {
                let other = match function {
                    "wsusage_mark" => "wsusage_mark_bigint",
                    "wsusage_mark_many" => "wsusage_mark_many_bigint",
                    "wsusage_mark_bigint" => "wsusage_mark",
                    "wsusage_pending_at" => "wsusage_pending_at_bigint",
                    "wsusage_pending_at_bigint" => "wsusage_pending_at",
                    _ => "wsusage_mark_many",
                };
                let verb = if function.starts_with("wsusage_pending_at") { "Read" } else { "Mark" };
                ErrorReport::new(
                    ERRCODE_DATATYPE_MISMATCH,
                    format!("wsusage target \"{name}\" has keys of type {column_type}, but {function} takes {}", takes.sql_type()),
                    function,
                )
                .set_hint(format!("{verb} the keys of this target with {other}()."))
            }
            MarkRefused::TargetProblem { name, problem } => ErrorReport::new(
                problem.sqlstate,
                format!("wsusage target \"{name}\" cannot be written: {}", problem.message),
                function,
            )
            .set_hint(problem.hint.clone()),
            MarkRefused::NoPrivilege { access, name, table, id_column, column } => {
                let (id, ts) = (quote_identifier(id_column), quote_identifier(column));
                let (message, detail, hint) = match access {
                    Access::Mark => (
                        format!("permission denied to mark wsusage target \"{name}\": no privilege to update column \"{column}\" of table {table}"),
                        "A mark is an UPDATE of that column made later by the flush worker, so it needs what the UPDATE would: USAGE on the table's schema, SELECT on the id and timestamp columns, UPDATE on the timestamp column.",
                        format!("GRANT SELECT ({id}, {ts}), UPDATE ({ts}) ON {table} TO the role that marks."),
                    ),
                    Access::Read => (
                        format!("permission denied to read the pending marks of wsusage target \"{name}\": no privilege to select columns \"{id_column}\" and \"{column}\" of every row of table {table}"),
                        "A pending mark is the column's next value: reading it needs what reading the column does, USAGE on the table's schema and SELECT on the id and timestamp columns, on a table whose rows row-level security does not filter for the role.",
                        format!("GRANT SELECT ({id}, {ts}) ON {table} TO the role that reads."),
                    ),
                };
                ErrorReport::new(ERRCODE_INSUFFICIENT_PRIVILEGE, message, function).set_detail(detail).set_hint(hint)
            }
            MarkRefused::TooManyTargets { capacity } => {
                ErrorReport::new(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED, "wsusage cannot track marks of more targets", function)
                    .set_detail(format!("Marks are pending for {capacity} other targets, the maximum (\"wsusage.max_targets\")."))
                    .set_hint("Increase \"wsusage.max_targets\" (needs a restart), or shorten \"wsusage.flush_interval\" so that targets free their places sooner.")
            }
            MarkRefused::NullId { element } => {
                let report = ErrorReport::new(ERRCODE_NULL_VALUE_NOT_ALLOWED, "id must not be null", function);
                match element {
                    Some(n) => report.set_detail(format!("Element {n} of the array is null; no id of the array was marked.")),
                    None => report,
                }
            }
            MarkRefused::SetFull { capacity, marked, requested } => {
                let mut detail = format!("The set holds its maximum of {capacity} distinct ids until the next flush.");
                if *requested > 1 {
                    detail.push_str(&format!(" {marked} of the {requested} ids were marked before it filled."));
                }
                ErrorReport::new(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED, "wsusage pending set is full", function)
                    .set_detail(detail)
                    .set_hint("Increase \"wsusage.max_pending\" (needs a restart) or shorten \"wsusage.flush_interval\".")
            }
            MarkRefused::TooManyDatabases { capacity } => {
                ErrorReport::new(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED, "wsusage cannot track marks in more databases", function)
                    .set_detail(format!("Marks are pending in {capacity} other databases, the maximum (\"wsusage.max_databases\")."))
                    .set_hint("Increase \"wsusage.max_databases\" (needs a restart), or shorten \"wsusage.flush_interval\" so that databases free their places sooner.")
            }
            MarkRefused::Stuck { stuck, marked, requested } => {
                let outcome = if *requested == 1 {
                    "The id was not marked.".to_owned()
                } else {
                    format!("{marked} of the {requested} ids were marked; the others were not.")
                };
                stuck_report(function, stuck, &format!("{outcome} "), "Mark again")
            }
            MarkRefused::StuckReading { stuck } => stuck_report(function, stuck, "", "Read again"),
        }
    }
}

/// A place of the set stayed claimed: what the call did (`outcome`, empty or a sentence and a
/// space), and what to do (`again`).
fn stuck_report(function: &'static str, stuck: &Stuck, outcome: &str, again: &str) -> ErrorReport {
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
        format!(
            "{function}: a place of the wsusage pending set was held by another process for {} ms",
            stuck.waited.as_millis()
        ),
        function,
    )
    .set_detail(format!(
        "{outcome}The process that claimed place {} has not run since: stopped (SIGSTOP, a debugger) or starved of \
         CPU. Marks already pending are kept.",
        stuck.place
    ))
    .set_hint(format!("{again}. If it keeps failing, look for a stopped server process (pg_stat_activity, ps)."))
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
