//! Reading targets' definitions from the catalogs (see `target`): every target of the database
//! for a flush round, one target for a backend's first mark of it. Runs in a transaction.

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::SpiTupleTable;

use crate::nest_level::NestLevel;
use crate::settings;
use crate::target::{AfterFlush, Definition, Relation};

/// The schema of the settings' table when `wsusage.table` names none. Not the search path: the
/// worker and every marking backend must find the same table whatever their own search paths,
/// or a role could pass the privilege check on a table of its own of that name.
const DEFAULT_SCHEMA: &str = "public";

/// The search path of the catalog query: PostgreSQL's own functions and operators only. The
/// query runs as the bootstrap superuser in marking backends (see `resolve`), whose own search
/// path a role sets: a function of its own there must never run in it.
const QUERY_SEARCH_PATH: &str = "pg_catalog, pg_temp";

/// What the catalogs say of the database's targets.
pub struct Catalog {
    pub definitions: Vec<Definition>,
    /// The OID of `wsusage_target`: none before the extension's update to 0.3.0, or without the
    /// extension.
    pub targets_table: Option<pg_sys::Oid>,
    /// The extension is created in the database.
    pub extension: bool,
}

/// The definitions of the database's targets (`only`: of that one), with whether `role` may
/// make the UPDATE a mark defers. Raises an ERROR when the catalogs cannot be read. Inside a
/// transaction; the caller reads `wsusage_target` with the privileges it has.
pub fn read(only: Option<&str>, role: pg_sys::Oid) -> Catalog {
    // SAFETY: inside the caller's transaction; the level is popped below, nothing else opened
    // within it.
    let level = unsafe {
        let level = NestLevel::open();
        level.set(c"search_path", QUERY_SEARCH_PATH);
        level
    };
    let read = read_under_fixed_search_path(only, role);
    // SAFETY: as above; restores the caller's search path.
    unsafe { level.pop() };
    read
}

fn read_under_fixed_search_path(only: Option<&str>, role: pg_sys::Oid) -> Catalog {
    let (table, id_column, timestamp_column, table_as_written) = match settings::target() {
        Ok(target) => (
            Some(target.table.quoted_in(DEFAULT_SCHEMA)),
            Some(target.id_column.last().to_owned()),
            Some(target.timestamp_column.last().to_owned()),
            Some(target.table.quoted()),
        ),
        // The check hooks keep invalid names out: this reads as a table that does not exist.
        Err(_) => (None, None, None, None),
    };
    Spi::connect(|client| {
        // `wsusage_target` is the extension's own table, found as a member of the extension,
        // never by its name: this reads it with more privilege than whoever could plant a table
        // or view of that name (in the extension's schema before ALTER EXTENSION UPDATE to 0.3.0
        // creates the real one, say), whose functions would then run with that privilege. Until
        // it exists, the settings' target is the only one.
        let found = match client.select(
            "SELECT CASE WHEN t.oid IS NOT NULL THEN format('%I.%I', t.nspname, t.relname) END, t.oid \
               FROM pg_extension AS e \
               LEFT JOIN LATERAL ( \
                   SELECT c.oid, n.nspname, c.relname \
                     FROM pg_depend AS d \
                     JOIN pg_class AS c ON c.oid = d.objid \
                     JOIN pg_namespace AS n ON n.oid = c.relnamespace \
                    WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = e.oid AND d.deptype = 'e' \
                      AND d.classid = 'pg_class'::regclass AND c.relname = 'wsusage_target' AND c.relkind = 'r' \
               ) AS t ON true \
              WHERE e.extname = 'wsusage'",
            Some(1),
            &[],
        ) {
            Ok(rows) if !rows.is_empty() => {
                let row = rows.first();
                let table = row.get::<pg_sys::Oid>(2).ok().flatten();
                Some((table.and(row.get::<String>(1).ok().flatten()), table))
            }
            Ok(_) => None,
            Err(e) => error!("could not read the wsusage extension's schema: {e}"),
        };
        let extension = found.is_some();
        let (targets, targets_table) = found.unwrap_or_default();
        let sql = crate::target::definitions_sql(targets.as_deref());
        let args: [DatumWithOid; 7] = [
            table.clone().into(),
            id_column.clone().into(),
            timestamp_column.clone().into(),
            role.into(),
            only.map(str::to_owned).into(),
            table_as_written.clone().into(),
            settings::role().into(),
        ];
        match client.select(sql.as_str(), None, &args) {
            Ok(rows) => Catalog { definitions: definitions_of(rows), targets_table, extension },
            Err(e) => error!("could not read the wsusage targets: {e}"),
        }
    })
}

fn definitions_of(rows: SpiTupleTable<'_>) -> Vec<Definition> {
    rows.map(|row| {
        let text = |n| row.get::<String>(n).ok().flatten();
        let oid = |n| row.get::<pg_sys::Oid>(n).ok().flatten();
        let flag = |n| row.get::<bool>(n).ok().flatten();
        Definition {
            name: text(1).unwrap_or_default(),
            relation: oid(2).map(|relid| Relation {
                oid: relid,
                display: text(3).unwrap_or_default(),
                schema: text(21).unwrap_or_default(),
                name: text(22).unwrap_or_default(),
                runs_as: oid(24).unwrap_or(pg_sys::InvalidOid),
            }),
            relation_text: text(4).unwrap_or_default(),
            id_column: text(5).unwrap_or_default(),
            timestamp_column: text(6).unwrap_or_default(),
            id_type: oid(7)
                .zip(text(8))
                .map(|(oid, name)| (oid, name, self::oid_or_invalid(row.get(9).ok().flatten()))),
            timestamp_type: oid(10).zip(text(11)),
            min_change: (text(12).unwrap_or_else(|| "0".into()), flag(13).unwrap_or(false)),
            after_flush: text(14).map(|signature| AfterFlush {
                signature,
                call: text(15),
                function: oid(25),
                fits: flag(16).unwrap_or(false),
                owner: (text(20).unwrap_or_default(), flag(19).unwrap_or(false)),
                runs_as: text(23).unwrap_or_default(),
            }),
            may_update: flag(17),
            from_settings: flag(18).unwrap_or(false),
        }
    })
    .collect()
}

fn oid_or_invalid(oid: Option<pg_sys::Oid>) -> pg_sys::Oid {
    oid.unwrap_or(pg_sys::InvalidOid)
}
