//! Releases: what a version looks like in SQL is frozen once released, and every older release
//! upgrades (ALTER EXTENSION wsusage UPDATE) to exactly what a fresh install of today's version is.
//!
//! `sql/released/` keeps, per released version V, `wsusage--V.sql` (its install script, as
//! shipped) and `wsusage--V.catalog` (its catalog signature, below). A SQL-visible change
//! therefore needs a new version, an upgrade script `sql/wsusage--OLD--NEW.sql`, and the new
//! version's frozen files; this test says which are missing.

use std::fs;
use std::path::{Path, PathBuf};

use wsusage_tests::*;

/// Functions (signature, volatility, parallel safety, strictness, privileges) and views
/// (columns, grants) of the extension, one line each, sorted.
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
    SELECT format('view %s columns=%s grants=%s', c.relname,
                  (SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute
                    WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped),
                  (SELECT coalesce(string_agg(pg_get_userbyid(a.grantee) || ':' || a.privilege_type, ','
                                              ORDER BY pg_get_userbyid(a.grantee), a.privilege_type), '')
                     FROM aclexplode(c.relacl) AS a WHERE a.grantee <> c.relowner))
      FROM pg_class AS c
      JOIN pg_depend AS d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
      JOIN pg_extension AS e ON e.oid = d.refobjid AND e.extname = 'wsusage'
) AS lines"#;

fn signature(client: &mut Client) -> String {
    client.query_one(SIGNATURE_SQL, &[]).unwrap().get::<_, Option<String>>(0).unwrap_or_default()
}

fn released_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql/released")
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
        .unwrap_or_default();
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
    let expected = fs::read_to_string(&frozen).unwrap_or_else(|_| {
        panic!(
            "{} is missing. If {version} is a new version, freeze it: write this signature there and copy its \
             install script to sql/released/wsusage--{version}.sql:\n{fresh}",
            frozen.display()
        )
    });
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

    let extension_dir = {
        let out = std::process::Command::new(pg_bin().join("pg_config")).arg("--sharedir").output().unwrap();
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("extension")
    };
    for version in older_releases(&current) {
        // The old release's install script, as shipped, beside today's files.
        let script = format!("wsusage--{version}.sql");
        fs::copy(released_dir().join(&script), extension_dir.join(&script)).unwrap();
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
