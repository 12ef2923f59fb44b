//! The record stream of a snapshot: writing the state records (with memory and disks embedded
//! for pipes and sockets), and reading and checking one.

use super::take::Frozen;
use super::*;

/// Writes the state records (and whatever `extra` adds before END) as one stream.
pub(super) fn write_state<W: Write>(
    vm: &Vm,
    frozen: &Frozen,
    memory: &MemoryFileRecord,
    out: W,
    flags: u32,
    extra: impl FnOnce(&mut Writer<W>) -> Result<()>,
) -> Result<W> {
    let here = Path::new("-");
    let id = SnapshotIdRecord {
        id: frozen.id,
        created_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let records = records::save_records(
        vm.config(),
        &frozen.state,
        &id,
        memory,
        frozen.base.as_ref(),
    )
    .map_err(|e| problem(here, e))?;
    let format = |e: vmfork_format::FormatError| problem(here, e);
    let mut writer = Writer::new(out, &Header::new(&producer(), flags)).map_err(format)?;
    for (kind, instance, body) in records {
        writer
            .record(kind as u32, instance, 0, &body)
            .map_err(format)?;
    }
    extra(&mut writer)?;
    writer.finish().map_err(format)
}

/// A snapshot with its memory embedded as MEMORY_PAGES records.
pub(super) fn write_embedded(
    vm: &Vm,
    frozen: &Frozen,
    out: impl Write,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MemoryDigest> {
    let here = Path::new("-");
    // A first pass finds the non-zero stretches and the digest (the MEMORY_FILE record needs
    // it); the second reads each stretch again into its MEMORY_PAGES record.
    let mut stretches = Vec::new();
    let digest = memory_file::scan_pages(
        &frozen.image,
        &frozen.pages,
        &mut |_, _| {},
        &mut |b, at| {
            stretches.push((at, b.len() as u64 / PAGE_SIZE));
            Ok(())
        },
    )?;
    let record = MemoryFileRecord {
        name: String::new(),
        size: vm.ram().size(),
        diff_runs: Vec::new(),
        data_pages: digest.data_pages,
        crc32: digest.crc32,
    };
    let image = &frozen.image;
    write_state(
        vm,
        frozen,
        &record,
        BufWriter::new(out),
        vmfork_format::HEADER_MEMORY_EMBEDDED,
        |writer| {
            let total = frozen.pages.len() as u64;
            for &(at, n) in &stretches {
                let mut body = vec![0u8; 16 + (n * PAGE_SIZE) as usize];
                body[..8].copy_from_slice(&at.to_le_bytes());
                body[8..16].copy_from_slice(&n.to_le_bytes());
                image.read_range(at, &mut body[16..])?;
                writer
                    .record(RecordType::MemoryPages as u32, 0, 0, &body)
                    .map_err(|e| problem(here, e))?;
                // Zero pages are skipped, so count by position in the page list.
                let done = frozen.pages.partition_point(|&p| p < at + n * PAGE_SIZE) as u64;
                progress(done, total);
            }
            // The disks as of the same instant as the memory.
            disks::write_disk_records(writer, &frozen.state)?;
            progress(total, total);
            Ok(())
        },
    )?
    .flush()
    .map_err(|e| problem(here, e))?;
    Ok(digest)
}

/// Reads and checks a state stream: every record's checksum, the END digest, and the
/// components' consistency (in any record order). MEMORY_PAGES and DISK_CHUNKS records go to
/// `bulk`.
pub(super) fn read_state(
    path: &Path,
    input: impl Read,
    mut bulk: impl FnMut(&Record) -> Result<()>,
) -> Result<(Header, LoadedState, Vec<RecordSummary>)> {
    let format = |e: vmfork_format::FormatError| problem(path, e);
    let mut reader = Reader::new(input).map_err(format)?;
    let mut kept = Vec::new();
    let mut summary = Vec::new();
    while let Some(record) = reader.next_record().map_err(format)? {
        summary.push(RecordSummary {
            name: record.name(),
            instance: record.instance,
            flags: record.flags,
            offset: record.offset,
            length: record.body.len() as u64,
        });
        if matches!(
            record.known_type(),
            Some(RecordType::MemoryPages | RecordType::DiskChunks)
        ) {
            if record.flags & vmfork_format::FLAG_IGNORE == 0 {
                bulk(&record)?;
            }
        } else {
            kept.push(record);
        }
    }
    let header = reader.header.clone();
    let loaded = records::load_records(&kept).map_err(|e| problem(path, e))?;
    let embedded = header.flags & vmfork_format::HEADER_MEMORY_EMBEDDED != 0;
    if embedded != loaded.memory.name.is_empty() {
        return Err(problem(
            path,
            "header and MEMORY_FILE record disagree on whether memory is embedded",
        ));
    }
    let diff = header.flags & vmfork_format::HEADER_DIFF != 0;
    if diff != loaded.base.is_some() {
        return Err(problem(
            path,
            "header and BASE record disagree on whether this is a diff snapshot",
        ));
    }
    Ok((header, loaded, summary))
}
