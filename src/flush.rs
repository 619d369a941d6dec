//! One flush round of a database: snapshot its pending ids, write them in chunks of
//! `wsusage.batch_size`, each chunk one statement (see `target`) in its own transaction (see
//! `transaction`), and forget what each committed chunk wrote. Runs in the worker only.
//!
//! The statement writes each id's own latest mark time, and only over NULL or an older value, so
//! a row never moves backwards whatever races with it. Nothing one row does holds back the
//! others:
//! - a row another transaction holds locked is skipped (`SKIP LOCKED`): its id stays pending for
//!   the next flush, the chunk's other ids commit (`ids_skipped_locked`). A chunk's first
//!   statement is the plain UPDATE, which waits for no lock more than a few milliseconds; only
//!   when it meets a lock is the chunk run again locking its rows first (see `statements`), so
//!   flushes pay for the lock pass only when an application holds a row;
//! - a chunk that fails with an error that may be one row's (a trigger or check raising for it,
//!   a value its column refuses; see `errors::Scope`) is split in halves, and the halves retried,
//!   until the failing ids are isolated; everything else commits in the same round. An isolated
//!   id stays pending, held back with its error (see `held`) and retried at a slowing pace. At
//!   most [`SPLIT_BUDGET`] statements and [`HELD_PER_ROUND`] isolated ids a round, so a table
//!   whose every row fails costs a round a few hundred statements, not two per id, and fails the
//!   round as any error would;
//! - a lock or timeout on the chunk as a whole (a table lock, `wsusage.statement_timeout`) fails
//!   that chunk only, which stays pending; an error that no row causes (a missing table, a
//!   privilege, a read-only server) ends the round, and nothing is split.
//!
//! The pending lock is never held here while the database is touched.

use pgrx::pg_sys;
use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::prelude::*;
use wsusage_pending_table::Entry;

use crate::clock::now;
use crate::databases;
use crate::errors::{self, Failure, Scope};
use crate::held::HELD_MAX;
use crate::pending;
use crate::rendezvous;
use crate::settings;
use crate::statements::{self, Locking, Statements, Written};
use crate::stats::{self, ChunkOutcome};
use crate::transaction::in_transaction;

/// Statements a round may spend splitting failing chunks: enough to isolate a dozen bad rows in
/// a chunk of thousands (about two statements per halving).
pub const SPLIT_BUDGET: u32 = 256;

/// Ids a round may hold back. Past it, rows failing are the table's trouble, not a few rows'
/// (a trigger refusing every row): the round stops splitting and fails, as for any error.
pub const HELD_PER_ROUND: u64 = 8;

/// The worker's flush state: its database, the statements, prepared once, and buffers big
/// enough for the whole set, allocated once so that nothing allocates under the pending lock.
pub struct Flusher {
    database: pg_sys::Oid,
    database_name: String,
    statements: Statements,
    batch: Vec<Entry>,
    /// Held-back ids not yet due again, sorted.
    waiting: Vec<[u8; 16]>,
    /// The last failure message logged, so a repeated failure is not logged every interval.
    last_logged_failure: Option<String>,
    extension_missing_logged: bool,
    /// The target problem last logged by a start-up or reload check, so a reload that changes
    /// nothing does not repeat it.
    last_target_problem: Option<String>,
}

/// What a round did so far.
#[derive(Default)]
struct Round {
    /// Ids written (or found without a row): taken from the set.
    taken: u64,
    /// Ids isolated this round, held back.
    held_back: u64,
    /// The first failure that is not one row's.
    failure: Option<Failure>,
    /// Statements spent splitting.
    splits: u32,
    stop: bool,
    extension_missing: bool,
}

impl Flusher {
    /// Call once connected to `database`.
    pub fn new(database: pg_sys::Oid) -> Self {
        Flusher {
            database,
            database_name: database_name(database),
            statements: Statements::default(),
            batch: Vec::with_capacity(settings::max_pending()),
            waiting: Vec::with_capacity(HELD_MAX),
            last_logged_failure: None,
            extension_missing_logged: false,
            last_target_problem: None,
        }
    }

