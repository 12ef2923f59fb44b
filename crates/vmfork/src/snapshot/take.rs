//! Taking a snapshot of a running VM: one pause to save its state and freeze its memory image
//! and disks, then the writing (to a directory or a stream) while it runs on.

use super::directory::Target;
use super::stream::write_embedded;
use super::*;

/// Marks a VM as writing a snapshot until dropped; refuses a second one at the same time
/// (both would hand the same diff base over).
struct ProgressSlot<'a> {
    slot: &'a std::sync::Mutex<Option<SnapshotProgress>>,
}

impl<'a> ProgressSlot<'a> {
    fn claim(vm: &'a Vm, path: &Path) -> Result<Self> {
        let slot = &vm.shared().snapshot_progress;
        let mut current = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(busy) = current.as_ref() {
            return Err(Error::Busy(format!(
                "snapshot {}: VM {} is already writing a snapshot to {} (one at a time)",
                path.display(),
                vm.id(),
                busy.path.display()
            )));
        }
        *current = Some(SnapshotProgress {
            path: path.to_path_buf(),
            pages_done: 0,
            pages_total: 0,
        });
        Ok(Self { slot })
    }

    fn update(&self, pages_done: u64, pages_total: u64) {
        let mut current = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(progress) = current.as_mut() {
            progress.pages_done = pages_done;
            progress.pages_total = pages_total;
        }
    }
}

impl Drop for ProgressSlot<'_> {
    fn drop(&mut self) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// What was frozen at the snapshot instant.
pub(super) struct Frozen {
    pub(super) state: crate::state::VmState,
    pub(super) image: Arc<FrozenImage>,
    /// Pages to write: all of the image, or those dirtied since the base.
    pub(super) pages: Vec<u64>,
    pub(super) base: Option<BaseRecord>,
    pub(super) previous: Option<SnapshotMark>,
    pub(super) id: [u8; 16],
}

impl Frozen {
    fn report(
        &self,
        path: &Path,
        pause: std::time::Duration,
        started: Instant,
        digest: MemoryDigest,
    ) -> SnapshotReport {
        SnapshotReport {
            id: hex_id(&self.id),
            path: path.to_path_buf(),
            diff: self.base.is_some(),
            pause_us: pause.as_micros() as u64,
            total_us: started.elapsed().as_micros() as u64,
            pages: self.pages.len() as u64,
            data_pages: digest.data_pages,
        }
    }
}

impl Vm {
    /// Snapshots this VM into directory `dir` (which must not exist, or be empty). A running VM
    /// is paused only while its state is saved and its memory image frozen.
    pub fn snapshot(&self, dir: &Path, opts: &SnapshotOptions) -> Result<SnapshotReport> {
        self.snapshot_with_progress(dir, opts, &mut |_, _| {})
    }

