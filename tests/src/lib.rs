//! Test harness: real PostgreSQL clusters, one per test, with wsusage preloaded.
//!
//! The major under test is the build whose `bin/` directory `WSUSAGE_PG_BIN` names (set by
//! `scripts/test`); the extension must already be installed into it. Each [`Cluster`] lives in a
//! fresh directory under the system temp dir, copied from a template made once per test binary
//! by `initdb`, listens only on a Unix socket inside that directory, and runs as the `postgres`
//! user when the tests run as root (PostgreSQL refuses to run as root).

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::{self, sleep};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
pub use postgres::{Client, Error as PgError, NoTls};
use uuid::Uuid;

/// Generous bound for anything the tests wait for; never an assertion about speed.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// `statement_timeout` of every harness connection, so that no query waits forever (a broken
/// build fails instead of hanging). Longer than [`PATIENCE`], so that it never ends a wait a test
/// allows; a test that sets `statement_timeout` itself overrides it, and `RESET` comes back to it.
pub const STATEMENT_PATIENCE: Duration = Duration::from_secs(2 * PATIENCE.as_secs());

/// Port number in the socket file name; each cluster has its own socket directory.
const PORT: u16 = 5432;

pub fn pg_bin() -> PathBuf {
    match std::env::var_os("WSUSAGE_PG_BIN") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.pg/18/bin"),
    }
}

/// The PostgreSQL major version under test.
pub fn major() -> u32 {
    let out = Command::new(pg_bin().join("pg_config")).arg("--version").output().expect("run pg_config");
    let text = String::from_utf8_lossy(&out.stdout);
    // "PostgreSQL 17.11"
    text.split_whitespace()
        .nth(1)
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse pg_config --version output: {text}"))
}

fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

/// Run `program` as the user that owns the clusters (PostgreSQL and PgBouncer refuse root).
pub fn as_owner(program: impl AsRef<std::ffi::OsStr>) -> Command {
    if running_as_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// Run a program of the PostgreSQL build under test as the user that owns the clusters.
fn pg_command(program: &str) -> Command {
    as_owner(pg_bin().join(program))
}

fn run(mut cmd: Command, what: &str) -> Output {
    // Keep Rust backtraces out of server error details.
    cmd.env_remove("RUST_BACKTRACE").env_remove("RUST_LIB_BACKTRACE");
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn make_owned_dir(prefix: &str) -> PathBuf {
    let base = std::env::temp_dir();
    for attempt in 0..1000u32 {
        let dir = base.join(format!("{prefix}-{}-{}-{attempt}", std::process::id(), unique()));
        if fs::create_dir(&dir).is_ok() {
            if running_as_root() {
                let mut chown = Command::new("chown");
                chown.arg("postgres:").arg(&dir);
                run(chown, "chown");
            }
            return dir;
        }
    }
    panic!("cannot create a directory under {}", base.display());
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();

/// What the harness names its directories: `<prefix>-<pid of the test binary>-…`.
const DIR_PREFIXES: [&str; 3] = ["wsusage-test", "wsusage-standby", "wsusage-template"];

/// A file in the directory of a failed test's cluster, which is kept for inspection: the sweep
/// leaves such a directory alone for [`KEEP_FAILED`] after the failure.
const KEPT_MARKER: &str = "kept-for-inspection";
const KEEP_FAILED: Duration = Duration::from_secs(24 * 60 * 60);

/// A data directory made by initdb once per test binary, copied for every cluster, and removed
/// when the binary exits.
fn template() -> &'static Path {
    TEMPLATE.get_or_init(|| {
        sweep_stale_dirs();
        let dir = make_owned_dir("wsusage-template");
        let data = dir.join("data");
        let mut cmd = pg_command("initdb");
        cmd.arg("-D").arg(&data).args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"]);
        run(cmd, "initdb");
        // SAFETY: registers a function that takes no arguments and never unwinds; the C library
        // calls it once, at exit.
        unsafe { atexit(remove_template) };
        data
    })
}

extern "C" {
    fn atexit(callback: extern "C" fn()) -> std::ffi::c_int;
}

/// A static is never dropped, so without this every test binary of every run left its 40 MB
/// template behind (1,700 of them filled a developer's disk).
extern "C" fn remove_template() {
    if let Some(dir) = TEMPLATE.get().and_then(|data| data.parent()) {
        let _ = fs::remove_dir_all(dir);
    }
}

/// Remove what test binaries killed before they could clean up (SIGKILL by a timeout runs no
/// `Drop` and no `atexit`) left under the temp dir: their directories and the postmasters still
/// running in them. A directory is stale when the process its name carries no longer exists, so
/// the directories of test binaries still running are never touched; a failed test's cluster is
/// kept for [`KEEP_FAILED`].
fn sweep_stale_dirs() {
    // Liveness is read from /proc; without it nothing can be told stale.
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
        let Some(owner) = harness_dir_owner(&name) else { continue };
        if owner == std::process::id() || Path::new("/proc").join(owner.to_string()).exists() {
            continue;
        }
        let dir = entry.path();
        let kept_recently = fs::metadata(dir.join(KEPT_MARKER))
            .and_then(|marker| marker.modified())
            .is_ok_and(|at| at.elapsed().is_ok_and(|age| age < KEEP_FAILED));
        if kept_recently {
            continue;
        }
        stop_stale_postmaster(&dir, &name);
        let _ = fs::remove_dir_all(&dir);
    }
}

/// The pid of the test binary that made a directory called `name`, if the harness made it.
fn harness_dir_owner(name: &str) -> Option<u32> {
    DIR_PREFIXES.iter().find_map(|prefix| name.strip_prefix(prefix)?.strip_prefix('-')?.split('-').next()?.parse().ok())
}

/// Stop the postmaster still running in the stale directory `dir` (called `name`), if any: an
/// immediate shutdown, then SIGKILL should it outlive that. Only a process whose command line
/// names this directory is signalled, never one that merely reuses the pid in postmaster.pid.
fn stop_stale_postmaster(dir: &Path, name: &str) {
    let data = dir.join("data");
    let Some(pid) = postmaster_pid_in(&data) else {
        return;
    };
    let runs_here = || {
        fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(name))
    };
    if !runs_here() {
        return;
    }
    let mut stop = pg_command("pg_ctl");
    stop.arg("-D").arg(&data).args(["-w", "-t", "30", "-m", "immediate", "stop"]);
    let _ = stop.output();
    if runs_here() {
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    }
}

