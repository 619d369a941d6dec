//! One flush round of a database: snapshot its pending keys, read its targets' definitions (see
//! `targets::lookup`), write each target's keys in chunks of `wsusage.batch_size` (see `chunks`),
//! each chunk one statement (see `targets::definition`) in its own transaction (see
//! `transaction`), forget what each committed chunk wrote, and count, log (see `failure_log`)
//! and publish the outcome. Runs in the worker only.
//!
//! Targets are independent: one that fails (its table dropped, a privilege revoked, its
//! `after_flush` function raising) keeps its keys pending and is reported, and the round goes on
//! with the others. Keys of a target whose row was deleted are discarded, counted and logged,
//! once the row is missing at two rounds in a row; keys marked under a key type the target no
//! longer has (its row changed from a uuid to a bigint column, say) at once. Without the
//! extension, every key is kept.
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
//!   a value its column refuses; see `failure::Scope`) is split in halves, and the halves retried,
//!   until the failing ids are isolated; everything else commits in the same round. An isolated
//!   id stays pending, held back with its error (see `memory::held_back`) and retried at a slowing pace. At
//!   most [`SPLIT_BUDGET`] statements and [`HELD_PER_ROUND`] isolated ids a round, so a table
//!   whose every row fails costs a round a few hundred statements, not two per id, and fails the
//!   target's part of the round as any error would;
//! - a lock or timeout on the chunk as a whole (a table lock, `wsusage.statement_timeout`) fails
//!   that chunk only, which stays pending; an error that no row causes (a missing table, a
//!   privilege, a read-only server) ends the target's part of the round (the other targets go
//!   on), and nothing is split; so does an error of the target's `after_flush` function, which is
//!   the function's, not a row's.
//!
//! The pending lock is never held here while the database is touched.

use std::collections::HashMap;

use pgrx::pg_sys;
use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::prelude::*;
use wsusage_pending_table::{Entry, Key};

use crate::clock::now;
use crate::flush::failure::{self, Failure};
use crate::flush::failure_log::FailureLog;
use crate::flush::statements::Statements;
use crate::flush::transaction::in_transaction;
use crate::memory::held_back::HELD_MAX;
use crate::memory::key::Kind;
use crate::settings;
use crate::state::counting::{self, ChunkOutcome};
use crate::state::databases;
use crate::state::pending;
use crate::state::rendezvous;
use crate::state::target_slots::SlotRef;
use crate::targets::definition::Definition;
use crate::targets::lookup;
use crate::targets::published;

/// Statements a round may spend splitting failing chunks: enough to isolate a dozen bad rows in
/// a chunk of thousands (about two statements per halving).
pub const SPLIT_BUDGET: u32 = 256;

/// Ids a round may hold back. Past it, rows failing are the table's trouble, not a few rows'
/// (a trigger refusing every row): the round stops splitting and fails, as for any error.
pub const HELD_PER_ROUND: u64 = 8;

/// The worker's flush state: its database, the statements of each target, prepared once, and
/// buffers big enough for the whole set, allocated once so that nothing allocates under the
/// pending lock.
pub struct Flusher {
    pub(super) database: pg_sys::Oid,
    pub(super) database_name: String,
    pub(super) statements: HashMap<String, Statements>,
    pub(super) batch: Vec<Entry>,
    /// Held-back keys not yet due again, sorted.
    pub(super) waiting: Vec<Key>,
    /// The failures logged, so that a repeated failure is not logged every interval.
    pub(super) failure_log: FailureLog,
    /// The last round found the extension missing from the database (and said so, once).
    pub(super) extension_was_missing: bool,
    /// The target problems last logged by a start-up or reload check, so a reload that changes
    /// nothing does not repeat them.
    pub(super) last_target_problems: Vec<String>,
    /// Slots with keys pending whose target had no row at the last round.
    pub(super) missing: Vec<SlotRef>,
}

/// What a round did so far.
#[derive(Default)]
pub(super) struct Round {
    /// Ids written (or found without a row): taken from the set.
    pub(super) taken: u64,
    /// Ids isolated this round, held back.
    pub(super) held_back: u64,
    /// The first failure of the round.
    pub(super) failure: Option<Failure>,
    /// Statements spent splitting.
    pub(super) splits: u32,
    /// The current target's part of the round is over.
    pub(super) stop_target: bool,
    /// The current target failed.
    pub(super) target_failed: bool,
    /// The whole round is over (the database is going, or the extension is missing).
    pub(super) stop: bool,
    pub(super) extension_missing: bool,
}

