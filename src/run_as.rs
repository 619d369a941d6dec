//! Who a flush's statements run as: the **owner of the target's table**, as PostgreSQL's own
//! VACUUM, ANALYZE, CLUSTER, REINDEX and REFRESH MATERIALIZED VIEW do since CVE-2022-1552 (and
//! logical replication since 16), or the role `wsusage.role` names when a DBA set one (as a
//! subscription without `run_as_owner` runs as its owner).
//!
//! The worker connects as the bootstrap superuser, so that a missing role or privilege is an
//! ordinary, logged and retried error rather than a worker that cannot start. But nothing of a
//! table owner's — a trigger, a CHECK, an index expression, a default, an `after_flush`
//! function — may run with that privilege: a non-superuser who owns a table would otherwise be
//! a superuser at the next flush. So each chunk, in its own transaction:
//!
//! 1. opens a GUC nest level, so that whatever the owner's code sets (`SET`,
//!    `set_config(…, false)`) is undone when the chunk ends, and reaches neither the next chunk
//!    nor another target's owner;
//! 2. locks the table (`ROW EXCLUSIVE`, as the UPDATE will) by OID, and only then reads its
//!    owner and name: from here to the commit, neither can change (ALTER TABLE … OWNER TO and
//!    RENAME wait for the lock), and the statements, which name the table, are checked to name
//!    this one;
//! 3. becomes that role with `SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION`:
//!    the owner's code cannot `SET ROLE` back, create temporary objects, or leave anything
//!    behind for the worker's next transaction.
//!
//! [`RunAs::end`] undoes 3 and 1 before the commit; an ERROR's abort undoes both by itself.

use std::ffi::{c_int, CStr, CString};

use pgrx::pg_sys;
use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::PgLogLevel;

use crate::settings;
use crate::target::Relation;

/// A chunk's statements running as the table's owner (or `wsusage.role`); see the module.
pub struct RunAs {
    saved_user: pg_sys::Oid,
    saved_context: c_int,
    nest_level: c_int,
}

impl RunAs {
    /// Steps 1–3 of the module for `relation`; `lock_timeout_ms`, if given, is the chunk's
    /// `lock_timeout` (the table's lock included). Raises an ERROR when the table is gone or
    /// renamed, or `wsusage.role` names no role.
    ///
    /// # Safety
    /// Inside a transaction of the worker, before any statement of the chunk.
    pub unsafe fn begin(relation: &Relation, lock_timeout_ms: Option<i32>) -> RunAs {
        // SAFETY: the caller's transaction; every call below raises an ERROR on failure, whose
        // abort pops the nest level and restores the user.
        unsafe {
            let nest_level = pg_sys::NewGUCNestLevel();
            if let Some(ms) = lock_timeout_ms {
                set_for_chunk(c"lock_timeout", &ms.to_string());
            }
            let owner = lock_and_check(relation);
            let runner = match settings::role() {
                Some(role) => role_oid(&role),
                None => owner,
            };
            let (mut saved_user, mut saved_context) = (pg_sys::InvalidOid, 0);
            pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
            pg_sys::SetUserIdAndSecContext(
                runner,
                saved_context | (pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION) as c_int,
            );
            RunAs { saved_user, saved_context, nest_level }
        }
    }

    /// Undo [`RunAs::begin`]: every setting changed since is restored, the worker is itself
    /// again. Call before the chunk's commit.
    ///
    /// # Safety
    /// In the transaction `begin` ran in, with no nest level opened since still open.
    pub unsafe fn end(self) {
        // SAFETY: the caller's promise; `false` restores every value set at or below our level,
        // as PostgreSQL's VACUUM does after running as a table's owner.
        unsafe {
            pg_sys::AtEOXact_GUC(false, self.nest_level);
            pg_sys::SetUserIdAndSecContext(self.saved_user, self.saved_context);
        }
    }
}

/// Set a GUC for the rest of the current nest level.
///
/// # Safety
/// Inside a transaction, with a nest level of ours open.
unsafe fn set_for_chunk(name: &CStr, value: &str) {
    let value = CString::new(value).unwrap_or_default();
    // SAFETY: a user-settable GUC of this session, saved at our nest level (GUC_ACTION_SAVE), so
    // popping the level restores it.
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
    }
}

/// Lock `relation` by OID as the UPDATE will, then return its owner, once the catalogs say the
/// statements' name for it (schema and table) is still its own.
///
/// # Safety
/// Inside a transaction.
unsafe fn lock_and_check(relation: &Relation) -> pg_sys::Oid {
    // SAFETY: the caller's transaction; the lock is kept until its end (closed with NoLock), and
    // the relcache entry read while open.
    unsafe {
        let rel = pg_sys::try_relation_open(relation.oid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        if rel.is_null() {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                format!("relation {} was dropped during the flush", relation.display)
            );
        }
        let form = &*(*rel).rd_rel;
        let owner = form.relowner;
        let name = CStr::from_ptr(form.relname.data.as_ptr()).to_string_lossy().into_owned();
        let schema = pg_sys::get_namespace_name(form.relnamespace);
        let schema =
            if schema.is_null() { String::new() } else { CStr::from_ptr(schema).to_string_lossy().into_owned() };
        pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        if name != relation.name || schema != relation.schema {
            raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                format!("relation {} was renamed during the flush", relation.display),
                "Its keys stay pending; the next flush writes the table under its new name.",
            );
        }
        owner
    }
}

/// The OID of role `name` (`wsusage.role`).
///
/// # Safety
/// Inside a transaction.
unsafe fn role_oid(name: &str) -> pg_sys::Oid {
    let c_name = CString::new(name).unwrap_or_default();
    // SAFETY: a catalog lookup inside the caller's transaction.
    let oid = unsafe { pg_sys::get_role_oid(c_name.as_ptr(), true) };
    if oid == pg_sys::InvalidOid {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("role \"{name}\" named by \"wsusage.role\" does not exist"),
            "Create the role and grant it UPDATE on the table, or change \"wsusage.role\" and restart the server.",
        );
    }
    oid
}

fn raise(sqlstate: PgSqlErrorCode, message: String, hint: &str) -> ! {
    ErrorReport::new(sqlstate, message, "wsusage flush").set_hint(hint).report(PgLogLevel::ERROR);
    unreachable!("an ERROR does not return")
}
