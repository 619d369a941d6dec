//! The fault suite: every fault we can survive loses no mark, is visible in wsusage_stats while
//! it lasts, and heals once the fault ends. Each test prints its figures (marks made, applied,
//! lost) so that a run doubles as a report.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread;

use chrono::{DateTime, Utc};
use uuid::Uuid;
use wsusage_tests::*;

fn stat(client: &mut Client, column: &str) -> i64 {
    client.query_one(&format!("SELECT {column} FROM wsusage_stats"), &[]).unwrap().get(0)
}

fn last_error(client: &mut Client) -> String {
    client.query_one("SELECT coalesce(last_error, '') FROM wsusage_stats", &[]).unwrap().get(0)
}

fn figures(fault: &str, made: usize, applied: i64) {
    println!("fault: {fault}: marks made {made}, applied {applied}, lost {}", made as i64 - applied);
}

/// Report the fault's figures and require that every marked row was written.
fn nothing_lost(client: &mut Client, fault: &str, made: usize) {
    let applied = count_used(client);
    figures(fault, made, applied);
    assert_eq!(applied, made as i64, "{fault}: marks lost");
}

#[test]
fn a_row_locked_by_an_application_is_skipped_without_waiting_and_only_it_stays_pending() {
    // lock_timeout 0 waits forever: a flush that waited for the row would never return.
    let cluster = Cluster::start(&[("wsusage.batch_size", "10"), ("wsusage.lock_timeout", "0")]);
    let (mut client, ids) = cluster.with_workspaces(100);
    let mut app = cluster.connect();
    app.batch_execute("BEGIN").unwrap();
    app.execute("SELECT FROM workspaces WHERE id = $1 FOR UPDATE", &[&ids[42]]).unwrap();

    client.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    assert_eq!(flush(&mut client), 99, "every id but the locked row's was written at once");
    assert_eq!(count_used(&mut client), 99);
    assert_eq!(stat(&mut client, "pending"), 1, "the locked row's id stays pending");
    let pending: Vec<Uuid> =
        client.query("SELECT workspace_id FROM wsusage_pending()", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(pending, vec![ids[42]]);
    assert_eq!(stat(&mut client, "ids_skipped_locked"), 1);
    assert_eq!(stat(&mut client, "failures"), 0, "a skipped row is not a failure");
    eprintln!("row lock: rows locked by the flush 99, applied 99, skipped 1, failed statements 0");

    app.batch_execute("COMMIT").unwrap();
    assert_eq!(flush(&mut client), 1);
    nothing_lost(&mut client, "row locked by an application", 100);
}

/// `wsusage_flush()` called by the transaction that holds a marked row locked: the flush, another
/// process, skips that row instead of waiting for the caller, which waits for the flush — no
/// self-deadlock; the row is written once the transaction ends.
#[test]
fn wsusage_flush_from_a_transaction_holding_a_marked_row_returns_without_it() {
    let cluster = Cluster::start(&[("wsusage.lock_timeout", "0")]);
    let (mut client, ids) = cluster.with_workspaces(10);
    client.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    client.batch_execute("BEGIN").unwrap();
    client.execute("UPDATE workspaces SET name = 'busy' WHERE id = $1", &[&ids[3]]).unwrap();
    assert_eq!(flush(&mut client), 9, "every id but the one this transaction holds");
    client.batch_execute("COMMIT").unwrap();
    assert_eq!(flush(&mut client), 1);
    assert_eq!(count_used(&mut client), 10);
}

#[test]
fn a_table_locked_access_exclusive_beyond_lock_timeout_is_retried_later() {
    let cluster = Cluster::start(&[("wsusage.lock_timeout", "'200ms'")]);
    let (mut client, ids) = cluster.with_workspaces(50);
    let mut dba = cluster.connect();
    dba.batch_execute("BEGIN; LOCK TABLE workspaces IN ACCESS EXCLUSIVE MODE").unwrap();

    client.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    let err = client.execute("SELECT wsusage_flush()", &[]).unwrap_err();
    assert_eq!(sqlstate(&err), "55P03");
    assert!(last_error(&mut client).contains("lock"), "{}", last_error(&mut client));
    assert_eq!(stat(&mut client, "consecutive_failures"), 1, "the one round asked for (the interval is an hour)");

    dba.batch_execute("COMMIT").unwrap();
    assert_eq!(flush(&mut client), 50);
    nothing_lost(&mut client, "table locked ACCESS EXCLUSIVE", 50);
}

#[test]
fn the_worker_writes_as_wsusage_role_and_a_revoked_privilege_keeps_the_marks() {
    let cluster = Cluster::start(&[("wsusage.role", "'usage_writer'")]);
    let (mut client, ids) = cluster.with_workspaces(5);

    // The role does not exist yet: a clear error, the worker stays up, nothing is lost.
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    let (code, message, _, _) = flush_error(&mut client);
    assert_eq!(code, "42704");
    assert!(message.contains("role \"usage_writer\""), "{message}");
    let worker = cluster.wait_for_worker(&mut client, None);

    client.batch_execute("CREATE ROLE usage_writer NOLOGIN").unwrap();
    let err = client.execute("SELECT wsusage_flush()", &[]).unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "no privilege yet");

    client.batch_execute("GRANT SELECT, UPDATE ON workspaces TO usage_writer").unwrap();
    client.execute("SELECT wsusage_mark($1)", &[&ids[1]]).unwrap();
    assert_eq!(flush(&mut client), 2);

    client.batch_execute("REVOKE UPDATE ON workspaces FROM usage_writer").unwrap();
    client.execute("SELECT wsusage_mark_many($1)", &[&ids[2..].to_vec()]).unwrap();
    let err = client.execute("SELECT wsusage_flush()", &[]).unwrap_err();
    assert_eq!(sqlstate(&err), "42501");
    assert!(last_error(&mut client).contains("permission denied"));
    assert_eq!(stat(&mut client, "pending"), 3);

    client.batch_execute("GRANT UPDATE ON workspaces TO usage_writer").unwrap();
    assert_eq!(flush(&mut client), 3);
    assert_eq!(cluster.worker_pid(&mut client), Some(worker), "no restart: errors were caught");
    nothing_lost(&mut client, "role missing, then privilege revoked", 5);
}

