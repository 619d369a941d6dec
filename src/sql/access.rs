//! What a caller does with a target's keys: mark them, or read their pending marks. Each needs
//! its own privilege (see `resolve`), and is refused in its own words (see `mark_errors`).

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Access {
    /// Mark them: the role may make the UPDATE the mark defers.
    Mark,
    /// Read their pending marks (`wsusage_pending_at`): the role may read the column.
    Read,
}
