//! Who may mark and read a target: a mark is an UPDATE made later, so it needs what that UPDATE
//! needs; a fresh read needs what reading the column needs; only the table's owner changes
//! `wsusage_target`. Checked again in the same session when privileges change, and nothing the
//! role controls takes part in the check.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pg_tests::support::*;

    /// `sql` as `role` must fail with 42501 naming `table` and `column`.
    fn denied(role: &str, sql: &str, table: &str, column: &str) -> Refusal {
        run(&format!("SET LOCAL ROLE {role}"));
        let refused = refusal(sql);
        run("RESET ROLE");
        assert_eq!(refused.sqlstate, "42501", "{sql}: {}", refused.message);
        assert!(
            refused.message.contains(table) && refused.message.contains(column),
            "{sql}: names {table} and {column}: {}",
            refused.message
        );
        refused
    }

    fn as_role(role: &str, sql: &str) {
        run(&format!("SET LOCAL ROLE {role}"));
        let error = error_of(sql);
        run("RESET ROLE");
        assert!(error.is_none(), "{sql}: {error:?}");
    }

    #[pg_test]
    fn marking_needs_update_on_the_targets_timestamp_column_checked_again_when_privileges_change() {
        own_target("privileged", "uuid");
        own_target("privileged_too", "uuid");
        run("CREATE ROLE marker_app;
             GRANT EXECUTE ON FUNCTION wsusage_mark(text, uuid), wsusage_mark_many(text, uuid[]) TO marker_app;
             GRANT USAGE ON SCHEMA privileged, privileged_too TO marker_app;");
        let [one, two, three, four] = ["1", "2", "3", "4"].map(|n| format!("00000000-0000-0000-0000-00000000000{n}"));
        let mark = |id: &str| format!("SELECT wsusage_mark('privileged', '{id}')");

        // EXECUTE alone is not enough.
        let refused = denied("marker_app", &mark(&one), "privileged.t", "last_used_at");
        assert_eq!(
            refused.hint,
            "GRANT SELECT (id, last_used_at), UPDATE (last_used_at) ON privileged.t TO the role that marks."
        );
        denied(
            "marker_app",
            &format!("SELECT wsusage_mark_many('privileged', ARRAY['{one}'::uuid])"),
            "privileged.t",
            "last_used_at",
        );
        // UPDATE on another column is not UPDATE on the timestamp column.
        run("GRANT UPDATE (note) ON privileged.t TO marker_app");
        denied("marker_app", &mark(&one), "privileged.t", "last_used_at");
        // UPDATE without the SELECT the UPDATE's WHERE needs is not enough either.
        run("GRANT UPDATE (last_used_at) ON privileged.t TO marker_app");
        denied("marker_app", &mark(&one), "privileged.t", "last_used_at");

        // Granted on the columns, in the same session the next mark succeeds; granted on the table, too.
        run("GRANT SELECT (id, last_used_at) ON privileged.t TO marker_app");
        as_role("marker_app", &mark(&two));
        as_role("marker_app", &format!("SELECT wsusage_mark_many('privileged', ARRAY['{three}'::uuid])"));
        run("GRANT SELECT, UPDATE ON privileged_too.t TO marker_app");
        as_role("marker_app", &format!("SELECT wsusage_mark('privileged_too', '{one}')"));

        // Revoked: the next mark in the same session fails again.
        run("REVOKE UPDATE (last_used_at) ON privileged.t FROM marker_app");
        denied("marker_app", &mark(&four), "privileged.t", "last_used_at");
        // And so does one without USAGE on the table's schema.
        run("REVOKE USAGE ON SCHEMA privileged_too FROM marker_app");
        denied(
            "marker_app",
            &format!("SELECT wsusage_mark('privileged_too', '{two}')"),
            "privileged_too.t",
            "last_used_at",
        );

        // Only the accepted marks were kept.
        assert_eq!(pending_keys("privileged"), [two, three]);
        assert_eq!(pending_keys("privileged_too"), [one]);
    }

    /// The check reads the catalogs with privileges the role does not have, so nothing the role
    /// controls may take part in it: not functions of its own on its search path (they would run
    /// with those privileges), not a table of its own named like the target's.
    #[pg_test]
    fn a_role_cannot_pass_the_privilege_check_through_its_search_path() {
        own_target("guarded", "uuid");
        run("CREATE ROLE intruder;
             CREATE SCHEMA intruder AUTHORIZATION intruder;
             GRANT EXECUTE ON FUNCTION wsusage_mark(text, uuid), wsusage_pending_at(text, uuid) TO intruder;
             GRANT USAGE ON SCHEMA guarded TO intruder;
             SET LOCAL ROLE intruder;
             SET LOCAL search_path = intruder, pg_catalog, public;
             CREATE TABLE intruder.t (id uuid PRIMARY KEY, last_used_at timestamptz);
             CREATE FUNCTION intruder.has_column_privilege(oid, oid, smallint, text) RETURNS boolean
                 LANGUAGE sql AS 'SELECT true';
             CREATE FUNCTION intruder.pg_attribute_aclcheck(oid, smallint, oid, integer) RETURNS integer
                 LANGUAGE sql AS 'SELECT 0';
             CREATE FUNCTION intruder.format(text, name, name) RETURNS text
                 LANGUAGE sql AS $$SELECT 'intruder.t'$$;
             RESET ROLE;");
        denied("intruder", "SELECT wsusage_mark('guarded', gen_random_uuid())", "guarded.t", "last_used_at");
        denied("intruder", "SELECT wsusage_pending_at('guarded', gen_random_uuid())", "guarded.t", "last_used_at");
        assert_eq!(pending_keys("guarded"), Vec::<String>::new(), "nothing was marked");
    }

    #[pg_test]
    fn only_the_owner_changes_targets_and_monitoring_roles_read_them() {
        own_target("owned", "uuid");
        run("CREATE ROLE target_app;
             CREATE ROLE target_watcher IN ROLE pg_monitor;
             GRANT SELECT, UPDATE ON owned.t TO target_app;");
        for sql in [
            "INSERT INTO wsusage_target (name, relation, id_column, timestamp_column) VALUES ('mine', 'owned.t', 'id', 'last_used_at')",
            "UPDATE wsusage_target SET min_change = '1 day' WHERE name = 'owned'",
            "DELETE FROM wsusage_target WHERE name = 'owned'",
        ] {
            run("SET LOCAL ROLE target_app");
            let refused = refusal(sql);
            run("RESET ROLE");
            assert_eq!(refused.sqlstate, "42501", "{sql}: {}", refused.message);
        }
        run("SET LOCAL ROLE target_watcher");
        let seen = column("SELECT name FROM wsusage_target WHERE name = 'owned'");
        run("RESET ROLE");
        assert_eq!(seen, [Some("owned".to_owned())]);
    }

    /// A fresh read shows the column's next value: it needs what reading the column needs, not
    /// what marking needs; and reading is not marking.
    #[pg_test]
    fn reading_a_pending_mark_needs_select_on_the_id_and_timestamp_columns_only() {
        own_target("watched", "uuid");
        let id = "00000000-0000-0000-0000-0000000000aa";
        run(&format!("SELECT wsusage_mark('watched', '{id}')"));
        run("CREATE ROLE dashboard;
             GRANT EXECUTE ON FUNCTION wsusage_pending_at(text, uuid), wsusage_mark(text, uuid) TO dashboard;
             GRANT USAGE ON SCHEMA watched TO dashboard;");
        let read = format!("SELECT wsusage_pending_at('watched', '{id}')");
        let refused = denied("dashboard", &read, "watched.t", "last_used_at");
        assert_eq!(refused.hint, "GRANT SELECT (id, last_used_at) ON watched.t TO the role that reads.");
        // The timestamp column without the id column is not enough: the read names a row by its id.
        run("GRANT SELECT (last_used_at) ON watched.t TO dashboard");
        denied("dashboard", &read, "watched.t", "last_used_at");
        run("GRANT SELECT (id) ON watched.t TO dashboard");
        run("SET LOCAL ROLE dashboard");
        let as_dashboard = value(&format!("SELECT (wsusage_pending_at('watched', '{id}') IS NOT NULL)::text"));
        let marking = refusal("SELECT wsusage_mark('watched', gen_random_uuid())");
        run("RESET ROLE");
        assert_eq!(as_dashboard.as_deref(), Some("true"));
        assert_eq!(marking.sqlstate, "42501", "reading is not marking: {}", marking.message);
        // Row-level security that filters the role's rows: a read would answer for rows it cannot
        // see, so none is allowed; without it, reads again.
        run("ALTER TABLE watched.t ENABLE ROW LEVEL SECURITY;
             CREATE POLICY only_notes ON watched.t FOR SELECT USING (note IS NOT NULL);");
        let refused = denied("dashboard", &read, "watched.t", "last_used_at");
        assert!(refused.detail.contains("row-level security"), "{}", refused.detail);
        run("ALTER TABLE watched.t DISABLE ROW LEVEL SECURITY");
        run("SET LOCAL ROLE dashboard");
        let again = value(&format!("SELECT (wsusage_pending_at('watched', '{id}') IS NOT NULL)::text"));
        run("RESET ROLE");
        assert_eq!(again.as_deref(), Some("true"));

        run("REVOKE SELECT (id) ON watched.t FROM dashboard");
        denied("dashboard", &read, "watched.t", "last_used_at");
    }
}