#[test]
fn triggers_run_as_wsusage_role_not_as_superuser() {
    let cluster = Cluster::start(&[("wsusage.role", "'usage_writer'")]);
    let (mut client, ids) = cluster.with_workspaces(1);
    client
        .batch_execute(
            "CREATE ROLE usage_writer NOLOGIN;
             GRANT SELECT, UPDATE ON workspaces TO usage_writer;
             CREATE TABLE audit (who text);
             GRANT INSERT ON audit TO usage_writer;
             CREATE FUNCTION audit_update() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO audit VALUES (current_user); RETURN NEW; END $$;
             CREATE TRIGGER audit BEFORE UPDATE ON workspaces FOR EACH ROW EXECUTE FUNCTION audit_update();",
        )
        .unwrap();
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    assert_eq!(flush(&mut client), 1);
    let who: String = client.query_one("SELECT who FROM audit", &[]).unwrap().get(0);
    assert_eq!(who, "usage_writer");
}

/// Failed statements are counted by the trigger itself, in a sequence (which a rollback does not
/// undo): each failing statement reaches a refused row once, then stops.
#[test]
fn rows_a_trigger_refuses_are_isolated_and_held_back_while_every_other_row_is_written() {
    const ROWS: usize = 2_000;
    let cluster = Cluster::start(&[("wsusage.batch_size", "1000")]);
    let (mut client, ids) = cluster.with_workspaces(ROWS);
    let refused = [ids[7], ids[1500]];
    client
        .batch_execute(&format!(
            "CREATE SEQUENCE refusals;
             CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN
                    IF NEW.id IN ('{}', '{}') THEN
                      PERFORM nextval('refusals');
                      RAISE EXCEPTION 'workspace is frozen';
                    END IF;
                    RETURN NEW;
                  END $$;
             CREATE TRIGGER refuse BEFORE UPDATE ON workspaces FOR EACH ROW EXECUTE FUNCTION refuse();",
            refused[0], refused[1]
        ))
        .unwrap();
    let failed_statements = |client: &mut Client| -> i64 {
        client.query_one("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM refusals", &[]).unwrap().get(0)
    };
    client.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();

    assert_eq!(flush(&mut client), (ROWS - 2) as i64, "every other id written in the same flush");
    assert_eq!(count_used(&mut client), (ROWS - 2) as i64);
    let held: Vec<(Uuid, Option<String>, Option<DateTime<Utc>>)> = client
        .query("SELECT workspace_id, error, retry_at FROM wsusage_pending() ORDER BY workspace_id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let mut expected = refused.to_vec();
    expected.sort();
    assert_eq!(held.iter().map(|h| h.0).collect::<Vec<_>>(), expected);
    for (_, error, retry_at) in &held {
        assert_eq!(error.as_deref(), Some("workspace is frozen"));
        assert!(retry_at.unwrap() > Utc::now(), "retried later, not at once");
    }
    assert_eq!(stat(&mut client, "held_back"), 2);
    assert_eq!(stat(&mut client, "failures"), 2, "one per isolated id");
    assert_eq!(stat(&mut client, "consecutive_failures"), 0, "the round wrote everything it could");
    let statements = failed_statements(&mut client);
    // Two chunks of 1000, one refused row in each: about two failed statements per halving.
    assert!(statements <= 2 * 2 * 10, "isolated by halving, not row by row: {statements} failed statements");
    eprintln!("poison rows: 2 of {ROWS} isolated with {statements} failed statements, {} rows written", ROWS - 2);
    assert!(cluster.log().contains("wsusage holds back id"), "{}", cluster.log());

    // The worker's own rounds wait for their time (retry_at above); wsusage_flush(), which an
    // operator calls, tries them at once: refused again, still held back, nothing else touched.
    assert_eq!(flush(&mut client), 0);
    let tried_again = failed_statements(&mut client);
    assert!(tried_again > statements, "tried again by the explicit flush");
    assert_eq!(stat(&mut client, "held_back"), 2);
    assert_eq!(stat(&mut client, "failures"), 4);

    // Fixed: the operator's next wsusage_flush() writes them.
    client.batch_execute("DROP TRIGGER refuse ON workspaces").unwrap();
    assert_eq!(flush(&mut client), 2);
    assert_eq!(count_used(&mut client), ROWS as i64);
    assert_eq!((stat(&mut client, "held_back"), stat(&mut client, "pending")), (0, 0));
    nothing_lost(&mut client, "trigger raising for two rows", ROWS);
}

/// A trigger raising for every row, counting its calls in a sequence (not undone by rollback).
fn refuse_every_row(client: &mut Client, sqlstate: &str) {
    client
        .batch_execute(&format!(
            "CREATE SEQUENCE refusals;
             CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN PERFORM nextval('refusals'); RAISE EXCEPTION 'refused' USING ERRCODE = '{sqlstate}'; END $$;
             CREATE TRIGGER refuse BEFORE UPDATE ON workspaces FOR EACH ROW EXECUTE FUNCTION refuse();"
        ))
        .unwrap();
}

fn refusals(client: &mut Client) -> i64 {
    client.query_one("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM refusals", &[]).unwrap().get(0)
}

#[test]
fn an_error_no_row_causes_stops_the_round_without_splitting() {
    let cluster = Cluster::start(&[("wsusage.batch_size", "1000")]);
    let (mut client, ids) = cluster.with_workspaces(1000);
    refuse_every_row(&mut client, "42501");
    client.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    let (code, _, _, _) = flush_error(&mut client);
    assert_eq!(code, "42501");
    assert_eq!(refusals(&mut client), 1, "one statement, not split");
    assert_eq!(stat(&mut client, "pending"), 1000);
    assert_eq!(stat(&mut client, "held_back"), 0);
}

#[test]
fn when_every_row_fails_splitting_stops_at_its_budget_and_everything_stays_pending() {
    let cluster = Cluster::start(&[("wsusage.batch_size", "1000")]);
    let (mut client, ids) = cluster.with_workspaces(1000);
    refuse_every_row(&mut client, "P0001");
    client.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    let (code, _, _, _) = flush_error(&mut client);
    assert_eq!(code, "P0001");
    let statements = refusals(&mut client);
    // Halving from the chunk of 1,000 to its first row (10 statements), then on to the next rows,
    // until 8 ids are held back, the round's cap: 25 failed statements, not two per row (2,000),
    // and far within the budget of 256 a round.
    assert_eq!(statements, 25, "failed statements");
    let held = stat(&mut client, "held_back");
    assert_eq!(held, 8, "the round's cap of ids held back");
    eprintln!("every row refused: {statements} failed statements for 1000 ids, {held} held back");
    assert_eq!(stat(&mut client, "pending"), 1000, "nothing lost");
    assert_eq!(count_used(&mut client), 0);
}

#[test]
fn after_drop_extension_the_worker_leaves_and_the_kept_marks_are_flushed_once_it_is_back() {
    let cluster = Cluster::start(&[("wsusage.flush_interval", "'100ms'")]);
    let (mut client, ids) = cluster.with_workspaces(3);
    // Another database, to watch this one's slot once its extension is gone.
    cluster.connect().batch_execute("CREATE DATABASE watcher").unwrap();
    let mut watcher = cluster.connect_to("watcher");
    watcher.batch_execute("CREATE EXTENSION wsusage").unwrap();
    let slot = |watcher: &mut Client| -> (i64, Option<i32>) {
        let row = watcher
            .query_one("SELECT pending, worker_pid FROM wsusage_stats_by_database WHERE datname = 'postgres'", &[])
            .unwrap();
        (row.get(0), row.get(1))
    };

    client.batch_execute("ALTER TABLE workspaces RENAME TO parked").unwrap();
    client.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    cluster.wait_for_worker(&mut client, None);
    client.batch_execute("DROP EXTENSION wsusage; ALTER TABLE parked RENAME TO workspaces").unwrap();

    let leaving = "wsusage flush worker is leaving: extension \"wsusage\" does not exist in database \"postgres\"";
    wait_until("the worker to leave", || cluster.log().contains(leaving) && slot(&mut watcher).1.is_none());
    // The launcher goes on with its rounds — it starts the watcher's worker for a mark there, and
    // that worker flushes it — and still starts none for this database.
    let watched = Uuid::new_v4();
    watcher.batch_execute("CREATE TABLE workspaces (id uuid PRIMARY KEY, last_used_at timestamptz)").unwrap();
    watcher.execute("INSERT INTO workspaces (id) VALUES ($1)", &[&watched]).unwrap();
    watcher.execute("SELECT wsusage_mark($1)", &[&watched]).unwrap();
    wait_until("the launcher's rounds to start the watcher's worker and flush", || count_used(&mut watcher) == 1);
    assert_eq!(slot(&mut watcher), (3, None), "the marks stay pending, with no worker holding a place");
    assert_eq!(cluster.log().matches(leaving).count(), 1, "said once");
    assert_eq!(count_used(&mut client), 0);

    // A mark needs the extension: it brings a worker back, which flushes the kept marks too.
    client.batch_execute("CREATE EXTENSION wsusage").unwrap();
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    wait_until("the kept marks to be applied", || count_used(&mut client) == 3);
    figures("DROP EXTENSION, then CREATE EXTENSION", ids.len(), count_used(&mut client));
}

#[test]
fn a_worker_terminated_during_a_flush_finishes_it_and_loses_nothing() {
    let cluster = Cluster::start(&[("wsusage.lock_timeout", "0")]);
    let (mut client, ids) = cluster.with_workspaces(10);
    // The worker runs, idle, before the application locks the table: what blocks below is its
    // flush, not its start.
    cluster.start_worker(&mut client, &ids[0]);
    let mut app = cluster.connect();
    app.batch_execute("BEGIN; LOCK TABLE workspaces IN ACCESS EXCLUSIVE MODE").unwrap();

    client.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    // Ask for a flush without waiting for it: the worker's UPDATE now waits on the table lock.
    request_flush(&cluster, &mut client).unwrap_err();
    let mut worker = None;
    wait_until("the flush to wait on the table lock", || {
        worker = client
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'wsusage' AND wait_event_type = 'Lock'",
                &[],
            )
            .unwrap()
            .map(|row| row.get::<_, i32>(0));
        worker.is_some()
    });

    let terminated: bool = client.query_one("SELECT pg_terminate_backend($1)", &[&worker]).unwrap().get(0);
    assert!(terminated);
    app.batch_execute("COMMIT").unwrap();
    wait_until("the terminated worker to finish its flush and exit", || cluster.worker_pid(&mut client).is_none());
    assert_eq!(flush(&mut client), 0, "the terminated worker wrote every id before it exited");
    nothing_lost(&mut client, "worker terminated during a flush", 10);
}