/// The pid of the postmaster of data directory `data`, from its `postmaster.pid` (none without one).
fn postmaster_pid_in(data: &Path) -> Option<u32> {
    fs::read_to_string(data.join("postmaster.pid")).ok().and_then(|text| text.lines().next()?.trim().parse().ok())
}

pub struct Cluster {
    pub dir: PathBuf,
    pub data: PathBuf,
    running: bool,
}

/// Settings every test cluster gets, before the test's own.
const BASE_SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", "''"),
    ("port", "5432"),
    ("fsync", "off"),
    ("shared_buffers", "'32MB'"),
    ("max_connections", "60"),
    ("shared_preload_libraries", "'wsusage'"),
    // Long by default, so that only the test decides when a flush happens.
    ("wsusage.flush_interval", "'1h'"),
    // Not the machine's zone (initdb writes it into postgresql.conf): a `timestamp` column is
    // written in the server's zone, and tests compare it with the client's UTC clock.
    ("timezone", "'UTC'"),
    ("log_timezone", "'UTC'"),
];

impl Cluster {
    /// A running cluster with wsusage preloaded and `settings` added to postgresql.conf
    /// (later lines win, so a test may override the base settings).
    pub fn start(settings: &[(&str, &str)]) -> Cluster {
        Cluster::try_start(settings).unwrap_or_else(|log| panic!("the cluster did not start:\n{log}"))
    }

