//! Counting for the DBA (the counters are defined in `memory::stats`), under the wsusage lock, so they
//! are exact however many backends mark at once. Each event is counted in the cluster-wide
//! totals, which outlive databases, in its database's slot, and a flush's in its target's slot. Marks are the
//! exception: counted in their database's slot only, in a counter striped like the lock (see
//! `memory::stripes`), they join the totals' own count when the slot is given up, and the totals add the
//! slots in use when read. Every mark would otherwise change one more cache line, and one that
//! every marking backend shares.

use std::sync::atomic::Ordering;

use pgrx::pg_sys;

use crate::memory::layout::{self, View, ViewMut};
use crate::memory::stats::Stats;
use crate::state::databases;
use crate::state::target_slots::SlotRef;

/// What one chunk of a flush did.
pub enum ChunkOutcome<'a> {
    Committed {
        ids: u64,
        rows_updated: u64,
        ids_without_row: u64,
        ids_skipped_locked: u64,
        ids_skipped_by_min_change: u64,
    },
    /// A chunk that failed, or an id isolated because its row fails.
    Failed { message: &'a str },
}

/// Apply `update` to the totals and to `database`'s counters (if it has a slot).
fn update_in(state: &mut ViewMut<'_>, slot: Option<usize>, mut update: impl FnMut(&mut Stats)) {
    update(&mut state.header.stats);
    if let Some(slot) = slot {
        update(&mut state.slots[slot].stats);
    }
}

/// Apply `update` to the totals, `database`'s counters and, if given, those of its target slot
/// `target`.
fn update(database: pg_sys::Oid, target: Option<SlotRef>, mut update: impl FnMut(&mut Stats)) {
    layout::with_exclusive(|state| {
        let slot = databases::find(state.slots, database);
        update_in(state, slot, &mut update);
        if let Some(target) = target_slot(state, database, target) {
            update(&mut state.targets[target].stats);
        }
    });
}

/// The index of `target`'s slot while it still serves that target: a slot given to another
/// target meanwhile (once nothing of it was pending) counts nothing more for it.
fn target_slot(state: &ViewMut<'_>, database: pg_sys::Oid, target: Option<SlotRef>) -> Option<usize> {
    let target = target?;
    let index = usize::from(target.index);
    state
        .targets
        .get(index)
        .filter(|slot| slot.database == database && slot.generation == target.generation)
        .map(|_| index)
}

/// Count marks accepted and refused by one call in a database with slot `slot`. Caller must hold
/// the lock, in shared mode being enough: these counters are atomics.
pub fn count_marks(state: &View<'_>, slot: usize, accepted: usize, refused: usize) {
    if accepted > 0 {
        state.slots[slot].marks.add(accepted as u64);
    }
    if refused > 0 {
        state.slots[slot].rejected.fetch_add(refused as u64, Ordering::Relaxed);
        state.header.rejected.fetch_add(refused as u64, Ordering::Relaxed);
    }
}

/// Count marks refused because no slot was free for their database.
pub fn count_refused_without_slot(state: &mut ViewMut<'_>, refused: usize) {
    *state.header.rejected.get_mut() += refused as u64;
}

/// Count ids discarded with their dropped database (in the totals: the database has no slot
/// any more).
pub fn count_discarded(discarded: u64) {
    layout::with_exclusive(|state| state.header.stats.ids_discarded += discarded);
}

/// Count ids of `database` discarded with their deleted target, or because their target's key
/// type changed.
pub fn count_discarded_in(database: pg_sys::Oid, discarded: u64) {
    update(database, None, |stats| stats.ids_discarded += discarded);
}

/// Count what a chunk of target slot `target` of `database` did (a problem of the round as a
/// whole, with no target, counts in the database only).
pub fn record_chunk(database: pg_sys::Oid, target: Option<SlotRef>, outcome: &ChunkOutcome<'_>, now: i64) {
    update(database, target, |stats| match outcome {
        ChunkOutcome::Committed {
            ids,
            rows_updated,
            ids_without_row,
            ids_skipped_locked,
            ids_skipped_by_min_change,
        } => {
            stats.ids_flushed += ids;
            stats.rows_updated += rows_updated;
            stats.ids_without_row += ids_without_row;
            stats.ids_skipped_locked += ids_skipped_locked;
            stats.ids_skipped_by_min_change += ids_skipped_by_min_change;
        }
        ChunkOutcome::Failed { message } => {
            stats.failures += 1;
            stats.record_error(message, now);
        }
    });
}

/// Record a problem found outside a flush (the target checked at start or on reload, a worker
/// that could not start): it shows as `last_error` without counting as a failed flush.
pub fn record_problem(database: pg_sys::Oid, target: Option<SlotRef>, message: &str, now: i64) {
    update(database, target, |stats| stats.record_error(message, now));
}

/// Record the end of a round's writing of target slot `target` of `database`.
pub fn record_target_round(database: pg_sys::Oid, target: SlotRef, failed: bool, now: i64) {
    layout::with_exclusive(|state| {
        if let Some(index) = target_slot(state, database, Some(target)) {
            let stats = &mut state.targets[index].stats;
            stats.flushes += 1;
            stats.last_flush_at = now;
            stats.consecutive_failures = if failed { stats.consecutive_failures + 1 } else { 0 };
        }
    });
}