    /// [`Self::snapshot`], calling `progress(pages_done, pages_total)` as memory is written.
    pub fn snapshot_with_progress(
        &self,
        dir: &Path,
        opts: &SnapshotOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<SnapshotReport> {
        let started = Instant::now();
        let target = Target::prepare(dir)?;
        let slot = ProgressSlot::claim(self, &target.path)?;
        let mut frozen = self.freeze_for_snapshot(&target.path, opts)?;
        let pause = self.last_pause().unwrap_or_default();
        let written = target.write(self, &mut frozen, &mut |done, total| {
            slot.update(done, total);
            progress(done, total);
        });
        self.settle_snapshot_mark(&frozen, written.as_ref().ok().map(|d| d.crc32));
        Ok(frozen.report(&target.path, pause, started, written?))
    }

    /// Writes a snapshot with its memory embedded to `out` (a pipe, a socket, a file).
    pub fn snapshot_to_stream(&self, out: impl Write) -> Result<SnapshotReport> {
        let started = Instant::now();
        let slot = ProgressSlot::claim(self, Path::new("-"))?;
        let frozen = self.freeze_for_snapshot(Path::new("-"), &SnapshotOptions::default())?;
        let pause = self.last_pause().unwrap_or_default();
        let written = write_embedded(self, &frozen, out, &mut |done, total| {
            slot.update(done, total)
        });
        // A stream has no directory a later diff could name as its base.
        self.settle_snapshot_mark(&frozen, None);
        Ok(frozen.report(Path::new("-"), pause, started, written?))
    }

    /// How far the snapshot this VM is writing has got; `None` when it is writing none.
    pub fn snapshot_progress(&self) -> Option<SnapshotProgress> {
        self.shared()
            .snapshot_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Pre-copies, pauses (if running), saves the state, freezes the memory image, starts
    /// tracking pages for the next diff, and resumes: one operation on the VM.
    fn freeze_for_snapshot(&self, dir: &Path, opts: &SnapshotOptions) -> Result<Frozen> {
        let (mut frozen, diff) =
            self.at_one_instant(false, |image| self.freeze_paused(dir, opts, image))?;
        // Listing the pages to write takes milliseconds for a large image: done after the VM
        // runs again, from the frozen image.
        let pages = match diff {
            Some(dirty) => Ok(dirty.offsets().collect()),
            None => memory_file::full_pages(&frozen.image),
        };
        match pages {
            Ok(pages) => frozen.pages = pages,
            Err(e) => {
                self.settle_snapshot_mark(&frozen, None);
                return Err(e);
            }
        }
        Ok(frozen)
    }

    fn freeze_paused(
        &self,
        dir: &Path,
        opts: &SnapshotOptions,
        image: Arc<FrozenImage>,
    ) -> Result<(Frozen, Option<DirtyPages>)> {
        let state = self.save_state()?;
        let id = new_id()?;
        // Everything that can fail comes before the diff base is handed over below.
        let mut tracking = self.tracking();
        let previous = tracking.since_snapshot.take();
        let (diff, base) = match (&previous, opts.diff) {
            (_, false) => (None, None),
            (Some(prev), true) => (
                Some(prev.dirty.clone()),
                Some(BaseRecord {
                    id: prev.id,
                    memory_crc32: prev.memory_crc32,
                    path: prev.dir.display().to_string(),
                }),
            ),
            _ => {
                tracking.since_snapshot = previous;
                return Err(problem(
                    dir,
                    "a diff snapshot needs an earlier snapshot of this VM (or a VM restored from \
                     one); take a full snapshot first",
                ));
            }
        };
        tracking.since_snapshot = Some(SnapshotMark {
            id,
            memory_crc32: 0,
            dir: dir.to_path_buf(),
            dirty: DirtyPages::new(self.ram().size()),
            disks: disks::instants(&state),
        });
        drop(tracking);
        let frozen = Frozen {
            state,
            image,
            pages: Vec::new(),
            base,
            previous,
            id,
        };
        Ok((frozen, diff))
    }

    /// After writing: on success the new snapshot becomes the base of the next diff (with its
    /// memory checksum); on failure the previous one stays, with every page dirtied since it.
    fn settle_snapshot_mark(&self, frozen: &Frozen, written_crc: Option<u32>) {
        let mut tracking = self.tracking();
        let current = tracking.since_snapshot.take();
        tracking.since_snapshot = match (current, written_crc) {
            (Some(mut mark), Some(crc)) if mark.id == frozen.id => {
                mark.memory_crc32 = crc;
                Some(mark)
            }
            (Some(mark), _) if mark.id == frozen.id => frozen.previous.as_ref().map(|prev| {
                let mut dirty = prev.dirty.clone();
                dirty.union(&mark.dirty);
                SnapshotMark {
                    id: prev.id,
                    memory_crc32: prev.memory_crc32,
                    dir: prev.dir.clone(),
                    dirty,
                    disks: prev.disks.clone(),
                }
            }),
            (other, _) => other,
        };
    }
}
