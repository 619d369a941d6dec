//! Whether wsusage can act where a SQL function is called: the library preloaded, the server not
//! in recovery, `wsusage.database` accepted by the server and naming this database (or none).
//! Every function that marks or flushes checks it first ([`check_active_here`]); what only reads
//! needs the library preloaded ([`Unavailable::NotPreloaded`]).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use pgrx::pg_sys;
use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::ErrorReport;

use crate::memory::layout;
use crate::settings;
use crate::sql::report::Report;
use crate::state::databases;

pub enum Unavailable {
    NotPreloaded,
    InRecovery {
        action: &'static str,
    },
    /// The configuration file's value of `setting` was refused at server start.
    SettingRefused {
        setting: &'static str,
    },
    WrongDatabase {
        current: String,
    },
}

impl Report for Unavailable {
    fn to_report(&self, function: &'static str) -> ErrorReport {
        use PgSqlErrorCode::*;
        match self {
            Unavailable::NotPreloaded => ErrorReport::new(
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "wsusage must be loaded via shared_preload_libraries",
                function,
            )
            .set_hint("Add \"wsusage\" to \"shared_preload_libraries\" and restart the server."),
            Unavailable::InRecovery { action } => {
                ErrorReport::new(ERRCODE_READ_ONLY_SQL_TRANSACTION, format!("cannot {action} during recovery"), function)
                    .set_hint("Run it on the primary server; the worker starts on a standby once it is promoted.")
            }
            Unavailable::SettingRefused { setting } => ErrorReport::new(
                ERRCODE_INVALID_PARAMETER_VALUE,
                format!("wsusage is disabled: the server refused the value of \"{setting}\""),
                function,
            )
            .set_detail(settings::refused_detail(setting))
            .set_hint(format!(
                "Fix \"{setting}\" in the configuration file (see the WARNING in the server log) and restart the server."
            )),
            Unavailable::WrongDatabase { current } => {
                let configured = settings::database().unwrap_or_default();
                ErrorReport::new(
                    ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!("wsusage is not active in database \"{current}\""),
                    function,
                )
                .set_detail(format!(
                    "\"wsusage.database\" restricts wsusage to database \"{configured}\", so marks are accepted only there."
                ))
                .set_hint(format!(
                    "Connect to database \"{configured}\", or set \"wsusage.database\" to \"{current}\" or to an empty string (every database) and restart the server."
                ))
            }
        }
    }
}

/// Raise unless marks made here can be flushed: the library is preloaded, the server is not
/// in recovery, and `wsusage.database` does not restrict wsusage to another database.
pub fn check_active_here(function: &'static str, action: &'static str) {
    if !layout::is_ready() {
        Unavailable::NotPreloaded.raise(function);
    }
    if in_recovery() {
        Unavailable::InRecovery { action }.raise(function);
    }
    if let Some(setting @ "wsusage.database") = settings::refused() {
        Unavailable::SettingRefused { setting }.raise(function);
    }
    if !in_allowed_database() {
        Unavailable::WrongDatabase { current: current_database() }.raise(function);
    }
}

/// Recovery ends once and never comes back for a running server, so once this backend has seen
/// it over, the hot path skips the check.
static RECOVERY_OVER: AtomicBool = AtomicBool::new(false);

fn in_recovery() -> bool {
    if RECOVERY_OVER.load(Ordering::Relaxed) {
        return false;
    }
    // SAFETY: a plain query of the server's state.
    let in_recovery = unsafe { pg_sys::RecoveryInProgress() };
    if !in_recovery {
        RECOVERY_OVER.store(true, Ordering::Relaxed);
    }
    in_recovery
}

const UNKNOWN: u8 = 0;
const YES: u8 = 1;
const NO: u8 = 2;
/// Whether `wsusage.database` allows this backend's database; both are fixed for the backend's
/// life, so the answer is computed once.
static IN_ALLOWED_DATABASE: AtomicU8 = AtomicU8::new(UNKNOWN);

fn in_allowed_database() -> bool {
    match IN_ALLOWED_DATABASE.load(Ordering::Relaxed) {
        YES => true,
        NO => false,
        _ => {
            let allowed = settings::database().is_none_or(|only| only == current_database());
            IN_ALLOWED_DATABASE.store(if allowed { YES } else { NO }, Ordering::Relaxed);
            allowed
        }
    }
}

/// This backend's database: marks made here are flushed here.
pub fn this_database() -> pg_sys::Oid {
    // SAFETY: a plain read of a global set once the backend is connected, as every caller of
    // our SQL functions is.
    unsafe { pg_sys::MyDatabaseId }
}

fn current_database() -> String {
    databases::name(this_database()).unwrap_or_default()
}
