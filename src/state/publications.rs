//! Targets' declarations as published in their target slots, and each database's ticket of them
//! (what a ticket means, and why a publication is taken only under its database's current one,
//! is `targets::published`'s to say). Publications are written with the lock exclusive and read
//! with it shared; a database's ticket is set when its slot is claimed (lock exclusive) and
//! replaced with `fetch_max` under the lock in either mode.

use std::sync::atomic::Ordering;

use pgrx::pg_sys;

use crate::memory::layout;
use crate::memory::publication::Publication;
use crate::state::databases;
use crate::state::target_slots;

/// The declarations of `database` may have changed: no publication made before is taken again.
/// Raises nothing (it runs in a commit callback).
pub fn invalidate(database: pg_sys::Oid) {
    layout::with_shared(|state| {
        if let Some(index) = databases::find(state.slots, database) {
            let ticket = state.header.new_declarations_ticket();
            state.slots[index].declarations_ticket.fetch_max(ticket, Ordering::AcqRel);
        }
    });
}

/// The current ticket of `database`'s declarations: what a read of them from the catalogs is
/// published under. `None` while the database has no slot (nothing of it is published).
pub fn ticket(database: pg_sys::Oid) -> Option<u64> {
    layout::with_shared(|state| {
        let index = databases::find(state.slots, database)?;
        Some(state.slots[index].declarations_ticket.load(Ordering::Acquire))
    })
    .flatten()
}

/// What is published of target `name` of `database` under the database's current ticket.
pub fn current(database: pg_sys::Oid, name: &str) -> Option<Publication> {
    layout::with_shared(|state| {
        let index = databases::find(state.slots, database)?;
        let ticket = state.slots[index].declarations_ticket.load(Ordering::Acquire);
        let slot = target_slots::find(state.targets, database, name)?;
        let published = state.targets[usize::from(slot.index)].published;
        (published.ticket == ticket && ticket != 0).then_some(published)
    })
    .flatten()
}

/// Publish `publication` of target `name` of `database`, read under `ticket`, unless the target
/// has no slot (it is claimed by its first mark) or `ticket` is no longer current.
pub fn store(database: pg_sys::Oid, name: &str, publication: Publication, ticket: u64) {
    layout::with_exclusive(|state| {
        let Some(index) = databases::find(state.slots, database) else { return };
        if state.slots[index].declarations_ticket.load(Ordering::Acquire) != ticket {
            return;
        }
        if let Some(slot) = target_slots::find(state.targets, database, name) {
            state.targets[usize::from(slot.index)].published = publication;
        }
    });
}
