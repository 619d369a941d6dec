//! Which databases get a flush worker in a round of the launcher, and which workers are asked to
//! give their places up: a pure function of the slots and of what the launcher knows, so that
//! the rules are tested without PostgreSQL (the launcher carries the plan out).

use pgrx::pg_sys;

use crate::state::databases;
use crate::state::pending;

/// What a round of the launcher knows besides the slots.
pub struct Round {
    /// Now, as a `TimestampTz`.
    pub now: i64,
    /// `wsusage.flush_interval`, in microseconds.
    pub interval_us: i64,
    /// Pending ids past which the set is flushed early (see `pending::high_water_mark`).
    pub high_water: usize,
    /// `wsusage.max_workers`.
    pub max_workers: usize,
}

/// What a round decides.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Databases to start a worker for, in this order.
    pub start: Vec<pg_sys::Oid>,
    /// Databases whose worker is asked to give its place up to a due database.
    pub ask_to_yield: Vec<pg_sys::Oid>,
    /// Whether running workers are woken to flush early (the set is past its high-water mark).
    pub wake_running: bool,
}

/// Decide which databases get a worker this round. A database wants one when something of it
/// is pending or a `wsusage_flush()` caller waits, it has none (attached, or `started` by this
/// launcher), and `may_start` (its retry delay is over, its extension is looked for, it is not
/// being dropped). Under `wsusage.max_workers` each gets one. At the cap, a *due* database — a
/// caller waits, its interval has passed, or the set is past its high-water mark and it holds
/// an even share of it — takes the place of a worker whose database is not due (the most
/// recently flushed first), unless a place is already being given up; due databases go first,
/// the longest waiting first.
pub fn plan(
    views: &[databases::SlotView],
    round: &Round,
    started: impl Fn(pg_sys::Oid) -> bool,
    may_start: impl Fn(&databases::SlotView) -> bool,
) -> Plan {
    // Past the high-water mark, the databases holding an even share of the set or more are due
    // at once (see pending::past_high_water_for).
    let total: u64 = views.iter().map(|view| view.pending).sum();
    let busy = views.iter().filter(|view| view.pending > 0).count() as u64;
    let past_high_water = total as usize >= round.high_water;
    let is_due = |view: &databases::SlotView| {
        view.waiting
            || (past_high_water && pending::holds_even_share(view.pending, busy, total))
            || view.interval_start.saturating_add(round.interval_us) <= round.now
    };
    let has_place = |view: &&databases::SlotView| view.worker_pid != 0 || started(view.database);
    let mut running = views.iter().filter(has_place).count();
    let mut wanting: Vec<&databases::SlotView> = views
        .iter()
        .filter(|view| !has_place(view) && (view.waiting || view.pending > 0))
        .filter(|view| may_start(view))
        .collect();
    // Due databases first, the longest waiting first among them.
    wanting.sort_by_key(|view| (!is_due(view), view.interval_start));
    // Places already being given up, and the workers that could give theirs: attached, not due,
    // the most recently flushed last (popped first).
    let mut being_freed = views.iter().filter(|view| view.worker_pid != 0 && view.yield_requested).count();
    let mut could_yield: Vec<&databases::SlotView> =
        views.iter().filter(|view| view.worker_pid != 0 && !view.yield_requested && !is_due(view)).collect();
    could_yield.sort_by_key(|view| view.interval_start);

    let mut plan = Plan { wake_running: past_high_water, ..Plan::default() };
    for view in wanting {
        if running < round.max_workers {
            plan.start.push(view.database);
            running += 1;
        } else if is_due(view) {
            if being_freed > 0 {
                being_freed -= 1;
            } else if let Some(yielding) = could_yield.pop() {
                plan.ask_to_yield.push(yielding.database);
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: i64 = 60_000_000;

    /// A slot of database `oid`, its interval started `ago` before the round's now.
    fn slot(oid: u32, pending: u64, ago: i64) -> databases::SlotView {
        databases::SlotView {
            database: pg_sys::Oid::from(oid),
            pending,
            waiting: false,
            worker_pid: 0,
            worker_latch: std::ptr::null_mut(),
            worker_starts: 0,
            yield_requested: false,
            interval_start: ROUND.now - ago,
            extension_missing: false,
        }
    }

    fn attached(mut view: databases::SlotView) -> databases::SlotView {
        view.worker_pid = 1000 + view.database.to_u32() as i32;
        view
    }

    const ROUND: Round = Round { now: 100 * MINUTE, interval_us: MINUTE, high_water: 1_000, max_workers: 2 };

    fn oids(list: &[u32]) -> Vec<pg_sys::Oid> {
        list.iter().map(|&oid| pg_sys::Oid::from(oid)).collect()
    }

    fn plan_of(views: &[databases::SlotView]) -> Plan {
        plan(views, &ROUND, |_| false, |_| true)
    }

    #[test]
    fn under_the_cap_every_database_with_marks_or_a_waiting_caller_gets_a_worker() {
        let mut waiting = slot(3, 0, 0);
        waiting.waiting = true;
        let views = [slot(1, 10, 0), slot(2, 0, 0), waiting];
        assert_eq!(plan_of(&views), Plan { start: oids(&[3, 1]), ..Plan::default() });
    }

    #[test]
    fn a_database_with_a_worker_attached_or_started_gets_no_other() {
        let views = [attached(slot(1, 10, 0)), slot(2, 10, 0), slot(3, 10, 0)];
        let started = |oid: pg_sys::Oid| oid == pg_sys::Oid::from(2);
        let decided = plan(&views, &Round { max_workers: 4, ..ROUND }, started, |_| true);
        assert_eq!(decided.start, oids(&[3]));
    }

    #[test]
    fn a_database_that_may_not_start_yet_is_passed_over() {
        let views = [slot(1, 10, 2 * MINUTE), slot(2, 10, 0)];
        let decided = plan(&views, &ROUND, |_| false, |view| view.database != pg_sys::Oid::from(1));
        assert_eq!(decided.start, oids(&[2]));
    }

    #[test]
    fn at_the_cap_a_due_database_takes_the_place_of_the_most_recently_flushed_worker_not_due() {
        // 1 and 2 hold both places; 1 flushed 10 s ago, 2 flushed 20 s ago; 3 is due, 4 is not.
        let views =
            [attached(slot(1, 5, MINUTE / 6)), attached(slot(2, 5, MINUTE / 3)), slot(3, 5, 2 * MINUTE), slot(4, 5, 0)];
        assert_eq!(plan_of(&views), Plan { ask_to_yield: oids(&[1]), ..Plan::default() });
    }

    #[test]
    fn a_place_already_being_given_up_serves_a_due_database_without_asking_another() {
        let mut yielding = attached(slot(1, 5, MINUTE / 6));
        yielding.yield_requested = true;
        let views = [yielding, attached(slot(2, 5, MINUTE / 3)), slot(3, 5, 2 * MINUTE), slot(4, 5, 3 * MINUTE)];
        // 4 waited longest: it takes the place being freed; 3 asks 2 to give its place up.
        assert_eq!(plan_of(&views), Plan { ask_to_yield: oids(&[2]), ..Plan::default() });
    }

    #[test]
    fn due_databases_start_first_the_longest_waiting_first() {
        let mut caller = slot(1, 0, 0);
        caller.waiting = true;
        let views = [slot(5, 5, 0), caller, slot(2, 5, 2 * MINUTE), slot(3, 5, 3 * MINUTE)];
        assert_eq!(plan_of(&views).start, oids(&[3, 2]));
        assert_eq!(plan(&views, &Round { max_workers: 9, ..ROUND }, |_| false, |_| true).start, oids(&[3, 2, 1, 5]));
    }

    #[test]
    fn past_the_high_water_mark_a_database_with_an_even_share_is_due_and_running_workers_are_woken() {
        // 900 + 200 ids pending past the high-water mark of 1,000: database 1 holds an even share
        // (900 × 2 busy ≥ 1,100), 2 does not; neither's interval has passed.
        let views = [attached(slot(3, 0, 0)), attached(slot(4, 0, 0)), slot(1, 900, 0), slot(2, 200, 0)];
        let decided = plan_of(&views);
        assert!(decided.wake_running);
        assert_eq!(decided.ask_to_yield.len(), 1, "only database 1 is due: {decided:?}");
        assert!(!plan_of(&[slot(1, 10, 0)]).wake_running);
    }
}
