//! The pending set: insert a mark, snapshot a database's entries for a flush, forget what a
//! flush wrote, discard what a dropped database left.
//!
//! A flush does not remove ids when it copies them out. It forgets an id only after its UPDATE
//! committed, and only if the id was not marked again meanwhile. So a failed flush has nothing
//! to put back (its ids never left, and newer marks merged into them as usual), and a full set
//! cannot refuse the re-queue of a failed batch, because there is no re-queue.

use std::sync::atomic::Ordering;

use pgrx::pg_sys;
use pgrx::prelude::*;
use wsusage_pending_table::{Entry, Inserted, Key, Stuck};
use wsusage_saved_set::Target;

use crate::memory::held_back::{HeldId, HELD_MAX};
use crate::memory::key::Kind;
use crate::memory::layout::{self, View, ViewMut};
use crate::settings;
use crate::state::counting;
use crate::state::databases;
use crate::state::rendezvous;
use crate::state::target_slots::{self, SlotRef};

/// Fraction of `wsusage.max_pending` at which a mark wakes the launcher to flush early.
const HIGH_WATER_NUMERATOR: usize = 1;
const HIGH_WATER_DENOMINATOR: usize = 2;

/// Ids a `wsusage_mark_many` call marks per holding of the lock: between chunks it lets flushes
/// and exclusive requests in, and checks for a cancel. At the ≈ 150 ns a mark costs, a chunk
/// holds the lock for well under a millisecond.
const MARK_CHUNK: usize = 4096;

pub fn high_water_mark() -> usize {
    (settings::max_pending() * HIGH_WATER_NUMERATOR / HIGH_WATER_DENOMINATOR).max(1)
}

/// What a mark (or a read of one) names: a target of the caller's database, the slot the caller
/// last found it in (refreshed here when the slot was given to another target since), and the
/// kind of its keys.
pub struct Marking<'a> {
    pub database: pg_sys::Oid,
    pub name: &'a str,
    pub slot: &'a mut Option<SlotRef>,
    pub kind: Kind,
}

/// The table's key for `id` of target slot `slot` of `database`.
pub fn key(database: pg_sys::Oid, slot: SlotRef, kind: Kind, id: [u8; 16]) -> Key {
    Key { database: database.to_u32(), target: slot.index, kind: kind as u8, id }
}

/// Why [`mark_all`] stopped early.
pub enum MarkError {
    NotPreloaded,
    /// The set is full; `marked` ids (a prefix of the input) were recorded before it filled.
    Full {
        marked: usize,
    },
    /// Every database slot serves another database that still has marks pending.
    NoSlot,
    /// Every target slot serves another target that still has marks pending.
    NoTargetSlot,
    /// A place of the set stayed claimed by another process far longer than a claim takes;
    /// `marked` ids (a prefix of the input) were recorded before it.
    Stuck {
        stuck: Stuck,
        marked: usize,
    },
}

/// Record that each id of the target was used at `now` (keeping each id's latest time), a chunk
/// at a time; a cancel between chunks leaves the chunks before it marked.
pub fn mark_all(target: &mut Marking<'_>, ids: &[[u8; 16]], now: i64) -> Result<(), MarkError> {
    for (n, chunk) in ids.chunks(MARK_CHUNK).enumerate() {
        if n > 0 {
            check_for_interrupts!();
        }
        // Should the set fill in this chunk, the ids after it are refused too, and counted so.
        let beyond = ids.len() - n * MARK_CHUNK - chunk.len();
        mark_chunk(target, chunk, beyond, now).map_err(|error| match error {
            MarkError::Full { marked } => MarkError::Full { marked: n * MARK_CHUNK + marked },
            MarkError::Stuck { stuck, marked } => MarkError::Stuck { stuck, marked: n * MARK_CHUNK + marked },
            other => other,
        })?;
    }
    Ok(())
}

fn mark_chunk(target: &mut Marking<'_>, ids: &[[u8; 16]], beyond: usize, now: i64) -> Result<(), MarkError> {
    let database = target.database;
    // Markers hold the lock in shared mode, new ids included (see `memory::layout`): they never wait for
    // one another, nor for one descheduled while holding the lock. Only the first mark of a
    // database or target without a slot (or whose slot was given away) takes it exclusively, to
    // claim one.
    let marked = layout::with_shared(|state| {
        let slot = databases::find(state.slots, database)?;
        let target_slot = target.slot.filter(|found| found.is_current(state, database))?;
        Some(mark_in(state, slot, target_slot, target.kind, database, ids, beyond, now))
    });
    let (result, wake) = match marked {
        None => return Err(MarkError::NotPreloaded),
        Some(Some(marked)) => marked,
        Some(None) => layout::with_exclusive(|state| {
            let Some(slot) = databases::claim(state, database, now) else {
                counting::count_refused_without_slot(state, ids.len() + beyond);
                return (Err(MarkError::NoSlot), None);
            };
            let Some(target_slot) = target_slots::claim(state, database, target.name, now) else {
                counting::count_refused_without_slot(state, ids.len() + beyond);
                return (Err(MarkError::NoTargetSlot), None);
            };
            *target.slot = Some(target_slot);
            mark_in(&state.view(), slot, target_slot, target.kind, database, ids, beyond, now)
        })
        .ok_or(MarkError::NotPreloaded)?,
    };
    if let Some(latch) = wake {
        // SAFETY: a latch in a PGPROC, in shared memory for the server's lifetime; setting a
        // latch whose process has gone is harmless.
        unsafe { pg_sys::SetLatch(latch) };
    }
    result
}

