//! Disks in snapshots: each disk's writes (every chunk its frozen layers hold, the newest copy
//! of each), at the instant the memory was frozen, go to a sparse `disk-<slot>.bin` next to the
//! memory file — or, in a stream (a pipe, a migration), into DISK_CHUNKS records. The image
//! below is referenced by path, never copied, and a restore refuses an image whose size or
//! modification time changed since.

use super::problem;
use crate::devices::virtio::block::disk::{BaseImage, DiskInstant, Layer, CHUNK};
use crate::devices::virtio::block::{BlockState, OverlayFile};
use crate::devices::virtio::DeviceSpecific;
use crate::error::Result;
use crate::state::VmState;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use vmfork_format::{Record, RecordType, Writer};

/// Most chunks one DISK_CHUNKS record carries (1 MiB).
const CHUNKS_PER_RECORD: u64 = 256;

/// The block devices of `state`, by slot.
fn disks_mut(state: &mut VmState) -> impl Iterator<Item = (usize, &mut BlockState)> {
    state
        .devices
        .virtio
        .iter_mut()
        .enumerate()
        .filter_map(|(slot, v)| match &mut v.device {
            DeviceSpecific::Block(b) => Some((slot, b)),
            _ => None,
        })
}

/// Each disk of `state` (by slot) at its save instant.
pub(crate) fn instants(state: &VmState) -> Vec<(usize, DiskInstant)> {
    state
        .devices
        .virtio
        .iter()
        .enumerate()
        .filter_map(|(slot, v)| match &v.device {
            DeviceSpecific::Block(b) => b.instant.clone().map(|i| (slot, i)),
            _ => None,
        })
        .collect()
}

/// What `snapshot info` shows of each disk: its slot, image, the chunks this snapshot's own
/// file or records hold, and the chunks written over the image in all (the chain included).
pub(crate) fn summary(state: &VmState) -> serde_json::Value {
    let disks: Vec<serde_json::Value> = state
        .devices
        .virtio
        .iter()
        .enumerate()
        .filter_map(|(slot, v)| match &v.device {
            DeviceSpecific::Block(b) => Some(serde_json::json!({
                "slot": slot,
                "image": b.config.path,
                "read_only": b.config.read_only,
                "sectors": b.capacity,
                "file": b.overlay.as_ref().map(|o| o.file.clone()),
                "chunks_here": match (&b.overlay, &b.instant) {
                    (Some(o), _) => o.runs.iter().map(|r| r.1).sum::<u64>(),
                    (None, Some(i)) => i.layers.last().map_or(0, |l| l.chunks().len() as u64),
                    (None, None) => 0,
                },
                "chunks_written": b.instant.as_ref().map_or(0, |i| i.written_chunks().len()),
            })),
            _ => None,
        })
        .collect();
    serde_json::Value::Array(disks)
}

/// The chunks a snapshot of `instant` holds, ascending: every chunk written since boot; for a
/// diff over `since` (the disk at the base snapshot's instant), those whose newest copy is in a
/// layer frozen after it, and those a layer of `since` held that `instant` no longer has (a
/// reset dropped it: the diff holds them as they are now).
fn chunks_to_write(instant: &DiskInstant, since: Option<&DiskInstant>) -> Vec<u64> {
    let Some(since) = since else {
        return instant
            .written_chunks()
            .iter()
            .map(|&(c, _, _)| c)
            .collect();
    };
    let ptrs =
        |i: &DiskInstant| -> HashSet<*const Layer> { i.layers.iter().map(Arc::as_ptr).collect() };
    let (old, now) = (ptrs(since), ptrs(instant));
    let mut chunks: BTreeSet<u64> = instant
        .written_chunks()
        .into_iter()
        .filter(|&(_, layer, _)| !old.contains(&(layer as *const Layer)))
        .map(|(c, _, _)| c)
        .collect();
    for dropped in since
        .layers
        .iter()
        .filter(|l| !now.contains(&Arc::as_ptr(l)))
    {
        chunks.extend(dropped.chunks().keys());
    }
    chunks.into_iter().collect()
}

