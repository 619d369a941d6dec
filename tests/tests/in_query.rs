//! Marking inside a query the application already runs, with no round trip of its own: the
//! function in the select list or a RETURNING clause marks exactly the rows the query returns.
//! And the pitfalls the README names, each shown.

use wsusage_tests::*;

fn pending(client: &mut Client) -> i64 {
    client.query_one("SELECT pending FROM wsusage_stats", &[]).unwrap().get(0)
}

#[test]
fn a_select_or_a_returning_clause_marks_exactly_the_rows_it_returns() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(10);
    client.execute("UPDATE workspaces SET name = 'team-' || (id = ANY($1))::text", &[&ids[..3].to_vec()]).unwrap();

    // A dashboard's query marks the workspaces it shows.
    let shown =
        client.query("SELECT w.id, wsusage_mark(w.id) FROM workspaces AS w WHERE w.name = 'team-true'", &[]).unwrap();
    assert_eq!(shown.len(), 3);
    // An UPDATE an API request makes marks the rows it changed.
    let changed = client
        .query(
            "UPDATE workspaces SET name = 'renamed' WHERE id = ANY($1) RETURNING id, wsusage_mark(id)",
            &[&ids[5..7].to_vec()],
        )
        .unwrap();
    assert_eq!(changed.len(), 2);

    assert_eq!(flush(&mut client), 5);
    assert_eq!(used_ids(&mut client), sorted(&[&ids[..3], &ids[5..7]].concat()));
}

#[test]
fn a_cte_nobody_reads_is_never_run_so_it_marks_nothing() {
    let cluster = Cluster::start(&[]);
    let (mut client, _) = cluster.with_workspaces(5);
    client.batch_execute("WITH m AS (SELECT wsusage_mark(id) FROM workspaces) SELECT 1").unwrap();
    assert_eq!(pending(&mut client), 0, "the CTE was not referenced, so not run");
    // Referenced, it runs.
    client.batch_execute("WITH m AS (SELECT wsusage_mark(id) FROM workspaces) SELECT count(*) FROM m").unwrap();
    assert_eq!(pending(&mut client), 5);
}

#[test]
fn marking_in_a_query_turns_its_parallel_plan_off() {
    let cluster = Cluster::start(&[]);
    let (mut client, _) = cluster.with_workspaces(100);
    client
        .batch_execute(
            "SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; SET min_parallel_table_scan_size = 0;
             SET max_parallel_workers_per_gather = 2;",
        )
        .unwrap();
    let plan = |client: &mut Client, sql: &str| -> String {
        client
            .query(&format!("EXPLAIN (COSTS OFF) {sql}"), &[])
            .unwrap()
            .iter()
            .map(|row| row.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(plan(&mut client, "SELECT count(id) FROM workspaces").contains("Gather"), "parallel without it");
    let marking = plan(&mut client, "SELECT count(wsusage_mark(id)) FROM workspaces");
    assert!(!marking.contains("Gather"), "PARALLEL UNSAFE: the whole query runs in one process:\n{marking}");
}

#[test]
fn a_null_from_an_outer_join_fails_the_query_unless_filtered() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(2);
    // The join's rows in a known order (whatever join the planner picks): the matched row first.
    let query = "SELECT wsusage_mark(joined.id) FROM (
                     SELECT w.id FROM (VALUES (1, $1::uuid), (2, gen_random_uuid())) AS v(n, id)
                     LEFT JOIN workspaces AS w ON w.id = v.id ORDER BY v.n) AS joined";
    let err = client.query(query, &[&ids[0]]).unwrap_err();
    assert_eq!(sqlstate(&err), "22004", "the unmatched row's NULL id");
    // A mark is not transactional: the matched row, marked before the NULL, stays marked although
    // the statement failed.
    assert_eq!(pending(&mut client), 1);

    // Filtered, the query runs and marks the matched rows only.
    let rows = client.query(&format!("{query} WHERE joined.id IS NOT NULL"), &[&ids[1]]).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(flush(&mut client), 2);
}
