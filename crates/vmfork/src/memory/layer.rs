//! A generation's layer: the pages a VM wrote between two of its images, saved once in a sparse
//! memfd laid out like RAM (each page at its own RAM file offset). Because the offsets match,
//! a VM can map a run of a layer copy-on-write over the same range of its RAM: children of an
//! image share the layer's pages instead of copying them, and the parent that wrote them gives
//! up its private copies for the layer's (each page stored once).

use super::mapping::{create_memfd, HostMapping};
use super::{DirtyPages, MemoryLayout, PAGE_SIZE};
use crate::error::Result;
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;

/// A sealed layer: immutable, shared by every image that contains it.
#[derive(Debug)]
pub struct Layer {
    file: Arc<File>,
    view: HostMapping,
    /// `(file offset, bytes)` of the runs of pages it holds, ascending.
    runs: Vec<(u64, u64)>,
}

impl Layer {
    /// A layer holding the pages at `offsets` (ascending) of `src`, a mapping laid out like RAM
    /// that nothing writes meanwhile.
    pub fn copy_of(
        layout: &MemoryLayout,
        src: &HostMapping,
        offsets: impl IntoIterator<Item = u64>,
    ) -> Result<Arc<Self>> {
        let mut builder = LayerBuilder::new(layout)?;
        let mut pages = DirtyPages::new(layout.total());
        for offset in offsets {
            pages.mark((offset / PAGE_SIZE) as usize);
        }
        builder.copy(src, &pages)?;
        builder.seal(&pages)
    }

    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// The read-only view of the layer's file (only its runs hold data).
    pub fn view(&self) -> &HostMapping {
        &self.view
    }

    /// `(file offset, bytes)` of the runs it holds, ascending.
    pub fn runs(&self) -> &[(u64, u64)] {
        &self.runs
    }

    /// Pages it holds.
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|&(_, len)| len / PAGE_SIZE).sum()
    }
}

/// A layer being filled: pages may be copied more than once (a pre-copy round copies pages the
/// VM may write again; a later round copies them again) until it is sealed with its page set.
#[derive(Debug)]
pub struct LayerBuilder {
    file: Arc<File>,
    size: u64,
}

impl LayerBuilder {
    pub fn new(layout: &MemoryLayout) -> Result<Self> {
        let size = layout.total();
        Ok(Self {
            file: Arc::new(create_memfd("vmfork-layer", size)?),
            size,
        })
    }

    /// Copies `pages` of `src` (laid out like RAM) into the layer, one write per run. `src` may
    /// be written meanwhile (a pre-copy round); a page so torn is copied again by a later round.
    pub fn copy(&mut self, src: &HostMapping, pages: &DirtyPages) -> Result<u64> {
        let mut copied = 0;
        for (start, n) in pages.runs() {
            let len = n * PAGE_SIZE;
            // One call allocates the run's pages (a write per page would fault each in alone);
            // pages a previous round copied are already there, and this is then cheap.
            allocate(&self.file, start, len)?;
            src.write_to_file(start as usize, len as usize, &self.file)?;
            copied += n;
        }
        Ok(copied)
    }

    /// Copies `[offset, offset+len)` of `src` (laid out like RAM, not written meanwhile: a
    /// layer's view) into the layer.
    pub fn copy_run(&mut self, src: &HostMapping, offset: u64, len: u64) -> Result<()> {
        allocate(&self.file, offset, len)?;
        src.write_to_file(offset as usize, len as usize, &self.file)
    }

    /// The finished layer holding exactly `pages` (every one of them copied at least once, the
    /// last copy made while nothing wrote it).
    pub fn seal(self, pages: &DirtyPages) -> Result<Arc<Layer>> {
        let view = HostMapping::map_file_readonly(self.file.as_fd(), self.size as usize)?;
        let runs = pages
            .runs()
            .into_iter()
            .map(|(start, n)| (start, n * PAGE_SIZE))
            .collect();
        Ok(Arc::new(Layer {
            file: self.file,
            view,
            runs,
        }))
    }
}

/// Allocates `[offset, offset + len)` of a memfd (no change to its size or contents).
fn allocate(file: &File, offset: u64, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate only allocates pages of a file this process owns; no memory is touched.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc != 0 {
        return Err(crate::Error::Memory(format!(
            "cannot allocate {} KiB for a layer: {}",
            len >> 10,
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}
