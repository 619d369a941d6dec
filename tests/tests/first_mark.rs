//! A new session's first mark: it takes its target's declaration from what an earlier session
//! published in shared memory, rather than reading `wsusage_target` (see src/targets/published.rs), and
//! checks its own role's privileges itself. What it takes is never older than the last committed
//! change of `wsusage_target`, nor than the extension's table: each case below has other sessions
//! publish the old declaration first, then changes it, then marks from a session that has
//! resolved nothing yet.

use uuid::Uuid;
use wsusage_tests::*;

fn add_target(client: &mut Client, name: &str, relation: &str) {
    client
        .batch_execute(&format!(
            "INSERT INTO wsusage_target (name, relation, id_column, timestamp_column)
                  VALUES ('{name}', '{relation}', 'id', 'last_seen_at')"
        ))
        .unwrap_or_else(|e| panic!("register target {name}: {e}"));
}

/// Mark `id` of target `name` from a session of its own (a new backend), as `role` if given.
fn mark_in_new_session(cluster: &Cluster, role: Option<&str>, name: &str, id: &Uuid) -> Result<(), String> {
    let mut client = match role {
        Some(role) => cluster.connect_as(role),
        None => cluster.connect(),
    };
    client.execute("SELECT wsusage_mark($1, $2)", &[&name, id]).map(|_| ()).map_err(|e| sqlstate(&e))
}

/// Three sessions mark target `name`: the first claims its slot, the next publish and take it.
fn publish(cluster: &Cluster, name: &str) {
    for _ in 0..3 {
        mark_in_new_session(cluster, None, name, &Uuid::new_v4()).unwrap_or_else(|e| panic!("mark {name}: {e}"));
    }
}

/// A cluster whose target `people` over table `users` (and the tables of `more_sql`) has been
/// published by earlier sessions; the client of its first database.
fn with_people_published(cluster: &Cluster, more_sql: &str) -> Client {
    let (mut client, _) = cluster.with_workspaces(0);
    client.batch_execute("CREATE TABLE users (id uuid PRIMARY KEY, last_seen_at timestamptz)").unwrap();
    client.batch_execute(more_sql).unwrap();
    add_target(&mut client, "people", "users");
    publish(cluster, "people");
    client
}

fn written(client: &mut Client, table: &str, id: &Uuid) -> bool {
    let query = format!("SELECT last_seen_at IS NOT NULL FROM {table} WHERE id = $1");
    client.query_one(&query, &[id]).unwrap().get(0)
}

#[test]
fn a_target_deleted_or_pointed_elsewhere_is_seen_by_the_next_new_session() {
    let cluster = Cluster::start(&[]);
    let mut client =
        with_people_published(&cluster, "CREATE TABLE members (id uuid PRIMARY KEY, last_seen_at timestamptz)");

    client.batch_execute("DELETE FROM wsusage_target WHERE name = 'people'").unwrap();
    assert_eq!(mark_in_new_session(&cluster, None, "people", &Uuid::new_v4()), Err("42704".into()));

    add_target(&mut client, "people", "users");
    publish(&cluster, "people");
    client.batch_execute("UPDATE wsusage_target SET relation = 'members' WHERE name = 'people'").unwrap();
    let id = Uuid::new_v4();
    client.execute("INSERT INTO users (id) VALUES ($1)", &[&id]).unwrap();
    client.execute("INSERT INTO members (id) VALUES ($1)", &[&id]).unwrap();
    mark_in_new_session(&cluster, None, "people", &id).unwrap();
    flush(&mut client);
    assert!(written(&mut client, "members", &id), "the mark went to the table the target names now");
    assert!(!written(&mut client, "users", &id), "nothing went to the table it named before");
}

