//! Targets: what a mark's key is the key of. A target's [`definition`] (a row of the
//! [`table`] `wsusage_target`, whose trigger checks it, or the settings' `default`) and the SQL
//! written from it; its [`lookup`] in PostgreSQL's [`catalog`]s, as the role a flush or a mark
//! acts for; and its declaration [`published`] in shared memory for the next backend, withdrawn
//! when a transaction that [`changes`] `wsusage_target` commits.

pub mod catalog;
pub mod changes;
pub mod definition;
pub mod lookup;
pub mod published;
pub mod table;