/// Writes every disk's chunks (for a diff, those changed since the disks in `since`) into `dir`
/// and names the files in `state`.
pub(crate) fn write_disk_files(
    dir: &Path,
    state: &mut VmState,
    since: Option<&[(usize, DiskInstant)]>,
) -> Result<()> {
    for (slot, disk) in disks_mut(state) {
        let Some(instant) = &disk.instant else {
            return Err(problem(dir, format!("disk {slot} has no saved contents")));
        };
        let base = match since {
            Some(since) => Some(
                since
                    .iter()
                    .find(|(s, _)| *s == slot)
                    .map(|(_, i)| i)
                    .ok_or_else(|| problem(dir, format!("disk {slot} is not in the base")))?,
            ),
            None => None,
        };
        let name = format!("disk-{slot}.bin");
        let path = dir.join(&name);
        let file = crate::files::create_private(&path).map_err(|e| problem(dir, e))?;
        file.set_len(instant.base.size())
            .map_err(|e| problem(dir, e))?;
        let mut chunk_bytes = vec![0u8; CHUNK as usize];
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for chunk in chunks_to_write(instant, base) {
            instant
                .read_chunk(chunk, &mut chunk_bytes)
                .and_then(|()| file.write_all_at(&chunk_bytes, chunk * CHUNK))
                .map_err(|e| problem(dir, format!("writing {name}: {e}")))?;
            match runs.last_mut() {
                Some((first, count)) if *first + *count == chunk => *count += 1,
                _ => runs.push((chunk, 1)),
            }
        }
        file.sync_all().map_err(|e| problem(dir, e))?;
        disk.overlay = Some(OverlayFile { file: name, runs });
    }
    Ok(())
}

/// Puts a diff snapshot's disks over its base's: each disk's stack is the base's layers, then
/// the diff's own file.
pub(crate) fn stack_on_base(path: &Path, state: &mut VmState, base: &VmState) -> Result<()> {
    let below = instants(base);
    for (slot, disk) in disks_mut(state) {
        let Some((_, under)) = below.iter().find(|(s, _)| *s == slot) else {
            return Err(problem(
                path,
                format!("disk {slot}: its base snapshot has no disk in that slot"),
            ));
        };
        let Some(own) = &disk.instant else {
            return Err(problem(path, format!("disk {slot} has no saved contents")));
        };
        if under.base.path() != own.base.path() || under.base.size() != own.base.size() {
            return Err(problem(
                path,
                format!("disk {slot}: its base snapshot's disk is another image"),
            ));
        }
        let layers: Vec<Arc<Layer>> = under
            .layers
            .iter()
            .chain(own.layers.iter())
            .cloned()
            .collect();
        disk.instant = Some(DiskInstant {
            base: Arc::clone(&under.base),
            layers: Arc::from(layers),
        });
    }
    Ok(())
}

/// Opens the image under a saved disk, refusing one that is not the image the VM had.
fn open_image(dir: &Path, slot: usize, disk: &BlockState) -> Result<BaseImage> {
    let image = &disk.config.path;
    let base = BaseImage::open(image).map_err(|e| problem(dir, format!("disk {slot}: {e}")))?;
    if base.size() / 512 != disk.capacity {
        return Err(problem(
            dir,
            format!(
                "disk {slot}: the image {} holds {} sectors; the snapshot's disk had {}",
                image.display(),
                base.size() / 512,
                disk.capacity
            ),
        ));
    }
    if base.mtime_ns() != disk.image_mtime_ns {
        return Err(problem(
            dir,
            format!(
                "disk {slot}: the image {} was modified after the VM opened it; the \
             snapshot's disk writes would land on other contents",
                image.display()
            ),
        ));
    }
    Ok(base)
}

/// Opens every disk's image and its file in `dir`, giving `state` the disks to restore.
pub(crate) fn open_disk_files(dir: &Path, state: &mut VmState) -> Result<()> {
    for (slot, disk) in disks_mut(state) {
        let base = open_image(dir, slot, disk)?;
        let Some(overlay) = &disk.overlay else {
            return Err(problem(dir, format!("disk {slot}: no disk file named")));
        };
        let plain = Path::new(&overlay.file)
            .file_name()
            .is_some_and(|n| n == overlay.file.as_str());
        if !plain {
            return Err(problem(
                dir,
                format!(
                    "disk {slot}: file name {:?} is not a plain name",
                    overlay.file
                ),
            ));
        }
        let mut chunks = HashMap::new();
        let mut next = 0u64;
        let total = base.size().div_ceil(CHUNK);
        for &(first, count) in &overlay.runs {
            let end = first
                .checked_add(count)
                .filter(|&e| count > 0 && e <= total);
            match end {
                Some(end) if first >= next => {
                    chunks.extend((first..end).map(|c| (c, c * CHUNK)));
                    next = end;
                }
                _ => {
                    return Err(problem(
                        dir,
                        format!(
                            "disk {slot}: chunk run {first}+{count} is out of order or past the \
                             disk's {total} chunks"
                        ),
                    ))
                }
            }
        }
        let path = dir.join(&overlay.file);
        let file = crate::files::open_regular(&path)
            .map_err(|e| problem(dir, format!("disk {slot}: {}: {e}", overlay.file)))?;
        let len = file.metadata().map_err(|e| problem(dir, e))?.len();
        if len < base.size() {
            return Err(problem(
                dir,
                format!(
                    "disk {slot}: {} is {len} bytes, shorter than the disk",
                    overlay.file
                ),
            ));
        }
        let layer = Arc::new(Layer::from_file(file, chunks));
        disk.instant = Some(DiskInstant {
            base: Arc::new(base),
            layers: Arc::from(vec![layer]),
        });
    }
    Ok(())
}

