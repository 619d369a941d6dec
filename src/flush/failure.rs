//! A flush's failures as the worker sees them: a database error with its SQLSTATE, how far its
//! cause reaches (a chunk, a row, the whole round), and the WARNINGs that tell the DBA (a
//! failed flush, a target that does not fit, a key held back).

use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::PgLogLevel;
use wsusage_pending_table::Key;

use crate::memory::key::{self, Kind};

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

#[cfg(test)]
mod tests {
    use super::*;

    fn scope_of(code: PgSqlErrorCode) -> Scope {
        Failure { sqlstate: code as i32, message: String::new() }.scope()
    }

    #[test]
    fn a_lock_a_timeout_a_deadlock_or_a_serialization_failure_is_the_chunks_own_trouble() {
        use PgSqlErrorCode::*;
        for code in [
            ERRCODE_LOCK_NOT_AVAILABLE,
            ERRCODE_QUERY_CANCELED,
            ERRCODE_T_R_DEADLOCK_DETECTED,
            ERRCODE_T_R_SERIALIZATION_FAILURE,
        ] {
            assert_eq!(scope_of(code), Scope::Chunk, "{code:?}");
        }
    }

    #[test]
    fn a_rows_own_error_is_looked_for_and_anything_else_stops_the_round() {
        use PgSqlErrorCode::*;
        for code in [
            ERRCODE_CHECK_VIOLATION,
            ERRCODE_NOT_NULL_VIOLATION,
            ERRCODE_RAISE_EXCEPTION,
            ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
            ERRCODE_TRIGGERED_ACTION_EXCEPTION,
            ERRCODE_WITH_CHECK_OPTION_VIOLATION,
        ] {
            assert_eq!(scope_of(code), Scope::Rows, "{code:?}");
        }
        for code in [
            ERRCODE_UNDEFINED_TABLE,
            ERRCODE_UNDEFINED_COLUMN,
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            ERRCODE_READ_ONLY_SQL_TRANSACTION,
            ERRCODE_OUT_OF_MEMORY,
        ] {
            assert_eq!(scope_of(code), Scope::Round, "{code:?}");
        }
    }
}
