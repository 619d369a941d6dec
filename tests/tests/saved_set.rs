//! The set saved across a clean restart (`pg_stat/wsusage.pending`): what no worker could flush
//! at shutdown comes back, and nothing damaged, invalid or from the future ever reaches a table.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use chrono::{DateTime, Duration as Span, Utc};
use uuid::Uuid;
use wsusage_saved_set::{self as format, legacy, Mark, SavedSet, Target};
use wsusage_tests::*;

const POSTGRES_EPOCH_US: i64 = 946_684_800_000_000;

fn saved_file(cluster: &Cluster) -> PathBuf {
    cluster.data.join("pg_stat/wsusage.pending")
}

fn pg_time(time: DateTime<Utc>) -> i64 {
    time.timestamp_micros() - POSTGRES_EPOCH_US
}

/// A saved set in the format the extension writes, of `entries` (database, id, time) of each
/// database's `default` target, and `more` marks as they are.
fn encode(written_at: i64, entries: &[(u32, Uuid, i64)], more: &[Mark]) -> Vec<u8> {
    let mut set = SavedSet { written_at, ..SavedSet::default() };
    for (database, id, at) in entries {
        let target = set.targets.iter().position(|target| target.database == *database).unwrap_or_else(|| {
            set.targets.push(Target { database: *database, name: "default".into() });
            set.targets.len() - 1
        });
        set.marks.push(Mark { target: target as u32, kind: 0, id: *id.as_bytes(), marked_at: *at });
    }
    set.marks.extend_from_slice(more);
    format::encode(&set)
}

/// (database, id, time) as the earlier formats' tests write them.
fn untargeted(entries: &[(u32, Uuid, i64)]) -> Vec<(u32, [u8; 16], i64)> {
    entries.iter().map(|(database, id, at)| (*database, *id.as_bytes(), *at)).collect()
}

/// Marks that no worker can flush before the shutdown (the table is parked), so the postmaster
/// saves them; returns the stopped cluster, the ids, and the database's OID.
fn stopped_with_saved_marks(shutdown: &str) -> (Cluster, Vec<Uuid>, u32) {
    let mut cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(3);
    let database: u32 = client
        .query_one("SELECT oid FROM pg_database WHERE datname = current_database()", &[])
        .unwrap()
        .get::<_, postgres::types::Oid>(0);
    client.batch_execute("ALTER TABLE workspaces RENAME TO parked").unwrap();
    client.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    // The worker is idle on its latch (its interval an hour away): an immediate shutdown kills
    // no process in the middle of changing the set.
    cluster.wait_for_worker(&mut client, None);
    drop(client);
    cluster.stop(shutdown);
    (cluster, ids, database)
}

fn pending_after_restart(cluster: &mut Cluster) -> (Client, Vec<Uuid>) {
    cluster.start_again();
    let mut client = cluster.connect();
    client.batch_execute("ALTER TABLE parked RENAME TO workspaces").unwrap();
    let pending = client.query("SELECT workspace_id FROM wsusage_pending()", &[]).unwrap();
    let pending = pending.iter().map(|row| row.get(0)).collect();
    (client, pending)
}

#[test]
fn marks_no_worker_could_flush_at_a_clean_shutdown_are_flushed_after_the_restart() {
    let (mut cluster, ids, _) = stopped_with_saved_marks("fast");
    assert!(saved_file(&cluster).exists());
    let (mut client, mut pending) = pending_after_restart(&mut cluster);
    pending.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(pending, expected);
    assert!(cluster.log().contains("wsusage restored 3 pending ids saved at the last shutdown"));
    assert!(!saved_file(&cluster).exists(), "read once, then removed");
    assert_eq!(flush(&mut client), 3);
    assert_eq!(count_used(&mut client), 3);
}

#[test]
fn an_immediate_shutdown_that_interrupted_nothing_keeps_the_set() {
    let (mut cluster, ids, _) = stopped_with_saved_marks("immediate");
    let (mut client, pending) = pending_after_restart(&mut cluster);
    assert_eq!(pending.len(), ids.len());
    assert_eq!(flush(&mut client), 3);
}

/// A debugger's breakpoint in a backend: the process, not the server, stops when it enters
/// `function`, and stays stopped until an immediate shutdown kills it. A process that dies
/// traced is the debugger's to reap, not the postmaster's: gdb lets go of it once the postmaster
/// says it has sent SIGKILL, so that the postmaster sees it gone and exits.
struct Breakpoint {
    gdb: Child,
    hit: PathBuf,
}

