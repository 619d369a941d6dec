//! Every database: marks are flushed in the database they were made in, by that database's own
//! worker, so one database's trouble never holds up another's.

use std::collections::BTreeSet;
use std::thread;
use std::time::Duration;

use uuid::Uuid;
use wsusage_tests::*;

/// Create `name` with the extension and a workspaces table holding `ids`; a client to it.
fn database_with(cluster: &Cluster, name: &str, ids: &[Uuid]) -> Client {
    cluster.connect().batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    let mut client = cluster.connect_to(name);
    client
        .batch_execute(
            "CREATE EXTENSION wsusage;
             CREATE TABLE workspaces (id uuid PRIMARY KEY, last_used_at timestamptz);",
        )
        .unwrap();
    client.execute("INSERT INTO workspaces (id) SELECT unnest($1::uuid[])", &[&ids]).unwrap();
    client
}

#[test]
fn three_databases_marking_concurrently_each_see_only_their_own_marks() {
    let cluster = Cluster::start(&[]);
    // The same ids in every database: a mark applied in the wrong one would show.
    let ids: Vec<Uuid> = (0..300).map(|_| Uuid::new_v4()).collect();
    let names = ["app_a", "app_b", "app_c"];
    for name in names {
        database_with(&cluster, name, &ids);
    }
    let marked: Vec<Vec<Uuid>> = ids.chunks(100).map(<[Uuid]>::to_vec).collect();

    thread::scope(|scope| {
        for (name, mine) in names.iter().zip(&marked) {
            let cluster = &cluster;
            scope.spawn(move || {
                let mut client = cluster.connect_to(name);
                for id in mine {
                    client.execute("SELECT wsusage_mark($1)", &[id]).unwrap();
                }
                assert_eq!(flush(&mut client), 100, "{name}: its own 100 ids, no other database's");
            });
        }
    });

    for (name, mine) in names.iter().zip(&marked) {
        let mut client = cluster.connect_to(name);
        assert_eq!(used_ids(&mut client), sorted(mine), "{name}: only its own marks applied");
    }
    let mut admin = cluster.connect();
    admin.batch_execute("CREATE EXTENSION wsusage").unwrap();
    let rows = admin
        .query(
            "SELECT datname, marks, ids_flushed, rows_updated, worker_pid FROM wsusage_stats_by_database ORDER BY datname",
            &[],
        )
        .unwrap();
    let seen: Vec<(String, i64, i64, i64)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    let expected: Vec<(String, i64, i64, i64)> = names.iter().map(|n| (n.to_string(), 100, 100, 100)).collect();
    assert_eq!(seen, expected);
    let workers: BTreeSet<i32> = rows.iter().filter_map(|r| r.get::<_, Option<i32>>(4)).collect();
    assert_eq!(workers.len(), 3, "one worker per database: {workers:?}");
    let (marks, databases): (i64, i64) =
        admin.query_one("SELECT marks, databases FROM wsusage_stats", &[]).map(|r| (r.get(0), r.get(1))).unwrap();
    assert_eq!((marks, databases), (300, 3));
}

#[test]
fn a_table_locked_in_one_database_does_not_delay_another_databases_flush() {
    let cluster = Cluster::start(&[("wsusage.lock_timeout", "0")]);
    let ids: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
    let mut stuck = database_with(&cluster, "stuck", &ids);
    let mut fine = database_with(&cluster, "fine", &ids);

    let mut holder = cluster.connect_to("stuck");
    holder.batch_execute("BEGIN; LOCK TABLE workspaces IN ACCESS EXCLUSIVE MODE").unwrap();
    stuck.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    assert_eq!(sqlstate(&request_flush(&cluster, &mut stuck).unwrap_err()), "57014");
    wait_until("the stuck database's worker to wait on the table lock", || {
        stuck
            .query_opt("SELECT FROM pg_stat_activity WHERE backend_type = 'wsusage' AND datname = 'stuck' AND wait_event_type = 'Lock'", &[])
            .unwrap()
            .is_some()
    });

    // While that worker waits, the other database flushes as usual.
    fine.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    assert_eq!(flush(&mut fine), 10);
    assert_eq!(count_used(&mut fine), 10);
    assert_eq!(count_used(&mut holder), 0, "the stuck database is still waiting");

    holder.batch_execute("COMMIT").unwrap();
    wait_until("the stuck database's flush once the lock is gone", || count_used(&mut stuck) == 10);
}

