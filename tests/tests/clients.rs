//! The client examples in examples/ run against a real cluster and their marks arrive.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use uuid::Uuid;
use wsusage_tests::*;

fn ids_env(ids: &[Uuid]) -> String {
    ids.iter().map(Uuid::to_string).collect::<Vec<_>>().join(",")
}

fn run_example(mut command: Command, cluster: &Cluster, ids: &[Uuid]) {
    command.env("WSUSAGE_DSN", cluster.conninfo("postgres")).env("WORKSPACE_IDS", ids_env(ids));
    let out = output_within(&mut command, "the example", PATIENCE);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("marked {} workspaces", ids.len())), "{stdout}");
}

#[test]
fn the_rust_pooled_heartbeat_example_marks_every_workspace() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(250);
    run_example(Command::new(env!("CARGO_BIN_EXE_heartbeat-example")), &cluster, &ids);
    assert_eq!(flush(&mut client), 250);
    assert_eq!(count_used(&mut client), 250);
}

/// A Python with psycopg from PyPI, in a virtual environment made once under target/.
fn python_with_psycopg() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("examples-venv");
        let python = venv.join("bin/python");
        let ready = python.exists()
            && output_within(Command::new(&python).args(["-c", "import psycopg"]), "python", PATIENCE).status.success();
        if !ready {
            let made = output_within(
                Command::new("python3").arg("-m").arg("venv").arg(&venv),
                "python3 -m venv",
                BUILD_PATIENCE,
            );
            assert!(made.status.success(), "python3 -m venv failed (Debian: apt-get install python3-venv)");
            let installed = output_within(
                Command::new(&python).args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "psycopg[binary]",
                ]),
                "pip install psycopg[binary]",
                BUILD_PATIENCE,
            );
            assert!(
                installed.status.success(),
                "pip install psycopg[binary] failed: {}",
                String::from_utf8_lossy(&installed.stderr)
            );
        }
        python
    })
}

#[test]
fn the_python_psycopg_heartbeat_example_marks_every_workspace() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(150);
    let mut python = Command::new(python_with_psycopg());
    python.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/heartbeat.py"));
    run_example(python, &cluster, &ids);
    assert_eq!(flush(&mut client), 150);
    assert_eq!(count_used(&mut client), 150);
}

/// A Go example built once, in GOPATH mode against Debian's Go packages (golang-go,
/// golang-github-lib-pq-dev, golang-github-jackc-pgx-v4-dev: installed by scripts/test), into
/// target/.
fn go_example(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-examples");
    let binary = dir.join(name);
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/go").join(name);
    let mut go = Command::new("go");
    go.arg("build")
        .arg("-o")
        .arg(&binary)
        .arg(".")
        .current_dir(&source)
        .env("GO111MODULE", "off")
        .env("GOPATH", format!("{}:/usr/share/gocode", dir.join("gopath").display()))
        .env("GOCACHE", dir.join("cache"));
    let out = output_within(&mut go, "go build (Debian: apt-get install golang-go)", BUILD_PATIENCE);
    assert!(out.status.success(), "go build {name}: {}", String::from_utf8_lossy(&out.stderr));
    binary
}

#[test]
fn the_go_lib_pq_heartbeat_example_marks_every_workspace() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(150);
    run_example(Command::new(go_example("libpq")), &cluster, &ids);
    assert_eq!(flush(&mut client), 150);
    assert_eq!(count_used(&mut client), 150);
}

#[test]
fn the_go_pgx_pool_heartbeat_example_marks_every_workspace() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(150);
    run_example(Command::new(go_example("pgx")), &cluster, &ids);
    assert_eq!(flush(&mut client), 150);
    assert_eq!(count_used(&mut client), 150);
    // Every heartbeat was its own mark, the batches one per id.
    let marks: i64 = client.query_one("SELECT marks FROM wsusage_stats", &[]).unwrap().get(0);
    assert_eq!(marks, 150);
}
