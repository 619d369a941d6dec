//! Fresh reads (`wsusage_pending_at`): the time of a key's pending mark, of its own target and
//! key only; wrong calls refused as a mark's are, a NULL key read as NULL.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pg_tests::support::*;

    /// The value of `expression`, as text.
    fn read(expression: &str) -> Option<String> {
        value(&format!("SELECT ({expression})::text"))
    }

    #[pg_test]
    fn a_read_returns_the_latest_pending_mark_of_its_own_target_and_key_only() {
        own_target("read_uuid", "uuid");
        own_target("read_unmarked", "uuid");
        own_target("read_bigint", "bigint");
        let id = "00000000-0000-0000-0000-0000000000bb";
        let pending_at = format!("wsusage_pending_at('read_uuid', '{id}')");
        assert_eq!(read(&pending_at), None, "nothing marked yet");

        run(&format!("SELECT wsusage_mark('read_uuid', '{id}')"));
        let first = read(&pending_at).expect("a pending mark");
        assert_eq!(read(&format!("'{first}'::timestamptz <= clock_timestamp()")).as_deref(), Some("true"));
        run(&format!("SELECT pg_sleep(0.002); SELECT wsusage_mark('read_uuid', '{id}')"));
        let second = read(&pending_at).expect("a pending mark");
        assert_eq!(
            read(&format!("'{second}'::timestamptz > '{first}'::timestamptz")).as_deref(),
            Some("true"),
            "the later mark"
        );

        assert_eq!(read("wsusage_pending_at('read_uuid', gen_random_uuid())"), None, "another key");
        assert_eq!(read(&format!("wsusage_pending_at('read_unmarked', '{id}')")), None, "another target");
        run("SELECT wsusage_mark_bigint('read_bigint', -7)");
        assert_eq!(read("wsusage_pending_at_bigint('read_bigint', -7) IS NOT NULL").as_deref(), Some("true"));
        assert_eq!(read("wsusage_pending_at_bigint('read_bigint', 7)"), None, "another key: its sign flipped");
        // Reading wrote nothing and marked nothing.
        assert_eq!(pending_keys("read_uuid"), [id.to_owned()]);
        assert_eq!(read("(SELECT count(*) FROM read_uuid.t)").as_deref(), Some("0"));
    }

    #[pg_test]
    fn wrong_reads_are_refused_with_their_sqlstate_and_a_null_key_reads_null() {
        own_target("read_keys", "bigint");
        run("ALTER TABLE read_keys.t ADD COLUMN spare timestamptz");
        for (sql, expected) in [
            ("SELECT wsusage_pending_at(NULL, gen_random_uuid())", "22004"),
            ("SELECT wsusage_pending_at_bigint(NULL, 1)", "22004"),
            ("SELECT wsusage_pending_at('nope', gen_random_uuid())", "42704"),
            ("SELECT wsusage_pending_at_bigint('nope', 1)", "42704"),
        ] {
            let refused = refusal(sql);
            assert_eq!(refused.sqlstate, expected, "{sql}: {}", refused.message);
        }
        assert_eq!(
            refusal("SELECT wsusage_pending_at(NULL, gen_random_uuid())").hint,
            "Name a target of wsusage_target, or call the function without one to read the \"default\" target."
        );
        assert_eq!(refusal("SELECT wsusage_pending_at_bigint(NULL, 1)").hint, "Name a target of wsusage_target.");
        // The wrong function for the key type says which one to call.
        let refused = refusal("SELECT wsusage_pending_at('read_keys', gen_random_uuid())");
        assert_eq!(refused.sqlstate, "42804", "{}", refused.message);
        assert!(refused.message.contains("bigint") && refused.message.contains("uuid"), "{}", refused.message);
        assert_eq!(refused.hint, "Read the keys of this target with wsusage_pending_at_bigint().");
        // A NULL key has no pending mark: NULL, as SQL's own functions answer.
        assert_eq!(read("wsusage_pending_at_bigint('read_keys', NULL)"), None);
        assert_eq!(read("wsusage_pending_at(NULL::uuid)"), None);

        // A target whose column is gone cannot be read, with the catalog's own SQLSTATE; nor can
        // the default target of the settings whose table does not exist here.
        run("ALTER TABLE read_keys.t DROP COLUMN last_used_at");
        assert_eq!(refusal("SELECT wsusage_pending_at_bigint('read_keys', 1)").sqlstate, "42703");
        let refused = refusal("SELECT wsusage_pending_at(gen_random_uuid())");
        assert_eq!(refused.sqlstate, "42P01", "{}", refused.message);
        let refused = refusal("SELECT wsusage_pending_at_bigint('default', 1)");
        assert_eq!(refused.sqlstate, "42P01", "no table, before its key type can be known: {}", refused.message);
    }
}
