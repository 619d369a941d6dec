//! Every wrong call and wrong setting gets a clear error with its SQLSTATE, never a crash. The
//! wrong arguments that need no cluster of their own (a NULL key, text that is not one, hostile
//! text) are `#[pg_test]`s: src/pg_tests/arguments.rs.

use uuid::Uuid;
use wsusage_tests::*;

#[test]
fn a_full_set_refuses_new_ids_with_53400_but_accepts_pending_ones() {
    let cluster = Cluster::start(&[("wsusage.max_pending", "16")]);
    let (mut client, ids) = cluster.with_workspaces(20);
    // Park the table so that no flush (not even the early one a filling set triggers) can
    // empty the set while the test fills it.
    client.batch_execute("ALTER TABLE workspaces RENAME TO parked").unwrap();

    client.execute("SELECT wsusage_mark_many($1)", &[&ids[..16].to_vec()]).unwrap();

    let err = client.execute("SELECT wsusage_mark($1)", &[&ids[16]]).unwrap_err();
    let (code, message, detail, hint) = report(&err);
    assert_eq!(code, "53400");
    assert_eq!(message, "wsusage pending set is full");
    assert!(detail.contains("16"), "{detail}");
    assert!(hint.contains("wsusage.max_pending"), "{hint}");

    // Marking an id that is already pending never needs room.
    client.execute("SELECT wsusage_mark($1)", &[&ids[3]]).unwrap();

    let err = client.execute("SELECT wsusage_mark_many($1)", &[&vec![ids[0], ids[17]]]).unwrap_err();
    let (code, _, detail, _) = report(&err);
    assert_eq!(code, "53400");
    assert!(detail.contains("1 of the 2 ids were marked"), "{detail}");

    // A flush makes room again; nothing accepted was lost. (First let the early flush that the
    // filling set triggered fail on the parked table, so that it cannot take the ids later.)
    wait_until("the early flush attempt", || {
        client.query_one("SELECT flushes FROM wsusage_stats", &[]).unwrap().get::<_, i64>(0) >= 1
    });
    client.batch_execute("ALTER TABLE parked RENAME TO workspaces").unwrap();
    assert_eq!(flush(&mut client), 16);
    assert_eq!(count_used(&mut client), 16);
    client.execute("SELECT wsusage_mark($1)", &[&ids[16]]).unwrap();
}

#[test]
fn wsusage_database_restricts_marks_to_the_one_database_it_names() {
    let cluster = Cluster::start(&[("wsusage.database", "'postgres'")]);
    let mut admin = cluster.connect();
    admin.batch_execute("CREATE DATABASE elsewhere").unwrap();
    let mut client = cluster.connect_to("elsewhere");
    client.batch_execute("CREATE EXTENSION wsusage").unwrap();

    for call in [
        "SELECT wsusage_mark(gen_random_uuid())",
        "SELECT wsusage_flush()",
        "SELECT wsusage_pending_at(gen_random_uuid())",
    ] {
        let err = client.execute(call, &[]).unwrap_err();
        let (code, message, detail, hint) = report(&err);
        assert_eq!(code, "55000", "{call}");
        assert!(message.contains("\"elsewhere\""), "{message}");
        assert!(detail.contains("\"postgres\""), "{detail}");
        assert!(hint.contains("wsusage.database"), "{hint}");
    }
}

#[test]
fn without_shared_preload_libraries_every_function_says_how_to_fix_it() {
    let cluster = Cluster::start(&[("shared_preload_libraries", "''")]);
    let mut client = cluster.connect();
    client.batch_execute("CREATE EXTENSION wsusage").unwrap();
    for call in [
        "SELECT wsusage_mark(gen_random_uuid())",
        "SELECT wsusage_mark_many(ARRAY[gen_random_uuid()])",
        "SELECT wsusage_flush()",
        "SELECT wsusage_pending_at(gen_random_uuid())",
        "SELECT wsusage_pending_at('default', gen_random_uuid())",
        "SELECT wsusage_pending_at_bigint('default', 1)",
    ] {
        let err = client.execute(call, &[]).unwrap_err();
        let (code, message, _, hint) = report(&err);
        assert_eq!(code, "55000", "{call}");
        assert_eq!(message, "wsusage must be loaded via shared_preload_libraries");
        assert!(hint.contains("shared_preload_libraries"), "{hint}");
    }
    // The backend survived: the connection still works.
    client.execute("SELECT 1", &[]).unwrap();
}

#[test]
fn flush_gives_up_with_a_clear_error_when_no_launcher_can_run() {
    // No background worker slot at all: the launcher can never start.
    let cluster = Cluster::start(&[("max_worker_processes", "0")]);
    let (mut client, ids) = cluster.with_workspaces_and_no_worker(1);
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    // 15 s by default, longer than the launcher's restart delay; a caller may wait less.
    client.batch_execute("SET wsusage.launcher_wait = '1s'").unwrap();

    let (code, message, detail, hint) = flush_error(&mut client);
    assert_eq!(code, "55000");
    assert_eq!(message, "wsusage launcher is not running");
    assert!(
        detail.contains("during 1000 ms (\"wsusage.launcher_wait\")") && detail.contains("stay pending"),
        "{detail}"
    );
    assert!(hint.contains("max_worker_processes"), "{hint}");
}

