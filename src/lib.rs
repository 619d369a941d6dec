//! wsusage: debounced "last used" timestamps.
//!
//! Vocabulary used throughout the crate:
//! - a **mark** is one call saying "this id was used now";
//! - a **target** is a debounced column: a table, its key column and its timestamp column
//!   (`wsusage_target`, and the `default` target of the settings);
//! - the **pending** set holds, per key of a target, the latest time it was marked and not yet
//!   written;
//! - a **flush** writes a database's pending keys to their targets' tables, one `UPDATE` per chunk
//!   of a target's keys, and forgets what it wrote;
//! - the **launcher** starts a flush **worker** per database with marks pending (or a
//!   `wsusage_flush()` caller waiting), as many at once as it has places for.
//!
//! This file is wiring only; each concept lives in the module named for it.

#![warn(clippy::undocumented_unsafe_blocks)]

use pgrx::prelude::*;

// From the bottom up, as a mark and a flush go through them: the settings, shared memory and the
// state kept there, the targets a flush writes, the flush, the processes that run it, and the SQL
// functions applications and DBAs call.
mod clock;
mod settings;

mod memory;
mod state;
mod targets;

mod flush;
mod processes;
mod sql;

// What runs inside one transaction, tested where it runs: `cargo pgrx test` (see src/pg_tests/).
#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

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
    processes::postmaster::init();
    processes::launcher::register();
}

/// What `cargo pgrx test` asks of the crate: its test cluster's settings.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        // Preloaded, or _PG_init does nothing and every call is 55000. No flush by the worker
        // while the tests run: what they mark stays pending for them to read.
        vec!["shared_preload_libraries = 'wsusage'", "wsusage.flush_interval = '1h'"]
    }
}
