//! A snapshot's memory file: guest RAM at its file offsets, sparse. Zero pages are never
//! written (they stay holes), so a mostly empty VM makes a small file, and a restore maps the
//! file copy-on-write so pages load on first touch and restores share the page cache.
//!
//! The checksum covers the non-zero pages in offset order, so it does not depend on how a
//! filesystem rounds holes.

use crate::error::{Error, Result};
use crate::memory::{data_ranges, FrozenImage, PAGE_SIZE};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;

const PAGE: usize = PAGE_SIZE as usize;
/// Pages gathered before one write (and per embedded MEMORY_PAGES record).
pub const BATCH_PAGES: usize = 256;

/// What was written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryDigest {
    /// Non-zero pages (the ones written).
    pub data_pages: u64,
    /// CRC32 of the non-zero pages' bytes, in offset order.
    pub crc32: u32,
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(8)
        .all(|w| u64::from_ne_bytes(w.try_into().unwrap_or([1; 8])) == 0)
}

/// Pages of `image` worth writing for a full snapshot, ascending: the base file's data (not its
/// holes) and every overlay page.
pub fn full_pages(image: &FrozenImage) -> Result<Vec<u64>> {
    let mut pages: Vec<u64> = Vec::new();
    for (start, end) in image.base_data_ranges()? {
        let first = start - start % PAGE_SIZE;
        pages.extend((first..end).step_by(PAGE));
    }
    let mut overlay: Vec<u64> = image
        .overlay_pages()
        .filter(|o| pages.binary_search(o).is_err())
        .collect();
    if !overlay.is_empty() {
        pages.append(&mut overlay);
        pages.sort_unstable();
    }
    Ok(pages)
}

/// Writes `pages` (ascending file offsets) of `image` into `file`, which must already have the
/// RAM's size; zero pages are skipped. `progress(done, total)` is called now and then.
pub fn write_pages(
    image: &FrozenImage,
    file: &File,
    pages: &[u64],
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MemoryDigest> {
    let mut behind = WriteBehind::new(file);
    scan_pages(image, pages, progress, &mut |bytes, at| {
        file.write_all_at(bytes, at).map_err(memory_file_error)?;
        behind.written_up_to(at + bytes.len() as u64)
    })
}

fn memory_file_error(e: std::io::Error) -> Error {
    Error::Io(std::io::Error::new(e.kind(), format!("memory file: {e}")))
}

/// Starts the disk writing each chunk as soon as it is in the page cache and waits for the one
/// before it, instead of leaving all of it to the final fsync: the disk works while pages are
/// still being read and checksummed, and dirty page cache stays at two chunks whatever the RAM
/// size.
struct WriteBehind<'a> {
    file: &'a File,
    /// Start of the chunk being written (not yet handed to the disk).
    chunk_start: u64,
    /// The chunk before it, already handed to the disk.
    previous: Option<(u64, u64)>,
}

impl<'a> WriteBehind<'a> {
    const CHUNK: u64 = 32 << 20;

    fn new(file: &'a File) -> Self {
        Self {
            file,
            chunk_start: 0,
            previous: None,
        }
    }

    /// Everything below `end` has been written.
    fn written_up_to(&mut self, end: u64) -> Result<()> {
        if end < self.chunk_start + Self::CHUNK {
            return Ok(());
        }
        let chunk = (self.chunk_start, end - self.chunk_start);
        sync_file_range(self.file, chunk, libc::SYNC_FILE_RANGE_WRITE)?;
        if let Some(previous) = self.previous.replace(chunk) {
            let wait = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            sync_file_range(self.file, previous, wait)?;
        }
        self.chunk_start = end;
        Ok(())
    }
}

fn sync_file_range(file: &File, (offset, len): (u64, u64), flags: libc::c_uint) -> Result<()> {
    let (offset, len) = (offset as libc::off64_t, len as libc::off64_t);
    // SAFETY: only an fd we own and plain integers cross; the kernel touches no user memory.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) };
    if rc != 0 {
        return Err(memory_file_error(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Reads `pages` (ascending file offsets) of `image` in runs, and hands every stretch of
/// non-zero pages (at most [`BATCH_PAGES`] long) to `emit(bytes, file_offset)`; returns the
/// digest of those pages. What the memory file, the embedded stream and their checks share.
pub fn scan_pages(
    image: &FrozenImage,
    pages: &[u64],
    progress: &mut dyn FnMut(u64, u64),
    emit: &mut dyn FnMut(&[u8], u64) -> Result<()>,
) -> Result<MemoryDigest> {
    let mut digest = MemoryDigest::default();
    let mut hasher = crc32fast::Hasher::new();
    let mut batch = vec![0u8; BATCH_PAGES * PAGE];
    let total = pages.len() as u64;
    let mut done = 0usize;
    while done < pages.len() {
        // The next run of consecutive pages, read at once.
        let start = pages[done];
        let mut n = 1;
        while n < BATCH_PAGES
            && done + n < pages.len()
            && pages[done + n] == start + (n * PAGE) as u64
        {
            n += 1;
        }
        let bytes = &mut batch[..n * PAGE];
        image.read_range(start, bytes)?;
        // Emit the non-zero stretches; zero pages stay holes.
        let mut stretch: Option<usize> = None;
        for i in 0..=n {
            let zero = i == n || is_zero(&bytes[i * PAGE..(i + 1) * PAGE]);
            match (zero, stretch) {
                (false, None) => stretch = Some(i),
                (true, Some(from)) => {
                    emit(&bytes[from * PAGE..i * PAGE], start + (from * PAGE) as u64)?;
                    stretch = None;
                }
                _ => {}
            }
            if !zero {
                hasher.update(&bytes[i * PAGE..(i + 1) * PAGE]);
                digest.data_pages += 1;
            }
        }
        done += n;
        progress(done as u64, total);
    }
    digest.crc32 = hasher.finalize();
    Ok(digest)
}

/// Recomputes the digest of a memory file of `size` bytes from its contents.
pub fn digest_of(file: &File, size: u64) -> Result<MemoryDigest> {
    let mut digest = MemoryDigest::default();
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; BATCH_PAGES * PAGE];
    // Ranges are rounded out to whole pages; `next` keeps a page shared by two from counting twice.
    let mut next = 0u64;
    for (start, end) in data_ranges(file.as_fd(), size)? {
        let mut at = (start - start % PAGE_SIZE).max(next);
        while at < end {
            let n = ((end - at) as usize).min(buf.len()).next_multiple_of(PAGE);
            let n = n.min((size - at) as usize);
            file.read_exact_at(&mut buf[..n], at)
                .map_err(memory_file_error)?;
            for page in buf[..n].chunks(PAGE) {
                if !is_zero(page) {
                    hasher.update(page);
                    digest.data_pages += 1;
                }
            }
            at += n as u64;
        }
        next = at;
    }
    digest.crc32 = hasher.finalize();
    Ok(digest)
}
