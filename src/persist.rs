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
//! The format of release 0.2.0 (version 1: no write time, no checksum) is still read, so that an
//! upgrade's restart keeps the marks; its entries are checked against the file's modification
//! time.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Write};
use std::path::Path;

use pgrx::prelude::*;
use wsusage_pending_table::{Entry, Key};

use crate::clock;
use crate::layout::{self, ViewMut};
use crate::pending;

/// Relative to the data directory, the postmaster's working directory; beside
/// pg_stat_statements' file, in the directory PostgreSQL keeps across clean restarts.
const FILE: &str = "pg_stat/wsusage.pending";
const TEMPORARY: &str = "pg_stat/wsusage.pending.tmp";
const DAMAGED: &str = "pg_stat/wsusage.pending.damaged";
const DIRECTORY: &str = "pg_stat";
/// "WSUP" and the format version.
const MAGIC: u32 = 0x5753_5550;
const VERSION: u32 = 2;
const VERSION_0_2_0: u32 = 1;
const ENTRY_LEN: usize = 4 + 16 + 8;
/// Version 2: magic, version, write time, count; then the entries, then the CRC32C.
const HEADER_LEN: usize = 4 + 4 + 8 + 8;
const HEADER_LEN_0_2_0: usize = 4 + 4 + 8;
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
    let (entries, invalid) = valid_entries(pending::all_entries(state), now);
    if invalid > 0 {
        warning!("wsusage did not save {invalid} pending ids that were not valid marks");
    }
    let result = if entries.is_empty() { remove(FILE) } else { write(&entries, now) };
    match result {
        Ok(()) if !entries.is_empty() => {
            log!("wsusage saved {} pending ids to \"{FILE}\" to flush after the restart", entries.len())
        }
        Ok(()) => {}
        Err(e) => {
            warning!("could not save the wsusage pending set to \"{FILE}\": {e}; its {} ids are lost", entries.len())
        }
    }
}

/// Why the set cannot be trusted, if it cannot: a process was killed while changing it.
fn damage(state: &ViewMut<'_>) -> Option<String> {
    if layout::exclusive_holder_was_interrupted() {
        return Some("a process was stopped while it changed the set (an immediate shutdown, or a crash)".into());
    }
    state.pending.verify(&state.exclusive).err().map(|damage| format!("the set is damaged ({damage:?})"))
}

/// The entries that are valid marks made before `written_at`, each key once; and how many were
/// not.
fn valid_entries(entries: Vec<Entry>, written_at: i64) -> (Vec<Entry>, usize) {
    let total = entries.len();
    let mut seen = HashSet::with_capacity(total);
    let valid: Vec<Entry> = entries
        .into_iter()
        .filter(|entry| {
            // No mark is made outside a database, before PostgreSQL's epoch, or after the file.
            entry.key.database != 0 && entry.marked_at > 0 && entry.marked_at <= written_at && seen.insert(entry.key)
        })
        .collect();
    let invalid = total - valid.len();
    (valid, invalid)
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

fn encode(entries: &[Entry], written_at: i64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + entries.len() * ENTRY_LEN + CRC_LEN);
    bytes.extend_from_slice(&MAGIC.to_le_bytes());
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&written_at.to_le_bytes());
    bytes.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for entry in entries {
        bytes.extend_from_slice(&entry.key.database.to_le_bytes());
        bytes.extend_from_slice(&entry.key.id);
        bytes.extend_from_slice(&entry.marked_at.to_le_bytes());
    }
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

fn write(entries: &[Entry], written_at: i64) -> io::Result<()> {
    // Written whole and synced under another name, then renamed: a crash midway leaves either
    // no file or a complete one.
    let mut file = fs::File::create(TEMPORARY)?;
    file.write_all(&encode(entries, written_at))?;
    file.sync_all()?;
    durable_rename(TEMPORARY, FILE)
}

/// What a file held.
struct Saved {
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

fn entries_of(body: &[u8]) -> Vec<Entry> {
    body.chunks_exact(ENTRY_LEN)
        .map(|chunk| {
            let database = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let mut id = [0u8; 16];
            id.copy_from_slice(&chunk[4..20]);
            let mut time = [0u8; 8];
            time.copy_from_slice(&chunk[20..28]);
            Entry { key: Key { database, id }, marked_at: i64::from_le_bytes(time) }
        })
        .collect()
}

/// `modified_at`: the file's modification time, the write time of a 0.2.0 file.
fn parse(bytes: &[u8], modified_at: i64) -> Result<Saved, Refused> {
    if word(bytes, 0) != Some(MAGIC) {
        return Err(Refused::NotOurs);
    }
    match word(bytes, 4) {
        Some(VERSION) => {
            let marks = bytes.len().saturating_sub(HEADER_LEN + CRC_LEN) / ENTRY_LEN;
            let damaged = Refused::Damaged { marks };
            let Some(crc_at) = bytes.len().checked_sub(CRC_LEN).filter(|&at| at >= HEADER_LEN) else {
                return Err(damaged);
            };
            if word(bytes, crc_at) != Some(crc32c::crc32c(&bytes[..crc_at])) {
                return Err(damaged);
            }
            let count = double(bytes, 16).and_then(|count| usize::try_from(count).ok());
            let body = &bytes[HEADER_LEN..crc_at];
            if count.and_then(|count| count.checked_mul(ENTRY_LEN)) != Some(body.len()) {
                return Err(damaged);
            }
            let written_at = double(bytes, 8).map_or(0, |time| time as i64);
            Ok(Saved { entries: entries_of(body), written_at })
        }
        Some(VERSION_0_2_0) => {
            let body = bytes.get(HEADER_LEN_0_2_0..).unwrap_or_default();
            let count = double(bytes, 8).and_then(|count| usize::try_from(count).ok());
            if count.and_then(|count| count.checked_mul(ENTRY_LEN)) != Some(body.len()) {
                return Err(Refused::Damaged { marks: body.len() / ENTRY_LEN });
            }
            Ok(Saved { entries: entries_of(body), written_at: modified_at })
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
            let (entries, invalid) = valid_entries(saved.entries, saved.written_at.min(now));
            let refused = pending::restore(state, &entries, now);
            log!("wsusage restored {} pending ids saved at the last shutdown", entries.len() - refused);
            if invalid > 0 {
                warning!(
                    "wsusage ignored {invalid} saved pending ids of \"{FILE}\" that were not valid marks (no database, a time before 2000 or after the file was written, or an id twice)"
                );
            }
            if refused > 0 {
                warning!(
                    "wsusage could not restore {refused} saved pending ids: the set or its database slots are full"
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
