//! The claim/publish protocol, model-checked with loom: each test runs its threads in every
//! interleaving loom can tell apart (up to three preemptions each), with the outcomes of the
//! atomics' orderings that loom models (all but load buffering), and checks each one. Where tests/threads.rs runs the real
//! machine's few interleavings many times, this runs each interleaving once.
//!
//!     RUSTFLAGS="--cfg loom" cargo test --release --package wsusage-pending-table --test loom
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::Arc;
use loom::thread;
use wsusage_pending_table::{create_in_model, Exclusive, Inserted, Key, Table};

fn model(test: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(test);
}

fn key(n: u8) -> Key {
    Key { database: 1, target: 0, kind: 0, id: [n; 16] }
}

/// Two keys whose probes start at the same place of `table`: their inserts race for one run.
fn colliding(table: &Table<'_>) -> (Key, Key) {
    let keys: Vec<Key> = (1..=255).map(key).collect();
    for (i, a) in keys.iter().enumerate() {
        if let Some(b) = keys[i + 1..].iter().find(|b| table.home(b) == table.home(a)) {
            return (*a, *b);
        }
    }
    panic!("no two keys share a home");
}

/// Once every other thread is joined, the test's thread is the table's only user.
fn verify(table: &Table<'_>) -> usize {
    // SAFETY: called after every other thread of the model was joined.
    let exclusive = unsafe { Exclusive::new() };
    table.verify(&exclusive).expect("the table is whole")
}

#[test]
fn two_inserters_of_one_new_key_hold_it_once_at_the_later_time() {
    model(|| {
        let table = create_in_model(2, [1, 2]);
        let k = key(1);
        let other = thread::spawn(move || table.insert(&k, 10).unwrap());
        let here = table.insert(&k, 20).unwrap();
        let there = other.join().unwrap();
        assert!(
            matches!((here, there), (Inserted::New, Inserted::Existing) | (Inserted::Existing, Inserted::New)),
            "one new, one existing: {here:?} {there:?}"
        );
        assert_eq!(table.marked_at(&k), Ok(Some(20)));
        assert_eq!(verify(&table), 1);
    });
}

#[test]
fn keys_racing_for_one_run_both_get_a_place_and_a_reader_sees_each_whole_or_not_at_all() {
    model(|| {
        let table = create_in_model(2, [3, 4]);
        let (a, b) = colliding(&table);
        let first = thread::spawn(move || table.insert(&a, 1).unwrap());
        let second = thread::spawn(move || table.insert(&b, 2).unwrap());
        // A reader meanwhile, as wsusage_pending_at is: never a torn or misplaced key.
        let read_a = table.marked_at(&a).unwrap();
        let read_b = table.marked_at(&b).unwrap();
        assert!(read_a.is_none() || read_a == Some(1), "{read_a:?}");
        assert!(read_b.is_none() || read_b == Some(2), "{read_b:?}");
        assert_eq!((first.join().unwrap(), second.join().unwrap()), (Inserted::New, Inserted::New));
        assert_eq!((table.marked_at(&a), table.marked_at(&b)), (Ok(Some(1)), Ok(Some(2))));
        assert_eq!(verify(&table), 2);
    });
}

#[test]
fn a_key_whose_insert_returned_is_found_by_every_read_that_follows_it() {
    model(|| {
        let table = create_in_model(2, [5, 6]);
        let (a, b) = colliding(&table);
        let inserted = Arc::new(AtomicBool::new(false));
        let inserter = {
            let inserted = inserted.clone();
            thread::spawn(move || {
                table.insert(&a, 1).unwrap();
                inserted.store(true, Ordering::Release);
            })
        };
        // Another insert in the same run, claiming a place the reader may have to wait on.
        let other = thread::spawn(move || table.insert(&b, 2).unwrap());
        if inserted.load(Ordering::Acquire) {
            assert_eq!(table.marked_at(&a), Ok(Some(1)));
        }
        inserter.join().unwrap();
        other.join().unwrap();
        assert_eq!(verify(&table), 2);
    });
}

#[test]
fn at_its_limit_the_table_takes_exactly_one_of_two_new_keys() {
    model(|| {
        let table = create_in_model(1, [7, 8]);
        let (a, b) = colliding(&table);
        let other = thread::spawn(move || table.insert(&b, 2).unwrap());
        let here = table.insert(&a, 1).unwrap();
        let there = other.join().unwrap();
        let taken = [here, there].iter().filter(|outcome| **outcome == Inserted::New).count();
        let refused = [here, there].iter().filter(|outcome| **outcome == Inserted::Full).count();
        assert_eq!((taken, refused), (1, 1), "{here:?} {there:?}");
        assert_eq!((table.len(), verify(&table)), (1, 1));
    });
}
