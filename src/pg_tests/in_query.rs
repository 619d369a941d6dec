//! Marking inside a query the application already runs, with no round trip of its own: the
//! function in the select list or a RETURNING clause marks exactly the rows the query returns.
//! And the pitfalls the README names, each shown.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pg_tests::support::*;

    /// `n` rows of `name.t` with new uuids, the first `team` of them with note 'team'; their ids.
    fn rows(name: &str, n: usize, team: usize) -> Vec<String> {
        run(&format!(
            "INSERT INTO {name}.t (id, note) SELECT gen_random_uuid(), CASE WHEN g <= {team} THEN 'team' END
               FROM generate_series(1, {n}) AS g"
        ));
        column(&format!("SELECT id::text FROM {name}.t ORDER BY note NULLS LAST, id")).into_iter().flatten().collect()
    }

    #[pg_test]
    fn a_select_or_a_returning_clause_marks_exactly_the_rows_it_returns() {
        own_target("in_query_rows", "uuid");
        let ids = rows("in_query_rows", 10, 3);

        // A dashboard's query marks the workspaces it shows.
        let shown = column(
            "SELECT w.id::text, wsusage_mark('in_query_rows', w.id) FROM in_query_rows.t AS w
                             WHERE w.note = 'team'",
        );
        assert_eq!(shown.len(), 3);
        // An UPDATE an API request makes marks the rows it changed.
        let changed = column(&format!(
            "UPDATE in_query_rows.t SET note = 'renamed' WHERE id IN ('{}', '{}')
             RETURNING id::text, wsusage_mark('in_query_rows', id)",
            ids[5], ids[6]
        ));
        assert_eq!(changed.len(), 2);

        let mut expected: Vec<String> = [&ids[..3], &ids[5..7]].concat();
        expected.sort();
        assert_eq!(pending_keys("in_query_rows"), expected);
    }

    #[pg_test]
    fn a_cte_nobody_reads_is_never_run_so_it_marks_nothing() {
        own_target("in_query_cte", "uuid");
        rows("in_query_cte", 5, 0);
        run("WITH m AS (SELECT wsusage_mark('in_query_cte', id) FROM in_query_cte.t) SELECT 1");
        assert_eq!(pending_keys("in_query_cte").len(), 0, "the CTE was not referenced, so not run");
        // Referenced, it runs.
        run("WITH m AS (SELECT wsusage_mark('in_query_cte', id) FROM in_query_cte.t) SELECT count(*) FROM m");
        assert_eq!(pending_keys("in_query_cte").len(), 5);
    }

    #[pg_test]
    fn marking_in_a_query_turns_its_parallel_plan_off() {
        own_target("in_query_parallel", "uuid");
        rows("in_query_parallel", 100, 0);
        run("SET LOCAL parallel_setup_cost = 0; SET LOCAL parallel_tuple_cost = 0;
             SET LOCAL min_parallel_table_scan_size = 0; SET LOCAL max_parallel_workers_per_gather = 2;");
        let plan = |sql: &str| {
            column(&format!("EXPLAIN (COSTS OFF) {sql}")).into_iter().flatten().collect::<Vec<_>>().join("\n")
        };
        assert!(plan("SELECT count(id) FROM in_query_parallel.t").contains("Gather"), "parallel without it");
        let marking = plan("SELECT count(wsusage_mark('in_query_parallel', id)) FROM in_query_parallel.t");
        assert!(!marking.contains("Gather"), "PARALLEL UNSAFE: the whole query runs in one process:\n{marking}");
    }

    #[pg_test]
    fn a_null_from_an_outer_join_fails_the_query_unless_filtered() {
        own_target("in_query_join", "uuid");
        let ids = rows("in_query_join", 2, 0);
        // The join's rows in a known order (whatever join the planner picks): the matched row first.
        let query = |id: &str, filter: &str| {
            format!(
                "SELECT joined.id::text, wsusage_mark('in_query_join', joined.id) FROM (
                     SELECT w.id FROM (VALUES (1, '{id}'::uuid), (2, gen_random_uuid())) AS v(n, id)
                     LEFT JOIN in_query_join.t AS w ON w.id = v.id ORDER BY v.n) AS joined {filter}"
            )
        };
        assert_eq!(refusal(&query(&ids[0], "")).sqlstate, "22004", "the unmatched row's NULL id");
        // A mark is not transactional: the matched row, marked before the NULL, stays marked
        // although the statement failed.
        assert_eq!(pending_keys("in_query_join"), [ids[0].clone()]);

        // Filtered, the query runs and marks the matched rows only.
        assert_eq!(column(&query(&ids[1], "WHERE joined.id IS NOT NULL")).len(), 1);
        let mut expected = ids.clone();
        expected.sort();
        assert_eq!(pending_keys("in_query_join"), expected);
    }
}
