//! Releases: what a version looks like in SQL is frozen once released, and every older release
//! upgrades (ALTER EXTENSION wsusage UPDATE) to exactly what a fresh install of today's version is.
//!
//! `sql/released/` keeps, per released version V, `wsusage--V.sql` (its install script, as
//! shipped) and `wsusage--V.catalog` (its catalog signature, below). A SQL-visible change
//! therefore needs a new version, an upgrade script `sql/wsusage--OLD--NEW.sql`, and the new
//! version's frozen files; this test says which are missing.

use std::fs;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use wsusage_tests::*;

/// Functions (signature, volatility, parallel safety, strictness, privileges), views and tables
/// (columns, grants) of the extension, and the tables' triggers, one line each, sorted.
const SIGNATURE_SQL: &str = r#"
SELECT string_agg(line, E'\n' ORDER BY line) FROM (
    SELECT format('function %s(%s) returns %s volatile=%s parallel=%s strict=%s acl=%s',
                  p.proname, pg_get_function_identity_arguments(p.oid), pg_get_function_result(p.oid),
                  p.provolatile, p.proparallel, p.proisstrict, coalesce(p.proacl::text, 'default')) AS line
      FROM pg_proc AS p
      JOIN pg_depend AS d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
      JOIN pg_extension AS e ON e.oid = d.refobjid AND e.extname = 'wsusage'
    UNION ALL
    -- Columns and grants to others, not the definition text or the owner's privileges, which
    -- PostgreSQL majors print differently.
    SELECT format('%s %s columns=%s grants=%s', CASE c.relkind WHEN 'v' THEN 'view' ELSE 'table' END, c.relname,
                  (SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute
                    WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped),
                  (SELECT coalesce(string_agg(pg_get_userbyid(a.grantee) || ':' || a.privilege_type, ','
                                              ORDER BY pg_get_userbyid(a.grantee), a.privilege_type), '')
                     FROM aclexplode(c.relacl) AS a WHERE a.grantee <> c.relowner))
      FROM pg_class AS c
      JOIN pg_depend AS d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
      JOIN pg_extension AS e ON e.oid = d.refobjid AND e.extname = 'wsusage'
    UNION ALL
    SELECT format('trigger %s', pg_get_triggerdef(t.oid))
      FROM pg_trigger AS t
      JOIN pg_depend AS d ON d.classid = 'pg_class'::regclass AND d.objid = t.tgrelid AND d.deptype = 'e'
      JOIN pg_extension AS e ON e.oid = d.refobjid AND e.extname = 'wsusage'
     WHERE NOT t.tgisinternal
) AS lines"#;

fn signature(client: &mut Client) -> String {
    client.query_one(SIGNATURE_SQL, &[]).unwrap().get::<_, Option<String>>(0).unwrap_or_default()
}

fn current_version(client: &mut Client) -> String {
    client.query_one("SELECT default_version FROM pg_available_extensions WHERE name = 'wsusage'", &[]).unwrap().get(0)
}

/// Released versions other than the current one, from the frozen install scripts.
fn older_releases(current: &str) -> Vec<String> {
    let mut versions: Vec<String> = fs::read_dir(released_dir())
        .map(|dir| {
            dir.filter_map(|entry| entry.ok()?.file_name().into_string().ok())
                .filter_map(|name| name.strip_prefix("wsusage--")?.strip_suffix(".sql").map(str::to_owned))
                .filter(|v| v != current)
                .collect()
        })
        .unwrap_or_else(|e| panic!("cannot read the frozen releases in {}: {e}", released_dir().display()));
    versions.sort();
    versions
}

#[test]
fn the_current_version_matches_its_frozen_release_signature() {
    let cluster = Cluster::start(&[]);
    let mut client = cluster.connect();
    client.batch_execute("CREATE EXTENSION wsusage").unwrap();
    let version = current_version(&mut client);
    let fresh = signature(&mut client);
    let frozen = released_dir().join(format!("wsusage--{version}.catalog"));
    let Ok(expected) = fs::read_to_string(&frozen) else {
        // Not released yet: in development, it must be reachable from the newest release, whose
        // upgrade the next test checks. Releasing it freezes this signature.
        let newest = older_releases(&version).pop().expect("a released version");
        let upgrade = released_dir().join(format!("../wsusage--{newest}--{version}.sql"));
        assert!(
            upgrade.exists(),
            "{version} is neither released ({} is missing) nor reachable from {newest} ({} is missing)",
            frozen.display(),
            upgrade.display()
        );
        eprintln!(
            "{version} is in development; at its release, freeze this signature in {}:\n{fresh}",
            frozen.display()
        );
        return;
    };
    assert_eq!(
        fresh.trim(),
        expected.trim(),
        "the SQL of released version {version} changed: release the change as a new version with an upgrade \
         script in sql/"
    );
}

