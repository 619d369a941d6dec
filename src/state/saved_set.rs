//! Pending marks kept across a clean restart: written by the postmaster as it exits, read back
//! into shared memory when it starts again, as pg_stat_statements keeps its statistics.
//!
//! The flush workers' final flushes come first (the postmaster waits for them during a
//! shutdown, and starts no new worker). What is still pending after them — marks of databases
//! that had no worker at that moment (more databases than `wsusage.max_workers`, or a worker
//! still starting), or whose final flush failed — is written to [`FILE`] and flushed after the
//! restart by the usual workers. Only the postmaster touches the file, while no other process
//! runs.
//!
//! Nothing damaged may reach a table, and a flush never moves a time backwards, so one garbage
//! time in the future would pin a row there for good. Hence:
//! - nothing is written after a crash, nor when a process was killed in the middle of changing
//!   the set (an immediate shutdown exits with code 0 too; `layout` and the table say whether
//!   anything was left half done);
//! - the file carries its write time and a CRC32C of its bytes, as PostgreSQL's own control file
//!   does; a file whose checksum or length does not match is refused whole, with a WARNING, and
//!   moved aside to [`DAMAGED`] for inspection;
//! - every entry is checked when saved and when restored: a database, a time after 2000-01-01 and
//!   not after the file's write time, no key twice;
//! - the file is written under another name, synced and renamed, and its directory synced, as
//!   PostgreSQL's `durable_rename` does; it is removed as soon as it is read (and the removal
//!   synced), so a later crash never brings back an older set.
//!
//! Keys are saved with their target's name (a target's slot may be another after the restart).
//! The file's format, every earlier version of it, and what a valid mark in it is are the
//! `wsusage-saved-set` crate's (`saved_set/`), which the tests use too.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use pgrx::prelude::*;
use wsusage_pending_table::{Entry, Key};
use wsusage_saved_set::{self as format, Mark, Refused, SavedSet, Target};

use crate::clock;
use crate::memory::key::Kind;
use crate::memory::layout::{self, ViewMut};
use crate::memory::target_slot::{TargetSlot, NAME_MAX};
use crate::state::pending;

/// Relative to the data directory, the postmaster's working directory; beside
/// pg_stat_statements' file, in the directory PostgreSQL keeps across clean restarts.
const FILE: &str = "pg_stat/wsusage.pending";
const TEMPORARY: &str = "pg_stat/wsusage.pending.tmp";
const DAMAGED: &str = "pg_stat/wsusage.pending.damaged";
const DIRECTORY: &str = "pg_stat";

// The format's notions of a uuid key and of a target's name are the extension's.
const _: () = assert!(format::KIND_UUID == Kind::Uuid as u8 && format::NAME_MAX == NAME_MAX);

fn kind_known(kind: u8) -> bool {
    Kind::of(kind).is_some()
}

/// Write every pending entry to the file (remove it when there is none). Postmaster only, at
/// exit, `now` being the time of writing.
pub fn save(state: &mut ViewMut<'_>, now: i64) {
    let held = state.pending.len();
    if let Some(why) = damage(state) {
        warning!("wsusage did not save its {held} pending ids: {why}; they are lost");
        let _ = remove(FILE);
        return;
    }
    let saved = saved_set(state, pending::all_entries(state), now);
    let (marks, invalid) = format::valid_marks(&saved, now, kind_known);
    if invalid > 0 {
        warning!("wsusage did not save {invalid} pending ids that were not valid marks");
    }
    let saved = SavedSet { marks, ..saved };
    let result = if saved.marks.is_empty() { remove(FILE) } else { write(&format::encode(&saved)) };
    match result {
        Ok(()) if !saved.marks.is_empty() => {
            log!("wsusage saved {} pending ids to \"{FILE}\" to flush after the restart", saved.marks.len())
        }
        Ok(()) => {}
        Err(e) => warning!(
            "could not save the wsusage pending set to \"{FILE}\": {e}; its {} ids are lost",
            saved.marks.len()
        ),
    }
}

/// Why the set cannot be trusted, if it cannot: a process was killed while changing it.
fn damage(state: &ViewMut<'_>) -> Option<String> {
    if layout::exclusive_holder_was_interrupted() {
        return Some("a process was stopped while it changed the set (an immediate shutdown, or a crash)".into());
    }
    state.pending.verify(&state.exclusive).err().map(|damage| format!("the set is damaged ({damage:?})"))
}

