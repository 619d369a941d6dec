//! The saved set's format, as properties over many generated sets: what is written is read back
//! whole; any single bit flipped and any truncation is refused; a mark that could not have been
//! made never passes `valid_marks`; the earlier releases' files are still read.

use wsusage_saved_set::{decode, encode, legacy, valid_marks, Mark, Refused, SavedSet, Target, NAME_MAX, VERSION};

/// xorshift64*: the same cases at every run.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const WRITTEN_AT: i64 = 850_000_000_000_000;

/// A set of up to `targets` targets and `marks` marks, every mark valid, each key once.
fn valid_set(random: &mut Random, targets: u64, marks: u64) -> SavedSet {
    let targets: Vec<Target> = (0..1 + random.below(targets))
        .map(|n| {
            let len = 1 + random.below(NAME_MAX as u64) as usize;
            let name: String = (0..len).map(|i| (b'a' + ((n as usize + i) % 26) as u8) as char).collect();
            Target { database: 1 + random.below(5) as u32, name: format!("{n}{name}")[..len].to_owned() }
        })
        .collect();
    let marks = (0..random.below(marks))
        .map(|n| {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&random.next().to_le_bytes());
            id[8..].copy_from_slice(&n.to_le_bytes());
            Mark {
                target: random.below(targets.len() as u64) as u32,
                kind: random.below(2) as u8,
                id,
                marked_at: 1 + random.below(WRITTEN_AT as u64) as i64,
            }
        })
        .collect();
    SavedSet { written_at: WRITTEN_AT, targets, marks }
}

fn kind_known(kind: u8) -> bool {
    kind <= 1
}

#[test]
fn what_is_written_is_read_back_whole_and_every_mark_of_it_is_valid() {
    let mut random = Random(0x5a7e);
    for case in 0..500 {
        let set = valid_set(&mut random, 8, if case % 10 == 0 { 2_000 } else { 40 });
        let bytes = encode(&set);
        assert_eq!(&bytes[4..8], &VERSION.to_le_bytes());
        assert_eq!(decode(&bytes, 0), Ok(set.clone()));
        let (valid, invalid) = valid_marks(&set, set.written_at, kind_known);
        assert_eq!((valid, invalid), (set.marks.clone(), 0));
    }
}

#[test]
fn every_single_bit_flipped_is_refused() {
    let mut random = Random(0xb17);
    for _ in 0..40 {
        let bytes = encode(&valid_set(&mut random, 3, 6));
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&flipped, 0).is_err(), "bit {bit} of {} flipped was taken", bytes.len());
        }
    }
}

#[test]
fn every_truncation_and_every_byte_appended_is_refused() {
    let mut random = Random(0x7a11);
    for _ in 0..40 {
        let bytes = encode(&valid_set(&mut random, 3, 12));
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len], 0).is_err(), "the first {len} of {} bytes were taken", bytes.len());
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer, 0).is_err());
    }
}

#[test]
fn a_body_that_does_not_decode_is_damage_even_under_a_right_checksum() {
    let mut bytes = wsusage_saved_set::MAGIC.to_le_bytes().to_vec();
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&[0xff; 12]);
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    assert!(matches!(decode(&bytes, 0), Err(Refused::Damaged { .. })));
    assert_eq!(decode(b"not a saved set at all", 0), Err(Refused::NotOurs));
    let mut future = encode(&SavedSet::default());
    future[4] = 9;
    assert_eq!(decode(&future, 0), Err(Refused::NotOurs), "a version this release does not know");
}