/// Record the end of a flush round of `database`; returns its consecutive failed rounds so far.
pub fn record_flush(database: pg_sys::Oid, failed: bool, started_at: i64, now: i64) -> u64 {
    layout::with_exclusive(|state| {
        let slot = databases::find(state.slots, database);
        update_in(state, slot, |stats| {
            stats.flushes += 1;
            stats.last_flush_at = now;
            stats.last_flush_duration_us = now - started_at;
            stats.consecutive_failures = if failed { stats.consecutive_failures + 1 } else { 0 };
        });
        slot.map_or(0, |slot| state.slots[slot].stats.consecutive_failures)
    })
    .unwrap_or(0)
}

pub fn consecutive_failures(database: pg_sys::Oid) -> u64 {
    layout::with_shared(|state| {
        databases::find(state.slots, database).map_or(0, |index| state.slots[index].stats.consecutive_failures)
    })
    .unwrap_or(0)
}

/// The cluster-wide view.
pub struct Totals {
    pub stats: Stats,
    /// Ids pending in every database.
    pub pending: u64,
    /// Databases with a slot (marks pending, or counters kept).
    pub databases: u64,
    /// Flush workers attached now.
    pub workers: u64,
    pub launcher_pid: i32,
    /// Ids held back in every database.
    pub held_back: u64,
}

pub fn totals() -> Option<Totals> {
    layout::with_shared(|state| {
        let in_use = || databases::in_use(state.slots);
        let mut stats = state.header.stats();
        stats.marks += in_use().map(|slot| slot.marks.sum()).sum::<u64>();
        // Across databases, "in a row" means the longest current run of any database.
        stats.consecutive_failures = in_use().map(|slot| slot.stats.consecutive_failures).max().unwrap_or(0);
        Totals {
            stats,
            pending: state.pending.len() as u64,
            databases: in_use().count() as u64,
            workers: in_use().filter(|slot| slot.worker_pid != 0).count() as u64,
            launcher_pid: state.header.launcher_pid,
            held_back: state.header.held.count(None),
        }
    })
}

/// One database's view.
pub struct DatabaseStats {
    pub database: pg_sys::Oid,
    pub pending: u64,
    pub held_back: u64,
    pub worker_pid: i32,
    pub stats: Stats,
}

pub fn by_database() -> Option<Vec<DatabaseStats>> {
    // Collected under the lock into a buffer sized beforehand: nothing allocates under it.
    let mut out = Vec::with_capacity(crate::settings::max_databases());
    layout::with_shared(|state| {
        for slot in databases::in_use(state.slots) {
            out.push(DatabaseStats {
                database: slot.database,
                pending: slot.pending(),
                held_back: state.header.held.count(Some(slot.database)),
                worker_pid: slot.worker_pid,
                stats: slot.stats(),
            });
        }
    })?;
    Some(out)
}

/// One target's view.
pub struct TargetStats {
    pub database: pg_sys::Oid,
    pub name: String,
    pub pending: u64,
    pub stats: Stats,
}

pub fn by_target() -> Option<Vec<TargetStats>> {
    // Names are copied out after the lock is released: nothing allocates under it.
    let mut slots = Vec::with_capacity(crate::settings::max_targets());
    layout::with_shared(|state| {
        for (index, slot) in state.targets.iter().enumerate().filter(|(_, slot)| slot.in_use()) {
            slots.push((index, slot.database, slot.pending(), slot.stats));
        }
    })?;
    let names = target_names()?;
    Some(
        slots
            .into_iter()
            .map(|(index, database, pending, stats)| TargetStats {
                database,
                name: names.get(index).cloned().unwrap_or_default(),
                pending,
                stats,
            })
            .collect(),
    )
}

/// The name of each target slot (empty when free), by index.
pub fn target_names() -> Option<Vec<String>> {
    Some(target_slots()?.into_iter().map(|(name, _)| name).collect())
}

/// The name (empty when free) and generation of each target slot, by index.
pub fn target_slots() -> Option<Vec<(String, u32)>> {
    let count = crate::settings::max_targets();
    let mut buffer = vec![([0u8; crate::memory::target_slot::NAME_MAX], 0usize, 0u32); count];
    layout::with_shared(|state| {
        for (index, slot) in state.targets.iter().enumerate().take(count).filter(|(_, slot)| slot.in_use()) {
            let name = slot.name().as_bytes();
            buffer[index].0[..name.len()].copy_from_slice(name);
            buffer[index].1 = name.len();
            buffer[index].2 = slot.generation;
        }
    })?;
    Some(
        buffer
            .iter()
            .map(|(name, len, generation)| (String::from_utf8_lossy(&name[..*len]).into_owned(), *generation))
            .collect(),
    )
}

/// Zero every counter, cluster-wide and per database; `stats_reset` becomes `now`.
pub fn reset(now: i64) -> bool {
    layout::with_exclusive(|state| {
        state.header.stats = Stats::since(now);
        *state.header.rejected.get_mut() = 0;
        for slot in state.slots.iter_mut() {
            slot.reset_stats(now);
        }
        for slot in state.targets.iter_mut() {
            slot.stats = Stats::since(now);
        }
    })
    .is_some()
}