/// The entries of the set as a saved set written at `now`: each with its target's index in the
/// set's list of targets (database and name). An entry whose slot serves no target, or another
/// database, gets an index past the list's end (refused by `valid_marks`).
fn saved_set(state: &ViewMut<'_>, entries: Vec<Entry>, now: i64) -> SavedSet {
    let mut targets = Vec::new();
    let mut index_of = vec![None; state.targets.len()];
    let marks = entries
        .into_iter()
        .map(|entry| {
            let slot_index = usize::from(entry.key.target);
            let of_its_database = |slot: &&TargetSlot| slot.database.to_u32() == entry.key.database;
            let target = match (index_of.get(slot_index).copied().flatten(), state.targets.get(slot_index)) {
                (Some(file_index), Some(slot)) if of_its_database(&slot) => file_index,
                (None, Some(slot)) if slot.in_use() && of_its_database(&slot) => {
                    targets.push(Target { database: slot.database.to_u32(), name: slot.name().to_owned() });
                    let file_index = (targets.len() - 1) as u32;
                    index_of[slot_index] = Some(file_index);
                    file_index
                }
                _ => u32::MAX,
            };
            Mark { target, kind: entry.key.kind, id: entry.key.id, marked_at: entry.marked_at }
        })
        .collect();
    SavedSet { written_at: now, targets, marks }
}

fn sync_directory() -> io::Result<()> {
    fs::File::open(DIRECTORY)?.sync_all()
}

fn remove(path: &str) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(()) => sync_directory(),
    }
}

fn durable_rename(from: &str, to: &str) -> io::Result<()> {
    fs::rename(from, to)?;
    sync_directory()
}

fn write(bytes: &[u8]) -> io::Result<()> {
    // Written whole and synced under another name, then renamed: a crash midway leaves either
    // no file or a complete one.
    let mut file = fs::File::create(TEMPORARY)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    durable_rename(TEMPORARY, FILE)
}

/// The valid marks of `saved` as entries of the set, each `key.target` the index of its target
/// in `saved.targets`; and how many marks were not valid.
fn entries_of(saved: &SavedSet, now: i64) -> (Vec<Entry>, usize) {
    // Not after the file was written, nor after now: a clock set back since must not let a
    // future time through either.
    let (marks, mut invalid) = format::valid_marks(saved, saved.written_at.min(now), kind_known);
    let entries: Vec<Entry> = marks
        .iter()
        .filter_map(|mark| {
            // A valid mark's target is in the list; more targets than a slot index can name are
            // more than any server had.
            let target = u16::try_from(mark.target).ok()?;
            let database = saved.targets[usize::from(target)].database;
            Some(Entry { key: Key { database, target, kind: mark.kind, id: mark.id }, marked_at: mark.marked_at })
        })
        .collect();
    invalid += marks.len() - entries.len();
    (entries, invalid)
}

/// The file's modification time as a `TimestampTz`; 0 (before any mark) when unknown.
fn modified_at(path: &str) -> i64 {
    fs::metadata(Path::new(path)).and_then(|meta| meta.modified()).map_or(0, clock::timestamp)
}

/// Put the saved entries back into the set and remove the file. Postmaster only, at start,
/// before any other process exists.
pub fn load(state: &mut ViewMut<'_>, now: i64) {
    let bytes = match fs::read(FILE) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            warning!("could not read the saved wsusage pending set \"{FILE}\": {e}");
            return;
        }
    };
    match format::decode(&bytes, modified_at(FILE)) {
        Ok(saved) => {
            let (entries, invalid) = entries_of(&saved, now);
            let refused = pending::restore(state, &saved.targets, &entries, now);
            log!("wsusage restored {} pending ids saved at the last shutdown", entries.len() - refused);
            if invalid > 0 {
                warning!(
                    "wsusage ignored {invalid} saved pending ids of \"{FILE}\" that were not valid marks (no database or target, a time before 2000 or after the file was written, or an id twice)"
                );
            }
            if refused > 0 {
                warning!(
                    "wsusage could not restore {refused} saved pending ids: the set, its database slots or its target slots are full (wsusage.max_pending, wsusage.max_databases, wsusage.max_targets)"
                );
            }
        }
        Err(Refused::Damaged { marks }) => {
            warning!(
                "wsusage ignored the saved pending set \"{FILE}\": its checksum or length does not match, so its {marks} marks are lost; the file is kept as \"{DAMAGED}\""
            );
            if durable_rename(FILE, DAMAGED).is_ok() {
                return;
            }
        }
        Err(Refused::NotOurs) => warning!("ignoring \"{FILE}\": it is not a wsusage pending set"),
    }
    if let Err(e) = remove(FILE) {
        warning!("could not remove \"{FILE}\": {e}");
    }
}
