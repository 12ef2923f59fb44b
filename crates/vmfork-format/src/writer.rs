//! Writing a stream: header, records (whole, or streamed with a back-patched length), END.

use crate::{
    encode_descriptor, padding, record_crc, FormatError, Header, Result, StreamDigest,
    DESCRIPTOR_LEN, FLAG_IGNORE, FLAG_OPTIONAL, HEADER_LEN, MAGIC, MAX_RECORD_LEN,
};
use std::io::{Seek, SeekFrom, Write};

/// Writes one stream to `W`.
pub struct Writer<W: Write> {
    out: W,
    digest: StreamDigest,
    offset: u64,
}

impl<W: Write> Writer<W> {
    /// Writes the header.
    pub fn new(mut out: W, header: &Header) -> Result<Self> {
        let bytes = encode_header(header)?;
        out.write_all(&bytes)?;
        let mut digest = StreamDigest::default();
        digest.add(u32::from_le_bytes(
            bytes[56..60].try_into().unwrap_or_default(),
        ));
        Ok(Writer {
            out,
            digest,
            offset: HEADER_LEN as u64,
        })
    }

    /// Writes a record whose body is in memory.
    pub fn record(&mut self, kind: u32, instance: u32, flags: u32, body: &[u8]) -> Result<()> {
        check_flags(flags)?;
        let len = body.len() as u64;
        if len > MAX_RECORD_LEN {
            return Err(FormatError::Invalid(format!(
                "record body of {len} bytes is over the {MAX_RECORD_LEN}-byte limit"
            )));
        }
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(body);
        let blank = encode_descriptor(kind, instance, flags, 0, len);
        let crc = record_crc(hasher, &blank);
        self.out
            .write_all(&encode_descriptor(kind, instance, flags, crc, len))?;
        self.out.write_all(body)?;
        self.out.write_all(&[0u8; 8][..padding(len)])?;
        self.offset += (DESCRIPTOR_LEN + body.len() + padding(len)) as u64;
        self.digest.add(crc);
        self.digest.records += 1;
        Ok(())
    }

    /// Writes the END record and returns the writer's output.
    pub fn finish(mut self) -> Result<W> {
        let mut body = [0u8; 16];
        body[0..8].copy_from_slice(&self.digest.records.to_le_bytes());
        body[8..12].copy_from_slice(&self.digest.finish().to_le_bytes());
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&body);
        let blank = encode_descriptor(0, 0, 0, 0, 16);
        let crc = record_crc(hasher, &blank);
        self.out.write_all(&encode_descriptor(0, 0, 0, crc, 16))?;
        self.out.write_all(&body)?;
        self.out.flush()?;
        Ok(self.out)
    }

    /// Bytes written so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

impl<W: Write + Seek> Writer<W> {
    /// Starts a record whose size is known only at the end: the descriptor is reserved now
    /// and back-patched by [`StreamedRecord::finish`]; the body is never buffered.
    pub fn begin(&mut self, kind: u32, instance: u32, flags: u32) -> Result<StreamedRecord<'_, W>> {
        check_flags(flags)?;
        let start = self.out.stream_position()?;
        self.out.write_all(&[0u8; DESCRIPTOR_LEN])?;
        Ok(StreamedRecord {
            writer: self,
            start,
            kind,
            instance,
            flags,
            len: 0,
            hasher: crc32fast::Hasher::new(),
        })
    }
}

/// A record being streamed; see [`Writer::begin`].
pub struct StreamedRecord<'a, W: Write + Seek> {
    writer: &'a mut Writer<W>,
    start: u64,
    kind: u32,
    instance: u32,
    flags: u32,
    len: u64,
    hasher: crc32fast::Hasher,
}

impl<W: Write + Seek> StreamedRecord<'_, W> {
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        if self.len + bytes.len() as u64 > MAX_RECORD_LEN {
            return Err(FormatError::Invalid(format!(
                "streamed record grew over the {MAX_RECORD_LEN}-byte limit"
            )));
        }
        self.writer.out.write_all(bytes)?;
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Pads the body, patches the descriptor with the final length and CRC.
    pub fn finish(self) -> Result<()> {
        let out = &mut self.writer.out;
        out.write_all(&[0u8; 8][..padding(self.len)])?;
        let end = out.stream_position()?;
        let blank = encode_descriptor(self.kind, self.instance, self.flags, 0, self.len);
        let crc = record_crc(self.hasher, &blank);
        out.seek(SeekFrom::Start(self.start))?;
        out.write_all(&encode_descriptor(
            self.kind,
            self.instance,
            self.flags,
            crc,
            self.len,
        ))?;
        out.seek(SeekFrom::Start(end))?;
        self.writer.offset += DESCRIPTOR_LEN as u64 + self.len + padding(self.len) as u64;
        self.writer.digest.add(crc);
        self.writer.digest.records += 1;
        Ok(())
    }
}

fn check_flags(flags: u32) -> Result<()> {
    if flags & !(FLAG_OPTIONAL | FLAG_IGNORE) != 0 {
        return Err(FormatError::Invalid(format!(
            "record flags {flags:#x} use reserved bits"
        )));
    }
    Ok(())
}

pub(crate) fn encode_header(h: &Header) -> Result<[u8; HEADER_LEN]> {
    let producer = h.producer.as_bytes();
    if producer.len() > 32 {
        return Err(FormatError::Invalid(
            "producer name longer than 32 bytes".into(),
        ));
    }
    let mut b = [0u8; HEADER_LEN];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&h.version.to_le_bytes());
    b[12..16].copy_from_slice(&h.arch.to_le_bytes());
    b[16..20].copy_from_slice(&h.page_size.to_le_bytes());
    b[20..24].copy_from_slice(&h.flags.to_le_bytes());
    b[24..24 + producer.len()].copy_from_slice(producer);
    let crc = crc32fast::hash(&b[..56]);
    b[56..60].copy_from_slice(&crc.to_le_bytes());
    Ok(b)
}