#[test]
fn every_older_release_upgrades_to_what_a_fresh_install_is() {
    let cluster = Cluster::start(&[]);
    let mut admin = cluster.connect();
    admin.batch_execute("CREATE EXTENSION wsusage").unwrap();
    let current = current_version(&mut admin);
    let fresh = signature(&mut admin);

    for version in older_releases(&current) {
        install_release_script(&version);
        let database = format!("upgrade_from_{}", version.replace('.', "_"));
        admin.batch_execute(&format!("CREATE DATABASE {database}")).unwrap();
        let mut client = cluster.connect_to(&database);
        client.batch_execute(&format!("CREATE EXTENSION wsusage VERSION '{version}'")).unwrap();
        client.batch_execute("ALTER EXTENSION wsusage UPDATE").unwrap();
        let installed: String =
            client.query_one("SELECT extversion FROM pg_extension WHERE extname = 'wsusage'", &[]).unwrap().get(0);
        assert_eq!(installed, current, "upgrade path from {version}");
        assert_eq!(signature(&mut client), fresh, "{version} upgraded differs from a fresh {current}");
    }
}

/// What `SELECT pg_postmaster_start_time()` says: it changes when the server reinitialises after
/// a backend crash.
fn postmaster_start(client: &mut Client) -> DateTime<Utc> {
    client.query_one("SELECT pg_postmaster_start_time()", &[]).unwrap().get(0)
}

