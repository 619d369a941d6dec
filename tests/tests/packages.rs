//! The packages a DBA installs, against the server a DBA runs: Debian 12's own PostgreSQL 15,
//! installed from apt, its clusters made and run with Debian's tools (`pg_createcluster`,
//! `pg_ctlcluster`). The Debian package `postgresql-15-wsusage` installs with `apt-get install`,
//! works once preloaded, and `apt-get remove` leaves none of its files behind; the tarball's
//! `install.sh` and `uninstall.sh` do the same for any server, given its `pg_config`.
//!
//! `scripts/test` builds both (`scripts/package --pg 15`) and names their folder in
//! `WSUSAGE_PACKAGES`; it runs these tests in its PostgreSQL 15 pass. Elsewhere (another major,
//! not root, no apt) they say why they are skipped and pass.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use wsusage_tests::*;

const PACKAGE: &str = "postgresql-15-wsusage";
const DEBIAN_PG_CONFIG: &str = "/usr/lib/postgresql/15/bin/pg_config";
/// How long one apt, dpkg or cluster command may take.
const COMMAND_PATIENCE: Duration = Duration::from_secs(300);

/// Both tests install into the same server's directories: one at a time.
static DEBIAN_SERVER: Mutex<()> = Mutex::new(());

/// The built packages' folder, or why these tests cannot run here.
fn packages() -> Result<PathBuf, String> {
    if major() != 15 {
        return Err(format!("the packages are tested in the PostgreSQL 15 pass (Debian 12's server), not {}", major()));
    }
    let Some(dir) = std::env::var_os("WSUSAGE_PACKAGES").filter(|dir| !dir.is_empty()) else {
        return Err("WSUSAGE_PACKAGES is not set: scripts/test builds the packages where it is root with apt".into());
    };
    for tool in ["/usr/bin/apt-get", "/usr/bin/pg_createcluster", "/usr/bin/pg_ctlcluster", DEBIAN_PG_CONFIG] {
        if !Path::new(tool).exists() {
            return Err(format!("{tool} is missing: Debian's postgresql-15 is not installed"));
        }
    }
    Ok(PathBuf::from(dir))
}

/// The packages' folder, and Debian's server to this test alone; `None`, saying why, where these
/// tests cannot run.
fn debian_server() -> Option<(PathBuf, MutexGuard<'static, ()>)> {
    match packages() {
        Ok(dir) => Some((dir, DEBIAN_SERVER.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))),
        Err(why) => {
            eprintln!("skipped: {why}");
            None
        }
    }
}

/// The one file of `dir` whose name ends with `suffix`.
fn artefact(dir: &Path, suffix: &str) -> PathBuf {
    let found: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.to_string_lossy().ends_with(suffix))
        .collect();
    assert_eq!(found.len(), 1, "one {suffix} in {}: {found:?}", dir.display());
    found[0].clone()
}

