//! The saved set: the file in which wsusage keeps its pending marks across a clean restart (see
//! the extension's `state::saved_set` for when it is written and read).
//!
//! The file is `MAGIC` and the format's version (both little-endian `u32`), the [`SavedSet`] in
//! postcard's encoding (a documented, stable wire format: varints, length-prefixed lists and
//! strings, in field order), and a CRC32C of every byte before it (little-endian `u32`), as
//! PostgreSQL's control file carries one. A file is taken whole or refused whole: a wrong
//! checksum, a body that does not decode, or bytes left after it are damage. What the body holds
//! is then checked mark by mark ([`valid_marks`]) before anything reaches shared memory: a
//! flush never moves a time backwards, so one garbage time in the future would pin a row there
//! for good.
//!
//! Earlier releases' formats are still read, so that an upgrade's restart keeps the marks:
//! version 3 (0.3.0: targets and their keys, laid out by hand), version 2 (0.3.0 development
//! builds, before targets) and version 1 (0.2.0: no write time, no checksum; its marks checked
//! against the file's modification time). The keys of versions 1 and 2 belong to the `default`
//! target of their database. [`legacy`] writes them too, for the tests of that reading.

use serde::{Deserialize, Serialize};

/// "WSUP".
pub const MAGIC: u32 = 0x5753_5550;
/// The version this crate writes.
pub const VERSION: u32 = 4;
/// The key kind of a uuid (the extension's `Kind::Uuid`), which every key of versions 1 and 2 is.
pub const KIND_UUID: u8 = 0;
/// The target every key of versions 1 and 2 belongs to.
pub const DEFAULT_TARGET: &str = "default";
/// The longest target name a mark may carry (the extension's slot holds 63 bytes, as a `name`).
pub const NAME_MAX: usize = 63;

const HEAD_LEN: usize = 8;
const CRC_LEN: usize = 4;

/// A target the saved marks belong to, found again by database and name after the restart (its
/// slot may then be another).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub database: u32,
    pub name: String,
}

/// One pending key and the latest time it was marked.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    /// Its target's index in [`SavedSet::targets`].
    pub target: u32,
    /// Its kind (the extension's `Kind`: 0 uuid, 1 bigint).
    pub kind: u8,
    pub id: [u8; 16],
    /// PostgreSQL's `TimestampTz`: microseconds since 2000-01-01.
    pub marked_at: i64,
}

/// What a file holds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct SavedSet {
    /// When the file was written (`TimestampTz`): no valid mark is later.
    pub written_at: i64,
    pub targets: Vec<Target>,
    pub marks: Vec<Mark>,
}

/// Why a file was refused whole.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not a wsusage saved set (another magic, or a version this release does not know).
    NotOurs,
    /// Ours, but damaged; `marks` is about how many marks it held, for the message.
    Damaged { marks: usize },
}

/// The file's bytes for `set`, in the current version.
pub fn encode(set: &SavedSet) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEAD_LEN + 16 + set.targets.len() * 24 + set.marks.len() * 32 + CRC_LEN);
    bytes.extend_from_slice(&MAGIC.to_le_bytes());
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    let bytes = postcard::to_extend(set, bytes).expect("a Vec takes every byte postcard writes");
    with_crc(bytes)
}