#[test]
fn a_published_target_is_still_refused_to_a_role_without_update_and_granted_at_once() {
    let cluster = Cluster::start(&[]);
    let mut client = with_people_published(
        &cluster,
        "CREATE ROLE app LOGIN;
         GRANT EXECUTE ON FUNCTION wsusage_mark(text, uuid) TO app;
         GRANT SELECT ON users TO app;",
    );

    assert_eq!(mark_in_new_session(&cluster, Some("app"), "people", &Uuid::new_v4()), Err("42501".into()));
    client.batch_execute("GRANT UPDATE (last_seen_at) ON users TO app").unwrap();
    mark_in_new_session(&cluster, Some("app"), "people", &Uuid::new_v4()).unwrap();
    client.batch_execute("REVOKE UPDATE (last_seen_at) ON users FROM app").unwrap();
    assert_eq!(mark_in_new_session(&cluster, Some("app"), "people", &Uuid::new_v4()), Err("42501".into()));
}

/// A transaction sees its own changes of `wsusage_target` before it commits, and nobody else
/// does, even after it marked: what it read is never published, and a rollback leaves the
/// committed declarations as they were.
#[test]
fn a_change_of_wsusage_target_not_yet_committed_is_seen_by_its_own_transaction_only() {
    let cluster = Cluster::start(&[]);
    let mut client = with_people_published(&cluster, "");
    let mut changing = cluster.connect();

    // A target created in an open transaction, marked there twice (the first mark claims its
    // slot; a second write makes the transaction read it again, with a slot to publish into).
    changing.batch_execute("BEGIN").unwrap();
    add_target(&mut changing, "ghost", "users");
    changing.execute("SELECT wsusage_mark('ghost', $1)", &[&Uuid::new_v4()]).unwrap();
    changing.batch_execute("UPDATE wsusage_target SET min_change = '0' WHERE name = 'ghost'").unwrap();
    changing.execute("SELECT wsusage_mark('ghost', $1)", &[&Uuid::new_v4()]).unwrap();
    assert_eq!(mark_in_new_session(&cluster, None, "ghost", &Uuid::new_v4()), Err("42704".into()), "not committed");
    // A published target deleted in the open transaction: gone for it, there for everyone else.
    changing.batch_execute("DELETE FROM wsusage_target WHERE name = 'people'").unwrap();
    let err = changing.execute("SELECT wsusage_mark('people', $1)", &[&Uuid::new_v4()]).unwrap_err();
    assert_eq!(sqlstate(&err), "42704", "its own delete");
    mark_in_new_session(&cluster, None, "people", &Uuid::new_v4()).unwrap();

    changing.batch_execute("ROLLBACK").unwrap();
    assert_eq!(mark_in_new_session(&cluster, None, "ghost", &Uuid::new_v4()), Err("42704".into()), "rolled back");
    let id = Uuid::new_v4();
    client.execute("INSERT INTO users (id) VALUES ($1)", &[&id]).unwrap();
    mark_in_new_session(&cluster, None, "people", &id).unwrap();
    changing.execute("SELECT wsusage_mark('people', $1)", &[&Uuid::new_v4()]).unwrap();
    flush(&mut client);
    assert!(written(&mut client, "users", &id));
}

#[test]
fn drop_and_create_extension_forgets_what_was_published() {
    let cluster = Cluster::start(&[]);
    let mut client = with_people_published(&cluster, "");

    client.batch_execute("DROP EXTENSION wsusage; CREATE EXTENSION wsusage").unwrap();
    assert_eq!(mark_in_new_session(&cluster, None, "people", &Uuid::new_v4()), Err("42704".into()));
}

