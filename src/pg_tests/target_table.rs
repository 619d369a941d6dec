//! `wsusage_target` and its trigger: a row is checked when written, and a wrong one is refused
//! with the SQLSTATE PostgreSQL itself gives the same mistake; marks of a target that does not
//! exist or takes other keys are refused.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pg_tests::support::*;

    fn insert(name: &str, relation: &str, id: &str, timestamp: &str, after_flush: &str) -> String {
        format!(
            "INSERT INTO wsusage_target (name, relation, id_column, timestamp_column, after_flush)
                  VALUES ('{name}', '{relation}', '{id}', '{timestamp}', {after_flush})"
        )
    }

    #[pg_test]
    fn a_wrong_row_is_refused_with_postgresqls_own_sqlstate_and_nothing_of_it_is_stored() {
        run("CREATE SCHEMA checked;
             CREATE TABLE checked.users (id uuid PRIMARY KEY, last_seen_at timestamptz, nickname text, visits integer);
             CREATE TABLE checked.api_keys (id bigint PRIMARY KEY, last_used timestamp without time zone);
             CREATE FUNCTION checked.wrong(id uuid) RETURNS void LANGUAGE plpgsql AS $$ BEGIN END $$;
             CREATE FUNCTION checked.bump_keys(ids bigint[], marked_at timestamptz[]) RETURNS void
               LANGUAGE plpgsql AS $$ BEGIN END $$;
             CREATE ROLE someone_else;
             CREATE FUNCTION checked.someones(ids uuid[], marked_at timestamptz[]) RETURNS void
               LANGUAGE plpgsql AS $$ BEGIN END $$;
             ALTER FUNCTION checked.someones(uuid[], timestamptz[]) OWNER TO someone_else;
             CREATE FUNCTION checked.variadic_bump(ids uuid[], VARIADIC marked_at timestamptz[]) RETURNS void
               LANGUAGE plpgsql AS $$ BEGIN END $$;
             CREATE PROCEDURE checked.bump_procedure(ids uuid[], marked_at timestamptz[])
               LANGUAGE plpgsql AS $$ BEGIN END $$;");
        run(&insert("checked_users", "checked.users", "id", "last_seen_at", "NULL"));
        run(&insert("checked_keys", "checked.api_keys", "id", "last_used", "NULL"));

        let users = |id: &str, timestamp: &str, after_flush: &str| {
            insert("checked_t", "checked.users", id, timestamp, after_flush)
        };
        let cases = [
            ("a missing table", insert("checked_t", "checked.no_such_table", "id", "last_seen_at", "NULL"), "42P01"),
            ("a missing id column", users("no_such_column", "last_seen_at", "NULL"), "42703"),
            ("a missing timestamp column", users("id", "no_such_column", "NULL"), "42703"),
            ("a text id column", users("nickname", "last_seen_at", "NULL"), "42804"),
            ("an integer timestamp column", users("id", "visits", "NULL"), "42804"),
            ("an after_flush of one uuid", users("id", "last_seen_at", "'checked.wrong(uuid)'"), "42883"),
            (
                "an after_flush for bigint keys on uuid keys",
                users("id", "last_seen_at", "'checked.bump_keys(bigint[], timestamptz[])'"),
                "42883",
            ),
            (
                "a missing after_flush function",
                users("id", "last_seen_at", "'checked.no_such_function(uuid[], timestamptz[])'"),
                "42883",
            ),
            (
                "an after_flush another role owns (it would run with the flush's privileges)",
                users("id", "last_seen_at", "'checked.someones(uuid[], timestamptz[])'"),
                "42501",
            ),
            (
                "a variadic after_flush",
                users("id", "last_seen_at", "'checked.variadic_bump(uuid[], timestamptz[])'"),
                "42883",
            ),
            (
                "a procedure as after_flush",
                users("id", "last_seen_at", "'checked.bump_procedure(uuid[], timestamptz[])'"),
                "42883",
            ),
            (
                "an update to a text id column",
                "UPDATE wsusage_target SET id_column = 'nickname' WHERE name = 'checked_users'".to_owned(),
                "42804",
            ),
        ];
        for (what, sql, expected) in &cases {
            let refused = refusal(sql);
            assert_eq!(refused.sqlstate, *expected, "{what}: {}", refused.message);
        }
        // Names of 1 to 63 bytes.
        for name in [String::new(), "c".repeat(64)] {
            assert_eq!(
                refusal(&insert(&name, "checked.users", "id", "last_seen_at", "NULL")).sqlstate,
                "23514",
                "{name:?}"
            );
        }
        run(&insert(&"c".repeat(63), "checked.users", "id", "last_seen_at", "NULL"));
        run(&format!("DELETE FROM wsusage_target WHERE name = '{}'", "c".repeat(63)));
        // The signature follows the key type: the bigint function fits the bigint target, and is
        // stored qualified.
        run("UPDATE wsusage_target SET after_flush = 'checked.bump_keys(bigint[], timestamptz[])' WHERE name = 'checked_keys'");
        let rows = column(
            "SELECT format('%s %s %s %s', name, relation, id_column, after_flush) FROM wsusage_target
              WHERE name LIKE 'checked%' ORDER BY name",
        );
        assert_eq!(
            rows,
            [
                Some(
                    "checked_keys checked.api_keys id checked.bump_keys(bigint[], timestamp with time zone[])"
                        .to_owned()
                ),
                Some("checked_users checked.users id ".to_owned()),
            ],
            "nothing refused was stored, nothing stored was changed"
        );
    }

    #[pg_test]
    fn marks_of_an_unknown_target_or_of_keys_of_another_type_are_refused() {
        own_target("typed_uuid", "uuid");
        own_target("typed_bigint", "bigint");
        let refused = refusal("SELECT wsusage_mark('no_such_target', gen_random_uuid())");
        assert_eq!(refused.sqlstate, "42704", "{}", refused.message);
        assert_eq!(refused.message, "wsusage target \"no_such_target\" does not exist");
        assert!(refused.hint.contains("wsusage_target"), "{}", refused.hint);
        for (sql, hint) in [
            ("SELECT wsusage_mark_bigint('typed_uuid', 1)", "Mark the keys of this target with wsusage_mark()."),
            (
                "SELECT wsusage_mark_many_bigint('typed_uuid', ARRAY[1::bigint])",
                "Mark the keys of this target with wsusage_mark_many().",
            ),
            (
                "SELECT wsusage_mark('typed_bigint', gen_random_uuid())",
                "Mark the keys of this target with wsusage_mark_bigint().",
            ),
            (
                "SELECT wsusage_mark_many('typed_bigint', ARRAY[gen_random_uuid()])",
                "Mark the keys of this target with wsusage_mark_many_bigint().",
            ),
        ] {
            let refused = refusal(sql);
            assert_eq!(refused.sqlstate, "42804", "{sql}: {}", refused.message);
            assert!(
                refused.message.contains("uuid") && refused.message.contains("bigint"),
                "{sql}: {}",
                refused.message
            );
            assert_eq!(refused.hint, hint, "{sql}");
        }
        // A target whose table lost its timestamp column.
        run("ALTER TABLE typed_uuid.t DROP COLUMN last_used_at");
        assert_eq!(refusal("SELECT wsusage_mark('typed_uuid', gen_random_uuid())").sqlstate, "42703");
        assert_eq!(pending_keys("typed_uuid"), Vec::<String>::new());
        assert_eq!(pending_keys("typed_bigint"), Vec::<String>::new());
    }
}
