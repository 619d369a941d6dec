//! Security: no code runs with more privilege than its author has.
//!
//! The flush worker connects as the bootstrap superuser, but what it runs for a target — the
//! UPDATE, the count of ids without a row, the lock pass, the `after_flush` call, and with them
//! every trigger, CHECK, index expression and default of the table — runs as the **table's
//! owner**, under `SECURITY_RESTRICTED_OPERATION`, with every setting the owner's code changes
//! undone after each chunk. Every name in wsusage's own SQL is qualified with `pg_catalog` or
//! resolved under `search_path = pg_catalog, pg_temp`; `wsusage_target` is found as the
//! extension's member, never by name.
//!
//! Each test is an attack, or a way the owner's code or the catalogs change under a flush, that
//! ends with no role made superuser, no code run with more privilege than its owner has, and the
//! marks written where the owner's own code allows (kept, where it does not).

use std::collections::BTreeSet;

use uuid::Uuid;
use wsusage_tests::*;

/// Roles other than the cluster's own superuser that are superusers: none, in every test.
fn superusers_made(admin: &mut Client) -> Vec<String> {
    admin
        .query("SELECT rolname::text FROM pg_catalog.pg_roles WHERE rolsuper AND rolname <> 'postgres'", &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

fn figures(attack: &str, made: &[String]) {
    println!("attack: {attack}: roles made superuser {}", made.len());
}

/// `mallory`, a role that may only create in schema `public` (which every role may on
/// PostgreSQL 14), and `public.spy()`: counts its calls in a sequence (which no rollback undoes)
/// and tries to make mallory a superuser, which succeeds when it runs as one.
const MALLORY: &str = "
    CREATE ROLE mallory LOGIN;
    GRANT CREATE ON SCHEMA public TO mallory;";
const SPY: &str = "
    CREATE SEQUENCE public.spy_calls;
    GRANT USAGE ON SEQUENCE public.spy_calls TO PUBLIC;
    CREATE FUNCTION public.spy() RETURNS pg_catalog.bool LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_catalog.nextval('public.spy_calls');
        BEGIN
            EXECUTE 'ALTER ROLE mallory SUPERUSER';
        EXCEPTION WHEN insufficient_privilege THEN NULL;
        END;
        RETURN true;
    END $$;";

fn spy_calls(admin: &mut Client) -> i64 {
    admin.query_one("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM public.spy_calls", &[]).unwrap().get(0)
}

/// Attack 1: a table's owner attaches a trigger that makes it a superuser. The flush runs it as
/// the owner, in a restricted operation: its ALTER ROLE, a temporary table and SET ROLE are
/// refused (42501), which the trigger catches, so every row is written; the owner stays what it
/// was.
#[test]
fn a_table_owners_trigger_runs_as_the_owner_and_cannot_make_it_superuser() {
    let cluster = Cluster::start(&[]);
    let (mut admin, ids) = cluster.with_workspaces(3);
    admin
        .batch_execute(
            "CREATE ROLE app LOGIN;
             GRANT CREATE ON SCHEMA public TO app;
             ALTER TABLE workspaces OWNER TO app;
             GRANT EXECUTE ON FUNCTION wsusage_mark(uuid) TO app;",
        )
        .unwrap();
    let mut app = cluster.connect_as("app");
    app.batch_execute(
        "CREATE TABLE trigger_runs (who text, refused text, temp_refused text, set_role_refused text);
         CREATE FUNCTION escalate() RETURNS trigger LANGUAGE plpgsql AS $$
         DECLARE
             refused text;
         BEGIN
             BEGIN
                 ALTER ROLE app SUPERUSER;
             EXCEPTION WHEN insufficient_privilege THEN
                 refused := SQLSTATE;
             END;
             -- A restricted operation: nothing may outlive it in the worker's session, no SET ROLE.
             BEGIN
                 CREATE TEMP TABLE left_behind ();
                 INSERT INTO trigger_runs VALUES (current_user, refused, NULL);
             EXCEPTION WHEN insufficient_privilege THEN
                 INSERT INTO trigger_runs VALUES (current_user, refused, SQLSTATE);
             END;
             BEGIN
                 SET ROLE app;
             EXCEPTION WHEN insufficient_privilege THEN
                 UPDATE trigger_runs SET set_role_refused = SQLSTATE WHERE set_role_refused IS NULL;
             END;
             RETURN NEW;
         END $$;
         CREATE TRIGGER escalate BEFORE UPDATE ON workspaces FOR EACH ROW EXECUTE FUNCTION escalate();",
    )
    .unwrap();
    for id in &ids {
        app.execute("SELECT wsusage_mark($1)", &[id]).unwrap();
    }
    assert_eq!(flush(&mut admin), 3);

    let made = superusers_made(&mut admin);
    figures("a table owner's trigger", &made);
    assert!(made.is_empty(), "{made:?}");
    assert_eq!(count_used(&mut admin), 3, "the owner's trigger ran and every row was written");
    // Who ran the trigger, and the SQLSTATEs of its ALTER ROLE, temporary table and SET ROLE.
    let runs: Vec<(String, String)> = admin
        .query("SELECT who, concat_ws(' ', refused, temp_refused, set_role_refused) FROM trigger_runs", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(runs, vec![("app".to_owned(), "42501 42501 42501".to_owned()); 3], "as the owner, restricted");
}

/// A partition handed to another role: its triggers run as the owner of the table the target
/// names, as they do for any UPDATE of the partitioned table (whose owner attached it).
#[test]
fn a_partitions_trigger_runs_as_the_owner_of_the_partitioned_table() {
    let cluster = Cluster::start(&[]);
    let (mut admin, _) = cluster.with_workspaces(0);
    admin
        .batch_execute(
            "CREATE ROLE app LOGIN;
             CREATE ROLE bob LOGIN;
             GRANT CREATE ON SCHEMA public TO bob;
             CREATE TABLE users (id uuid PRIMARY KEY, last_seen_at timestamptz) PARTITION BY HASH (id);
             CREATE TABLE users_0 PARTITION OF users FOR VALUES WITH (MODULUS 1, REMAINDER 0);
             ALTER TABLE users OWNER TO app;
             ALTER TABLE users_0 OWNER TO bob;
             CREATE TABLE public.seen (who text);
             GRANT INSERT ON public.seen TO PUBLIC;
             INSERT INTO wsusage_target (name, relation, id_column, timestamp_column)
                  VALUES ('users', 'users', 'id', 'last_seen_at');",
        )
        .unwrap();
    let users: Vec<Uuid> = (0..2).map(|_| Uuid::new_v4()).collect();
    admin.execute("INSERT INTO users (id) SELECT unnest($1::uuid[])", &[&users]).unwrap();
    cluster
        .connect_as("bob")
        .batch_execute(
            "CREATE FUNCTION seen() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN INSERT INTO public.seen VALUES (current_user); RETURN NEW; END $$;
             CREATE TRIGGER seen BEFORE UPDATE ON users_0 FOR EACH ROW EXECUTE FUNCTION seen();",
        )
        .unwrap();
    admin.execute("SELECT wsusage_mark_many('users', $1)", &[&users]).unwrap();
    assert_eq!(flush(&mut admin), 2);
    let who: Vec<String> = admin.query("SELECT who FROM public.seen", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(who, ["app", "app"]);
    assert!(superusers_made(&mut admin).is_empty());
}

/// Look-alikes of a name wsusage's SQL uses, in `schema`: functions, aggregates, operators and
/// types that would win over pg_catalog's on a search path putting `schema` first (an exact
/// argument type beats pg_catalog's polymorphic `unnest(anyarray)` and `array_agg(anynonarray)`
/// wherever `schema` is, the pattern of CVE-2018-1058). Each calls `public.spy()` and otherwise
/// does what the real one does. Written by the schema's owner.
fn lookalikes(schema: &str) -> String {
    let s = schema;
    let mut sql = String::new();
    // Functions of the flush statements and of the catalog queries before 0.4.0 (the catalogs are
    // now read without SQL), with their real types.
    for (name, args, returns, body) in [
        ("unnest", "a pg_catalog.uuid[]", "SETOF pg_catalog.uuid", "RETURN QUERY SELECT pg_catalog.unnest(a)"),
        ("unnest", "a pg_catalog.int8[]", "SETOF pg_catalog.int8", "RETURN QUERY SELECT pg_catalog.unnest(a)"),
        (
            "unnest",
            "a pg_catalog.timestamptz[]",
            "SETOF pg_catalog.timestamptz",
            "RETURN QUERY SELECT pg_catalog.unnest(a)",
        ),
        (
            "format",
            "f pg_catalog.text, a pg_catalog.name, b pg_catalog.name",
            "pg_catalog.text",
            "RETURN pg_catalog.format(f, a, b)",
        ),
        ("to_regclass", "t pg_catalog.text", "pg_catalog.regclass", "RETURN pg_catalog.to_regclass(t)"),
        ("to_regprocedure", "t pg_catalog.text", "pg_catalog.regprocedure", "RETURN pg_catalog.to_regprocedure(t)"),
        (
            "has_column_privilege",
            "r pg_catalog.oid, t pg_catalog.oid, c pg_catalog.int2, p pg_catalog.text",
            "pg_catalog.bool",
            "RETURN true",
        ),
        (
            "has_schema_privilege",
            "r pg_catalog.oid, n pg_catalog.oid, p pg_catalog.text",
            "pg_catalog.bool",
            "RETURN true",
        ),
        ("pg_has_role", "a pg_catalog.oid, b pg_catalog.oid, p pg_catalog.text", "pg_catalog.bool", "RETURN true"),
        ("pg_get_userbyid", "o pg_catalog.oid", "pg_catalog.name", "RETURN pg_catalog.pg_get_userbyid(o)"),
        (
            "format_type",
            "o pg_catalog.oid, m pg_catalog.int4",
            "pg_catalog.text",
            "RETURN pg_catalog.format_type(o, m)",
        ),
        (
            "replace",
            "a pg_catalog.text, b pg_catalog.text, c pg_catalog.text",
            "pg_catalog.text",
            "RETURN pg_catalog.replace(a, b, c)",
        ),
        ("spy_count", "n pg_catalog.int8", "pg_catalog.int8", "RETURN n OPERATOR(pg_catalog.+) 1"),
        (
            "spy_append",
            "a pg_catalog.anyarray, e pg_catalog.anyelement",
            "pg_catalog.anyarray",
            "RETURN pg_catalog.array_append(a, e)",
        ),
    ] {
        sql.push_str(&format!(
            "CREATE FUNCTION {s}.{name}({args}) RETURNS {returns} LANGUAGE plpgsql AS
               $$ BEGIN PERFORM public.spy(); {body}; END $$;\n"
        ));
    }
    sql.push_str(&format!(
        "CREATE AGGREGATE {s}.count(*) (SFUNC = {s}.spy_count, STYPE = pg_catalog.int8, INITCOND = '0');\n"
    ));
    for element in ["pg_catalog.uuid", "pg_catalog.int8", "pg_catalog.timestamptz"] {
        sql.push_str(&format!(
            "CREATE AGGREGATE {s}.array_agg({element}) (SFUNC = {s}.spy_append, STYPE = {element}[]);\n"
        ));
    }
    // Operators: the flush's =, < and -, and the = and > of the catalog queries before 0.4.0.
    for (n, (op, left, right, returns)) in [
        ("=", "pg_catalog.uuid", "pg_catalog.uuid", "pg_catalog.bool"),
        ("=", "pg_catalog.int8", "pg_catalog.int8", "pg_catalog.bool"),
        ("=", "pg_catalog.oid", "pg_catalog.oid", "pg_catalog.bool"),
        ("=", "pg_catalog.name", "pg_catalog.text", "pg_catalog.bool"),
        ("<", "pg_catalog.timestamptz", "pg_catalog.timestamptz", "pg_catalog.bool"),
        ("<", "pg_catalog.date", "pg_catalog.date", "pg_catalog.bool"),
        ("<", "pg_catalog.date", "pg_catalog.\"timestamp\"", "pg_catalog.bool"),
        ("=", "pg_catalog.int4", "pg_catalog.int8", "pg_catalog.bool"),
        ("<", "pg_catalog.\"timestamp\"", "pg_catalog.\"timestamp\"", "pg_catalog.bool"),
        ("-", "pg_catalog.timestamptz", "pg_catalog.interval", "pg_catalog.timestamptz"),
        (">", "pg_catalog.interval", "pg_catalog.interval", "pg_catalog.bool"),
    ]
    .into_iter()
    .enumerate()
    {
        sql.push_str(&format!(
            "CREATE FUNCTION {s}.spy_operator_{n}(a {left}, b {right}) RETURNS {returns} LANGUAGE plpgsql AS
               $$ BEGIN PERFORM public.spy(); RETURN a OPERATOR(pg_catalog.{op}) b; END $$;
             CREATE OPERATOR {s}.{op} (LEFTARG = {left}, RIGHTARG = {right}, FUNCTION = {s}.spy_operator_{n});\n"
        ));
    }
    // Types the statements cast to: a domain of that name, whose check calls the spy.
    for name in ["uuid", "int8", "timestamptz", "interval", "date", "\"timestamp\""] {
        let real = format!("pg_catalog.{name}");
        sql.push_str(&format!("CREATE DOMAIN {s}.{name} AS {real} CHECK (public.spy());\n"));
    }
    sql
}

/// Attack 2: look-alikes of every name the flush statements use and the catalog queries before
/// 0.4.0 used, planted by a role that may only create in `public`, and by a table's owner in its
/// own schema, on a database whose search path puts both before pg_catalog. A flush of every kind of statement
/// (the UPDATE, its lock-skipping pass, the count of ids without a row, an `after_flush` call; uuid
/// and bigint keys, timestamptz, timestamp and date columns, a `min_change`), marks from a session with that
/// search path, never call one; the flush's session has that search path.
#[test]
fn lookalikes_of_every_name_wsusage_uses_are_never_called() {
    let cluster = Cluster::start(&[("wsusage.batch_size", "2"), ("wsusage.lock_timeout", "0")]);
    let (mut admin, ids) = cluster.with_workspaces(4);
    // The test's own superuser sessions must not call the look-alikes either.
    admin.batch_execute("SET search_path = pg_catalog, public").unwrap();
    admin
        .batch_execute(&format!(
            "{MALLORY}
             CREATE ROLE app LOGIN;
             CREATE SCHEMA app AUTHORIZATION app;
             ALTER TABLE workspaces OWNER TO app;
             CREATE TABLE public.api_keys (id bigint PRIMARY KEY, last_used timestamptz);
             ALTER TABLE api_keys OWNER TO app;
             CREATE TABLE public.visits (id uuid PRIMARY KEY, last_visit date);
             ALTER TABLE visits OWNER TO app;
             CREATE TABLE public.sessions (id uuid PRIMARY KEY, last_seen timestamp);
             ALTER TABLE sessions OWNER TO app;
             GRANT EXECUTE ON FUNCTION wsusage_mark(uuid), wsusage_mark(text, uuid),
                 wsusage_mark_many_bigint(text, bigint[]) TO app;"
        ))
        .unwrap();
    admin.execute("INSERT INTO api_keys (id) SELECT pg_catalog.generate_series(1, 4)", &[]).unwrap();
    admin.execute("INSERT INTO visits (id) SELECT pg_catalog.unnest($1::pg_catalog.uuid[])", &[&ids]).unwrap();
    admin.execute("INSERT INTO sessions (id) SELECT pg_catalog.unnest($1::pg_catalog.uuid[])", &[&ids]).unwrap();
    let mut mallory = cluster.connect_as("mallory");
    mallory.batch_execute(SPY).unwrap();
    mallory.batch_execute(&lookalikes("public")).unwrap();
    let mut app = cluster.connect_as("app");
    app.batch_execute(&lookalikes("app")).unwrap();
    app.batch_execute(
        "CREATE TABLE app.flushed (who pg_catalog.text, ids pg_catalog.int8, search_path pg_catalog.text);
         CREATE FUNCTION app.bump(ids pg_catalog.int8[], marked_at pg_catalog.timestamptz[]) RETURNS void
             LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO app.flushed
                      VALUES (current_user, pg_catalog.cardinality(ids), pg_catalog.current_setting('search_path'));
             END $$;",
    )
    .unwrap();
    admin
        .batch_execute(
            "INSERT INTO wsusage_target (name, relation, id_column, timestamp_column, min_change, after_flush)
                  VALUES ('api_keys', 'api_keys', 'id', 'last_used', '1 second',
                          'app.bump(bigint[], timestamptz[])'),
                         ('visits', 'visits', 'id', 'last_visit', '0', NULL),
                         ('sessions', 'sessions', 'id', 'last_seen', '0', NULL);
             ALTER DATABASE postgres SET search_path = \"$user\", public, pg_catalog;",
        )
        .unwrap();

    // Marks from a session whose search path puts the look-alikes first.
    let mut marker = cluster.connect_as("app");
    let without_row = Uuid::new_v4();
    for id in ids.iter().chain([&without_row]) {
        marker.execute("SELECT wsusage_mark($1)", &[id]).unwrap();
        marker.execute("SELECT wsusage_mark('visits', $1)", &[id]).unwrap();
        marker.execute("SELECT wsusage_mark('sessions', $1)", &[id]).unwrap();
    }
    marker.execute("SELECT wsusage_mark_many_bigint('api_keys', $1)", &[&vec![1i64, 2, 3, 4, 5]]).unwrap();
    // A row held: its chunk runs the lock-skipping pass.
    let mut holder = cluster.connect();
    holder.batch_execute("SET search_path = pg_catalog, public; BEGIN").unwrap();
    holder.execute("SELECT FROM workspaces WHERE id = $1 FOR UPDATE", &[&ids[0]]).unwrap();
    // 5 ids each of workspaces, visits and sessions and 5 api keys (one without a row each), less
    // the held row.
    assert_eq!(flush(&mut admin), 19);
    holder.batch_execute("COMMIT").unwrap();
    assert_eq!(flush(&mut admin), 1);

    let made = superusers_made(&mut admin);
    figures("look-alikes of every name, in public and in the owner's schema", &made);
    assert!(made.is_empty(), "{made:?}");
    assert_eq!(spy_calls(&mut admin), 0, "no look-alike was ever called");
    assert_eq!(count_used(&mut admin), 4);
    let written = |admin: &mut Client, sql: &str| -> i64 { admin.query_one(sql, &[]).unwrap().get(0) };
    assert_eq!(written(&mut admin, "SELECT count(*) FROM api_keys WHERE last_used IS NOT NULL"), 4);
    assert_eq!(written(&mut admin, "SELECT count(*) FROM visits WHERE last_visit IS NOT NULL"), 4);
    assert_eq!(written(&mut admin, "SELECT count(*) FROM sessions WHERE last_seen IS NOT NULL"), 4);
    let after_flush: Vec<(String, i64, String)> = admin
        .query("SELECT who, ids, search_path FROM app.flushed", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let hostile = "\"$user\", public, pg_catalog".to_owned();
    assert_eq!(
        after_flush,
        [("app".to_owned(), 2, hostile.clone()), ("app".to_owned(), 2, hostile)],
        "after_flush ran as the owner, on the search path that puts the look-alikes first"
    );
}

/// Attack 3: during the upgrade window (the library is new, the database's extension still at
/// 0.2.0, before `ALTER EXTENSION wsusage UPDATE` creates `wsusage_target`), a view named
/// `wsusage_target` in the extension's schema. Marking sessions and the worker look for the
/// extension's own table, never for the name: the view is never read.
#[test]
fn a_lookalike_wsusage_target_is_never_read() {
    let cluster = Cluster::start(&[]);
    install_release_script("0.2.0");
    let mut admin = cluster.connect();
    admin
        .batch_execute(&format!(
            "CREATE EXTENSION wsusage VERSION '0.2.0';
             CREATE TABLE workspaces (id uuid PRIMARY KEY, last_used_at timestamptz);
             {MALLORY}
             CREATE ROLE app LOGIN;
             GRANT EXECUTE ON FUNCTION wsusage_mark(uuid) TO app;
             GRANT SELECT (id, last_used_at), UPDATE (last_used_at) ON workspaces TO app;"
        ))
        .unwrap();
    cluster.wait_for_launcher(&mut admin);
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    admin.execute("INSERT INTO workspaces (id) SELECT unnest($1::uuid[])", &[&ids]).unwrap();
    let mut mallory = cluster.connect_as("mallory");
    mallory.batch_execute(SPY).unwrap();
    mallory
        .batch_execute(
            "CREATE VIEW public.wsusage_target AS
                 SELECT 'default'::text AS name, 'workspaces'::regclass AS relation, 'id'::name AS id_column,
                        'last_used_at'::name AS timestamp_column, interval '0' AS min_change,
                        NULL::text AS after_flush
                  WHERE public.spy();
             GRANT SELECT ON public.wsusage_target TO PUBLIC;",
        )
        .unwrap();

    let mut app = cluster.connect_as("app");
    for id in &ids {
        app.execute("SELECT wsusage_mark($1)", &[id]).unwrap();
    }
    assert_eq!(flush(&mut admin), 3);

    let made = superusers_made(&mut admin);
    figures("a look-alike wsusage_target in the upgrade window", &made);
    assert!(made.is_empty(), "{made:?}");
    assert_eq!(spy_calls(&mut admin), 0, "the view was never read");
    assert_eq!(count_used(&mut admin), 3, "the settings' target, the only one until the update");
}

/// What a table owner's code sets lasts until the end of its chunk: neither the next chunk of the
/// same table nor another owner's table sees it.
#[test]
fn what_an_owners_trigger_sets_reaches_neither_the_next_chunk_nor_another_target() {
    let cluster = Cluster::start(&[("wsusage.batch_size", "1")]);
    let (mut admin, ids) = cluster.with_workspaces(3);
    admin
        .batch_execute(
            "CREATE ROLE app LOGIN;
             CREATE ROLE bob LOGIN;
             GRANT CREATE ON SCHEMA public TO app, bob;
             CREATE SCHEMA evil;
             ALTER TABLE workspaces OWNER TO app;
             CREATE TABLE users (id uuid PRIMARY KEY, last_seen_at timestamptz);
             ALTER TABLE users OWNER TO bob;
             CREATE TABLE public.seen (tbl text, who text, search_path text, leak text, lock_timeout text);
             GRANT INSERT ON public.seen TO PUBLIC;
             INSERT INTO wsusage_target (name, relation, id_column, timestamp_column)
                  VALUES ('users', 'users', 'id', 'last_seen_at');",
        )
        .unwrap();
    admin.execute("INSERT INTO users (id) SELECT unnest($1::uuid[])", &[&ids]).unwrap();
    let trigger = |table: &str| {
        format!(
            "CREATE FUNCTION {table}_seen() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO public.seen VALUES ('{table}', current_user, pg_catalog.current_setting('search_path'),
                                                 pg_catalog.current_setting('myapp.leak', true),
                                                 pg_catalog.current_setting('lock_timeout'));
                 PERFORM pg_catalog.set_config('search_path', 'evil', false);
                 PERFORM pg_catalog.set_config('myapp.leak', 'set by {table}', false);
                 SET lock_timeout = 1;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER seen BEFORE UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION {table}_seen();"
        )
    };
    cluster.connect_as("app").batch_execute(&trigger("workspaces")).unwrap();
    cluster.connect_as("bob").batch_execute(&trigger("users")).unwrap();
    let default_path: String = admin.query_one("SHOW search_path", &[]).unwrap().get(0);

    for id in &ids {
        admin.execute("SELECT wsusage_mark($1)", &[id]).unwrap();
        admin.execute("SELECT wsusage_mark('users', $1)", &[id]).unwrap();
    }
    assert_eq!(flush(&mut admin), 6);
    assert_eq!(count_used(&mut admin), 3);

    let seen: Vec<(String, String, String, Option<String>, String)> = admin
        .query("SELECT tbl, who, search_path, leak, lock_timeout FROM public.seen", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(seen.len(), 6, "{seen:?}");
    for (table, who, search_path, leak, lock_timeout) in &seen {
        assert_eq!(who, if table == "workspaces" { "app" } else { "bob" }, "as the table's owner: {seen:?}");
        assert_eq!(search_path, &default_path, "the database's search path, never evil: {seen:?}");
        assert_eq!(leak.as_deref().unwrap_or(""), "", "nothing set by an earlier chunk: {seen:?}");
        assert_eq!(lock_timeout, "10ms", "a chunk's first attempt, not an earlier trigger's SET: {seen:?}");
    }
    let tables: BTreeSet<&str> = seen.iter().map(|(table, ..)| table.as_str()).collect();
    assert_eq!(tables, BTreeSet::from(["users", "workspaces"]));
}

/// A table owner lacking UPDATE on its own table: an ordinary privilege error, logged and in the
/// stats for that target only; the other targets are written; the marks are written once the
/// privilege is back.
#[test]
fn a_target_whose_owner_lacks_update_fails_alone_with_42501_and_keeps_its_marks() {
    let cluster = Cluster::start(&[]);
    let (mut admin, ids) = cluster.with_workspaces(2);
    admin
        .batch_execute(
            "CREATE ROLE bob LOGIN;
             CREATE TABLE users (id uuid PRIMARY KEY, last_seen_at timestamptz);
             ALTER TABLE users OWNER TO bob;
             INSERT INTO wsusage_target (name, relation, id_column, timestamp_column)
                  VALUES ('users', 'users', 'id', 'last_seen_at');",
        )
        .unwrap();
    admin.execute("INSERT INTO users (id) SELECT unnest($1::uuid[])", &[&ids]).unwrap();
    let mut bob = cluster.connect_as("bob");
    bob.batch_execute("REVOKE UPDATE ON users FROM bob").unwrap();
    admin.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    admin.execute("SELECT wsusage_mark_many('users', $1)", &[&ids]).unwrap();

    let (code, message, _, _) = flush_error(&mut admin);
    assert_eq!(code, "42501", "{message}");
    assert!(message.contains("target \"users\"") && message.contains("permission denied"), "{message}");
    assert_eq!(count_used(&mut admin), 2, "the default target, owned by a superuser, was written");
    let row = admin
        .query_one("SELECT pending, failures, last_error FROM wsusage_stats_by_target WHERE target = 'users'", &[])
        .unwrap();
    assert_eq!(row.get::<_, i64>("pending"), 2);
    assert_eq!(row.get::<_, i64>("failures"), 1, "the one round asked for");
    assert!(row.get::<_, String>("last_error").contains("permission denied"));
    assert!(cluster.log().contains("permission denied for table users"), "logged");

    bob.batch_execute("GRANT UPDATE ON users TO bob").unwrap();
    assert_eq!(flush(&mut admin), 2);
    let written: i64 =
        admin.query_one("SELECT count(*) FROM users WHERE last_seen_at IS NOT NULL", &[]).unwrap().get(0);
    assert_eq!(written, 2);
}

/// An `after_flush` function runs with the flush's privileges (the table owner's), so its owner
/// must have them: the table's owner, a member of it, or a superuser. Anyone else's is refused
/// when the row is written (42501), and when it changes hands later, at the next flush.
#[test]
fn after_flush_must_be_owned_by_a_role_with_the_privileges_of_the_tables_owner() {
    let cluster = Cluster::start(&[]);
    let (mut admin, _) = cluster.with_workspaces(0);
    admin
        .batch_execute(
            "CREATE ROLE app LOGIN;
             CREATE ROLE app_admin LOGIN IN ROLE app;
             CREATE ROLE mallory LOGIN;
             CREATE TABLE api_keys (id bigint PRIMARY KEY, last_used timestamptz);
             ALTER TABLE api_keys OWNER TO app;
             INSERT INTO api_keys SELECT generate_series(1, 4);
             CREATE TABLE public.calls (fn text, who text);
             GRANT INSERT ON public.calls TO PUBLIC;",
        )
        .unwrap();
    for (function, owner) in
        [("by_app", "app"), ("by_app_admin", "app_admin"), ("by_mallory", "mallory"), ("by_superuser", "postgres")]
    {
        admin
            .batch_execute(&format!(
                "CREATE FUNCTION {function}(ids bigint[], marked_at timestamptz[]) RETURNS void LANGUAGE sql
                     AS $$ INSERT INTO public.calls VALUES ('{function}', current_user) $$;
                 ALTER FUNCTION {function}(bigint[], timestamptz[]) OWNER TO {owner};"
            ))
            .unwrap();
    }
    let target = |function: &str| {
        format!(
            "INSERT INTO wsusage_target (name, relation, id_column, timestamp_column, after_flush)
                  VALUES ('api_keys', 'api_keys', 'id', 'last_used', '{function}(bigint[], timestamptz[])')"
        )
    };
    let err = admin.batch_execute(&target("by_mallory")).expect_err("mallory's function is refused");
    let (code, message, _, hint) = report(&err);
    assert_eq!(code, "42501", "{message}");
    assert!(message.contains("\"mallory\"") && message.contains("\"app\""), "names both roles: {message}");
    assert!(hint.contains("OWNER TO"), "{hint}");

    let mut key = 0i64;
    for function in ["by_app", "by_app_admin", "by_superuser"] {
        admin.batch_execute(&format!("DELETE FROM wsusage_target; {}", target(function))).unwrap();
        key += 1;
        admin.execute("SELECT wsusage_mark_bigint('api_keys', $1)", &[&key]).unwrap();
        assert_eq!(flush(&mut admin), 1, "{function}");
    }
    let calls: Vec<(String, String)> =
        admin.query("SELECT fn, who FROM public.calls", &[]).unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
    let as_app = |f: &str| (f.to_owned(), "app".to_owned());
    assert_eq!(calls, [as_app("by_app"), as_app("by_app_admin"), as_app("by_superuser")], "each ran as the owner");

    // Handed to a role without the owner's privileges later: refused at the next flush, kept.
    admin.batch_execute("ALTER FUNCTION by_superuser(bigint[], timestamptz[]) OWNER TO mallory").unwrap();
    admin.execute("SELECT wsusage_mark_bigint('api_keys', 4)", &[]).unwrap();
    let (code, message, _, _) = flush_error(&mut admin);
    assert_eq!(code, "42501", "{message}");
    assert!(message.contains("\"mallory\""), "{message}");
    let pending: i64 = admin.query_one("SELECT count(*) FROM wsusage_pending()", &[]).unwrap().get(0);
    assert_eq!(pending, 1);
    let calls: i64 = admin.query_one("SELECT count(*) FROM public.calls", &[]).unwrap().get(0);
    assert_eq!(calls, 3, "mallory's function never ran");
}

/// `wsusage.database` and `wsusage.role` change only at a restart, but the postmaster checks the
/// file again at each reload: a value refused then (too long) leaves the one in force as it is,
/// and must not make new sessions refuse to mark, nor new workers to flush.
#[test]
fn an_invalid_wsusage_role_or_database_at_a_reload_changes_nothing_until_the_restart() {
    let mut cluster = Cluster::start(&[]);
    let (mut admin, ids) = cluster.with_workspaces(2);
    let too_long = "x".repeat(70);
    let conf = cluster.data.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str(&format!("wsusage.role = '{too_long}'\nwsusage.database = '{too_long}'\n"));
    std::fs::write(&conf, text).unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_until("the postmaster to refuse both values", || {
        let log = cluster.log();
        log.contains("invalid value for parameter \"wsusage.role\"")
            && log.contains("invalid value for parameter \"wsusage.database\"")
    });

    // A session and a worker started after the reload: both as before it.
    let mut app = cluster.connect();
    app.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    assert_eq!(flush(&mut app), 1);
    assert_eq!(count_used(&mut admin), 1);

    // At the restart, the values are refused for good: no mark rather than marks for every
    // database.
    cluster.stop("fast");
    cluster.start_again();
    let mut admin = cluster.connect();
    let err = admin.execute("SELECT wsusage_mark($1)", &[&ids[1]]).unwrap_err();
    assert_eq!(sqlstate(&err), "22023");
}

/// Look-alikes planted in `public` before CREATE EXTENSION — of every operator and function
/// `wsusage_target`'s CHECKs use, and `>=` taking text, which an unknown literal could prefer —
/// are never taken: by the update to 0.3.0 that creates the table (its script runs with pg_catalog
/// first on the search path, and nothing in it is polymorphic), nor by a fresh install (which
/// names pg_catalog's). Writing a target then runs none of them.
#[test]
fn lookalikes_planted_before_create_extension_are_not_taken_by_its_scripts() {
    let cluster = Cluster::start(&[]);
    install_release_script("0.2.0");
    let mut admin = cluster.connect();
    admin.batch_execute("CREATE DATABASE fresh").unwrap();
    admin.batch_execute(MALLORY).unwrap();
    let mut plant = String::from(SPY);
    for (n, (op, left, right)) in [
        (">=", "pg_catalog.interval", "pg_catalog.text"),
        (">=", "pg_catalog.interval", "pg_catalog.interval"),
        (">=", "pg_catalog.int4", "pg_catalog.int4"),
        ("<=", "pg_catalog.int4", "pg_catalog.int4"),
    ]
    .into_iter()
    .enumerate()
    {
        plant.push_str(&format!(
            "CREATE FUNCTION public.spy_operator_{n}(a {left}, b {right}) RETURNS pg_catalog.bool
                 LANGUAGE plpgsql AS $$ BEGIN PERFORM public.spy(); RETURN true; END $$;
             CREATE OPERATOR public.{op} (LEFTARG = {left}, RIGHTARG = {right}, FUNCTION = public.spy_operator_{n});\n"
        ));
    }
    for function in ["length", "octet_length"] {
        plant.push_str(&format!(
            "CREATE FUNCTION public.{function}(t pg_catalog.text) RETURNS pg_catalog.int4
                 LANGUAGE plpgsql AS $$ BEGIN PERFORM public.spy(); RETURN 1; END $$;\n"
        ));
    }
    // Operators and functions that wsusage_target's constraints depend on and are not pg_catalog's.
    const TAKEN: &str = "
        SELECT count(*) FROM pg_catalog.pg_depend AS d
          JOIN pg_catalog.pg_constraint AS c
            ON d.classid = 'pg_catalog.pg_constraint'::pg_catalog.regclass AND d.objid = c.oid
          LEFT JOIN pg_catalog.pg_operator AS o
            ON d.refclassid = 'pg_catalog.pg_operator'::pg_catalog.regclass AND d.refobjid = o.oid
          LEFT JOIN pg_catalog.pg_proc AS p
            ON d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND d.refobjid = p.oid
         WHERE c.conrelid = 'public.wsusage_target'::pg_catalog.regclass
           AND coalesce(o.oprnamespace, p.pronamespace) <> 'pg_catalog'::pg_catalog.regnamespace";
    let taken = |client: &mut Client| -> i64 { client.query_one(TAKEN, &[]).unwrap().get(0) };

    cluster.connect_as("mallory").batch_execute(&plant).unwrap();
    let mut fresh = cluster.connect_to("fresh");
    fresh.batch_execute("GRANT CREATE ON SCHEMA public TO mallory").unwrap();
    let conninfo = format!("{} user=mallory", cluster.conninfo("fresh"));
    Client::connect(&conninfo, NoTls).unwrap().batch_execute(&plant).unwrap();
    admin.batch_execute("CREATE EXTENSION wsusage VERSION '0.2.0'; ALTER EXTENSION wsusage UPDATE").unwrap();
    fresh.batch_execute("CREATE EXTENSION wsusage").unwrap();
    for client in [&mut admin, &mut fresh] {
        assert_eq!(taken(client), 0);
        client
            .batch_execute(
                "CREATE TABLE users (id uuid PRIMARY KEY, last_seen_at timestamptz);
                 INSERT INTO wsusage_target (name, relation, id_column, timestamp_column, min_change)
                      VALUES ('users', 'users', 'id', 'last_seen_at', '1 hour');",
            )
            .unwrap();
        assert_eq!(spy_calls(client), 0);
    }
    let made = superusers_made(&mut admin);
    figures("look-alikes planted before CREATE EXTENSION", &made);
    assert!(made.is_empty(), "{made:?}");
}

/// `wsusage_flush()` from a session of its own, which must fail: `dba`'s open transaction, which
/// holds a table's lock, commits once the flush worker waits for that lock, that is after the
/// round read the catalogs and before its chunk runs. The flush's SQLSTATE and message.
fn flush_failing_once_committed(cluster: &Cluster, admin: &mut Client, dba: &mut Client) -> (String, String) {
    let mut flusher = cluster.connect();
    let flushing = std::thread::spawn(move || flush_error(&mut flusher));
    wait_until("the flush to wait for the table's lock", || {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'wsusage' AND wait_event_type = 'Lock'",
                &[],
            )
            .unwrap()
            .get(0);
        waiting > 0
    });
    dba.batch_execute("COMMIT").unwrap();
    let (code, message, _, _) = flushing.join().unwrap();
    (code, message)
}

/// The role a chunk runs as is the one the round checked the target for: a table handed to
/// another owner while a flush waits for its lock is not written by that flush (its after_flush
/// function, owned by the old owner, never runs as the new one); the next flush checks the target
/// again, refuses the function the new owner's privileges would run, and writes once the new
/// owner owns it.
#[test]
fn a_table_handed_to_another_owner_during_a_flush_is_checked_again_before_it_is_written() {
    let cluster = Cluster::start(&[("wsusage.lock_timeout", "'60s'")]);
    let (mut admin, ids) = cluster.with_workspaces(1);
    admin
        .batch_execute(
            "CREATE ROLE app LOGIN;
             CREATE ROLE bob LOGIN;
             ALTER TABLE workspaces OWNER TO app;
             CREATE TABLE public.calls (who text);
             GRANT INSERT ON public.calls TO PUBLIC;
             CREATE FUNCTION bump(ids uuid[], marked_at timestamptz[]) RETURNS void LANGUAGE sql
                 AS $$ INSERT INTO public.calls VALUES (current_user) $$;
             ALTER FUNCTION bump(uuid[], timestamptz[]) OWNER TO app;
             INSERT INTO wsusage_target (name, relation, id_column, timestamp_column, after_flush)
                  VALUES ('default', 'workspaces', 'id', 'last_used_at', 'bump(uuid[], timestamptz[])');",
        )
        .unwrap();
    admin.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    let mut dba = cluster.connect();
    dba.batch_execute("BEGIN; LOCK TABLE workspaces IN ACCESS EXCLUSIVE MODE; ALTER TABLE workspaces OWNER TO bob")
        .unwrap();
    let (code, message) = flush_failing_once_committed(&cluster, &mut admin, &mut dba);
    assert_eq!(code, "55000", "{message}");
    assert!(message.contains("owner of relation public.workspaces changed"), "{message}");

    let (code, message, _, _) = flush_error(&mut admin);
    assert_eq!(code, "42501", "{message}");
    assert!(message.contains("\"app\"") && message.contains("\"bob\""), "{message}");
    let calls: i64 = admin.query_one("SELECT count(*) FROM public.calls", &[]).unwrap().get(0);
    assert_eq!(calls, 0, "app's function never ran as bob");
    assert_eq!(count_used(&mut admin), 0, "kept");

    admin.batch_execute("ALTER FUNCTION bump(uuid[], timestamptz[]) OWNER TO bob").unwrap();
    assert_eq!(flush(&mut admin), 1);
    let who: String = admin.query_one("SELECT who FROM public.calls", &[]).unwrap().get(0);
    assert_eq!(who, "bob");
}

/// `wsusage.role`, the DBA's explicit choice: every flush, and the after_flush function, runs as
/// that role, so the function's owner must have that role's privileges — the table's owner's are
/// not enough.
#[test]
fn with_wsusage_role_set_the_flush_and_after_flush_run_as_that_role() {
    let cluster = Cluster::start(&[("wsusage.role", "'usage_writer'")]);
    let (mut admin, _) = cluster.with_workspaces(0);
    admin
        .batch_execute(
            "CREATE ROLE usage_writer NOLOGIN;
             CREATE ROLE app LOGIN;
             CREATE TABLE api_keys (id bigint PRIMARY KEY, last_used timestamptz);
             INSERT INTO api_keys VALUES (1);
             ALTER TABLE api_keys OWNER TO app;
             GRANT SELECT, UPDATE ON api_keys TO usage_writer;
             CREATE TABLE public.calls (who text);
             GRANT INSERT ON public.calls TO PUBLIC;
             CREATE FUNCTION seen() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN INSERT INTO public.calls VALUES ('trigger ' || current_user); RETURN NEW; END $$;
             ALTER FUNCTION seen() OWNER TO app;
             CREATE TRIGGER seen BEFORE UPDATE ON api_keys FOR EACH ROW EXECUTE FUNCTION seen();",
        )
        .unwrap();
    for (function, owner) in [("by_app", "app"), ("by_writer", "usage_writer")] {
        admin
            .batch_execute(&format!(
                "CREATE FUNCTION {function}(ids bigint[], marked_at timestamptz[]) RETURNS void LANGUAGE sql
                     AS $$ INSERT INTO public.calls VALUES (current_user) $$;
                 ALTER FUNCTION {function}(bigint[], timestamptz[]) OWNER TO {owner};"
            ))
            .unwrap();
    }
    let target = |function: &str| {
        format!(
            "INSERT INTO wsusage_target (name, relation, id_column, timestamp_column, after_flush)
                  VALUES ('api_keys', 'api_keys', 'id', 'last_used', '{function}(bigint[], timestamptz[])')"
        )
    };
    let (code, message, _, _) = report(&admin.batch_execute(&target("by_app")).expect_err("the owner's is refused"));
    assert_eq!(code, "42501", "{message}");
    assert!(message.contains("\"usage_writer\""), "{message}");

    admin.batch_execute(&target("by_writer")).unwrap();
    admin.execute("SELECT wsusage_mark_bigint('api_keys', 1)", &[]).unwrap();
    assert_eq!(flush(&mut admin), 1);
    let who: Vec<String> =
        admin.query("SELECT who FROM public.calls ORDER BY who", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(who, ["trigger usage_writer", "usage_writer"], "the owner's trigger and after_flush, as the role");
}

/// PostgreSQL queues no deferred trigger in a restricted operation: the table owner's deferred
/// constraint trigger fires at the end of the chunk's UPDATE instead of at its commit, as the
/// owner, and the rows are written.
#[test]
fn a_deferred_constraint_trigger_fires_within_the_chunk_as_the_owner() {
    let cluster = Cluster::start(&[]);
    let (mut admin, ids) = cluster.with_workspaces(2);
    admin
        .batch_execute(
            "CREATE ROLE app LOGIN;
             ALTER TABLE workspaces OWNER TO app;
             CREATE TABLE public.seen (who text);
             GRANT INSERT ON public.seen TO PUBLIC;
             CREATE FUNCTION seen() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN INSERT INTO public.seen VALUES (current_user); RETURN NULL; END $$;
             ALTER FUNCTION seen() OWNER TO app;
             CREATE CONSTRAINT TRIGGER seen AFTER UPDATE ON workspaces DEFERRABLE INITIALLY DEFERRED
                 FOR EACH ROW EXECUTE FUNCTION seen();",
        )
        .unwrap();
    admin.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    assert_eq!(flush(&mut admin), 2);
    assert_eq!(count_used(&mut admin), 2);
    let who: Vec<String> = admin.query("SELECT who FROM public.seen", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(who, ["app", "app"]);
}

/// The statements name the table by schema and name, and a rename of the schema takes no lock on
/// the table: a schema renamed while a flush waits for the table, with a table of another owner
/// put under the old name, fails that target's round — the other table is never written — and the
/// next round writes the target's own table under its new name.
#[test]
fn a_schema_renamed_during_a_flush_never_lets_its_name_reach_another_table() {
    let cluster = Cluster::start(&[("wsusage.lock_timeout", "'60s'")]);
    let (mut admin, _) = cluster.with_workspaces(0);
    admin
        .batch_execute(
            "CREATE ROLE mallory LOGIN;
             CREATE SCHEMA app;
             CREATE TABLE app.users (id uuid PRIMARY KEY, last_seen_at timestamptz);
             INSERT INTO wsusage_target (name, relation, id_column, timestamp_column)
                  VALUES ('users', 'app.users', 'id', 'last_seen_at');",
        )
        .unwrap();
    let id = uuid::Uuid::new_v4();
    admin.execute("INSERT INTO app.users (id) VALUES ($1)", &[&id]).unwrap();
    admin.execute("SELECT wsusage_mark('users', $1)", &[&id]).unwrap();
    let mut dba = cluster.connect();
    dba.batch_execute(
        "BEGIN;
         LOCK TABLE app.users IN ACCESS EXCLUSIVE MODE;
         ALTER SCHEMA app RENAME TO app_old;
         CREATE SCHEMA app AUTHORIZATION mallory;
         CREATE TABLE app.users (id uuid PRIMARY KEY, last_seen_at timestamptz);
         ALTER TABLE app.users OWNER TO mallory;",
    )
    .unwrap();
    dba.execute("INSERT INTO app.users (id) VALUES ($1)", &[&id]).unwrap();
    let (code, message) = flush_failing_once_committed(&cluster, &mut admin, &mut dba);
    assert_eq!(code, "42P01", "{message}");
    assert!(message.contains("renamed during the flush"), "{message}");
    let written = |admin: &mut Client, table: &str| -> i64 {
        admin.query_one(&format!("SELECT count(*) FROM {table} WHERE last_seen_at IS NOT NULL"), &[]).unwrap().get(0)
    };
    assert_eq!(written(&mut admin, "app.users"), 0, "the table put under the old name is never written");

    assert_eq!(flush(&mut admin), 1);
    assert_eq!(written(&mut admin, "app_old.users"), 1, "the target's own table, under its new name");
    assert_eq!(written(&mut admin, "app.users"), 0);
}

/// A table whose owner put itself under its row-level security policies (`FORCE ROW LEVEL
/// SECURITY`): the flush, as the owner, writes what the policies let the owner write, and an id
/// whose row they hide counts as having no row — as for any UPDATE of the owner's.
#[test]
fn forced_row_level_security_applies_to_the_owners_flush() {
    let cluster = Cluster::start(&[]);
    let (mut admin, ids) = cluster.with_workspaces(2);
    admin
        .batch_execute(&format!(
            "CREATE ROLE app LOGIN;
             ALTER TABLE workspaces OWNER TO app;
             ALTER TABLE workspaces ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
             CREATE POLICY visible ON workspaces USING (id <> '{}');",
            ids[1]
        ))
        .unwrap();
    admin.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    assert_eq!(flush(&mut admin), 2);
    assert_eq!(used_ids(&mut admin), [ids[0]], "the row the policy hides from the owner is not written");
    let without_row: i64 = admin.query_one("SELECT ids_without_row FROM wsusage_stats", &[]).unwrap().get(0);
    assert_eq!(without_row, 1);
}
