//! The table the worker writes: which one (`wsusage.table`, `wsusage.id_column`,
//! `wsusage.timestamp_column`), how its names reach SQL, and whether it fits.
//!
//! The settings use SQL identifier syntax, as `search_path` does: unquoted names are folded to
//! lower case, double-quoted ones are taken as written (`""` is a quote), and the table may be
//! schema-qualified (`"My Schema"."usage.log"`). Whatever they hold reaches SQL only as a
//! double-quoted identifier built here, never as raw text: a value such as
//! `workspaces; DROP TABLE x` is a syntax error, and `"workspaces; DROP TABLE x"` merely names a
//! table that does not exist.

use pgrx::pg_sys;

/// A parsed name: one part (column, or table on the search path) or two (schema, table).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Name(Vec<String>);

impl Name {
    /// The name as SQL text, every part double-quoted.
    pub fn quoted(&self) -> String {
        self.0.iter().map(|part| format!("\"{}\"", part.replace('"', "\"\""))).collect::<Vec<_>>().join(".")
    }

    pub fn last(&self) -> &str {
        self.0.last().map(String::as_str).unwrap_or_default()
    }
}

/// Parse `value` as PostgreSQL parses a possibly qualified identifier, allowing at most
/// `max_parts` parts. The error is a detail sentence for the user.
pub fn parse(value: &str, max_parts: usize) -> Result<Name, String> {
    let mut parts = Vec::new();
    let mut chars = value.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut part = String::new();
        if chars.next_if_eq(&'"').is_some() {
            loop {
                match chars.next() {
                    None => return Err("A double-quoted name is not closed.".into()),
                    Some('"') if chars.next_if_eq(&'"').is_some() => part.push('"'),
                    Some('"') => break,
                    Some(c) => part.push(c),
                }
            }
            if part.is_empty() {
                return Err("A double-quoted name is empty.".into());
            }
        } else {
            while let Some(c) = chars.next_if(|c| *c != '.' && *c != '"' && !c.is_whitespace()) {
                part.push(c.to_ascii_lowercase());
            }
            if part.is_empty() {
                return Err("A name is missing; write it as name or schema.name.".into());
            }
        }
        if part.len() >= pg_sys::NAMEDATALEN as usize {
            return Err(format!("The name \"{part}\" is longer than 63 bytes."));
        }
        parts.push(part);
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        match chars.next() {
            None => break,
            Some('.') => continue,
            Some(c) => {
                return Err(format!(
                    "Unexpected \"{c}\" after the name \"{}\"; quote a name that contains it.",
                    parts.last().map(String::as_str).unwrap_or_default()
                ))
            }
        }
    }
    if parts.len() > max_parts {
        return Err(if max_parts == 1 {
            "A column name cannot be qualified.".into()
        } else {
            "Write the table as name or schema.name.".into()
        });
    }
    Ok(Name(parts))
}

/// The configured target, parsed.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Target {
    pub table: Name,
    pub id_column: Name,
    pub timestamp_column: Name,
}

impl Target {
    /// The statement a flush chunk runs first: each id's own time, never backwards. It locks
    /// rows in whatever order its join returns them, so it must not wait on a row lock: it runs
    /// with a lock timeout of a few milliseconds, and should a row be locked by another
    /// transaction, the chunk is run again with [`Target::skip_locked_sql`].
    pub fn update_sql(&self) -> String {
        let (table, id, ts) = (self.table.quoted(), self.id_column.quoted(), self.timestamp_column.quoted());
        format!(
            "UPDATE {table} AS t SET {ts} = v.marked_at \
             FROM unnest($1::uuid[], $2::timestamptz[]) AS v(id, marked_at) \
             WHERE t.{id} = v.id AND (t.{ts} IS NULL OR t.{ts} < v.marked_at)"
        )
    }

    /// Counts the ids of $1 that have no row; run only when a chunk updated fewer rows than ids.
    pub fn without_row_sql(&self) -> String {
        let (table, id) = (self.table.quoted(), self.id_column.quoted());
        format!("SELECT count(*) FROM unnest($1::uuid[]) AS v(id) WHERE NOT EXISTS (SELECT FROM {table} AS t WHERE t.{id} = v.id)")
    }

