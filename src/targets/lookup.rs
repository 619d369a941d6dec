//! Reading targets' definitions (see `definition`): every target of the database for a flush round,
//! one target for a backend's first mark of it (its row possibly taken from shared memory, see
//! `published`) and for the check of a row as it is written.
//!
//! Read without SQL: `wsusage_target` found through `pg_depend`'s index and read with a scan of its
//! own (a handful of rows), everything else through the system caches (see `catalog`). A new backend pays for no plan, and nothing here
//! depends on anyone's search path but the `after_flush` signature's lookup, which runs under
//! `pg_catalog, pg_temp`. Runs in a transaction; reads regardless of the current role's
//! privileges (`wsusage_target` is readable by its owner and `pg_monitor` only, while the roles
//! that mark need not read it), so callers decide what a role may learn.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{FromDatum, PgLogLevel};

use crate::settings;
use crate::settings::nest_level::NestLevel;
use crate::targets::catalog;
use crate::targets::definition::{AfterFlush, ColumnType, Definition, Hints, MinChange, Relation};

/// The schema of the settings' table when `wsusage.table` names none. Not the search path: the
/// worker and every marking backend must find the same table whatever their own search paths,
/// or a role could pass the privilege check on a table of its own of that name.
const DEFAULT_SCHEMA: &str = "public";

/// The search path an `after_flush` signature is looked up on: it is stored qualified (its
/// trigger writes it so), and its argument types are PostgreSQL's own.
const SIGNATURE_SEARCH_PATH: &str = "pg_catalog, pg_temp";

/// What the catalogs say of the database's targets.
pub struct Catalog {
    pub definitions: Vec<Definition>,
    /// The OID of `wsusage_target`: none before the extension's update to 0.3.0, or without the
    /// extension.
    pub targets_table: Option<pg_sys::Oid>,
    /// The extension is created in the database.
    pub extension: bool,
}

/// A target as declared: a row of `wsusage_target`, or the settings' `default`.
pub struct Declared {
    pub name: String,
    /// The table's OID as declared; it may name a table dropped since.
    pub relation: Option<pg_sys::Oid>,
    /// The table as messages name it when it does not exist.
    pub relation_text: String,
    pub id_column: String,
    pub timestamp_column: String,
    pub min_change: MinChange,
    pub after_flush: Option<String>,
    pub from_settings: bool,
    /// Where its table's columns were found before, if known (see [`Hints`]).
    pub hints: Hints,
}

/// What `wsusage_target` declares: the rows read, and where they were read from.
pub struct Declarations {
    pub rows: Vec<Declared>,
    pub targets_table: Option<pg_sys::Oid>,
    pub extension: bool,
    /// Where the settings' table and columns were found before, if known.
    pub settings_hints: Hints,
}

/// The definitions of the database's targets (`only`: of that one), with whether `role` may
/// make the UPDATE a mark defers. Inside a transaction; raises an ERROR when `wsusage_target`
/// cannot be read.
pub fn read(only: Option<&str>, role: pg_sys::Oid) -> Catalog {
    describe_declarations(declarations(only), only, role)
}

/// The rows of `wsusage_target` (`only`: the row of that name). Inside a transaction.
pub fn declarations(only: Option<&str>) -> Declarations {
    let extension = catalog::extension(c"wsusage");
    // `wsusage_target` is the extension's own table, found as a member of the extension, never
    // by its name: whoever could plant a table or view of that name (in the extension's schema
    // before ALTER EXTENSION UPDATE to 0.3.0 creates the real one, say) would otherwise decide
    // what is written where. Until it exists, the settings' target is the only one.
    let targets_table = extension.and_then(|extension| catalog::extension_table(extension, "wsusage_target"));
    let rows = targets_table.map(|table| declared_rows(table, only)).unwrap_or_default();
    Declarations { rows, targets_table, extension: extension.is_some(), settings_hints: Hints::default() }
}