/// Mark `ids` of target slot `target` in `database`, whose slot is `slot`, `beyond` more ids of
/// the same call waiting behind them; returns the outcome and the launcher's latch when this
/// mark must wake it. Caller must hold the lock, in shared mode being enough: the table takes
/// concurrent inserts, and the counts change atomically (see `memory::layout`).
#[allow(clippy::too_many_arguments)]
fn mark_in(
    state: &View<'_>,
    slot: usize,
    target: SlotRef,
    kind: Kind,
    database: pg_sys::Oid,
    ids: &[[u8; 16]],
    beyond: usize,
    now: i64,
) -> (Result<(), MarkError>, Option<*mut pg_sys::Latch>) {
    let mut added = 0;
    let mut outcome = Ok(());
    for (i, id) in ids.iter().enumerate() {
        match state.pending.insert(&key(database, target, kind, *id), now) {
            Ok(Inserted::New) => added += 1,
            Ok(Inserted::Existing) => {}
            Ok(Inserted::Full) => {
                outcome = Err(MarkError::Full { marked: i });
                break;
            }
            Err(stuck) => {
                outcome = Err(MarkError::Stuck { stuck, marked: i });
                break;
            }
        }
    }
    let accepted = match outcome {
        Err(MarkError::Full { marked } | MarkError::Stuck { marked, .. }) => marked,
        _ => ids.len(),
    };
    let refused = if matches!(outcome, Err(MarkError::Full { .. })) { ids.len() - accepted + beyond } else { 0 };
    counting::count_marks(state, slot, accepted, refused);
    let slot = &state.slots[slot];
    // A mark needs the extension: a worker that left for want of it may come back.
    let extension_back = slot.extension_missing() && slot.extension_missing.swap(false, Ordering::Relaxed);
    let launcher = Some(state.header.launcher_latch).filter(|latch| !latch.is_null());
    if added == 0 {
        return (outcome, launcher.filter(|_| extension_back));
    }
    state.targets[usize::from(target.index)].pending.fetch_add(added, Ordering::Relaxed);
    let was_empty = slot.pending.fetch_add(added, Ordering::Relaxed) == 0;
    // Only a new id can take the set past its high-water mark, or give a database without a
    // worker its first pending id, for which the launcher starts one.
    let wake =
        if (was_empty && slot.worker_pid == 0) || extension_back { launcher } else { take_high_water_wake(state) };
    (outcome, wake)
}

/// The launcher's latch when this mark is the one that passed the high-water mark. Caller must
/// hold the lock (either mode).
fn take_high_water_wake(state: &View<'_>) -> Option<*mut pg_sys::Latch> {
    let latch = state.header.launcher_latch;
    if latch.is_null() || state.pending.len() < high_water_mark() {
        return None;
    }
    // Of the markers passing it at once, one wakes the launcher.
    (!state.header.high_water_wake_sent.swap(true, Ordering::Relaxed)).then_some(latch)
}

/// Why [`marked_at`] could not read.
pub enum ReadError {
    NotPreloaded,
    Stuck(Stuck),
}

/// The time of the pending mark of key `id` of the target `reading` names, if one is pending.
/// Under the lock held shared, as a mark: it waits only for a claim on its way to be published,
/// and no marker waits for it.
pub fn marked_at(reading: &mut Marking<'_>, id: [u8; 16]) -> Result<Option<i64>, ReadError> {
    layout::with_shared(|state| {
        let target = match reading.slot.filter(|found| found.is_current(state, reading.database)) {
            Some(target) => target,
            None => {
                // Never marked here, or its slot was given away with its keys flushed: nothing
                // pending until a mark claims one.
                let Some(found) = target_slots::find(state.targets, reading.database, reading.name) else {
                    return Ok(None);
                };
                *reading.slot = Some(found);
                found
            }
        };
        state.pending.marked_at(&key(reading.database, target, reading.kind, id)).map_err(ReadError::Stuck)
    })
    .unwrap_or(Err(ReadError::NotPreloaded))
}

