//! Wrong arguments: a NULL key, text that is not a key, hostile text. Each is refused with its
//! SQLSTATE before anything is marked.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pg_tests::support::*;

    #[pg_test]
    fn a_null_id_is_rejected_with_22004_and_a_null_element_marks_nothing_of_its_array() {
        own_target("null_ids", "uuid");
        let refused = refusal("SELECT wsusage_mark(NULL)");
        assert_eq!((refused.sqlstate.as_str(), refused.message.as_str()), ("22004", "id must not be null"));
        assert_eq!(refusal("SELECT wsusage_mark_many(NULL)").sqlstate, "22004");
        for sql in [
            "SELECT wsusage_mark(NULL, gen_random_uuid())",
            "SELECT wsusage_mark('null_ids', NULL)",
            "SELECT wsusage_mark_many(NULL, ARRAY[gen_random_uuid()])",
            "SELECT wsusage_mark_many('null_ids', NULL)",
            "SELECT wsusage_mark_bigint(NULL, 1)",
            "SELECT wsusage_mark_bigint('null_ids', NULL)",
            "SELECT wsusage_mark_many_bigint(NULL, ARRAY[1::bigint])",
            "SELECT wsusage_mark_many_bigint('null_ids', NULL)",
        ] {
            let refused = refusal(sql);
            assert_eq!(refused.sqlstate, "22004", "{sql}: {}", refused.message);
        }

        // A NULL element rejects the whole array: no id of it is marked.
        let refused =
            refusal("SELECT wsusage_mark_many('null_ids', ARRAY[gen_random_uuid(), NULL, gen_random_uuid()])");
        assert_eq!(refused.sqlstate, "22004");
        assert!(refused.detail.contains("Element 2"), "{}", refused.detail);
        let refused = refusal("SELECT wsusage_mark_many_bigint('null_ids', ARRAY[1, 2, NULL])");
        assert!(refused.detail.contains("Element 3"), "{}", refused.detail);
        assert_eq!(pending_keys("null_ids"), Vec::<String>::new());
        assert_eq!(pending_keys("default"), Vec::<String>::new());
    }

    #[pg_test]
    fn text_that_is_not_a_uuid_is_rejected_with_22p02() {
        assert_eq!(refusal("SELECT wsusage_mark('not-a-uuid')").sqlstate, "22P02");
        assert_eq!(refusal("SELECT wsusage_mark_many('{zzz}')").sqlstate, "22P02");
        assert_eq!(refusal("SELECT wsusage_mark_bigint('default', 'twelve')").sqlstate, "22P02");
    }

    /// wsusage takes keys as uuid or bigint only: no signature takes text, so text reaches it
    /// only through the type's input function (22P02 above), never as a string it could splice
    /// into its SQL.
    #[pg_test]
    fn hostile_text_in_place_of_an_id_is_only_ever_data() {
        own_target("hostile", "uuid");
        for hostile in
            ["'); DROP TABLE hostile.t; --", "00000000-0000-0000-0000-000000000000'; DROP TABLE hostile.t; --"]
        {
            let quoted = hostile.replace('\'', "''");
            let refused = refusal(&format!("SELECT wsusage_mark('{quoted}'::text)"));
            assert_eq!(refused.sqlstate, "42883", "{}", refused.message);
            assert!(refused.message.contains("wsusage_mark(text)"), "{}", refused.message);
            assert_eq!(refusal(&format!("SELECT wsusage_mark_many(ARRAY['{quoted}'::text])")).sqlstate, "42883");
            assert_eq!(refusal(&format!("SELECT wsusage_mark('hostile', '{quoted}')")).sqlstate, "22P02");
        }
        assert_eq!(pending_keys("hostile"), Vec::<String>::new());
        assert_eq!(
            value("SELECT count(*)::text FROM pg_catalog.pg_class WHERE oid = 'hostile.t'::regclass"),
            Some("1".into())
        );
    }
}
