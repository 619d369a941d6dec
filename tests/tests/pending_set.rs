//! The pending set: exact however its entries come and go, even when it is nearly full.

use std::collections::BTreeSet;

use uuid::Uuid;
use wsusage_tests::*;

fn pending_ids(client: &mut Client) -> BTreeSet<Uuid> {
    client.query("SELECT workspace_id FROM wsusage_pending()", &[]).unwrap().iter().map(|row| row.get(0)).collect()
}

#[test]
fn a_small_set_shared_by_two_databases_stays_exact_through_many_rounds_of_marks_and_flushes() {
    // A set of 64 ids (96 places) holding up to 28, just under the half at which it would flush
    // early on its own: the entries of both databases crowd one small table, and a flush of
    // one database removes its entries from among the other's, round after round.
    let cluster = Cluster::start(&[("wsusage.max_pending", "64")]);
    let (first, first_ids) = cluster.with_workspaces(40);
    let (second, second_ids) = cluster.with_workspaces_in("second", 40);
    let mut databases = [(first, first_ids, BTreeSet::new()), (second, second_ids, BTreeSet::new())];

    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut random = move |below: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % below as u64) as usize
    };
    for round in 0..60 {
        // Each database marks up to 7 ids a round and is flushed every other round, so at most
        // 14 of its ids are pending.
        for (client, ids, expected) in databases.iter_mut() {
            let batch: Vec<Uuid> = (0..1 + random(7)).map(|_| ids[random(ids.len())]).collect();
            client.execute("SELECT wsusage_mark_many($1)", &[&batch]).unwrap();
            expected.extend(batch);
        }
        for (client, _, expected) in databases.iter_mut() {
            assert_eq!(pending_ids(client), *expected, "round {round}: what the set holds");
        }
        let (client, _, expected) = &mut databases[round % 2];
        assert_eq!(flush(client), expected.len() as i64, "round {round}: what a flush writes");
        expected.clear();
        assert!(pending_ids(client).is_empty(), "round {round}: a flush forgets what it wrote");
    }
}
