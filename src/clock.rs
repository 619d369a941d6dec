//! Times as PostgreSQL's `TimestampTz` (microseconds since 2000-01-01), read without a call into
//! PostgreSQL.

use std::time::{SystemTime, UNIX_EPOCH};

/// The current time, from the clock `GetCurrentTimestamp` reads, but without a call into
/// PostgreSQL through pgrx's error guard: every mark reads it.
pub fn now() -> i64 {
    timestamp(SystemTime::now())
}

/// `time` as a `TimestampTz`.
pub fn timestamp(time: SystemTime) -> i64 {
    const UNIX_TO_POSTGRES_EPOCH_US: i64 = 946_684_800_000_000;
    let since_unix_epoch = match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_micros()).unwrap_or(i64::MAX),
    };
    since_unix_epoch.saturating_sub(UNIX_TO_POSTGRES_EPOCH_US)
}
