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

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(value: &str, max_parts: usize) -> Result<Vec<String>, String> {
        parse(value, max_parts).map(|name| name.0)
    }

    #[test]
    fn names_parse_as_postgresql_parses_identifiers() {
        assert_eq!(parts("workspaces", 2), Ok(vec!["workspaces".into()]));
        assert_eq!(parts(" Public . WorkSpaces ", 2), Ok(vec!["public".into(), "workspaces".into()]), "folded, spaces");
        assert_eq!(parts(r#""My Schema"."usage.log""#, 2), Ok(vec!["My Schema".into(), "usage.log".into()]));
        assert_eq!(parts(r#""say ""hi""""#, 1), Ok(vec![r#"say "hi""#.into()]), "a doubled quote is a quote");
        assert_eq!(parts(&"a".repeat(63), 1), Ok(vec!["a".repeat(63)]));
    }

    #[test]
    fn a_wrong_name_is_refused_with_a_sentence_saying_why() {
        for (value, max_parts, why) in [
            ("", 2, "A name is missing"),
            ("public.", 2, "A name is missing"),
            (r#""unclosed"#, 2, "is not closed"),
            (r#""""#, 2, "is empty"),
            ("a.b.c", 2, "Write the table as name or schema.name."),
            ("public.last_used_at", 1, "A column name cannot be qualified."),
            ("workspaces; DROP TABLE x", 2, "Unexpected \"D\""),
            ("work spaces", 2, "Unexpected \"s\""),
        ] {
            let refused = parse(value, max_parts).expect_err(value);
            assert!(refused.contains(why), "{value:?}: {refused}");
        }
        assert!(parse(&"a".repeat(64), 1).expect_err("64 bytes").contains("longer than 63 bytes"));
        // Bytes, not characters: 32 two-byte characters are 64 bytes.
        assert!(parse(&format!("\"{}\"", "é".repeat(32)), 1).is_err());
    }

    #[test]
    fn a_name_reaches_sql_only_double_quoted() {
        let name = parse(r#"public."workspaces; DROP TABLE x""#, 2).unwrap();
        assert_eq!(name.quoted(), r#""public"."workspaces; DROP TABLE x""#);
        assert_eq!(quote(r#"a"b"#), r#""a""b""#);
        assert_eq!(name.schema_and_name("other"), ("public", "workspaces; DROP TABLE x"));
        assert_eq!(parse("t", 2).unwrap().schema_and_name("other"), ("other", "t"));
    }
}
