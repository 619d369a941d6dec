//! What a DBA can see: wsusage_stats, wsusage_pending, and who may call what.

use std::sync::Arc;
use std::thread;

use postgres::Row;
use uuid::Uuid;
use wsusage_tests::*;

fn stats(client: &mut Client) -> Row {
    client.query_one("SELECT * FROM wsusage_stats", &[]).expect("read wsusage_stats")
}

fn counter(row: &Row, column: &str) -> i64 {
    row.get(column)
}

#[test]
fn stats_count_marks_flushes_and_what_each_flush_wrote() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(10);
    let launcher = cluster.wait_for_launcher(&mut client);

    let fresh = stats(&mut client);
    assert_eq!(counter(&fresh, "marks"), 0);
    assert_eq!(counter(&fresh, "capacity"), 65536);
    assert!(fresh.get::<_, Option<chrono::DateTime<chrono::Utc>>>("last_flush_at").is_none());

    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    client.execute("SELECT wsusage_mark_many($1)", &[&vec![ids[1], ids[2], Uuid::new_v4()]]).unwrap();
    // A row that already holds a newer time is neither updated nor "without row".
    client.execute("UPDATE workspaces SET last_used_at = now() + interval '1 day' WHERE id = $1", &[&ids[2]]).unwrap();
    assert_eq!(counter(&stats(&mut client), "pending"), 4);

    let (before_flush, started) = (chrono::Utc::now(), std::time::Instant::now());
    assert_eq!(flush(&mut client), 4);
    let flush_call = started.elapsed();
    let after_flush = chrono::Utc::now();
    let after = stats(&mut client);
    assert_eq!(counter(&after, "marks"), 5, "every id of every call counts");
    assert_eq!(counter(&after, "pending"), 0);
    assert_eq!(counter(&after, "flushes"), 1);
    assert_eq!(counter(&after, "ids_flushed"), 4);
    assert_eq!(counter(&after, "rows_updated"), 2);
    assert_eq!(counter(&after, "ids_without_row"), 1);
    assert_eq!(counter(&after, "failures"), 0);
    assert_eq!(counter(&after, "rejected"), 0);
    assert_eq!(after.get::<_, Option<i32>>("launcher_pid"), Some(launcher));
    assert_eq!((counter(&after, "databases"), counter(&after, "workers")), (1, 1));
    let worker = cluster.wait_for_worker(&mut client, None);
    // How a DBA checks that it runs (the README's quick start): the launcher's log line, and the
    // launcher and a worker for the database with marks among the server's processes.
    let log = cluster.log();
    assert!(
        log.contains("wsusage launcher started: flushing pending marks every 3600000 ms with up to 4 workers"),
        "{log}"
    );
    let processes: Vec<(String, Option<String>)> = client
        .query(
            "SELECT backend_type, datname::text FROM pg_stat_activity WHERE backend_type LIKE 'wsusage%' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(processes, [("wsusage".to_owned(), Some("postgres".to_owned())), ("wsusage launcher".to_owned(), None)]);
    let by_database = client.query_one("SELECT * FROM wsusage_stats_by_database", &[]).unwrap();
    assert_eq!(by_database.get::<_, Option<String>>("datname").as_deref(), Some("postgres"));
    assert_eq!(by_database.get::<_, Option<i32>>("worker_pid"), Some(worker));
    for column in ["marks", "flushes", "ids_flushed", "rows_updated", "ids_without_row", "failures", "rejected"] {
        assert_eq!(counter(&by_database, column), counter(&after, column), "{column}: one database, same counts");
    }
    // The flush this test asked for, as timed around the call: it ended within the call, and
    // took some time, but not more than the call did.
    let last_flush_at = after.get::<_, Option<chrono::DateTime<chrono::Utc>>>("last_flush_at").unwrap();
    assert!(
        before_flush <= last_flush_at && last_flush_at <= after_flush,
        "{before_flush} <= {last_flush_at} <= {after_flush}"
    );
    let took_us: i64 = client
        .query_one("SELECT (extract(epoch FROM last_flush_duration) * 1e6)::bigint FROM wsusage_stats", &[])
        .unwrap()
        .get(0);
    assert!(0 < took_us && took_us <= flush_call.as_micros() as i64, "0 < {took_us} µs <= {flush_call:?}");
    // The flush's writes reach the table statistics that autovacuum reads (PostgreSQL 14's
    // statistics collector delivers them a moment later).
    wait_until("the flush's updates in pg_stat_user_tables", || {
        let updated: i64 = client
            .query_one("SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'workspaces'", &[])
            .unwrap()
            .get(0);
        updated >= 2
    });
}

