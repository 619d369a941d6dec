//! The worker's life: failures keep marks, restarts and shutdowns lose nothing, settings reload.

use wsusage_tests::*;

#[test]
fn a_failed_flush_keeps_its_ids_and_they_are_applied_once_the_cause_is_fixed() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(5);
    client.batch_execute("ALTER TABLE workspaces RENAME TO parked").unwrap();

    let before = now_us();
    client.execute("SELECT wsusage_mark_many($1)", &[&ids[..3].to_vec()]).unwrap();
    let after = now_us();

    // The caller gets the flush's own error, with its SQLSTATE.
    for _ in 0..2 {
        let (code, message, detail, _) = flush_error(&mut client);
        assert_eq!(code, "42P01");
        assert!(message.contains("relation \"workspaces\" does not exist"), "{message}");
        assert!(detail.contains("stay pending"), "{detail}");
    }
    // Marks made while the flushes fail merge with the kept ones.
    client.execute("SELECT wsusage_mark($1)", &[&ids[3]]).unwrap();

    // The DBA sees a WARNING with the SQL error and the count of failures in a row.
    let log = cluster.log();
    assert!(
        log.contains("WARNING:  wsusage could not flush 3 pending ids: relation \"workspaces\" does not exist"),
        "{log}"
    );
    assert!(log.contains("Consecutive failed flushes: 2."), "{log}");

    client.batch_execute("ALTER TABLE parked RENAME TO workspaces").unwrap();
    assert_eq!(flush(&mut client), 4);
    assert_eq!(count_used(&mut client), 4);
    let written = last_used(&mut client, &ids[0]).unwrap();
    assert!(before <= written && written <= after, "the kept mark's own time is written");
    wait_until("the recovery message", || cluster.log().contains("wsusage flush succeeded again: 4 pending ids"));
}

#[test]
fn the_worker_comes_back_after_pg_terminate_backend_and_pending_marks_survive() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(4);

    // Parked table: the worker's final flush on SIGTERM fails, so the marks are still pending
    // when it exits; a later worker must apply them.
    client.batch_execute("ALTER TABLE workspaces RENAME TO parked").unwrap();
    client.execute("SELECT wsusage_mark_many($1)", &[&ids[..2].to_vec()]).unwrap();
    let first = cluster.wait_for_worker(&mut client, None);
    let first_started = backend_start(&mut client, first).expect("the first worker's start");
    let terminated: bool = client.query_one("SELECT pg_terminate_backend($1)", &[&first]).unwrap().get(0);
    assert!(terminated);
    wait_until("the terminated worker to exit", || backend_start(&mut client, first).is_none());
    client.execute("SELECT wsusage_mark($1)", &[&ids[2]]).unwrap();
    client.batch_execute("ALTER TABLE parked RENAME TO workspaces").unwrap();

    let second = cluster.wait_for_worker(&mut client, Some(first));
    assert_eq!(flush(&mut client), 3);
    assert_eq!(count_used(&mut client), 3);
    assert_eq!(cluster.worker_pids(&mut client), [second], "the new worker alone served the flush");
    let second_started = backend_start(&mut client, second).expect("the second worker's start");
    assert!(second_started > first_started, "a new process, started after the first: {second_started}");
}

#[test]
fn the_launcher_and_the_worker_of_a_database_with_marks_are_visible_in_pg_stat_activity() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(1);
    let workers = "SELECT backend_type, application_name, datname FROM pg_stat_activity
                    WHERE backend_type LIKE 'wsusage%' ORDER BY backend_type";
    let seen = |client: &mut Client| -> Vec<(String, String, Option<String>)> {
        client.query(workers, &[]).unwrap().iter().map(|row| (row.get(0), row.get(1), row.get(2))).collect()
    };
    let launcher = ("wsusage launcher".to_owned(), String::new(), None);
    assert_eq!(seen(&mut client), std::slice::from_ref(&launcher), "no marks: no flush worker");

    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    cluster.wait_for_worker(&mut client, None);
    let worker = ("wsusage".to_owned(), "wsusage".to_owned(), Some("postgres".to_owned()));
    assert_eq!(seen(&mut client), [worker, launcher], "the first mark starts the database's worker");
}

#[test]
fn a_fast_shutdown_flushes_what_was_marked_just_before_it() {
    let mut cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(3);
    let before = now_us();
    client.execute("SELECT wsusage_mark_many($1)", &[&ids[..2].to_vec()]).unwrap();
    cluster.wait_for_worker(&mut client, None);
    drop(client);

    cluster.stop("fast");
    cluster.start_again();

    let mut client = cluster.connect();
    assert_eq!(count_used(&mut client), 2);
    assert!(last_used(&mut client, &ids[1]).unwrap() >= before);
    assert!(cluster
        .log()
        .contains("wsusage flush worker for database \"postgres\" shutting down after its final flush"));
}

#[test]
fn a_smart_shutdown_flushes_too() {
    let mut cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(1);
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    cluster.wait_for_worker(&mut client, None);
    drop(client);

    cluster.stop("smart");
    cluster.start_again();
    let mut client = cluster.connect();
    assert_eq!(count_used(&mut client), 1);
}

#[test]
fn a_shorter_flush_interval_takes_effect_on_reload_without_waiting_out_the_old_one() {
    let cluster = Cluster::start(&[("wsusage.flush_interval", "'1h'")]);
    let (mut client, ids) = cluster.with_workspaces(2);
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();

    client.batch_execute("ALTER SYSTEM SET wsusage.flush_interval = '200ms'").unwrap();
    client.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_until("the periodic flush after reload", || count_used(&mut client) == 1);

    // And it keeps flushing on its own at the new interval.
    client.execute("SELECT wsusage_mark($1)", &[&ids[1]]).unwrap();
    wait_until("the next periodic flush", || count_used(&mut client) == 2);
}

