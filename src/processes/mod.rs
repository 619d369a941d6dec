//! The processes: the [`postmaster`]'s hooks (shared memory at start, the saved set at exit),
//! the [`launcher`] background worker, the [`plan`] of its rounds, and the flush [`worker`] it starts
//! per database.

pub mod launcher;
mod plan;
pub mod postmaster;
pub mod worker;
