//! The pending table against a model, with threads standing in for backends: an `RwLock` plays
//! the wsusage lock (readers insert, the writer removes), a `HashMap` plays the table. Fixed seeds,
//! so a failure repeats; keys are chosen by their home place to force runs that wrap from the last
//! place to the first, through insert, `remove_at` and `retain`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::RwLock;
use std::thread;
use std::time::{Duration, Instant};

use wsusage_pending_table::{create, size, Entry, Exclusive, Inserted, Key, Table};

/// `n` rounds or operations, or a fiftieth of them under Miri, which checks every memory access
/// of every operation and runs them thousands of times slower (scripts/test runs the one-thread
/// tests under Miri; the threaded ones take minutes there, and ran clean once).
const fn scaled(n: u64) -> u64 {
    if cfg!(miri) {
        n.div_ceil(50)
    } else {
        n
    }
}

/// A table of `limit` keys in memory that lives for the rest of the test process.
fn new_table(limit: usize, seed: [u64; 2]) -> Table<'static> {
    let memory: &'static mut [u64] = Box::leak(vec![0u64; size(limit).div_ceil(8)].into_boxed_slice());
    // SAFETY: a fresh, 8-byte aligned, large enough allocation, leaked so it outlives the table.
    unsafe { create(memory.as_mut_ptr().cast(), limit, seed) }
}

/// xorshift64*: a deterministic stream for a fixed seed.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn key(n: u64) -> Key {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_le_bytes());
    Key { database: 1 + (n % 3) as u32, target: (n % 2) as u16, kind: 0, id }
}

/// `count` keys whose probe starts at one of the last `span` places: their run wraps round to
/// the first places.
fn keys_homed_at_the_end(table: &Table<'_>, count: usize, span: usize) -> Vec<Key> {
    let places = table.places();
    (0u64..).map(key).filter(|k| table.home(k) >= places - span).take(count).collect()
}

fn exclusive() -> Exclusive<'static> {
    // SAFETY: each test that calls this uses its table from this thread only, or under the write
    // side of its RwLock.
    unsafe { Exclusive::new() }
}

fn as_map(table: &Table<'_>) -> HashMap<Key, i64> {
    let entries: Vec<Entry> = table.entries().collect();
    let map: HashMap<Key, i64> = entries.iter().map(|e| (e.key, e.marked_at)).collect();
    assert_eq!(map.len(), entries.len(), "a key is held twice");
    map
}

#[test]
fn one_thread_inserting_removing_and_retaining_matches_a_map_through_runs_that_wrap() {
    let mut operations = 0u64;
    for seed in 1..=scaled(20) {
        let limit = 48;
        let table = new_table(limit, [seed, seed.rotate_left(17)]);
        let exclusive = exclusive();
        // Half the keys start their probe in the last 4 places: long runs that wrap.
        let mut pool = keys_homed_at_the_end(&table, 40, 4);
        pool.extend((1000..1040).map(key));
        let mut model: HashMap<Key, i64> = HashMap::new();
        let mut random = Random(seed * 0x9e37_79b9);
        for at in 0..scaled(3_000) as i64 {
            let k = pool[random.below(pool.len())];
            match random.below(10) {
                0..=5 => {
                    let expected = if model.contains_key(&k) {
                        Inserted::Existing
                    } else if model.len() == limit {
                        Inserted::Full
                    } else {
                        Inserted::New
                    };
                    assert_eq!(table.insert(&k, at), Ok(expected));
                    if expected != Inserted::Full {
                        let time = model.entry(k).or_insert(at);
                        *time = (*time).max(at);
                    }
                }
                6..=8 => {
                    assert_eq!(table.marked_at(&k), Ok(model.get(&k).copied()), "seed {seed}, operation {at}");
                    let found = table.find(&exclusive, &k);
                    assert_eq!(found.is_some(), model.contains_key(&k));
                    if let Some(index) = found {
                        assert_eq!(table.entry(&exclusive, index).marked_at, model[&k]);
                        table.remove_at(&exclusive, index);
                        model.remove(&k);
                    }
                }
                _ => {
                    let database = 1 + random.below(3) as u32;
                    let removed = table.retain(&exclusive, |e| e.key.database != database);
                    let before = model.len();
                    model.retain(|k, _| k.database != database);
                    assert_eq!(removed as usize, before - model.len());
                }
            }
            operations += 1;
            assert_eq!(table.verify(&exclusive), Ok(model.len()), "seed {seed}, operation {at}");
            assert_eq!(as_map(&table), model, "seed {seed}, operation {at}");
        }
    }
    eprintln!("{operations} operations, each checked against the model");
}

