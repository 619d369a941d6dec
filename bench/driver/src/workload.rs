//! The statements the benchmark compares, each with the parameters an application would bind.
//!
//! Workspace ids are the benchmark table's: workspace `n` (1-based) has the uuid
//! `00000000-0000-4000-8000-` followed by `n` in 12 hex digits, which `bench.py` creates with
//! `('00000000-0000-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid`.

const UUID: u32 = 2950;
const UUID_ARRAY: u32 = 2951;

#[derive(Clone, Copy)]
pub struct Workload {
    pub variant: Variant,
    /// Workspaces in the table: ids are drawn from 1..=rows.
    pub rows: u64,
    /// The hot subset `mark_hot` draws from: 1..=hot.
    pub hot: u64,
    /// Ids per `mark_many` call.
    pub per_call: u64,
}

/// The variants, named on the command line as `bench.py` names them (`floor_fn`, `mark_hot` …).
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Variant {
    Floor,
    FloorId,
    FloorFn,
    Mark,
    MarkHot,
    MarkMany,
    Update,
    Staging,
}

impl Workload {
    pub fn statement(&self) -> (&'static str, &'static [u32]) {
        match self.variant {
            Variant::Floor => ("SELECT 1", &[]),
            // The same round trip carrying the same bound id as the mark, without the mark: what
            // the mark itself costs is the difference to this one.
            Variant::FloorId => ("SELECT $1", &[UUID]),
            // A C function that is passed the id and does nothing (bench.py declares it): what
            // PostgreSQL itself spends on calling an extension's function with the mark's
            // argument (looking it up, checking the EXECUTE privilege, receiving the argument),
            // which a mark pays too.
            Variant::FloorFn => ("SELECT floor_fn($1)", &[UUID]),
            Variant::Mark | Variant::MarkHot => ("SELECT wsusage_mark($1)", &[UUID]),
            Variant::MarkMany => ("SELECT wsusage_mark_many($1)", &[UUID_ARRAY]),
            Variant::Update => ("UPDATE workspaces SET last_used_at = now() WHERE id = $1", &[UUID]),
            Variant::Staging => (
                "INSERT INTO usage_staging (id, ts) VALUES ($1, clock_timestamp()) \
                 ON CONFLICT (id) DO UPDATE SET ts = GREATEST(usage_staging.ts, EXCLUDED.ts)",
                &[UUID],
            ),
        }
    }

    /// Marks one call records (what "marks/s" counts).
    pub fn marks_per_call(&self) -> u64 {
        if self.variant == Variant::MarkMany {
            self.per_call
        } else {
            1
        }
    }

    /// Encode the next call's parameter (binary format) into `out`; empty for `SELECT 1`.
    pub fn next_param(&self, random: &mut Random, out: &mut Vec<u8>) {
        out.clear();
        match self.variant {
            Variant::Floor => {}
            Variant::MarkHot => out.extend_from_slice(&uuid_of(1 + random.below(self.hot))),
            Variant::MarkMany => {
                let first = 1 + random.below(self.rows - self.per_call + 1);
                put_uuid_array(out, first, self.per_call);
            }
            _ => out.extend_from_slice(&uuid_of(1 + random.below(self.rows))),
        }
    }
}

pub fn uuid_of(n: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[6] = 0x40;
    id[8] = 0x80;
    id[10..].copy_from_slice(&n.to_be_bytes()[2..]);
    id
}

/// The ids of workspaces first..first+count as a one-dimensional uuid[] without NULLs, in
/// array_recv's format.
fn put_uuid_array(out: &mut Vec<u8>, first: u64, count: u64) {
    let len = i32::try_from(count).expect("a benchmark array is small");
    for word in [1, 0, UUID as i32, len, 1] {
        // dimensions, has-nulls flag, element type, length, lower bound
        out.extend_from_slice(&word.to_be_bytes());
    }
    for id in (first..first + count).map(uuid_of) {
        out.extend_from_slice(&16i32.to_be_bytes());
        out.extend_from_slice(&id);
    }
}

/// xorshift64*: uniform enough for drawing ids, and costs the client next to nothing.
pub struct Random(u64);

impl Random {
    pub fn new(seed: u64) -> Random {
        Random(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Uniform in 0..n (n ≥ 1; the modulo's bias is below 1e-13 for the benchmark's n).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}