#[test]
fn a_set_past_its_high_water_mark_wakes_the_worker_early() {
    let cluster = Cluster::start(&[("wsusage.max_pending", "64"), ("wsusage.flush_interval", "'1h'")]);
    let (mut client, ids) = cluster.with_workspaces(40);
    client.execute("SELECT wsusage_mark_many($1)", &[&ids[..40].to_vec()]).unwrap();
    wait_until("an early flush", || count_used(&mut client) == 40);
}

#[test]
fn flush_honours_statement_timeout_and_cancel_while_the_worker_is_blocked() {
    // No lock timeout: the worker waits for as long as the application holds its lock.
    let cluster = Cluster::start(&[("wsusage.lock_timeout", "0")]);
    let (mut client, ids) = cluster.with_workspaces(1);

    // An application transaction holds a lock on the table that the worker's UPDATE needs.
    let mut holder = cluster.connect();
    holder.batch_execute("BEGIN; LOCK TABLE workspaces IN ACCESS EXCLUSIVE MODE").unwrap();

    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    client.batch_execute("SET statement_timeout = '500ms'").unwrap();
    let (code, message, _, _) = report(&client.execute("SELECT wsusage_flush()", &[]).unwrap_err());
    assert_eq!(code, "57014");
    assert!(message.contains("statement timeout"), "{message}");

    // Cancel works too: sent once the caller waits inside wsusage_flush(), so that it cannot
    // arrive before the call and cancel nothing.
    client.batch_execute("RESET statement_timeout").unwrap();
    let err = request_flush(&cluster, &mut client).expect_err("the blocked flush is cancelled");
    let (code, message, _, _) = report(&err);
    assert_eq!(code, "57014");
    assert!(message.contains("user request"), "the cancel, not a timeout: {message}");

    // Once the application commits, the blocked flush completes; nothing was lost.
    holder.batch_execute("COMMIT").unwrap();
    wait_until("the blocked flush to finish", || count_used(&mut client) == 1);
}

#[test]
fn wsusage_database_may_name_a_database_created_later() {
    // The database does not exist when the server starts; marks made there once it does are
    // flushed there.
    let cluster = Cluster::start(&[("wsusage.database", "'app'")]);
    let mut admin = cluster.connect();
    admin.batch_execute("CREATE EXTENSION wsusage").unwrap();
    admin.batch_execute("CREATE DATABASE app").unwrap();

    let mut app = cluster.connect_to("app");
    app.batch_execute(
        "CREATE EXTENSION wsusage;
         CREATE TABLE workspaces (id uuid PRIMARY KEY, last_used_at timestamptz);
         INSERT INTO workspaces VALUES ('00000000-0000-0000-0000-000000000001');",
    )
    .unwrap();
    app.batch_execute("SELECT wsusage_mark('00000000-0000-0000-0000-000000000001')").unwrap();
    assert_eq!(flush(&mut app), 1);
    assert_eq!(count_used(&mut app), 1);

    // In the other databases, marks are refused rather than lost.
    let err = admin.batch_execute("SELECT wsusage_mark(gen_random_uuid())").unwrap_err();
    assert_eq!(sqlstate(&err), "55000");
}

#[test]
fn pg_cancel_backend_on_the_idle_worker_does_not_end_it() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(1);
    let worker = cluster.start_worker(&mut client, &ids[0]);
    let cancelled: bool = client.query_one("SELECT pg_cancel_backend($1)", &[&worker]).unwrap().get(0);
    assert!(cancelled);
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    assert_eq!(flush(&mut client), 1);
    assert_eq!(cluster.worker_pid(&mut client), Some(worker), "the same worker served the flush");
}

/// `wsusage_flush()` waits for a launcher for a while (`wsusage.launcher_wait`, longer than the
/// launcher's restart delay): a caller who asks once the launcher was terminated — before the
/// postmaster restarted it, unless the machine stalled for 5 s — is served by the next one.
#[test]
fn a_flush_asked_for_after_the_launcher_was_terminated_is_served_by_the_restarted_one() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(3);
    let launcher = cluster.wait_for_launcher(&mut client);
    let terminated: bool = client.query_one("SELECT pg_terminate_backend($1)", &[&launcher]).unwrap().get(0);
    assert!(terminated);
    wait_until("the launcher to exit", || {
        client.query_opt("SELECT FROM pg_stat_activity WHERE backend_type = 'wsusage launcher'", &[]).unwrap().is_none()
    });
    // No launcher runs and no worker either (nothing was marked before): the marks wait, and the
    // caller with them.
    client.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    // The postmaster restarts the launcher 5 s after it exited: unless this machine stalled for
    // that long, the call below is made while no launcher runs.
    let absent: bool = client.query_one("SELECT launcher_pid IS NULL FROM wsusage_stats", &[]).unwrap().get(0);
    assert_eq!(flush(&mut client), 3, "served once the postmaster restarted the launcher");
    eprintln!("wsusage_flush() was called {}", if absent { "with no launcher running" } else { "after the restart" });
    let after = cluster.wait_for_launcher_other_than(&mut client, Some(launcher));
    assert_ne!(after, launcher);
    assert_eq!(count_used(&mut client), 3);
}
