//! How the SQL functions' errors reach their caller, each with its SQLSTATE, detail and hint,
//! worded after PostgreSQL's error message style guide: every audience's errors (whether
//! wsusage can act here at all, a mark refused, a `wsusage_flush()` that could not wait for
//! its flush) make a report, raised as an ERROR or, for a caller who goes on, a WARNING.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::PgLogLevel;

pub trait Report {
    fn to_report(&self, function: &'static str) -> ErrorReport;

    /// Raise this as a PostgreSQL ERROR in the calling SQL function.
    fn raise(&self, function: &'static str) -> ! {
        self.to_report(function).report(PgLogLevel::ERROR);
        unreachable!("an ERROR report does not return")
    }

    /// Report this as a WARNING to the caller, who goes on.
    fn warn(&self, function: &'static str) {
        self.to_report(function).report(PgLogLevel::WARNING);
    }
}