/// Whether the set has passed its high-water mark and `database` holds at least an even share
/// of it (its pending ids times the databases with ids pending reach the set's size): flushing
/// it early then frees a fair part of the set, while a database with few ids does not flush in a
/// loop because another database's ids (failing to flush, say) keep the set full.
pub fn past_high_water_for(database: pg_sys::Oid) -> bool {
    layout::with_shared(|state| {
        let total = state.pending.len();
        if total < high_water_mark() {
            return false;
        }
        let busy = databases::in_use(state.slots).filter(|slot| slot.pending() > 0).count();
        databases::find(state.slots, database)
            .is_some_and(|index| holds_even_share(state.slots[index].pending(), busy as u64, total as u64))
    })
    .unwrap_or(false)
}

/// When the current interval of `database` started (`TimestampTz`), if it has a slot.
pub fn interval_start(database: pg_sys::Oid) -> Option<i64> {
    layout::with_shared(|state| databases::find(state.slots, database).map(|index| state.slots[index].interval_start))
        .flatten()
}

/// Whether a database with `own` ids pending holds at least an even share of a set of `total`
/// ids spread over `busy` databases: the rule for flushing early past the high-water mark.
pub fn holds_even_share(own: u64, busy: u64, total: u64) -> bool {
    own.saturating_mul(busy.max(1)) >= total
}

/// Number of ids of `database` pending.
pub fn len_of(database: pg_sys::Oid) -> usize {
    layout::with_shared(|state| {
        databases::find(state.slots, database).map_or(0, |index| state.slots[index].pending() as usize)
    })
    .unwrap_or(0)
}

/// Copy the entries of `database` into `out` (cleared first). Returns false, with `out`
/// incomplete, when `out` has not the capacity for all of them: the copy never allocates under
/// the lock, and while the lock is shared markers may add entries during the copy. Caller must
/// hold the lock (either mode).
fn copy_of(state: &View<'_>, database: pg_sys::Oid, out: &mut Vec<Entry>) -> bool {
    out.clear();
    for entry in state.pending.entries().filter(|entry| entry.key.database == database.to_u32()) {
        if out.len() == out.capacity() {
            return false;
        }
        out.push(entry);
    }
    true
}

/// Copy the entries of `database` into `out`, whose capacity must be `max_pending` (the
/// worker's buffer), start the database's next interval at `now`, and return the newest
/// `wsusage_flush()` request the copy covers, and whether a caller waits for it.
pub fn snapshot(database: pg_sys::Oid, out: &mut Vec<Entry>, now: i64) -> (u64, bool) {
    layout::with_exclusive(|state| {
        let copied = copy_of(&state.view(), database, out);
        debug_assert!(copied, "the worker's buffer holds max_pending entries");
        *state.header.high_water_wake_sent.get_mut() = false;
        if let Some(index) = databases::find(state.slots, database) {
            state.slots[index].interval_start = now;
        }
        let view = state.view();
        (rendezvous::newest_request(&view, database), rendezvous::waiting(&view, database))
    })
    .unwrap_or((0, false))
}

/// A copy of the pending entries of `database`, for inspection; `None` when not preloaded.
pub fn entries(database: pg_sys::Oid) -> Option<Vec<Entry>> {
    let mut out = Vec::new();
    loop {
        // Sized outside the lock, with room for the marks that may arrive meanwhile.
        out.reserve(layout::with_shared(|state| state.pending.len())? + 1024);
        if layout::with_shared(|state| copy_of(state, database, &mut out))? {
            return Some(out);
        }
    }
}

/// Every pending entry, of every database. Postmaster only (see `saved_set`): the copy allocates,
/// and nothing else runs. The walk is bounded by the table (at most `max_pending` entries).
pub fn all_entries(state: &ViewMut<'_>) -> Vec<Entry> {
    let mut out = Vec::with_capacity(state.pending.len().min(state.pending.limit()));
    out.extend(state.pending.entries());
    out
}

/// Put saved entries back into the set, claiming their databases' and targets' slots (an
/// entry's `key.target` is the index of its target in `saved_targets`); returns how many could
/// not be (set or slots full). Postmaster only (see `saved_set`), with entries it validated.
pub fn restore(state: &mut ViewMut<'_>, saved_targets: &[Target], entries: &[Entry], now: i64) -> usize {
    let mut refused = 0;
    // Claimed at a target's first entry: a slot claimed before its keys are in could be taken
    // again, as idle, by the next target's claim.
    let mut claimed: Vec<Option<SlotRef>> = vec![None; saved_targets.len()];
    for entry in entries {
        let database = pg_sys::Oid::from(entry.key.database);
        let Some(slot) = databases::claim(state, database, now) else {
            refused += 1;
            continue;
        };
        let file_index = usize::from(entry.key.target);
        let target = match claimed.get(file_index) {
            Some(Some(found)) => Some(*found),
            Some(None) => {
                let found = target_slots::claim(state, database, &saved_targets[file_index].name, now);
                claimed[file_index] = found;
                found
            }
            None => None,
        };
        let Some(target) = target else {
            refused += 1;
            continue;
        };
        match state.pending.insert(&Key { target: target.index, ..entry.key }, entry.marked_at) {
            Ok(Inserted::New) => {
                *state.slots[slot].pending.get_mut() += 1;
                *state.targets[usize::from(target.index)].pending.get_mut() += 1;
            }
            Ok(Inserted::Existing) => {}
            // Nobody else uses the table yet: no claim can be stuck.
            Ok(Inserted::Full) | Err(_) => refused += 1,
        }
    }
    refused
}

