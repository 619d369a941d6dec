//! Targets: the tables wsusage writes, one row each in `wsusage_target` of each database, beside
//! the `default` that the settings define. Keys are uuid, bigint or integer; timestamps are
//! timestamptz, timestamp or date; a target may skip rows written recently (min_change) and call a
//! function after each write (after_flush); marking one needs UPDATE on its timestamp column.
//! What runs inside one transaction — the trigger's refusals, the privilege checks — is tested by
//! `#[pg_test]`s: src/pg_tests/target_table.rs and privileges.rs.

use std::collections::HashMap;
use std::process::Command;
use std::thread;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use postgres::types::{ToSql, Type};
use postgres::Row;
use uuid::Uuid;
use wsusage_tests::*;

/// Register target `name` over `relation` (no min_change, no after_flush).
fn add_target(client: &mut Client, name: &str, relation: &str, id_column: &str, timestamp_column: &str) {
    client
        .batch_execute(&format!(
            "INSERT INTO wsusage_target (name, relation, id_column, timestamp_column)
                  VALUES ('{name}', '{relation}', '{id_column}', '{timestamp_column}')"
        ))
        .unwrap_or_else(|e| panic!("register target {name}: {e}"));
}

/// The uuid keys of `table` whose `column` is set, in order.
fn written_ids(client: &mut Client, table: &str, id_column: &str, column: &str) -> Vec<Uuid> {
    client
        .query(&format!("SELECT {id_column} FROM {table} WHERE {column} IS NOT NULL ORDER BY {id_column}"), &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

fn new_ids(n: usize) -> Vec<Uuid> {
    (0..n).map(|_| Uuid::new_v4()).collect()
}

/// The version of `table`'s row `id` (its xmin, as text): unchanged unless something wrote it.
fn xmin(client: &mut Client, table: &str, id: &(dyn ToSql + Sync)) -> String {
    client.query_one(&format!("SELECT xmin::text FROM {table} WHERE id = $1"), &[id]).unwrap().get(0)
}

/// `target`'s row of wsusage_stats_by_target, in the client's database.
fn target_stats(client: &mut Client, target: &str) -> Row {
    client
        .query_one(
            "SELECT * FROM wsusage_stats_by_target WHERE database = current_database() AND target = $1",
            &[&target],
        )
        .unwrap_or_else(|e| panic!("wsusage_stats_by_target row of {target}: {e}"))
}

fn counter(row: &Row, column: &str) -> i64 {
    row.get(column)
}

/// The keys of `target` that wsusage_pending() shows, in order.
fn pending_keys(client: &mut Client, target: &str) -> Vec<String> {
    client
        .query("SELECT key FROM wsusage_pending() WHERE target = $1 ORDER BY key", &[&target])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// The SQLSTATE and message that `sql` fails with.
fn refusal(client: &mut Client, sql: &str) -> (String, String) {
    let err = client.batch_execute(sql).expect_err(sql);
    let (code, message, _, _) = report(&err);
    (code, message)
}

/// A key of one of the three targets of the concurrency test.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Marked {
    Workspace(Uuid),
    User(Uuid),
    ApiKey(i64),
}

#[test]
fn three_targets_marked_concurrently_each_get_exactly_their_own_keys_at_their_latest_marks() {
    const ROWS: usize = 60;
    const MARKED: usize = 40; // rows MARKED.. of each table are never marked
    const SESSIONS: usize = 4;
    const ROUNDS: usize = 5;
    let cluster = Cluster::start(&[]);
    let (mut client, workspaces) = cluster.with_workspaces(ROWS);
    let users = new_ids(ROWS);
    let api_keys: Vec<i64> = (1..=ROWS as i64).collect();
    client
        .batch_execute(
            "CREATE TABLE users (id uuid PRIMARY KEY, last_seen_at timestamptz);
             CREATE TABLE api_keys (id bigint PRIMARY KEY, last_used timestamp without time zone);
             INSERT INTO wsusage_target (name, relation, id_column, timestamp_column)
                  VALUES ('users', 'users', 'id', 'last_seen_at');
             INSERT INTO wsusage_target (name, relation, id_column, timestamp_column, min_change)
                  VALUES ('api_keys', 'api_keys', 'id', 'last_used', '1 hour');",
        )
        .unwrap();
    client.execute("INSERT INTO users (id) SELECT unnest($1::uuid[])", &[&users]).unwrap();
    client.execute("INSERT INTO api_keys (id) SELECT unnest($1::bigint[])", &[&api_keys]).unwrap();

    let start = Gate::new(SESSIONS);
    let calls: Vec<Vec<(Marked, Window)>> = thread::scope(|scope| {
        let sessions: Vec<_> = (0..SESSIONS)
            .map(|session| {
                let party = start.party();
                let (cluster, workspaces, users, api_keys) = (&cluster, &workspaces, &users, &api_keys);
                scope.spawn(move || {
                    let mut client = cluster.connect();
                    let mark_default = client.prepare("SELECT wsusage_mark($1)").unwrap();
                    let mark_user = client.prepare("SELECT wsusage_mark('users', $1)").unwrap();
                    let mark_api_key = client.prepare("SELECT wsusage_mark_bigint('api_keys', $1)").unwrap();
                    party.wait();
                    let mut calls = Vec::with_capacity(ROUNDS * MARKED * 3);
                    for round in 0..ROUNDS {
                        // Every marked index each round, each session in its own order.
                        for k in 0..MARKED {
                            let i = (k + session * 11 + round * 7) % MARKED;
                            let before = now_us();
                            client.execute(&mark_default, &[&workspaces[i]]).unwrap();
                            calls.push((Marked::Workspace(workspaces[i]), (before, now_us())));
                            let before = now_us();
                            client.execute(&mark_user, &[&users[i]]).unwrap();
                            calls.push((Marked::User(users[i]), (before, now_us())));
                            let before = now_us();
                            client.execute(&mark_api_key, &[&api_keys[i]]).unwrap();
                            calls.push((Marked::ApiKey(api_keys[i]), (before, now_us())));
                        }
                    }
                    calls
                })
            })
            .collect();
        sessions.into_iter().map(|session| session.join().unwrap()).collect()
    });
    let mut latest: HashMap<Marked, Window> = HashMap::new();
    for (key, window) in calls.into_iter().flatten() {
        record_latest(&mut latest, key, window);
    }
    assert_eq!(latest.len(), 3 * MARKED);

    assert_eq!(flush(&mut client), 3 * MARKED as i64, "the distinct keys of the three targets");

    let rows = client.query("SELECT id, last_used_at FROM workspaces WHERE last_used_at IS NOT NULL", &[]).unwrap();
    let written_workspaces: HashMap<Uuid, DateTime<Utc>> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let rows = client.query("SELECT id, last_seen_at FROM users WHERE last_seen_at IS NOT NULL", &[]).unwrap();
    let written_users: HashMap<Uuid, DateTime<Utc>> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let rows = client.query("SELECT id, last_used FROM api_keys WHERE last_used IS NOT NULL", &[]).unwrap();
    let written_api_keys: HashMap<i64, NaiveDateTime> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(written_workspaces.len(), MARKED, "only the marked workspaces; the others stay NULL");
    assert_eq!(written_users.len(), MARKED, "only the marked users; the others stay NULL");
    assert_eq!(written_api_keys.len(), MARKED, "only the marked api keys; the others stay NULL");

    for (key, (from, to)) in &latest {
        match key {
            Marked::Workspace(id) => {
                let at = written_workspaces.get(id).unwrap_or_else(|| panic!("workspace {id} was not written"));
                assert!(from <= at && at <= to, "workspace {id}: {from} <= {at} <= {to}");
            }
            Marked::User(id) => {
                let at = written_users.get(id).unwrap_or_else(|| panic!("user {id} was not written"));
                assert!(from <= at && at <= to, "user {id}: {from} <= {at} <= {to}");
            }
            Marked::ApiKey(id) => {
                // timestamp without time zone: written in the server's zone, UTC in every test cluster.
                let at = written_api_keys.get(id).unwrap_or_else(|| panic!("api key {id} was not written"));
                let (from, to) = (from.naive_utc(), to.naive_utc());
                assert!(&from <= at && at <= &to, "api key {id}: {from} <= {at} <= {to}");
            }
        }
    }

    for target in ["default", "users", "api_keys"] {
        let stats = target_stats(&mut client, target);
        let figures: Vec<i64> = ["pending", "ids_flushed", "rows_updated", "ids_skipped_by_min_change", "failures"]
            .iter()
            .map(|column| counter(&stats, column))
            .collect();
        assert_eq!(
            figures,
            [0, MARKED as i64, MARKED as i64, 0, 0],
            "{target}: pending, flushed, updated, skipped, failures"
        );
    }
}

#[test]
fn min_change_leaves_rows_written_recently_as_they_are_and_counts_them_as_done() {
    let cluster = Cluster::start(&[]);
    let (mut client, _) = cluster.with_workspaces(0);
    client
        .batch_execute(
            "CREATE TABLE api_keys (id bigint PRIMARY KEY, last_used timestamp without time zone);
             INSERT INTO api_keys VALUES (1, localtimestamp - interval '10 minutes'),
                                         (2, localtimestamp - interval '2 hours');
             INSERT INTO wsusage_target (name, relation, id_column, timestamp_column, min_change)
                  VALUES ('api_keys', 'api_keys', 'id', 'last_used', '1 hour');",
        )
        .unwrap();
    let last_used = |client: &mut Client, id: i64| -> Option<NaiveDateTime> {
        client.query_one("SELECT last_used FROM api_keys WHERE id = $1", &[&id]).unwrap().get(0)
    };
    let (recent, recent_at) = (xmin(&mut client, "api_keys", &1i64), last_used(&mut client, 1));
    let old = xmin(&mut client, "api_keys", &2i64);

    let before = now_us();
    client.execute("SELECT wsusage_mark_many_bigint('api_keys', $1)", &[&vec![1i64, 2]]).unwrap();
    let after = now_us();
    assert_eq!(flush(&mut client), 2, "both keys are taken, one of them to be skipped");

    assert_eq!(xmin(&mut client, "api_keys", &1i64), recent, "written 10 minutes ago: the row version stays");
    assert_eq!(last_used(&mut client, 1), recent_at);
    assert_ne!(xmin(&mut client, "api_keys", &2i64), old, "written 2 hours ago: rewritten");
    let at = last_used(&mut client, 2).expect("a value");
    assert!(before.naive_utc() <= at && at <= after.naive_utc(), "{before} <= {at} <= {after}");

    let stats = target_stats(&mut client, "api_keys");
    assert_eq!(counter(&stats, "ids_skipped_by_min_change"), 1);
    assert_eq!(counter(&stats, "rows_updated"), 1);
    assert_eq!(counter(&stats, "ids_without_row"), 0, "the skipped key has a row");
    assert_eq!(counter(&stats, "pending"), 0, "the skipped key is done, not retried");
    assert!(pending_keys(&mut client, "api_keys").is_empty());
    let in_stats: i64 = client.query_one("SELECT ids_skipped_by_min_change FROM wsusage_stats", &[]).unwrap().get(0);
    let by_database: i64 = client
        .query_one(
            "SELECT ids_skipped_by_min_change FROM wsusage_stats_by_database WHERE datname = current_database()",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!((in_stats, by_database), (1, 1));
    assert_eq!(flush(&mut client), 0, "nothing left to retry");

    // The key just written is itself recent now: marked again, it is skipped.
    let written = xmin(&mut client, "api_keys", &2i64);
    client.execute("SELECT wsusage_mark_bigint('api_keys', $1)", &[&2i64]).unwrap();
    assert_eq!(flush(&mut client), 1);
    assert_eq!(xmin(&mut client, "api_keys", &2i64), written);
    assert_eq!(last_used(&mut client, 2), Some(at));
    assert_eq!(counter(&target_stats(&mut client, "api_keys"), "ids_skipped_by_min_change"), 2);
}

/// The test below compares days: rows dated "today" before the marks must still be today's
/// after them. Started within a minute of midnight (UTC, the clusters' time zone), it waits for
/// the new day first.
fn not_about_to_turn_midnight() {
    let seconds_left = 86_400 - Utc::now().timestamp().rem_euclid(86_400);
    if seconds_left < 60 {
        std::thread::sleep(std::time::Duration::from_secs(seconds_left as u64 + 1));
    }
}

#[test]
fn an_integer_key_takes_the_bigint_functions_and_a_date_column_moves_only_to_a_later_day() {
    not_about_to_turn_midnight();
    let cluster = Cluster::start(&[]);
    let (mut client, _) = cluster.with_workspaces(0);
    client
        .batch_execute(
            "CREATE TABLE devices (id integer PRIMARY KEY, seen_at timestamptz);
             INSERT INTO devices (id) SELECT generate_series(1, 10);
             CREATE TABLE accounts (id uuid PRIMARY KEY, last_activity_on date);",
        )
        .unwrap();
    add_target(&mut client, "devices", "devices", "id", "seen_at");
    add_target(&mut client, "accounts", "accounts", "id", "last_activity_on");
    let accounts = new_ids(3);
    let (yesterday, today, never) = (&accounts[0], &accounts[1], &accounts[2]);
    client
        .execute(
            "INSERT INTO accounts VALUES ($1, current_date - 1), ($2, current_date), ($3, NULL)",
            &[yesterday, today, never],
        )
        .unwrap();
    let day = |client: &mut Client, id: &Uuid| -> Option<NaiveDate> {
        client.query_one("SELECT last_activity_on FROM accounts WHERE id = $1", &[id]).unwrap().get(0)
    };
    let day_before = day(&mut client, yesterday).unwrap();
    let today_version = (xmin(&mut client, "accounts", today), day(&mut client, today));

    let before = now_us();
    client.execute("SELECT wsusage_mark_bigint('devices', $1)", &[&3i64]).unwrap();
    client.execute("SELECT wsusage_mark_many_bigint('devices', $1)", &[&vec![7i64, 8]]).unwrap();
    client.execute("SELECT wsusage_mark_many('accounts', $1)", &[&accounts]).unwrap();
    let after = now_us();
    assert_eq!(flush(&mut client), 6);

    let rows = client.query("SELECT id, seen_at FROM devices WHERE seen_at IS NOT NULL ORDER BY id", &[]).unwrap();
    let devices: Vec<(i32, DateTime<Utc>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(devices.iter().map(|d| d.0).collect::<Vec<_>>(), [3, 7, 8], "exactly the marked integer keys");
    for (id, at) in &devices {
        assert!(&before <= at && at <= &after, "device {id}: {before} <= {at} <= {after}");
    }

    // The mark's day, in the server's time zone (UTC in every test cluster).
    let (first_day, last_day) = (before.date_naive(), after.date_naive());
    for id in [yesterday, never] {
        let on = day(&mut client, id).expect("the date was written");
        assert!(first_day <= on && on <= last_day, "{first_day} <= {on} <= {last_day}");
    }
    assert!(day(&mut client, yesterday).unwrap() > day_before, "moved to a later day");
    assert_eq!(
        (xmin(&mut client, "accounts", today), day(&mut client, today)),
        today_version,
        "already today: the row is not rewritten"
    );

    // With a min_change of a day, a date column is written once a day, not every other day: a
    // row of yesterday is older than the mark's time minus a day.
    client.batch_execute("UPDATE wsusage_target SET min_change = '1 day' WHERE name = 'accounts'").unwrap();
    client.execute("UPDATE accounts SET last_activity_on = current_date - 1 WHERE id = $1", &[yesterday]).unwrap();
    let today_version = (xmin(&mut client, "accounts", today), day(&mut client, today));
    client.execute("SELECT wsusage_mark_many('accounts', $1)", &[&vec![*yesterday, *today]]).unwrap();
    assert_eq!(flush(&mut client), 2);
    assert!(day(&mut client, yesterday).unwrap() >= first_day, "yesterday's row is written");
    assert_eq!((xmin(&mut client, "accounts", today), day(&mut client, today)), today_version, "today's is not");
}

#[test]
fn after_flush_is_called_in_the_flushs_transaction_with_exactly_the_written_ids_and_its_error_keeps_them_pending() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(6);
    // The function is the application's: it sets a deadline one hour after each mark, records
    // the ids it was given, and raises while bump_refused says so.
    client
        .batch_execute(
            "ALTER TABLE workspaces ADD COLUMN deadline timestamptz;
             CREATE TABLE bumps (id uuid, marked timestamptz);
             CREATE TABLE bump_calls (size integer);
             CREATE TABLE bump_refused (refused boolean NOT NULL);
             INSERT INTO bump_refused VALUES (false);
             CREATE FUNCTION bump(ids uuid[], marked_at timestamptz[]) RETURNS void
               LANGUAGE plpgsql SET search_path = public AS $$
               BEGIN
                 IF (SELECT refused FROM bump_refused) THEN
                   RAISE EXCEPTION 'bump refused';
                 END IF;
                 INSERT INTO bump_calls VALUES (cardinality(ids));
                 UPDATE workspaces w SET deadline = m.marked + interval '1 hour'
                   FROM unnest(ids, marked_at) AS m(id, marked) WHERE w.id = m.id;
                 INSERT INTO bumps SELECT * FROM unnest(ids, marked_at);
               END $$;",
        )
        .unwrap();
    // A row named 'default' wins over the settings (which name the same table and columns, but
    // no function): only the row can make bump run.
    client
        .batch_execute(
            "INSERT INTO wsusage_target (name, relation, id_column, timestamp_column, after_flush)
                  VALUES ('default', 'workspaces', 'id', 'last_used_at', 'bump(uuid[], timestamptz[])')",
        )
        .unwrap();
    let calls = |client: &mut Client| -> (i64, i64) {
        let row = client.query_one("SELECT count(*), coalesce(sum(size), 0) FROM bump_calls", &[]).unwrap();
        (row.get(0), row.get(1))
    };
    // A row holding a later time is not written, nor is an id without a row: bump gets neither.
    client.execute("UPDATE workspaces SET last_used_at = now() + interval '1 day' WHERE id = $1", &[&ids[2]]).unwrap();
    client.execute("SELECT wsusage_mark_many($1)", &[&vec![ids[0], ids[1], ids[2], Uuid::new_v4()]]).unwrap();
    assert_eq!(flush(&mut client), 4);

    let bumped = sorted(&ids[..2]);
    assert_eq!(written_ids(&mut client, "bumps", "id", "marked"), bumped, "exactly the ids whose rows were written");
    assert_eq!(written_ids(&mut client, "workspaces", "id", "deadline"), bumped);
    assert_eq!(calls(&mut client), (1, 2), "one call, for the one chunk");
    let rows = client
        .query(
            "SELECT w.id, b.marked = w.last_used_at, w.deadline = w.last_used_at + interval '1 hour',
                    b.xmin::text, w.xmin::text
               FROM bumps b JOIN workspaces w USING (id)",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 2);
    for row in &rows {
        let id: Uuid = row.get(0);
        assert!(row.get::<_, bool>(1), "{id}: bump got the time the flush wrote");
        assert!(row.get::<_, bool>(2), "{id}: deadline one hour after it");
        let (bump_xmin, row_xmin): (String, String) = (row.get(3), row.get(4));
        assert_eq!(bump_xmin, row_xmin, "{id}: bump ran in the transaction that wrote the row");
    }

    // A flush that writes no row does not call it.
    client.execute("SELECT wsusage_mark_many($1)", &[&vec![ids[2], Uuid::new_v4()]]).unwrap();
    assert_eq!(flush(&mut client), 2);
    assert_eq!(calls(&mut client), (1, 2), "not called when no row was written");

    // Its error rolls the chunk back: the marks stay pending and the flush reports the error.
    client.batch_execute("UPDATE bump_refused SET refused = true").unwrap();
    client.execute("SELECT wsusage_mark_many($1)", &[&vec![ids[3], ids[4]]]).unwrap();
    let (_, message, _, _) = flush_error(&mut client);
    assert!(message.contains("bump refused"), "{message}");
    let pending: Vec<Uuid> = client
        .query("SELECT workspace_id FROM wsusage_pending() WHERE target = 'default' ORDER BY workspace_id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(pending, sorted(&ids[3..5]));
    assert_eq!(last_used(&mut client, &ids[3]), None, "the write was rolled back with the call");
    assert_eq!(last_used(&mut client, &ids[4]), None);
    let stats = target_stats(&mut client, "default");
    let last_error: Option<String> = stats.get("last_error");
    assert!(last_error.as_deref().unwrap_or_default().contains("bump refused"), "{last_error:?}");
    assert_eq!(counter(&stats, "consecutive_failures"), 1, "the one round asked for");

    // Fixed: the next flush applies them.
    client.batch_execute("UPDATE bump_refused SET refused = false").unwrap();
    assert_eq!(flush(&mut client), 2);
    assert_eq!(written_ids(&mut client, "bumps", "id", "marked"), sorted(&[ids[0], ids[1], ids[3], ids[4]]));
    assert_eq!(written_ids(&mut client, "workspaces", "id", "deadline"), sorted(&[ids[0], ids[1], ids[3], ids[4]]));
    assert!(last_used(&mut client, &ids[3]).is_some() && last_used(&mut client, &ids[4]).is_some());
    assert_eq!(calls(&mut client), (2, 4));
    assert!(pending_keys(&mut client, "default").is_empty());
    assert_eq!(counter(&target_stats(&mut client, "default"), "consecutive_failures"), 0);
}

#[test]
fn two_databases_may_define_the_same_target_name_over_different_tables() {
    let cluster = Cluster::start(&[]);
    let (mut here, _) = cluster.with_workspaces(0);
    let (mut there, _) = cluster.with_workspaces_in("other", 0);
    // The same ids in every table: a mark written to the wrong one would show.
    let ids = new_ids(4);
    here.batch_execute("CREATE TABLE users (id uuid PRIMARY KEY, last_seen_at timestamptz)").unwrap();
    here.execute("INSERT INTO users (id) SELECT unnest($1::uuid[])", &[&ids]).unwrap();
    add_target(&mut here, "users", "users", "id", "last_seen_at");
    there
        .batch_execute(
            "CREATE TABLE members (member_id uuid PRIMARY KEY, seen timestamptz);
             CREATE TABLE users (id uuid PRIMARY KEY, last_seen_at timestamptz);",
        )
        .unwrap();
    there.execute("INSERT INTO members (member_id) SELECT unnest($1::uuid[])", &[&ids]).unwrap();
    there.execute("INSERT INTO users (id) SELECT unnest($1::uuid[])", &[&ids]).unwrap();
    add_target(&mut there, "users", "members", "member_id", "seen");

    here.execute("SELECT wsusage_mark_many('users', $1)", &[&ids[..2].to_vec()]).unwrap();
    there.execute("SELECT wsusage_mark_many('users', $1)", &[&ids[2..].to_vec()]).unwrap();
    assert_eq!(flush(&mut here), 2, "this database's own keys");
    assert_eq!(flush(&mut there), 2, "that database's own keys");

    assert_eq!(written_ids(&mut here, "users", "id", "last_seen_at"), sorted(&ids[..2]));
    assert_eq!(written_ids(&mut there, "members", "member_id", "seen"), sorted(&ids[2..]));
    assert!(written_ids(&mut there, "users", "id", "last_seen_at").is_empty(), "other's target is members, not users");

    let rows = here
        .query(
            "SELECT database, ids_flushed, rows_updated FROM wsusage_stats_by_target
              WHERE target = 'users' ORDER BY database",
            &[],
        )
        .unwrap();
    let seen: Vec<(String, i64, i64)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    let expected: Vec<(String, i64, i64)> = vec![("other".to_owned(), 2, 2), ("postgres".to_owned(), 2, 2)];
    assert_eq!(seen, expected, "one row per database, each with its own figures");
}

#[test]
fn keys_of_a_deleted_target_are_discarded_once_it_is_missing_at_two_flushes_and_the_other_targets_are_written() {
    let cluster = Cluster::start(&[]);
    let (mut client, workspaces) = cluster.with_workspaces(2);
    let (users, guests) = (new_ids(2), new_ids(3));
    client
        .batch_execute(
            "CREATE TABLE users (id uuid PRIMARY KEY, last_seen_at timestamptz);
             CREATE TABLE guests (id uuid PRIMARY KEY, last_seen_at timestamptz);",
        )
        .unwrap();
    client.execute("INSERT INTO users (id) SELECT unnest($1::uuid[])", &[&users]).unwrap();
    client.execute("INSERT INTO guests (id) SELECT unnest($1::uuid[])", &[&guests]).unwrap();
    add_target(&mut client, "users", "users", "id", "last_seen_at");
    add_target(&mut client, "retired_guests", "guests", "id", "last_seen_at");
    let discarded = |client: &mut Client| -> i64 {
        client.query_one("SELECT ids_discarded FROM wsusage_stats", &[]).unwrap().get(0)
    };
    let discarded_before = discarded(&mut client);

    client.execute("SELECT wsusage_mark_many($1)", &[&workspaces]).unwrap();
    client.execute("SELECT wsusage_mark_many('users', $1)", &[&users]).unwrap();
    client.execute("SELECT wsusage_mark_many('retired_guests', $1)", &[&guests]).unwrap();
    assert_eq!(pending_keys(&mut client, "retired_guests").len(), 3);

    client.batch_execute("DELETE FROM wsusage_target WHERE name = 'retired_guests'").unwrap();
    flush(&mut client);

    assert_eq!(count_used(&mut client), 2, "the default target is written");
    assert_eq!(written_ids(&mut client, "users", "id", "last_seen_at"), sorted(&users), "so is users");
    assert!(written_ids(&mut client, "guests", "id", "last_seen_at").is_empty());
    // Kept a round: a row deleted and written again, or marked by the transaction writing it
    // before it commits, loses nothing. Still missing at the next flush, its keys are gone.
    assert_eq!(pending_keys(&mut client, "retired_guests").len(), 3, "kept a round");
    assert_eq!(discarded(&mut client), discarded_before);
    assert_eq!(flush(&mut client), 0);
    assert!(pending_keys(&mut client, "retired_guests").is_empty(), "its keys are gone");
    let pending: i64 = client.query_one("SELECT count(*) FROM wsusage_pending()", &[]).unwrap().get(0);
    assert_eq!(pending, 0);
    assert_eq!(discarded(&mut client), discarded_before + 3);
    wait_until("a LOG line naming the deleted target", || {
        cluster.log().lines().any(|line| line.contains("LOG:") && line.contains("retired_guests"))
    });

    // Discarded, not kept: defining the target again brings none of them back.
    add_target(&mut client, "retired_guests", "guests", "id", "last_seen_at");
    assert_eq!(flush(&mut client), 0);
    assert!(written_ids(&mut client, "guests", "id", "last_seen_at").is_empty());
}

#[test]
fn a_target_follows_its_table_through_a_rename_and_a_change_of_schema() {
    let cluster = Cluster::start(&[]);
    let (mut client, _) = cluster.with_workspaces(0);
    let ids = new_ids(3);
    client.batch_execute("CREATE TABLE users (id uuid PRIMARY KEY, last_seen_at timestamptz)").unwrap();
    client.execute("INSERT INTO users (id) SELECT unnest($1::uuid[])", &[&ids]).unwrap();
    add_target(&mut client, "users", "users", "id", "last_seen_at");
    let mark_and_flush = |client: &mut Client, id: &Uuid| {
        client.execute("SELECT wsusage_mark('users', $1)", &[id]).unwrap();
        assert_eq!(flush(client), 1);
    };
    let relation = |client: &mut Client| -> String {
        client.query_one("SELECT relation::text FROM wsusage_target WHERE name = 'users'", &[]).unwrap().get(0)
    };

    mark_and_flush(&mut client, &ids[0]);
    assert_eq!(written_ids(&mut client, "users", "id", "last_seen_at"), [ids[0]]);

    client.batch_execute("ALTER TABLE users RENAME TO people").unwrap();
    assert_eq!(relation(&mut client), "people");
    mark_and_flush(&mut client, &ids[1]);
    assert_eq!(written_ids(&mut client, "people", "id", "last_seen_at"), sorted(&ids[..2]));

    client.batch_execute("CREATE SCHEMA s; ALTER TABLE people SET SCHEMA s").unwrap();
    assert_eq!(relation(&mut client), "s.people");
    mark_and_flush(&mut client, &ids[2]);
    assert_eq!(written_ids(&mut client, "s.people", "id", "last_seen_at"), sorted(&ids));
}

/// What a backend checked of the `default` target holds only as long as the settings that define
/// it: a reload pointing it at another table is checked again at the next mark.
#[test]
fn a_reload_of_the_default_targets_settings_is_checked_again_by_marking_sessions() {
    let cluster = Cluster::start(&[]);
    let (mut admin, workspaces) = cluster.with_workspaces(2);
    admin
        .batch_execute(
            "CREATE TABLE secrets (id uuid PRIMARY KEY, last_used_at timestamptz);
             CREATE ROLE app LOGIN;
             GRANT EXECUTE ON FUNCTION wsusage_mark(uuid) TO app;
             GRANT SELECT (id, last_used_at), UPDATE (last_used_at) ON workspaces TO app;",
        )
        .unwrap();
    let mut app = cluster.connect_as("app");
    app.execute("SELECT wsusage_mark($1)", &[&workspaces[0]]).unwrap();

    admin.batch_execute("ALTER SYSTEM SET wsusage.\"table\" = 'secrets'").unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_until("the app's session to check the new default target", || {
        match app.execute("SELECT wsusage_mark($1)", &[&workspaces[1]]) {
            Ok(_) => false,
            Err(err) => {
                let (code, message, _, _) = report(&err);
                assert_eq!(code, "42501", "{message}");
                assert!(message.contains("secrets"), "{message}");
                true
            }
        }
    });
}

#[test]
fn untyped_parameters_resolve_to_one_function_each_as_drivers_send_them() {
    let cluster = Cluster::start(&[]);
    let (mut client, workspaces) = cluster.with_workspaces(3);
    let users = new_ids(6);
    client
        .batch_execute(
            "CREATE TABLE users (id uuid PRIMARY KEY, last_seen_at timestamptz);
             CREATE TABLE api_keys (id bigint PRIMARY KEY, last_used timestamp without time zone);
             INSERT INTO api_keys (id) SELECT generate_series(1, 10);",
        )
        .unwrap();
    client.execute("INSERT INTO users (id) SELECT unnest($1::uuid[])", &[&users]).unwrap();
    add_target(&mut client, "users", "users", "id", "last_seen_at");
    add_target(&mut client, "api_keys", "api_keys", "id", "last_used");
    let works = |client: &mut Client, sql: &str| {
        if let Err(err) = client.batch_execute(sql) {
            panic!("{sql}: {} {err}", sqlstate(&err));
        }
    };
    let prepared = |client: &mut Client, sql: &str, expected: &[Type]| {
        let statement = client.prepare_typed(sql, &[]).unwrap_or_else(|err| panic!("{sql}: {} {err}", sqlstate(&err)));
        assert_eq!(statement.params().to_vec(), expected.to_vec(), "{sql}");
        statement
    };

    // Parsed with no parameter types, as node-postgres does: the server infers each one.
    let mark = prepared(&mut client, "SELECT wsusage_mark($1)", &[Type::UUID]);
    client.execute(&mark, &[&workspaces[0]]).unwrap();
    let mark = prepared(&mut client, "SELECT wsusage_mark($1, $2)", &[Type::TEXT, Type::UUID]);
    client.execute(&mark, &[&"users", &users[0]]).unwrap();
    let mark_many = prepared(&mut client, "SELECT wsusage_mark_many($1, $2)", &[Type::TEXT, Type::UUID_ARRAY]);
    client.execute(&mark_many, &[&"users", &vec![users[1]]]).unwrap();
    let mark_bigint = prepared(&mut client, "SELECT wsusage_mark_bigint($1, $2)", &[Type::TEXT, Type::INT8]);
    client.execute(&mark_bigint, &[&"api_keys", &1i64]).unwrap();
    let mark_many_bigint =
        prepared(&mut client, "SELECT wsusage_mark_many_bigint($1, $2)", &[Type::TEXT, Type::INT8_ARRAY]);
    client.execute(&mark_many_bigint, &[&"api_keys", &vec![2i64]]).unwrap();

    // Untyped literals (simple query protocol): none is ambiguous (42725).
    works(&mut client, &format!("SELECT wsusage_mark('{}')", workspaces[1]));
    works(&mut client, &format!("SELECT wsusage_mark('users', '{}')", users[2]));
    works(&mut client, &format!("SELECT wsusage_mark_many('users', '{{{}}}')", users[3]));
    works(&mut client, "SELECT wsusage_mark_bigint('api_keys', '3')");
    works(&mut client, "SELECT wsusage_mark_many_bigint('api_keys', '{4,5}')");

    // Untyped parameters given as text, as drivers that send every value as a string do.
    works(
        &mut client,
        &format!(
            "PREPARE m AS SELECT wsusage_mark($1); EXECUTE m('{}');
             PREPARE m2 AS SELECT wsusage_mark($1, $2); EXECUTE m2('users', '{}');
             PREPARE mm2 AS SELECT wsusage_mark_many($1, $2); EXECUTE mm2('users', '{{{}}}');
             PREPARE mb AS SELECT wsusage_mark_bigint($1, $2); EXECUTE mb('api_keys', '6');
             PREPARE mmb AS SELECT wsusage_mark_many_bigint($1, $2); EXECUTE mmb('api_keys', '{{7}}');",
            workspaces[2], users[4], users[5]
        ),
    );

    // And the fresh reads, each to one function, reading what was just marked.
    let read = prepared(&mut client, "SELECT wsusage_pending_at($1)", &[Type::UUID]);
    assert!(client.query_one(&read, &[&workspaces[0]]).unwrap().get::<_, Option<DateTime<Utc>>>(0).is_some());
    let read = prepared(&mut client, "SELECT wsusage_pending_at($1, $2)", &[Type::TEXT, Type::UUID]);
    assert!(client.query_one(&read, &[&"users", &users[0]]).unwrap().get::<_, Option<DateTime<Utc>>>(0).is_some());
    let read = prepared(&mut client, "SELECT wsusage_pending_at_bigint($1, $2)", &[Type::TEXT, Type::INT8]);
    assert!(client.query_one(&read, &[&"api_keys", &1i64]).unwrap().get::<_, Option<DateTime<Utc>>>(0).is_some());
    works(
        &mut client,
        &format!(
            "SELECT wsusage_pending_at('{}'); SELECT wsusage_pending_at('users', '{}');
             SELECT wsusage_pending_at_bigint('api_keys', '3');
             PREPARE r AS SELECT wsusage_pending_at($1); EXECUTE r('{}');
             PREPARE r2 AS SELECT wsusage_pending_at($1, $2); EXECUTE r2('users', '{}');
             PREPARE rb AS SELECT wsusage_pending_at_bigint($1, $2); EXECUTE rb('api_keys', '6');",
            workspaces[1], users[2], workspaces[2], users[4]
        ),
    );

    assert_eq!(flush(&mut client), 3 + 6 + 7);
    assert_eq!(count_used(&mut client), 3);
    assert_eq!(written_ids(&mut client, "users", "id", "last_seen_at"), sorted(&users));
    let api_keys: Vec<i64> = client
        .query("SELECT id FROM api_keys WHERE last_used IS NOT NULL ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(api_keys, [1, 2, 3, 4, 5, 6, 7]);
}

/// Run a client program of the PostgreSQL build under test (pg_dump, psql), which must succeed.
fn run_client(program: &str, args: &[String]) {
    let out = Command::new(pg_bin().join(program)).args(args).output().unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Each target's row, every column as text, in name order.
fn target_rows(client: &mut Client) -> Vec<Vec<Option<String>>> {
    client
        .query(
            "SELECT name, relation::text, id_column::text, timestamp_column::text, min_change::text,
                    after_flush::text
               FROM wsusage_target ORDER BY name",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (0..6usize).map(|column| row.get::<_, Option<String>>(column)).collect())
        .collect()
}

/// `wsusage_target` is the extension's configuration table (`pg_extension_config_dump`): a plain
/// dump of the database carries its rows beside `CREATE EXTENSION`, and restoring the dump into
/// another database gives that database the same targets, which work there. The rows are
/// restored after the tables and functions they name exist, and pass the table's check.
#[test]
fn pg_dump_keeps_the_target_rows_and_the_restored_database_flushes_them() {
    let cluster = Cluster::start(&[]);
    let (mut client, _) = cluster.with_workspaces(0);
    let ids = new_ids(3);
    client
        .batch_execute(
            "CREATE TABLE users (id uuid PRIMARY KEY, last_seen_at timestamptz);
             CREATE TABLE user_visits (id uuid);
             CREATE FUNCTION note_visits(ids uuid[], marked_at timestamptz[]) RETURNS void
               LANGUAGE plpgsql SET search_path = public AS
               $$ BEGIN INSERT INTO user_visits SELECT unnest(ids); END $$;
             INSERT INTO wsusage_target (name, relation, id_column, timestamp_column, min_change, after_flush)
                  VALUES ('users', 'users', 'id', 'last_seen_at', '5 minutes', 'note_visits(uuid[], timestamptz[])');",
        )
        .unwrap();
    client.execute("INSERT INTO users (id) SELECT unnest($1::uuid[])", &[&ids]).unwrap();
    let rows = target_rows(&mut client);
    assert_eq!(rows.len(), 1);
    // Kept as text, not regprocedure, which pg_upgrade refuses in a table: qualified on write, so
    // no search path decides later which function it is.
    let after_flush: String = client.query_one("SELECT after_flush FROM wsusage_target", &[]).unwrap().get(0);
    assert_eq!(after_flush, "public.note_visits(uuid[], timestamp with time zone[])");

    let dump = cluster.dir.join("postgres.sql");
    run_client(
        "pg_dump",
        &[
            "--format=plain".to_owned(),
            format!("--file={}", dump.display()),
            format!("--dbname={}", cluster.conninfo("postgres")),
        ],
    );
    client.batch_execute("CREATE DATABASE restored").unwrap();
    run_client(
        "psql",
        &[
            "--no-psqlrc".to_owned(),
            "--quiet".to_owned(),
            "--set=ON_ERROR_STOP=1".to_owned(),
            format!("--file={}", dump.display()),
            format!("--dbname={}", cluster.conninfo("restored")),
        ],
    );

    let mut restored = cluster.connect_to("restored");
    let names: Vec<(String, String)> = restored
        .query("SELECT name, relation::text FROM wsusage_target", &[])
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(names, [("users".to_owned(), "users".to_owned())]);
    assert_eq!(target_rows(&mut restored), rows, "every column as it was");

    // The restored target is the restored database's own: its table, its function.
    restored.execute("SELECT wsusage_mark_many('users', $1)", &[&ids[..2].to_vec()]).unwrap();
    assert_eq!(flush(&mut restored), 2);
    assert_eq!(written_ids(&mut restored, "users", "id", "last_seen_at"), sorted(&ids[..2]));
    let visits: Vec<Uuid> =
        restored.query("SELECT id FROM user_visits ORDER BY id", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(visits, sorted(&ids[..2]));
    assert!(written_ids(&mut client, "users", "id", "last_seen_at").is_empty(), "the dumped database's rows untouched");
}

/// A target is its row as the next flush reads it: keys pending when the row is pointed at
/// another table (with the same key type) are written there, at their mark times, and none is
/// discarded or left on the old table.
#[test]
fn keys_pending_when_a_target_is_pointed_at_another_table_are_written_to_the_new_table() {
    let cluster = Cluster::start(&[]);
    let (mut client, _) = cluster.with_workspaces(0);
    // The same ids in both tables: a key written to the old table would show.
    let ids = new_ids(3);
    client
        .batch_execute(
            "CREATE TABLE users (id uuid PRIMARY KEY, last_seen_at timestamptz);
             CREATE TABLE members (id uuid PRIMARY KEY, seen timestamptz);",
        )
        .unwrap();
    client.execute("INSERT INTO users (id) SELECT unnest($1::uuid[])", &[&ids]).unwrap();
    client.execute("INSERT INTO members (id) SELECT unnest($1::uuid[])", &[&ids]).unwrap();
    add_target(&mut client, "users", "users", "id", "last_seen_at");
    let discarded = |client: &mut Client| -> i64 {
        client.query_one("SELECT ids_discarded FROM wsusage_stats", &[]).unwrap().get(0)
    };
    let discarded_before = discarded(&mut client);

    client.execute("SELECT wsusage_mark_many('users', $1)", &[&ids[..2].to_vec()]).unwrap();
    let marked: Vec<(String, DateTime<Utc>)> = client
        .query("SELECT key, last_used_at FROM wsusage_pending() WHERE target = 'users' ORDER BY key", &[])
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(marked.len(), 2);

    client
        .batch_execute("UPDATE wsusage_target SET relation = 'members', timestamp_column = 'seen' WHERE name = 'users'")
        .unwrap();
    assert_eq!(flush(&mut client), 2);

    let written: Vec<(String, DateTime<Utc>)> = client
        .query("SELECT id::text, seen FROM members WHERE seen IS NOT NULL ORDER BY id::text", &[])
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(written, marked, "the pending keys, at their mark times, in the new table");
    assert!(written_ids(&mut client, "users", "id", "last_seen_at").is_empty(), "nothing on the old table");
    assert!(pending_keys(&mut client, "users").is_empty());
    assert_eq!(discarded(&mut client), discarded_before, "none discarded");

    // Marks made since go to the new table too.
    client.execute("SELECT wsusage_mark('users', $1)", &[&ids[2]]).unwrap();
    assert_eq!(flush(&mut client), 1);
    assert_eq!(written_ids(&mut client, "members", "id", "seen"), sorted(&ids));
    assert!(written_ids(&mut client, "users", "id", "last_seen_at").is_empty());
}

/// A key is held with the type it was marked as, never reinterpreted: when a target's row is
/// changed from a uuid key column to a bigint one, its pending uuid keys can be written nowhere,
/// so the next flush discards them (counted in `ids_discarded`, logged with the reason) and
/// writes nothing. Marks of the new key type then work, and of the old type are refused.
#[test]
fn uuid_keys_pending_when_the_targets_key_becomes_bigint_are_discarded_with_a_log_line_and_write_nothing() {
    let cluster = Cluster::start(&[]);
    let (mut client, _) = cluster.with_workspaces(0);
    let ids = new_ids(2);
    client
        .batch_execute(
            "CREATE TABLE things (id uuid PRIMARY KEY, seen timestamptz);
             CREATE TABLE things_by_number (n bigint PRIMARY KEY, seen timestamptz);
             INSERT INTO things_by_number (n) SELECT generate_series(1, 5);",
        )
        .unwrap();
    client.execute("INSERT INTO things (id) SELECT unnest($1::uuid[])", &[&ids]).unwrap();
    add_target(&mut client, "things", "things", "id", "seen");
    let discarded = |client: &mut Client| -> i64 {
        client.query_one("SELECT ids_discarded FROM wsusage_stats", &[]).unwrap().get(0)
    };
    let discarded_before = discarded(&mut client);

    client.execute("SELECT wsusage_mark_many('things', $1)", &[&ids]).unwrap();
    assert_eq!(pending_keys(&mut client, "things").len(), 2);
    client
        .batch_execute("UPDATE wsusage_target SET relation = 'things_by_number', id_column = 'n' WHERE name = 'things'")
        .unwrap();
    flush(&mut client);

    assert!(pending_keys(&mut client, "things").is_empty(), "discarded, not kept");
    let pending: i64 = client.query_one("SELECT count(*) FROM wsusage_pending()", &[]).unwrap().get(0);
    assert_eq!(pending, 0);
    assert_eq!(discarded(&mut client), discarded_before + 2);
    let written: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM things WHERE seen IS NOT NULL)
                  + (SELECT count(*) FROM things_by_number WHERE seen IS NOT NULL)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(written, 0, "nothing written to either table");
    wait_until("a LOG line saying why the keys of things were discarded", || {
        cluster.log().lines().any(|line| {
            line.contains("LOG:")
                && line.contains("discarded 2 pending keys of target \"things\"")
                && line.contains("marked as uuid keys")
        })
    });

    // The target's keys are bigints now.
    client.execute("SELECT wsusage_mark_bigint('things', $1)", &[&3i64]).unwrap();
    assert_eq!(flush(&mut client), 1);
    let numbers: Vec<i64> = client
        .query("SELECT n FROM things_by_number WHERE seen IS NOT NULL", &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(numbers, [3]);
    let (code, message) = refusal(&mut client, &format!("SELECT wsusage_mark('things', '{}')", ids[0]));
    assert_eq!(code, "42804", "{message}");
}

/// An after_flush function takes an array of the key column's own type: `integer[]` for an
/// integer key, `bigint[]` for a bigint key (one for the other is refused), and is given exactly
/// the keys whose rows the chunk wrote, with the times written.
#[test]
fn after_flush_of_an_integer_or_bigint_key_takes_an_array_of_the_key_columns_own_type_and_gets_the_written_keys() {
    let cluster = Cluster::start(&[]);
    let (mut client, _) = cluster.with_workspaces(0);
    client
        .batch_execute(
            "CREATE TABLE devices (id integer PRIMARY KEY, seen_at timestamptz);
             INSERT INTO devices (id) SELECT generate_series(1, 10);
             CREATE TABLE api_keys (id bigint PRIMARY KEY, last_used timestamptz);
             INSERT INTO api_keys (id) SELECT generate_series(1, 10);
             CREATE TABLE flushed (target text, id bigint, marked timestamptz);
             CREATE FUNCTION note_devices(ids integer[], marked_at timestamptz[]) RETURNS void
               LANGUAGE plpgsql SET search_path = public AS
               $$ BEGIN
                    INSERT INTO flushed SELECT 'devices', m.id, m.marked FROM unnest(ids, marked_at) AS m(id, marked);
                  END $$;
             CREATE FUNCTION note_api_keys(ids bigint[], marked_at timestamptz[]) RETURNS void
               LANGUAGE plpgsql SET search_path = public AS
               $$ BEGIN
                    INSERT INTO flushed SELECT 'api_keys', m.id, m.marked FROM unnest(ids, marked_at) AS m(id, marked);
                  END $$;",
        )
        .unwrap();
    add_target(&mut client, "devices", "devices", "id", "seen_at");
    add_target(&mut client, "api_keys", "api_keys", "id", "last_used");

    // Each function fits its own key type only.
    for (target, function) in
        [("devices", "note_api_keys(bigint[], timestamptz[])"), ("api_keys", "note_devices(integer[], timestamptz[])")]
    {
        let (code, message) = refusal(
            &mut client,
            &format!("UPDATE wsusage_target SET after_flush = '{function}' WHERE name = '{target}'"),
        );
        assert_eq!(code, "42883", "{target} with {function}: {message}");
    }
    client
        .batch_execute(
            "UPDATE wsusage_target SET after_flush = 'note_devices(integer[], timestamptz[])' WHERE name = 'devices';
             UPDATE wsusage_target SET after_flush = 'note_api_keys(bigint[], timestamptz[])' WHERE name = 'api_keys';",
        )
        .unwrap();

    // 99 has no row: taken, not written, not given to the function.
    client.execute("SELECT wsusage_mark_many_bigint('devices', $1)", &[&vec![2i64, 5]]).unwrap();
    client.execute("SELECT wsusage_mark_bigint('api_keys', $1)", &[&9i64]).unwrap();
    client.execute("SELECT wsusage_mark_bigint('api_keys', $1)", &[&99i64]).unwrap();
    assert_eq!(flush(&mut client), 4);

    let logged: Vec<(String, i64, bool)> = client
        .query(
            "SELECT f.target, f.id, f.marked = coalesce(d.seen_at, a.last_used)
               FROM flushed AS f
               LEFT JOIN devices AS d ON f.target = 'devices' AND d.id = f.id
               LEFT JOIN api_keys AS a ON f.target = 'api_keys' AND a.id = f.id
              ORDER BY 1, 2",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get::<_, Option<bool>>(2).unwrap_or(false)))
        .collect();
    assert_eq!(
        logged,
        [("api_keys".to_owned(), 9, true), ("devices".to_owned(), 2, true), ("devices".to_owned(), 5, true)],
        "exactly the written keys, each with the time written to its row"
    );
}

#[test]
fn a_target_beyond_max_targets_is_refused_with_53400_and_the_others_keep_their_marks() {
    let cluster = Cluster::start(&[("wsusage.max_targets", "1")]);
    let (mut client, ids) = cluster.with_workspaces(2);
    client.batch_execute("CREATE TABLE others (id uuid PRIMARY KEY, seen timestamptz)").unwrap();
    add_target(&mut client, "others", "others", "id", "seen");
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();

    // The one target place is the default target's while its key is pending.
    let err = client.execute("SELECT wsusage_mark('others', $1)", &[&ids[1]]).unwrap_err();
    let (code, message, detail, hint) = report(&err);
    assert_eq!(code, "53400");
    assert_eq!(message, "wsusage cannot track marks of more targets");
    assert!(detail.contains("1 other targets") && detail.contains("wsusage.max_targets"), "{detail}");
    assert!(hint.contains("wsusage.max_targets"), "{hint}");

    // Flushed, the default target gives its place up to the next target that needs one.
    assert_eq!(flush(&mut client), 1);
    assert_eq!(count_used(&mut client), 1);
    client.execute("INSERT INTO others (id) VALUES ($1)", &[&ids[1]]).unwrap();
    client.execute("SELECT wsusage_mark('others', $1)", &[&ids[1]]).unwrap();
    assert_eq!(flush(&mut client), 1);
    let seen: Option<DateTime<Utc>> =
        client.query_one("SELECT seen FROM others WHERE id = $1", &[&ids[1]]).unwrap().get(0);
    assert!(seen.is_some());
}
