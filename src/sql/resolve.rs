//! Which target a mark names, as a backend sees it: resolved at a backend's first mark of it —
//! its declaration as an earlier backend published it (see `published`), else read from the
//! catalogs (see `targets::lookup`) — checked in this backend's catalog caches (it exists, its key
//! type is the function's, the role may UPDATE its timestamp column to mark it, or SELECT it to
//! read its pending marks), and remembered, so that a mark or a read costs no catalog lookup.
//!
//! What is remembered is forgotten when it may have changed: an invalidation of
//! `wsusage_target` (its trigger sends one at every change), of a target's table (a GRANT or
//! REVOKE on it or its columns, ALTER, DROP), of a schema, of role memberships or roles, a
//! reload that sets the `default` target's settings, or a change of the current role (SET ROLE,
//! a SECURITY DEFINER function). PostgreSQL delivers invalidations at
//! the start of each transaction, as it does for its own caches.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use pgrx::pg_sys;

use crate::memory::key::Kind;
use crate::settings;
use crate::sql::access::Access;
use crate::sql::mark_errors::MarkRefused;
use crate::sql::report::Report;
use crate::state::target_slots::SlotRef;
use crate::targets::changes;
use crate::targets::lookup;
use crate::targets::published;

/// A target a mark or a read may name, as checked.
pub struct Resolved {
    pub name: String,
    pub kind: Kind,
    pub access: Access,
    /// Its slot in shared memory, as last found by a mark.
    pub slot: Option<SlotRef>,
    /// Its key column's type, for messages.
    column_type: String,
    /// The role it was checked for.
    user: pg_sys::Oid,
}

thread_local! {
    static RESOLVED: RefCell<Vec<Resolved>> = const { RefCell::new(Vec::new()) };
    /// `wsusage_target` and the tables of the targets remembered, for the callbacks to compare.
    static WATCHED: RefCell<Vec<pg_sys::Oid>> = const { RefCell::new(Vec::new()) };
}

