//! Targets' declarations published in shared memory, so that a new backend's first mark of a
//! target need not open `wsusage_target` (nor find it through `pg_depend`): building those
//! relation cache entries in a backend that has none cost a first mark about 0.2 ms
//! (bench/results/2026-12-07-first-mark.md). A backend that had to read a declaration
//! from the catalogs publishes it in the target's slot; the next backends take the row from there
//! and check everything else in their own catalog caches — the table, its columns and their
//! types, the `after_flush` function and its owner — with their own role's privileges (see
//! `sql::resolve`).
//!
//! A publication is only as good as its **ticket**. Each database's slot holds the ticket of its
//! declarations, a number taken from a cluster-wide counter whenever they may have changed
//! ([`invalidate`]): once a transaction that wrote `wsusage_target` has committed and is visible
//! (see `changes`), and at each flush round of the database that has keys to write (which bounds
//! how long a change made with the table's triggers disabled goes unseen). A backend reads the
//! ticket *before* it reads the catalogs and publishes what it read under that ticket, and a
//! publication is taken only while its ticket is the database's: a read that may have missed a
//! change carries a ticket older than the one the change's commit took, and is never taken
//! again. Tickets only grow, and a database slot given to a database gets a new one, so a ticket
//! is never reused. DROP and CREATE EXTENSION write no row: a publication whose `wsusage_target`
//! is no longer a table of that name is refused by [`lookup`].
//!
//! Publications live in the target slots in shared memory, kept there by `state::publications`.

use pgrx::pg_sys;

use crate::memory::publication::{Publication, NAME_MAX, SIGNATURE_MAX};
use crate::state::publications;
pub use crate::state::publications::{invalidate, ticket};
use crate::targets::catalog;
use crate::targets::definition::{Hints, MinChange};
use crate::targets::lookup::{Declarations, Declared};

/// `declarations` (of one target) as published under `ticket`, where it was found to be yet to
/// be added ([`publish`]); `None` when they do not fit.
pub fn prepare(ticket: u64, declarations: &Declarations) -> Option<Publication> {
    let mut published = Publication {
        ticket,
        targets_table: declarations.targets_table.unwrap_or(pg_sys::InvalidOid),
        extension: declarations.extension,
        ..Publication::NONE
    };
    let [row] = declarations.rows.as_slice() else {
        return declarations.rows.is_empty().then_some(published);
    };
    published.row = true;
    published.relation = row.relation?;
    published.id_column = name_bytes(&row.id_column)?;
    published.timestamp_column = name_bytes(&row.timestamp_column)?;
    match &row.after_flush {
        None => published.after_flush_len = u16::MAX,
        Some(signature) if signature.len() <= SIGNATURE_MAX => {
            published.after_flush[..signature.len()].copy_from_slice(signature.as_bytes());
            published.after_flush_len = signature.len() as u16;
        }
        Some(_) => return None,
    }
    Some(published)
}

/// The declarations of target `name` that `published` holds. Only the fields of a row that
/// marks use are published: `min_change` reads as zero.
fn decode(published: &Publication, name: &str) -> Declarations {
    let text = |bytes: &[u8]| {
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..end]).into_owned()
    };
    let row = published.row.then(|| Declared {
        name: name.to_owned(),
        relation: Some(published.relation),
        relation_text: published.relation.to_u32().to_string(),
        id_column: text(&published.id_column),
        timestamp_column: text(&published.timestamp_column),
        min_change: MinChange::zero(),
        after_flush: (published.after_flush_len != u16::MAX)
            .then(|| text(&published.after_flush[..usize::from(published.after_flush_len).min(SIGNATURE_MAX)])),
        from_settings: false,
        hints: hints_of(published),
    });
    Declarations {
        settings_hints: if published.row { Hints::default() } else { hints_of(published) },
        rows: row.into_iter().collect(),
        targets_table: (published.targets_table != pg_sys::InvalidOid).then_some(published.targets_table),
        extension: published.extension,
    }
}

fn hints_of(published: &Publication) -> Hints {
    Hints {
        relation: (published.relation_hint != pg_sys::InvalidOid).then_some(published.relation_hint),
        id_column: (published.id_column_hint > 0).then_some(published.id_column_hint),
        timestamp_column: (published.timestamp_column_hint > 0).then_some(published.timestamp_column_hint),
    }
}

/// A column name as NameData holds it; `None` if it is too long to be one.
fn name_bytes(name: &str) -> Option<[u8; NAME_MAX]> {
    let mut bytes = [0u8; NAME_MAX];
    (name.len() < NAME_MAX).then(|| {
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        bytes
    })
}

/// The published declarations of target `name` of `database`, if published under its current
/// ticket and `wsusage_target` is still the table they were read from (DROP EXTENSION drops it,
/// and CREATE EXTENSION makes another, writing no row of it). Inside a transaction.
pub fn lookup(database: pg_sys::Oid, name: &str) -> Option<Declarations> {
    let published = publications::current(database, name)?;
    let declarations = decode(&published, name);
    if let Some(table) = declarations.targets_table {
        let same = catalog::relation(table)
            .is_some_and(|table| table.name == "wsusage_target" && table.kind == pg_sys::RELKIND_RELATION);
        if !same {
            return None;
        }
    }
    Some(declarations)
}

/// Publish what [`prepare`] made of target `name` of `database`, with where its table and
/// columns were `found`, unless the target has no slot (it is claimed by its first mark) or the
/// ticket it was read under is no longer current.
pub fn publish(database: pg_sys::Oid, name: &str, mut publication: Publication, found: Hints) {
    let ticket = publication.ticket;
    publication.relation_hint = found.relation.unwrap_or(pg_sys::InvalidOid);
    publication.id_column_hint = found.id_column.unwrap_or(0);
    publication.timestamp_column_hint = found.timestamp_column.unwrap_or(0);
    publications::store(database, name, publication, ticket);
}