/// Writes every disk's chunks into `writer` as DISK_CHUNKS records (a stream snapshot).
pub(crate) fn write_disk_records<W: Write>(writer: &mut Writer<W>, state: &VmState) -> Result<()> {
    let here = Path::new("-");
    for (slot, disk) in state.devices.virtio.iter().enumerate() {
        let DeviceSpecific::Block(disk) = &disk.device else {
            continue;
        };
        let Some(instant) = &disk.instant else {
            return Err(problem(here, format!("disk {slot} has no saved contents")));
        };
        let chunks = chunks_to_write(instant, None);
        // Runs of consecutive chunks, each record at most CHUNKS_PER_RECORD long.
        let mut start = 0;
        while start < chunks.len() {
            let first = chunks[start];
            let mut end = start + 1;
            while end < chunks.len()
                && chunks[end] == first + (end - start) as u64
                && ((end - start) as u64) < CHUNKS_PER_RECORD
            {
                end += 1;
            }
            let count = (end - start) as u64;
            let mut body = vec![0u8; 16 + (count * CHUNK) as usize];
            body[..8].copy_from_slice(&first.to_le_bytes());
            body[8..16].copy_from_slice(&count.to_le_bytes());
            for (i, &chunk) in chunks[start..end].iter().enumerate() {
                let from = 16 + i * CHUNK as usize;
                instant
                    .read_chunk(chunk, &mut body[from..from + CHUNK as usize])
                    .map_err(|e| problem(here, format!("reading disk {slot}: {e}")))?;
            }
            writer
                .record(RecordType::DiskChunks as u32, slot as u32, 0, &body)
                .map_err(|e| problem(here, e))?;
            start = end;
        }
    }
    Ok(())
}

/// The disks' chunks read from a stream's DISK_CHUNKS records, by slot: a memfd each, holding
/// the chunks in arrival order.
#[derive(Default)]
pub(crate) struct StreamDisks {
    slots: HashMap<u32, (File, HashMap<u64, u64>)>,
}

impl StreamDisks {
    /// Takes one DISK_CHUNKS record (checked against the disk once the state is known).
    pub(crate) fn add(&mut self, path: &Path, record: &Record) -> Result<()> {
        let body = &record.body;
        let bad = || {
            problem(
                path,
                format!("DISK_CHUNKS record at byte {} is malformed", record.offset),
            )
        };
        let word = |at: usize| -> Result<u64> {
            body.get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .ok_or_else(bad)
        };
        let (first, count) = (word(0)?, word(8)?);
        let len = count.checked_mul(CHUNK).ok_or_else(bad)?;
        if count == 0 || body.len() as u64 != 16 + len || first.checked_add(count).is_none() {
            return Err(bad());
        }
        let (file, chunks) = match self.slots.entry(record.instance) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let file = crate::memory::create_memfd("vmfork-stream-disk", 0)?;
                v.insert((file, HashMap::new()))
            }
        };
        let at = chunks.len() as u64 * CHUNK;
        file.write_all_at(&body[16..], at)
            .map_err(|e| problem(path, e))?;
        for i in 0..count {
            if chunks.insert(first + i, at + i * CHUNK).is_some() {
                return Err(problem(
                    path,
                    format!(
                        "DISK_CHUNKS for slot {} hold chunk {} twice",
                        record.instance,
                        first + i
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Gives every disk of `state` its image and the chunks the stream carried for it;
    /// refuses chunks for a slot without a disk or past a disk's end.
    pub(crate) fn attach(mut self, path: &Path, state: &mut VmState) -> Result<()> {
        for (slot, disk) in disks_mut(state) {
            let base = open_image(path, slot, disk)?;
            let total = base.size().div_ceil(CHUNK);
            let (file, chunks) = match self.slots.remove(&(slot as u32)) {
                Some(found) => found,
                None => (
                    crate::memory::create_memfd("vmfork-stream-disk", 0)?,
                    HashMap::new(),
                ),
            };
            if let Some(past) = chunks.keys().find(|&&c| c >= total) {
                return Err(problem(
                    path,
                    format!("disk {slot}: chunk {past} is past the disk's {total} chunks"),
                ));
            }
            disk.overlay = None;
            disk.instant = Some(DiskInstant {
                base: Arc::new(base),
                layers: Arc::from(vec![Arc::new(Layer::from_file(file, chunks))]),
            });
        }
        match self.slots.keys().next() {
            Some(slot) => Err(problem(
                path,
                format!("DISK_CHUNKS records for slot {slot}, which has no disk"),
            )),
            None => Ok(()),
        }
    }
}