/// The upgrade window: today's library is loaded, but a database still has an older release's
/// SQL (the state between the restart and `ALTER EXTENSION wsusage UPDATE` that every upgrade
/// passes through). Every function and view of that release works, with its own columns holding
/// the right values, and the server stays up; then the update succeeds.
#[test]
fn every_older_release_works_against_this_library_until_it_is_updated() {
    let releases = {
        let cluster = Cluster::start(&[]);
        let mut admin = cluster.connect();
        admin.batch_execute("CREATE EXTENSION wsusage").unwrap();
        older_releases(&current_version(&mut admin))
    };
    assert!(!releases.is_empty(), "0.1.0 at least is older than the current version");
    for version in releases {
        // A cluster of its own, so the cluster-wide counters are this release's alone.
        let cluster = Cluster::start(&[]);
        install_release_script(&version);
        let mut client = cluster.connect();
        let started = postmaster_start(&mut client);
        client
            .batch_execute(&format!(
                "CREATE EXTENSION wsusage VERSION '{version}';
                 CREATE TABLE workspaces (id uuid PRIMARY KEY, last_used_at timestamptz);"
            ))
            .unwrap();
        cluster.wait_for_launcher(&mut client);
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        client.execute("INSERT INTO workspaces (id) SELECT unnest($1::uuid[])", &[&ids]).unwrap();
        for id in &ids[..3] {
            client.execute("SELECT wsusage_mark($1)", &[id]).unwrap();
        }
        client.execute("SELECT wsusage_mark_many($1)", &[&ids[3..].to_vec()]).unwrap();

        // Before the first flush: the release's own columns, not shifted ones.
        let row =
            client.query_one("SELECT marks, pending, last_flush_at, stats_reset FROM wsusage_stats", &[]).unwrap();
        assert_eq!(row.get::<_, i64>("marks"), 5, "{version}");
        assert_eq!(row.get::<_, i64>("pending"), 5, "{version}");
        assert_eq!(row.get::<_, Option<DateTime<Utc>>>("last_flush_at"), None, "{version}");
        let reset: DateTime<Utc> = row.get("stats_reset");
        // Set as shared memory was made, moments after the postmaster's start time.
        assert!(
            (reset - started).num_seconds().abs() < 60,
            "{version}: stats_reset {reset} is the server's start ({started}), not 2000-01-01"
        );
        let pending: Vec<Uuid> =
            client.query("SELECT workspace_id FROM wsusage_pending()", &[]).unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(pending.len(), 5, "{version}");

        assert_eq!(flush(&mut client), 5, "{version}");
        assert_eq!(count_used(&mut client), 5, "{version}");
        // After a flush (the state that crashed the server): every column of every set-returning
        // function and view of the release, read.
        let row = client.query_one("SELECT flushes, ids_flushed, last_flush_at FROM wsusage_stats", &[]).unwrap();
        assert_eq!(row.get::<_, i64>("flushes"), 1, "{version}");
        assert_eq!(row.get::<_, i64>("ids_flushed"), 5, "{version}");
        assert!(row.get::<_, DateTime<Utc>>("last_flush_at") >= reset, "{version}");
        let relations: Vec<String> = client
            .query(
                "SELECT format('SELECT * FROM %s()', p.proname) FROM pg_proc AS p
                   JOIN pg_depend AS d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
                   JOIN pg_extension AS e ON e.oid = d.refobjid AND e.extname = 'wsusage'
                  WHERE p.pronargs = 0 AND p.proretset
                 UNION ALL
                 SELECT format('SELECT * FROM %I', c.relname) FROM pg_class AS c
                   JOIN pg_depend AS d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
                   JOIN pg_extension AS e ON e.oid = d.refobjid AND e.extname = 'wsusage'
                  WHERE c.relkind = 'v'",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(relations.len() >= 3, "{version}: {relations:?}");
        for query in &relations {
            client.query(query.as_str(), &[]).unwrap_or_else(|e| panic!("{version}: {query}: {e}"));
        }
        client.batch_execute("SELECT wsusage_stats_reset()").unwrap();
        assert_eq!(postmaster_start(&mut client), started, "{version}: the server never restarted");

        client.batch_execute("ALTER EXTENSION wsusage UPDATE").unwrap();
        let marks: i64 = client.query_one("SELECT marks FROM wsusage_stats", &[]).unwrap().get(0);
        assert_eq!(marks, 0, "{version}: reset before the update, read after it");
    }
}

/// A declaration this library cannot fill is refused by name, never filled with datums of
/// another type.
#[test]
fn a_declaration_the_library_cannot_fill_is_an_error_naming_the_column() {
    let cluster = Cluster::start(&[]);
    let mut client = cluster.connect();
    client
        .batch_execute(
            "CREATE EXTENSION wsusage;
             CREATE FUNCTION stats_of_another_version() RETURNS TABLE (pending bigint, nonsense int)
                 LANGUAGE c AS '$libdir/wsusage', 'wsusage_stats_wrapper';
             CREATE FUNCTION stats_with_another_type() RETURNS TABLE (pending text, capacity bigint)
                 LANGUAGE c AS '$libdir/wsusage', 'wsusage_stats_wrapper';",
        )
        .unwrap();
    let started = postmaster_start(&mut client);
    let (code, message, _, hint) =
        report(&client.query("SELECT * FROM stats_of_another_version()", &[]).expect_err("unknown column"));
    assert_eq!(code, "42703");
    assert!(message.contains("\"nonsense\""), "{message}");
    assert!(hint.contains("ALTER EXTENSION wsusage UPDATE"), "{hint}");
    let (code, message, _, _) =
        report(&client.query("SELECT * FROM stats_with_another_type()", &[]).expect_err("another type"));
    assert_eq!(code, "42804");
    assert!(message.contains("\"pending\""), "{message}");
    assert_eq!(postmaster_start(&mut client), started, "the server never restarted");
}

/// The views of the installed release, by name.
fn extension_views(client: &mut Client) -> Vec<String> {
    client
        .query(
            "SELECT c.relname::text FROM pg_class AS c
               JOIN pg_depend AS d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
               JOIN pg_extension AS e ON e.oid = d.refobjid AND e.extname = 'wsusage'
              WHERE c.relkind = 'v' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// The upgrade to targets (0.3.0), as a database goes through it: today's library runs under the
/// release's SQL (marks, flushes, the pending set and the stats views of that release all work),
/// and a mark made then is still pending when `ALTER EXTENSION wsusage UPDATE` runs. The update
/// keeps it — it is the `default` target's, written by the next flush — and at once the database
/// has targets: a row of `wsusage_target` is marked and flushed in the same session, and
/// `wsusage_pending()` names each key's target.
#[test]
fn a_mark_pending_across_the_update_to_targets_is_flushed_and_targets_work_in_the_same_session() {
    let cluster = Cluster::start(&[]);
    let mut admin = cluster.connect();
    cluster.wait_for_launcher(&mut admin);
    for version in ["0.1.0", "0.2.0"] {
        install_release_script(version);
        // A database of its own for each release.
        let database = format!("window_of_{}", version.replace('.', "_"));
        admin.batch_execute(&format!("CREATE DATABASE {database}")).unwrap();
        let mut client = cluster.connect_to(&database);
        client
            .batch_execute(&format!(
                "CREATE EXTENSION wsusage VERSION '{version}';
                 CREATE TABLE workspaces (id uuid PRIMARY KEY, last_used_at timestamptz);"
            ))
            .unwrap();
        let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
        client.execute("INSERT INTO workspaces (id) SELECT unnest($1::uuid[])", &[&ids]).unwrap();

        // The release's own functions and views, on today's library.
        client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
        client.execute("SELECT wsusage_mark_many($1)", &[&vec![ids[1]]]).unwrap();
        let mut pending: Vec<Uuid> = client
            .query("SELECT * FROM wsusage_pending()", &[])
            .unwrap()
            .iter()
            .map(|row| row.get("workspace_id"))
            .collect();
        pending.sort();
        let mut expected = ids[..2].to_vec();
        expected.sort();
        assert_eq!(pending, expected, "{version}");
        // Cluster-wide: the databases of the releases before this one have nothing pending.
        let in_stats: i64 = client.query_one("SELECT pending FROM wsusage_stats", &[]).unwrap().get(0);
        assert_eq!(in_stats, 2, "{version}");
        let views = extension_views(&mut client);
        assert!(views.contains(&"wsusage_stats".to_owned()), "{version}: {views:?}");
        for view in &views {
            client
                .query(format!("SELECT * FROM {view}").as_str(), &[])
                .unwrap_or_else(|e| panic!("{version}: {view}: {e}"));
        }
        assert_eq!(flush(&mut client), 2, "{version}");
        assert_eq!(count_used(&mut client), 2, "{version}");

        // Marked, not flushed: pending through the update.
        client.execute("SELECT wsusage_mark($1)", &[&ids[2]]).unwrap();
        client.batch_execute("ALTER EXTENSION wsusage UPDATE TO '0.3.0'").unwrap();
        let installed: String =
            client.query_one("SELECT extversion FROM pg_extension WHERE extname = 'wsusage'", &[]).unwrap().get(0);
        assert_eq!(installed, "0.3.0", "{version}");
        let pending: Vec<(String, String, Option<Uuid>)> = client
            .query("SELECT target, key, workspace_id FROM wsusage_pending()", &[])
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect();
        assert_eq!(pending, [("default".to_owned(), ids[2].to_string(), Some(ids[2]))], "{version}");
        assert_eq!(flush(&mut client), 1, "{version}");
        assert!(last_used(&mut client, &ids[2]).is_some(), "{version}: the mark made before the update");
        assert_eq!(last_used(&mut client, &ids[3]), None, "{version}: never marked");

        // Targets, in the session that ran the update.
        let users: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        client.batch_execute("CREATE TABLE users (id uuid PRIMARY KEY, last_seen_at timestamptz)").unwrap();
        client.execute("INSERT INTO users (id) SELECT unnest($1::uuid[])", &[&users]).unwrap();
        client
            .batch_execute(
                "INSERT INTO wsusage_target (name, relation, id_column, timestamp_column)
                      VALUES ('users', 'users', 'id', 'last_seen_at')",
            )
            .unwrap();
        client.execute("SELECT wsusage_mark('users', $1)", &[&users[0]]).unwrap();
        client.execute("SELECT wsusage_mark_many('users', $1)", &[&vec![users[1]]]).unwrap();
        client.execute("SELECT wsusage_mark($1)", &[&ids[3]]).unwrap();
        let targets: Vec<(String, i64)> = client
            .query("SELECT target, count(*) FROM wsusage_pending() GROUP BY target ORDER BY target", &[])
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        assert_eq!(targets, [("default".to_owned(), 1), ("users".to_owned(), 2)], "{version}");
        assert_eq!(flush(&mut client), 3, "{version}");
        let mut written: Vec<Uuid> = client
            .query("SELECT id FROM users WHERE last_seen_at IS NOT NULL", &[])
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        written.sort();
        let mut expected = users[..2].to_vec();
        expected.sort();
        assert_eq!(written, expected, "{version}: exactly the marked users");
        assert_eq!(count_used(&mut client), 4, "{version}");
        let flushed: i64 = client
            .query_one(
                "SELECT ids_flushed FROM wsusage_stats_by_target
                  WHERE database = current_database() AND target = 'users'",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(flushed, 2, "{version}");
    }
}
