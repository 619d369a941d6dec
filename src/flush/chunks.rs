//! The writing of one target's keys in a round (see `round`): in chunks of `wsusage.batch_size`,
//! each chunk one statement in its own transaction, first waiting for no lock more than a few
//! milliseconds, then skipping the rows locked elsewhere; a chunk failing for a row's sake split
//! until its row is found and held back, within the round's budgets.

use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use wsusage_pending_table::{Entry, Key};

use crate::clock::now;
use crate::flush::failure::{self, Failure, Scope};
use crate::flush::failure_log;
use crate::flush::round::{record_failure, Flusher, Part, Round, HELD_PER_ROUND, SPLIT_BUDGET};
use crate::flush::statements::{self, Locking, Statements, Written};
use crate::flush::transaction::in_transaction;
use crate::memory::key::Kind;
use crate::settings;
use crate::state::counting::{self, ChunkOutcome};
use crate::state::databases;
use crate::state::pending;

impl Flusher {
    /// Write the keys of one target (`group`, sorted by kind and key) in chunks.
    pub(super) fn write_target(&mut self, part: &Part<'_>, group: &[Entry], round: &mut Round) {
        let database = self.database;
        round.stop_target = false;
        round.target_failed = false;
        if let Some(problem) = part.definition.problem() {
            let failure = part.failure(Failure { sqlstate: problem.sqlstate as i32, message: problem.message });
            record_failure(database, Some(part.slot), &failure.message);
            round.fail(failure);
            counting::record_target_round(database, part.slot, true, now());
            return;
        }
        let kind = part.definition.kind().unwrap_or(Kind::Uuid);
        let (own, other): (Vec<Entry>, Vec<Entry>) = group.iter().partition(|entry| entry.key.kind == kind as u8);
        if let Some(stale) = other.first() {
            self.discard(part.slot, &part.definition.name, Kind::of(stale.key.kind), &other);
        }
        self.statements.entry(part.definition.name.clone()).or_default().use_definition(part.definition);
        for (n, chunk) in own.chunks(settings::batch_size()).enumerate() {
            // A DROP DATABASE (or RENAME) waits for this process to leave: do not make it wait
            // for the remaining chunks, which stay pending.
            if (n > 0 || round.taken > 0) && databases::is_being_changed(database) {
                round.fail(Failure {
                    sqlstate: PgSqlErrorCode::ERRCODE_OBJECT_IN_USE as i32,
                    message: "the database is being dropped, renamed or copied".into(),
                });
                round.stop = true;
                break;
            }
            self.write(part, chunk, round);
            if round.stop || round.stop_target {
                break;
            }
        }
        counting::record_target_round(database, part.slot, round.target_failed, now());
    }

    /// Write `chunk` (sorted by key) in one transaction; if it fails because of a row, split it
    /// until the rows that fail are isolated and held back.
    fn write(&mut self, part: &Part<'_>, chunk: &[Entry], round: &mut Round) {
        let database = self.database;
        let Some(statements) = self.statements.get_mut(&part.definition.name) else { return };
        match write_chunk(statements, chunk) {
            Ok(Written::Rows { updated, without_row, mut skipped }) => {
                skipped.sort_unstable();
                let written: Vec<Entry> =
                    chunk.iter().filter(|entry| skipped.binary_search(&entry.key.id).is_err()).copied().collect();
                pending::forget(database, &written);
                round.taken += written.len() as u64;
                let not_written = (written.len() as u64).saturating_sub(updated + without_row);
                let outcome = ChunkOutcome::Committed {
                    ids: written.len() as u64,
                    rows_updated: updated,
                    ids_without_row: without_row,
                    ids_skipped_locked: skipped.len() as u64,
                    ids_skipped_by_min_change: if part.definition.skips_by_min_change() { not_written } else { 0 },
                };
                counting::record_chunk(database, Some(part.slot), &outcome, now());
            }
            Ok(Written::ExtensionMissing) => {
                round.extension_missing = true;
                round.stop = true;
            }
            Err(ChunkFailure { failure, in_after_flush }) => {
                let failure = part.failure(failure);
                // An ERROR of the after_flush function is the function's: never split for it.
                let scope = if in_after_flush { Scope::Round } else { failure.scope() };
                match after_failure(scope, chunk.len(), round.splits, round.held_back) {
                    AfterFailure::Split => {
                        round.splits += 2;
                        let (first, second) = chunk.split_at(chunk.len() / 2);
                        self.write(part, first, round);
                        if !round.stop && !round.stop_target {
                            self.write(part, second, round);
                        }
                    }
                    AfterFailure::HoldBack => {
                        record_failure(database, Some(part.slot), &failure.message);
                        self.hold_back(chunk[0].key, &failure);
                        round.held_back += 1;
                        round.target_failed = true;
                    }
                    AfterFailure::Stop { target } => {
                        record_failure(database, Some(part.slot), &failure.message);
                        round.stop_target = target;
                        round.fail(failure);
                    }
                }
            }
        }
    }

