//! Concurrency: nothing lost, nothing counted twice, and the latest mark always wins.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use uuid::Uuid;
use wsusage_tests::*;

const MARKERS: usize = 8;

/// Raised when the test is done marking, to end its flusher thread: by [`MarkingDone::raise`],
/// or when dropped, so that a test that fails midway ends the flusher too instead of leaving it
/// flushing against the cluster it keeps alive.
struct MarkingDone(Arc<AtomicBool>);

impl MarkingDone {
    fn new() -> MarkingDone {
        MarkingDone(Arc::new(AtomicBool::new(false)))
    }

    fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }

    /// Raise it now (dropping it does).
    fn raise(self) {}
}

impl Drop for MarkingDone {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Run `flush` until `done` is raised; panics if that takes longer than [`PATIENCE`].
fn flush_until(done: &AtomicBool, mut flush: impl FnMut()) {
    let deadline = Instant::now() + PATIENCE;
    while !done.load(Ordering::Acquire) {
        assert!(Instant::now() < deadline, "marking did not end within {PATIENCE:?}");
        flush();
    }
}

#[test]
fn ids_marked_once_by_many_clients_while_flushes_run_are_each_flushed_exactly_once() {
    const N: usize = 2000;
    let cluster = Arc::new(Cluster::start(&[]));
    let (mut client, ids) = cluster.with_workspaces(N);

    let marking_done = MarkingDone::new();
    let flushes_done = Arc::new(AtomicU32::new(0));
    let start = Gate::new(MARKERS + 1);
    let flusher = {
        let (cluster, done, flushes, start) =
            (cluster.clone(), marking_done.flag(), flushes_done.clone(), start.party());
        thread::spawn(move || {
            let mut client = cluster.connect();
            start.wait();
            let mut sum = 0i64;
            flush_until(&done, || {
                sum += flush(&mut client);
                flushes.fetch_add(1, Ordering::AcqRel);
            });
            sum
        })
    };
    let markers: Vec<_> = ids
        .chunks(N / MARKERS)
        .map(|share| {
            let (cluster, share, flushes, start) =
                (cluster.clone(), share.to_vec(), flushes_done.clone(), start.party());
            thread::spawn(move || {
                let mut client = cluster.connect();
                let mark = client.prepare("SELECT wsusage_mark($1)").unwrap();
                start.wait();
                let (first, second) = share.split_at(share.len() / 2);
                for id in first {
                    client.execute(&mark, &[id]).unwrap();
                }
                // On a fast machine every mark could land before the flusher's first call; waiting
                // for a flush that began after this half makes the overlap certain, not likely.
                let seen = flushes.load(Ordering::Acquire);
                wait_until("a flush that began after the first half", || flushes.load(Ordering::Acquire) >= seen + 2);
                for id in second {
                    client.execute(&mark, &[id]).unwrap();
                }
            })
        })
        .collect();
    for marker in markers {
        marker.join().unwrap();
    }
    marking_done.raise();
    let sum = flusher.join().unwrap();
    let last = flush(&mut client);

    assert!(sum > 0, "flushes applied marks while marking went on");
    assert_eq!(sum + last, N as i64, "every id flushed exactly once");
    assert_eq!(count_used(&mut client), N as i64, "every row updated");
    assert_eq!(flush(&mut client), 0, "nothing left pending");
}

#[test]
fn with_overlapping_marks_and_concurrent_flushes_every_id_ends_at_its_latest_mark() {
    const IDS: usize = 200;
    const CALLS_PER_MARKER: usize = 400;
    let cluster = Arc::new(Cluster::start(&[("wsusage.flush_interval", "'50ms'")]));
    let (mut client, ids) = cluster.with_workspaces(IDS);
    let ids = Arc::new(ids);

    let marking_done = MarkingDone::new();
    let flusher = {
        let (cluster, done) = (cluster.clone(), marking_done.flag());
        thread::spawn(move || {
            let mut client = cluster.connect();
            flush_until(&done, || {
                flush(&mut client);
            });
        })
    };
    let markers: Vec<_> = (0..MARKERS)
        .map(|m| {
            let (cluster, ids) = (cluster.clone(), ids.clone());
            thread::spawn(move || {
                let mut client = cluster.connect();
                let mut calls: Vec<(Vec<Uuid>, Window)> = Vec::new();
                for call in 0..CALLS_PER_MARKER {
                    // A cheap deterministic spread over the ids, different per thread.
                    let pick = |k: usize| ids[(m * 7919 + call * 104_729 + k * 31) % IDS];
                    let batch: Vec<Uuid> = if m % 2 == 0 { vec![pick(0)] } else { (0..5).map(pick).collect() };
                    let before = now_us();
                    if batch.len() == 1 {
                        client.execute("SELECT wsusage_mark($1)", &[&batch[0]]).unwrap();
                    } else {
                        client.execute("SELECT wsusage_mark_many($1)", &[&batch]).unwrap();
                    }
                    calls.push((batch, (before, now_us())));
                }
                calls
            })
        })
        .collect();

    // For each id, the window of its latest mark: no earlier than the latest call's start,
    // no later than the latest call's end.
    let mut latest: HashMap<Uuid, Window> = HashMap::new();
    for marker in markers {
        for (batch, (before, after)) in marker.join().unwrap() {
            for id in batch {
                record_latest(&mut latest, id, (before, after));
            }
        }
    }
    marking_done.raise();
    flusher.join().unwrap();
    flush(&mut client);

    assert!(!latest.is_empty());
    for (id, (from, to)) in &latest {
        let written = last_used(&mut client, id).unwrap_or_else(|| panic!("{id} was never written"));
        assert!(*from <= written && written <= *to, "{id}: {from} <= {written} <= {to}");
    }
}

#[test]
fn the_same_new_ids_marked_by_many_clients_at_once_are_held_once_each() {
    const N: usize = 3000;
    const ROUNDS: usize = 20;
    let cluster = Arc::new(Cluster::start(&[]));
    let (mut client, ids) = cluster.with_workspaces(N);
    let ids = Arc::new(ids);
    // In each round every client marks every id, in the same order, many to a call, so that
    // clients running side by side insert the same new id at the same moment over and over; a
    // flush between rounds makes the ids new again. Half the clients also mark each id on its
    // own in the first round.
    let round = Gate::new(MARKERS + 1);
    let markers: Vec<_> = (0..MARKERS)
        .map(|m| {
            let (cluster, ids, round) = (cluster.clone(), ids.clone(), round.party());
            thread::spawn(move || {
                let mut client = cluster.connect();
                let mark = client.prepare("SELECT wsusage_mark($1)").unwrap();
                let mark_many = client.prepare("SELECT wsusage_mark_many($1)").unwrap();
                for r in 0..ROUNDS {
                    round.wait();
                    for batch in ids.chunks(500) {
                        client.execute(&mark_many, &[&batch.to_vec()]).unwrap();
                    }
                    if r == 0 && m % 2 == 0 {
                        for id in ids.iter() {
                            client.execute(&mark, &[id]).unwrap();
                        }
                    }
                    round.wait();
                }
            })
        })
        .collect();
    let round = round.party();
    let mut marks = 0;
    for r in 0..ROUNDS {
        round.wait();
        round.wait();
        marks += MARKERS * N + if r == 0 { MARKERS / 2 * N } else { 0 };
        let row =
            client.query_one("SELECT count(*), count(DISTINCT workspace_id) FROM wsusage_pending()", &[]).unwrap();
        assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (N as i64, N as i64), "round {r}: each id held once");
        let row = client.query_one("SELECT marks, pending FROM wsusage_stats", &[]).unwrap();
        assert_eq!(row.get::<_, i64>(0), marks as i64, "round {r}: every mark counted");
        assert_eq!(row.get::<_, i64>(1), N as i64, "round {r}: the pending count agrees with the set");
        assert_eq!(flush(&mut client), N as i64, "round {r}");
    }
    for marker in markers {
        marker.join().unwrap();
    }
    assert_eq!(count_used(&mut client), N as i64);
}

