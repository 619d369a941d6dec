//! The processes: the [`postmaster`]'s hooks (shared memory at start, the saved set at exit),
//! the [`launcher`] background worker, and the flush [`worker`] it starts per database.

pub mod launcher;
pub mod postmaster;
pub mod worker;