#[test]
fn after_a_backend_crash_the_cluster_and_worker_come_back_and_only_unflushed_marks_are_lost() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(20);
    let launcher = cluster.wait_for_launcher(&mut client);
    let launcher_started = backend_start(&mut client, launcher).expect("the launcher's start");
    client.execute("SELECT wsusage_mark_many($1)", &[&ids[..10].to_vec()]).unwrap();
    assert_eq!(flush(&mut client), 10);
    client.execute("SELECT wsusage_mark_many($1)", &[&ids[10..].to_vec()]).unwrap();
    let pending_at_crash = client.query_one("SELECT pending FROM wsusage_stats", &[]).unwrap().get::<_, i64>(0);

    let victim = cluster.connect();
    let pid: i32 = client
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'",
            &[],
        )
        .unwrap()
        .get(0);
    let killed = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    assert!(killed.success());
    drop(victim);
    drop(client);

    // The postmaster reinitialises shared memory, recovers and accepts connections again (a
    // connection made before it noticed the crash would be cut by the reinitialisation).
    wait_until("the cluster to recover from the crash", || {
        cluster.log().matches("database system is ready to accept connections").count() >= 2
    });
    let mut client = cluster.connect();
    let after = cluster.wait_for_launcher_other_than(&mut client, Some(launcher));
    let after_started = backend_start(&mut client, after).expect("the new launcher's start");
    assert!(after_started > launcher_started, "a launcher started after the crash: {after_started}");
    let reported: Option<i32> = client.query_one("SELECT launcher_pid FROM wsusage_stats", &[]).unwrap().get(0);
    assert_eq!(reported, Some(after));
    assert!(cluster.log().contains("terminated by signal 9"));

    let applied = count_used(&mut client);
    assert_eq!(applied, 10, "what was flushed before the crash stays");
    assert_eq!(pending_at_crash, 10);
    // The marks since the last flush are what the crash lost: nothing is pending after it, and no
    // saved set brought anything back.
    let pending_after: i64 = client.query_one("SELECT pending FROM wsusage_stats", &[]).unwrap().get(0);
    assert_eq!(pending_after, 0, "nothing pending after the crash");
    assert!(!cluster.log().contains("wsusage restored"), "a crash saves nothing to restore");
    println!("fault: backend killed with SIGKILL: marks made 20, applied {applied}, lost {} (the documented bound: the marks since the last flush)", 20 - applied);

    client.execute("SELECT wsusage_mark_many($1)", &[&ids[10..].to_vec()]).unwrap();
    assert_eq!(flush(&mut client), 10);
    assert_eq!(count_used(&mut client), 20);
}