impl Breakpoint {
    /// Returns once the breakpoint is in the backend `pid`.
    fn set(cluster: &Cluster, pid: i32, function: &str) -> Breakpoint {
        let hit = cluster.dir.join("breakpoint-hit");
        let mut gdb = Command::new("gdb")
            .args(["-p", &pid.to_string(), "-batch", "-ex", &format!("break {function}"), "-ex", "continue"])
            .args(["-ex", &format!("shell touch {}", hit.display())])
            .args(["-ex", &format!("shell {}", until_logged(cluster, "issuing SIGKILL to recalcitrant children"))])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run gdb (scripts/test installs it)");
        // "Breakpoint 1 at …" once it is in; the backend runs on when gdb goes on to `continue`,
        // and what a client sends it meanwhile waits in its socket. Read on after it, so that gdb
        // never waits on a full pipe; a gdb that says nothing of the kind (no such function: it
        // goes on to `continue` and waits there) fails the test within PATIENCE, not hangs it.
        let out = BufReader::new(gdb.stdout.take().expect("gdb's stdout"));
        let (lines, said) = mpsc::channel();
        thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let deadline = Instant::now() + PATIENCE;
        let mut heard = Vec::new();
        loop {
            match said.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.starts_with("Breakpoint 1 at") => break,
                Ok(line) => heard.push(line),
                Err(_) => {
                    let _ = gdb.kill();
                    panic!("gdb set no breakpoint in {function}:\n{}", heard.join("\n"));
                }
            }
        }
        Breakpoint { gdb, hit }
    }

    fn wait_until_stopped_there(&self) {
        wait_until("the backend to stop at its breakpoint", || self.hit.exists());
    }
}

/// A shell command that returns once the server's log has `line` (or after `PATIENCE`).
fn until_logged(cluster: &Cluster, line: &str) -> String {
    format!(
        "timeout {} sh -c 'until grep -qF \"{line}\" {}; do sleep 0.1; done'",
        PATIENCE.as_secs(),
        cluster.log_path().display()
    )
}

impl Drop for Breakpoint {
    fn drop(&mut self) {
        let _ = self.gdb.kill();
        let _ = self.gdb.wait();
    }
}

#[test]
fn an_immediate_shutdown_that_interrupted_a_change_of_the_set_saves_nothing_and_says_so() {
    let mut cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(3);
    client.batch_execute("ALTER TABLE workspaces RENAME TO parked").unwrap();
    client.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    // A database without a mark yet: its first claims the database's place in the set, in the
    // marking backend, with the set's lock held exclusively — a change of the set.
    let (mut other, other_ids) = cluster.with_workspaces_in("other", 1);
    let pid: i32 = other.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let breakpoint = Breakpoint::set(&cluster, pid, "wsusage::state::databases::claim");
    let marking = thread::spawn(move || other.execute("SELECT wsusage_mark($1)", &[&other_ids[0]]).map(|_| ()));
    breakpoint.wait_until_stopped_there();

    // The postmaster kills the stopped backend where it stands (SIGQUIT, then SIGKILL after 5 s),
    // then exits: what that backend was changing may be half done.
    drop(client);
    cluster.stop("immediate");
    drop(breakpoint);
    assert!(cluster.log().contains("issuing SIGKILL to recalcitrant children"), "killed at the breakpoint");
    assert!(marking.join().unwrap().is_err(), "the interrupted mark did not return");
    let log = cluster.log();
    assert!(
        log.contains(
            "WARNING:  wsusage did not save its 3 pending ids: a process was stopped while it changed the set \
             (an immediate shutdown, or a crash); they are lost"
        ),
        "{log}"
    );
    assert!(!saved_file(&cluster).exists(), "no file to restore from");

    let (mut client, pending) = pending_after_restart(&mut cluster);
    assert_eq!(pending, Vec::<Uuid>::new(), "nothing of a set that may be half changed comes back");
    assert_eq!(count_used(&mut client), 0);
    // The set starts afresh: marks are taken and written.
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    assert_eq!(flush(&mut client), 1);
    assert!(last_used(&mut client, &ids[0]).is_some());
}

#[test]
fn a_damaged_saved_set_is_refused_whole_with_a_warning_and_kept_aside() {
    let (mut cluster, _, _) = stopped_with_saved_marks("fast");
    let path = saved_file(&cluster);
    let mut bytes = fs::read(&path).unwrap();
    // One bit of one mark's time: the length and every field still look right.
    let last_time_byte = bytes.len() - 4 - 3;
    bytes[last_time_byte] ^= 0x10;
    fs::write(&path, bytes).unwrap();

    let (mut client, pending) = pending_after_restart(&mut cluster);
    assert_eq!(pending, Vec::<Uuid>::new());
    let log = cluster.log();
    assert!(
        log.contains("WARNING:  wsusage ignored the saved pending set \"pg_stat/wsusage.pending\": its checksum or length does not match, so its 3 marks are lost"),
        "{log}"
    );
    assert!(cluster.data.join("pg_stat/wsusage.pending.damaged").exists());
    assert!(!path.exists());
    assert_eq!(count_used(&mut client), 0, "nothing of it reached the table");
}

