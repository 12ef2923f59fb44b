//! Generations: the instant a fork or snapshot is taken of. Each one freezes the VM's memory
//! into an image that costs only what was written since the VM's previous image: those pages go
//! into one new layer that every later image shares. The copy is made while the VM runs
//! (pre-copy rounds over KVM's dirty log, as live migration does), so the pause holds only the
//! pages written during the last round, the vCPU state save, and the layer's adoption.
//!
//! Why pre-copy rather than userfaultfd write-protection: arming uffd-wp costs 29–55 ms per
//! GiB of populated memory on this host (DESIGN.md §6), which would itself put the pause past
//! the 2 ms goal at 200,000 dirty pages, and every first write afterwards would take a
//! 35–110 µs user-space fault. Pre-copy needs no handler thread, keeps guest writes at full
//! speed, and is the mechanism migration rounds reuse.

use crate::error::{Error, Result};
use crate::memory::{DirtyPages, FrozenImage, LayerBuilder};
use crate::vm::{Vm, VmStatus};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Below this many pages left to copy, stop pre-copying and copy the rest in the pause (they
/// were copied once already, so this only overwrites them: ~0.3 µs a page here).
const PRECOPY_ENOUGH_PAGES: usize = 512;
/// RAM switched to copy-on-write per pause when a RAM file is frozen.
const FREEZE_CHUNK_BYTES: u64 = 8 << 20;
/// Pre-copy rounds at most (a guest writing faster than pages are copied does not converge).
const PRECOPY_MAX_ROUNDS: usize = 6;

/// A layer being filled by pre-copy rounds while the VM runs.
pub(crate) struct PreCopy {
    layer: LayerBuilder,
}

impl Vm {
    /// Runs `at_instant` on this VM as of one instant: pre-copies what it wrote since its last
    /// image while it runs, pauses it (if it runs), freezes its memory, calls
    /// `at_instant(image)` (which saves whatever else the instant needs), and resumes it unless
    /// `stay_paused`. The whole is one operation on the VM.
    pub(crate) fn at_one_instant<T>(
        &self,
        stay_paused: bool,
        at_instant: impl FnOnce(Arc<FrozenImage>) -> Result<T>,
    ) -> Result<T> {
        let _op = self.exclusive();
        let running = match self.status() {
            VmStatus::Running => true,
            VmStatus::Exited if self.exit_reason() == Some(crate::ExitReason::Stopped) => {
                return Err(Error::State {
                    actual: "stopped",
                    wanted: "running, paused or not yet started",
                })
            }
            _ => false,
        };
        if !self.has_frozen_image() {
            self.freeze_file()?;
        }
        let pre = if running { self.precopy()? } else { None };
        // Device workers (vsock) hold off guest memory and device state until the instant is
        // taken, running or not (they serve a paused VM's host side too).
        let quiet = self.shared().devices.quiesce();
        let paused_at = Instant::now();
        if running {
            self.pause()?;
        }
        let result = self.freeze_memory(pre).and_then(at_instant).and_then(|r| {
            // A page read past a truncated snapshot file came in as zeroes: not this instant.
            match self.shared().memory_damage() {
                Some(why) => Err(Error::Damaged(format!("VM {}: {why}", self.id()))),
                None => Ok(r),
            }
        });
        // The pause ends when the vCPUs may run again: the vCPU thread woken by the resume
        // often takes this thread's core at once, which is no longer the VM's pause.
        self.shared().record_pause(paused_at.elapsed());
        if running && !stay_paused {
            self.resume()?;
        }
        drop(quiet);
        result
    }

    /// How long the last fork or snapshot of this VM held it at its instant: paused (when it
    /// ran), its memory frozen and its state saved.
    pub fn last_pause(&self) -> Option<Duration> {
        self.shared().last_pause()
    }

    /// Whether this VM's RAM is a copy-on-write view of a frozen image: after its first fork or
    /// snapshot, until the folder gives its RAM file back (once nothing else uses the image).
    pub fn has_frozen_image(&self) -> bool {
        self.tracking().image.is_some()
    }

    /// How many layers this VM's current image stacks on its base file (0 without an image);
    /// a background merge keeps it small.
    pub fn image_layers(&self) -> usize {
        self.tracking().image.as_ref().map_or(0, |i| i.depth())
    }

    /// The longest pause a background worker took on this VM (adopting a large layer after a
    /// fork or snapshot: a chunk of pages per pause).
    pub fn max_background_pause(&self) -> Duration {
        self.shared().max_background_pause()
    }

    /// Freezes the VM's RAM file where it is written in place (before its first fork, or after
    /// a fold): maps it copy-on-write a chunk at a time, each in a short pause (remapping a
    /// populated range makes KVM zap it: ~12 ms per 200,000 pages here, too long for one
    /// pause). A chunk's file pages stay as they were at its switch; writes after it are
    /// private and dirty-logged, so the instant that follows is an ordinary generation on top
    /// of the file. The caller holds the operation lock.
    fn freeze_file(&self) -> Result<()> {
        let shared = self.shared();
        {
            // Writes so far are in the file: start the generation's dirty pages clean (a diff
            // snapshot's consumer keeps them).
            let mut tracking = self.tracking();
            shared.collect_dirty(&mut tracking)?;
            tracking.since_image.clear();
            tracking.since_origin.clear();
        }
        let size = shared.ram.size();
        let mut offset = 0;
        while offset < size {
            let len = FREEZE_CHUNK_BYTES.min(size - offset);
            // The caller holds the op lock, so the VM does not run inline meanwhile.
            let remapped = shared
                .with_vcpus_held(|| shared.ram.make_copy_on_write_range(offset, len))
                .ok_or(Error::State {
                    actual: "running inline",
                    wanted: "running on its own threads or paused",
                })?;
            crate::vm::pool::reap(Box::new(remapped?));
            offset += len;
        }
        let image = FrozenImage::from_file(
            shared.ram.layout().clone(),
            Arc::clone(shared.ram.backing()),
        )?;
        self.tracking().image = Some(image);
        // Once its children are gone, the folder gives the RAM file back to this VM.
        super::fold::watch(self.shared_weak());
        Ok(())
    }

    /// Pre-copy rounds while the VM runs: copies the pages written since its last image into a
    /// new layer, then those written during that copy, until few are left. `None` when there is
    /// nothing worth doing before the pause (first freeze, or few pages).
    fn precopy(&self) -> Result<Option<PreCopy>> {
        let shared = self.shared();
        let mut tracking = self.tracking();
        if tracking.image.is_none() {
            return Ok(None);
        }
        shared.collect_dirty(&mut tracking)?;
        // Even a few pages are worth copying before the pause: a first copy allocates the
        // layer's pages, the one in the pause then only overwrites them.
        if tracking.since_image.count() == 0 {
            return Ok(None);
        }
        let mut pending = tracking.since_image.clone();
        tracking.since_round = Some(DirtyPages::new(shared.ram.size()));
        drop(tracking);
        let mut layer = LayerBuilder::new(shared.ram.layout())?;
        let copied = (|| -> Result<()> {
            for _ in 0..PRECOPY_MAX_ROUNDS {
                layer.copy(shared.ram.mapping(), &pending)?;
                let mut tracking = self.tracking();
                shared.collect_dirty(&mut tracking)?;
                let size = shared.ram.size();
                let round = tracking.since_round.as_mut();
                pending = round.map_or_else(
                    || DirtyPages::new(size),
                    |r| std::mem::replace(r, DirtyPages::new(size)),
                );
                if pending.count() < PRECOPY_ENOUGH_PAGES {
                    break;
                }
            }
            // What the last round found written during its copy is left for the pause, with
            // whatever is written until then — also when the rounds ran out before converging
            // (a guest writing faster than pages are copied): those pages must not be lost.
            if let Some(r) = self.tracking().since_round.as_mut() {
                r.union(&pending);
            }
            Ok(())
        })();
        if let Err(e) = copied {
            self.tracking().since_round = None;
            return Err(e);
        }
        Ok(Some(PreCopy { layer }))
    }

    /// The image of this VM's RAM as it is now (the VM must be paused or not running): freezes
    /// the RAM file on the first fork; else puts the pages written since the last image into a
    /// new layer (finishing `pre`'s), which the VM then maps in place of its private copies.
    /// Nothing written since: the last image, at no cost.
    fn freeze_memory(&self, pre: Option<PreCopy>) -> Result<Arc<FrozenImage>> {
        let shared = self.shared();
        let mut tracking = self.tracking();
        let image = match tracking.image.clone() {
            Some(image) => image,
            None => {
                drop(tracking);
                self.freeze_file()?;
                tracking = self.tracking();
                tracking
                    .image
                    .clone()
                    .ok_or_else(|| Error::Memory("the RAM file was not frozen".into()))?
            }
        };
        shared.collect_dirty(&mut tracking)?;
        let last_round = tracking.since_round.take();
        if tracking.since_image.count() == 0 {
            return Ok(image);
        }
        let (mut layer, to_copy) = match (pre, last_round) {
            (Some(pre), Some(round)) => (pre.layer, round),
            _ => (
                LayerBuilder::new(shared.ram.layout())?,
                tracking.since_image.clone(),
            ),
        };
        layer.copy(shared.ram.mapping(), &to_copy)?;
        let layer = layer.seal(&tracking.since_image)?;
        let next = image.with_layer(Arc::clone(&layer))?;
        let replaced = if layer.pages() <= super::adopt::ADOPT_IN_PAUSE_PAGES {
            shared.ram.adopt_layer_runs(&layer, layer.runs())?
        } else {
            super::adopt::adopt_in_background(self.shared_weak(), Arc::clone(&layer));
            Vec::new()
        };
        tracking.since_image.clear();
        // The previous image may hold the last reference to a superseded layer: free it (and
        // the replaced pages) on the reaper thread, not in the pause.
        let previous = tracking.image.replace(Arc::clone(&next));
        crate::vm::pool::reap(Box::new((previous, replaced)));
        if next.depth() > super::adopt::MERGE_DEPTH {
            super::adopt::merge_in_background(self.shared_weak(), Arc::clone(&next));
        }
        Ok(next)
    }
}
