//! Who a flush's statements run as: the **owner of the target's table**, as PostgreSQL's VACUUM
//! and ANALYZE do (and, since CVE-2022-1552, CLUSTER, REINDEX, CREATE INDEX and REFRESH
//! MATERIALIZED VIEW; logical replication since 16), or the role `wsusage.role` names when a DBA
//! set one (as a subscription with `run_as_owner = true` applies every change as the
//! subscription's owner).
//!
//! The worker connects as the bootstrap superuser, so that a missing role or privilege is an
//! ordinary, logged and retried error rather than a worker that cannot start. But nothing of a
//! table owner's — a trigger, a CHECK, an index expression, a generated column, an
//! `after_flush` function — may run with that privilege: a non-superuser who owns a table would
//! otherwise be a superuser at the next flush. So each chunk, in its own transaction:
//!
//! 1. opens a GUC nest level, so that whatever the owner's code sets (`SET`,
//!    `set_config(…, false)`) is undone when the chunk ends, and reaches neither the next chunk
//!    nor another target's owner;
//! 2. locks the table (`ROW EXCLUSIVE`, as the UPDATE will) by OID, and only then reads its
//!    owner: from here to the commit ALTER TABLE … OWNER TO and RENAME wait for the lock. The
//!    role the chunk runs as must be the one the round checked the target for (its
//!    `after_flush` function's owner among others). The statements name the table (and the
//!    function) by schema and name, so before each one runs, its plan is checked to read them
//!    and nothing else of that name ([`RunAs::check_plan`]; the function's owner,
//!    [`RunAs::check_function`]): a rename of the table or of its schema made since the round
//!    read them, or racing the statement, never reaches another table. A change since the round's check is an
//!    error of this round; the next round checks again;
//! 3. becomes that role with `SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION`:
//!    the owner's code cannot `SET ROLE`, create temporary objects or cursors `WITH HOLD`, or
//!    fire deferred triggers after it, and what it sets is undone by 1.
//!
//! [`RunAs::end`] pops 1, then undoes 3, before the commit; an ERROR's abort undoes both. Unlike
//! VACUUM since PostgreSQL 17, the search path is left as the worker's session has it, so that
//! the owner's triggers find their objects; the statements qualify every name instead.

use std::ffi::{c_int, CString};

use pgrx::pg_sys;
use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::PgLogLevel;

use crate::settings;
use crate::settings::nest_level::NestLevel;
use crate::targets::catalog;
use crate::targets::definition::{self, Relation};

/// A chunk's statements running as the table's owner (or `wsusage.role`); see the module.
pub struct RunAs {
    saved_user: pg_sys::Oid,
    saved_context: c_int,
    nest_level: NestLevel,
    relation: Relation,
    /// The role the chunk runs as.
    runner: pg_sys::Oid,
}

impl RunAs {
    /// Steps 1–3 of the module for `relation`; `lock_timeout_ms`, if given, is the chunk's
    /// `lock_timeout` (the table's lock included). Raises an ERROR when the table is gone
    /// (42P01), its lock not had in time (55P03), `wsusage.role` names no role (42704),
    /// or the role to run as is not the one the round checked (55000).
    ///
    /// # Safety
    /// Inside a transaction of the worker, before any statement of the chunk.
    pub unsafe fn begin(relation: &Relation, lock_timeout_ms: Option<i32>) -> RunAs {
        // SAFETY: the caller's transaction; every call below raises an ERROR on failure, whose
        // abort pops the nest level and restores the user.
        unsafe {
            let nest_level = NestLevel::open();
            if let Some(ms) = lock_timeout_ms {
                nest_level.set(c"lock_timeout", &ms.to_string());
            }
            let owner = lock(relation);
            let runner = match settings::role() {
                Some(role) => role_oid(&role),
                None => owner,
            };
            if runner != relation.runs_as {
                raise(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!("the owner of relation {} changed during the flush", relation.display),
                    "Its keys stay pending; the next flush checks the target again and writes them as the new owner.",
                );
            }
            let (mut saved_user, mut saved_context) = (pg_sys::InvalidOid, 0);
            pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
            pg_sys::SetUserIdAndSecContext(
                runner,
                saved_context | (pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION) as c_int,
            );
            RunAs { saved_user, saved_context, nest_level, relation: relation.clone(), runner }
        }
    }

