//! Reading a stream: the header, then records one by one, each checked before it is returned.
//! No allocation is sized by an untrusted length: bodies grow only as bytes actually arrive.

use crate::{
    encode_descriptor, padding, record_crc, record_name, FormatError, Header, RecordType, Result,
    StreamDigest, ARCH_X86_64, DESCRIPTOR_LEN, FLAG_OPTIONAL, HEADER_LEN, KNOWN_FLAGS,
    KNOWN_HEADER_FLAGS, MAGIC, MAX_RECORD_LEN, READABLE_VERSIONS,
};
use std::io::Read;

/// One record as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub kind: u32,
    pub instance: u32,
    pub flags: u32,
    pub body: Vec<u8>,
    /// Byte offset of its descriptor in the stream.
    pub offset: u64,
}

impl Record {
    pub fn known_type(&self) -> Option<RecordType> {
        RecordType::from_u32(self.kind)
    }
    pub fn name(&self) -> String {
        record_name(self.kind)
    }
}

fn read_exact_or(r: &mut impl Read, buf: &mut [u8], what: impl Fn() -> String) -> Result<()> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FormatError::Truncated(what()),
        _ => FormatError::Io(e),
    })
}

/// Reads and checks the header.
pub fn read_header(r: &mut impl Read) -> Result<Header> {
    read_header_with_crc(r).map(|(h, _)| h)
}

fn read_header_with_crc(r: &mut impl Read) -> Result<(Header, u32)> {
    let mut b = [0u8; HEADER_LEN];
    read_exact_or(r, &mut b, || "the file ends inside the header".into())?;
    if b[0..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let version = u32_at(8);
    if !READABLE_VERSIONS.contains(&version) {
        return Err(FormatError::UnsupportedVersion {
            found: version,
            readable: READABLE_VERSIONS,
        });
    }
    if crc32fast::hash(&b[..56]) != u32_at(56) {
        return Err(FormatError::HeaderChecksum);
    }
    if u32_at(60) != 0 {
        return Err(FormatError::Reserved {
            field: "header.reserved",
            value: u64::from(u32_at(60)),
        });
    }
    let arch = u32_at(12);
    if arch != ARCH_X86_64 {
        return Err(FormatError::WrongArch(arch));
    }
    let page_size = u32_at(16);
    if page_size != 4096 {
        return Err(FormatError::WrongPageSize(page_size));
    }
    let flags = u32_at(20);
    if flags & !KNOWN_HEADER_FLAGS != 0 {
        return Err(FormatError::Reserved {
            field: "header.flags",
            value: u64::from(flags),
        });
    }
    let producer_bytes = &b[24..56];
    let end = producer_bytes.iter().position(|&c| c == 0).unwrap_or(32);
    if producer_bytes[end..].iter().any(|&c| c != 0) {
        return Err(FormatError::Reserved {
            field: "header.producer padding",
            value: 1,
        });
    }
    let producer = String::from_utf8_lossy(&producer_bytes[..end]).into_owned();
    Ok((
        Header {
            version,
            arch,
            page_size,
            flags,
            producer,
        },
        u32_at(56),
    ))
}

/// Reads records after the header. `next` returns `None` after a valid END record.
pub struct Reader<R: Read> {
    input: R,
    pub header: Header,
    offset: u64,
    digest: StreamDigest,
    done: bool,
}

impl<R: Read> Reader<R> {
    pub fn new(mut input: R) -> Result<Self> {
        let (header, header_crc) = read_header_with_crc(&mut input)?;
        let mut digest = StreamDigest::default();
        digest.add(header_crc);
        Ok(Reader {
            input,
            header,
            offset: HEADER_LEN as u64,
            digest,
            done: false,
        })
    }

    /// The next record that is to be applied: checked, unknown optional ones skipped. Records
    /// flagged IGNORE are returned (callers decide; [`Record::flags`] says so).
    pub fn next_record(&mut self) -> Result<Option<Record>> {
        loop {
            if self.done {
                return Ok(None);
            }
            let index = self.digest.records;
            let offset = self.offset;
            let mut d = [0u8; DESCRIPTOR_LEN];
            read_exact_or(&mut self.input, &mut d, || {
                format!("no END record (the stream stops at byte {offset} after {index} records)")
            })?;
            let u32_at = |i: usize| u32::from_le_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
            let (kind, instance, flags, crc) = (u32_at(0), u32_at(4), u32_at(8), u32_at(12));
            let length = u64::from_le_bytes(d[16..24].try_into().unwrap_or_default());
            let name = record_name(kind);
            if length > MAX_RECORD_LEN {
                return Err(FormatError::TooLong {
                    index,
                    name,
                    offset,
                    length,
                    max: MAX_RECORD_LEN,
                });
            }
            let mut body = Vec::new();
            let got = (&mut self.input).take(length).read_to_end(&mut body)?;
            if got as u64 != length {
                return Err(FormatError::Truncated(format!(
                    "record {index} ({name}) at byte {offset} says {length} bytes, the stream has {got}"
                )));
            }
            let mut pad = [0u8; 8];
            let pad = &mut pad[..padding(length)];
            read_exact_or(&mut self.input, pad, || {
                format!("record {index} ({name}) padding missing")
            })?;
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(&body);
            if record_crc(hasher, &encode_descriptor(kind, instance, flags, 0, length)) != crc {
                return Err(FormatError::RecordChecksum {
                    index,
                    name,
                    offset,
                });
            }
            if pad.iter().any(|&b| b != 0) {
                return Err(FormatError::BadPadding { index, offset });
            }
            if flags & !KNOWN_FLAGS != 0 {
                return Err(FormatError::Reserved {
                    field: "record flags",
                    value: u64::from(flags),
                });
            }
            self.offset += (DESCRIPTOR_LEN + body.len() + pad.len()) as u64;
            if kind == RecordType::End as u32 {
                self.check_end(&body)?;
                self.done = true;
                let mut trailing = [0u8; 1];
                if self.input.read(&mut trailing)? != 0 {
                    return Err(FormatError::TrailingData);
                }
                return Ok(None);
            }
            self.digest.add(crc);
            self.digest.records += 1;
            if RecordType::from_u32(kind).is_none() {
                if flags & FLAG_OPTIONAL != 0 {
                    continue;
                }
                return Err(FormatError::UnknownType {
                    index,
                    offset,
                    kind,
                });
            }
            return Ok(Some(Record {
                kind,
                instance,
                flags,
                body,
                offset,
            }));
        }
    }

    fn check_end(&self, body: &[u8]) -> Result<()> {
        if body.len() != 16 {
            return Err(FormatError::Invalid(format!(
                "END record body is {} bytes, not 16",
                body.len()
            )));
        }
        let count = u64::from_le_bytes(body[0..8].try_into().unwrap_or_default());
        let digest = u32::from_le_bytes(body[8..12].try_into().unwrap_or_default());
        let reserved = u32::from_le_bytes(body[12..16].try_into().unwrap_or_default());
        if reserved != 0 {
            return Err(FormatError::Reserved {
                field: "END.reserved",
                value: u64::from(reserved),
            });
        }
        if count != self.digest.records {
            return Err(FormatError::RecordCount {
                expected: count,
                found: self.digest.records,
            });
        }
        if digest != self.digest.finish() {
            return Err(FormatError::StreamDigest);
        }
        Ok(())
    }

    /// Reads every remaining record.
    pub fn read_all(mut self) -> Result<(Header, Vec<Record>)> {
        let mut records = Vec::new();
        while let Some(r) = self.next_record()? {
            records.push(r);
        }
        Ok((self.header, records))
    }
}
