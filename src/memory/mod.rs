//! Shared memory: what lives there and who may touch it. [`layout`] composes the two
//! allocations (the pending set's table, from the `wsusage-pending-table` crate, and one struct
//! with a slot per database and per target) and is the only way in, under [`lock`], striped by
//! [`stripes`]. The other files are the plain records kept there: a database's slot
//! ([`database_slot`]) with its `wsusage_flush()` [`requests`] and [`stats`], a target's slot
//! ([`target_slot`]) with its [`publication`], the keys [`held_back`], a [`key`], a
//! [`message`]. Nothing here calls into PostgreSQL but to take the lock and to initialise a condition variable; what the state means is
//! `state`'s to say.

pub mod database_slot;
pub mod held_back;
pub mod key;
pub mod layout;
pub mod lock;
pub mod message;
pub mod publication;
pub mod requests;
pub mod stats;
mod stripes;
pub mod target_slot;