    /// As [`Cluster::start`], but a server that refuses to start is an `Err` with its log.
    pub fn try_start(settings: &[(&str, &str)]) -> Result<Cluster, String> {
        let dir = make_owned_dir("wsusage-test");
        let data = dir.join("data");
        // copied by the owner, so that ownership and modes stay what initdb made them
        let mut cp = as_owner("cp");
        cp.arg("-a").arg(template()).arg(&data);
        run(cp, "copy the template cluster");
        let mut conf = String::from("\n# wsusage tests\n");
        conf.push_str(&format!("unix_socket_directories = '{}'\n", dir.display()));
        for (name, value) in BASE_SETTINGS.iter().chain(settings) {
            conf.push_str(&format!("{name} = {value}\n"));
        }
        let path = data.join("postgresql.conf");
        let mut existing = fs::read_to_string(&path).expect("read postgresql.conf");
        existing.push_str(&conf);
        fs::write(&path, existing).expect("write postgresql.conf");
        let mut cluster = Cluster { dir, data, running: false };
        cluster.try_start_again().map_err(|()| cluster.log())?;
        Ok(cluster)
    }

    /// A hot standby of `primary`, made with `pg_basebackup -R` over its socket, running.
    pub fn standby_of(primary: &Cluster) -> Cluster {
        let dir = make_owned_dir("wsusage-standby");
        let data = dir.join("data");
        let mut backup = pg_command("pg_basebackup");
        backup
            .arg("-D")
            .arg(&data)
            .args(["-R", "-X", "stream", "--checkpoint=fast", "-U", "postgres", "-p", "5432", "-h"])
            .arg(&primary.dir);
        run(backup, "pg_basebackup");
        let path = data.join("postgresql.conf");
        let mut conf = fs::read_to_string(&path).expect("read postgresql.conf");
        conf.push_str(&format!("unix_socket_directories = '{}'\n", dir.display()));
        fs::write(&path, conf).expect("write postgresql.conf");
        let mut cluster = Cluster { dir, data, running: false };
        cluster.start_again();
        cluster
    }

    pub fn start_again(&mut self) {
        self.try_start_again().unwrap_or_else(|()| panic!("pg_ctl start failed:\n{}", self.log()));
    }

    fn try_start_again(&mut self) -> Result<(), ()> {
        let mut cmd = pg_command("pg_ctl");
        cmd.arg("-D").arg(&self.data).arg("-l").arg(self.log_path()).args(["-w", "-t", "120", "start"]);
        cmd.env_remove("RUST_BACKTRACE").env_remove("RUST_LIB_BACKTRACE");
        let started = cmd.output().map(|out| out.status.success()).unwrap_or(false);
        self.running = started;
        if started {
            Ok(())
        } else {
            Err(())
        }
    }

    /// Stop with the given shutdown mode ("smart", "fast" or "immediate").
    pub fn stop(&mut self, mode: &str) {
        let mut cmd = pg_command("pg_ctl");
        cmd.arg("-D").arg(&self.data).args(["-w", "-t", "120", "-m", mode, "stop"]);
        run(cmd, "pg_ctl stop");
        self.running = false;
    }

    /// The postmaster's pid, from `postmaster.pid`.
    pub fn postmaster_pid(&self) -> u32 {
        postmaster_pid_in(&self.data).expect("a pid in postmaster.pid")
    }

