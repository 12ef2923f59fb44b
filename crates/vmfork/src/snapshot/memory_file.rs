//! A snapshot's memory file: guest RAM at its file offsets, sparse. Zero pages are never
//! written (they stay holes), so a mostly empty VM makes a small file, and a restore maps the
//! file copy-on-write so pages load on first touch and restores share the page cache.
//!
//! The checksum covers the non-zero pages in offset order, so it does not depend on how a
//! filesystem rounds holes.

use crate::error::{Error, Result};
use crate::memory::{data_ranges, FrozenImage, PAGE_SIZE};
use std::fs::File;
use std::os::fd::AsFd;
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
    scan_pages(image, pages, progress, &mut |bytes, at| {
        file.write_all_at(bytes, at)
            .map_err(|e| Error::Io(std::io::Error::new(e.kind(), format!("memory file: {e}"))))
    })
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
            file.read_exact_at(&mut buf[..n], at).map_err(|e| {
                Error::Io(std::io::Error::new(e.kind(), format!("memory file: {e}")))
            })?;
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
