//! Pending marks kept across a clean restart: written by the postmaster as it exits, read back
//! into shared memory when it starts again, as pg_stat_statements keeps its statistics.
//!
//! The flush workers' final flushes come first (the postmaster waits for them during a
//! shutdown, and starts no new worker). What is still pending after them — marks of databases
//! that had no worker at that moment (more databases than `wsusage.max_workers`, or a worker
//! still starting), or whose final flush failed — is written to [`FILE`] and flushed after the
//! restart by the usual workers. The file is removed as soon as it is read, so a later crash
//! never brings back an older set, and nothing is written after a crash, when shared memory is
//! suspect. Only the postmaster touches the file, while no other process runs.

use std::fs;
use std::io::{self, Write};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::pending;
use crate::shmem::{Locked, PendingEntry, PendingKey};

/// Relative to the data directory, the postmaster's working directory; beside
/// pg_stat_statements' file, in the directory PostgreSQL keeps across clean restarts.
const FILE: &str = "pg_stat/wsusage.pending";
const TEMPORARY: &str = "pg_stat/wsusage.pending.tmp";
/// "WSUP" and the format version.
const MAGIC: u32 = 0x5753_5550;
const VERSION: u32 = 1;
const ENTRY_LEN: usize = 4 + 16 + 8;

/// Write every pending entry to the file (remove it when there is none). Postmaster only, at
/// exit.
pub fn save(locked: &Locked<'_>) {
    let entries = pending::all_entries(locked);
    let result = if entries.is_empty() { remove() } else { write(&entries) };
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

fn remove() -> io::Result<()> {
    match fs::remove_file(FILE) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn write(entries: &[PendingEntry]) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(16 + entries.len() * ENTRY_LEN);
    bytes.extend_from_slice(&MAGIC.to_le_bytes());
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for entry in entries {
        bytes.extend_from_slice(&entry.key.database.to_u32().to_le_bytes());
        bytes.extend_from_slice(&entry.key.id);
        bytes.extend_from_slice(&entry.marked_at.to_le_bytes());
    }
    // Written whole and synced under another name, then renamed: a crash midway leaves either
    // no file or a complete one.
    let mut file = fs::File::create(TEMPORARY)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    fs::rename(TEMPORARY, FILE)
}

fn parse(bytes: &[u8]) -> Option<Vec<PendingEntry>> {
    let word = |at: usize| Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
    if word(0)? != MAGIC || word(4)? != VERSION {
        return None;
    }
    let count = usize::try_from(u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?)).ok()?;
    let body = bytes.get(16..)?;
    if body.len() != count.checked_mul(ENTRY_LEN)? {
        return None;
    }
    body.chunks_exact(ENTRY_LEN)
        .map(|chunk| {
            let database = pg_sys::Oid::from(u32::from_le_bytes(chunk[..4].try_into().ok()?));
            let id: [u8; 16] = chunk[4..20].try_into().ok()?;
            let marked_at = i64::from_le_bytes(chunk[20..].try_into().ok()?);
            Some(PendingEntry { key: PendingKey { database, id }, marked_at })
        })
        .collect()
}

/// Put the saved entries back into the set and remove the file. Postmaster only, at start,
/// before any other process exists.
pub fn load(locked: &mut Locked<'_>, now: i64) {
    let bytes = match fs::read(FILE) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            warning!("could not read the saved wsusage pending set \"{FILE}\": {e}");
            return;
        }
    };
    match parse(&bytes) {
        Some(entries) => {
            let refused = pending::restore(locked, &entries, now);
            log!("wsusage restored {} pending ids saved at the last shutdown", entries.len() - refused);
            if refused > 0 {
                warning!(
                    "wsusage could not restore {refused} saved pending ids: the set or its database slots are full"
                );
            }
        }
        None => warning!("ignoring \"{FILE}\": it is not a wsusage pending set of this version"),
    }
    if let Err(e) = remove() {
        warning!("could not remove \"{FILE}\": {e}");
    }
}