    /// Before a statement of the chunk runs: bring its `plan` up to date with the catalogs (made
    /// again from its text, as running it would, if they changed since), and raise unless the
    /// plan as it will run reads `expect` — the target's table, or the `after_flush` function —
    /// and not whatever else now goes by their names (a rename of the table's schema takes no
    /// lock on the table). Once the plan ends up to date here, nothing before the run takes in
    /// invalidations (the locks the run needs are held by then), so the run does not analyse its
    /// text again.
    ///
    /// # Safety
    /// Inside the transaction `begin` ran in, connected to SPI; `plan` is a kept plan of one
    /// statement.
    pub unsafe fn check_plan(&self, plan: pg_sys::SPIPlanPtr, expect: Expect) {
        // SAFETY: the caller's promise; the cached plan is released before any ERROR is raised,
        // and the plan source, owned by the kept plan, read while it is.
        let reads_it = unsafe {
            let mut reads_it = false;
            // Bringing the plan up to date takes locks, which take in invalidations: it is
            // checked only once it ends up to date, so that the run does not analyse it again.
            for _ in 0..3 {
                let cached = pg_sys::SPI_plan_get_cached_plan(plan);
                if cached.is_null() {
                    break;
                }
                let sources = pg_sys::SPI_plan_get_plan_sources(plan);
                let source = (*(*sources).elements).ptr_value.cast::<pg_sys::CachedPlanSource>();
                let up_to_date = (*source).is_valid;
                reads_it = up_to_date
                    && match expect {
                        Expect::Table => pg_sys::list_member_oid((*source).relationOids, self.relation.oid),
                        Expect::Function(oid) => calls(source, oid),
                    };
                pg_sys::ReleaseCachedPlan(cached, pg_sys::CurrentResourceOwner);
                if up_to_date {
                    break;
                }
            }
            reads_it
        };
        if !reads_it {
            match expect {
                Expect::Table => raise(
                    PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                    format!("relation {} was renamed during the flush", self.relation.display),
                    "Its keys stay pending; the next flush writes the table under its new name.",
                ),
                Expect::Function(_) => renamed_function(),
            }
        }
    }

    /// Before the `after_flush` call: raise unless function `oid` is still owned by a role with
    /// the privileges of the role the chunk runs as — it may have changed hands since the round
    /// checked it. (That its name still calls it is [`RunAs::check_plan`]'s.)
    ///
    /// # Safety
    /// Inside the transaction `begin` ran in.
    pub unsafe fn check_function(&self, oid: pg_sys::Oid, signature: &str) {
        let Some(function) = catalog::function(oid) else { renamed_function() };
        if !catalog::has_privileges_of(function.owner, self.runner) {
            raise(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("function {signature} changed hands during the flush"),
                "Its keys stay pending; the next flush checks who owns it again.",
            );
        }
    }

    /// Undo [`RunAs::begin`]: every setting changed since is restored, the worker is itself
    /// again. Call before the chunk's commit.
    ///
    /// # Safety
    /// In the transaction `begin` ran in, with no nest level opened since still open.
    pub unsafe fn end(self) {
        // SAFETY: the caller's promise: the level is the innermost open one.
        unsafe {
            self.nest_level.pop();
            pg_sys::SetUserIdAndSecContext(self.saved_user, self.saved_context);
        }
    }
}

/// Lock `relation` by OID as the UPDATE will, and return its owner.
///
/// # Safety
/// Inside a transaction.
unsafe fn lock(relation: &Relation) -> pg_sys::Oid {
    // SAFETY: the caller's transaction; the lock is kept until its end (closed with NoLock), and
    // the relcache entry read while open.
    unsafe {
        let rel = pg_sys::try_relation_open(relation.oid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        if rel.is_null() {
            raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                format!("relation {} was dropped during the flush", relation.display),
                "Its keys stay pending; the next flush finds whether its target still has a table.",
            );
        }
        let owner = (*(*rel).rd_rel).relowner;
        pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        owner
    }
}

/// What a statement's plan must read.
#[derive(Clone, Copy)]
pub enum Expect {
    /// The target's table (`relationOids` of the plan holds it).
    Table,
    /// The `after_flush` function of this OID, as the call in the statement's select list.
    Function(pg_sys::Oid),
}

/// Whether the first select-list entry of `source`'s query is a call of function `oid`.
///
/// # Safety
/// `source` is a valid, up-to-date plan source.
unsafe fn calls(source: *const pg_sys::CachedPlanSource, oid: pg_sys::Oid) -> bool {
    // SAFETY: the caller's promise; every pointer is checked before it is followed, and the
    // node's tag before it is read as a FuncExpr.
    unsafe {
        let queries = (*source).query_list;
        if queries.is_null() || (*queries).length < 1 {
            return false;
        }
        let query = (*(*queries).elements).ptr_value.cast::<pg_sys::Query>();
        let targets = (*query).targetList;
        if targets.is_null() || (*targets).length < 1 {
            return false;
        }
        let entry = (*(*targets).elements).ptr_value.cast::<pg_sys::TargetEntry>();
        let expr = (*entry).expr;
        !expr.is_null()
            && (*expr).type_ == pg_sys::NodeTag::T_FuncExpr
            && (*expr.cast::<pg_sys::FuncExpr>()).funcid == oid
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
        let problem = definition::missing_role(name);
        raise(problem.sqlstate, problem.message, &problem.hint);
    }
    oid
}

fn renamed_function() -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_UNDEFINED_FUNCTION,
        "the after_flush function was renamed or dropped during the flush".to_owned(),
        "Its keys stay pending; the next flush checks the target's after_flush function again.",
    )
}

fn raise(sqlstate: PgSqlErrorCode, message: String, hint: &str) -> ! {
    ErrorReport::new(sqlstate, message, "wsusage flush").set_hint(hint).report(PgLogLevel::ERROR);
    unreachable!("an ERROR does not return")
}