#[test]
fn under_load_every_id_ends_at_its_latest_mark_and_the_counters_add_up() {
    const CLIENTS: usize = 64;
    const IDS: usize = 100_000;
    const CALLS: usize = 157; // per client, 100 ids a call: about 1M marks
    const PER_CALL: usize = 100;
    let cluster = Arc::new(Cluster::start(&[
        ("max_connections", "100"),
        ("wsusage.max_pending", "131072"),
        ("wsusage.flush_interval", "'100ms'"),
    ]));
    let (mut client, ids) = cluster.with_workspaces(IDS);
    let ids = Arc::new(ids);

    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (cluster, ids) = (cluster.clone(), ids.clone());
            thread::spawn(move || {
                let mut client = cluster.connect();
                let mark_many = client.prepare("SELECT wsusage_mark_many($1)").unwrap();
                let mut calls: Vec<(usize, Window)> = Vec::with_capacity(CALLS);
                for call in 0..CALLS {
                    // Consecutive runs of ids, overlapping between clients and calls.
                    let start = (c * 1_543 + call * 7_919) % IDS;
                    let batch: Vec<Uuid> = (0..PER_CALL).map(|k| ids[(start + k) % IDS]).collect();
                    let before = now_us();
                    client.execute(&mark_many, &[&batch]).unwrap();
                    calls.push((start, (before, now_us())));
                }
                calls
            })
        })
        .collect();
    let mut latest: HashMap<usize, Window> = HashMap::new();
    for handle in clients {
        for (start, (before, after)) in handle.join().unwrap() {
            for k in 0..PER_CALL {
                record_latest(&mut latest, (start + k) % IDS, (before, after));
            }
        }
    }
    flush(&mut client);

    let rows = client.query("SELECT id, last_used_at FROM workspaces WHERE last_used_at IS NOT NULL", &[]).unwrap();
    let written: HashMap<Uuid, DateTime<Utc>> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut outside = 0;
    for (index, (from, to)) in &latest {
        match written.get(&ids[*index]) {
            Some(at) if from <= at && at <= to => {}
            _ => outside += 1,
        }
    }
    let made = (CLIENTS * CALLS * PER_CALL) as i64;
    let stats = client
        .query_one(
            "SELECT marks, rejected, pending, ids_without_row, failures, rows_updated, ids_flushed FROM wsusage_stats",
            &[],
        )
        .unwrap();
    let (marks, rejected, pending, without_row, failures): (i64, i64, i64, i64, i64) =
        (stats.get(0), stats.get(1), stats.get(2), stats.get(3), stats.get(4));
    let (rows_updated, ids_flushed): (i64, i64) = (stats.get(5), stats.get(6));
    println!(
        "fault: load ({CLIENTS} clients, {made} marks over {} ids): ids flushed {ids_flushed}, rows updated {rows_updated}, \
         ids outside their last call's window {outside}, lost {}",
        latest.len(),
        latest.len() - written.len().min(latest.len())
    );
    assert_eq!(outside, 0, "every id at its latest mark: none lost, none moved backwards");
    assert_eq!(marks, made, "every mark counted exactly once");
    assert_eq!((rejected, pending, without_row, failures), (0, 0, 0, 0));
    assert!(ids_flushed >= latest.len() as i64 && rows_updated <= ids_flushed);
}

