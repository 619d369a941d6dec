//! How a target's key is held in the pending set: 16 bytes and a [`Kind`]. A uuid is its 16
//! bytes; a bigint (or integer) is its 8 bytes big-endian with the sign bit flipped, then zeros,
//! so that keys sort in the key's own order (a flush writes its chunks in key order).

/// How a key's 16 bytes hold it; part of the key, so a target changed from one key type to
/// the other never reads a key as the other type.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Kind {
    Uuid = 0,
    Bigint = 1,
}

impl Kind {
    pub fn of(byte: u8) -> Option<Kind> {
        match byte {
            0 => Some(Kind::Uuid),
            1 => Some(Kind::Bigint),
            _ => None,
        }
    }

    /// The SQL type marks of this kind take.
    pub fn sql_type(self) -> &'static str {
        match self {
            Kind::Uuid => "uuid",
            Kind::Bigint => "bigint",
        }
    }
}

pub fn from_bigint(value: i64) -> [u8; 16] {
    let mut id = [0; 16];
    id[..8].copy_from_slice(&((value as u64) ^ (1 << 63)).to_be_bytes());
    id
}

pub fn to_bigint(id: &[u8; 16]) -> i64 {
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&id[..8]);
    (u64::from_be_bytes(bytes) ^ (1 << 63)) as i64
}

/// The key as text, for `wsusage_pending()` and messages.
pub fn display(kind: Kind, id: &[u8; 16]) -> String {
    match kind {
        Kind::Uuid => pgrx::Uuid::from_bytes(*id).to_string(),
        Kind::Bigint => to_bigint(id).to_string(),
    }
}