#[test]
fn a_table_is_full_at_exactly_its_limit_and_takes_existing_keys_when_full() {
    let table = new_table(16, [3, 4]);
    let keys = keys_homed_at_the_end(&table, 20, 2);
    for k in &keys[..16] {
        assert_eq!(table.insert(k, 1), Ok(Inserted::New));
    }
    for k in &keys[16..] {
        assert_eq!(table.insert(k, 2), Ok(Inserted::Full));
    }
    assert_eq!(table.insert(&keys[0], 5), Ok(Inserted::Existing));
    assert_eq!(table.verify(&exclusive()), Ok(16));
    assert_eq!(as_map(&table)[&keys[0]], 5);
}

/// A small table with many threads claiming the same run: a claim lost to another thread must
/// not use up the probe's bound, or a thread would see a false "full".
#[test]
fn threads_racing_for_the_places_of_one_run_never_see_a_false_full() {
    for round in 0..scaled(200) {
        let limit = 16;
        let table = new_table(limit, [round, 7]);
        // 16 distinct keys, all homed in the last 2 places, inserted by 8 threads at once: every
        // insert must succeed, since exactly `limit` distinct keys are offered.
        let keys = keys_homed_at_the_end(&table, limit, 2);
        let lock = RwLock::new(());
        thread::scope(|scope| {
            for worker in 0..8 {
                let (keys, lock) = (&keys, &lock);
                scope.spawn(move || {
                    for (n, k) in keys.iter().enumerate().filter(|(n, _)| n % 4 == worker % 4) {
                        let _shared = lock.read().unwrap();
                        assert_eq!(table.insert(k, n as i64).map(|i| i != Inserted::Full), Ok(true), "round {round}");
                    }
                });
            }
        });
        assert_eq!(table.verify(&exclusive()), Ok(limit), "round {round}");
    }
}

