//! What SQL sees: the [`functions`] applications call (marks, whose target a backend
//! [`resolve`]s at its first mark, and `wsusage_flush()`), the [`monitoring`] functions and views
//! a DBA reads, and the [`rows`] they return.

pub mod functions;
pub mod monitoring;
pub mod resolve;
pub mod rows;
