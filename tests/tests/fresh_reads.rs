//! Fresh reads: `wsusage_pending_at` returns the time of a key's pending mark, the value the next
//! flush writes, so that `greatest(last_used_at, wsusage_pending_at(id))` is the column as of
//! now without a write. Per database and target; reading needs what reading the column needs.
//! The wrong calls, and reads within one transaction, are `#[pg_test]`s (src/pg_tests/).

use chrono::{DateTime, Utc};
use postgres::types::ToSql;
use uuid::Uuid;
use wsusage_tests::*;

/// A cluster whose worker never flushes by itself during a test: only `wsusage_flush()` does.
fn cluster() -> Cluster {
    Cluster::start(&[("wsusage.flush_interval", "'1h'")])
}

fn pending_at(client: &mut Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Option<DateTime<Utc>> {
    client.query_one(sql, params).unwrap_or_else(|e| panic!("{sql}: {} {e}", sqlstate(&e))).get(0)
}

fn refusal(client: &mut Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> (String, String, String, String) {
    report(&client.query(sql, params).expect_err(sql))
}

#[test]
fn a_pending_mark_reads_at_its_time_until_the_flush_writes_it() {
    let cluster = cluster();
    let (mut client, ids) = cluster.with_workspaces(3);
    let read = "SELECT wsusage_pending_at($1)";
    assert_eq!(pending_at(&mut client, read, &[&ids[0]]), None, "nothing marked yet");

    let before = now_us();
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    let after = now_us();
    let first = pending_at(&mut client, read, &[&ids[0]]).expect("a pending mark");
    assert!(before <= first && first <= after, "{before} <= {first} <= {after}");
    assert_eq!(pending_at(&mut client, read, &[&ids[1]]), None, "an id not marked");
    assert_eq!(pending_at(&mut client, read, &[&Option::<Uuid>::None]), None, "a NULL id has no pending mark");

    // Marked again: the later time, as the flush will write it.
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    let second = pending_at(&mut client, read, &[&ids[0]]).unwrap();
    assert!(second > first, "{second} > {first}");

    // The column as of now, for every row, without a write.
    let current: Vec<(Uuid, Option<DateTime<Utc>>)> = client
        .query("SELECT id, greatest(last_used_at, wsusage_pending_at(id)) FROM workspaces ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let expected: Vec<(Uuid, Option<DateTime<Utc>>)> =
        sorted(&ids).into_iter().map(|id| (id, (id == ids[0]).then_some(second))).collect();
    assert_eq!(current, expected);
    assert_eq!(count_used(&mut client), 0, "reading wrote nothing");

    // Flushed: nothing pending, and the column holds what the read said.
    assert_eq!(flush(&mut client), 1);
    assert_eq!(pending_at(&mut client, read, &[&ids[0]]), None);
    assert_eq!(last_used(&mut client, &ids[0]), Some(second));
    let current: Option<DateTime<Utc>> = client
        .query_one("SELECT greatest(last_used_at, wsusage_pending_at(id)) FROM workspaces WHERE id = $1", &[&ids[0]])
        .unwrap()
        .get(0);
    assert_eq!(current, Some(second));
}

#[test]
fn a_read_sees_its_own_target_and_database_only() {
    let cluster = cluster();
    let (mut client, ids) = cluster.with_workspaces(2);
    client
        .batch_execute(
            "CREATE TABLE users (id uuid PRIMARY KEY, last_seen_at timestamptz);
             CREATE TABLE api_keys (id bigint PRIMARY KEY, last_used date);
             CREATE TABLE counters (id integer PRIMARY KEY, touched_at timestamp);
             INSERT INTO wsusage_target (name, relation, id_column, timestamp_column) VALUES
                 ('users', 'users', 'id', 'last_seen_at'),
                 ('api_keys', 'api_keys', 'id', 'last_used'),
                 ('counters', 'counters', 'id', 'touched_at');",
        )
        .unwrap();
    let (mut elsewhere, _) = cluster.with_workspaces_in("elsewhere", 0);

    client.execute("SELECT wsusage_mark('users', $1)", &[&ids[0]]).unwrap();
    client.execute("SELECT wsusage_mark_bigint('api_keys', 42)", &[]).unwrap();
    client.execute("SELECT wsusage_mark_bigint('counters', -7)", &[]).unwrap();
    let users = pending_at(&mut client, "SELECT wsusage_pending_at('users', $1)", &[&ids[0]]);
    assert!(users.is_some(), "the target it was marked in");
    assert_eq!(pending_at(&mut client, "SELECT wsusage_pending_at($1)", &[&ids[0]]), None, "not the default's");
    assert_eq!(pending_at(&mut client, "SELECT wsusage_pending_at('default', $1)", &[&ids[0]]), None);
    // A date column's mark is still the time of the mark: the flush writes its date.
    let key = pending_at(&mut client, "SELECT wsusage_pending_at_bigint('api_keys', 42)", &[]);
    assert!(key.is_some_and(|at| at >= users.unwrap()), "{key:?} {users:?}");
    assert_eq!(pending_at(&mut client, "SELECT wsusage_pending_at_bigint('api_keys', 43)", &[]), None);
    assert!(pending_at(&mut client, "SELECT wsusage_pending_at_bigint('counters', -7)", &[]).is_some(), "integer keys");
    assert_eq!(pending_at(&mut client, "SELECT wsusage_pending_at_bigint('counters', 7)", &[]), None);

    // Another database has its own pending marks: none of these.
    elsewhere.batch_execute("CREATE TABLE users (id uuid PRIMARY KEY, last_seen_at timestamptz)").unwrap();
    elsewhere
        .batch_execute(
            "INSERT INTO wsusage_target (name, relation, id_column, timestamp_column)
                  VALUES ('users', 'users', 'id', 'last_seen_at')",
        )
        .unwrap();
    assert_eq!(pending_at(&mut elsewhere, "SELECT wsusage_pending_at('users', $1)", &[&ids[0]]), None);

    // Flushed, each target's read is empty; the bigint key was written as its date.
    assert_eq!(flush(&mut client), 3);
    assert_eq!(pending_at(&mut client, "SELECT wsusage_pending_at('users', $1)", &[&ids[0]]), None);
    assert_eq!(pending_at(&mut client, "SELECT wsusage_pending_at_bigint('api_keys', 42)", &[]), None);
}

/// Reading a pending mark reveals the column's next value: it needs what reading the column
/// does (USAGE on the schema, SELECT on the id and timestamp columns), not what marking needs,
/// checked again in the same session when privileges change, and no function or table the
/// reader controls takes part in the check.
#[test]
fn reading_needs_select_on_the_id_and_timestamp_columns_and_nothing_more() {
    let cluster = cluster();
    let (mut admin, ids) = cluster.with_workspaces(2);
    admin.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    let marked = pending_at(&mut admin, "SELECT wsusage_pending_at($1)", &[&ids[0]]).unwrap();
    admin
        .batch_execute(
            "CREATE ROLE dashboard LOGIN;
             CREATE SCHEMA dashboard AUTHORIZATION dashboard;
             GRANT EXECUTE ON FUNCTION wsusage_pending_at(uuid), wsusage_pending_at(text, uuid) TO dashboard;",
        )
        .unwrap();
    let mut dashboard = cluster.connect_as("dashboard");
    let denied = |dashboard: &mut Client, sql: &str| {
        let (code, message, detail, hint) = refusal(dashboard, sql, &[&ids[0]]);
        assert_eq!(code, "42501", "{sql}: {message}");
        assert!(message.contains("public.workspaces") && message.contains("last_used_at"), "{message}");
        assert!(detail.contains("SELECT"), "{detail}");
        assert_eq!(hint, "GRANT SELECT (id, last_used_at) ON public.workspaces TO the role that reads.");
    };

    // EXECUTE alone reads nothing, through either signature.
    denied(&mut dashboard, "SELECT wsusage_pending_at($1)");
    denied(&mut dashboard, "SELECT wsusage_pending_at('default', $1)");
    // The timestamp column without the id column is not enough: the read names a row by its id.
    admin.batch_execute("GRANT SELECT (last_used_at) ON workspaces TO dashboard").unwrap();
    denied(&mut dashboard, "SELECT wsusage_pending_at($1)");
    // Functions and a table of the reader's own, on its search path, change nothing.
    dashboard
        .batch_execute(
            "SET search_path = dashboard, pg_catalog, public;
             CREATE TABLE dashboard.workspaces (id uuid PRIMARY KEY, last_used_at timestamptz);
             CREATE FUNCTION dashboard.has_column_privilege(oid, oid, smallint, text) RETURNS boolean
                 LANGUAGE sql AS 'SELECT true';",
        )
        .unwrap();
    denied(&mut dashboard, "SELECT wsusage_pending_at($1)");
    dashboard.batch_execute("RESET search_path").unwrap();

    // SELECT on both columns reads, in the same session, without any UPDATE privilege: a role
    // that may read may not mark.
    admin.batch_execute("GRANT SELECT (id) ON workspaces TO dashboard").unwrap();
    assert_eq!(pending_at(&mut dashboard, "SELECT wsusage_pending_at($1)", &[&ids[0]]), Some(marked));
    assert_eq!(pending_at(&mut dashboard, "SELECT wsusage_pending_at('default', $1)", &[&ids[1]]), None);
    admin.batch_execute("GRANT EXECUTE ON FUNCTION wsusage_mark(uuid) TO dashboard").unwrap();
    let (code, _, _, _) = refusal(&mut dashboard, "SELECT wsusage_mark($1)", &[&ids[1]]);
    assert_eq!(code, "42501", "reading is not marking");

    // Without USAGE on the table's schema, no read.
    admin
        .batch_execute(
            "CREATE SCHEMA crm;
             CREATE TABLE crm.users (id uuid PRIMARY KEY, last_seen_at timestamptz);
             INSERT INTO wsusage_target (name, relation, id_column, timestamp_column)
                  VALUES ('users', 'crm.users', 'id', 'last_seen_at');
             GRANT SELECT ON crm.users TO dashboard;",
        )
        .unwrap();
    admin.execute("SELECT wsusage_mark('users', $1)", &[&ids[0]]).unwrap();
    let (code, message, _, _) = refusal(&mut dashboard, "SELECT wsusage_pending_at('users', $1)", &[&ids[0]]);
    assert_eq!(code, "42501", "{message}");
    assert!(message.contains("crm.users"), "{message}");
    admin.batch_execute("GRANT USAGE ON SCHEMA crm TO dashboard").unwrap();
    assert!(pending_at(&mut dashboard, "SELECT wsusage_pending_at('users', $1)", &[&ids[0]]).is_some());
    // Revoked: the next read in the same session is refused.
    admin.batch_execute("REVOKE SELECT (id) ON workspaces FROM dashboard").unwrap();
    denied(&mut dashboard, "SELECT wsusage_pending_at($1)");
    // A role that may mark may read.
    admin
        .batch_execute(
            "CREATE ROLE app LOGIN;
             GRANT EXECUTE ON FUNCTION wsusage_mark(uuid), wsusage_pending_at(uuid) TO app;
             GRANT SELECT (id, last_used_at), UPDATE (last_used_at) ON workspaces TO app;",
        )
        .unwrap();
    let mut app = cluster.connect_as("app");
    app.execute("SELECT wsusage_mark($1)", &[&ids[1]]).unwrap();
    assert!(pending_at(&mut app, "SELECT wsusage_pending_at($1)", &[&ids[1]]).is_some());
}