    pub fn database_name(&self) -> &str {
        &self.database_name
    }

    /// Whether the last flush found the extension missing from the database.
    pub fn extension_is_missing(&self) -> bool {
        self.extension_missing_logged
    }

    /// Flush whatever of the database is pending and publish the outcome to `wsusage_flush()`
    /// callers; returns the number of ids taken from the set.
    pub fn flush(&mut self) -> u64 {
        let database = self.database;
        let started_at = now();
        let up_to_request = pending::snapshot(database, &mut self.batch, started_at);
        // Held-back ids wait for their turn; the rest go now.
        pending::held_waiting(database, started_at, &mut self.waiting);
        let waiting = &self.waiting;
        self.batch.retain(|entry| waiting.binary_search(&entry.key.id).is_err());
        if self.batch.is_empty() {
            rendezvous::publish(database, up_to_request, &rendezvous::Result::Applied { ids: 0, held_back: 0 });
            return 0;
        }
        let ids = self.batch.len() as u64;
        self.batch.sort_unstable_by_key(|entry| entry.key.id);

        let mut round = Round::default();
        match settings::target() {
            // The check hooks keep invalid names out; this is a last line of defence.
            Err(detail) => {
                stats::record_chunk(database, &ChunkOutcome::Failed { message: &detail }, now());
                round.failure =
                    Some(Failure { sqlstate: PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE as i32, message: detail });
            }
            Ok(target) => {
                self.statements.use_target(&target);
                let batch = std::mem::take(&mut self.batch);
                for (n, chunk) in batch.chunks(settings::batch_size()).enumerate() {
                    // A DROP DATABASE (or RENAME) waits for this process to leave: do not make it
                    // wait for the remaining chunks, which stay pending.
                    if n > 0 && databases::is_being_changed(database) {
                        round.failure.get_or_insert(Failure {
                            sqlstate: PgSqlErrorCode::ERRCODE_OBJECT_IN_USE as i32,
                            message: "the database is being dropped, renamed or copied".into(),
                        });
                        break;
                    }
                    self.write(chunk, n == 0, &mut round);
                    if round.stop {
                        break;
                    }
                }
                self.batch = batch;
            }
        }

        let failure = if round.extension_missing {
            Some(self.extension_missing())
        } else {
            self.extension_missing_logged = false;
            round.failure
        };
        let failed_before = stats::consecutive_failures(database);
        let consecutive = stats::record_flush(database, failure.is_some(), started_at, now());
        let result = match failure {
            None => {
                self.report_success(round.taken, failed_before);
                rendezvous::Result::Applied { ids: round.taken, held_back: round.held_back }
            }
            Some(failure) => {
                if !round.extension_missing {
                    self.report_failure(ids, consecutive, &failure);
                }
                rendezvous::Result::Failed { ids, sqlstate: failure.sqlstate, message: failure.message }
            }
        };
        rendezvous::publish(database, up_to_request, &result);
        round.taken
    }

