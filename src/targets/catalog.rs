//! What wsusage reads of PostgreSQL's catalogs, read as PostgreSQL's own code reads them: through
//! the system caches (`SearchSysCache`, `lsyscache.c`), index scans of `pg_extension`
//! (`get_extension_oid`) and `pg_depend`, `to_regprocedure` (on the current search path: the
//! caller sets it), and the ACL functions that `has_column_privilege()` calls — never by planning
//! SQL. A backend's first mark resolves its target with these (see `sql::resolve`); planning the
//! catalog query that did it before cost a new backend milliseconds (26–28 ms p50 with 8 clients
//! connecting at once on 2 cores, bench/results/2026-12-07-first-mark.md), more than the call it
//! was meant to make free.
//!
//! Every function here runs inside a transaction and reads the catalogs as they are now (the
//! caches' snapshot), as a SQL query's `pg_class` join would. None runs user code, and none checks
//! the privileges of the current role: callers decide what a role may see.

use std::ffi::{CStr, CString};

use pgrx::pg_sys;

/// A table (or any relation) as `pg_class` describes it.
pub struct RelationRow {
    pub namespace: pg_sys::Oid,
    pub name: String,
    pub owner: pg_sys::Oid,
    pub kind: u8,
}

/// A function as `pg_proc` describes it.
pub struct FunctionRow {
    pub name: String,
    pub namespace: pg_sys::Oid,
    pub owner: pg_sys::Oid,
    pub kind: u8,
    pub variadic: pg_sys::Oid,
    pub argument_types: Vec<pg_sys::Oid>,
}

/// `text` owned: a palloc'd C string (may be NULL) copied, for the caches' answers.
///
/// # Safety
/// `text` is NULL or a NUL-terminated string valid for the call.
unsafe fn owned(text: *const std::ffi::c_char) -> Option<String> {
    // SAFETY: the caller's promise.
    (!text.is_null()).then(|| unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned())
}

fn c_string(text: &str) -> CString {
    // Names from the catalogs or parsed settings hold no NUL; one that did names nothing.
    CString::new(text).unwrap_or_default()
}

/// What `read` makes of the row of the one-key system cache `cache` whose key is `oid`, if there
/// is one; the cached tuple is released before returning.
///
/// # Safety
/// Inside a transaction; `T` is the struct of the catalog `cache` caches (`FormData_pg_class` for
/// `RELOID` …); `read` raises no ERROR.
unsafe fn cached_row<T, R>(
    cache: pg_sys::SysCacheIdentifier::Type,
    oid: pg_sys::Oid,
    read: impl FnOnce(&T) -> R,
) -> Option<R> {
    // SAFETY: the caller's promise; the tuple's fixed part is read while the cache pins it.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(cache as std::ffi::c_int, pg_sys::Datum::from(oid));
        if tuple.is_null() {
            return None;
        }
        let row = read(&*pg_sys::heap_tuple_get_struct::<T>(tuple));
        pg_sys::ReleaseSysCache(tuple);
        Some(row)
    }
}

/// The relation with OID `oid`, if it exists.
pub fn relation(oid: pg_sys::Oid) -> Option<RelationRow> {
    // SAFETY: RELOID caches pg_class; the closure reads its row and raises nothing.
    unsafe {
        cached_row(pg_sys::SysCacheIdentifier::RELOID, oid, |form: &pg_sys::FormData_pg_class| RelationRow {
            namespace: form.relnamespace,
            name: owned(form.relname.data.as_ptr()).unwrap_or_default(),
            owner: form.relowner,
            kind: form.relkind as u8,
        })
    }
}