#[test]
fn drop_database_with_pending_marks_succeeds_and_discards_them() {
    let cluster = Cluster::start(&[]);
    let ids: Vec<Uuid> = (0..25).map(|_| Uuid::new_v4()).collect();
    let mut doomed = database_with(&cluster, "doomed", &ids);
    doomed.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    cluster.wait_for_worker(&mut doomed, None);
    drop(doomed);

    // The worker connected to it leaves: no FORCE needed, no "being accessed by other users".
    let mut admin = cluster.connect();
    admin.batch_execute("CREATE EXTENSION wsusage").unwrap();
    admin.batch_execute("DROP DATABASE doomed").unwrap();
    wait_until("the dropped database's marks to be discarded", || {
        let (discarded, databases, pending): (i64, i64, i64) = admin
            .query_one("SELECT ids_discarded, databases, pending FROM wsusage_stats", &[])
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .unwrap();
        (discarded, databases, pending) == (25, 0, 0)
    });
    let log = cluster.log();
    assert!(log.contains("wsusage flush worker is leaving database \"doomed\""), "{log}");
    assert!(log.contains("wsusage discarded 25 pending ids of database"), "{log}");
    // The rest of the cluster carries on: the launcher's rounds after the drop start a worker for
    // another database, which flushes.
    let mut client = database_with(&cluster, "survivor", &ids[..2]);
    let ids = ids[..2].to_vec();
    client.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    assert_eq!(flush(&mut client), 2);
    // And in all those rounds it started no worker for the dropped database, while the drop
    // waited or ran or after.
    let log = cluster.log();
    assert!(!log.contains("database \"doomed\" does not exist"), "{log}");
    let workers: Vec<String> = admin
        .query("SELECT datname::text FROM pg_stat_activity WHERE backend_type = 'wsusage'", &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(workers, ["survivor"], "no worker keeps trying to reach the dropped database");
}

#[test]
fn with_fewer_workers_than_databases_every_database_is_drained_in_turn() {
    let cluster = Cluster::start(&[("wsusage.max_workers", "1"), ("wsusage.flush_interval", "'200ms'")]);
    let ids: Vec<Uuid> = (0..50).map(|_| Uuid::new_v4()).collect();
    let names = ["turn_a", "turn_b", "turn_c", "turn_d"];
    let mut clients: Vec<Client> = names.iter().map(|name| database_with(&cluster, name, &ids)).collect();
    for client in &mut clients {
        client.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    }
    let mut admin = cluster.connect();
    admin.batch_execute("CREATE EXTENSION wsusage").unwrap();
    let mut most_workers = 0;
    wait_until("every database to be drained", || {
        let workers: i64 = admin
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'wsusage'", &[])
            .unwrap()
            .get(0);
        most_workers = most_workers.max(workers);
        clients.iter_mut().all(|client| count_used(client) == 50)
    });
    assert!(most_workers <= 1, "wsusage.max_workers = 1, saw {most_workers} workers");

    // wsusage_flush() is served in every database too, in turn.
    for client in &mut clients {
        client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    }
    for client in &mut clients {
        client.query_one("SELECT wsusage_flush()", &[]).unwrap();
    }
    let pending: i64 = admin.query_one("SELECT pending FROM wsusage_stats", &[]).unwrap().get(0);
    assert_eq!(pending, 0);
}

#[test]
fn marks_in_a_database_without_the_table_are_kept_and_reported_there_only() {
    let cluster = Cluster::start(&[]);
    let (mut with_table, ids) = cluster.with_workspaces(1);
    cluster.connect().batch_execute("CREATE DATABASE no_table").unwrap();
    let mut without = cluster.connect_to("no_table");
    without.batch_execute("CREATE EXTENSION wsusage").unwrap();

    without.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    let (code, message, _, _) = flush_error(&mut without);
    assert_eq!(code, "42P01");
    assert!(message.contains("relation \"workspaces\" does not exist"), "{message}");

    with_table.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    assert_eq!(flush(&mut with_table), 1, "only this database's mark");
    let rows = with_table
        .query("SELECT datname, pending, last_error FROM wsusage_stats_by_database ORDER BY datname", &[])
        .unwrap();
    let seen: Vec<(String, i64, Option<String>)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(seen[0].0, "no_table");
    assert_eq!(seen[0].1, 1, "kept");
    assert!(seen[0].2.as_deref().unwrap_or_default().contains("does not exist"), "{seen:?}");
    assert_eq!((seen[1].0.as_str(), seen[1].1, seen[1].2.as_deref()), ("postgres", 0, None));

    without.batch_execute("CREATE TABLE workspaces (id uuid PRIMARY KEY, last_used_at timestamptz)").unwrap();
    without.execute("INSERT INTO workspaces (id) VALUES ($1)", &[&ids[0]]).unwrap();
    wait_until("the kept mark to be applied once the table exists", || {
        without.execute("SELECT wsusage_flush()", &[]).is_ok() && count_used(&mut without) == 1
    });
}

#[test]
fn more_databases_than_wsusage_max_databases_get_a_clear_error_until_one_is_idle() {
    // The base interval of an hour: the first database keeps its mark pending, and so its
    // place, until the test shortens the interval below.
    let cluster = Cluster::start(&[("wsusage.max_databases", "1")]);
    let (mut first, ids) = cluster.with_workspaces(1);
    let mut second = database_with(&cluster, "second", &ids);
    first.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();

    let err = second.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap_err();
    let (code, message, detail, hint) = report(&err);
    assert_eq!(code, "53400");
    assert_eq!(message, "wsusage cannot track marks in more databases");
    assert!(detail.contains("wsusage.max_databases"), "{detail}");
    assert!(hint.contains("wsusage.max_databases"), "{hint}");
    let rejected: i64 = first.query_one("SELECT rejected FROM wsusage_stats", &[]).unwrap().get(0);
    assert_eq!(rejected, 1, "counted");

    // Once the first database's marks are flushed and its worker has gone (after an interval
    // with no marks), the place is free.
    first.batch_execute("ALTER SYSTEM SET wsusage.flush_interval = '200ms'").unwrap();
    first.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_until("the second database to get the place", || {
        match second.execute("SELECT wsusage_mark($1)", &[&ids[0]]) {
            Ok(_) => true,
            Err(err) => {
                assert_eq!(sqlstate(&err), "53400", "{err}");
                false
            }
        }
    });
    wait_until("the second database's mark to be applied", || count_used(&mut second) == 1);
    assert_eq!(count_used(&mut first), 1);
    let marks: i64 = first.query_one("SELECT marks FROM wsusage_stats", &[]).unwrap().get(0);
    assert_eq!(marks, 2, "the first database's mark stays counted after its place went to the second");
}

#[test]
fn renaming_a_database_its_worker_is_connected_to_succeeds_and_its_marks_follow() {
    let cluster = Cluster::start(&[]);
    let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    let mut old = database_with(&cluster, "old_name", &ids);
    old.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    cluster.wait_for_worker(&mut old, None);
    drop(old);

    let mut admin = cluster.connect();
    admin.batch_execute("ALTER DATABASE old_name RENAME TO new_name").unwrap();
    let mut renamed = cluster.connect_to("new_name");
    assert_eq!(flush(&mut renamed), 5, "the marks stayed with the database");
    assert_eq!(count_used(&mut renamed), 5);
}

#[test]
fn a_clean_shutdown_keeps_the_marks_of_databases_that_had_no_worker() {
    // One worker place: at shutdown only one of the three databases has a worker to make a
    // final flush; the others' marks are saved and flushed after the restart.
    let mut cluster = Cluster::start(&[("wsusage.max_workers", "1")]);
    let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let names = ["kept_a", "kept_b", "kept_c"];
    for name in names {
        let mut client = database_with(&cluster, name, &ids);
        client.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    }
    let mut admin = cluster.connect();
    // Its worker connected and waiting in its loop (not still starting), so that the shutdown
    // finds it ready for its final flush.
    wait_until("one worker to run, idle", || {
        let workers: Vec<Option<String>> = admin
            .query("SELECT wait_event_type FROM pg_stat_activity WHERE backend_type = 'wsusage'", &[])
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        workers == [Some("Extension".to_owned())]
    });
    drop(admin);

    cluster.stop("fast");
    assert!(cluster.log().contains("wsusage saved 8 pending ids"), "{}", cluster.log());
    cluster.start_again();
    assert!(cluster.log().contains("wsusage restored 8 pending ids saved at the last shutdown"), "{}", cluster.log());
    for name in names {
        let mut client = cluster.connect_to(name);
        client.query_one("SELECT wsusage_flush()", &[]).unwrap();
        assert_eq!(count_used(&mut client), 4, "{name}: nothing lost");
    }
}

#[test]
fn a_set_kept_full_by_one_failing_database_does_not_make_another_flush_in_a_loop() {
    let cluster = Cluster::start(&[("wsusage.max_pending", "64")]);
    let ids: Vec<Uuid> = (0..40).map(|_| Uuid::new_v4()).collect();
    // 40 of the set's 64 places (past its high-water mark of 32) held by a database whose table
    // is missing, so its flushes fail and its ids stay.
    let mut failing = database_with(&cluster, "failing", &ids);
    failing.batch_execute("ALTER TABLE workspaces RENAME TO parked").unwrap();
    failing.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    assert_eq!(flush_error(&mut failing).0, "42P01");

    // Another database marks steadily: it flushes at its interval, not at every mark.
    let mut busy = database_with(&cluster, "busy", &ids);
    for id in ids[..10].iter().cycle().take(100) {
        busy.execute("SELECT wsusage_mark($1)", &[id]).unwrap();
        thread::sleep(Duration::from_millis(20));
    }
    let flushes: i64 =
        busy.query_one("SELECT flushes FROM wsusage_stats_by_database WHERE datname = 'busy'", &[]).unwrap().get(0);
    assert!(flushes <= 1, "{flushes} flushes of the busy database within its interval");
    assert_eq!(flush(&mut busy), 10, "its own ids, once asked");
}

#[test]
fn dropping_a_database_discards_only_its_ids_from_the_set_it_shares_with_another() {
    let cluster = Cluster::start(&[]);
    // The same ids in both databases: their entries sit side by side in the shared set, so
    // discarding one database's entries moves the other's within it.
    let ids: Vec<Uuid> = (0..3000).map(|_| Uuid::new_v4()).collect();
    let mut survivor = database_with(&cluster, "survivor", &ids);
    let mut doomed = database_with(&cluster, "doomed", &ids);
    for chunk in ids.chunks(100) {
        let chunk = chunk.to_vec();
        survivor.execute("SELECT wsusage_mark_many($1)", &[&chunk]).unwrap();
        doomed.execute("SELECT wsusage_mark_many($1)", &[&chunk]).unwrap();
    }
    cluster.wait_for_worker(&mut doomed, None);
    drop(doomed);

    survivor.batch_execute("DROP DATABASE doomed").unwrap();
    wait_until("the dropped database's marks to be discarded", || {
        let (discarded, pending): (i64, i64) = survivor
            .query_one("SELECT ids_discarded, pending FROM wsusage_stats", &[])
            .map(|r| (r.get(0), r.get(1)))
            .unwrap();
        (discarded, pending) == (3000, 3000)
    });
    let pending: i64 = survivor.query_one("SELECT count(*) FROM wsusage_pending()", &[]).unwrap().get(0);
    assert_eq!(pending, 3000, "every id of the survivor is still pending");
    let marks: i64 = survivor.query_one("SELECT marks FROM wsusage_stats", &[]).unwrap().get(0);
    assert_eq!(marks, 6000, "the dropped database's marks stay in the cluster's count");
    assert_eq!(flush(&mut survivor), 3000);
    assert_eq!(count_used(&mut survivor), 3000);
}
