//! The flush: a [`round`] of one database (snapshot its pending keys, write each target, count,
//! log and publish the outcome), the writing of a target's [`chunks`] (split to find a failing
//! row, held back), the [`statements`] it runs per target, each chunk in a [`transaction`] of its
//! own, [`run_as`] the table's owner; its [`failure`]s and how often they are logged
//! ([`failure_log`]).

mod chunks;
mod failure;
mod failure_log;
pub mod round;
mod run_as;
mod statements;
pub mod transaction;