    /// Hold back `key`, whose row makes the UPDATE fail: WARNING the first time, and at the 2nd,
    /// 4th, 8th … failure in a row.
    fn hold_back(&self, key: Key, failure: &Failure) {
        let failures = pending::hold(key, &failure.message, now());
        if failures.is_none_or(|failures| failure_log::is_logged(u64::from(failures))) {
            failure::report_held_back(&self.database_name, key, failures, failure);
        }
    }
}

/// A chunk's statement failed: the error, and whether the target's `after_flush` function
/// raised it.
struct ChunkFailure {
    failure: Failure,
    in_after_flush: bool,
}

/// Write `chunk` in a transaction: first waiting for no lock more than a few milliseconds, and
/// only if a lock stopped that, again skipping the rows locked elsewhere.
fn write_chunk(statements: &mut Statements, chunk: &[Entry]) -> Result<Written, ChunkFailure> {
    let mut attempt = |locking| {
        in_transaction(|| statements::write(statements, chunk, locking))
            .map_err(|failure| ChunkFailure { failure, in_after_flush: statements::failed_in_after_flush() })
    };
    match attempt(Locking::FailFast) {
        Err(failed) if failed.failure.sqlstate == PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE as i32 => {
            attempt(Locking::SkipLocked)
        }
        result => result,
    }
}

/// What a round does with a chunk whose statement failed.
#[derive(Debug, PartialEq, Eq)]
enum AfterFailure {
    /// Write each half on its own, to find the rows that fail.
    Split,
    /// Hold the chunk's one key back: its own row fails.
    HoldBack,
    /// Leave the chunk pending and go on with the next chunk, or, when `target`, stop the
    /// target's part of the round.
    Stop { target: bool },
}

/// What to do with a chunk of `len` keys that failed with an error of `scope`, the round having
/// spent `splits` statements splitting and held back `held_back` keys: split a row's error until
/// the row is found, within the round's budgets (past them, rows failing are the table's
/// trouble); a chunk's own trouble (a lock, a timeout) leaves only it pending; anything else
/// stops the target.
fn after_failure(scope: Scope, len: usize, splits: u32, held_back: u64) -> AfterFailure {
    match scope {
        Scope::Rows if len > 1 && splits < SPLIT_BUDGET && held_back < HELD_PER_ROUND => AfterFailure::Split,
        Scope::Rows if len == 1 && held_back < HELD_PER_ROUND => AfterFailure::HoldBack,
        scope => AfterFailure::Stop { target: scope != Scope::Chunk },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rows_error_is_split_until_its_row_is_found_and_held_back() {
        assert_eq!(after_failure(Scope::Rows, 5_000, 0, 0), AfterFailure::Split);
        assert_eq!(after_failure(Scope::Rows, 2, 40, 3), AfterFailure::Split);
        assert_eq!(after_failure(Scope::Rows, 1, 40, 3), AfterFailure::HoldBack);
    }

    #[test]
    fn past_the_rounds_budgets_a_rows_error_stops_the_target() {
        let stop = AfterFailure::Stop { target: true };
        assert_eq!(after_failure(Scope::Rows, 2, SPLIT_BUDGET, 0), stop);
        assert_eq!(after_failure(Scope::Rows, 2, 0, HELD_PER_ROUND), stop);
        assert_eq!(after_failure(Scope::Rows, 1, SPLIT_BUDGET, HELD_PER_ROUND), stop);
    }

    #[test]
    fn a_chunks_own_trouble_leaves_that_chunk_pending_and_any_other_error_stops_the_target() {
        assert_eq!(after_failure(Scope::Chunk, 5_000, 0, 0), AfterFailure::Stop { target: false });
        assert_eq!(after_failure(Scope::Chunk, 1, 0, 0), AfterFailure::Stop { target: false });
        assert_eq!(after_failure(Scope::Round, 5_000, 0, 0), AfterFailure::Stop { target: true });
        assert_eq!(after_failure(Scope::Round, 1, 0, 0), AfterFailure::Stop { target: true });
    }
}