fn with_crc(mut bytes: Vec<u8>) -> Vec<u8> {
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

fn word(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn double(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// The checksummed part of a file of a version that has one, if the checksum matches.
fn checked(bytes: &[u8], head_len: usize) -> Option<&[u8]> {
    let crc_at = bytes.len().checked_sub(CRC_LEN).filter(|&at| at >= head_len)?;
    (word(bytes, crc_at) == Some(crc32c::crc32c(&bytes[..crc_at]))).then_some(&bytes[..crc_at])
}

/// What the file `bytes` holds. `modified_at`: the file's modification time (`TimestampTz`),
/// the write time of a version 1 file, which carries none.
pub fn decode(bytes: &[u8], modified_at: i64) -> Result<SavedSet, Refused> {
    if word(bytes, 0) != Some(MAGIC) {
        return Err(Refused::NotOurs);
    }
    match word(bytes, 4) {
        Some(VERSION) => {
            // The body is decoded even under a wrong checksum, only to say how many marks are
            // lost (about 30 bytes a mark when it does not decode either).
            let crc_at = bytes.len().checked_sub(CRC_LEN).filter(|&at| at >= HEAD_LEN);
            let decoded = crc_at.and_then(|at| match postcard::take_from_bytes::<SavedSet>(&bytes[HEAD_LEN..at]) {
                Ok((set, [])) => Some(set),
                _ => None,
            });
            match (checked(bytes, HEAD_LEN).is_some(), decoded) {
                (true, Some(set)) => Ok(set),
                (_, set) => Err(Refused::Damaged { marks: set.map_or(bytes.len() / 30, |set| set.marks.len()) }),
            }
        }
        Some(legacy::VERSION_TARGETED) => legacy::decode_targeted(bytes),
        Some(legacy::VERSION_UNTARGETED) => legacy::decode_untargeted(bytes),
        Some(legacy::VERSION_0_2_0) => legacy::decode_0_2_0(bytes, modified_at),
        _ => Err(Refused::NotOurs),
    }
}

/// The marks of `set` that are valid, each key once, and how many were not. Valid: its target is
/// in the file, of a database (not 0) and with a name a target can have; its kind is one
/// `known_kind` accepts; its time is after 2000-01-01 and not after `written_at` (the file's
/// write time, or earlier: a clock set back since must not let a future time through).
pub fn valid_marks(set: &SavedSet, written_at: i64, known_kind: impl Fn(u8) -> bool) -> (Vec<Mark>, usize) {
    let mut seen = std::collections::HashSet::with_capacity(set.marks.len());
    let valid: Vec<Mark> = set
        .marks
        .iter()
        .filter(|mark| {
            let Some(target) = usize::try_from(mark.target).ok().and_then(|at| set.targets.get(at)) else {
                return false;
            };
            target.database != 0
                && valid_name(&target.name)
                && known_kind(mark.kind)
                && mark.marked_at > 0
                && mark.marked_at <= written_at
                // A target named twice in the file is still one target: its key once.
                && seen.insert((target.database, target.name.as_str(), mark.kind, mark.id))
        })
        .copied()
        .collect();
    let invalid = set.marks.len() - valid.len();
    (valid, invalid)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= NAME_MAX && !name.contains('\0')
}

/// The formats of earlier releases: read by [`decode`], written here for the tests of that
/// reading (the extension never writes them).
pub mod legacy {
    use super::*;

    /// 0.3.0: magic, version, write time, target count, mark count (`u64`s), then each target
    /// (database `u32`, name length `u8`, name), each mark (target index `u32`, kind `u8`, id,
    /// time `i64`), the CRC32C; all little-endian.
    pub const VERSION_TARGETED: u32 = 3;
    /// 0.3.0 development builds: magic, version, write time, mark count, then each mark
    /// (database `u32`, id, time), the CRC32C.
    pub const VERSION_UNTARGETED: u32 = 2;
    /// 0.2.0: magic, version, mark count, then each mark as in version 2; no write time, no CRC.
    pub const VERSION_0_2_0: u32 = 1;

    const TARGETED_HEAD: usize = 4 + 4 + 8 + 8 + 8;
    const TARGETED_MARK: usize = 4 + 1 + 16 + 8;
    const UNTARGETED_HEAD: usize = 4 + 4 + 8 + 8;
    const HEAD_0_2_0: usize = 4 + 4 + 8;
    const UNTARGETED_MARK: usize = 4 + 16 + 8;

    pub(super) fn decode_targeted(bytes: &[u8]) -> Result<SavedSet, Refused> {
        let damaged = || Refused::Damaged { marks: bytes.len().saturating_sub(TARGETED_HEAD) / TARGETED_MARK };
        let checked = checked(bytes, TARGETED_HEAD).ok_or_else(damaged)?;
        let count = |at| double(bytes, at).and_then(|count| usize::try_from(count).ok());
        let (Some(target_count), Some(mark_count)) = (count(16), count(24)) else { return Err(damaged()) };
        let written_at = double(bytes, 8).map_or(0, |time| time as i64);
        let body = &checked[TARGETED_HEAD..];
        let mut targets = Vec::with_capacity(target_count.min(body.len() / 5));
        let mut at = 0;
        for _ in 0..target_count {
            let database = word(body, at).ok_or_else(damaged)?;
            let len = usize::from(*body.get(at + 4).ok_or_else(damaged)?);
            let name = body.get(at + 5..at + 5 + len).and_then(|name| std::str::from_utf8(name).ok());
            targets.push(Target { database, name: name.ok_or_else(damaged)?.to_owned() });
            at += 5 + len;
        }
        let rest = &body[at.min(body.len())..];
        if at > body.len() || mark_count.checked_mul(TARGETED_MARK) != Some(rest.len()) {
            return Err(damaged());
        }
        let marks = rest
            .chunks_exact(TARGETED_MARK)
            .map(|chunk| Mark {
                target: u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]),
                kind: chunk[4],
                id: chunk[5..21].try_into().unwrap_or_default(),
                marked_at: i64::from_le_bytes(chunk[21..29].try_into().unwrap_or_default()),
            })
            .collect();
        Ok(SavedSet { written_at, targets, marks })
    }

    pub(super) fn decode_untargeted(bytes: &[u8]) -> Result<SavedSet, Refused> {
        let damaged = Refused::Damaged { marks: bytes.len().saturating_sub(UNTARGETED_HEAD) / UNTARGETED_MARK };
        let Some(checked) = checked(bytes, UNTARGETED_HEAD) else { return Err(damaged) };
        let body = &checked[UNTARGETED_HEAD..];
        let count = double(bytes, 16).and_then(|count| usize::try_from(count).ok());
        if count.and_then(|count| count.checked_mul(UNTARGETED_MARK)) != Some(body.len()) {
            return Err(damaged);
        }
        Ok(untargeted(body, double(bytes, 8).map_or(0, |time| time as i64)))
    }

    pub(super) fn decode_0_2_0(bytes: &[u8], modified_at: i64) -> Result<SavedSet, Refused> {
        let body = bytes.get(HEAD_0_2_0..).unwrap_or_default();
        let count = double(bytes, 8).and_then(|count| usize::try_from(count).ok());
        if count.and_then(|count| count.checked_mul(UNTARGETED_MARK)) != Some(body.len()) {
            return Err(Refused::Damaged { marks: body.len() / UNTARGETED_MARK });
        }
        Ok(untargeted(body, modified_at))
    }

    /// Marks of versions 1 and 2, each of the `default` target of its database.
    fn untargeted(body: &[u8], written_at: i64) -> SavedSet {
        let mut targets: Vec<Target> = Vec::new();
        let marks = body
            .chunks_exact(UNTARGETED_MARK)
            .map(|chunk| {
                let database = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                let target = targets.iter().position(|target| target.database == database).unwrap_or_else(|| {
                    targets.push(Target { database, name: DEFAULT_TARGET.into() });
                    targets.len() - 1
                });
                Mark {
                    target: target as u32,
                    kind: KIND_UUID,
                    id: chunk[4..20].try_into().unwrap_or_default(),
                    marked_at: i64::from_le_bytes(chunk[20..28].try_into().unwrap_or_default()),
                }
            })
            .collect();
        SavedSet { written_at, targets, marks }
    }

    /// A version 3 file of `set`.
    pub fn encode_targeted(set: &SavedSet) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC.to_le_bytes());
        bytes.extend_from_slice(&VERSION_TARGETED.to_le_bytes());
        bytes.extend_from_slice(&set.written_at.to_le_bytes());
        bytes.extend_from_slice(&(set.targets.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&(set.marks.len() as u64).to_le_bytes());
        for target in &set.targets {
            bytes.extend_from_slice(&target.database.to_le_bytes());
            bytes.push(target.name.len() as u8);
            bytes.extend_from_slice(target.name.as_bytes());
        }
        for mark in &set.marks {
            bytes.extend_from_slice(&mark.target.to_le_bytes());
            bytes.push(mark.kind);
            bytes.extend_from_slice(&mark.id);
            bytes.extend_from_slice(&mark.marked_at.to_le_bytes());
        }
        with_crc(bytes)
    }

    fn untargeted_marks(bytes: &mut Vec<u8>, marks: &[(u32, [u8; 16], i64)]) {
        for (database, id, at) in marks {
            bytes.extend_from_slice(&database.to_le_bytes());
            bytes.extend_from_slice(id);
            bytes.extend_from_slice(&at.to_le_bytes());
        }
    }

    /// A version 2 file of `marks` (database, uuid, time).
    pub fn encode_untargeted(written_at: i64, marks: &[(u32, [u8; 16], i64)]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC.to_le_bytes());
        bytes.extend_from_slice(&VERSION_UNTARGETED.to_le_bytes());
        bytes.extend_from_slice(&written_at.to_le_bytes());
        bytes.extend_from_slice(&(marks.len() as u64).to_le_bytes());
        untargeted_marks(&mut bytes, marks);
        with_crc(bytes)
    }

    /// A version 1 file (0.2.0's) of `marks` (database, uuid, time).
    pub fn encode_0_2_0(marks: &[(u32, [u8; 16], i64)]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC.to_le_bytes());
        bytes.extend_from_slice(&VERSION_0_2_0.to_le_bytes());
        bytes.extend_from_slice(&(marks.len() as u64).to_le_bytes());
        untargeted_marks(&mut bytes, marks);
        bytes
    }
}
