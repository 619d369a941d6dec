//! One database's `wsusage_flush()` requests and the outcomes of its recent flushes, kept in its
//! slot: a request counter and a ring of outcomes, so that a caller that wakes late still finds
//! its own outcome, not a later flush's. The protocol around them is `state::rendezvous`'s.

use crate::memory::message::{self, Message};

/// How many flush outcomes a database slot remembers for `wsusage_flush()` callers that have
/// not yet woken up to read theirs. A caller misses its outcome only if this many flushes of its
/// database complete between the worker's broadcast and the caller being scheduled.
pub const RECENT_FLUSHES: usize = 16;

/// What one flush did, as `wsusage_flush()` callers see it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlushOutcome {
    /// The flush covers the requests numbered `(after_request, up_to_request]`.
    pub after_request: u64,
    pub up_to_request: u64,
    /// Distinct ids the flush took from the set.
    pub ids: u64,
    /// Ids it held back because their rows make it fail.
    pub held_back: u64,
    pub failed: bool,
    /// SQLSTATE of the failure, as PostgreSQL packs it (`MAKE_SQLSTATE`).
    pub sqlstate: i32,
    /// Error message of the failure.
    pub message: Message,
}

impl FlushOutcome {
    pub const NONE: FlushOutcome = FlushOutcome {
        after_request: 0,
        up_to_request: 0,
        ids: 0,
        held_back: 0,
        failed: false,
        sqlstate: 0,
        message: message::EMPTY,
    };
}

#[repr(C)]
pub struct Requests {
    /// Number of `wsusage_flush()` requests made in this database; request n is the n-th.
    pub made: u64,
    /// Every request numbered up to this was covered by a flush that has completed.
    served: u64,
    /// Number of outcomes published; `recent[completed % RECENT_FLUSHES]` is the next written.
    completed: u64,
    recent: [FlushOutcome; RECENT_FLUSHES],
}

impl Requests {
    pub const fn new() -> Self {
        Requests { made: 0, served: 0, completed: 0, recent: [FlushOutcome::NONE; RECENT_FLUSHES] }
    }

    /// A caller waits for a flush.
    pub fn waiting(&self) -> bool {
        self.made > self.served
    }

    /// Whether request `request` has been served.
    pub fn served(&self, request: u64) -> bool {
        self.served >= request
    }

    /// Keep `outcome` of a flush whose snapshot covered requests up to `outcome.up_to_request`;
    /// false when it serves nobody (a periodic tick that found nothing to do), so the ring keeps
    /// the outcomes that callers wait for.
    pub fn publish(&mut self, mut outcome: FlushOutcome) -> bool {
        if outcome.ids == 0 && outcome.held_back == 0 && !outcome.failed && outcome.up_to_request <= self.served {
            return false;
        }
        outcome.after_request = self.served;
        self.served = self.served.max(outcome.up_to_request);
        self.recent[(self.completed % RECENT_FLUSHES as u64) as usize] = outcome;
        self.completed += 1;
        true
    }

    /// The outcome covering `request`, if the ring still has it.
    pub fn outcome_of(&self, request: u64) -> Option<FlushOutcome> {
        let kept = self.completed.min(RECENT_FLUSHES as u64);
        (0..kept)
            .map(|age| self.recent[((self.completed - 1 - age) % RECENT_FLUSHES as u64) as usize])
            .find(|outcome| outcome.after_request < request && request <= outcome.up_to_request)
    }
}