#[test]
fn a_failing_flush_shows_in_stats_while_it_lasts_and_recovery_clears_the_streak() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(2);
    client.batch_execute("ALTER TABLE workspaces RENAME TO parked").unwrap();
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    for _ in 0..3 {
        client.execute("SELECT wsusage_flush()", &[]).unwrap_err();
    }
    let failing = stats(&mut client);
    assert_eq!(counter(&failing, "failures"), 3);
    assert_eq!(counter(&failing, "consecutive_failures"), 3);
    assert_eq!(counter(&failing, "pending"), 1, "the id is kept");
    let error: String = failing.get("last_error");
    assert!(error.contains("relation \"workspaces\" does not exist"), "{error}");
    assert!(failing.get::<_, Option<chrono::DateTime<chrono::Utc>>>("last_error_at").is_some());

    client.batch_execute("ALTER TABLE parked RENAME TO workspaces").unwrap();
    assert_eq!(flush(&mut client), 1);
    let recovered = stats(&mut client);
    assert_eq!(counter(&recovered, "consecutive_failures"), 0);
    assert_eq!(counter(&recovered, "failures"), 3, "the history stays");
    assert_eq!(counter(&recovered, "rows_updated"), 1);
}

#[test]
fn refused_marks_are_counted_and_stats_reset_zeroes_the_counters() {
    let cluster = Cluster::start(&[("wsusage.max_pending", "16")]);
    let (mut client, ids) = cluster.with_workspaces(20);
    client.batch_execute("ALTER TABLE workspaces RENAME TO parked").unwrap();
    client.execute("SELECT wsusage_mark_many($1)", &[&ids[..16].to_vec()]).unwrap();
    client.execute("SELECT wsusage_mark_many($1)", &[&ids[16..19].to_vec()]).unwrap_err();
    let full = stats(&mut client);
    assert_eq!(counter(&full, "rejected"), 3);
    assert_eq!(counter(&full, "marks"), 16);

    // A full set is past its high-water mark, where the worker may try an early flush at any
    // moment (a reset clears the streak of failures that may be holding it back): empty the set,
    // so that no flush can race with the reset below.
    client.batch_execute("ALTER TABLE parked RENAME TO workspaces").unwrap();
    flush(&mut client);
    assert_eq!(count_used(&mut client), 16);
    // Counters for the reset to zero, a failure and its streak among them, with the set well
    // below its high-water mark and the next periodic flush an hour away: from here on the
    // worker flushes only when asked.
    client.execute("SELECT wsusage_mark_many($1)", &[&ids[16..19].to_vec()]).unwrap();
    client.batch_execute("ALTER TABLE workspaces RENAME TO parked").unwrap();
    assert_eq!(flush_error(&mut client).0, "42P01");
    cluster.wait_for_worker(&mut client, None);

    let counters = ["marks", "rejected", "flushes", "ids_flushed", "rows_updated", "failures", "consecutive_failures"];
    let before = stats(&mut client);
    for column in counters {
        assert!(counter(&before, column) > 0, "{column}: something to reset");
    }
    client.batch_execute("SELECT wsusage_stats_reset()").unwrap();
    let zeroed = stats(&mut client);
    for column in counters {
        assert_eq!(counter(&zeroed, column), 0, "{column}");
    }
    assert_eq!(counter(&zeroed, "pending"), 3, "a reset forgets counters, not marks");
    let reset_before: chrono::DateTime<chrono::Utc> = full.get("stats_reset");
    assert!(zeroed.get::<_, chrono::DateTime<chrono::Utc>>("stats_reset") > reset_before);
}

#[test]
fn pending_shows_what_the_next_flush_will_write() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(3);
    client.execute("SELECT wsusage_mark_many($1)", &[&ids[..2].to_vec()]).unwrap();
    let before_last = now_us();
    client.execute("SELECT wsusage_mark($1)", &[&ids[1]]).unwrap();

    let rows =
        client.query("SELECT workspace_id, last_used_at FROM wsusage_pending() ORDER BY last_used_at", &[]).unwrap();
    let pending: Vec<(Uuid, chrono::DateTime<chrono::Utc>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(pending.len(), 2);
    assert_eq!(pending[1].0, ids[1]);
    assert!(pending[1].1 >= before_last, "the latest mark is what will be written");

    flush(&mut client);
    assert_eq!(client.query("SELECT * FROM wsusage_pending()", &[]).unwrap().len(), 0);
    assert_eq!(last_used(&mut client, &ids[1]), Some(pending[1].1));
}