fn run(what: &str, command: &mut Command) -> Output {
    let output = output_within(command.env("DEBIAN_FRONTEND", "noninteractive"), what, COMMAND_PATIENCE);
    assert!(
        output.status.success(),
        "{what}: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A cluster of Debian's PostgreSQL 15, made with `pg_createcluster` and dropped with the test.
struct DebianCluster {
    name: String,
    port: u16,
}

impl DebianCluster {
    fn create(purpose: &str) -> DebianCluster {
        let name = format!("wsusage_{purpose}_{}", std::process::id());
        // A port of its own; only its Unix socket listens (no TCP), in Debian's socket folder.
        let port = 54_000 + (std::process::id() % 900) as u16 + if purpose == "deb" { 0 } else { 950 };
        run("pg_createcluster", Command::new("pg_createcluster").args(["15", &name, "-p", &port.to_string()]));
        let cluster = DebianCluster { name, port };
        cluster.configure("listen", "listen_addresses = ''");
        cluster
    }

    /// Write `line` into a file of the cluster's `conf.d`, as a DBA adds settings on Debian.
    fn configure(&self, file: &str, line: &str) {
        let path = format!("/etc/postgresql/15/{}/conf.d/{file}.conf", self.name);
        fs::write(&path, format!("{line}\n")).unwrap_or_else(|e| panic!("write {path}: {e}"));
    }

    fn ctl(&self, action: &str) {
        run(&format!("pg_ctlcluster {action}"), Command::new("pg_ctlcluster").args(["15", &self.name, action]));
    }

    /// Run `sql` with psql as the `postgres` user (Debian's peer authentication), stopping at the
    /// first error; the output, unaligned, without headers.
    fn psql(&self, sql: &str) -> String {
        let output = run(
            &format!("psql: {sql}"),
            Command::new("runuser").args(["-u", "postgres", "--", "psql", "-X", "-q", "-A", "-t"]).args([
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "/var/run/postgresql",
                "-p",
                &self.port.to_string(),
                "-d",
                "postgres",
                "-c",
                sql,
            ]),
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// What a DBA does after installing: preload, restart, create the extension; then one mark,
    /// a fresh read of it, a flush and the row it wrote.
    fn check_wsusage_works(&self) {
        self.configure("wsusage", "shared_preload_libraries = 'wsusage'");
        self.ctl("restart");
        let id = "6f1c1f94-4c4b-4a52-9a62-1d2b7c0a0001";
        self.psql(
            "DROP EXTENSION IF EXISTS wsusage; DROP TABLE IF EXISTS workspaces;
             CREATE EXTENSION wsusage;
             CREATE TABLE workspaces (id uuid PRIMARY KEY, last_used_at timestamptz);",
        );
        self.psql(&format!("INSERT INTO workspaces (id) VALUES ('{id}'); SELECT wsusage_mark('{id}')"));
        let pending = self.psql(&format!("SELECT wsusage_pending_at('{id}') IS NOT NULL"));
        assert_eq!(pending, "t", "the mark is pending");
        assert_eq!(self.psql("SELECT wsusage_flush()"), "1");
        let row = self.psql(&format!("SELECT last_used_at IS NOT NULL FROM workspaces WHERE id = '{id}'"));
        assert_eq!(row, "t", "the flush wrote the row");
        let launcher = self.psql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'wsusage launcher'");
        assert_eq!(launcher, "1", "the launcher runs");
        self.psql("DROP EXTENSION wsusage");
        // Not preloaded any more, so that the library can go.
        fs::remove_file(format!("/etc/postgresql/15/{}/conf.d/wsusage.conf", self.name)).unwrap();
        self.ctl("restart");
    }
}

impl Drop for DebianCluster {
    fn drop(&mut self) {
        let _ = output_within(
            Command::new("pg_dropcluster").args(["--stop", "15", &self.name]),
            "pg_dropcluster",
            COMMAND_PATIENCE,
        );
    }
}

/// The files and symbolic links a Debian package holds, as absolute paths.
fn files_of(deb: &Path) -> Vec<PathBuf> {
    let output = run("dpkg-deb --contents", Command::new("dpkg-deb").arg("--contents").arg(deb));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.starts_with('d'))
        .filter_map(|line| line.split_whitespace().last())
        .map(|path| PathBuf::from(path.trim_start_matches('.')))
        .collect()
}

fn installed(package: &str) -> bool {
    let output =
        output_within(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]), "dpkg-query", COMMAND_PATIENCE);
    String::from_utf8_lossy(&output.stdout).contains("install ok installed")
}

#[test]
fn the_debian_package_installs_into_debians_postgresql_15_works_and_removes_every_file() {
    let Some((dir, _server)) = debian_server() else { return };
    let deb = artefact(&dir, "_amd64.deb");
    assert!(deb.file_name().unwrap().to_string_lossy().starts_with(&format!("{PACKAGE}_0.")), "{}", deb.display());
    let info = run("dpkg-deb --field", Command::new("dpkg-deb").arg("--field").arg(&deb));
    let info = String::from_utf8_lossy(&info.stdout).into_owned();
    assert!(info.contains(&format!("Package: {PACKAGE}\n")), "{info}");
    assert!(info.contains("Depends: postgresql-15,"), "it depends on the server it is built for: {info}");
    let files = files_of(&deb);
    assert_eq!(
        files
            .iter()
            .filter(
                |f| f.starts_with("/usr/lib/postgresql/15/lib") || f.starts_with("/usr/share/postgresql/15/extension")
            )
            .count(),
        files.len() - 1,
        "everything but its copyright where Debian's pg_config puts it: {files:?}"
    );
    assert!(files.contains(&PathBuf::from("/usr/lib/postgresql/15/lib/wsusage.so")), "{files:?}");
    assert!(files.contains(&PathBuf::from("/usr/share/postgresql/15/extension/wsusage.control")), "{files:?}");

    let cluster = DebianCluster::create("deb");
    run("apt-get install", Command::new("apt-get").args(["install", "-y", "-q"]).arg(&deb));
    assert!(installed(PACKAGE));
    cluster.check_wsusage_works();

    run("apt-get remove", Command::new("apt-get").args(["remove", "-y", "-q", PACKAGE]));
    assert!(!installed(PACKAGE));
    let left: Vec<&PathBuf> = files.iter().filter(|file| file.exists()).collect();
    assert!(left.is_empty(), "apt-get remove left {left:?}");
    // The server goes on without it.
    assert_eq!(cluster.psql("SELECT count(*) FROM pg_available_extensions WHERE name = 'wsusage'"), "0");
}

#[test]
fn the_tarball_installs_with_its_install_sh_works_and_uninstalls() {
    let Some((dir, _server)) = debian_server() else { return };
    let tarball = artefact(&dir, ".tar.gz");
    let unpacked = Scratch::new("tarball");
    run("tar", Command::new("tar").arg("-xzf").arg(&tarball).arg("-C").arg(&unpacked.0));
    let top = fs::read_dir(&unpacked.0).unwrap().next().unwrap().unwrap().path();

    // A server of another major is refused, and nothing is installed into it.
    let other_major = unpacked.0.join("pg_config");
    fs::write(&other_major, "#!/bin/sh\necho 'PostgreSQL 14.12'\n").unwrap();
    run("chmod", Command::new("chmod").arg("+x").arg(&other_major));
    let refused = output_within(Command::new(top.join("install.sh")).arg(&other_major), "install.sh", COMMAND_PATIENCE);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("for PostgreSQL 15, not PostgreSQL 14.12"), "{said}");

    let cluster = DebianCluster::create("tar");
    let output = run("install.sh", Command::new(top.join("install.sh")).arg(DEBIAN_PG_CONFIG));
    assert!(String::from_utf8_lossy(&output.stdout).contains("shared_preload_libraries"));
    let library = Path::new("/usr/lib/postgresql/15/lib/wsusage.so");
    assert!(library.exists());
    cluster.check_wsusage_works();

    run("uninstall.sh", Command::new(top.join("uninstall.sh")).arg(DEBIAN_PG_CONFIG));
    assert!(!library.exists());
    let extension_files: Vec<String> = fs::read_dir("/usr/share/postgresql/15/extension")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("wsusage"))
        .collect();
    assert!(extension_files.is_empty(), "uninstall.sh left {extension_files:?}");
}

/// A folder of this test's own, removed with it.
struct Scratch(PathBuf);

impl Scratch {
    fn new(purpose: &str) -> Scratch {
        let path = std::env::temp_dir().join(format!("wsusage-{purpose}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Scratch(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