#[test]
fn a_saved_mark_that_is_not_valid_never_reaches_the_table() {
    let (mut cluster, ids, database) = stopped_with_saved_marks("fast");
    let now = Utc::now();
    let written_at = pg_time(now);
    let valid = pg_time(now - Span::minutes(5));
    let entries = [
        (database, ids[0], valid),
        // Later than the file itself: would pin the row in the future for good.
        (database, ids[1], pg_time(now + Span::days(3650))),
        // No mark is made outside a database.
        (0, ids[2], valid),
        // An id twice.
        (database, ids[0], valid),
    ];
    let id = *ids[2].as_bytes();
    let more = [
        // A target the file does not list.
        Mark { target: 7, kind: 0, id, marked_at: valid },
        // A kind of key no release has.
        Mark { target: 0, kind: 9, id, marked_at: valid },
    ];
    fs::write(saved_file(&cluster), encode(written_at, &entries, &more)).unwrap();

    let (mut client, pending) = pending_after_restart(&mut cluster);
    assert_eq!(pending, vec![ids[0]]);
    assert!(cluster.log().contains("wsusage ignored 5 saved pending ids"), "{}", cluster.log());
    assert_eq!(flush(&mut client), 1);
    let written: DateTime<Utc> = last_used(&mut client, &ids[0]).unwrap();
    assert_eq!(pg_time(written), valid);
    assert_eq!(last_used(&mut client, &ids[1]), None, "the future time was never written");
}

#[test]
fn a_set_saved_by_release_0_2_0_is_restored_after_the_upgrades_restart() {
    let (mut cluster, ids, database) = stopped_with_saved_marks("fast");
    let at = pg_time(Utc::now() - Span::minutes(1));
    let entries: Vec<(u32, Uuid, i64)> = ids.iter().map(|id| (database, *id, at)).collect();
    fs::write(saved_file(&cluster), legacy::encode_0_2_0(&untargeted(&entries))).unwrap();
    let (mut client, pending) = pending_after_restart(&mut cluster);
    assert_eq!(pending.len(), 3);
    assert_eq!(flush(&mut client), 3);
    assert_eq!(pg_time(last_used(&mut client, &ids[2]).unwrap()), at);
}

#[test]
fn sets_saved_by_release_0_3_0_and_its_development_builds_are_restored_after_the_upgrades_restart() {
    let (mut cluster, ids, database) = stopped_with_saved_marks("fast");
    let at = pg_time(Utc::now() - Span::minutes(1));
    let written_at = pg_time(Utc::now());
    // 0.3.0's format (version 3), the first two ids; a development build's (version 2) next.
    let set = SavedSet {
        written_at,
        targets: vec![Target { database, name: "default".into() }],
        marks: ids[..2].iter().map(|id| Mark { target: 0, kind: 0, id: *id.as_bytes(), marked_at: at }).collect(),
    };
    fs::write(saved_file(&cluster), legacy::encode_targeted(&set)).unwrap();
    let (mut client, pending) = pending_after_restart(&mut cluster);
    assert_eq!(pending.len(), 2);
    assert_eq!(flush(&mut client), 2);
    // Parked again, so that no worker flushes the next file's mark before it is seen pending.
    client.batch_execute("ALTER TABLE workspaces RENAME TO parked").unwrap();
    drop(client);
    cluster.stop("fast");
    fs::write(saved_file(&cluster), legacy::encode_untargeted(written_at, &untargeted(&[(database, ids[2], at)])))
        .unwrap();
    let (mut client, pending) = pending_after_restart(&mut cluster);
    assert_eq!(pending, vec![ids[2]]);
    assert_eq!(flush(&mut client), 1);
    assert_eq!(pg_time(last_used(&mut client, &ids[2]).unwrap()), at);
}

#[test]
fn a_saved_set_larger_than_the_new_max_pending_restores_what_fits_and_says_how_many_did_not() {
    let (mut cluster, _, database) = stopped_with_saved_marks("fast");
    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    let at = pg_time(Utc::now() - Span::minutes(1));
    let entries: Vec<(u32, Uuid, i64)> = ids.iter().map(|id| (database, *id, at)).collect();
    fs::write(saved_file(&cluster), encode(pg_time(Utc::now()), &entries, &[])).unwrap();
    // The DBA made the set smaller for the restart.
    let conf = cluster.data.join("postgresql.auto.conf");
    let mut text = fs::read_to_string(&conf).unwrap_or_default();
    text.push_str("wsusage.max_pending = 16\n");
    fs::write(&conf, text).unwrap();

    // Read with the table still parked: the 16 restored ids are past the smaller set's high-water
    // mark, so a worker flushes at once, and would take them as ids without a row.
    cluster.start_again();
    let mut client = cluster.connect();
    let pending: Vec<Uuid> =
        client.query("SELECT workspace_id FROM wsusage_pending()", &[]).unwrap().iter().map(|row| row.get(0)).collect();
    assert_eq!(pending.len(), 16, "what fits");
    assert!(pending.iter().all(|id| ids.contains(id)));
    assert!(
        cluster.log().contains(
            "wsusage could not restore 4 saved pending ids: the set, its database slots or its target slots are full"
        ),
        "{}",
        cluster.log()
    );
}

