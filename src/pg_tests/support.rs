//! What the `#[pg_test]`s share: running SQL in the test's transaction, catching an error with
//! its SQLSTATE without ending that transaction, and a target of the test's own.

use pgrx::prelude::*;

/// An error as the server reported it.
#[derive(Debug)]
pub struct Refusal {
    pub sqlstate: String,
    pub message: String,
    pub detail: String,
    pub hint: String,
}

/// Run `sql` (one or more statements); panics on an error.
pub fn run(sql: &str) {
    Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The first column of `sql`'s rows, as text.
pub fn column(sql: &str) -> Vec<Option<String>> {
    Spi::connect(|client| {
        let rows = client.select(sql, None, &[]).unwrap_or_else(|e| panic!("{sql}: {e}"));
        rows.map(|row| row.get::<String>(1).unwrap_or_else(|e| panic!("{sql}: {e}"))).collect()
    })
}

/// The one value `sql` returns, as text (None for NULL).
pub fn value(sql: &str) -> Option<String> {
    let values = column(sql);
    assert_eq!(values.len(), 1, "{sql}: one row");
    values.into_iter().next().flatten()
}

/// The error `statement` (one statement) raises, caught in a subtransaction (PL/pgSQL's
/// EXCEPTION block) so that the test's transaction goes on; `None` when it succeeds.
pub fn error_of(statement: &str) -> Option<Refusal> {
    run("CREATE OR REPLACE FUNCTION pg_temp.error_of_statement(
             statement text, OUT code text, OUT message_text text, OUT detail_text text, OUT hint_text text)
         LANGUAGE plpgsql AS $$
         BEGIN
             EXECUTE statement;
         EXCEPTION WHEN OTHERS THEN
             GET STACKED DIAGNOSTICS code = RETURNED_SQLSTATE, message_text = MESSAGE_TEXT,
                                     detail_text = PG_EXCEPTION_DETAIL, hint_text = PG_EXCEPTION_HINT;
         END $$");
    let row = Spi::connect(|client| {
        let mut rows = client
            .select(
                "SELECT code, message_text, detail_text, hint_text FROM pg_temp.error_of_statement($1)",
                None,
                &[statement.into()],
            )
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
        let row = rows.next().expect("one row");
        let text = |n| row.get::<String>(n).unwrap_or_else(|e| panic!("{statement}: {e}"));
        [text(1), text(2), text(3), text(4)]
    });
    let [sqlstate, message, detail, hint] = row;
    sqlstate.map(|sqlstate| Refusal {
        sqlstate,
        message: message.unwrap_or_default(),
        detail: detail.unwrap_or_default(),
        hint: hint.unwrap_or_default(),
    })
}

/// The error `statement` must raise.
pub fn refusal(statement: &str) -> Refusal {
    error_of(statement).unwrap_or_else(|| panic!("{statement}: succeeded, should have failed"))
}

/// Target `name`, over table `name.t (id KEY PRIMARY KEY, last_used_at timestamptz, note text,
/// visits integer)` in a schema of its own: a test's own, so that tests running at once never
/// wait for one another's tables or rows.
pub fn own_target(name: &str, key: &str) {
    run(&format!(
        "CREATE SCHEMA {name};
         CREATE TABLE {name}.t (id {key} PRIMARY KEY, last_used_at timestamptz, note text, visits integer);
         INSERT INTO wsusage_target (name, relation, id_column, timestamp_column)
              VALUES ('{name}', '{name}.t', 'id', 'last_used_at');"
    ));
}

/// The keys of target `name` pending in this database, in order.
pub fn pending_keys(name: &str) -> Vec<String> {
    column(&format!("SELECT key FROM wsusage_pending() WHERE target = '{name}' ORDER BY key"))
        .into_iter()
        .flatten()
        .collect()
}
