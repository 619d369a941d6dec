//! The flush: a [`round`] of one database (snapshot its pending keys, write each target, forget
//! what was written, hold back what keeps failing), the [`statements`] it runs per target, each
//! chunk in a [`transaction`] of its own, [`run_as`] the table's owner.

pub mod chunks;
pub mod failure_log;
pub mod round;
pub mod run_as;
pub mod statements;
pub mod transaction;
