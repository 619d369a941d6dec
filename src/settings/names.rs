//! The settings' names (`wsusage.table`, `wsusage.id_column`, `wsusage.timestamp_column`) in SQL
//! identifier syntax, as `search_path` is written: unquoted names are folded to lower case,
//! double-quoted ones are taken as written (`""` is a quote), and the table may be
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
        self.0.iter().map(|part| quote(part)).collect::<Vec<_>>().join(".")
    }

    /// A table's schema and name, the schema `schema` when it names none.
    pub fn schema_and_name<'a>(&'a self, schema: &'a str) -> (&'a str, &'a str) {
        match self.0.as_slice() {
            [schema, name] => (schema, name),
            _ => (schema, self.last()),
        }
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

/// The settings' target (`default`), parsed.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Target {
    pub table: Name,
    pub id_column: Name,
    pub timestamp_column: Name,
}

/// `name` as a double-quoted SQL identifier.
pub fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
