//! What SQL sees of the functions: each name resolves to one function for every way a driver
//! passes its arguments, and every function is VOLATILE and PARALLEL UNSAFE (it acts on shared
//! state, not data).

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pg_tests::support::*;

    #[pg_test]
    fn the_functions_are_volatile_and_parallel_unsafe() {
        let described: Vec<String> = column(
            "SELECT format('%s|%s|%s|%s', proname, provolatile, proparallel, pg_get_function_result(oid))
               FROM pg_proc WHERE proname LIKE 'wsusage%' ORDER BY proname, pronargs",
        )
        .into_iter()
        .flatten()
        .collect();
        let expected = [
            ("wsusage_flush", "bigint"),
            ("wsusage_mark", "void"),
            ("wsusage_mark", "void"),
            ("wsusage_mark_bigint", "void"),
            ("wsusage_mark_many", "void"),
            ("wsusage_mark_many", "void"),
            ("wsusage_mark_many_bigint", "void"),
            (
                "wsusage_pending",
                "TABLE(target text, key text, workspace_id uuid, last_used_at timestamp with time zone, error text, \
                         retry_at timestamp with time zone)",
            ),
            // The fresh reads.
            ("wsusage_pending_at", "timestamp with time zone"),
            ("wsusage_pending_at", "timestamp with time zone"),
            ("wsusage_pending_at_bigint", "timestamp with time zone"),
            (
                "wsusage_stats",
                "TABLE(pending bigint, capacity bigint, marks bigint, flushes bigint, ids_flushed bigint, \
                         rows_updated bigint, ids_without_row bigint, ids_skipped_locked bigint, \
                         ids_skipped_by_min_change bigint, ids_discarded bigint, \
                         failures bigint, consecutive_failures bigint, rejected bigint, held_back bigint, \
                         last_flush_at timestamp with time zone, \
                         last_flush_duration interval, last_error text, last_error_at timestamp with time zone, \
                         databases bigint, workers bigint, launcher_pid integer, stats_reset timestamp with time zone)",
            ),
            (
                "wsusage_stats_by_database",
                "TABLE(datid oid, datname text, pending bigint, marks bigint, flushes bigint, ids_flushed bigint, \
                         rows_updated bigint, ids_without_row bigint, ids_skipped_locked bigint, \
                         ids_skipped_by_min_change bigint, failures bigint, \
                         consecutive_failures bigint, rejected bigint, held_back bigint, \
                         last_flush_at timestamp with time zone, last_flush_duration interval, \
                         last_error text, last_error_at timestamp with time zone, worker_pid integer, \
                         stats_reset timestamp with time zone)",
            ),
            (
                "wsusage_stats_by_target",
                "TABLE(database text, target text, pending bigint, ids_flushed bigint, rows_updated bigint, \
                         ids_skipped_by_min_change bigint, ids_without_row bigint, ids_skipped_locked bigint, \
                         failures bigint, consecutive_failures bigint, last_error text, \
                         last_error_at timestamp with time zone, last_flush_at timestamp with time zone)",
            ),
            ("wsusage_stats_reset", "void"),
            // The trigger functions of wsusage_target.
            ("wsusage_target_check", "trigger"),
            ("wsusage_target_normalize", "trigger"),
        ];
        assert_eq!(described.len(), expected.len(), "{described:?}");
        for (line, (name, result)) in described.iter().zip(expected) {
            assert_eq!(line, &format!("{name}|v|u|{result}"));
        }
    }

    /// Parameters without a type, as drivers send them (the server infers each one), and untyped
    /// literals: every call resolves to exactly one function (never 42725, ambiguous).
    #[pg_test]
    fn untyped_parameters_and_literals_resolve_to_one_function_each() {
        for (n, (call, types)) in [
            ("wsusage_mark($1)", "{uuid}"),
            ("wsusage_mark($1, $2)", "{text,uuid}"),
            ("wsusage_mark_many($1)", "{uuid[]}"),
            ("wsusage_mark_many($1, $2)", "{text,uuid[]}"),
            ("wsusage_mark_bigint($1, $2)", "{text,bigint}"),
            ("wsusage_mark_many_bigint($1, $2)", "{text,bigint[]}"),
            ("wsusage_pending_at($1)", "{uuid}"),
            ("wsusage_pending_at($1, $2)", "{text,uuid}"),
            ("wsusage_pending_at_bigint($1, $2)", "{text,bigint}"),
        ]
        .into_iter()
        .enumerate()
        {
            // Prepared statements outlive the test's transaction: each goes once it is read.
            run(&format!("PREPARE wsusage_untyped_{n} AS SELECT {call}"));
            let inferred = value(&format!(
                "SELECT parameter_types::text FROM pg_prepared_statements WHERE name = 'wsusage_untyped_{n}'"
            ));
            run(&format!("DEALLOCATE wsusage_untyped_{n}"));
            assert_eq!(inferred.as_deref(), Some(types), "{call}");
        }
        let id = "'00000000-0000-0000-0000-000000000001'";
        for call in [
            format!("wsusage_mark('no_such_target', {id})"),
            "wsusage_mark_many('no_such_target', '{00000000-0000-0000-0000-000000000001}')".to_owned(),
            "wsusage_mark_bigint('no_such_target', '3')".to_owned(),
            "wsusage_mark_many_bigint('no_such_target', '{4,5}')".to_owned(),
            format!("wsusage_pending_at('no_such_target', {id})"),
            "wsusage_pending_at_bigint('no_such_target', '3')".to_owned(),
        ] {
            let refused = refusal(&format!("SELECT {call}"));
            assert_eq!(
                refused.sqlstate, "42704",
                "{call} resolved to a function, which found no target: {}",
                refused.message
            );
        }
    }
}