    /// Write `part` (sorted by id) in one transaction; if it fails because of a row, split it
    /// until the rows that fail are isolated and held back.
    fn write(&mut self, part: &[Entry], check_target: bool, round: &mut Round) {
        let database = self.database;
        let statements = &mut self.statements;
        let mut attempt = |locking| in_transaction(|| statements::write(statements, part, check_target, locking));
        let mut result = attempt(Locking::FailFast);
        if matches!(&result, Err(failure) if failure.sqlstate == PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE as i32) {
            // A row (or the table) is locked elsewhere: again, skipping the rows held.
            result = attempt(Locking::SkipLocked);
        }
        match result {
            Ok(Written::Rows { updated, without_row, mut skipped }) => {
                skipped.sort_unstable();
                let written: Vec<Entry> =
                    part.iter().filter(|entry| skipped.binary_search(&entry.key.id).is_err()).copied().collect();
                pending::forget(database, &written);
                round.taken += written.len() as u64;
                let outcome = ChunkOutcome::Committed {
                    ids: written.len() as u64,
                    rows_updated: updated,
                    ids_without_row: without_row,
                    ids_skipped_locked: skipped.len() as u64,
                };
                stats::record_chunk(database, &outcome, now());
            }
            Ok(Written::ExtensionMissing) => {
                round.extension_missing = true;
                round.stop = true;
            }
            Err(failure) => match failure.scope() {
                Scope::Rows if part.len() > 1 && round.splits < SPLIT_BUDGET && round.held_back < HELD_PER_ROUND => {
                    round.splits += 2;
                    let (first, second) = part.split_at(part.len() / 2);
                    self.write(first, false, round);
                    if !round.stop {
                        self.write(second, false, round);
                    }
                }
                Scope::Rows if part.len() == 1 && round.held_back < HELD_PER_ROUND => {
                    stats::record_chunk(database, &ChunkOutcome::Failed { message: &failure.message }, now());
                    self.hold_back(part[0].key.id, &failure);
                    round.held_back += 1;
                }
                scope => {
                    stats::record_chunk(database, &ChunkOutcome::Failed { message: &failure.message }, now());
                    // A row's error left unsplit (the round's budget spent) is the table's trouble
                    // now: stop, as for an error no row causes.
                    round.stop = scope != Scope::Chunk;
                    round.failure.get_or_insert(failure);
                }
            },
        }
    }

    /// Hold back `id`, whose row makes the UPDATE fail: WARNING the first time, and at the 2nd,
    /// 4th, 8th … failure in a row.
    fn hold_back(&self, id: [u8; 16], failure: &Failure) {
        let failures = pending::hold(self.database, id, &failure.message, now());
        if failures.is_none_or(|failures| failures.is_power_of_two()) {
            errors::report_held_back(&self.database_name, id, failures, failure);
        }
    }

    fn extension_missing(&mut self) -> Failure {
        let message = format!("extension \"wsusage\" does not exist in database \"{}\"", self.database_name);
        if !self.extension_missing_logged {
            log!(
                "wsusage flush worker is leaving: {message}; its pending marks are kept until CREATE EXTENSION wsusage"
            );
            self.extension_missing_logged = true;
        }
        stats::record_chunk(self.database, &ChunkOutcome::Failed { message: &message }, now());
        Failure { sqlstate: PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT as i32, message }
    }

    fn report_success(&mut self, ids: u64, failed_before: u64) {
        self.last_logged_failure = None;
        if failed_before > 0 {
            log!("wsusage flush succeeded again: {ids} pending ids were applied");
        }
    }

    /// WARNING on the first failure, when the error changes, and at the 2nd, 4th, 8th …
    /// consecutive failure, so a lasting fault is visible without flooding the log.
    fn report_failure(&mut self, ids: u64, consecutive: u64, failure: &Failure) {
        let changed = self.last_logged_failure.as_deref() != Some(failure.message.as_str());
        if changed || (consecutive > 1 && consecutive.is_power_of_two()) {
            errors::report_flush_failure(ids, consecutive, failure);
            self.last_logged_failure = Some(failure.message.clone());
        }
    }
}

/// The name of `database`, for messages; its OID if it has none (being dropped).
fn database_name(database: pg_sys::Oid) -> String {
    // SAFETY: a transaction of its own around the catalog lookup, outside any other.
    unsafe { pg_sys::StartTransactionCommand() };
    let name = databases::name(database).unwrap_or_else(|| database.to_u32().to_string());
    // SAFETY: ends the transaction started above.
    unsafe { pg_sys::CommitTransactionCommand() };
    name
}

/// Check the configured target in a transaction of its own (at start and after a reload), so a
/// misconfiguration is reported before any mark waits on it.
pub fn validate_target(flusher: &mut Flusher) {
    let Ok(target) = settings::target() else { return };
    flusher.statements.use_target(&target);
    let statements = &mut flusher.statements;
    if let Err(failure) = in_transaction(|| statements::check(statements)) {
        stats::record_problem(flusher.database, &failure.message, now());
        if flusher.last_target_problem.as_deref() != Some(failure.message.as_str()) {
            errors::report_target_problem(&failure);
            flusher.last_target_problem = Some(failure.message);
        }
    } else {
        flusher.last_target_problem = None;
    }
}