    /// The titles (`ps` shows them) of the server's processes: the postmaster's children. A
    /// background worker has its title from its first instructions on, before it connects to a
    /// database and shows in `pg_stat_activity`.
    pub fn process_titles(&self) -> Vec<String> {
        let postmaster = self.postmaster_pid().to_string();
        let mut titles = Vec::new();
        for entry in fs::read_dir("/proc").expect("read /proc").flatten() {
            let proc_dir = entry.path();
            // "pid (comm) state ppid …": the parent is the second field after the last ')'.
            let Ok(stat) = fs::read_to_string(proc_dir.join("stat")) else { continue };
            let parent = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1));
            if parent != Some(postmaster.as_str()) {
                continue;
            }
            if let Ok(cmdline) = fs::read(proc_dir.join("cmdline")) {
                titles.push(String::from_utf8_lossy(&cmdline).trim_end_matches('\0').replace('\0', " "));
            }
        }
        titles
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Connection string for `database`, with [`STATEMENT_PATIENCE`] as `statement_timeout`
    /// (the examples that tests run get it too).
    pub fn conninfo(&self, database: &str) -> String {
        format!(
            "host={} port={PORT} user=postgres dbname={database} options='-c statement_timeout={}s'",
            self.dir.display(),
            STATEMENT_PATIENCE.as_secs()
        )
    }

    pub fn connect(&self) -> Client {
        self.connect_to("postgres")
    }

    /// A directory inside the cluster's, owned by the cluster's owner, for a program run as it.
    pub fn owned_subdir(&self, name: &str) -> PathBuf {
        let dir = self.dir.join(name);
        let mut mkdir = as_owner("mkdir");
        mkdir.arg("-p").arg(&dir);
        run(mkdir, "mkdir");
        dir
    }

    /// A connection to database `postgres` as `role` (a role with LOGIN).
    pub fn connect_as(&self, role: &str) -> Client {
        Client::connect(&format!("{} user={role}", self.conninfo("postgres")), NoTls)
            .unwrap_or_else(|e| panic!("connect as {role}: {e}"))
    }

    pub fn connect_to(&self, database: &str) -> Client {
        Client::connect(&self.conninfo(database), NoTls)
            .unwrap_or_else(|e| panic!("connect to {database}: {e}\nserver log:\n{}", self.log()))
    }

    /// Create the extension and a `workspaces` table of `rows` rows with NULL `last_used_at`
    /// in database `postgres`, and wait until the launcher runs (so `wsusage_flush()` is served
    /// at once); returns a client and the ids.
    pub fn with_workspaces(&self, rows: usize) -> (Client, Vec<Uuid>) {
        self.with_workspaces_in("postgres", rows)
    }

    /// As [`Cluster::with_workspaces`], in `database` (created if it does not exist).
    pub fn with_workspaces_in(&self, database: &str, rows: usize) -> (Client, Vec<Uuid>) {
        let (mut client, ids) = self.with_workspaces_and_no_worker_in(database, rows);
        self.wait_for_launcher(&mut client);
        (client, ids)
    }

    /// As [`Cluster::with_workspaces`], for a cluster whose launcher cannot run.
    pub fn with_workspaces_and_no_worker(&self, rows: usize) -> (Client, Vec<Uuid>) {
        self.with_workspaces_and_no_worker_in("postgres", rows)
    }

    fn with_workspaces_and_no_worker_in(&self, database: &str, rows: usize) -> (Client, Vec<Uuid>) {
        if database != "postgres" {
            let mut admin = self.connect();
            let exists = admin.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&database]).unwrap();
            if exists.is_none() {
                admin.batch_execute(&format!("CREATE DATABASE {database}")).expect("create database");
            }
        }
        let mut client = self.connect_to(database);
        client
            .batch_execute(
                "CREATE EXTENSION wsusage;
                 CREATE TABLE workspaces (id uuid PRIMARY KEY, name text, last_used_at timestamptz);",
            )
            .expect("create extension and table");
        let ids: Vec<Uuid> = (0..rows).map(|_| Uuid::new_v4()).collect();
        client.execute("INSERT INTO workspaces (id) SELECT unnest($1::uuid[])", &[&ids]).expect("insert workspaces");
        (client, ids)
    }

    /// Pid of the flush worker of the client's database as pg_stat_activity shows it.
    pub fn worker_pid(&self, client: &mut Client) -> Option<i32> {
        client
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'wsusage' AND datname = current_database()",
                &[],
            )
            .expect("query pg_stat_activity")
            .map(|row| row.get(0))
    }

    /// Wait until a flush worker other than `not` runs in the client's database, idle on its
    /// latch (its flush behind it); returns its pid. A worker starts when its database has a
    /// flush due, for instance after a mark and `wsusage_flush()`.
    pub fn wait_for_worker(&self, client: &mut Client, not: Option<i32>) -> i32 {
        self.wait_for_backend(client, "wsusage", not)
    }

    /// Mark `id` and flush, so that the flush worker of the client's database runs (it stays
    /// while the database has marks within an interval); returns its pid.
    pub fn start_worker(&self, client: &mut Client, id: &Uuid) -> i32 {
        client.execute("SELECT wsusage_mark($1)", &[id]).expect("mark");
        flush(client);
        self.wait_for_worker(client, None)
    }

    /// Wait until the launcher other than `not` runs, idle on its latch; returns its pid.
    pub fn wait_for_launcher_other_than(&self, client: &mut Client, not: Option<i32>) -> i32 {
        self.wait_for_backend(client, "wsusage launcher", not)
    }

    /// Pids of the flush workers of the client's database, in pg_stat_activity.
    pub fn worker_pids(&self, client: &mut Client) -> Vec<i32> {
        client
            .query(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'wsusage' AND datname = current_database()
                  ORDER BY pid",
                &[],
            )
            .expect("query pg_stat_activity")
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    pub fn wait_for_launcher(&self, client: &mut Client) -> i32 {
        self.wait_for_launcher_other_than(client, None)
    }

    fn wait_for_backend(&self, client: &mut Client, backend_type: &str, not: Option<i32>) -> i32 {
        let mut pid = None;
        wait_until(&format!("a {backend_type} process to run"), || {
            pid = client
                .query_opt(
                    "SELECT pid FROM pg_stat_activity WHERE backend_type = $1 AND wait_event = 'Extension'
                        AND (datname IS NULL OR datname = current_database())",
                    &[&backend_type],
                )
                .expect("query pg_stat_activity")
                .map(|row| row.get::<_, i32>(0))
                .filter(|p| Some(*p) != not);
            pid.is_some()
        });
        pid.unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            let mut cmd = pg_command("pg_ctl");
            cmd.arg("-D").arg(&self.data).args(["-w", "-m", "immediate", "stop"]);
            let _ = cmd.output();
        }
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            let _ = fs::write(self.dir.join(KEPT_MARKER), "");
            eprintln!(
                "kept the failed test's cluster in {} (a test binary run a day later removes it)",
                self.dir.display()
            );
        }
    }
}

