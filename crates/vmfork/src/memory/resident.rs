//! RAM left mapped in a pooled shell's reserved range, for the next fork of the same family.
//!
//! Mapping a fork's image over a whole range makes KVM invalidate the whole memslot (~0.1 ms
//! per GiB here, more with shadow paging), so a fork would cost more the larger its RAM. A shell
//! that keeps a copy-on-write mapping of the family's base file instead needs only the pages
//! that differ put right: the ones its last VM dirtied and the overlay pages of both images.

use super::image::{FrozenImage, LayerRun};
use super::mapping::{AddressRange, HostMapping, Sharing};
use crate::error::Result;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Weak};

/// Which file a mapping maps. Two opens of one snapshot's memory file are one file, so a
/// restore can reuse a shell left by a restore of an earlier open; a memfd is its own file.
/// (An inode number cannot be reused while a mapping still holds the inode.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    pub fn of(file: &File) -> Option<Self> {
        let meta = file.metadata().ok()?;
        Some(Self {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// A copy-on-write mapping of a base file, placed in a pooled shell's range, and the pages of
/// it that hold private copies (which may differ from the base).
#[derive(Debug)]
pub struct ResidentRam {
    pub(super) mapping: Arc<HostMapping>,
    /// Weak: idle shells must not keep a destroyed family's RAM file alive (see
    /// [`Self::is_orphaned`]).
    base: Weak<File>,
    file: Option<FileId>,
    /// Layer runs mapped over the base (the last VM's image's and its own generations').
    runs: Vec<LayerRun>,
    stale: Vec<u64>,
}

impl ResidentRam {
    /// Maps `base` copy-on-write over all of `range`, with no private pages yet: done ahead of
    /// time by the pool's filler thread so that a fork skips the mmap.
    pub fn premap(range: &Arc<AddressRange>, base: &Arc<File>) -> Result<Self> {
        let mapping = HostMapping::map_file_in(range, base.as_fd(), Sharing::CopyOnWrite)?;
        Ok(Self {
            mapping: Arc::new(mapping),
            base: Arc::downgrade(base),
            file: FileId::of(base),
            runs: Vec::new(),
            stale: Vec::new(),
        })
    }

    /// What a VM's RAM leaves behind: `mapping` (of `base`) with private copies at `stale`.
    pub(super) fn left_by(
        mapping: Arc<HostMapping>,
        base: &Arc<File>,
        runs: Vec<LayerRun>,
        stale: Vec<u64>,
    ) -> Self {
        Self {
            mapping,
            base: Arc::downgrade(base),
            file: FileId::of(base),
            runs,
            stale,
        }
    }

    /// Whether this is a mapping of `base` (the same open file, or another open of it).
    pub fn maps(&self, base: &Arc<File>) -> bool {
        self.maps_open(base) || self.maps_file(FileId::of(base))
    }

    /// Whether this is a mapping of this very open of `base` (no system call).
    pub fn maps_open(&self, base: &Arc<File>) -> bool {
        std::ptr::eq(self.base.as_ptr(), Arc::as_ptr(base))
    }

    /// Whether this is a mapping of the file `id` names.
    pub fn maps_file(&self, id: Option<FileId>) -> bool {
        id.is_some() && self.file == id
    }

    /// Nobody but mappings like this one uses the base file any more: the family is gone and
    /// the mapping should be dropped to free its memory.
    pub fn is_orphaned(&self) -> bool {
        self.base.strong_count() == 0
    }

    /// Pages holding private copies.
    pub fn stale_pages(&self) -> usize {
        self.stale.len()
    }

    /// Turns this mapping into a view of `image` (whose base it maps): maps the image's layer
    /// runs (keeping those already mapped) and copies the image's page over every stale page.
    /// Cost O(runs + stale pages), not O(RAM). Returns the mapping, the runs mapped and the
    /// pages copied in privately.
    #[allow(clippy::type_complexity)]
    pub(super) fn make_view_of(
        self,
        image: &FrozenImage,
    ) -> Result<(Arc<HostMapping>, Vec<LayerRun>, Vec<u64>)> {
        let (runs, copied) =
            image.write_view_into(&self.mapping, &self.runs, self.stale.iter().copied())?;
        Ok((self.mapping, runs, copied))
    }

    /// Gives up the mapping without clearing the range, because the caller maps over it at once.
    pub(super) fn abandon(self) {
        self.mapping.forget_range();
    }
}