/// A reader (`wsusage_pending_at`) holds the lock shared, like the inserters: a key whose insert
/// returned before the read began is found, at its time, even while the run it is in is being
/// claimed by other threads; a key never inserted is not.
#[test]
fn readers_racing_inserters_find_every_key_inserted_before_the_read() {
    const KEYS: usize = 48;
    let found_while_racing = AtomicUsize::new(0);
    for round in 0..scaled(100) {
        let table = new_table(KEYS, [round, 11]);
        // Runs that wrap, claimed by several threads at once.
        let keys = keys_homed_at_the_end(&table, KEYS + 8, 4);
        let (keys, never) = keys.split_at(KEYS);
        let inserted: Vec<AtomicBool> = (0..KEYS).map(|_| AtomicBool::new(false)).collect();
        let lock = RwLock::new(());
        let (table, keys, inserted, lock) = (&table, keys, &inserted, &lock);
        thread::scope(|scope| {
            for worker in 0..4 {
                scope.spawn(move || {
                    for n in (worker..KEYS).step_by(4) {
                        let _shared = lock.read().unwrap();
                        assert_eq!(table.insert(&keys[n], n as i64), Ok(Inserted::New), "round {round}");
                        inserted[n].store(true, Ordering::Release);
                    }
                });
            }
            for reader in 0..2u64 {
                let found_while_racing = &found_while_racing;
                scope.spawn(move || {
                    let mut random = Random(round * 31 + reader + 1);
                    for _ in 0..scaled(2_000) {
                        let n = random.below(KEYS);
                        let _shared = lock.read().unwrap();
                        let before = inserted[n].load(Ordering::Acquire);
                        let racing = inserted.iter().any(|key| !key.load(Ordering::Relaxed));
                        let read = table.marked_at(&keys[n]).expect("claims are published at once");
                        if before {
                            assert_eq!(read, Some(n as i64), "round {round}: key {n} inserted before the read");
                            if racing {
                                found_while_racing.fetch_add(1, Ordering::Relaxed);
                            }
                        } else {
                            assert!(read.is_none() || read == Some(n as i64), "round {round}: key {n} read {read:?}");
                        }
                        let absent = &never[random.below(never.len())];
                        assert_eq!(table.marked_at(absent), Ok(None), "round {round}");
                    }
                });
            }
        });
        for (n, k) in keys.iter().enumerate() {
            assert_eq!(table.marked_at(k), Ok(Some(n as i64)));
        }
    }
    // Over the rounds, keys already inserted were read while others were still being inserted.
    assert!(found_while_racing.load(Ordering::Relaxed) > 0);
}

#[test]
fn threads_filling_a_table_at_once_get_exactly_limit_keys_accepted() {
    for round in 0..scaled(50) {
        let limit = 64;
        let table = new_table(limit, [round, round + 1]);
        let accepted = AtomicU64::new(0);
        let lock = RwLock::new(());
        thread::scope(|scope| {
            for worker in 0..6u64 {
                let (accepted, lock) = (&accepted, &lock);
                scope.spawn(move || {
                    for n in 0..40 {
                        let _shared = lock.read().unwrap();
                        match table.insert(&key(worker * 1000 + n), 1).unwrap() {
                            Inserted::New => drop(accepted.fetch_add(1, Ordering::Relaxed)),
                            Inserted::Existing => panic!("every key is offered once"),
                            Inserted::Full => {}
                        }
                    }
                });
            }
        });
        assert_eq!(accepted.load(Ordering::Relaxed), limit as u64, "round {round}");
        assert_eq!(table.verify(&exclusive()), Ok(limit), "round {round}");
    }
}

