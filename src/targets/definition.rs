//! What a flush writes: a target's definition — a row of `wsusage_target`, or the `default`
//! target of the settings `wsusage.table`, `wsusage.id_column`, `wsusage.timestamp_column` — as
//! read from the catalogs, whether it fits, and the statements that write it.
//!
//! The settings' names are parsed as SQL identifiers (see `settings::names`) and reach SQL only
//! double-quoted. A `wsusage_target` row names its table by OID (`regclass`), so
//! renaming the table or its schema does not break it; the table reaches SQL as the schema and
//! name the catalogs give, each double-quoted here ([`Relation::sql`]).
//!
//! Every function, aggregate, operator and type the statements use is qualified with
//! `pg_catalog` (`pg_catalog.unnest`, `OPERATOR(pg_catalog.=)`, `pg_catalog.uuid[]`): they run
//! as the table's owner (see `run_as`) on the worker's search path, where a look-alike planted in
//! `public` would otherwise be called — an exact argument type beats pg_catalog's polymorphic
//! `unnest(anyarray)` wherever it stands on the path (CVE-2018-1058). The search path itself is
//! left alone, so that the owner's triggers find their own objects as in any session.

use pgrx::pg_sys;
use pgrx::pg_sys::errcodes::PgSqlErrorCode;

use crate::memory::key::Kind;
use crate::settings::names::quote;

/// A target as the catalogs describe it now. Fields are `None` where the catalogs have nothing
/// (a table or column dropped, a function gone): [`Definition::problem`] says what.
#[derive(Clone, PartialEq, Debug)]
pub struct Definition {
    pub name: String,
    pub relation: Option<Relation>,
    /// The table as messages name it: quoted, as the settings name it or as the catalog does.
    pub relation_text: String,
    pub id_column: String,
    pub timestamp_column: String,
    /// The id column's type.
    pub id_type: Option<ColumnType>,
    pub timestamp_type: Option<ColumnType>,
    pub min_change: MinChange,
    pub after_flush: Option<AfterFlush>,
    /// Whether the role asked about may run the UPDATE a mark defers: USAGE on the schema,
    /// UPDATE and SELECT on the timestamp column, SELECT on the id column.
    pub may_update: Option<bool>,
    /// Whether the role asked about may read the target's pending marks (`wsusage_pending_at`):
    /// what reading the column itself needs, USAGE on the schema, SELECT on the id and timestamp
    /// columns, and no row-level security filtering the table's rows for it.
    pub may_read: Option<bool>,

    /// Defined by the settings, not by a row of `wsusage_target`.
    pub from_settings: bool,
    /// Where its table and columns were found, for the next backend to look first (see
    /// `published`).
    pub found: Hints,
}

/// A column's type as the catalogs give it.
#[derive(Clone, PartialEq, Debug)]
pub struct ColumnType {
    pub oid: pg_sys::Oid,
    /// As `format_type` prints it, for messages.
    pub name: String,
    /// The type of an array of it (the key column's only: its keys reach SQL as one).
    pub array: pg_sys::Oid,
}

/// A target's `min_change`: the least a stored time must move before a flush rewrites it.
#[derive(Clone, PartialEq, Debug)]
pub struct MinChange {
    /// As `interval` prints it, for SQL (as a literal) and messages.
    pub text: String,
    /// Whether it is more than zero.
    pub positive: bool,
}

impl MinChange {
    pub fn zero() -> Self {
        MinChange { text: "00:00:00".into(), positive: false }
    }
}

/// Where a target's table and columns were last found, as published (see `published`): each
/// hint is checked against the catalogs before it is taken, and a wrong one is ignored. Found
/// by OID and column number, they come from caches PostgreSQL keeps in every backend's initial
/// state, where looking a table or column up by name first builds an index's cache entry: about
/// 15 of a new backend's 80 µs (bench/results/2026-12-07-first-mark.md).
#[derive(Clone, Copy, Default, PartialEq, Debug)]
pub struct Hints {
    /// The settings' table (a row names its table by OID).
    pub relation: Option<pg_sys::Oid>,
    pub id_column: Option<pg_sys::AttrNumber>,
    pub timestamp_column: Option<pg_sys::AttrNumber>,
}