#[test]
fn flush_fails_with_a_clear_error_when_no_flush_worker_can_start_and_the_marks_wait() {
    // One background worker slot: the launcher takes it, no flush worker can start (and no
    // logical replication launcher competes for it).
    let cluster = Cluster::start(&[("max_worker_processes", "1"), ("max_logical_replication_workers", "0")]);
    let (mut client, ids) = cluster.with_workspaces(1);
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();

    let (code, message, _, hint) = flush_error(&mut client);
    assert_eq!(code, "53000");
    assert!(message.contains("could not start a wsusage flush worker"), "{message}");
    assert!(hint.contains("log"), "{hint}");
    assert!(cluster.log().contains("raise \"max_worker_processes\""), "{}", cluster.log());
    let pending: i64 = client.query_one("SELECT pending FROM wsusage_stats", &[]).unwrap().get(0);
    assert_eq!(pending, 1, "the mark waits");
    assert_eq!(count_used(&mut client), 0);
}

#[test]
fn out_of_range_and_malformed_settings_are_rejected() {
    let cluster = Cluster::start(&[]);
    let mut client = cluster.connect();
    for (setting, value) in [
        ("wsusage.flush_interval", "'1ms'"),
        ("wsusage.flush_interval", "'2d'"),
        ("wsusage.flush_interval", "'-5s'"),
        ("wsusage.flush_interval", "'soon'"),
        ("wsusage.flush_interval", "'5 parsecs'"),
        ("wsusage.max_pending", "0"),
        ("wsusage.max_pending", "-1"),
        ("wsusage.max_pending", "100000000000"),
        ("wsusage.max_pending", "'64kB'"),
        ("wsusage.batch_size", "0"),
        ("wsusage.batch_size", "'many'"),
        ("wsusage.lock_timeout", "'-1s'"),
        ("wsusage.lock_timeout", "'2h'"),
        ("wsusage.statement_timeout", "'-1'"),
    ] {
        let err = client.batch_execute(&format!("ALTER SYSTEM SET {setting} = {value}")).unwrap_err();
        assert!(["22023", "22003"].contains(&sqlstate(&err).as_str()), "{setting} = {value}: {err:?}");
    }
    // Units are accepted and shown in their natural form.
    client.batch_execute("ALTER SYSTEM SET wsusage.flush_interval = '1min'").unwrap();
    client.batch_execute("ALTER SYSTEM SET wsusage.flush_interval = 500").unwrap();

    // Settings fixed at server start cannot change in a session.
    let err = client.batch_execute("SET wsusage.max_pending = 100").unwrap_err();
    assert_eq!(sqlstate(&err), "55P02");
    let err = client.batch_execute("SET wsusage.flush_interval = '1s'").unwrap_err();
    assert_eq!(sqlstate(&err), "55P02");
}

#[test]
fn a_misspelt_wsusage_setting_is_reported_at_start_and_refused_by_set_from_postgresql_15() {
    // In postgresql.conf the name is read before the library is loaded, which then reports it.
    let cluster = Cluster::start(&[("wsusage.flush_intervall", "'1s'")]);
    let log = cluster.log();
    let mut client = cluster.connect();
    if major() >= 15 {
        // The prefix is reserved: the name is dropped at start, and a session cannot make it.
        assert!(
            log.contains("WARNING:  invalid configuration parameter name \"wsusage.flush_intervall\", removing it"),
            "{log}"
        );
        assert!(log.contains("\"wsusage\" is now a reserved prefix."), "{log}");
        let err = client.batch_execute("SET wsusage.flush_intervall = '1s'").unwrap_err();
        assert_eq!(sqlstate(&err), "42602", "{err:?}");
    } else {
        // PostgreSQL 14 has no reserved prefixes: the name is only reported at start, and a
        // SET makes a placeholder of it.
        assert!(log.contains("WARNING:  unrecognized configuration parameter \"wsusage.flush_intervall\""), "{log}");
        client.batch_execute("SET wsusage.flush_intervall = '1s'").unwrap();
    }
    let interval: String = client.query_one("SHOW wsusage.flush_interval", &[]).unwrap().get(0);
    assert_eq!(interval, "1h", "the misspelt name changed no setting");
}

#[test]
fn overlong_database_and_role_names_are_refused() {
    let bad = [
        ("wsusage.database", format!("'{}'", "d".repeat(64)), ""),
        ("wsusage.role", format!("'{}'", "r".repeat(64)), ""),
    ];
    for (setting, value, default) in &bad {
        // In postgresql.conf: read before the library defines the setting, so PostgreSQL
        // reports it with a WARNING and keeps the default, as for any extension's setting.
        let cluster = Cluster::start(&[(setting, value.as_str())]);
        let log = cluster.log();
        assert!(log.contains(&format!("invalid value for parameter \"{setting}\"")), "{log}");
        assert!(log.contains("DETAIL:  Names are at most 63 bytes long."), "{log}");
        let mut client = cluster.connect();
        let shown: String = client.query_one(&format!("SHOW {setting}"), &[]).unwrap().get(0);
        assert_eq!(shown, *default);

        // Through ALTER SYSTEM: an error with the reason.
        let err = client.batch_execute(&format!("ALTER SYSTEM SET {setting} = {value}")).unwrap_err();
        let (code, _, detail, _) = report(&err);
        assert_eq!(code, "22023");
        assert!(!detail.is_empty());
    }
}

