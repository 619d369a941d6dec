//! On a hot standby nothing can be written: marks are refused and neither launcher nor worker
//! runs, until the standby is promoted.

use wsusage_tests::*;

#[test]
fn a_standby_refuses_marks_runs_no_worker_and_starts_one_when_promoted() {
    let primary = Cluster::start(&[]);
    let (mut on_primary, ids) = primary.with_workspaces(3);
    on_primary.batch_execute("CHECKPOINT").unwrap();

    let standby = Cluster::standby_of(&primary);
    let mut client = standby.connect();
    let in_recovery: bool = client.query_one("SELECT pg_is_in_recovery()", &[]).unwrap().get(0);
    assert!(in_recovery);

    let err = client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap_err();
    let (code, message, _, hint) = report(&err);
    assert_eq!((code.as_str(), message.as_str()), ("25006", "cannot mark usage during recovery"));
    assert!(hint.contains("primary"), "{hint}");
    let err = client.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap_err();
    assert_eq!(sqlstate(&err), "25006");
    let err = client.execute("SELECT wsusage_flush()", &[]).unwrap_err();
    assert_eq!(sqlstate(&err), "25006");
    // Marking inside a read query fails that whole query: the rows are not returned either.
    let err = client.query("SELECT w.id, wsusage_mark(w.id) FROM workspaces AS w", &[]).unwrap_err();
    assert_eq!(sqlstate(&err), "25006");
    let err = client.execute("SELECT wsusage_mark('default', $1)", &[&ids[0]]).unwrap_err();
    assert_eq!(sqlstate(&err), "25006", "a named target too");
    // Pending marks live in the primary's memory: a read here would say "none" wrongly.
    let err = client.query("SELECT wsusage_pending_at($1)", &[&ids[0]]).unwrap_err();
    let (code, message, _, hint) = report(&err);
    assert_eq!((code.as_str(), message.as_str()), ("25006", "cannot read pending marks during recovery"));
    assert!(hint.contains("primary"), "{hint}");

    // No launcher or worker here, nor one on its way. The postmaster starts a background worker
    // once its start time has come; one allowed to start on a consistent standby would have been
    // started when this standby began to take connections, as a parallel query's workers are from
    // then on. Once this standby has run one, the postmaster has started workers since ours could
    // have been, and a worker has its title from its first instructions, before it shows in
    // pg_stat_activity.
    let launched = parallel_workers_launched(&mut client);
    assert!(launched > 0, "the standby ran the query with workers of its own");
    let titles = standby.process_titles();
    assert!(titles.iter().any(|title| title.contains("startup")), "the standby's processes are seen: {titles:?}");
    assert!(
        !titles.iter().any(|title| title.contains("wsusage")),
        "no launcher or worker on a hot standby: {titles:?}"
    );
    let ours: i64 = client
        .query_one("SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'wsusage%'", &[])
        .unwrap()
        .get(0);
    assert_eq!(ours, 0, "no launcher or worker on a hot standby");

    // The old primary goes away, the standby is promoted, and the worker starts there.
    drop(on_primary);
    drop(primary);
    let promoted: bool = client.query_one("SELECT pg_promote()", &[]).unwrap().get(0);
    assert!(promoted);
    standby.wait_for_launcher(&mut client);

    client.execute("SELECT wsusage_mark($1)", &[&ids[1]]).unwrap();
    assert_eq!(flush(&mut client), 1);
    assert!(last_used(&mut client, &ids[1]).is_some());
}

/// The workers a parallel plan of `SELECT count(*) FROM workspaces` had, as EXPLAIN ANALYZE says.
fn parallel_workers_launched(client: &mut Client) -> u32 {
    client
        .batch_execute(
            "SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; SET min_parallel_table_scan_size = 0;
             SET max_parallel_workers_per_gather = 2;",
        )
        .unwrap();
    let plan: Vec<String> = client
        .query("EXPLAIN (ANALYZE, COSTS OFF) SELECT count(*) FROM workspaces", &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    client.batch_execute("RESET ALL").unwrap();
    plan.iter()
        .find_map(|line| line.trim().strip_prefix("Workers Launched: "))
        .unwrap_or_else(|| panic!("a parallel plan: {plan:#?}"))
        .parse()
        .expect("a number of workers")
}
