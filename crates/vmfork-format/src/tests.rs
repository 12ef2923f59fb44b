use crate::*;
use std::io::Cursor;

fn sample() -> Vec<u8> {
    let mut w = Writer::new(Cursor::new(Vec::new()), &Header::new("vmfork test", 0)).unwrap();
    w.record(RecordType::VmConfig as u32, 0, 0, b"config!")
        .unwrap();
    w.record(RecordType::Vcpu as u32, 1, 0, &[7u8; 20]).unwrap();
    w.record(999, 0, FLAG_OPTIONAL, b"from the future").unwrap();
    w.record(RecordType::Device as u32, 3, FLAG_IGNORE, b"")
        .unwrap();
    w.finish().unwrap().into_inner()
}

#[test]
fn round_trip_skips_unknown_optional_records() {
    let (header, records) = Reader::new(&sample()[..]).unwrap().read_all().unwrap();
    assert_eq!(header, Header::new("vmfork test", 0));
    let kinds: Vec<_> = records
        .iter()
        .map(|r| (r.kind, r.instance, r.body.len()))
        .collect();
    assert_eq!(kinds, vec![(1, 0, 7), (3, 1, 20), (6, 3, 0)]);
    assert_eq!(records[2].flags, FLAG_IGNORE);
}

#[test]
fn every_flipped_bit_is_caught() {
    let good = sample();
    for bit in 0..good.len() * 8 {
        let mut bad = good.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        let result = Reader::new(&bad[..]).and_then(|r| r.read_all());
        assert!(result.is_err(), "flipping bit {bit} went unnoticed");
    }
}

#[test]
fn every_truncation_is_caught() {
    let good = sample();
    for len in 0..good.len() {
        let err = Reader::new(&good[..len])
            .and_then(|r| r.read_all())
            .unwrap_err();
        let text = err.to_string();
        assert!(!text.is_empty());
    }
    let mut longer = good.clone();
    longer.push(0);
    assert!(matches!(
        Reader::new(&longer[..]).unwrap().read_all(),
        Err(FormatError::TrailingData)
    ));
}

#[test]
fn header_problems_are_named() {
    let good = sample();
    let mut bad = good.clone();
    bad[0] = b'X';
    assert!(matches!(Reader::new(&bad[..]), Err(FormatError::BadMagic)));
    let with = |h: Header| {
        let w = Writer::new(Vec::new(), &h).unwrap();
        Reader::new(&w.finish().unwrap()[..])
            .err()
            .unwrap()
            .to_string()
    };
    let h = Header::new("x", 0);
    assert!(with(Header {
        version: 77,
        ..h.clone()
    })
    .contains("version 77"));
    assert!(with(Header {
        arch: 2,
        ..h.clone()
    })
    .contains("architecture 2"));
    assert!(with(Header {
        page_size: 65536,
        ..h.clone()
    })
    .contains("65536"));
    assert!(with(Header { flags: 0x100, ..h }).contains("header.flags"));
}

#[test]
fn unknown_mandatory_types_and_reserved_flags_are_errors() {
    let mut w = Writer::new(Vec::new(), &Header::new("x", 0)).unwrap();
    w.record(4242, 0, 0, b"?").unwrap();
    let bytes = w.finish().unwrap();
    let err = Reader::new(&bytes[..]).unwrap().read_all().unwrap_err();
    assert!(
        err.to_string()
            .contains("unknown mandatory record type 4242"),
        "{err}"
    );
    let mut w = Writer::new(Vec::new(), &Header::new("x", 0)).unwrap();
    assert!(w.record(1, 0, 0x80, b"").is_err());
}

#[test]
fn huge_lengths_do_not_allocate() {
    // A descriptor claiming 2^63 bytes: refused by the limit before any read.
    let mut bytes = Writer::new(Vec::new(), &Header::new("x", 0))
        .unwrap()
        .finish()
        .unwrap();
    bytes.truncate(HEADER_LEN);
    bytes.extend_from_slice(&encode_descriptor(1, 0, 0, 0, 1 << 63));
    let err = Reader::new(&bytes[..]).unwrap().read_all().unwrap_err();
    assert!(matches!(err, FormatError::TooLong { .. }), "{err}");
    // Within the limit but past the end: truncated, and only the bytes present were read.
    bytes.truncate(HEADER_LEN);
    bytes.extend_from_slice(&encode_descriptor(1, 0, 0, 0, MAX_RECORD_LEN));
    bytes.extend_from_slice(b"short");
    let err = Reader::new(&bytes[..]).unwrap().read_all().unwrap_err();
    assert!(err.to_string().contains("the stream has 5"), "{err}");
}

#[test]
fn streamed_records_are_back_patched() {
    let mut w = Writer::new(Cursor::new(Vec::new()), &Header::new("x", 0)).unwrap();
    w.record(1, 0, 0, b"before").unwrap();
    let mut rec = w.begin(RecordType::MemoryPages as u32, 0, 0).unwrap();
    for chunk in 0..10u8 {
        rec.write(&[chunk; 1000]).unwrap();
    }
    rec.finish().unwrap();
    w.record(5, 0, 0, b"after").unwrap();
    let bytes = w.finish().unwrap().into_inner();
    let (_, records) = Reader::new(&bytes[..]).unwrap().read_all().unwrap();
    assert_eq!(records.len(), 3);
    assert_eq!(records[1].body.len(), 10_000);
    assert_eq!(records[1].body[9_999], 9);
    assert_eq!(records[2].body, b"after");
}

#[test]
fn dropped_or_swapped_records_break_the_stream_digest() {
    let mut w = Writer::new(Vec::new(), &Header::new("x", 0)).unwrap();
    w.record(1, 0, 0, b"aaaaaaaa").unwrap();
    w.record(3, 0, 0, b"bbbbbbbb").unwrap();
    let bytes = w.finish().unwrap();
    // Swap the two (equal-sized) records: each is intact, the order is not.
    let rec = DESCRIPTOR_LEN + 8;
    let mut swapped = bytes[..HEADER_LEN].to_vec();
    swapped.extend_from_slice(&bytes[HEADER_LEN + rec..HEADER_LEN + 2 * rec]);
    swapped.extend_from_slice(&bytes[HEADER_LEN..HEADER_LEN + rec]);
    swapped.extend_from_slice(&bytes[HEADER_LEN + 2 * rec..]);
    let err = Reader::new(&swapped[..]).unwrap().read_all().unwrap_err();
    assert!(matches!(err, FormatError::StreamDigest), "{err}");
}
