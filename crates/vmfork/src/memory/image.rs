//! Frozen memory images: what a fork's RAM is made of, and what a reset copies back from.
//!
//! An image is a base file that nobody writes any more (a memfd frozen at a fork, later a
//! snapshot's memory file) plus an overlay of the pages that differ from it (the pages a forked
//! VM had dirtied when it was forked again). Many VMs share one image.

use super::mapping::HostMapping;
use super::{MemoryLayout, PAGE_SIZE};
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;

/// An immutable RAM image: base file plus overlay pages.
#[derive(Debug)]
pub struct FrozenImage {
    layout: MemoryLayout,
    base: Arc<File>,
    base_view: HostMapping,
    /// File offset of each overlay page -> offset of its bytes in `overlay_data`.
    overlay: BTreeMap<u64, usize>,
    overlay_data: Option<HostMapping>,
}

impl FrozenImage {
    /// An image that is exactly `base` (which must never be written again).
    pub fn from_file(layout: MemoryLayout, base: Arc<File>) -> Result<Arc<Self>> {
        let len = usize::try_from(layout.total())
            .map_err(|_| Error::Memory("image larger than the address space".into()))?;
        let base_view = HostMapping::map_file_readonly(base.as_fd(), len)?;
        Ok(Arc::new(Self {
            layout,
            base,
            base_view,
            overlay: BTreeMap::new(),
            overlay_data: None,
        }))
    }

    /// A new image: this one with the pages at `offsets` replaced by their current contents in
    /// `ram` (a mapping of the same layout). Costs O(pages), not O(RAM).
    pub fn with_pages_from(
        self: &Arc<Self>,
        ram: &HostMapping,
        offsets: impl IntoIterator<Item = u64>,
    ) -> Result<Arc<Self>> {
        let page = PAGE_SIZE as usize;
        let mut pages: BTreeMap<u64, bool> = self.overlay.keys().map(|&o| (o, false)).collect();
        for offset in offsets {
            if offset % PAGE_SIZE != 0 || offset >= self.layout.total() {
                return Err(Error::Memory(format!(
                    "page offset {offset:#x} outside the image"
                )));
            }
            pages.insert(offset, true);
        }
        let data = HostMapping::anonymous_populated(pages.len() * page)?;
        let mut overlay = BTreeMap::new();
        for (i, (&offset, &from_ram)) in pages.iter().enumerate() {
            let at = i * page;
            if from_ram {
                data.copy_from(at, ram, offset as usize, page)?;
            } else if let (Some(&old), Some(old_data)) =
                (self.overlay.get(&offset), &self.overlay_data)
            {
                data.copy_from(at, old_data, old, page)?;
            }
            overlay.insert(offset, at);
        }
        let base_view = HostMapping::map_file_readonly(self.base.as_fd(), self.base_view.len())?;
        Ok(Arc::new(Self {
            layout: self.layout.clone(),
            base: Arc::clone(&self.base),
            base_view,
            overlay,
            overlay_data: Some(data),
        }))
    }

    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    pub fn base(&self) -> &Arc<File> {
        &self.base
    }

    /// File offsets of the overlay pages, in order.
    pub fn overlay_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.overlay.keys().copied()
    }

    /// Bytes the overlay holds privately.
    pub fn overlay_bytes(&self) -> usize {
        self.overlay.len() * PAGE_SIZE as usize
    }

    /// Reads the image's bytes `[offset, offset + buf.len())` (page-aligned) into `buf`: one
    /// read of the base file (no page faults on a mapping), then the overlay pages on top.
    pub fn read_range(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        if !offset.is_multiple_of(PAGE_SIZE)
            || !len.is_multiple_of(PAGE_SIZE)
            || offset + len > self.layout.total()
        {
            return Err(Error::Memory(format!(
                "image range {offset:#x}+{len:#x} is not whole pages inside the image"
            )));
        }
        std::os::unix::fs::FileExt::read_exact_at(&*self.base, buf, offset)
            .map_err(|e| Error::Memory(format!("read the memory image: {e}")))?;
        if let Some(data) = &self.overlay_data {
            for (&page, &at) in self.overlay.range(offset..offset + len) {
                let i = (page - offset) as usize;
                data.read_at(at, &mut buf[i..i + PAGE_SIZE as usize])?;
            }
        }
        Ok(())
    }

    /// Byte ranges of the base file that may hold data, ascending: everything but the holes of
    /// a sparse file (an untouched memfd or snapshot memory file is mostly holes).
    pub fn base_data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        super::mapping::data_ranges(self.base.as_fd(), self.layout.total())
    }

    /// Makes `dst` (a copy-on-write mapping of this image's base) show this image: faults in
    /// the overlay pages writable in runs, then copies the image's page over each overlay page
    /// and each page of `stale` (pages of `dst` that may differ from the base).
    pub fn write_view_into(
        &self,
        dst: &HostMapping,
        stale: impl IntoIterator<Item = u64>,
    ) -> Result<()> {
        for (start, pages) in super::page_runs(self.overlay_pages()) {
            dst.populate_write(start as usize, (pages * PAGE_SIZE) as usize)?;
        }
        let pages: std::collections::BTreeSet<u64> =
            stale.into_iter().chain(self.overlay_pages()).collect();
        for offset in pages {
            self.copy_page_to(dst, offset)?;
        }
        Ok(())
    }

    /// Copies the image's page at file `offset` into `dst` at the same offset.
    pub fn copy_page_to(&self, dst: &HostMapping, offset: u64) -> Result<()> {
        let page = PAGE_SIZE as usize;
        match (self.overlay.get(&offset), &self.overlay_data) {
            (Some(&at), Some(data)) => dst.copy_from(offset as usize, data, at, page),
            _ => dst.copy_from(offset as usize, &self.base_view, offset as usize, page),
        }
    }
}
