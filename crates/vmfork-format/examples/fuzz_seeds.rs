//! Writes valid streams into a directory, as the seed corpus of the `snapshot_stream` fuzz
//! target: `cargo run -p vmfork-format --example fuzz_seeds -- fuzz/corpus/snapshot_stream`.

use std::io::Cursor;
use vmfork_format::{Header, RecordType, Writer, FLAG_IGNORE, FLAG_OPTIONAL, HEADER_DIFF};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: fuzz_seeds DIR")?;
    std::fs::create_dir_all(&dir)?;
    let empty = Writer::new(Vec::new(), &Header::new("vmfork seed", 0))?.finish()?;
    std::fs::write(format!("{dir}/empty"), empty)?;

    let mut w = Writer::new(
        Cursor::new(Vec::new()),
        &Header::new("vmfork seed", HEADER_DIFF),
    )?;
    w.record(RecordType::VmConfig as u32, 0, 0, b"{\"vcpus\":1}")?;
    for vcpu in 0..2 {
        w.record(RecordType::Vcpu as u32, vcpu, 0, &[vcpu as u8; 40])?;
    }
    w.record(77, 0, FLAG_OPTIONAL, b"future")?;
    w.record(RecordType::Device as u32, 1, FLAG_IGNORE, b"serial")?;
    let mut pages = w.begin(RecordType::MemoryPages as u32, 0, 0)?;
    pages.write(&0u64.to_le_bytes())?;
    pages.write(&1u64.to_le_bytes())?;
    pages.write(&[0xab; 4096])?;
    pages.finish()?;
    std::fs::write(format!("{dir}/records"), w.finish()?.into_inner())?;
    Ok(())
}
