//! Finding, claiming and giving up a target's slot (see `memory::target_slot`). Functions taking a view
//! run under the wsusage lock (see `memory::layout`).

use pgrx::pg_sys;

use crate::memory::layout::{View, ViewMut};
use crate::memory::target_slot::TargetSlot;

/// A target's slot as a backend remembers it: valid while the slot keeps its generation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SlotRef {
    pub index: u16,
    pub generation: u32,
}

impl SlotRef {
    /// Whether the slot still serves the target it was claimed for. Caller holds the lock.
    pub fn is_current(&self, state: &View<'_>, database: pg_sys::Oid) -> bool {
        state
            .targets
            .get(usize::from(self.index))
            .is_some_and(|slot| slot.database == database && slot.generation == self.generation)
    }
}

fn slot_ref(targets: &[TargetSlot], index: usize) -> SlotRef {
    SlotRef { index: index as u16, generation: targets[index].generation }
}

/// The slot of target `name` of `database`. Caller must hold the lock (either mode).
pub fn find(targets: &[TargetSlot], database: pg_sys::Oid, name: &str) -> Option<SlotRef> {
    let index = targets.iter().position(|slot| slot.is(database, name))?;
    Some(slot_ref(targets, index))
}

/// The slot of target `name` of `database`, claiming a free or idle one if it has none; `None`
/// when every slot serves a target with keys pending.
pub fn claim(state: &mut ViewMut<'_>, database: pg_sys::Oid, name: &str, now: i64) -> Option<SlotRef> {
    if let Some(found) = find(state.targets, database, name) {
        return Some(found);
    }
    let free = state.targets.iter().position(|slot| !slot.in_use());
    let index = free.or_else(|| state.targets.iter().position(|slot| slot.pending() == 0))?;
    state.targets[index].assign(database, name, now);
    Some(slot_ref(state.targets, index))
}

/// Give back every slot of `database` (dropped).
pub fn free_database(state: &mut ViewMut<'_>, database: pg_sys::Oid) {
    for slot in state.targets.iter_mut().filter(|slot| slot.database == database) {
        slot.free();
    }
}
