//! What a mark records, and what a flush writes from it. The functions' volatility and signatures
//! are `#[pg_test]`s: src/pg_tests/signatures.rs.

use postgres::types::Type;
use uuid::Uuid;
use wsusage_tests::*;

#[test]
fn a_flush_writes_the_time_of_the_mark_not_of_the_flush() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(10);

    let before = now_us();
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    let after = now_us();
    std::thread::sleep(std::time::Duration::from_millis(200));

    assert_eq!(flush(&mut client), 1);
    let written = last_used(&mut client, &ids[0]).expect("row was updated");
    assert!(before <= written && written <= after, "{before} <= {written} <= {after}");
    assert_eq!(count_used(&mut client), 1, "only the marked row changes");
}

#[test]
fn the_mark_time_is_the_wall_clock_not_the_transaction_start() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(1);

    let mut tx = client.transaction().unwrap();
    tx.execute("SELECT pg_sleep(0.3)", &[]).unwrap();
    let before = now_us();
    tx.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    tx.commit().unwrap();

    flush(&mut client);
    let written = last_used(&mut client, &ids[0]).unwrap();
    assert!(written >= before, "mark time {written} is before the call started at {before}");
}

#[test]
fn marking_one_id_many_times_keeps_one_entry_with_the_latest_time() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(3);

    client.execute("SELECT count(wsusage_mark($1)) FROM generate_series(1, 100000)", &[&ids[0]]).unwrap();
    let before_last = now_us();
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    let after_last = now_us();

    assert_eq!(flush(&mut client), 1, "100k marks of one id are one pending id");
    assert_eq!(count_used(&mut client), 1, "exactly one row updated");
    let written = last_used(&mut client, &ids[0]).unwrap();
    assert!(before_last <= written && written <= after_last, "the latest mark wins");
}

#[test]
fn mark_many_marks_every_element_and_an_empty_array_is_a_no_op() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(50);

    client.execute("SELECT wsusage_mark_many($1)", &[&Vec::<Uuid>::new()]).unwrap();
    assert_eq!(flush(&mut client), 0);

    let mut with_duplicates = ids[..40].to_vec();
    with_duplicates.extend_from_slice(&ids[..5]);
    client.execute("SELECT wsusage_mark_many($1)", &[&with_duplicates]).unwrap();
    assert_eq!(flush(&mut client), 40);
    assert_eq!(count_used(&mut client), 40);
}

#[test]
fn a_mark_stands_when_the_callers_transaction_rolls_back() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(1);

    let mut tx = client.transaction().unwrap();
    tx.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    tx.rollback().unwrap();

    assert_eq!(flush(&mut client), 1);
    assert!(last_used(&mut client, &ids[0]).is_some());
}

#[test]
fn ids_without_a_row_are_skipped_and_create_nothing() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(2);

    let stranger = Uuid::new_v4();
    client.execute("SELECT wsusage_mark_many($1)", &[&vec![ids[0], stranger]]).unwrap();
    assert_eq!(flush(&mut client), 2, "both ids were taken from the set");
    let rows: i64 = client.query_one("SELECT count(*) FROM workspaces", &[]).unwrap().get(0);
    assert_eq!(rows, 2, "no row was created for the unknown id");
    assert_eq!(count_used(&mut client), 1);
    assert_eq!(flush(&mut client), 0, "the unknown id is not retried forever");
}

#[test]
fn a_row_is_never_moved_back_in_time() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(1);

    client.execute("UPDATE workspaces SET last_used_at = now() + interval '1 day'", &[]).unwrap();
    let future = last_used(&mut client, &ids[0]).unwrap();
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    assert_eq!(flush(&mut client), 1);
    assert_eq!(last_used(&mut client, &ids[0]).unwrap(), future);
}

#[test]
fn an_untyped_parameter_resolves_to_uuid_as_drivers_send_it() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(2);

    // Prepared with no parameter types: the server infers them, as most drivers let it.
    let mark = client.prepare("SELECT wsusage_mark($1)").unwrap();
    assert_eq!(mark.params(), &[Type::UUID]);
    client.execute(&mark, &[&ids[0]]).unwrap();

    // A parameter given as untyped text, as drivers that send every value as a string do.
    client
        .batch_execute(&format!("PREPARE mark_text AS SELECT wsusage_mark($1); EXECUTE mark_text('{}')", ids[1]))
        .unwrap();

    let mark_many = client.prepare("SELECT wsusage_mark_many($1)").unwrap();
    assert_eq!(mark_many.params(), &[Type::UUID_ARRAY]);

    assert_eq!(flush(&mut client), 2);
    assert_eq!(count_used(&mut client), 2);
}