#[test]
fn a_mark_that_could_not_have_been_made_never_passes() {
    let mut random = Random(0xbad);
    for _ in 0..200 {
        let mut set = valid_set(&mut random, 4, 30);
        if set.marks.is_empty() {
            continue;
        }
        let at = random.below(set.marks.len() as u64) as usize;
        let good = set.marks[at];
        let spoil = random.below(7);
        match spoil {
            // A time after the file was written, or before 2000-01-01.
            0 => set.marks[at].marked_at = set.written_at + 1 + random.below(1 << 40) as i64,
            1 => set.marks[at].marked_at = -(random.below(1 << 40) as i64),
            // A target index past the list.
            2 => set.marks[at].target = set.targets.len() as u32 + random.below(1000) as u32,
            // A kind no release has.
            3 => set.marks[at].kind = 2 + random.below(250) as u8,
            // The same key twice.
            4 => set.marks.push(good),
            // Its target of no database, or with a name no target can have.
            5 => {
                let target = good.target as usize;
                set.targets[target].database = 0;
            }
            _ => {
                let target = good.target as usize;
                set.targets[target].name = if random.below(2) == 0 { String::new() } else { "x".repeat(NAME_MAX + 1) };
            }
        }
        let (valid, invalid) = valid_marks(&set, set.written_at, kind_known);
        assert!(invalid >= 1, "spoil {spoil} passed");
        assert!(!valid
            .iter()
            .any(|mark| !kind_known(mark.kind) || mark.marked_at > set.written_at || mark.marked_at <= 0));
        // Read back from a file, the same marks pass.
        let read = decode(&encode(&set), 0).unwrap();
        assert_eq!(valid_marks(&read, read.written_at, kind_known), (valid, invalid));
    }
    // A clock set back since the file was written: nothing after "now" passes either.
    let set = SavedSet {
        written_at: WRITTEN_AT,
        targets: vec![Target { database: 1, name: "default".into() }],
        marks: vec![Mark { target: 0, kind: 0, id: [1; 16], marked_at: WRITTEN_AT - 10 }],
    };
    assert_eq!(valid_marks(&set, WRITTEN_AT - 11, kind_known).1, 1);
}

#[test]
fn a_target_named_twice_in_a_file_still_takes_each_key_once() {
    let set = SavedSet {
        written_at: WRITTEN_AT,
        targets: vec![Target { database: 1, name: "t".into() }, Target { database: 1, name: "t".into() }],
        marks: vec![
            Mark { target: 0, kind: 0, id: [7; 16], marked_at: 10 },
            Mark { target: 1, kind: 0, id: [7; 16], marked_at: 20 },
        ],
    };
    assert_eq!(valid_marks(&set, WRITTEN_AT, kind_known).1, 1);
}

#[test]
fn the_files_of_earlier_releases_are_still_read() {
    let mut random = Random(0x0301);
    for _ in 0..100 {
        let set = valid_set(&mut random, 5, 50);
        assert_eq!(decode(&legacy::encode_targeted(&set), 0), Ok(set.clone()), "version 3 (0.3.0)");
    }
    let marks = [(5, [1; 16], 100), (6, [2; 16], 200), (5, [3; 16], 300)];
    let read = decode(&legacy::encode_untargeted(1_000, &marks), 0).unwrap();
    assert_eq!(read.written_at, 1_000);
    assert_eq!(
        read.targets,
        [Target { database: 5, name: "default".into() }, Target { database: 6, name: "default".into() }]
    );
    assert_eq!(
        read.marks.iter().map(|mark| (mark.target, mark.kind, mark.id[0], mark.marked_at)).collect::<Vec<_>>(),
        [(0, 0, 1, 100), (1, 0, 2, 200), (0, 0, 3, 300)]
    );
    // 0.2.0's file carries no write time: its modification time stands for it.
    let read = decode(&legacy::encode_0_2_0(&marks), 2_000).unwrap();
    assert_eq!((read.written_at, read.marks.len()), (2_000, 3));
    // Damage in an earlier release's file is refused too.
    let mut v3 = legacy::encode_targeted(&valid_set(&mut random, 2, 5));
    let last = v3.len() - 1;
    v3[last] ^= 1;
    assert!(matches!(decode(&v3, 0), Err(Refused::Damaged { .. })));
    let v1 = legacy::encode_0_2_0(&marks);
    assert!(matches!(decode(&v1[..v1.len() - 1], 0), Err(Refused::Damaged { .. })));
}