#[test]
fn a_transaction_that_writes_wsusage_target_cannot_be_prepared() {
    let cluster = Cluster::start(&[("max_prepared_transactions", "2")]);
    let (mut client, _) = cluster.with_workspaces(0);
    client.batch_execute("CREATE TABLE users (id uuid PRIMARY KEY, last_seen_at timestamptz)").unwrap();
    let error = client
        .batch_execute(
            "BEGIN;
             INSERT INTO wsusage_target (name, relation, id_column, timestamp_column)
                  VALUES ('people', 'users', 'id', 'last_seen_at');
             PREPARE TRANSACTION 'people';",
        )
        .expect_err("PREPARE TRANSACTION should be refused");
    let (code, message, _, hint) = report(&error);
    assert_eq!(code, "0A000");
    assert_eq!(message, "cannot PREPARE a transaction that has written wsusage_target");
    assert!(hint.contains("in a transaction of its own"), "{hint}");
    client.batch_execute("ROLLBACK").unwrap();
    let prepared: i64 = client.query_one("SELECT count(*) FROM pg_prepared_xacts", &[]).unwrap().get(0);
    let rows: i64 = client.query_one("SELECT count(*) FROM wsusage_target", &[]).unwrap().get(0);
    assert_eq!((prepared, rows), (0, 0));

    // A transaction that did not write it prepares as any other.
    client.batch_execute("BEGIN; INSERT INTO users (id) VALUES (gen_random_uuid()); PREPARE TRANSACTION 'u';").unwrap();
    client.batch_execute("COMMIT PREPARED 'u'").unwrap();
}

#[test]
fn a_change_made_with_triggers_disabled_reaches_new_sessions_at_the_next_flush() {
    let cluster = Cluster::start(&[]);
    let mut client = with_people_published(&cluster, "");

    // What pg_restore --disable-triggers does: no trigger tells anyone.
    client
        .batch_execute(
            "SET session_replication_role = replica;
             DELETE FROM wsusage_target WHERE name = 'people';
             RESET session_replication_role;",
        )
        .unwrap();
    flush(&mut client);
    assert_eq!(mark_in_new_session(&cluster, None, "people", &Uuid::new_v4()), Err("42704".into()));
}

#[test]
fn where_a_column_or_the_settings_table_was_found_before_is_checked_before_it_is_taken() {
    let cluster = Cluster::start(&[]);
    let mut client =
        with_people_published(&cluster, "CREATE TABLE accounts (id uuid PRIMARY KEY, last_used_at timestamptz)");
    let workspace = Uuid::new_v4();
    client.execute("INSERT INTO workspaces (id) VALUES ($1)", &[&workspace]).unwrap();

    // The column dropped and added again: another column number.
    client
        .batch_execute(
            "ALTER TABLE users DROP COLUMN last_seen_at; ALTER TABLE users ADD COLUMN last_seen_at timestamptz",
        )
        .unwrap();
    let id = Uuid::new_v4();
    client.execute("INSERT INTO users (id) VALUES ($1)", &[&id]).unwrap();
    mark_in_new_session(&cluster, None, "people", &id).unwrap();
    flush(&mut client);
    assert!(written(&mut client, "users", &id));

    // The column renamed: the number found before names another column now.
    publish(&cluster, "people");
    client.batch_execute("ALTER TABLE users RENAME COLUMN last_seen_at TO seen_at").unwrap();
    assert_eq!(mark_in_new_session(&cluster, None, "people", &Uuid::new_v4()), Err("42703".into()));
    client.batch_execute("ALTER TABLE users RENAME COLUMN seen_at TO last_seen_at").unwrap();

    // The settings' table changed: the table found before is not the one they name.
    let default_mark = || {
        let mut session = cluster.connect();
        session.execute("SELECT wsusage_mark($1)", &[&workspace]).unwrap();
    };
    default_mark();
    default_mark();
    client.batch_execute(r#"ALTER SYSTEM SET wsusage."table" = 'accounts'"#).unwrap();
    client.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_until("the reload", || {
        cluster.connect().query_one(r#"SHOW wsusage."table""#, &[]).unwrap().get::<_, String>(0) == "accounts"
    });
    let account = Uuid::new_v4();
    client.execute("INSERT INTO accounts (id) VALUES ($1)", &[&account]).unwrap();
    let mut session = cluster.connect();
    session.execute("SELECT wsusage_mark($1)", &[&account]).unwrap();
    flush(&mut client);
    let written =
        |client: &mut Client, query: &str, id: &Uuid| client.query_one(query, &[id]).unwrap().get::<_, bool>(0);
    assert!(written(&mut client, "SELECT last_used_at IS NOT NULL FROM accounts WHERE id = $1", &account));
    assert!(!written(&mut client, "SELECT EXISTS (SELECT FROM workspaces WHERE id = $1)", &account));
}