/// `sql/released/`: each released version's install script and catalog signature.
pub fn released_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql/released")
}

/// Put an old release's install script, as shipped, beside today's files, so that `CREATE
/// EXTENSION wsusage VERSION 'V'` installs it. Written under another name and renamed, so that a
/// test creating the extension at the same moment reads the whole script (tests run at the same
/// time and install the same ones).
pub fn install_release_script(version: &str) {
    let out = Command::new(pg_bin().join("pg_config")).arg("--sharedir").output().expect("run pg_config");
    let extension_dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("extension");
    let script = format!("wsusage--{version}.sql");
    let partial = extension_dir.join(format!("{script}.{}.{:?}", std::process::id(), thread::current().id()));
    fs::copy(released_dir().join(&script), &partial).expect("copy a released install script");
    fs::rename(&partial, extension_dir.join(&script)).expect("install a released install script");
}

/// When the process `pid` started, as pg_stat_activity shows it; `None` once it has gone. Two
/// processes with the same pid are told apart by it.
pub fn backend_start(client: &mut Client, pid: i32) -> Option<DateTime<Utc>> {
    client
        .query_opt("SELECT backend_start FROM pg_stat_activity WHERE pid = $1", &[&pid])
        .expect("query pg_stat_activity")
        .map(|row| row.get(0))
}

/// How long a program the tests build or install with may take (`go build`, `pip install` on a
/// fresh machine): generous, but a hung one fails the test instead of the whole run's timeout.
pub const BUILD_PATIENCE: Duration = Duration::from_secs(600);

/// Run `command` to its end, as `Command::output`, but for at most `limit`: a program still
/// running then is killed and the test fails naming it (a hung program must not hang the suite).
pub fn output_within(command: &mut Command, what: &str, limit: Duration) -> Output {
    let mut child =
        command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("start {what}: {e}"));
    // Read both pipes meanwhile, or a program filling one would wait for us forever.
    let readers = [
        child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>),
        child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .map(|pipe| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    });
    let status = wait_within(&mut child, limit).unwrap_or_else(|| panic!("{what} did not finish within {limit:?}"));
    let [stdout, stderr] = readers.map(|reader| reader.join().unwrap_or_default());
    Output { status, stdout, stderr }
}

/// Wait for `child` to end, for at most `limit`; killed (and `None`) if it has not by then.
pub fn wait_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        sleep(Duration::from_millis(50));
    }
}

/// Poll `condition` every 50 ms until it holds; panic after [`PATIENCE`].
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(50));
    }
}