impl Round {
    pub(super) fn fail(&mut self, failure: Failure) {
        self.target_failed = true;
        self.failure.get_or_insert(failure);
    }
}

/// The part of a round writing one target.
pub(super) struct Part<'a> {
    /// The target's slot, whose index its keys carry.
    pub(super) slot: SlotRef,
    /// For messages: the target named, unless it is `default`.
    pub(super) prefix: String,
    pub(super) definition: &'a Definition,
}

impl Part<'_> {
    pub(super) fn failure(&self, failure: Failure) -> Failure {
        Failure { message: format!("{}{}", self.prefix, failure.message), ..failure }
    }
}

impl Flusher {
    /// Call once connected to `database`.
    pub fn new(database: pg_sys::Oid) -> Self {
        Flusher {
            database,
            database_name: database_name(database),
            statements: HashMap::new(),
            batch: Vec::with_capacity(settings::max_pending()),
            waiting: Vec::with_capacity(HELD_MAX),
            failure_log: FailureLog::default(),
            extension_was_missing: false,
            last_target_problems: Vec::new(),
            missing: Vec::new(),
        }
    }

    pub fn database_name(&self) -> &str {
        &self.database_name
    }

    /// Whether the last flush found the extension missing from the database.
    pub fn extension_was_missing(&self) -> bool {
        self.extension_was_missing
    }

    /// Flush whatever of the database is pending and publish the outcome to `wsusage_flush()`
    /// callers; returns the number of keys taken from the set.
    pub fn flush(&mut self) -> u64 {
        let started_at = now();
        let up_to_request = self.snapshot(started_at);
        if self.batch.is_empty() {
            let nothing = rendezvous::Flushed::Applied { ids: 0, held_back: 0 };
            rendezvous::publish(self.database, up_to_request, &nothing);
            return 0;
        }
        let ids = self.batch.len() as u64;
        let mut round = Round::default();
        self.write_targets(&mut round);
        self.finish(round, ids, started_at, up_to_request)
    }

    /// Copy the database's pending keys into the batch, but those held back and not yet due,
    /// sorted by target, then kind, then key (each target's keys in one run, in key order);
    /// returns the newest `wsusage_flush()` request the snapshot serves.
    fn snapshot(&mut self, started_at: i64) -> u64 {
        let (up_to_request, requested) = pending::snapshot(self.database, &mut self.batch, started_at);
        // Held-back keys wait for their turn at the worker's own rounds; the rest go now. A
        // `wsusage_flush()` caller — an operator who has just fixed a refused row, say — has
        // them tried at once.
        if requested {
            self.waiting.clear();
        } else {
            pending::held_waiting(self.database, started_at, &mut self.waiting);
        }
        let waiting = &self.waiting;
        self.batch.retain(|entry| waiting.binary_search(&entry.key).is_err());
        self.batch.sort_unstable_by_key(|entry| entry.key);
        up_to_request
    }

    /// Write the batch, target by target, as the targets' definitions say now.
    fn write_targets(&mut self, round: &mut Round) {
        let database = self.database;
        // Declarations published by marking backends are read again after each round starts: a
        // change that escaped `wsusage_target`'s trigger (written with triggers disabled) reaches
        // new backends within an interval.
        published::invalidate(database);
        // Read after the snapshot: a mark in it was made after its target's row was written.
        let catalog = match in_transaction(|| lookup::read(None, current_user())) {
            Err(failure) => {
                record_failure(database, None, &failure.message);
                round.failure = Some(failure);
                return;
            }
            // Its targets are kept until CREATE EXTENSION brings them back (see `processes::worker`).
            Ok(catalog) if !catalog.extension => {
                round.extension_missing = true;
                return;
            }
            Ok(catalog) => catalog,
        };
        let batch = std::mem::take(&mut self.batch);
        let slots = counting::target_slots().unwrap_or_default();
        let mut missing = Vec::new();
        for group in batch.chunk_by(|a, b| a.key.target == b.key.target) {
            let index = group[0].key.target;
            let (name, generation) = slots.get(usize::from(index)).cloned().unwrap_or_default();
            let slot = SlotRef { index, generation };
            match catalog.definitions.iter().find(|definition| definition.name == name && !name.is_empty()) {
                Some(definition) => {
                    self.write_target(&Part { slot, prefix: failure_prefix(&name), definition }, group, round);
                }
                // No row (yet: the extension not updated to 0.3.0): kept.
                None if catalog.targets_table.is_none() => {}
                // Deleted: discarded when still missing a round later, so that a row deleted and
                // written again, or marked by the transaction writing it before it commits,
                // loses nothing.
                None if self.missing.contains(&slot) => self.discard(slot, &name, None, group),
                None => missing.push(slot),
            }
            if round.stop {
                break;
            }
        }
        self.missing = missing;
        self.batch = batch;
    }