/// Inserters (read side) mark keys new and existing while a remover (write side) forgets some,
/// as a flush forgets what it wrote, and another sweeps a database away, as the launcher
/// discards a dropped one. Afterwards every key holds the latest time marked since it was last
/// removed, and no other key is held.
#[test]
fn inserters_and_a_remover_at_once_leave_each_key_at_its_latest_time_since_its_last_removal() {
    const INSERTERS: u64 = 4;
    const MARKS: u64 = scaled(20_000);
    /// Distinct keys the remover must have removed before the inserters stop.
    const REMOVED_KEYS: usize = scaled(100) as usize;
    let limit = 256;
    let table = new_table(limit, [0xfeed, 0xbeef]);
    // Keys crowd the last places, so runs wrap and removals shift entries across the end.
    let mut pool = keys_homed_at_the_end(&table, 60, 6);
    pool.extend((5000..5140).map(key));
    let lock = RwLock::new(());
    // The write side's sections are numbered; a read section sees one number throughout.
    let epoch = AtomicU64::new(0);
    let clock = AtomicI64::new(1);
    let done = AtomicBool::new(false);
    let removals: RwLock<HashMap<Key, u64>> = RwLock::new(HashMap::new());
    let operations = AtomicU64::new(0);
    let removed_keys = AtomicUsize::new(0);

    let inserts: Vec<Vec<(Key, i64, u64)>> = thread::scope(|scope| {
        let remover = scope.spawn(|| {
            let mut random = Random(0x5eed);
            let mut sections = 0u64;
            while !done.load(Ordering::Acquire) {
                let exclusive_lock = lock.write().unwrap();
                let now = epoch.fetch_add(1, Ordering::Relaxed) + 1;
                let exclusive = exclusive();
                let mut removed = removals.write().unwrap();
                if sections % 7 == 6 {
                    let database = 1 + random.below(3) as u32;
                    let held: Vec<Key> = table.entries().map(|e| e.key).filter(|k| k.database == database).collect();
                    table.retain(&exclusive, |e| e.key.database != database);
                    for k in held {
                        removed.insert(k, now);
                    }
                } else {
                    for _ in 0..8 {
                        let k = pool[random.below(pool.len())];
                        if let Some(index) = table.find(&exclusive, &k) {
                            table.remove_at(&exclusive, index);
                            removed.insert(k, now);
                        }
                    }
                }
                assert!(table.verify(&exclusive).is_ok(), "{:?}", table.verify(&exclusive));
                removed_keys.store(removed.len(), Ordering::Relaxed);
                drop(removed);
                drop(exclusive_lock);
                sections += 1;
                operations.fetch_add(1, Ordering::Relaxed);
                // Let the inserters in: a write lock taken again at once could starve them.
                thread::yield_now();
            }
        });
        // Should an inserter panic, the remover must still stop, or the scope waits for it forever.
        let _stop_remover = SetOnDrop(&done);
        let inserters: Vec<_> = (0..INSERTERS)
            .map(|worker| {
                let (pool, lock, epoch, clock, operations, removed_keys) =
                    (&pool, &lock, &epoch, &clock, &operations, &removed_keys);
                scope.spawn(move || {
                    let mut random = Random(worker + 11);
                    let mut accepted = Vec::new();
                    // However the threads are scheduled (a loaded machine may run the inserters
                    // to the end before the remover starts), insert until the remover has
                    // interleaved with them.
                    let deadline = Instant::now() + Duration::from_secs(if cfg!(miri) { 900 } else { 60 });
                    for n in 0.. {
                        if n >= MARKS && removed_keys.load(Ordering::Relaxed) >= REMOVED_KEYS {
                            break;
                        }
                        assert!(Instant::now() < deadline, "the remover never removed {REMOVED_KEYS} keys");
                        let k = pool[random.below(pool.len())];
                        let _shared = lock.read().unwrap();
                        let at = clock.fetch_add(1, Ordering::Relaxed);
                        match table.insert(&k, at).expect("no claim stays unpublished") {
                            Inserted::New | Inserted::Existing => accepted.push((k, at, epoch.load(Ordering::Relaxed))),
                            Inserted::Full => {}
                        }
                        operations.fetch_add(1, Ordering::Relaxed);
                    }
                    accepted
                })
            })
            .collect();
        let inserts = inserters.into_iter().map(|t| t.join().unwrap()).collect();
        done.store(true, Ordering::Release);
        remover.join().unwrap();
        inserts
    });

    let removed = removals.into_inner().unwrap();
    let mut expected: HashMap<Key, i64> = HashMap::new();
    for (k, at, seen_epoch) in inserts.into_iter().flatten() {
        // An insert made in a read section after the key's last removal survives it.
        if removed.get(&k).is_none_or(|&removal| seen_epoch >= removal) {
            let time = expected.entry(k).or_insert(at);
            *time = (*time).max(at);
        }
    }
    assert_eq!(table.verify(&exclusive()), Ok(expected.len()));
    assert_eq!(as_map(&table), expected);
    let distinct: HashSet<Key> = pool.iter().copied().collect();
    assert!(removed.len() >= REMOVED_KEYS.min(distinct.len()), "the remover interleaved with the inserters");
    eprintln!("{} operations by {INSERTERS} inserters and a remover", operations.load(Ordering::Relaxed));
}

/// Sets its flag when dropped, on every path out of the scope that holds it, a panic's included.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}
