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
//! The formats of earlier releases are still read, their keys restored into the `default`
//! target, so that an upgrade's restart keeps the marks: 0.2.0's (version 1: no write time, no
//! checksum; its entries checked against the file's modification time) and version 2 (written
//! by the 0.3.0 development builds before targets).

use std::collections::HashSet;
use std::fs;
use std::io::{self, Write};
use std::path::Path;

use pgrx::prelude::*;
use wsusage_pending_table::{Entry, Key};

use crate::clock;
use crate::memory::key::Kind;
use crate::memory::layout::{self, ViewMut};
use crate::memory::target_slot::NAME_MAX;
use crate::state::pending::{self, SavedTarget};

/// Relative to the data directory, the postmaster's working directory; beside
/// pg_stat_statements' file, in the directory PostgreSQL keeps across clean restarts.
const FILE: &str = "pg_stat/wsusage.pending";
const TEMPORARY: &str = "pg_stat/wsusage.pending.tmp";
const DAMAGED: &str = "pg_stat/wsusage.pending.damaged";
const DIRECTORY: &str = "pg_stat";
/// "WSUP" and the format version.
const MAGIC: u32 = 0x5753_5550;
const VERSION: u32 = 3;
const VERSION_UNTARGETED: u32 = 2;
const VERSION_0_2_0: u32 = 1;
/// Versions 1 and 2: database, id, time.
const ENTRY_LEN_UNTARGETED: usize = 4 + 16 + 8;
/// Version 3: target (its index in the file's list), kind, id, time.
const ENTRY_LEN: usize = 4 + 1 + 16 + 8;
/// Version 3: magic, version, write time, target count, entry count; then the targets (database,
/// name length, name), the entries, and the CRC32C. Version 2 had no target count nor targets.
const HEADER_LEN: usize = 4 + 4 + 8 + 8 + 8;
const HEADER_LEN_UNTARGETED: usize = 4 + 4 + 8 + 8;
const HEADER_LEN_0_2_0: usize = 4 + 4 + 8;
/// Where the untargeted formats' keys go.
const DEFAULT_TARGET: &str = "default";
const CRC_LEN: usize = 4;

