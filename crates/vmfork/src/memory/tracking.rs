//! Which pages a VM has written since what: the dirty log is read once and handed to every
//! consumer (the next generation's layer, a reset, a diff snapshot, a pre-copy round), each
//! with its own "since".

use super::{DirtyPages, FrozenImage};
use crate::devices::virtio::block::disk::DiskInstant;
use std::sync::Arc;

/// A VM's last snapshot and the pages written since: what its next diff snapshot holds (and the
/// disks as of it: the chunks written since are those of newer layers).
#[derive(Debug)]
pub(crate) struct SnapshotMark {
    pub(crate) id: [u8; 16],
    pub(crate) memory_crc32: u32,
    pub(crate) dir: std::path::PathBuf,
    pub(crate) dirty: DirtyPages,
    /// Each disk (by virtio slot) as of that snapshot: what its next diff leaves out.
    pub(crate) disks: Vec<(usize, DiskInstant)>,
}

/// How a VM's RAM relates to a frozen image, and which pages it has written since what. The
/// dirty log is read once and handed to every consumer, each with its own "since".
pub(crate) struct MemoryTracking {
    /// The image of this VM's last generation (its last fork or snapshot; for a fork never
    /// forked, the image it was forked from); `None` while the RAM file is still written in
    /// place (a VM that was never forked).
    pub(crate) image: Option<Arc<FrozenImage>>,
    /// Pages written since `image`: the next generation's layer.
    pub(crate) since_image: DirtyPages,
    /// Pages written since the fork instant (or the last reset): what a reset copies back.
    pub(crate) since_origin: DirtyPages,
    /// The last snapshot of this VM (or the one it was restored from) and the pages written
    /// since: what a diff snapshot writes.
    pub(crate) since_snapshot: Option<SnapshotMark>,
    /// Pages written since the last pre-copy round of a freeze in progress.
    pub(crate) since_round: Option<DirtyPages>,
}

impl MemoryTracking {
    /// Hands freshly collected dirty pages to every consumer.
    pub(crate) fn add(&mut self, fresh: &DirtyPages) {
        self.since_image.union(fresh);
        self.since_origin.union(fresh);
        if let Some(mark) = &mut self.since_snapshot {
            mark.dirty.union(fresh);
        }
        if let Some(round) = &mut self.since_round {
            round.union(fresh);
        }
    }
}