    /// Count, log and publish what the round did; returns the number of keys taken from the set.
    fn finish(&mut self, round: Round, ids: u64, started_at: i64, up_to_request: u64) -> u64 {
        let database = self.database;
        let failure = if round.extension_missing {
            Some(self.extension_missing())
        } else {
            self.extension_was_missing = false;
            round.failure
        };
        let failed_before = counting::consecutive_failures(database);
        let consecutive = counting::record_flush(database, failure.is_some(), started_at, now());
        let result = match failure {
            None => {
                self.failure_log.succeeded();
                if failed_before > 0 {
                    log!("wsusage flush succeeded again: {} pending ids were applied", round.taken);
                }
                rendezvous::Flushed::Applied { ids: round.taken, held_back: round.held_back }
            }
            Some(failure) => {
                if !round.extension_missing && self.failure_log.should_log(&failure.message, consecutive) {
                    failure::report_flush_failure(ids, consecutive, &failure);
                }
                rendezvous::Flushed::Failed { ids, sqlstate: failure.sqlstate, message: failure.message }
            }
        };
        rendezvous::publish(database, up_to_request, &result);
        round.taken
    }

    /// Discard `entries` of target slot `slot` — its keys, when its target was deleted (`kind`
    /// `None`), or those of `kind` when the target's keys are no longer of that kind — and say
    /// so.
    pub(super) fn discard(&self, slot: SlotRef, name: &str, kind: Option<Kind>, entries: &[Entry]) {
        let discarded = pending::discard_target(self.database, slot, entries, kind.is_none());
        if discarded == 0 {
            return;
        }
        let why = match kind {
            None => "the target was deleted from wsusage_target".to_owned(),
            Some(kind) => {
                format!("they were marked as {} keys, and the target's key is no longer of that type", kind.sql_type())
            }
        };
        log!(
            "wsusage discarded {discarded} pending keys of target \"{name}\" in database \"{}\": {why}",
            self.database_name
        );
        counting::count_discarded_in(self.database, discarded);
    }

    fn extension_missing(&mut self) -> Failure {
        let message = format!("extension \"wsusage\" does not exist in database \"{}\"", self.database_name);
        if !self.extension_was_missing {
            log!(
                "wsusage flush worker is leaving: {message}; its pending marks are kept until CREATE EXTENSION wsusage"
            );
            self.extension_was_missing = true;
        }
        record_failure(self.database, None, &message);
        Failure { sqlstate: PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT as i32, message }
    }
}

/// Count a failed chunk of target slot `target` (`None`: a round that failed before any chunk)
/// and keep its message for the DBA.
pub(super) fn record_failure(database: pg_sys::Oid, target: Option<SlotRef>, message: &str) {
    counting::record_chunk(database, target, &ChunkOutcome::Failed { message }, now());
}

/// What a failure's message starts with: the target it is of, unless it is `default` (whose
/// messages read as before targets existed).
fn failure_prefix(target: &str) -> String {
    if target == "default" {
        String::new()
    } else {
        format!("target \"{target}\": ")
    }
}

/// The role the worker connects as, the bootstrap superuser, with which it reads the catalogs
/// (its statements writing a table run as the table's owner, see `run_as`).
fn current_user() -> pg_sys::Oid {
    // SAFETY: a plain read of this process's user.
    unsafe { pg_sys::GetUserId() }
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

/// Check the targets in a transaction of its own (at start and after a reload), so a
/// misconfiguration is reported before any mark waits on it.
pub fn validate_targets(flusher: &mut Flusher) {
    let problems: Vec<Failure> = match in_transaction(|| lookup::read(None, current_user())) {
        Err(failure) => vec![failure],
        Ok(catalog) => catalog
            .definitions
            .iter()
            .filter_map(|definition| {
                let problem = definition.problem()?;
                let message = format!("{}{}", failure_prefix(&definition.name), problem.message);
                Some(Failure { sqlstate: problem.sqlstate as i32, message })
            })
            .collect(),
    };
    let mut logged = Vec::with_capacity(problems.len());
    for failure in problems {
        counting::record_problem(flusher.database, None, &failure.message, now());
        if !flusher.last_target_problems.contains(&failure.message) {
            failure::report_target_problem(&failure);
        }
        logged.push(failure.message);
    }
    flusher.last_target_problems = logged;
}