/// A target's table as the catalogs name it.
#[derive(Clone, PartialEq, Debug, Default)]
pub struct Relation {
    pub oid: pg_sys::Oid,
    /// Its schema and name, unquoted.
    pub schema: String,
    pub name: String,
    /// Qualified and quoted where needed, as PostgreSQL prints it (`public.workspaces`).
    pub display: String,
    /// The role a flush of it runs as, as the catalogs were read: its owner, or `wsusage.role`.
    pub runs_as: pg_sys::Oid,
}

impl Relation {
    /// The table in SQL text: both parts always double-quoted, so that the text names exactly
    /// this schema and table (`run_as` checks it still does before each chunk).
    pub fn sql(&self) -> String {
        format!("{}.{}", quote(&self.schema), quote(&self.name))
    }
}

#[derive(Clone, PartialEq, Debug)]
pub struct AfterFlush {
    /// As `regprocedure` prints it, for messages.
    pub signature: String,
    /// Its name, quoted and qualified for SQL; `None` when the function no longer exists.
    pub call: Option<String>,
    /// Its OID, as the catalogs were read: a flush checks before each call that `call` still
    /// names this function (see `run_as`).
    pub function: Option<pg_sys::Oid>,
    /// Whether it takes (an array of the id type, timestamptz[]).
    pub fits: bool,
    /// Its owner, and whether that role has the privileges of the role the flush runs as (a
    /// superuser has every role's): the function runs with the flush's privileges, so a role
    /// lacking them must not decide what it does.
    pub owner: (String, bool),
    /// The role the flush runs as: the table's owner, or `wsusage.role`.
    pub runs_as: String,
}

/// What is wrong with a definition, worded as PostgreSQL words the same error.
pub struct Problem {
    pub sqlstate: PgSqlErrorCode,
    pub message: String,
    pub hint: String,
}

/// The problem of `wsusage.role` naming role `name`, which does not exist: every flush would fail.
pub fn missing_role(name: &str) -> Problem {
    Problem {
        sqlstate: PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        message: format!("role \"{name}\" named by \"wsusage.role\" does not exist"),
        hint: "Create the role and grant it SELECT and UPDATE on the tables, or change \"wsusage.role\" and restart the server."
            .into(),
    }
}

/// How a flush writes a timestamp column of each type.
fn timestamp_cast(timestamp_type: pg_sys::Oid) -> &'static str {
    match timestamp_type {
        pg_sys::TIMESTAMPOID => "::pg_catalog.timestamp",
        pg_sys::DATEOID => "::pg_catalog.date",
        _ => "",
    }
}

/// The chunk's keys (`$1`, an array of `keys`) and their mark times (`$2`) as rows `v(id,
/// marked_at)`. Written out as `ROWS FROM`, which is what the parser makes of `unnest($1, $2)`,
/// because only the unqualified name gets that rewrite, and every name here is qualified.
fn marks(keys: &str) -> String {
    format!(
        "ROWS FROM (pg_catalog.unnest($1::{keys}), pg_catalog.unnest($2::pg_catalog.timestamptz[])) AS v(id, marked_at)"
    )
}

/// SQL text as a string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

impl Definition {
    /// The kind of key marks of this target carry.
    pub fn kind(&self) -> Option<Kind> {
        match self.id_type.as_ref()?.oid {
            pg_sys::UUIDOID => Some(Kind::Uuid),
            pg_sys::INT8OID | pg_sys::INT4OID => Some(Kind::Bigint),
            _ => None,
        }
    }