/// PostgreSQL keeps a setting's default, with a WARNING, when the configuration file's value is
/// refused at start; for these two settings the default is not what the DBA asked for (every
/// database; each table's owner rather than the role named).
#[test]
fn an_over_long_wsusage_role_in_the_configuration_file_stops_flushes_instead_of_flushing_as_another_role() {
    let long = format!("'{}'", "r".repeat(70));
    let cluster = Cluster::start(&[("wsusage.role", long.as_str())]);
    let (mut client, ids) = cluster.with_workspaces(2);
    client.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    let (code, message, _, _) = flush_error(&mut client);
    assert_eq!(code, "22023");
    assert!(message.contains("the server refused the value of \"wsusage.role\""), "{message}");
    assert_eq!(count_used(&mut client), 0, "nothing was written as another role");
    let pending: i64 = client.query_one("SELECT pending FROM wsusage_stats", &[]).unwrap().get(0);
    assert_eq!(pending, 2, "the marks stay pending");
    let log = cluster.log();
    assert!(log.contains("no wsusage flush worker runs: the server refused the value of \"wsusage.role\""), "{log}");
}

#[test]
fn an_over_long_wsusage_database_in_the_configuration_file_refuses_marks_instead_of_taking_them_everywhere() {
    let long = format!("'{}'", "d".repeat(70));
    let cluster = Cluster::start(&[("wsusage.database", long.as_str())]);
    let (mut client, ids) = cluster.with_workspaces(1);
    let error = client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).expect_err("refused");
    let (code, message, detail, hint) = report(&error);
    assert_eq!(code, "22023");
    assert_eq!(message, "wsusage is disabled: the server refused the value of \"wsusage.database\"");
    assert!(detail.contains("every database"), "{detail}");
    assert!(hint.contains("restart the server"), "{hint}");
}

/// `wsusage_mark_many` marks its array a block of 4,096 ids at a time; a set that fills in one
/// block refuses the ids of that block and of every block after it, and counts all of them.
#[test]
fn a_set_that_fills_during_a_long_mark_many_counts_every_id_it_refused() {
    let cluster = Cluster::start(&[("wsusage.max_pending", "16")]);
    let (mut client, _) = cluster.with_workspaces(0);
    let ids: Vec<Uuid> = (0..10_000).map(|_| Uuid::new_v4()).collect();
    let (code, _, detail, _) =
        report(&client.execute("SELECT wsusage_mark_many($1)", &[&ids]).expect_err("the set fills"));
    assert_eq!(code, "53400");
    assert!(detail.contains("16 of the 10000 ids were marked"), "{detail}");
    // (Not `pending`: the filling set woke the worker, which may have flushed the 16 already.)
    let row = client.query_one("SELECT marks, rejected FROM wsusage_stats", &[]).unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (16, 9_984));
}

#[test]
fn every_integer_setting_takes_its_bounds_and_refuses_one_beyond_them() {
    let cluster = Cluster::start(&[]);
    let mut client = cluster.connect();
    // The ranges the README's settings table gives (ms for the times).
    let bounds: [(&str, i64, i64); 9] = [
        ("wsusage.flush_interval", 10, 86_400_000),
        ("wsusage.batch_size", 1, 1_000_000),
        ("wsusage.lock_timeout", 0, 3_600_000),
        ("wsusage.statement_timeout", 0, 3_600_000),
        ("wsusage.launcher_wait", 0, 3_600_000),
        ("wsusage.max_pending", 16, 16_777_216),
        ("wsusage.max_databases", 1, 4_096),
        ("wsusage.max_targets", 1, 32_767),
        ("wsusage.max_workers", 1, 262_143),
    ];
    for (setting, min, max) in bounds {
        for value in [min, max] {
            client.batch_execute(&format!("ALTER SYSTEM SET {setting} = {value}")).unwrap();
        }
        for value in [min - 1, max + 1] {
            let err = client.batch_execute(&format!("ALTER SYSTEM SET {setting} = {value}")).unwrap_err();
            assert_eq!(sqlstate(&err), "22023", "{setting} = {value}");
        }
        let (low, high): (String, String) = client
            .query_one("SELECT min_val, max_val FROM pg_settings WHERE name = $1", &[&setting])
            .map(|row| (row.get(0), row.get(1)))
            .unwrap();
        assert_eq!((low, high), (min.to_string(), max.to_string()), "{setting} as pg_settings shows it");
    }
    client.batch_execute("ALTER SYSTEM RESET ALL").unwrap();
}
