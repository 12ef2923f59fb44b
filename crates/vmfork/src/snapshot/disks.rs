//! Disks in snapshot directories: each disk's writes (every chunk its frozen layers hold, the
//! newest copy of each) go to a sparse `disk-<slot>.bin` next to the memory file, at the
//! instant the memory was frozen; the image below is referenced by path, never copied, and a
//! restore refuses an image whose size or modification time changed since.

use super::problem;
use crate::devices::virtio::block::disk::{BaseImage, DiskInstant, Layer, CHUNK};
use crate::devices::virtio::block::{BlockState, OverlayFile};
use crate::devices::virtio::DeviceSpecific;
use crate::error::Result;
use crate::state::VmState;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

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

pub(crate) fn has_disks(state: &VmState) -> bool {
    !state.devices.disks().is_empty()
}

/// Writes every disk's chunks into `dir` and names the files in `state`.
pub(crate) fn write_disk_files(dir: &Path, state: &mut VmState) -> Result<()> {
    for (slot, disk) in disks_mut(state) {
        let Some(instant) = &disk.instant else {
            return Err(problem(dir, format!("disk {slot} has no saved contents")));
        };
        let name = format!("disk-{slot}.bin");
        let path = dir.join(&name);
        let file = crate::files::create_private(&path).map_err(|e| problem(dir, e))?;
        file.set_len(instant.base.size())
            .map_err(|e| problem(dir, e))?;
        let mut chunk_bytes = vec![0u8; CHUNK as usize];
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (chunk, layer, at) in instant.written_chunks() {
            layer
                .read_chunk(at, &mut chunk_bytes)
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

/// Opens every disk's image and its file in `dir`, giving `state` the disks to restore.
pub(crate) fn open_disk_files(dir: &Path, state: &mut VmState) -> Result<()> {
    for (slot, disk) in disks_mut(state) {
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
