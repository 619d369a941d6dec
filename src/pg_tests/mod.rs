//! The `#[pg_test]`s: what runs inside one transaction and needs no flush, tested inside the
//! server that runs it (`cargo pgrx test`, and `scripts/test` for each major). Each test runs in a
//! transaction of its own that is rolled back at its end, so the tables, targets and roles it
//! makes go with it; its marks do not (they are not transactional), so each test marks keys of
//! targets of its own and reads what is pending of those only. What crosses processes — flushes,
//! restarts, faults, clients, poolers, standbys — is tested in `tests/`.
//!
//! Each file holds a `#[pg_schema] mod tests`: pgrx calls the tests in schema `tests`.

mod support;

mod arguments;
mod fresh_reads;
mod in_query;
mod privileges;
mod signatures;
mod target_table;
