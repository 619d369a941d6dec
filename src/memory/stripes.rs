//! Striping: what every marking backend would otherwise write at one place in shared memory is
//! split into [`STRIPES`] copies on cache lines of their own, and each backend writes the copy
//! of its stripe.
//!
//! Why: a mark of an id already pending reads the set but writes shared memory twice, the
//! wsusage lock's word (taking it in shared mode is an atomic add) and its database's `marks`
//! counter. With one of each, every marking backend writes the same two cache lines, which then
//! move from core to core at every mark: two backends marking side by side on this project's
//! 2-core test machine paid for it in every mark (see the README's benchmark section). Striped,
//! the lock is [`STRIPES`] LWLocks, a mark takes its stripe's in shared mode and counts in its
//! stripe's counter, and backends on different stripes share no line they write. What needs
//! everything (a flush's snapshot, the counters' reader) visits every stripe; those are rare.
//!
//! A backend's stripe is its pid modulo [`STRIPES`]: connections opened one after another (a
//! pool filling up) get consecutive pids and so different stripes, and two backends that share
//! a stripe only share lines, as every backend did before.

use std::sync::atomic::{AtomicU64, Ordering};

use pgrx::pg_sys;

/// Copies of the lock and of each database's mark counter. A power of two, so the modulo is a
/// mask. More would spread markers thinner, but every exclusive holder takes them all (16
/// uncontended LWLocks: about half a microsecond, at the 33 ns an acquire and release measured)
/// and every database slot holds a counter line per stripe (2 KiB at 16).
pub const STRIPES: usize = 16;

/// PostgreSQL's `PG_CACHE_LINE_SIZE`: two stripes are at least this far apart, so they share no
/// line, nor a pair of lines the processor fetches together.
const LINE: usize = 128;

/// This backend's stripe.
pub fn mine() -> usize {
    // SAFETY: a plain read of a global set when the process starts and never changed after.
    let pid = unsafe { pg_sys::MyProcPid };
    pid.unsigned_abs() as usize % STRIPES
}

/// A counter that every backend adds to at once: each adds to its own stripe, the value is the
/// sum. Lives in shared memory; all-zero memory is a counter at zero.
#[repr(C)]
pub struct StripedCounter([Stripe; STRIPES]);

#[repr(C)]
struct Stripe {
    value: AtomicU64,
    _rest_of_line: [u8; LINE - size_of::<AtomicU64>()],
}

impl StripedCounter {
    /// Add `n` to this backend's stripe. Atomic: concurrent adders of the same stripe are exact.
    pub fn add(&self, n: u64) {
        self.0[mine()].value.fetch_add(n, Ordering::Relaxed);
    }

    /// The counter's value: exact when nobody adds meanwhile (the caller holds the lock
    /// exclusively), otherwise a value it had at some point during the read, give or take the
    /// adds that raced with it.
    pub fn sum(&self) -> u64 {
        self.0.iter().map(|stripe| stripe.value.load(Ordering::Relaxed)).fold(0, u64::wrapping_add)
    }

    /// The value, leaving the counter at zero. Needs `&mut`: nobody may add meanwhile.
    pub fn take(&mut self) -> u64 {
        self.0.iter_mut().map(|stripe| std::mem::take(stripe.value.get_mut())).fold(0, u64::wrapping_add)
    }

    /// Zero the counter. Needs `&mut`: nobody may add meanwhile.
    pub fn clear(&mut self) {
        self.take();
    }
}
