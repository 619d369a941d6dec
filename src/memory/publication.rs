//! A target's declaration as published in its slot in shared memory (see `targets::published`): plain
//! data of a fixed size, copied out whole under the wsusage lock.

use pgrx::pg_sys;

/// Longest `after_flush` signature published, in bytes; a longer one (a function of many
/// arguments, which cannot fit anyway) is read from the catalogs each time.
pub const SIGNATURE_MAX: usize = 255;
pub const NAME_MAX: usize = pg_sys::NAMEDATALEN as usize;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Publication {
    /// The database's ticket it was read under; 0: nothing published.
    pub ticket: u64,
    /// `wsusage_target`'s OID, InvalidOid when the extension has no such table (before 0.3.0).
    pub targets_table: pg_sys::Oid,
    pub extension: bool,
    /// `wsusage_target` has a row of the target's name; the fields below are that row's.
    pub row: bool,
    pub relation: pg_sys::Oid,
    /// NUL-terminated, as NameData.
    pub id_column: [u8; NAME_MAX],
    pub timestamp_column: [u8; NAME_MAX],
    /// Where the table (the settings' `default`: a row names its own) and its columns were found
    /// (see `Hints`); InvalidOid and 0 when not.
    pub relation_hint: pg_sys::Oid,
    pub id_column_hint: i16,
    pub timestamp_column_hint: i16,
    /// Length of `after_flush`, `u16::MAX` for NULL.
    pub after_flush_len: u16,
    pub after_flush: [u8; SIGNATURE_MAX],
}

impl Publication {
    /// Nothing published (all-zero, as shared memory starts).
    pub const NONE: Publication = Publication {
        ticket: 0,
        targets_table: pg_sys::InvalidOid,
        extension: false,
        row: false,
        relation: pg_sys::InvalidOid,
        id_column: [0; NAME_MAX],
        timestamp_column: [0; NAME_MAX],
        relation_hint: pg_sys::InvalidOid,
        id_column_hint: 0,
        timestamp_column_hint: 0,
        after_flush_len: 0,
        after_flush: [0; SIGNATURE_MAX],
    };
}