/// The relation `schema`.`name`, if both exist: what `to_regclass('"schema"."name"')` finds,
/// without a search path.
pub fn relation_named(schema: &str, name: &str) -> Option<pg_sys::Oid> {
    let (schema, name) = (c_string(schema), c_string(name));
    // SAFETY: syscache lookups by name in the caller's transaction; both return InvalidOid for
    // what does not exist (missing_ok).
    let oid = unsafe {
        let namespace = pg_sys::get_namespace_oid(schema.as_ptr(), true);
        if namespace == pg_sys::InvalidOid {
            return None;
        }
        pg_sys::get_relname_relid(name.as_ptr(), namespace)
    };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// Whether relation `oid` is `schema`.`name`.
pub fn relation_is_named(oid: pg_sys::Oid, schema: &str, name: &str) -> bool {
    let Some(relation) = relation(oid) else { return false };
    let schema = c_string(schema);
    // SAFETY: a syscache lookup by name (missing_ok).
    relation.name == name && unsafe { pg_sys::get_namespace_oid(schema.as_ptr(), true) } == relation.namespace
}

pub fn namespace_name(oid: pg_sys::Oid) -> Option<String> {
    // SAFETY: a syscache lookup; NULL when the schema does not exist.
    unsafe { owned(pg_sys::get_namespace_name(oid)) }
}

/// A user column of relation `relid` (not a system column, not dropped): its number and type.
pub fn column(relid: pg_sys::Oid, name: &str) -> Option<(pg_sys::AttrNumber, pg_sys::Oid)> {
    let name = c_string(name);
    // SAFETY: syscache lookups; get_attnum skips dropped columns and returns InvalidAttrNumber
    // (0) for a missing one.
    unsafe {
        let number = pg_sys::get_attnum(relid, name.as_ptr());
        if number <= 0 {
            return None;
        }
        let type_oid = pg_sys::get_atttype(relid, number);
        (type_oid != pg_sys::InvalidOid).then_some((number, type_oid))
    }
}

/// Column `number` of relation `relid`, if it is a user column named `name`, not dropped: its
/// number and type.
pub fn column_at(
    relid: pg_sys::Oid,
    number: pg_sys::AttrNumber,
    name: &str,
) -> Option<(pg_sys::AttrNumber, pg_sys::Oid)> {
    if number <= 0 {
        return None;
    }
    // SAFETY: a syscache lookup in the caller's transaction; the tuple is read and released here.
    unsafe {
        let tuple = pg_sys::SearchSysCache2(
            pg_sys::SysCacheIdentifier::ATTNUM as std::ffi::c_int,
            pg_sys::Datum::from(relid),
            pg_sys::Datum::from(number),
        );
        if tuple.is_null() {
            return None;
        }
        let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_attribute>(tuple);
        let fits = !(*form).attisdropped && CStr::from_ptr((*form).attname.data.as_ptr()).to_bytes() == name.as_bytes();
        let type_oid = (*form).atttypid;
        pg_sys::ReleaseSysCache(tuple);
        fits.then_some((number, type_oid))
    }
}

/// The type of an array of `type_oid` (InvalidOid if it has none).
pub fn array_type(type_oid: pg_sys::Oid) -> pg_sys::Oid {
    // SAFETY: a syscache lookup.
    unsafe { pg_sys::get_array_type(type_oid) }
}

/// The type's name as `format_type()` prints it.
pub fn type_name(type_oid: pg_sys::Oid) -> String {
    // SAFETY: a syscache lookup of a type read from pg_attribute; it raises only for a type that
    // does not exist, which a column's type cannot be while the column does.
    unsafe { owned(pg_sys::format_type_be(type_oid)) }.unwrap_or_default()
}

/// `schema.name`, each part quoted only where SQL needs it, as `format('%I.%I')` prints it.
pub fn qualified_name(schema: &str, name: &str) -> String {
    let (schema, name) = (c_string(schema), c_string(name));
    // SAFETY: both are valid C strings for the call; the result is palloc'd.
    unsafe { owned(pg_sys::quote_qualified_identifier(schema.as_ptr(), name.as_ptr())) }.unwrap_or_default()
}

/// Whether row-level security filters the rows of table `relid` that `role` reads, as a query of
/// it by `role` would have them filtered now (`row_security`, BYPASSRLS, ownership, FORCE).
pub fn rows_filtered_for(role: pg_sys::Oid, relid: pg_sys::Oid) -> bool {
    // SAFETY: PostgreSQL's own check; noError keeps `row_security = off` from raising, and what
    // may still raise (a table dropped meanwhile, out of memory) reaches pgrx's guard as an ERROR.
    let enabled = unsafe { pg_sys::check_enable_rls(relid, role, true) };
    enabled == pg_sys::CheckEnableRlsResult::RLS_ENABLED as std::ffi::c_int
}

/// Whether `role` has privilege `mode` (ACL_*) on column `attnum` of table `relid`, on the table
/// or on the column: what `has_column_privilege(role, relid, attnum, mode)` answers. False for a
/// table dropped meanwhile.
pub fn may_use_column(role: pg_sys::Oid, relid: pg_sys::Oid, attnum: pg_sys::AttrNumber, mode: u32) -> bool {
    let mut missing = false;
    // SAFETY: PostgreSQL's ACL checks, with is_missing: a relation or column dropped meanwhile
    // sets the flag instead of raising.
    unsafe {
        let mode = pg_sys::AclMode::from(mode);
        if pg_sys::pg_class_aclcheck_ext(relid, role, mode, &mut missing) == pg_sys::AclResult::ACLCHECK_OK {
            return true;
        }
        !missing
            && pg_sys::pg_attribute_aclcheck_ext(relid, attnum, role, mode, &mut missing)
                == pg_sys::AclResult::ACLCHECK_OK
    }
}

/// Whether `role` has USAGE on schema `namespace` (false for a schema dropped meanwhile).
pub fn may_use_schema(role: pg_sys::Oid, namespace: pg_sys::Oid) -> bool {
    // SAFETY: a syscache existence check, then PostgreSQL's ACL check of a schema that exists
    // (it raises for a missing one, which the check before rules out but for a concurrent DROP,
    // whose lock the DROP holds until it commits).
    unsafe {
        if !pg_sys::SearchSysCacheExists(
            pg_sys::SysCacheIdentifier::NAMESPACEOID as std::ffi::c_int,
            pg_sys::Datum::from(namespace),
            pg_sys::Datum::from(0),
            pg_sys::Datum::from(0),
            pg_sys::Datum::from(0),
        ) {
            return false;
        }
        namespace_aclcheck(namespace, role) == pg_sys::AclResult::ACLCHECK_OK
    }
}

#[cfg(any(feature = "pg14", feature = "pg15"))]
unsafe fn namespace_aclcheck(namespace: pg_sys::Oid, role: pg_sys::Oid) -> pg_sys::AclResult::Type {
    // SAFETY: the caller checked the schema exists.
    unsafe { pg_sys::pg_namespace_aclcheck(namespace, role, pg_sys::AclMode::from(pg_sys::ACL_USAGE)) }
}

#[cfg(not(any(feature = "pg14", feature = "pg15")))]
unsafe fn namespace_aclcheck(namespace: pg_sys::Oid, role: pg_sys::Oid) -> pg_sys::AclResult::Type {
    // SAFETY: the caller checked the schema exists.
    unsafe {
        pg_sys::object_aclcheck(pg_sys::NamespaceRelationId, namespace, role, pg_sys::AclMode::from(pg_sys::ACL_USAGE))
    }
}

/// The role named `name`, if it exists.
pub fn role_named(name: &str) -> Option<pg_sys::Oid> {
    let name = c_string(name);
    // SAFETY: a syscache lookup (missing_ok).
    let oid = unsafe { pg_sys::get_role_oid(name.as_ptr(), true) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// The role's name, as `pg_get_userbyid()` prints it.
pub fn role_name(oid: pg_sys::Oid) -> String {
    // SAFETY: a syscache lookup (noerr).
    unsafe { owned(pg_sys::GetUserNameFromId(oid, true)) }.unwrap_or_else(|| format!("unknown (OID={})", oid.to_u32()))
}

/// Whether `member` has the privileges of `role`: `pg_has_role(member, role, 'USAGE')`.
pub fn has_privileges_of(member: pg_sys::Oid, role: pg_sys::Oid) -> bool {
    // SAFETY: PostgreSQL's role membership cache; raises nothing for roles that do not exist.
    unsafe { pg_sys::has_privs_of_role(member, role) }
}

/// The function with OID `oid`, if it exists.
pub fn function(oid: pg_sys::Oid) -> Option<FunctionRow> {
    // SAFETY: PROCOID caches pg_proc; the closure reads its row and raises nothing. proargtypes is
    // the fixed-width oidvector of pg_proc's struct, `pronargs` long.
    unsafe {
        cached_row(pg_sys::SysCacheIdentifier::PROCOID, oid, |form: &pg_sys::FormData_pg_proc| {
            let arguments = usize::try_from(form.proargtypes.dim1).unwrap_or(0);
            FunctionRow {
                name: owned(form.proname.data.as_ptr()).unwrap_or_default(),
                namespace: form.pronamespace,
                owner: form.proowner,
                kind: form.prokind as u8,
                variadic: form.provariadic,
                argument_types: form.proargtypes.values.as_slice(arguments).to_vec(),
            }
        })
    }
}

/// The function a `regprocedure` text names (`schema.name(type, …)`), as `to_regprocedure()`
/// finds it on the current search path; `None` if there is none.
pub fn function_named(signature: &str) -> Option<pg_sys::Oid> {
    use pgrx::IntoDatum;
    // SAFETY: to_regprocedure takes a text and returns NULL (handled) for a function that does
    // not exist or a signature that does not parse; it raises for nothing else.
    unsafe { pgrx::direct_function_call::<pg_sys::Oid>(pg_sys::to_regprocedure, &[signature.into_datum()]) }
}

/// The extension's OID, if it is created in this database.
pub fn extension(name: &CStr) -> Option<pg_sys::Oid> {
    // SAFETY: an index scan of pg_extension (missing_ok).
    let oid = unsafe { pg_sys::get_extension_oid(name.as_ptr(), true) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// pg_depend's index on (refclassid, refobjid, refobjsubid), and the columns a scan of it reads.
/// Fixed since PostgreSQL 8; pgrx has no binding of `catalog/pg_depend.h`.
const DEPEND_REFERENCE_INDEX: pg_sys::Oid = pg_sys::Oid::from_u32(2674);
const DEPEND_RELATION: pg_sys::Oid = pg_sys::Oid::from_u32(2608);
const DEPEND_CLASSID: usize = 0;
const DEPEND_OBJID: usize = 1;
const DEPEND_REFCLASSID: pg_sys::AttrNumber = 4;
const DEPEND_REFOBJID: pg_sys::AttrNumber = 5;
const DEPEND_DEPTYPE: usize = 6;
const DEPEND_COLUMNS: usize = 7;

/// The ordinary table named `name` that is a member of extension `extension` (`pg_depend`,
/// `deptype = 'e'`): found as the extension's object, never by its name on a schema, where
/// anyone with CREATE on the schema could have put a look-alike.
pub fn extension_table(extension: pg_sys::Oid, name: &str) -> Option<pg_sys::Oid> {
    let mut found = None;
    // SAFETY: an index scan of pg_depend under the catalog snapshot, as PostgreSQL's own
    // dependency code scans it; each tuple is deformed with the catalog's own descriptor and read
    // only while the scan holds it; the scan and the catalog are closed before returning.
    unsafe {
        let depend = pg_sys::table_open(DEPEND_RELATION, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let mut keys: [pg_sys::ScanKeyData; 2] = std::mem::zeroed();
        for (key, (column, value)) in
            keys.iter_mut().zip([(DEPEND_REFCLASSID, pg_sys::ExtensionRelationId), (DEPEND_REFOBJID, extension)])
        {
            pg_sys::ScanKeyInit(
                key,
                column,
                pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                pg_sys::RegProcedure::from(pg_sys::F_OIDEQ),
                pg_sys::Datum::from(value),
            );
        }
        let scan = pg_sys::systable_beginscan(
            depend,
            DEPEND_REFERENCE_INDEX,
            true,
            std::ptr::null_mut(),
            2,
            keys.as_mut_ptr(),
        );
        let descriptor = (*depend).rd_att;
        let mut values = [pg_sys::Datum::from(0); DEPEND_COLUMNS];
        let mut nulls = [false; DEPEND_COLUMNS];
        loop {
            let tuple = pg_sys::systable_getnext(scan);
            if tuple.is_null() {
                break;
            }
            pg_sys::heap_deform_tuple(tuple, descriptor, values.as_mut_ptr(), nulls.as_mut_ptr());
            let class = pg_sys::Oid::from(values[DEPEND_CLASSID].value() as u32);
            let object = pg_sys::Oid::from(values[DEPEND_OBJID].value() as u32);
            let kind = values[DEPEND_DEPTYPE].value() as u8;
            if class != pg_sys::RelationRelationId || kind != pg_sys::DependencyType::DEPENDENCY_EXTENSION as u8 {
                continue;
            }
            let is_table = pg_sys::get_rel_relkind(object) as u8 == pg_sys::RELKIND_RELATION;
            if is_table && owned(pg_sys::get_rel_name(object)).as_deref() == Some(name) {
                found = Some(object);
                break;
            }
        }
        pg_sys::systable_endscan(scan);
        pg_sys::table_close(depend, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    }
    found
}