#[test]
fn a_chunk_slower_than_statement_timeout_is_cancelled_and_retried_later() {
    // No lock timeout: a chunk blocked on a lock ends only by wsusage.statement_timeout.
    let cluster = Cluster::start(&[("wsusage.statement_timeout", "'1s'"), ("wsusage.lock_timeout", "0")]);
    let (mut client, ids) = cluster.with_workspaces(3);
    let mut dba = cluster.connect();
    dba.batch_execute("BEGIN; LOCK TABLE workspaces IN ACCESS EXCLUSIVE MODE").unwrap();

    // The chunk waits on the lock for as long as the transaction lasts: longer than any timeout.
    client.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    let (code, message, _, _) = flush_error(&mut client);
    assert_eq!(code, "57014");
    assert!(message.contains("statement timeout"), "{message}");
    let worker = cluster.wait_for_worker(&mut client, None);

    dba.batch_execute("COMMIT").unwrap();
    // Retried on the next request. (The timeout still applies: on a machine busy enough to make
    // three rows' UPDATE outlast it, a later request succeeds.)
    let mut written = None;
    wait_until("a retry to write the kept marks", || match client.query_one("SELECT wsusage_flush()", &[]) {
        Ok(row) => {
            written = Some(row.get::<_, i64>(0));
            true
        }
        Err(err) => {
            assert_eq!(sqlstate(&err), "57014", "{err}");
            false
        }
    });
    assert_eq!(written, Some(3));
    assert_eq!(cluster.worker_pid(&mut client), Some(worker), "the timeout ended the chunk, not the worker");
    nothing_lost(&mut client, "a chunk slower than wsusage.statement_timeout", 3);
}

/// The target `chunked` (the table `workspaces`), whose `after_flush` records the size of each
/// chunk it commits in the table `chunks`.
fn chunked_target(client: &mut Client) {
    client
        .batch_execute(
            "CREATE TABLE chunks (n serial, size int);
             CREATE FUNCTION count_chunk(ids uuid[], at timestamptz[]) RETURNS void LANGUAGE sql AS
               $$ INSERT INTO chunks (size) VALUES (cardinality(ids)) $$;
             INSERT INTO wsusage_target (name, relation, id_column, timestamp_column, after_flush)
               VALUES ('chunked', 'workspaces', 'id', 'last_used_at', 'count_chunk(uuid[], timestamptz[])');",
        )
        .unwrap();
}

