//! The vmfork snapshot stream: a file header, then typed records, then an END record.
//!
//! ```text
//! header (64 bytes)  magic "VMFORKSN", format version, architecture, page size, flags,
//!                    producer (vmfork version), header CRC32, reserved (zero)
//! record             descriptor {type u32, instance u32, flags u32, crc32 u32, length u64}
//!                    body (length bytes), zero padding to a multiple of 8
//! ...
//! END record         type 0; body {record count u64, stream digest u32, reserved u32}
//! ```
//!
//! Each record carries a CRC32 over its body and its descriptor (with the CRC field zero), so a
//! flipped bit anywhere is caught at the record it hits — and a reader can check records as
//! they stream by without buffering the stream. The END record's digest chains the header's and
//! every record's CRC, so dropped, duplicated or reordered records are caught too. The format
//! knows nothing of KVM: bodies belong to the component that wrote them (see `docs/snapshot-format.md`).

mod reader;
#[cfg(test)]
mod tests;
mod types;
mod writer;

pub use reader::{read_header, Reader, Record};
pub use types::{record_name, RecordType};
pub use writer::{StreamedRecord, Writer};

/// The file's first bytes.
pub const MAGIC: [u8; 8] = *b"VMFORKSN";
/// The format version this crate writes.
pub const FORMAT_VERSION: u32 = 1;
/// Versions this crate reads.
pub const READABLE_VERSIONS: &[u32] = &[1];
/// Architecture code for x86-64.
pub const ARCH_X86_64: u32 = 1;
pub const HEADER_LEN: usize = 64;
pub const DESCRIPTOR_LEN: usize = 24;
/// Largest record body a reader accepts (memory travels as many records, not one).
pub const MAX_RECORD_LEN: u64 = 256 << 20;

/// Record flag: a reader that does not know the type may skip the record.
pub const FLAG_OPTIONAL: u32 = 1;
/// Record flag: the record is present but must not be applied.
pub const FLAG_IGNORE: u32 = 2;
const KNOWN_FLAGS: u32 = FLAG_OPTIONAL | FLAG_IGNORE;

/// Header flag: guest memory is embedded in the stream (else it is in a separate memory file).
pub const HEADER_MEMORY_EMBEDDED: u32 = 1;
/// Header flag: a diff snapshot (only pages dirtied since its base).
pub const HEADER_DIFF: u32 = 2;
const KNOWN_HEADER_FLAGS: u32 = HEADER_MEMORY_EMBEDDED | HEADER_DIFF;

/// What the header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub arch: u32,
    pub page_size: u32,
    pub flags: u32,
    /// Who wrote it, e.g. "vmfork 0.1.0".
    pub producer: String,
}

impl Header {
    /// A header for this build: current version, x86-64, 4 KiB pages.
    pub fn new(producer: &str, flags: u32) -> Self {
        Header {
            version: FORMAT_VERSION,
            arch: ARCH_X86_64,
            page_size: 4096,
            flags,
            producer: producer.to_string(),
        }
    }
}

/// Everything that can be wrong with a stream. Messages name the problem and where it is.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a vmfork snapshot (bad magic)")]
    BadMagic,
    #[error(
        "snapshot format version {found} is not readable by this build (it reads {readable:?})"
    )]
    UnsupportedVersion {
        found: u32,
        readable: &'static [u32],
    },
    #[error("snapshot is for architecture {0}, this build runs x86-64 (1)")]
    WrongArch(u32),
    #[error("snapshot page size is {0} bytes; this build uses 4096")]
    WrongPageSize(u32),
    #[error("header checksum mismatch: the header is corrupt")]
    HeaderChecksum,
    #[error("reserved field {field} is {value:#x}, must be zero")]
    Reserved { field: &'static str, value: u64 },
    #[error("truncated: {0}")]
    Truncated(String),
    #[error(
        "record {index} ({name}) at byte {offset}: length {length} is over the {max}-byte limit"
    )]
    TooLong {
        index: u64,
        name: String,
        offset: u64,
        length: u64,
        max: u64,
    },
    #[error("record {index} ({name}) at byte {offset}: checksum mismatch, the record is corrupt")]
    RecordChecksum {
        index: u64,
        name: String,
        offset: u64,
    },
    #[error("record {index} at byte {offset}: unknown mandatory record type {kind}")]
    UnknownType { index: u64, offset: u64, kind: u32 },
    #[error("record {index} at byte {offset}: padding bytes are not zero")]
    BadPadding { index: u64, offset: u64 },
    #[error("END record: stream digest mismatch (records missing, repeated or reordered)")]
    StreamDigest,
    #[error("END record says {expected} records, the stream has {found}")]
    RecordCount { expected: u64, found: u64 },
    #[error("data after the END record")]
    TrailingData,
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, FormatError>;

fn padding(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

/// The CRC of one record: body first (it streams), then the descriptor with its CRC zeroed.
fn record_crc(body_hasher: crc32fast::Hasher, descriptor: &[u8; DESCRIPTOR_LEN]) -> u32 {
    let mut h = body_hasher;
    let mut d = *descriptor;
    d[12..16].fill(0);
    h.update(&d);
    h.finalize()
}

fn encode_descriptor(
    kind: u32,
    instance: u32,
    flags: u32,
    crc: u32,
    len: u64,
) -> [u8; DESCRIPTOR_LEN] {
    let mut d = [0u8; DESCRIPTOR_LEN];
    d[0..4].copy_from_slice(&kind.to_le_bytes());
    d[4..8].copy_from_slice(&instance.to_le_bytes());
    d[8..12].copy_from_slice(&flags.to_le_bytes());
    d[12..16].copy_from_slice(&crc.to_le_bytes());
    d[16..24].copy_from_slice(&len.to_le_bytes());
    d
}

/// The running digest the END record carries: CRC32 over the header CRC and every record CRC.
#[derive(Clone, Default)]
struct StreamDigest {
    hasher: crc32fast::Hasher,
    records: u64,
}

impl StreamDigest {
    fn add(&mut self, crc: u32) {
        self.hasher.update(&crc.to_le_bytes());
    }
    fn finish(&self) -> u32 {
        let mut h = self.hasher.clone();
        h.update(&self.records.to_le_bytes());
        h.finalize()
    }
}