/// The SQLSTATE of a failed statement, e.g. "22004".
pub fn sqlstate(error: &PgError) -> String {
    error.code().map(|c| c.code().to_owned()).unwrap_or_else(|| format!("no SQLSTATE: {error}"))
}

/// `wsusage_flush()` must fail: its error report (SQLSTATE, message, detail, hint).
pub fn flush_error(client: &mut Client) -> (String, String, String, String) {
    report(&client.execute("SELECT wsusage_flush()", &[]).expect_err("wsusage_flush() should fail"))
}

/// The server's error report: (SQLSTATE, message, detail, hint).
pub fn report(error: &PgError) -> (String, String, String, String) {
    let db = error.as_db_error().unwrap_or_else(|| panic!("not a server error: {error}"));
    (
        db.code().code().to_owned(),
        db.message().to_owned(),
        db.detail().unwrap_or_default().to_owned(),
        db.hint().unwrap_or_default().to_owned(),
    )
}

/// The client's clock readings around one mark call: its mark time lies between them.
pub type Window = (DateTime<Utc>, DateTime<Utc>);

/// Widen `latest[key]` to the window of an id's latest mark: no earlier than the latest call's
/// start, no later than the latest call's end, whatever order the calls are recorded in.
pub fn record_latest<K: std::hash::Hash + Eq>(latest: &mut HashMap<K, Window>, key: K, (before, after): Window) {
    let window = latest.entry(key).or_insert((before, after));
    window.0 = window.0.max(before);
    window.1 = window.1.max(after);
}

/// Wall-clock now, truncated to PostgreSQL's microsecond precision.
pub fn now_us() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

pub fn last_used(client: &mut Client, id: &Uuid) -> Option<DateTime<Utc>> {
    client.query_one("SELECT last_used_at FROM workspaces WHERE id = $1", &[id]).expect("read last_used_at").get(0)
}