    /// What keeps the target from being written, if anything.
    pub fn problem(&self) -> Option<Problem> {
        use PgSqlErrorCode::*;
        let problem = |sqlstate, message: String, hint: &str| Some(Problem { sqlstate, message, hint: hint.into() });
        let fix = if self.from_settings {
            "Fix the table, or set \"wsusage.table\", \"wsusage.id_column\" and \"wsusage.timestamp_column\" and reload."
        } else {
            "Fix the table, or change the target's row in wsusage_target."
        };
        let table = &self.relation_text;
        if self.relation.is_none() {
            return problem(ERRCODE_UNDEFINED_TABLE, format!("relation {table} does not exist"), fix);
        }
        let missing = |column: &str| {
            problem(
                ERRCODE_UNDEFINED_COLUMN,
                format!("column {} of relation {table} does not exist", quote(column)),
                fix,
            )
        };
        let Some(ColumnType { name: id_type_name, .. }) = &self.id_type else { return missing(&self.id_column) };
        if self.kind().is_none() {
            return problem(
                ERRCODE_DATATYPE_MISMATCH,
                format!(
                    "column {} of relation {table} has type {id_type_name}, but wsusage needs uuid, bigint or integer",
                    quote(&self.id_column)
                ),
                fix,
            );
        }
        let Some(ColumnType { oid: timestamp_type, name: timestamp_type_name, .. }) = &self.timestamp_type else {
            return missing(&self.timestamp_column);
        };
        if ![pg_sys::TIMESTAMPTZOID, pg_sys::TIMESTAMPOID, pg_sys::DATEOID].contains(timestamp_type) {
            return problem(
                ERRCODE_DATATYPE_MISMATCH,
                format!(
                    "column {} of relation {table} has type {timestamp_type_name}, but wsusage needs timestamptz, timestamp or date",
                    quote(&self.timestamp_column)
                ),
                fix,
            );
        }
        match &self.after_flush {
            Some(AfterFlush { signature, call: None, .. }) => problem(
                ERRCODE_UNDEFINED_FUNCTION,
                format!("function {signature} does not exist"),
                "Create the function again, or set after_flush of the target to NULL.",
            ),
            Some(AfterFlush { signature, fits: false, .. }) => problem(
                ERRCODE_UNDEFINED_FUNCTION,
                format!("function {signature} does not take ({id_type_name}[], timestamp with time zone[])"),
                "An after_flush function is a plain function taking the ids whose rows a chunk wrote and their mark times, as (ids <the id type>[], marked_at timestamptz[]).",
            ),
            Some(AfterFlush { owner: (_, false), runs_as, .. })
                if self.relation.as_ref().is_some_and(|relation| relation.runs_as == pg_sys::InvalidOid) =>
            {
                Some(missing_role(runs_as))
            }
            Some(AfterFlush { signature, owner: (owner, false), runs_as, .. }) => problem(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("function {signature} is owned by role \"{owner}\", which lacks the privileges of role \"{runs_as}\" that the target's flush runs as"),
                "An after_flush function runs with the privileges of the flush (the table's owner, or \"wsusage.role\"): let that role, a role with its privileges or a superuser own it (ALTER FUNCTION … OWNER TO).",
            ),
            _ => None,
        }
    }

    fn parts(&self) -> (String, String, String, &'static str, &'static str) {
        let table = self.relation.as_ref().map(Relation::sql).unwrap_or_default();
        let keys = match self.kind() {
            Some(Kind::Bigint) => "pg_catalog.int8[]",
            _ => "pg_catalog.uuid[]",
        };
        let cast = timestamp_cast(self.timestamp_type.as_ref().map_or(pg_sys::TIMESTAMPTZOID, |column| column.oid));
        (table, quote(&self.id_column), quote(&self.timestamp_column), keys, cast)
    }

    /// The row's condition for being written by a mark at `{marks}.marked_at`: never backwards,
    /// and only `min_change` after the stored value. A date column with a `min_change` is
    /// compared at the time, not the day, the change allows (a day of `1 day` is then every day).
    fn due(&self, marks: &str) -> String {
        let (_, _, ts, _, cast) = self.parts();
        let MinChange { text: min_change, positive } = &self.min_change;
        let threshold = if *positive {
            let cast =
                if cast == timestamp_cast(pg_sys::DATEOID) { timestamp_cast(pg_sys::TIMESTAMPOID) } else { cast };
            format!("({marks}.marked_at OPERATOR(pg_catalog.-) {}::pg_catalog.interval){cast}", literal(min_change))
        } else {
            format!("{marks}.marked_at{cast}")
        };
        format!("(t.{ts} IS NULL OR t.{ts} OPERATOR(pg_catalog.<) {threshold})")
    }

    /// Whether a row found but not written counts as skipped by `min_change` (a date column, or
    /// a positive `min_change`), rather than as already newer.
    pub fn skips_by_min_change(&self) -> bool {
        self.min_change.positive || self.timestamp_type.as_ref().is_some_and(|column| column.oid == pg_sys::DATEOID)
    }

