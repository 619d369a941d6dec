//! Why a `wsusage_flush()` caller could not wait for its flush, or what it must know of it: no
//! launcher, a flush that failed, an outcome forgotten, ids held back (a WARNING).

use std::time::Duration;

use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::ErrorReport;

use crate::sql::report::Report;

pub enum FlushError {
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
}

impl Report for FlushError {
    fn to_report(&self, function: &'static str) -> ErrorReport {
        use PgSqlErrorCode::*;
        match self {
            FlushError::LauncherNotRunning { waited } => ErrorReport::new(
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "wsusage launcher is not running",
                function,
            )
            .set_detail(format!(
                "No wsusage launcher was attached during {} ms (\"wsusage.launcher_wait\"); the marks stay pending.",
                waited.as_millis()
            ))
            .set_hint("Check the server log for messages from the \"wsusage launcher\", and that \"max_worker_processes\" leaves room for it and \"wsusage.max_workers\" flush workers."),
            FlushError::FlushFailed { sqlstate, message } => ErrorReport::new(
                PgSqlErrorCode::from(*sqlstate),
                format!("wsusage flush failed: {message}"),
                function,
            )
            .set_detail("The marks stay pending; the worker retries them every \"wsusage.flush_interval\".")
            .set_hint("Fix the cause reported above; the server log has the worker's messages."),
            FlushError::FlushOutcomeLost => ErrorReport::new(
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "wsusage flush completed but its outcome is no longer available",
                function,
            )
            .set_detail("More flushes completed than wsusage remembers before this call could read its own.")
            .set_hint("Call the function again."),
            FlushError::HeldBack { held_back } => ErrorReport::new(
                ERRCODE_WARNING,
                format!("wsusage held back {held_back} ids whose rows make the flush fail"),
                function,
            )
            .set_detail("They stay pending, shown with their errors by wsusage_pending(), and are retried at a slowing pace; every other id was written.")
            .set_hint("Fix those rows, or what rejects them (a trigger, a check)."),
        }
    }
}