/// The definitions of what `declarations` declare, with the settings' `default` unless a row
/// has that name (`only`: of that one target), and `role`'s privilege of the UPDATE a mark
/// defers. Inside a transaction.
pub fn describe_declarations(declarations: Declarations, only: Option<&str>, role: pg_sys::Oid) -> Catalog {
    let Declarations { rows: mut declared, targets_table, extension, settings_hints } = declarations;
    if !declared.iter().any(|row| row.name == "default") && only.is_none_or(|name| name == "default") {
        declared.extend(from_settings(settings_hints));
    }
    declared.sort_by(|a, b| a.name.cmp(&b.name));
    let runner_setting = settings::role();
    let runner_setting = runner_setting.as_deref().map(|name| (name, catalog::role_named(name)));
    let describe_all = || declared.iter().map(|row| describe(row, role, runner_setting)).collect();
    let definitions = if declared.iter().any(|row| row.after_flush.is_some()) {
        // SAFETY: inside the caller's transaction; the level is popped below, nothing else
        // opened within it.
        let level = unsafe {
            let level = NestLevel::open();
            level.set(c"search_path", SIGNATURE_SEARCH_PATH);
            level
        };
        let definitions = describe_all();
        // SAFETY: as above; restores the caller's search path.
        unsafe { level.pop() };
        definitions
    } else {
        describe_all()
    };
    Catalog { definitions, targets_table, extension }
}

/// The settings' `default` target; none while the settings do not parse (their check hooks keep
/// invalid names out, so this reads as a table that does not exist).
fn from_settings(hints: Hints) -> Option<Declared> {
    let target = settings::target().ok()?;
    let (schema, table) = target.table.schema_and_name(DEFAULT_SCHEMA);
    let hinted = hints.relation.filter(|&oid| catalog::relation_is_named(oid, schema, table));
    Some(Declared {
        name: "default".into(),
        relation: hinted.or_else(|| catalog::relation_named(schema, table)),
        relation_text: target.table.quoted(),
        id_column: target.id_column.last().to_owned(),
        timestamp_column: target.timestamp_column.last().to_owned(),
        min_change: MinChange::zero(),
        after_flush: None,
        from_settings: true,
        hints,
    })
}

/// The columns of `wsusage_target` read here, with their types; each is found by name in the
/// table's descriptor (see [`column_positions`]) and read as its index here.
const NAME: usize = 0;
const RELATION: usize = 1;
const ID_COLUMN: usize = 2;
const TIMESTAMP_COLUMN: usize = 3;
const MIN_CHANGE: usize = 4;
const AFTER_FLUSH: usize = 5;
const COLUMNS: [(&CStr, pg_sys::Oid); 6] = [
    (c"name", pg_sys::TEXTOID),
    (c"relation", pg_sys::REGCLASSOID),
    (c"id_column", pg_sys::NAMEOID),
    (c"timestamp_column", pg_sys::NAMEOID),
    (c"min_change", pg_sys::INTERVALOID),
    (c"after_flush", pg_sys::TEXTOID),
];