/// Write every pending entry to the file (remove it when there is none). Postmaster only, at
/// exit, `now` being the time of writing.
pub fn save(state: &mut ViewMut<'_>, now: i64) {
    let held = state.pending.len();
    if let Some(why) = damage(state) {
        warning!("wsusage did not save its {held} pending ids: {why}; they are lost");
        let _ = remove(FILE);
        return;
    }
    let saved = with_target_names(state, pending::all_entries(state));
    let (entries, invalid) = valid_entries(saved.entries, now, &saved.targets);
    if invalid > 0 {
        warning!("wsusage did not save {invalid} pending ids that were not valid marks");
    }
    let saved = Saved { entries, ..saved };
    let result = if saved.entries.is_empty() { remove(FILE) } else { write(&saved, now) };
    match result {
        Ok(()) if !saved.entries.is_empty() => {
            log!("wsusage saved {} pending ids to \"{FILE}\" to flush after the restart", saved.entries.len())
        }
        Ok(()) => {}
        Err(e) => warning!(
            "could not save the wsusage pending set to \"{FILE}\": {e}; its {} ids are lost",
            saved.entries.len()
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

/// The entries of the set with their targets' names: each entry's `key.target` becomes the
/// index of its target in the list. An entry whose slot serves no target keeps an index past the
/// list's end (refused by `valid_entries`).
fn with_target_names(state: &ViewMut<'_>, mut entries: Vec<Entry>) -> Saved {
    let mut targets = Vec::new();
    let mut index_of = vec![None; state.targets.len()];
    for entry in &mut entries {
        let slot_index = usize::from(entry.key.target);
        let file_index = match (index_of.get(slot_index).copied().flatten(), state.targets.get(slot_index)) {
            (Some(file_index), _) => file_index,
            (None, Some(slot)) if slot.in_use() => {
                targets.push(SavedTarget { database: slot.database.to_u32(), name: slot.name().to_owned() });
                let file_index = (targets.len() - 1) as u16;
                index_of[slot_index] = Some(file_index);
                file_index
            }
            (None, _) => u16::MAX,
        };
        entry.key.target = file_index;
    }
    Saved { targets, entries, written_at: 0 }
}

/// The entries that are valid marks made before `written_at`, each key once; and how many were
/// not. An entry's `key.target` indexes `targets`.
fn valid_entries(entries: Vec<Entry>, written_at: i64, targets: &[SavedTarget]) -> (Vec<Entry>, usize) {
    let total = entries.len();
    let mut seen = HashSet::with_capacity(total);
    let valid: Vec<Entry> = entries
        .into_iter()
        .filter(|entry| {
            let target = targets.get(usize::from(entry.key.target));
            // No mark is made outside a database or target, with a kind of key we do not know,
            // before PostgreSQL's epoch, or after the file.
            entry.key.database != 0
                && target.is_some_and(|target| target.database == entry.key.database && valid_name(&target.name))
                && Kind::of(entry.key.kind).is_some()
                && entry.marked_at > 0
                && entry.marked_at <= written_at
                && seen.insert(entry.key)
        })
        .collect();
    let invalid = total - valid.len();
    (valid, invalid)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= NAME_MAX && !name.contains('\0')
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

fn encode(saved: &Saved, written_at: i64) -> Vec<u8> {
    let Saved { targets, entries, .. } = saved;
    let mut bytes = Vec::with_capacity(HEADER_LEN + targets.len() * 68 + entries.len() * ENTRY_LEN + CRC_LEN);
    bytes.extend_from_slice(&MAGIC.to_le_bytes());
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&written_at.to_le_bytes());
    bytes.extend_from_slice(&(targets.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for target in targets {
        bytes.extend_from_slice(&target.database.to_le_bytes());
        bytes.push(target.name.len() as u8);
        bytes.extend_from_slice(target.name.as_bytes());
    }
    for entry in entries {
        bytes.extend_from_slice(&u32::from(entry.key.target).to_le_bytes());
        bytes.push(entry.key.kind);
        bytes.extend_from_slice(&entry.key.id);
        bytes.extend_from_slice(&entry.marked_at.to_le_bytes());
    }
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

fn write(saved: &Saved, written_at: i64) -> io::Result<()> {
    // Written whole and synced under another name, then renamed: a crash midway leaves either
    // no file or a complete one.
    let mut file = fs::File::create(TEMPORARY)?;
    file.write_all(&encode(saved, written_at))?;
    file.sync_all()?;
    durable_rename(TEMPORARY, FILE)
}

/// What a file held: entries whose `key.target` indexes `targets`.
struct Saved {
    targets: Vec<SavedTarget>,
    entries: Vec<Entry>,
    written_at: i64,
}

/// Why a file was refused whole.
enum Refused {
    NotOurs,
    Damaged { marks: usize },
}

fn word(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn double(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// The entries of an untargeted file (versions 1 and 2), every one of the `default` target of
/// its database.
fn untargeted(body: &[u8], written_at: i64) -> Saved {
    let mut targets: Vec<SavedTarget> = Vec::new();
    let entries = body
        .chunks_exact(ENTRY_LEN_UNTARGETED)
        .map(|chunk| {
            let database = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let target = match targets.iter().position(|target| target.database == database) {
                Some(index) => index,
                None => {
                    targets.push(SavedTarget { database, name: DEFAULT_TARGET.into() });
                    targets.len() - 1
                }
            };
            let mut id = [0u8; 16];
            id.copy_from_slice(&chunk[4..20]);
            let key = Key { database, target: target as u16, kind: Kind::Uuid as u8, id };
            Entry { key, marked_at: i64::from_le_bytes(chunk[20..28].try_into().unwrap_or_default()) }
        })
        .collect();
    Saved { targets, entries, written_at }
}

/// The targets and entries of a version 3 file's body; `None` when they do not fill it exactly.
fn targeted(body: &[u8], target_count: usize, entry_count: usize, written_at: i64) -> Option<Saved> {
    let mut targets = Vec::with_capacity(target_count.min(body.len() / 5));
    let mut at = 0;
    for _ in 0..target_count {
        let database = word(body, at)?;
        let len = usize::from(*body.get(at + 4)?);
        let name = std::str::from_utf8(body.get(at + 5..at + 5 + len)?).ok()?;
        targets.push(SavedTarget { database, name: name.to_owned() });
        at += 5 + len;
    }
    let rest = body.get(at..)?;
    if entry_count.checked_mul(ENTRY_LEN) != Some(rest.len()) {
        return None;
    }
    let entries = rest
        .chunks_exact(ENTRY_LEN)
        .map(|chunk| {
            let file_index = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let target = u16::try_from(file_index).unwrap_or(u16::MAX);
            // The database is its target's; an index out of range is refused by `valid_entries`.
            let database = targets.get(usize::from(target)).map_or(0, |target| target.database);
            let mut id = [0u8; 16];
            id.copy_from_slice(&chunk[5..21]);
            let key = Key { database, target, kind: chunk[4], id };
            Entry { key, marked_at: i64::from_le_bytes(chunk[21..29].try_into().unwrap_or_default()) }
        })
        .collect();
    Some(Saved { targets, entries, written_at })
}

/// `modified_at`: the file's modification time, the write time of a 0.2.0 file.
fn parse(bytes: &[u8], modified_at: i64) -> Result<Saved, Refused> {
    if word(bytes, 0) != Some(MAGIC) {
        return Err(Refused::NotOurs);
    }
    let version = word(bytes, 4);
    match version {
        Some(VERSION | VERSION_UNTARGETED) => {
            let (header_len, entry_len) = if version == Some(VERSION) {
                (HEADER_LEN, ENTRY_LEN)
            } else {
                (HEADER_LEN_UNTARGETED, ENTRY_LEN_UNTARGETED)
            };
            let marks = bytes.len().saturating_sub(header_len + CRC_LEN) / entry_len;
            let damaged = Refused::Damaged { marks };
            let Some(crc_at) = bytes.len().checked_sub(CRC_LEN).filter(|&at| at >= header_len) else {
                return Err(damaged);
            };
            if word(bytes, crc_at) != Some(crc32c::crc32c(&bytes[..crc_at])) {
                return Err(damaged);
            }
            let count = |at| double(bytes, at).and_then(|count| usize::try_from(count).ok());
            let written_at = double(bytes, 8).map_or(0, |time| time as i64);
            let body = &bytes[header_len..crc_at];
            if version == Some(VERSION) {
                let (Some(targets), Some(entries)) = (count(16), count(24)) else { return Err(damaged) };
                return targeted(body, targets, entries, written_at).ok_or(damaged);
            }
            if count(16).and_then(|count| count.checked_mul(ENTRY_LEN_UNTARGETED)) != Some(body.len()) {
                return Err(damaged);
            }
            Ok(untargeted(body, written_at))
        }
        Some(VERSION_0_2_0) => {
            let body = bytes.get(HEADER_LEN_0_2_0..).unwrap_or_default();
            let count = double(bytes, 8).and_then(|count| usize::try_from(count).ok());
            if count.and_then(|count| count.checked_mul(ENTRY_LEN_UNTARGETED)) != Some(body.len()) {
                return Err(Refused::Damaged { marks: body.len() / ENTRY_LEN_UNTARGETED });
            }
            Ok(untargeted(body, modified_at))
        }
        _ => Err(Refused::NotOurs),
    }
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
    match parse(&bytes, modified_at(FILE)) {
        Ok(saved) => {
            // Not after the file was written, nor after now: a clock set back since must not
            // let a future time through either.
            let (entries, invalid) = valid_entries(saved.entries, saved.written_at.min(now), &saved.targets);
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
