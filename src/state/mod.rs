//! The state kept in shared memory, read and changed under the lock (see `memory::layout`): the
//! [`pending`] set a mark inserts into and a flush snapshots and forgets from, the slots of
//! [`databases`] and targets ([`target_slots`]) that scope it, the targets' declarations
//! [`publications`], [`counting`] for the DBA, the
//! [`rendezvous`] of `wsusage_flush()` callers and workers, and the [`saved_set`] that carries
//! the pending marks across a clean restart.

pub mod counting;
pub mod databases;
pub mod pending;
pub mod publications;
pub mod rendezvous;
pub mod saved_set;
pub mod target_slots;
