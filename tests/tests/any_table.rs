//! Any table: the target is configurable, its names always reach SQL quoted, and a target that
//! does not fit is reported while the marks wait.

use wsusage_tests::*;

/// A schema and table with mixed case, spaces, quotes and a dot inside a quoted name, beside a
/// `workspaces` table holding the same ids, which must not change.
const TRICKY_SETUP: &str = r#"
    CREATE SCHEMA "Tenant One";
    CREATE TABLE "Tenant One"."device.log ""v2""" ("Device ID" uuid PRIMARY KEY, "Seen At" timestamp, note text);
    INSERT INTO "Tenant One"."device.log ""v2""" ("Device ID") SELECT id FROM workspaces;
"#;

#[test]
fn a_schema_qualified_table_with_quoted_names_is_written_and_nothing_else() {
    let cluster = Cluster::start(&[
        ("wsusage.table", r#"'"Tenant One"."device.log ""v2"""'"#),
        ("wsusage.id_column", r#"'"Device ID"'"#),
        ("wsusage.timestamp_column", r#"'"Seen At"'"#),
    ]);
    let (mut client, ids) = cluster.with_workspaces(3);
    client.batch_execute(TRICKY_SETUP).unwrap();

    let before = now_us();
    client.execute("SELECT wsusage_mark($1)", &[&ids[1]]).unwrap();
    let after = now_us();
    assert_eq!(flush(&mut client), 1);

    // "Seen At" is a timestamp without time zone: written in the worker's time zone, UTC in
    // every test cluster whatever the machine's, so it reads as the client's UTC clock.
    let seen: Option<chrono::NaiveDateTime> = client
        .query_one(r#"SELECT "Seen At" FROM "Tenant One"."device.log ""v2""" WHERE "Device ID" = $1"#, &[&ids[1]])
        .unwrap()
        .get(0);
    let seen = seen.expect("the row was written");
    assert!(before.naive_utc() <= seen && seen <= after.naive_utc(), "{before} <= {seen} <= {after}");
    let written: i64 =
        client.query_one(r#"SELECT count("Seen At") FROM "Tenant One"."device.log ""v2""""#, &[]).unwrap().get(0);
    assert_eq!(written, 1, "only the marked row");
    assert_eq!(count_used(&mut client), 0, "the workspaces table is untouched");
}

#[test]
fn hostile_setting_values_are_refused_or_name_nothing_and_change_nothing() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(2);
    client.batch_execute("CREATE TABLE x (i int); INSERT INTO x VALUES (1)").unwrap();
    cluster.start_worker(&mut client, &ids[1]);

    // Unquoted SQL after a name is a syntax error in the setting: refused with a reason.
    for value in ["'workspaces; DROP TABLE x'", "'workspaces WHERE true'", "'a.b.c'", "'\"unclosed'", "''"] {
        let err = client.batch_execute(&format!(r#"ALTER SYSTEM SET wsusage."table" = {value}"#)).unwrap_err();
        let (code, _, detail, _) = report(&err);
        assert_eq!(code, "22023", "{value}");
        assert!(!detail.is_empty(), "{value}");
    }
    let err = client.batch_execute("ALTER SYSTEM SET wsusage.id_column = 'id, last_used_at'").unwrap_err();
    assert_eq!(sqlstate(&err), "22023");
    let err = client.batch_execute("ALTER SYSTEM SET wsusage.timestamp_column = 't.last_used_at'").unwrap_err();
    assert_eq!(sqlstate(&err), "22023");

    // Quoted, it is just a name: of a table that does not exist.
    client.batch_execute(r#"ALTER SYSTEM SET wsusage."table" = '"workspaces; DROP TABLE x; --"'"#).unwrap();
    client.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_until("the reload to reach the worker", || {
        cluster.log().contains(r#"relation "workspaces; DROP TABLE x; --" does not exist"#)
    });
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    let err = client.execute("SELECT wsusage_flush()", &[]).unwrap_err();
    assert_eq!(sqlstate(&err), "42P01");
    let x: i64 = client.query_one("SELECT count(*) FROM x", &[]).unwrap().get(0);
    assert_eq!(x, 1, "table x is intact");

    // "table" is a reserved word: SQL spells the setting wsusage."table" (postgresql.conf does not care).
    client.batch_execute(r#"ALTER SYSTEM RESET wsusage."table""#).unwrap();
    client.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_until("the kept mark to be applied once the setting is fixed", || {
        client.execute("SELECT wsusage_flush()", &[]).is_ok() && count_used(&mut client) == 2
    });
}

#[test]
fn a_missing_column_or_a_wrong_type_is_reported_and_marks_wait_for_the_fix() {
    let cluster = Cluster::start(&[("wsusage.timestamp_column", "seen")]);
    let (mut client, ids) = cluster.with_workspaces(2);
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();

    let (code, message, _, _) = flush_error(&mut client);
    assert_eq!(code, "42703");
    assert!(message.contains(r#"column "seen" of relation "workspaces" does not exist"#), "{message}");
    let last_error: String = client.query_one("SELECT last_error FROM wsusage_stats", &[]).unwrap().get(0);
    assert!(last_error.contains(r#"column "seen""#), "{last_error}");

    client.batch_execute("ALTER TABLE workspaces ADD COLUMN seen text").unwrap();
    let (code, message, _, _) = flush_error(&mut client);
    assert_eq!(code, "42804");
    assert!(message.contains("has type text, but wsusage needs timestamptz, timestamp or date"), "{message}");

    client.batch_execute("ALTER TABLE workspaces ALTER COLUMN seen TYPE timestamptz USING NULL").unwrap();
    assert_eq!(flush(&mut client), 1);
    let seen: Option<chrono::DateTime<chrono::Utc>> =
        client.query_one("SELECT seen FROM workspaces WHERE id = $1", &[&ids[0]]).unwrap().get(0);
    assert!(seen.is_some());
}

#[test]
fn the_worker_checks_the_target_at_start_and_on_reload() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(2);
    cluster.start_worker(&mut client, &ids[1]);
    client.batch_execute("ALTER TABLE workspaces RENAME id TO workspace_id").unwrap();
    client.batch_execute("ALTER SYSTEM SET wsusage.id_column = 'uuid_of_nothing'").unwrap();
    client.batch_execute("SELECT pg_reload_conf()").unwrap();
    let problem = r#"WARNING:  wsusage cannot write its target: column "uuid_of_nothing" of relation "workspaces" does not exist"#;
    wait_until("the reload check's warning", || cluster.log().contains(problem));

    client.batch_execute("ALTER SYSTEM SET wsusage.id_column = 'workspace_id'").unwrap();
    client.batch_execute("SELECT pg_reload_conf()").unwrap();
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    wait_until("a flush into the renamed column", || {
        client.execute("SELECT wsusage_flush()", &[]).is_ok() && count_used(&mut client) == 2
    });
    assert_eq!(cluster.log().matches(problem).count(), 1, "said once");
}