    /// The statement a flush chunk runs first: each id's own time, never backwards. It locks
    /// rows in whatever order its join returns them, so it must not wait on a row lock: it runs
    /// with a lock timeout of a few milliseconds, and should a row be locked by another
    /// transaction, the chunk is run again with [`Definition::skip_locked_sql`]. With an
    /// `after_flush` function it returns one row: the count, and the ids written with their
    /// times, which the function is then called with.
    pub fn update_sql(&self) -> String {
        let (table, id, ts, keys, cast) = self.parts();
        let update = format!(
            "UPDATE {table} AS t SET {ts} = v.marked_at{cast} \
             FROM {marks} WHERE t.{id} OPERATOR(pg_catalog.=) v.id AND {}",
            self.due("v"),
            marks = marks(keys),
        );
        if self.after_flush.is_none() {
            return update;
        }
        format!(
            "WITH w AS ({update} RETURNING t.{id} AS id, v.marked_at) \
             SELECT pg_catalog.count(*), pg_catalog.array_agg(id ORDER BY id), \
                    pg_catalog.array_agg(marked_at ORDER BY id) FROM w"
        )
    }

    /// Counts the ids of $1 that have no row; run only when a chunk updated fewer rows than ids.
    pub fn without_row_sql(&self) -> String {
        let (table, id, _, keys, _) = self.parts();
        format!(
            "SELECT pg_catalog.count(*) FROM pg_catalog.unnest($1::{keys}) AS v(id) \
              WHERE NOT EXISTS (SELECT FROM {table} AS t WHERE t.{id} OPERATOR(pg_catalog.=) v.id)"
        )
    }

    /// The chunk's statement when a row of it is locked: it locks the chunk's rows in id order,
    /// skipping those another transaction holds (`FOR UPDATE SKIP LOCKED`: an application's row
    /// lock delays only its own row, which stays pending), writes each locked row its own mark
    /// time where that is due, and returns one row: the rows it updated, the ids whose row it
    /// skipped because locked, how many ids it did not lock (skipped, or without a row), and the
    /// ids written with their times (for `after_flush`). Locking in id order, as an application
    /// updating several rows by id does, keeps the two from deadlocking. Rows are matched by id,
    /// never by a tuple address: under READ COMMITTED, the UPDATE then finds the row's newest
    /// version, whoever committed it. The lock pass costs about two-thirds of the plain UPDATE
    /// again (a lock record per row, a second lookup), which is why it is not the first
    /// statement.
    pub fn skip_locked_sql(&self) -> String {
        let (table, id, ts, keys, cast) = self.parts();
        format!(
            "WITH v AS (SELECT * FROM {marks}), \
             locked AS MATERIALIZED ( \
                 SELECT v.id, v.marked_at FROM {table} AS t JOIN v ON t.{id} OPERATOR(pg_catalog.=) v.id \
                  ORDER BY v.id FOR UPDATE OF t SKIP LOCKED), \
             updated AS ( \
                 UPDATE {table} AS t SET {ts} = l.marked_at{cast} FROM locked AS l \
                  WHERE t.{id} OPERATOR(pg_catalog.=) l.id AND {due} \
                 RETURNING t.{id} AS id, l.marked_at) \
             SELECT (SELECT pg_catalog.count(*) FROM updated), \
                    ARRAY(SELECT v.id FROM v \
                           WHERE NOT EXISTS (SELECT FROM locked AS l WHERE l.id OPERATOR(pg_catalog.=) v.id) \
                             AND EXISTS (SELECT FROM {table} AS t WHERE t.{id} OPERATOR(pg_catalog.=) v.id)), \
                    (SELECT pg_catalog.count(*) FROM v \
                      WHERE NOT EXISTS (SELECT FROM locked AS l WHERE l.id OPERATOR(pg_catalog.=) v.id)), \
                    (SELECT pg_catalog.array_agg(id ORDER BY id) FROM updated), \
                    (SELECT pg_catalog.array_agg(marked_at ORDER BY id) FROM updated)",
            due = self.due("l"),
            marks = marks(keys),
        )
    }

    /// The call of the `after_flush` function, if any: $1 the ids written, $2 their times.
    pub fn after_flush_sql(&self) -> Option<String> {
        let call = self.after_flush.as_ref()?.call.as_ref()?;
        Some(format!("SELECT {call}($1, $2)"))
    }
}