    /// The chunk's statement when a row of it is locked: it locks the chunk's rows in id order,
    /// skipping those another transaction holds (`FOR UPDATE SKIP LOCKED`: an application's row
    /// lock delays only its own row, which stays pending), writes each locked row its own mark
    /// time where that is newer, and returns one row: the rows it updated, the ids whose row it
    /// skipped because locked, and how many ids it did not lock (skipped, or without a row).
    /// Locking in id order, as an application updating several workspaces by id does, keeps the
    /// two from deadlocking. Rows are matched by id, never by a tuple address: under READ
    /// COMMITTED, the UPDATE then finds the row's newest version, whoever committed it. The lock
    /// pass costs about two-thirds of the plain UPDATE again (a lock record per row, a second
    /// lookup), which is why it is not the first statement.
    pub fn skip_locked_sql(&self) -> String {
        let (table, id, ts) = (self.table.quoted(), self.id_column.quoted(), self.timestamp_column.quoted());
        format!(
            "WITH v AS (SELECT * FROM unnest($1::uuid[], $2::timestamptz[]) AS v(id, marked_at)), \
             locked AS MATERIALIZED ( \
                 SELECT v.id, v.marked_at FROM {table} AS t JOIN v ON t.{id} = v.id \
                  ORDER BY v.id FOR UPDATE OF t SKIP LOCKED), \
             updated AS ( \
                 UPDATE {table} AS t SET {ts} = l.marked_at FROM locked AS l \
                  WHERE t.{id} = l.id AND (t.{ts} IS NULL OR t.{ts} < l.marked_at) \
                 RETURNING 1) \
             SELECT (SELECT count(*) FROM updated), \
                    ARRAY(SELECT v.id FROM v WHERE NOT EXISTS (SELECT FROM locked AS l WHERE l.id = v.id) \
                                             AND EXISTS (SELECT FROM {table} AS t WHERE t.{id} = v.id)), \
                    (SELECT count(*) FROM v WHERE NOT EXISTS (SELECT FROM locked AS l WHERE l.id = v.id))"
        )
    }

    /// One row (SQLSTATE, message) saying what is wrong with the target, worded as PostgreSQL
    /// words the same error, or no row when it fits: the table exists, the id column is `uuid`,
    /// the timestamp column `timestamptz` or `timestamp`. Parameters: $1 the quoted table name,
    /// $2 the id column, $3 the timestamp column.
    pub const CHECK_SQL: &'static std::ffi::CStr = c"
        WITH rel AS (SELECT to_regclass($1) AS oid),
        col AS (
            SELECT c.role, c.want, a.atttypid
              FROM (VALUES ('id', $2), ('timestamp', $3)) AS c(role, want)
              LEFT JOIN pg_attribute AS a
                ON a.attrelid = (SELECT oid FROM rel) AND a.attname = c.want AND a.attnum > 0
               AND NOT a.attisdropped)
        SELECT '42P01', format('relation %s does not exist', $1) FROM rel WHERE oid IS NULL
        UNION ALL
        SELECT '42703', format('column \"%s\" of relation %s does not exist', col.want, $1)
          FROM rel, col WHERE rel.oid IS NOT NULL AND col.atttypid IS NULL
        UNION ALL
        SELECT '42804', format('column \"%s\" of relation %s has type %s, but wsusage needs uuid',
                               col.want, $1, format_type(col.atttypid, NULL))
          FROM rel, col WHERE col.role = 'id' AND col.atttypid <> 'uuid'::regtype
        UNION ALL
        SELECT '42804', format('column \"%s\" of relation %s has type %s, but wsusage needs timestamptz or timestamp',
                               col.want, $1, format_type(col.atttypid, NULL))
          FROM rel, col WHERE col.role = 'timestamp'
           AND col.atttypid NOT IN ('timestamptz'::regtype, 'timestamp'::regtype)
        LIMIT 1";
}