/// The keys of `chunked` still pending, sorted.
fn pending_chunked(client: &mut Client) -> Vec<Uuid> {
    client
        .query("SELECT key::uuid FROM wsusage_pending() WHERE target = 'chunked' ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// The sizes of the chunks that reached `after_flush`, one call per committed chunk.
fn chunk_sizes(client: &mut Client) -> Vec<i32> {
    client.query("SELECT size FROM chunks ORDER BY n", &[]).unwrap().iter().map(|row| row.get(0)).collect()
}

#[test]
fn keys_are_written_in_chunks_of_batch_size_and_a_chunk_that_times_out_alone_stays_pending() {
    let cluster = Cluster::start(&[
        ("wsusage.batch_size", "10"),
        ("wsusage.statement_timeout", "'1s'"),
        ("wsusage.lock_timeout", "0"),
    ]);
    let (mut client, ids) = cluster.with_workspaces(35);
    // after_flush counts each committed chunk's keys; a trigger takes 4 s for one row only.
    chunked_target(&mut client);
    client
        .batch_execute(
            "CREATE TABLE slow_ids (id uuid);
             CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN IF NEW.id IN (SELECT id FROM slow_ids) THEN PERFORM pg_sleep(4); END IF; RETURN NEW; END $$;
             CREATE TRIGGER slow_row BEFORE UPDATE ON workspaces FOR EACH ROW EXECUTE FUNCTION slow_row();",
        )
        .unwrap();
    client.execute("SELECT wsusage_mark_many('chunked', $1)", &[&ids]).unwrap();
    assert_eq!(flush(&mut client), 35);
    assert_eq!(chunk_sizes(&mut client), [10, 10, 10, 5], "35 keys in chunks of wsusage.batch_size");

    // One chunk of four times out (57014): it alone stays pending, the three others commit.
    let mut sorted_ids = ids[..].to_vec();
    sorted_ids.sort();
    let slow = sorted_ids[15];
    client.execute("INSERT INTO slow_ids VALUES ($1)", &[&slow]).unwrap();
    client.batch_execute("TRUNCATE chunks; UPDATE workspaces SET last_used_at = NULL").unwrap();
    client.execute("SELECT wsusage_mark_many('chunked', $1)", &[&ids]).unwrap();
    let (code, message, _, _) = flush_error(&mut client);
    assert_eq!(code, "57014", "{message}");
    assert_eq!(chunk_sizes(&mut client), [10, 10, 5], "the chunks before and after the slow one committed");
    assert_eq!(count_used(&mut client), 25);
    assert_eq!(
        pending_chunked(&mut client),
        sorted_ids[10..20],
        "the slow row's chunk, and nothing else, stays pending"
    );

    client.batch_execute("TRUNCATE slow_ids").unwrap();
    assert_eq!(flush(&mut client), 10);
    assert_eq!(count_used(&mut client), 35);
}

#[test]
fn a_row_its_check_constraint_refuses_is_held_back_and_every_other_is_written() {
    let cluster = Cluster::start(&[("wsusage.batch_size", "100")]);
    let (mut client, ids) = cluster.with_workspaces(50);
    // The realistic bad row: a constraint of the application's (class 23) that one row breaks.
    client
        .batch_execute(
            "ALTER TABLE workspaces ADD COLUMN archived boolean NOT NULL DEFAULT false;
             ALTER TABLE workspaces ADD CONSTRAINT archived_not_used
               CHECK (NOT archived OR last_used_at IS NULL);",
        )
        .unwrap();
    client.execute("UPDATE workspaces SET archived = true WHERE id = $1", &[&ids[7]]).unwrap();
    client.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    let written = client.query_one("SELECT wsusage_flush()", &[]).unwrap().get::<_, i64>(0);
    assert_eq!(written, 49, "every id but the refused one");
    assert_eq!(count_used(&mut client), 49);
    let held: Vec<(Uuid, String)> = client
        .query("SELECT workspace_id, error FROM wsusage_pending() WHERE error IS NOT NULL", &[])
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].0, ids[7]);
    assert!(held[0].1.contains("archived_not_used"), "{}", held[0].1);
    assert!(cluster.log().contains("wsusage holds back id"), "{}", cluster.log());
}

/// A held-back key is retried by the worker's rounds ever more slowly — one flush interval after
/// its first failure, then 2, 4 … up to 64 — and at once by every `wsusage_flush()`, whose
/// caller (an operator who fixed the row) wants it tried now: each such try that fails again
/// doubles the wait, as `wsusage_pending()` shows.
#[test]
fn a_held_back_key_waits_twice_as_long_after_each_failure_up_to_64_intervals() {
    let cluster = Cluster::start(&[("wsusage.flush_interval", "'1h'")]);
    let (mut client, ids) = cluster.with_workspaces(2);
    client
        .batch_execute(
            "ALTER TABLE workspaces ADD CONSTRAINT stay_unused CHECK (name <> 'poison' OR last_used_at IS NULL)",
        )
        .unwrap();
    client.execute("UPDATE workspaces SET name = 'poison' WHERE id = $1", &[&ids[0]]).unwrap();
    client.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    let mut waits = Vec::new();
    for _ in 0..8 {
        let before = now_us();
        // The poison row alone fails: 23514 reaches the caller as a warning, the other row is written.
        client.query_one("SELECT wsusage_flush()", &[]).unwrap();
        let retry_at: DateTime<Utc> = client
            .query_one("SELECT retry_at FROM wsusage_pending() WHERE workspace_id = $1", &[&ids[0]])
            .unwrap()
            .get(0);
        let hours = (retry_at - before).num_seconds() as f64 / 3600.0;
        waits.push(hours.round() as i64);
    }
    assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 64], "flush intervals until the next try");
    assert_eq!(used_ids(&mut client), [ids[1]], "every other row written at the first flush");

    // The row fixed, the next wsusage_flush() writes it at once, whatever its wait.
    client.execute("UPDATE workspaces SET name = 'fixed' WHERE id = $1", &[&ids[0]]).unwrap();
    assert_eq!(flush(&mut client), 1);
    assert_eq!(used_ids(&mut client), sorted(&ids));
}