/// The rows of `wsusage_target` (`only`: the row of that name), read with a snapshot taken now.
fn declared_rows(table: pg_sys::Oid, only: Option<&str>) -> Vec<Declared> {
    let mut rows = Vec::new();
    // SAFETY: the table is opened and locked as a query would, scanned under a registered
    // snapshot, and closed; each tuple is deformed with the table's own descriptor, and its
    // values (checked to be of the types named in COLUMNS) are copied out while the scan holds
    // the tuple.
    unsafe {
        let relation = pg_sys::table_open(table, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let descriptor = (*relation).rd_att;
        let positions = column_positions(descriptor);
        let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
        let scan = pg_sys::systable_beginscan(relation, pg_sys::InvalidOid, false, snapshot, 0, std::ptr::null_mut());
        let width = usize::try_from((*descriptor).natts).unwrap_or(0);
        let (mut values, mut nulls) = (vec![pg_sys::Datum::from(0); width], vec![true; width]);
        loop {
            let tuple = pg_sys::systable_getnext(scan);
            if tuple.is_null() {
                break;
            }
            pg_sys::heap_deform_tuple(tuple, descriptor, values.as_mut_ptr(), nulls.as_mut_ptr());
            let value = |column: usize| {
                let at = positions[column];
                (!nulls[at]).then_some(values[at])
            };
            let Some(name) = value(NAME).and_then(|datum| String::from_datum(datum, false)) else { continue };
            if only.is_some_and(|only| only != name) {
                continue;
            }
            let relation = value(RELATION).map(|datum| pg_sys::Oid::from(datum.value() as u32));
            let name_text = |column| {
                value(column)
                    .map(|datum| {
                        CStr::from_ptr(datum.cast_mut_ptr::<std::ffi::c_char>()).to_string_lossy().into_owned()
                    })
                    .unwrap_or_default()
            };
            rows.push(Declared {
                name,
                relation,
                // regclass prints a dropped table's OID as a number.
                relation_text: relation.map(|oid| oid.to_u32().to_string()).unwrap_or_default(),
                id_column: name_text(ID_COLUMN),
                timestamp_column: name_text(TIMESTAMP_COLUMN),
                min_change: value(MIN_CHANGE).map(|datum| interval(datum)).unwrap_or_else(MinChange::zero),
                after_flush: value(AFTER_FLUSH).and_then(|datum| String::from_datum(datum, false)),
                from_settings: false,
                hints: Hints::default(),
            });
        }
        pg_sys::systable_endscan(scan);
        pg_sys::UnregisterSnapshot(snapshot);
        pg_sys::table_close(relation, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    }
    rows
}

/// Where each of [`COLUMNS`] is in `wsusage_target`'s descriptor; raises when one is missing or
/// of another type, which only a table altered by hand can be.
///
/// # Safety
/// `descriptor` is an open relation's.
unsafe fn column_positions(descriptor: pg_sys::TupleDesc) -> [usize; 6] {
    // SAFETY: the caller's promise; the wrapper neither frees nor outlives the descriptor.
    let attributes = unsafe { pgrx::PgTupleDesc::from_pg_unchecked(descriptor) };
    COLUMNS.map(|(name, type_oid)| {
        let found = attributes.iter().position(|attribute| {
            // SAFETY: attname is a NUL-terminated NameData.
            !attribute.attisdropped && unsafe { CStr::from_ptr(attribute.attname.data.as_ptr()) } == name
        });
        match found {
            Some(at) if attributes.get(at).is_some_and(|attribute| attribute.atttypid == type_oid) => at,
            _ => {
                ErrorReport::new(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!(
                        "table wsusage_target has no column \"{}\" of the type wsusage reads",
                        name.to_string_lossy()
                    ),
                    "lookup::read",
                )
                .set_hint("The table was altered by hand: restore the column, or drop and create the extension.")
                .report(PgLogLevel::ERROR);
                unreachable!("an ERROR report does not return")
            }
        }
    })
}

/// A `min_change` interval as text, and whether it is more than zero (compared as PostgreSQL compares
/// intervals: a month is 30 days, a day 24 hours).
///
/// # Safety
/// `datum` is an `interval` value.
unsafe fn interval(datum: pg_sys::Datum) -> MinChange {
    // SAFETY: the caller's promise: a pointer to a 16-byte Interval; interval_out takes it.
    unsafe {
        let value = &*datum.cast_mut_ptr::<pg_sys::Interval>();
        const DAY: i128 = 86_400_000_000;
        let span = i128::from(value.time) + i128::from(value.day) * DAY + i128::from(value.month) * 30 * DAY;
        let text = pgrx::direct_function_call::<&CStr>(pg_sys::interval_out, &[Some(datum)])
            .map(|text| text.to_string_lossy().into_owned())
            .unwrap_or_default();
        MinChange { text, positive: span > 0 }
    }
}

/// A declared target as the catalogs describe it now, with `role`'s privilege of the UPDATE a
/// mark defers. `runner_setting`: `wsusage.role`, and its OID if the role exists.
fn describe(row: &Declared, role: pg_sys::Oid, runner_setting: Option<(&str, Option<pg_sys::Oid>)>) -> Definition {
    let table = row.relation.and_then(|oid| catalog::relation(oid).map(|table| (oid, table)));
    let column = |name: &str, hint: Option<pg_sys::AttrNumber>| {
        let (oid, _) = table.as_ref()?;
        hint.and_then(|number| catalog::column_at(*oid, number, name)).or_else(|| catalog::column(*oid, name))
    };
    let id_column = column(&row.id_column, row.hints.id_column);
    let timestamp_column = column(&row.timestamp_column, row.hints.timestamp_column);
    let runner = match runner_setting {
        Some((_, oid)) => oid,
        None => table.as_ref().map(|(_, table)| table.owner),
    };
    let runs_as = match runner_setting {
        Some((name, _)) => name.to_owned(),
        None => runner.map(catalog::role_name).unwrap_or_default(),
    };
    let id_array = id_column.map(|(_, type_oid)| catalog::array_type(type_oid));
    // What `SELECT timestamp FROM table WHERE id = …` needs; with the UPDATE, what the UPDATE a
    // mark defers needs. A read sees every key's pending mark, so it is refused where row-level
    // security would hide some rows from the role; the flush applies the table's policies to its
    // own UPDATE (see `flush::run_as`).
    let may_select = table.as_ref().zip(id_column.zip(timestamp_column)).map(|((oid, table), (id, timestamp))| {
        catalog::may_use_schema(role, table.namespace)
            && catalog::may_use_column(role, *oid, timestamp.0, pg_sys::ACL_SELECT)
            && catalog::may_use_column(role, *oid, id.0, pg_sys::ACL_SELECT)
    });
    let may_read = may_select
        .map(|may_select| may_select && table.as_ref().is_some_and(|(oid, _)| !catalog::rows_filtered_for(role, *oid)));
    let may_update = may_select.map(|may_select| {
        may_select
            && table.as_ref().zip(timestamp_column).is_some_and(|((oid, _), timestamp)| {
                catalog::may_use_column(role, *oid, timestamp.0, pg_sys::ACL_UPDATE)
            })
    });
    let after_flush = row.after_flush.as_ref().map(|signature| {
        let function = catalog::function_named(signature).and_then(|oid| catalog::function(oid).map(|f| (oid, f)));
        AfterFlush {
            signature: signature.clone(),
            call: function.as_ref().map(|(_, f)| {
                catalog::qualified_name(&catalog::namespace_name(f.namespace).unwrap_or_default(), &f.name)
            }),
            function: function.as_ref().map(|(oid, _)| *oid),
            fits: function.as_ref().is_some_and(|(_, f)| {
                f.kind == pg_sys::PROKIND_FUNCTION
                    && f.variadic == pg_sys::InvalidOid
                    && id_array.is_some_and(|array| f.argument_types == [array, pg_sys::TIMESTAMPTZARRAYOID])
            }),
            owner: match &function {
                Some((_, f)) => (
                    catalog::role_name(f.owner),
                    runner.is_some_and(|runner| catalog::has_privileges_of(f.owner, runner)),
                ),
                None => (String::new(), false),
            },
            runs_as: runs_as.clone(),
        }
    });
    let relation_oid = table.as_ref().map(|(oid, _)| *oid);
    let relation = table.as_ref().map(|(oid, table)| {
        let schema = catalog::namespace_name(table.namespace).unwrap_or_default();
        Relation {
            oid: *oid,
            display: catalog::qualified_name(&schema, &table.name),
            schema,
            name: table.name.clone(),
            runs_as: runner.unwrap_or(pg_sys::InvalidOid),
        }
    });
    let relation_text = match &relation {
        Some(relation) if !row.from_settings => format!("\"{}\"", relation.name.replace('"', "\"\"")),
        _ => row.relation_text.clone(),
    };
    Definition {
        name: row.name.clone(),
        relation,
        relation_text,
        id_column: row.id_column.clone(),
        timestamp_column: row.timestamp_column.clone(),
        id_type: id_column.map(|(_, oid)| ColumnType {
            oid,
            name: catalog::type_name(oid),
            array: id_array.unwrap_or_default(),
        }),
        timestamp_type: timestamp_column.map(|(_, oid)| ColumnType {
            oid,
            name: catalog::type_name(oid),
            array: pg_sys::InvalidOid,
        }),
        min_change: row.min_change.clone(),
        after_flush,
        may_update,
        may_read,
        from_settings: row.from_settings,
        found: Hints {
            relation: row.from_settings.then_some(relation_oid).flatten(),
            id_column: id_column.map(|(number, _)| number),
            timestamp_column: timestamp_column.map(|(number, _)| number),
        },
    }
}