/// The workspaces whose `last_used_at` is set, in id order.
pub fn used_ids(client: &mut Client) -> Vec<Uuid> {
    client
        .query("SELECT id FROM workspaces WHERE last_used_at IS NOT NULL ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// `ids` in order, as queries ordered by id return them.
pub fn sorted(ids: &[Uuid]) -> Vec<Uuid> {
    let mut ids = ids.to_vec();
    ids.sort();
    ids
}

/// Ask the client's database for a flush without waiting for it (the worker is blocked, say):
/// `wsusage_flush()`, cancelled once the caller is seen waiting inside it — so that its request is
/// registered however loaded the machine, which a short `statement_timeout` cannot promise.
/// Returns the call's error (57014, the cancel) or, should the flush have ended first, its count.
/// The call is made from a connection of its own: a cancel can land after the statement it was
/// meant for ended (the postmaster signals the backend and its process group), and would cancel
/// the client's next statement (seen: `pg_terminate_backend` in faults.rs).
pub fn request_flush(cluster: &Cluster, client: &mut Client) -> Result<i64, PgError> {
    let database: String = client.query_one("SELECT current_database()", &[]).expect("current_database()").get(0);
    let mut caller_client = cluster.connect_to(&database);
    let client = &mut caller_client;
    let caller: i32 = client.query_one("SELECT pg_backend_pid()", &[]).expect("pg_backend_pid()").get(0);
    let cancel = client.cancel_token();
    let returned = std::sync::atomic::AtomicBool::new(false);
    thread::scope(|scope| {
        let canceller = scope.spawn(|| {
            let mut watcher = cluster.connect();
            let mut waiting = false;
            wait_until("the caller to wait inside wsusage_flush() or return", || {
                waiting = watcher
                    .query_opt(
                        "SELECT FROM pg_stat_activity WHERE pid = $1 AND state = 'active'
                            AND wait_event_type = 'Extension' AND query LIKE '%wsusage_flush%'",
                        &[&caller],
                    )
                    .expect("query pg_stat_activity")
                    .is_some();
                waiting || returned.load(std::sync::atomic::Ordering::Acquire)
            });
            if waiting {
                cancel.cancel_query(NoTls).expect("cancel wsusage_flush()");
            }
        });
        let result = client.query_one("SELECT wsusage_flush()", &[]).map(|row| row.get(0));
        returned.store(true, std::sync::atomic::Ordering::Release);
        canceller.join().expect("the canceller");
        result
    })
}

pub fn flush(client: &mut Client) -> i64 {
    client.query_one("SELECT wsusage_flush()", &[]).expect("wsusage_flush()").get(0)
}

pub fn count_used(client: &mut Client) -> i64 {
    client.query_one("SELECT count(*) FROM workspaces WHERE last_used_at IS NOT NULL", &[]).expect("count used").get(0)
}

/// A meeting point for a fixed number of threads, as `std::sync::Barrier`, that cannot hang a
/// test: a thread that has waited [`PATIENCE`] panics, and a party that panics (its [`Party`]
/// dropped while unwinding) breaks the gate, so that every other party panics too instead of
/// waiting for it forever.
pub struct Gate {
    parties: usize,
    state: Mutex<GateState>,
    changed: Condvar,
}

struct GateState {
    /// Parties waiting for the gate to open this time.
    arrived: usize,
    /// How many times the gate has opened.
    opened: u64,
    /// Why the gate will never open again.
    broken: Option<String>,
}

impl Gate {
    /// A gate that opens each time `parties` parties wait at it.
    pub fn new(parties: usize) -> Arc<Gate> {
        Arc::new(Gate {
            parties,
            state: Mutex::new(GateState { arrived: 0, opened: 0, broken: None }),
            changed: Condvar::new(),
        })
    }

    /// One party's place at the gate; take it before spawning the party's thread and move it in,
    /// so that the gate learns of any panic of that thread.
    pub fn party(self: &Arc<Gate>) -> Party {
        Party { gate: self.clone() }
    }

    /// The state; a panic elsewhere never leaves it inconsistent (it panics after updating it).
    fn state(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn break_with(&self, state: &mut GateState, why: String) {
        state.broken.get_or_insert(why);
        self.changed.notify_all();
    }
}

/// A party's place at a [`Gate`].
pub struct Party {
    gate: Arc<Gate>,
}

impl Party {
    /// Wait until every party has arrived. Panics when the gate is broken, or after [`PATIENCE`]
    /// (breaking it for the others).
    pub fn wait(&self) {
        let gate = &*self.gate;
        let mut state = gate.state();
        if let Some(why) = &state.broken {
            panic!("the gate is broken: {why}");
        }
        state.arrived += 1;
        if state.arrived == gate.parties {
            state.arrived = 0;
            state.opened += 1;
            gate.changed.notify_all();
            return;
        }
        let this_time = state.opened;
        let deadline = Instant::now() + PATIENCE;
        while state.opened == this_time {
            if let Some(why) = &state.broken {
                panic!("the gate is broken: {why}");
            }
            let now = Instant::now();
            if now >= deadline {
                let why = format!("a party waited {PATIENCE:?} for the others");
                gate.break_with(&mut state, why.clone());
                panic!("{why}");
            }
            state = gate.changed.wait_timeout(state, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

impl Drop for Party {
    fn drop(&mut self) {
        if thread::panicking() {
            let mut state = self.gate.state();
            self.gate.break_with(&mut state, "another party panicked".to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A program still running at its limit is killed and fails the test (a hung `go build` or
    /// `pip install` must not hang the suite): the failure is the deadline's, not the program's end.
    #[test]
    fn a_program_outliving_its_limit_is_killed_and_fails_the_test() {
        let failure = std::panic::catch_unwind(|| {
            output_within(Command::new("sleep").arg("600"), "sleep 600", Duration::from_millis(200))
        })
        .expect_err("sleep 600 outlives a limit of 200 ms");
        let message = failure.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(message.contains("sleep 600 did not finish within"), "{message}");
    }

    #[test]
    fn a_program_ending_within_its_limit_gives_its_output() {
        let out = output_within(Command::new("sh").args(["-c", "echo out; echo err >&2"]), "sh", PATIENCE);
        assert!(out.status.success());
        assert_eq!((out.stdout.as_slice(), out.stderr.as_slice()), (&b"out\n"[..], &b"err\n"[..]));
    }
}
