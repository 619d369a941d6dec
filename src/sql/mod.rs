//! What SQL sees: the [`functions`] applications call (marks, whose target a backend
//! [`resolve`]s at its first mark for the [`access`] it needs, and `wsusage_flush()`), the
//! [`fresh_reads`] of a key's pending mark, the [`monitoring`] functions and views a DBA reads,
//! and the [`rows`] they return. Their errors, by audience, each a [`report`]:
//! wsusage not available here ([`availability`]), a mark refused ([`mark_errors`]), a
//! `wsusage_flush()` that could not wait for its flush ([`flush_errors`]).

mod access;
mod availability;
mod flush_errors;
pub mod fresh_reads;
pub mod functions;
mod mark_errors;
pub mod monitoring;
mod report;
mod resolve;
mod rows;
