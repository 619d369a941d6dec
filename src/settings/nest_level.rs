//! A GUC nest level of our own, as PostgreSQL opens one around a function's `SET` clause or a
//! table owner's code in VACUUM: settings changed while it is open — by us, or by code we run —
//! are undone when it is popped, and reach nothing that runs after.

use std::ffi::{c_int, CStr, CString};

use pgrx::pg_sys;

/// An open nest level; [`NestLevel::pop`] closes it. An ERROR before then needs nothing: the
/// transaction's abort pops every level.
pub struct NestLevel(c_int);

impl NestLevel {
    /// # Safety
    /// Inside a transaction.
    pub unsafe fn open() -> NestLevel {
        // SAFETY: the caller's transaction.
        NestLevel(unsafe { pg_sys::NewGUCNestLevel() })
    }

    /// Set `name` to `value` until the level is popped.
    ///
    /// # Safety
    /// The level is still the innermost open one.
    pub unsafe fn set(&self, name: &CStr, value: &str) {
        let value = CString::new(value).unwrap_or_default();
        // SAFETY: a user-settable GUC of this session, its prior value saved at this level
        // (GUC_ACTION_SAVE), so popping the level restores it.
        unsafe {
            pg_sys::set_config_option(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
        }
    }

    /// Undo every setting changed since the level was opened, whoever changed it.
    ///
    /// # Safety
    /// In the transaction the level was opened in, every level opened after it popped.
    pub unsafe fn pop(self) {
        // SAFETY: the caller's promise; `false` restores every value set at or within this level
        // (`true` would keep a plain SET made within it), as VACUUM does after a table owner's code.
        unsafe { pg_sys::AtEOXact_GUC(false, self.0) }
    }
}