/// `connections` sessions at once, each marking `marks` ids of `ids` one call at a time.
fn mark_from_many_sessions(cluster: &Arc<Cluster>, ids: &Arc<Vec<Uuid>>, connections: usize, marks: usize) {
    let threads: Vec<_> = (0..connections)
        .map(|t| {
            let (cluster, ids) = (cluster.clone(), ids.clone());
            thread::spawn(move || {
                let mut client = cluster.connect();
                let mark = client.prepare("SELECT wsusage_mark($1)").unwrap();
                for i in 0..marks {
                    client.execute(&mark, &[&ids[(t * 13 + i) % ids.len()]]).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn stats_counters_are_exact_under_concurrent_marking_and_a_reset_zeroes_every_sessions_count() {
    // More sessions than the lock and the counters have stripes: every session's marks count,
    // whichever stripe it shares, in the totals and in its database's row alike.
    const SESSIONS: usize = 24;
    const MARKS: usize = 400;
    let cluster = Arc::new(Cluster::start(&[]));
    let (mut client, ids) = cluster.with_workspaces(100);
    let ids = Arc::new(ids);
    let marks_now = |client: &mut Client| {
        let by_database: i64 = client.query_one("SELECT marks FROM wsusage_stats_by_database", &[]).unwrap().get(0);
        (counter(&stats(client), "marks"), by_database)
    };

    mark_from_many_sessions(&cluster, &ids, SESSIONS, MARKS);
    let marked = (SESSIONS * MARKS) as i64;
    assert_eq!(marks_now(&mut client), (marked, marked));

    client.batch_execute("SELECT wsusage_stats_reset()").unwrap();
    assert_eq!(marks_now(&mut client), (0, 0), "no session's count survives a reset");
    mark_from_many_sessions(&cluster, &ids, SESSIONS, MARKS / 4);
    let marked = (SESSIONS * (MARKS / 4)) as i64;
    assert_eq!(marks_now(&mut client), (marked, marked), "and counting starts again from zero");
}

#[test]
fn nothing_is_callable_by_public_and_monitoring_roles_read_the_stats() {
    let cluster = Cluster::start(&[]);
    let (mut admin, ids) = cluster.with_workspaces(1);
    admin
        .batch_execute("CREATE ROLE app LOGIN; CREATE ROLE watcher LOGIN IN ROLE pg_monitor; CREATE ROLE nobody LOGIN;")
        .unwrap();
    let connect_as = |role: &str| cluster.connect_as(role);

    let mut app = connect_as("app");
    for call in [
        "SELECT wsusage_mark(gen_random_uuid())",
        "SELECT wsusage_mark_many(ARRAY[gen_random_uuid()])",
        "SELECT wsusage_flush()",
        "SELECT * FROM wsusage_stats",
        "SELECT wsusage_stats_reset()",
    ] {
        let err = app.batch_execute(call).unwrap_err();
        assert_eq!(sqlstate(&err), "42501", "{call}");
    }
    // The README's grants for an application role: the functions, and the UPDATE a mark defers.
    admin
        .batch_execute(
            "GRANT EXECUTE ON FUNCTION wsusage_mark(uuid), wsusage_mark_many(uuid[]), wsusage_flush() TO app",
        )
        .unwrap();
    let err = app.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "a mark needs the privileges of the UPDATE it defers");
    admin.batch_execute("GRANT SELECT (id, last_used_at), UPDATE (last_used_at) ON workspaces TO app").unwrap();
    app.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    assert_eq!(flush(&mut app), 1);

    let mut watcher = connect_as("watcher");
    assert_eq!(counter(&stats(&mut watcher), "marks"), 1);
    watcher.query("SELECT * FROM wsusage_pending()", &[]).unwrap();
    let err = watcher.batch_execute("SELECT wsusage_stats_reset()").unwrap_err();
    assert_eq!(sqlstate(&err), "42501");

    let mut nobody = connect_as("nobody");
    let err = nobody.batch_execute("SELECT * FROM wsusage_stats").unwrap_err();
    assert_eq!(sqlstate(&err), "42501");
}