/// The pool of held-back ids is the cluster's, `HELD_MAX` (256) places, filled at most 8 a round
/// (past that, failing rows are the table's trouble, not a few rows'). A poison row past the
/// pool is isolated again at every round instead, with a WARNING that says so; nothing is written
/// wrong or lost, and every row is written once fixed.
#[test]
fn past_256_held_back_ids_a_poison_row_is_isolated_again_at_every_round_and_nothing_is_lost() {
    const HELD_MAX: i64 = 256;
    const POISON: usize = 264;
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(POISON + 1);
    let (poison, good) = ids.split_at(POISON);
    client
        .batch_execute(
            "ALTER TABLE workspaces ADD COLUMN archived boolean NOT NULL DEFAULT false;
             ALTER TABLE workspaces ADD CONSTRAINT archived_not_used CHECK (NOT archived OR last_used_at IS NULL);",
        )
        .unwrap();
    client.execute("UPDATE workspaces SET archived = true WHERE id = ANY($1)", &[&poison]).unwrap();
    client.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    // Rounds every 20 ms: 8 more held back a round while earlier ones wait out their back-off.
    client.batch_execute("ALTER SYSTEM SET wsusage.flush_interval = '20ms'").unwrap();
    client.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_until("the pool of held-back ids to fill", || stat(&mut client, "held_back") == HELD_MAX);
    // One of the ids past the pool isolated, and reported, in two rounds at least.
    wait_until("a poison row past the pool to be isolated again", || {
        past_the_pool_reports(&cluster.log(), HELD_MAX).values().any(|&reports| reports >= 2)
    });
    client.batch_execute("ALTER SYSTEM RESET wsusage.flush_interval").unwrap();
    client.batch_execute("SELECT pg_reload_conf()").unwrap();

    assert_eq!(used_ids(&mut client), sorted(good), "the good row written, no poison row");
    assert_eq!(stat(&mut client, "pending"), POISON as i64, "every poison row still pending");
    let held: i64 = client
        .query_one("SELECT count(*) FROM wsusage_pending() WHERE error LIKE '%archived_not_used%'", &[])
        .unwrap()
        .get(0);
    assert_eq!(held, HELD_MAX, "wsusage_pending() shows the error of each held-back id");

    // Fixed: the operator's wsusage_flush() tries every one at once.
    client.execute("UPDATE workspaces SET archived = false WHERE id = ANY($1)", &[&poison]).unwrap();
    client.query_one("SELECT wsusage_flush()", &[]).unwrap();
    assert_eq!((stat(&mut client, "held_back"), stat(&mut client, "pending")), (0, 0));
    nothing_lost(&mut client, "poison rows past the pool of held-back ids", ids.len());
}

/// How many times the log reports each id (by its WARNING's text) as isolated but not held back,
/// the pool of `held_max` being full (its DETAIL).
fn past_the_pool_reports(log: &str, held_max: i64) -> HashMap<String, usize> {
    let detail =
        format!("DETAIL:  wsusage holds back at most {held_max} ids, so this one is isolated again at every flush");
    let mut reports = HashMap::new();
    let lines: Vec<&str> = log.lines().collect();
    for pair in lines.windows(2) {
        if let (Some((_, warning)), true) =
            (pair[0].split_once("WARNING:  wsusage holds back id "), pair[1].contains(&detail))
        {
            let id = warning.split_whitespace().next().unwrap_or_default().to_owned();
            *reports.entry(id).or_insert(0) += 1;
        }
    }
    reports
}

/// `wsusage_flush()`, from a connection of its own, failing: `meanwhile` runs once the flush's
/// chunk has waited for a lock on `relation` past its first attempt (which gives a lock up after
/// 10 ms; the second waits up to `wsusage.lock_timeout`). Returns the flush's SQLSTATE and message.
fn flush_failing_while_a_chunk_waits_for(
    cluster: &Cluster,
    client: &mut Client,
    relation: &str,
    meanwhile: impl FnOnce(),
) -> (String, String) {
    thread::scope(|scope| {
        let flushing = scope.spawn(|| flush_error(&mut cluster.connect()));
        wait_until(&format!("the flush's chunk to wait for {relation} in its second attempt"), || {
            client
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE relation = $1::text::regclass AND NOT granted
                        AND waitstart < now() - interval '500 ms'",
                    &[&relation],
                )
                .unwrap()
                .get::<_, i64>(0)
                == 1
        });
        meanwhile();
        let (code, message, _, _) = flushing.join().unwrap();
        (code, message)
    })
}