/// Set by the invalidation callbacks: forget everything before the next mark.
static STALE: AtomicBool = AtomicBool::new(false);
/// `wsusage_target` exists and is watched. Before the extension's update to 0.3.0 creates it,
/// any relation's invalidation (its creation's among them) counts.
static TARGETS_TABLE_WATCHED: AtomicBool = AtomicBool::new(false);
static CALLBACKS_REGISTERED: AtomicBool = AtomicBool::new(false);
/// The settings' generation (see `settings::target_generation`) what is remembered was read at.
static SETTINGS_SEEN: AtomicU64 = AtomicU64::new(0);

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn relation_changed(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    // Called by PostgreSQL while it processes invalidations, possibly during our own catalog
    // query: only compare and set a flag. A list being changed right now counts as a match.
    let watched = WATCHED.with(|watched| watched.try_borrow().map_or(true, |watched| watched.contains(&relid)));
    if relid == pg_sys::InvalidOid || watched || !TARGETS_TABLE_WATCHED.load(Ordering::Relaxed) {
        STALE.store(true, Ordering::Relaxed);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn roles_or_schemas_changed(_arg: pg_sys::Datum, _cacheid: std::ffi::c_int, _hash: u32) {
    STALE.store(true, Ordering::Relaxed);
}

fn register_callbacks() {
    if CALLBACKS_REGISTERED.swap(true, Ordering::Relaxed) {
        return;
    }
    // SAFETY: registering callbacks with static lifetime, once per process, as extensions do in
    // their first use of a cache.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(relation_changed), pg_sys::Datum::from(0));
        for cache in [
            pg_sys::SysCacheIdentifier::AUTHMEMROLEMEM,
            pg_sys::SysCacheIdentifier::AUTHOID,
            pg_sys::SysCacheIdentifier::NAMESPACEOID,
        ] {
            pg_sys::CacheRegisterSyscacheCallback(
                cache as std::ffi::c_int,
                Some(roles_or_schemas_changed),
                pg_sys::Datum::from(0),
            );
        }
    }
}

// miscadmin.h's GetUserId, declared here without pgrx's guard: it returns a variable of the
// backend and raises nothing, and the guard (a sigsetjmp) would cost every mark a tenth of its
// time.
unsafe extern "C" {
    #[link_name = "GetUserId"]
    fn get_user_id_unguarded() -> pg_sys::Oid;
}

fn current_user() -> pg_sys::Oid {
    // SAFETY: GetUserId reads the backend's current role; it cannot raise an ERROR, so no
    // longjmp can cross this frame.
    unsafe { get_user_id_unguarded() }
}

/// Run `mark` on target `name`, resolving and checking it first unless remembered; raises for a
/// target that does not exist, takes other keys than `takes`, or whose keys the role may not
/// use for `access`.
pub fn with_target<R>(
    name: &str,
    takes: Kind,
    access: Access,
    function: &'static str,
    mark: impl FnOnce(&mut Resolved) -> R,
) -> R {
    let user = current_user();
    // Plain loads first: a swap would be a locked instruction on every mark.
    let settings = settings::target_generation();
    if STALE.load(Ordering::Relaxed) || SETTINGS_SEEN.load(Ordering::Relaxed) != settings {
        STALE.store(false, Ordering::Relaxed);
        SETTINGS_SEEN.store(settings, Ordering::Relaxed);
        RESOLVED.with(|resolved| resolved.borrow_mut().clear());
    }
    // Nothing in `mark` processes invalidations, whose callbacks touch only `WATCHED` and
    // `STALE`, so the list may stay borrowed while it runs.
    let mark = RESOLVED.with(|resolved| {
        let mut resolved = resolved.borrow_mut();
        let Some(target) =
            resolved.iter_mut().find(|target| target.name == name && target.user == user && target.access == access)
        else {
            return Err(mark);
        };
        if target.kind != takes {
            refuse_key_type(target, takes, function);
        }
        Ok(mark(target))
    });
    match mark {
        Ok(result) => result,
        Err(mark) => resolve_and_mark(name, takes, access, function, user, mark),
    }
}

/// A backend's first mark of a target: kept out of [`with_target`], whose every other call
/// then runs in a small frame with nothing of this path inlined.
#[cold]
#[inline(never)]
fn resolve_and_mark<R>(
    name: &str,
    takes: Kind,
    access: Access,
    function: &'static str,
    user: pg_sys::Oid,
    mark: impl FnOnce(&mut Resolved) -> R,
) -> R {
    match resolve(name, takes, access, function, user) {
        Some(resolved) => RESOLVED.with(|all| {
            let mut all = all.borrow_mut();
            all.push(resolved);
            let last = all.len() - 1;
            mark(&mut all[last])
        }),
        // The settings' target, not writable now: accepted, and resolved again at the next
        // mark (see `resolve`).
        None => mark(&mut Resolved {
            name: name.to_owned(),
            kind: takes,
            access,
            column_type: String::new(),
            slot: None,
            user,
        }),
    }
}

#[cold]
#[inline(never)]
fn refuse_key_type(target: &Resolved, takes: Kind, function: &'static str) -> ! {
    let column_type = target.column_type.clone();
    MarkRefused::WrongKeyType { name: target.name.clone(), column_type, takes }.raise(function)
}

/// Read and check target `name`. `None` for the settings' `default` whose table does not fit:
/// marks of it are accepted, as before targets existed, and the worker reports the problem.
/// Reads of such a target are refused: no column's privilege can allow them.
fn resolve(name: &str, takes: Kind, access: Access, function: &'static str, user: pg_sys::Oid) -> Option<Resolved> {
    register_callbacks();
    let catalog = read(name, user);
    let targets_table = catalog.targets_table;
    let Some(definition) = catalog.definitions.into_iter().next() else {
        MarkRefused::UnknownTarget { name: name.to_owned() }.raise(function)
    };
    let relation = definition.relation.clone().unwrap_or_default();
    let allowed = match access {
        Access::Mark => definition.may_update,
        Access::Read => definition.may_read,
    };
    let refused = || MarkRefused::NoPrivilege {
        access,
        id_column: definition.id_column.clone(),
        name: name.to_owned(),
        table: relation.display.clone(),
        column: definition.timestamp_column.clone(),
    };
    if let Some(problem) = definition.problem() {
        // The settings' target whose table or columns are not there (yet): its marks wait, as
        // before targets existed, checked again at every mark; but a role known to lack the
        // privilege is refused now.
        if definition.from_settings && access == Access::Mark {
            if allowed == Some(false) {
                refused().raise(function);
            }
            return None;
        }
        MarkRefused::TargetProblem { name: name.to_owned(), problem }.raise(function);
    }
    let kind = definition.kind().unwrap_or(Kind::Uuid);
    let column_type = definition.id_type.as_ref().map(|column| column.name.clone()).unwrap_or_default();
    if kind != takes {
        MarkRefused::WrongKeyType { name: name.to_owned(), column_type, takes }.raise(function);
    }
    if allowed != Some(true) {
        refused().raise(function);
    }
    TARGETS_TABLE_WATCHED.store(targets_table.is_some(), Ordering::Relaxed);
    WATCHED.with(|watched| {
        let mut watched = watched.borrow_mut();
        watched.extend(targets_table.into_iter().chain([relation.oid]));
        watched.sort_unstable_by_key(|oid| oid.to_u32());
        watched.dedup();
    });
    Some(Resolved { name: name.to_owned(), kind, access, column_type, slot: None, user })
}

/// The definition of target `name`, with `user`'s privilege on it: its declaration as published
/// in shared memory if it is current (see `published`), else read from the catalogs and
/// published for the backends after this one. A transaction that wrote `wsusage_target` reads
/// its own rows, and publishes nothing of them: they are not committed.
fn read(name: &str, user: pg_sys::Oid) -> lookup::Catalog {
    if changes::uncommitted() {
        return lookup::read(Some(name), user);
    }
    // SAFETY: a plain read of the backend's database, set once it connected.
    let database = unsafe { pg_sys::MyDatabaseId };
    if let Some(declarations) = published::lookup(database, name) {
        return lookup::describe_declarations(declarations, Some(name), user);
    }
    // The ticket first: a change committed after it was read invalidates what is read here.
    let ticket = published::ticket(database);
    let declarations = lookup::declarations(Some(name));
    let publication = ticket.and_then(|ticket| published::prepare(ticket, &declarations));
    let catalog = lookup::describe_declarations(declarations, Some(name), user);
    if let (Some(publication), Some(definition)) = (publication, catalog.definitions.first()) {
        published::publish(database, name, publication, definition.found);
    }
    catalog
}