/// Every pending key of the database, target by target: (target, key as text, mark time).
fn pending_by_target(client: &mut Client) -> Vec<(String, String, DateTime<Utc>)> {
    client
        .query("SELECT target, key, last_used_at FROM wsusage_pending() ORDER BY target, key", &[])
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}

/// Keys are saved with their target's name, not the slot that held the target in shared memory
/// (another after the restart), and with their kind: a uuid target's keys come back as uuids, a
/// bigint target's as bigints, each to be written into its own table at its own mark time.
#[test]
fn keys_of_every_target_pending_at_a_clean_stop_come_back_under_their_target_names_and_reach_their_own_tables() {
    // The worker writes as usage_writer, which may update none of the tables until after the
    // restart: the final flush at the shutdown fails for every target, so the postmaster saves
    // all their keys.
    let mut cluster = Cluster::start(&[("wsusage.role", "'usage_writer'")]);
    let (mut client, workspaces) = cluster.with_workspaces(3);
    let users: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    client
        .batch_execute(
            "CREATE ROLE usage_writer NOLOGIN;
             CREATE TABLE users (id uuid PRIMARY KEY, last_seen_at timestamptz);
             CREATE TABLE api_keys (id bigint PRIMARY KEY, last_used timestamptz);
             INSERT INTO api_keys (id) SELECT generate_series(1, 10);
             INSERT INTO wsusage_target (name, relation, id_column, timestamp_column)
                  VALUES ('users', 'users', 'id', 'last_seen_at'), ('api_keys', 'api_keys', 'id', 'last_used');",
        )
        .unwrap();
    client.execute("INSERT INTO users (id) SELECT unnest($1::uuid[])", &[&users]).unwrap();
    // Two keys of each target; the third row of each table (and api keys 1, 2, 4 …) never marked.
    client.execute("SELECT wsusage_mark_many($1)", &[&workspaces[..2].to_vec()]).unwrap();
    client.execute("SELECT wsusage_mark('users', $1)", &[&users[0]]).unwrap();
    client.execute("SELECT wsusage_mark_many('users', $1)", &[&vec![users[1]]]).unwrap();
    client.execute("SELECT wsusage_mark_bigint('api_keys', $1)", &[&3i64]).unwrap();
    client.execute("SELECT wsusage_mark_many_bigint('api_keys', $1)", &[&vec![7i64]]).unwrap();
    let before = pending_by_target(&mut client);
    let targets: Vec<&str> = before.iter().map(|(target, _, _)| target.as_str()).collect();
    assert_eq!(targets, ["api_keys", "api_keys", "default", "default", "users", "users"]);
    // The worker is idle on its latch (its interval an hour away): the shutdown finds it running,
    // and its final flush is the one that fails.
    cluster.wait_for_worker(&mut client, None);
    drop(client);
    cluster.stop("fast");
    assert!(saved_file(&cluster).exists());
    assert!(cluster.log().contains("wsusage saved 6 pending ids"), "{}", cluster.log());

    cluster.start_again();
    let mut client = cluster.connect();
    assert_eq!(pending_by_target(&mut client), before, "the same targets, keys and mark times");
    assert!(cluster.log().contains("wsusage restored 6 pending ids saved at the last shutdown"), "{}", cluster.log());
    assert!(!saved_file(&cluster).exists(), "read once, then removed");

    client.batch_execute("GRANT SELECT, UPDATE ON workspaces, users, api_keys TO usage_writer").unwrap();
    assert_eq!(flush(&mut client), 6);
    let written: Vec<(String, String, DateTime<Utc>)> = client
        .query(
            "SELECT 'default', id::text, last_used_at FROM workspaces WHERE last_used_at IS NOT NULL
             UNION ALL SELECT 'users', id::text, last_seen_at FROM users WHERE last_seen_at IS NOT NULL
             UNION ALL SELECT 'api_keys', id::text, last_used FROM api_keys WHERE last_used IS NOT NULL
             ORDER BY 1, 2",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(written, before, "each key in its own target's table, at its mark time; no other row written");
    assert!(pending_by_target(&mut client).is_empty());
}