#[test]
fn a_set_filled_by_many_clients_at_once_holds_exactly_max_pending() {
    const MAX_PENDING: usize = 200;
    const PER_MARKER: usize = 50;
    let cluster = Arc::new(Cluster::start(&[("wsusage.max_pending", &MAX_PENDING.to_string())]));
    let (mut client, ids) = cluster.with_workspaces(MARKERS * PER_MARKER);
    // Parked, so that no flush (not even the early one a filling set triggers) makes room.
    client.batch_execute("ALTER TABLE workspaces RENAME TO parked").unwrap();
    let start = Gate::new(MARKERS);
    let markers: Vec<_> = ids
        .chunks(PER_MARKER)
        .map(|share| {
            let (cluster, share, start) = (cluster.clone(), share.to_vec(), start.party());
            thread::spawn(move || {
                let mut client = cluster.connect();
                let mark = client.prepare("SELECT wsusage_mark($1)").unwrap();
                start.wait();
                let mut accepted = 0;
                for id in &share {
                    match client.execute(&mark, &[id]) {
                        Ok(_) => accepted += 1,
                        Err(err) => assert_eq!(sqlstate(&err), "53400", "{err}"),
                    }
                }
                accepted
            })
        })
        .collect();
    let accepted: usize = markers.into_iter().map(|marker| marker.join().unwrap()).sum();

    assert_eq!(accepted, MAX_PENDING, "exactly max_pending new ids accepted");
    let held: i64 = client.query_one("SELECT count(*) FROM wsusage_pending()", &[]).unwrap().get(0);
    assert_eq!(held, MAX_PENDING as i64);
    let row = client.query_one("SELECT marks, rejected, pending FROM wsusage_stats", &[]).unwrap();
    assert_eq!(row.get::<_, i64>(0), MAX_PENDING as i64);
    assert_eq!(row.get::<_, i64>(1), (MARKERS * PER_MARKER - MAX_PENDING) as i64);
    assert_eq!(row.get::<_, i64>(2), MAX_PENDING as i64);
}
