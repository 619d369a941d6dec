//! wsusage: debounced "last used" timestamps.
//!
//! Vocabulary used throughout the crate:
//! - a **mark** is one call saying "this id was used now";
//! - a **target** is a debounced column: a table, its key column and its timestamp column
//!   (`wsusage_target`, and the `default` target of the settings);
//! - the **pending** set holds, per key of a target, the latest time it was marked and not yet
//!   written;
//! - a **flush** writes the pending set to the table in one statement and forgets what it wrote;
//! - the **launcher** starts a flush **worker** per database with marks due for a flush.
//!
//! This file is wiring only; each concept lives in the module named for it.

#![warn(clippy::undocumented_unsafe_blocks)]

use pgrx::prelude::*;

// From the bottom up: the lock and shared-memory pieces, the structures kept there, the layout
// composing them, what operates on them, and the processes and SQL functions using those.
mod clock;
mod counters;
mod held;
mod key;
mod lock;
mod message;
mod publication;
mod requests;
mod slot;
mod stripes;
mod target_slot;

mod layout;

mod databases;
mod pending;
mod rendezvous;
mod stats;
mod targets;

mod persist;
mod shmem;

mod errors;
mod nest_level;
mod settings;
mod target;

mod catalog;
mod changes;
mod definitions;
mod published;
mod resolve;
mod target_table;

mod run_as;
mod statements;
mod transaction;

mod flush;
mod launcher;
mod worker;

mod rows;

mod api;
mod monitor;

::pgrx::pg_module_magic!(name, version);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // Shared memory and the worker exist only when the postmaster loads us. Loaded later (by a
    // backend calling one of our functions) we stay passive, as pg_stat_statements does: the SQL
    // functions then raise a clear error instead of the server refusing to start.
    // SAFETY: a plain read of a postmaster global, set before any _PG_init runs.
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    settings::init();
    shmem::init();
    launcher::register();
}