/// Forget the entries a committed flush of `database` wrote (`written`, sorted by key), except
/// those marked again since the snapshot; and release those of them that were held back.
pub fn forget(database: pg_sys::Oid, written: &[Entry]) {
    layout::with_exclusive(|state| remove_unless_marked_again(state, database, written));
}

/// Discard `entries` (of one target slot of `database`, from a snapshot), except those marked
/// again since, as [`forget`] does; give the target's slot up when `give_up_slot` and nothing of
/// it is left. Returns how many were discarded, which the caller counts
/// (`counting::count_discarded_in`) once it has said so in the log.
pub fn discard_target(database: pg_sys::Oid, target: SlotRef, entries: &[Entry], give_up_slot: bool) -> u64 {
    layout::with_exclusive(|state| {
        let index = usize::from(target.index);
        if state.targets.get(index).is_none_or(|slot| slot.database != database || slot.generation != target.generation)
        {
            return 0;
        }
        let discarded = remove_unless_marked_again(state, database, entries);
        let slot = &mut state.targets[index];
        if give_up_slot && slot.pending() == 0 {
            slot.free();
        }
        discarded
    })
    .unwrap_or(0)
}

/// Remove `entries` (of `database`, from a snapshot, sorted by key) from the set, except those
/// marked again since, with their counts and held-back places; returns how many were removed.
fn remove_unless_marked_again(state: &mut ViewMut<'_>, database: pg_sys::Oid, entries: &[Entry]) -> u64 {
    let mut removed = 0;
    for entry in entries {
        let Some(index) = state.pending.find(&state.exclusive, &entry.key) else { continue };
        if state.pending.entry(&state.exclusive, index).marked_at > entry.marked_at {
            continue;
        }
        state.pending.remove_at(&state.exclusive, index);
        removed += 1;
        if let Some(target) = state.targets.get_mut(usize::from(entry.key.target)) {
            let pending = target.pending.get_mut();
            *pending = pending.saturating_sub(1);
        }
    }
    if let Some(index) = databases::find(state.slots, database) {
        let pending = state.slots[index].pending.get_mut();
        *pending = pending.saturating_sub(removed);
    }
    state.header.held.retain(database, |key| entries.binary_search_by_key(key, |entry| entry.key).is_err());
    removed
}

/// The keys of `database` held back whose next try is after `now`, into `out` (cleared first;
/// its capacity is `held_back::HELD_MAX`, so nothing allocates under the lock), sorted.
pub fn held_waiting(database: pg_sys::Oid, now: i64, out: &mut Vec<Key>) {
    out.clear();
    let interval_us = settings::flush_interval_us();
    layout::with_shared(|state| {
        out.extend(state.header.held.of(database).filter(|held| held.retry_at(interval_us) > now).map(|held| held.key));
    });
    out.sort_unstable();
}

/// Hold back a key a flush of its database isolated, with its error; returns its failed attempts
/// in a row, or `None` when the pool is full.
pub fn hold(key: Key, error: &str, now: i64) -> Option<u32> {
    layout::with_exclusive(|state| state.header.held.hold(key, error, now)).flatten()
}

/// The held-back ids of `database`, with their errors, for `wsusage_pending()`.
pub fn held_of(database: pg_sys::Oid) -> Vec<HeldId> {
    let mut out = Vec::with_capacity(HELD_MAX);
    layout::with_shared(|state| out.extend(state.header.held.of(database).copied()));
    out
}

/// Discard every entry of a database that no longer exists, and free its slot; returns how many
/// ids were discarded, which the caller counts (`counting::count_discarded`) once it has said so in
/// the log. Launcher only.
pub fn discard(database: pg_sys::Oid) -> u64 {
    layout::with_exclusive(|state| {
        let discarded = state.pending.retain(&state.exclusive, |entry| entry.key.database != database.to_u32());
        if let Some(index) = databases::find(state.slots, database) {
            databases::free(state, index);
        }
        target_slots::free_database(state, database);
        state.header.held.forget_database(database);
        discarded
    })
    .unwrap_or(0)
}