/// Of the 35 keys of `chunked` in chunks of 10, the second chunk's failed: the others committed,
/// it alone is pending, and the next flush writes it.
fn only_the_second_chunk_was_left_pending(client: &mut Client, sorted_ids: &[Uuid]) {
    assert_eq!(chunk_sizes(client), [10, 10, 5], "the chunks before and after it committed");
    assert_eq!(count_used(client), 25);
    assert_eq!(pending_chunked(client), sorted_ids[10..20], "its chunk, and nothing else, stays pending");
    assert_eq!(flush(client), 10);
    assert_eq!(count_used(client), 35);
}

/// A deadlock (40P01) is a chunk's own trouble, as a timeout is. Made for real: for one row, a
/// trigger of the application's locks a table that an application transaction holds, and that
/// transaction then asks for a lock on `workspaces`, which the flush's chunk holds. The chunk is
/// the waiter that finds the cycle (the application's transaction would look after an hour).
#[test]
fn a_chunk_caught_in_a_deadlock_alone_stays_pending_and_the_next_flush_writes_it() {
    let cluster = Cluster::start(&[("wsusage.batch_size", "10"), ("wsusage.lock_timeout", "'1min'")]);
    let (mut client, ids) = cluster.with_workspaces(35);
    let mut sorted_ids = ids.clone();
    sorted_ids.sort();
    chunked_target(&mut client);
    client
        .batch_execute(&format!(
            "CREATE TABLE ledger (n int);
             CREATE FUNCTION lock_ledger() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN IF NEW.id = '{}' THEN LOCK TABLE ledger IN ACCESS EXCLUSIVE MODE; END IF; RETURN NEW; END $$;
             CREATE TRIGGER lock_ledger BEFORE UPDATE ON workspaces FOR EACH ROW EXECUTE FUNCTION lock_ledger();",
            sorted_ids[15]
        ))
        .unwrap();
    let mut application = cluster.connect();
    application
        .batch_execute("SET deadlock_timeout = '1h'; BEGIN; LOCK TABLE ledger IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    client.execute("SELECT wsusage_mark_many('chunked', $1)", &[&ids]).unwrap();

    let (code, message) = flush_failing_while_a_chunk_waits_for(&cluster, &mut client, "ledger", || {
        // The cycle: granted once the chunk, finding it, has failed and let its locks go.
        application.batch_execute("LOCK TABLE workspaces IN SHARE MODE").unwrap();
        application.batch_execute("COMMIT").unwrap();
    });
    assert_eq!(code, "40P01", "{message}");
    assert!(message.contains("deadlock detected"), "{message}");
    only_the_second_chunk_was_left_pending(&mut client, &sorted_ids);
}

/// A serialization failure (40001) too, where the DBA has made every transaction SERIALIZABLE.
/// For one row, the chunk reads a table an application transaction has written (not yet seeing
/// it), while that transaction has read the row the chunk writes; the chunk then waits (for a
/// table a third session holds) while the application's transaction commits first: the chunk
/// is the one that cannot commit.
#[test]
fn a_chunk_that_cannot_serialize_alone_stays_pending_and_the_next_flush_writes_it() {
    let cluster = Cluster::start(&[
        ("wsusage.batch_size", "10"),
        ("wsusage.lock_timeout", "'1min'"),
        ("default_transaction_isolation", "'serializable'"),
    ]);
    let (mut client, ids) = cluster.with_workspaces(35);
    let mut sorted_ids = ids.clone();
    sorted_ids.sort();
    let row = sorted_ids[15];
    chunked_target(&mut client);
    client
        .batch_execute(&format!(
            "CREATE TABLE ledger (n int);
             CREATE TABLE gate (n int);
             CREATE FUNCTION read_ledger() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                 IF NEW.id = '{row}' THEN
                   PERFORM count(*) FROM ledger;
                   LOCK TABLE gate IN ACCESS EXCLUSIVE MODE;
                 END IF;
                 RETURN NEW;
               END $$;
             CREATE TRIGGER read_ledger BEFORE UPDATE ON workspaces FOR EACH ROW EXECUTE FUNCTION read_ledger();"
        ))
        .unwrap();
    let mut gate = cluster.connect();
    gate.batch_execute("BEGIN; LOCK TABLE gate IN ACCESS EXCLUSIVE MODE").unwrap();
    let mut application = cluster.connect();
    application
        .batch_execute(&format!(
            // By its index: a scan of the whole table would read every row any chunk writes.
            "SET enable_seqscan = off; BEGIN;
             SELECT last_used_at FROM workspaces WHERE id = '{row}'; INSERT INTO ledger VALUES (1);"
        ))
        .unwrap();
    client.execute("SELECT wsusage_mark_many('chunked', $1)", &[&ids]).unwrap();

    let (code, message) = flush_failing_while_a_chunk_waits_for(&cluster, &mut client, "gate", || {
        application.batch_execute("COMMIT").expect("the application's transaction commits first");
        gate.batch_execute("COMMIT").unwrap();
    });
    assert_eq!(code, "40001", "{message}");
    only_the_second_chunk_was_left_pending(&mut client, &sorted_ids);
}
