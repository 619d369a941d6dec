//! Fresh reads: the time of a key's pending mark, which the next flush writes to its column.
//! `greatest(last_used_at, wsusage_pending_at(id))` is the column's value as of now, without a
//! write. A read needs what reading the column does (see `access::Access::Read`), and takes the
//! lock shared, as a mark does: it waits only for a claim on its way to be published (as a mark
//! does), and no marker waits for it.
//!
//! A NULL id reads as NULL, as SQL's own functions of a NULL do (a row without an id has no
//! pending mark); a NULL target is a mistake in the call, refused as the marking functions do.

use pgrx::prelude::*;
use pgrx::Uuid;

use crate::memory::key::{self, Kind};
use crate::sql::access::Access;
use crate::sql::availability::{check_active_here, this_database, Unavailable};
use crate::sql::functions::DEFAULT_TARGET;
use crate::sql::mark_errors::MarkRefused;
use crate::sql::report::Report;
use crate::sql::resolve;
use crate::state::pending::{self, Marking, ReadError};

/// The time of the pending mark of workspace `workspace_id` (a key of the `default` target) in
/// this database; NULL when none is pending.
#[pg_extern(volatile, parallel_unsafe)]
fn wsusage_pending_at(workspace_id: Option<Uuid>) -> Option<TimestampWithTimeZone> {
    const FUNCTION: &str = "wsusage_pending_at";
    check_active_here(FUNCTION, "read pending marks");
    read(DEFAULT_TARGET, Kind::Uuid, *workspace_id?.as_bytes(), FUNCTION)
}

/// The time of the pending mark of key `id` of `target` in this database; NULL when none is
/// pending.
#[pg_extern(name = "wsusage_pending_at", volatile, parallel_unsafe)]
fn wsusage_pending_at_target(target: Option<&str>, id: Option<Uuid>) -> Option<TimestampWithTimeZone> {
    const FUNCTION: &str = "wsusage_pending_at";
    check_active_here(FUNCTION, "read pending marks");
    let target = target.unwrap_or_else(|| MarkRefused::NullTarget.raise(FUNCTION));
    read(target, Kind::Uuid, *id?.as_bytes(), FUNCTION)
}

/// The time of the pending mark of key `id` of `target`, whose key column is `bigint` or
/// `integer`, in this database; NULL when none is pending.
#[pg_extern(volatile, parallel_unsafe)]
fn wsusage_pending_at_bigint(target: Option<&str>, id: Option<i64>) -> Option<TimestampWithTimeZone> {
    const FUNCTION: &str = "wsusage_pending_at_bigint";
    check_active_here(FUNCTION, "read pending marks");
    let target = target.unwrap_or_else(|| MarkRefused::NullTarget.raise(FUNCTION));
    read(target, Kind::Bigint, key::from_bigint(id?), FUNCTION)
}

fn read(target: &str, kind: Kind, id: [u8; 16], function: &'static str) -> Option<TimestampWithTimeZone> {
    resolve::with_target(target, kind, Access::Read, function, |target| {
        let mut reading = Marking { database: this_database(), name: &target.name, slot: &mut target.slot, kind };
        match pending::marked_at(&mut reading, id) {
            // A mark's time came from the clock, or from a saved set that was validated before
            // it was restored: always a valid timestamp.
            Ok(marked_at) => marked_at.and_then(|at| TimestampWithTimeZone::try_from(at).ok()),
            Err(ReadError::NotPreloaded) => Unavailable::NotPreloaded.raise(function),
            Err(ReadError::Stuck(stuck)) => MarkRefused::StuckReading { stuck }.raise(function),
        }
    })
}
