//! Adopting a large layer in the background: the VM that wrote a generation's pages gives up
//! its private copies for the layer's (so each page is stored once), a chunk at a time, each
//! chunk under the VM's operation lock with the VM paused for about a millisecond. Doing all of
//! a 200,000-page layer inside the fork's pause would cost ~12 ms here (KVM zaps the range).
//!
//! A page is adopted only while the layer still holds its newest saved content and the VM has
//! not written it since; anything else stays private (and goes into the next generation).

use crate::memory::{page_runs, Layer, MAX_MAPPED_RUNS, PAGE_SIZE};
use crate::vm::{pool, VmShared};
use std::sync::{Arc, Weak};

/// Layers of at most this many pages are adopted inside the pause itself.
pub(crate) const ADOPT_IN_PAUSE_PAGES: u64 = 2048;
/// Pages adopted per background pause (a millisecond or two here).
const CHUNK_PAGES: u64 = 8192;

/// An image using more layers than this is merged into one on a background thread.
pub(crate) const MERGE_DEPTH: usize = 8;

/// Merges `image` (the VM's current image, too deep) on a background thread, makes the merged
/// image the VM's if it still has `image`, and adopts the merged layer into its RAM (so the old
/// layers are freed once no child needs them).
pub(crate) fn merge_in_background(vm: Weak<VmShared>, image: Arc<crate::memory::FrozenImage>) {
    let spawned = std::thread::Builder::new()
        .name("vmfork-merge".into())
        .spawn(move || {
            crate::confine::seccomp::confine_vmm_thread();
            let Ok(merged) = image.merged() else { return };
            let Some(shared) = vm.upgrade() else { return };
            let swapped = {
                let _op = shared.exclusive();
                let mut tracking = shared.tracking.lock().unwrap_or_else(|p| p.into_inner());
                match &tracking.image {
                    Some(current) if Arc::ptr_eq(current, &image) => {
                        tracking.image = Some(Arc::clone(&merged));
                        true
                    }
                    _ => false,
                }
            };
            drop(image);
            if let (true, Some(run)) = (swapped, merged.runs().first()) {
                let layer = Arc::clone(&run.layer);
                drop(merged);
                adopt_chunks(&vm, &layer);
            }
        });
    // No thread: the image stays deep (more mappings, same contents).
    drop(spawned);
}

/// Starts adopting `layer` into the VM's RAM on a background thread.
pub(crate) fn adopt_in_background(vm: Weak<VmShared>, layer: Arc<Layer>) {
    let spawned = std::thread::Builder::new()
        .name("vmfork-adopt".into())
        .spawn(move || {
            crate::confine::seccomp::confine_vmm_thread();
            adopt_chunks(&vm, &layer)
        });
    // No thread: the VM keeps its private copies (more memory, same contents).
    drop(spawned);
}

fn adopt_chunks(vm: &Weak<VmShared>, layer: &Arc<Layer>) {
    for chunk in chunks(layer.runs()) {
        let Some(shared) = vm.upgrade() else { return };
        let _op = shared.exclusive();
        match shared.with_vcpus_held(|| adopt_chunk(&shared, layer, &chunk)) {
            Some(Ok(true)) => {}
            // A newer generation replaced the layer, or the VM cannot take more mappings.
            // Or the VM runs inline, where it cannot be paused from here.
            Some(Ok(false) | Err(_)) | None => return,
        }
    }
}

/// Adopts the pages of `chunk` that still hold `layer`'s content; `false` when none can be.
fn adopt_chunk(shared: &VmShared, layer: &Arc<Layer>, chunk: &[(u64, u64)]) -> crate::Result<bool> {
    let mut tracking = shared.tracking.lock().unwrap_or_else(|p| p.into_inner());
    shared.collect_dirty(&mut tracking)?;
    let Some(image) = tracking.image.clone() else {
        return Ok(false);
    };
    let same = chunk
        .iter()
        .flat_map(|&(offset, len)| (offset..offset + len).step_by(PAGE_SIZE as usize));
    let clean = same.filter(|&p| {
        !tracking.since_image.is_set((p / PAGE_SIZE) as usize)
            && image
                .run_at(p)
                .is_some_and(|r| Arc::ptr_eq(&r.layer, layer))
    });
    let runs: Vec<(u64, u64)> = page_runs(clean)
        .into_iter()
        .map(|(start, n)| (start, n * PAGE_SIZE))
        .collect();
    if runs.is_empty() {
        return Ok(true);
    }
    if runs.len() + shared.ram.mapped_runs() > MAX_MAPPED_RUNS {
        return Ok(false);
    }
    let replaced = shared.ram.adopt_layer_runs(layer, &runs)?;
    pool::reap(Box::new(replaced));
    Ok(true)
}

/// `runs` cut into pieces of at most [`CHUNK_PAGES`] pages, grouped per chunk.
fn chunks(runs: &[(u64, u64)]) -> Vec<Vec<(u64, u64)>> {
    let limit = CHUNK_PAGES * PAGE_SIZE;
    let mut out: Vec<Vec<(u64, u64)>> = vec![Vec::new()];
    let mut room = limit;
    for &(mut offset, mut len) in runs {
        while len > 0 {
            if room == 0 {
                out.push(Vec::new());
                room = limit;
            }
            let take = len.min(room);
            if let Some(last) = out.last_mut() {
                last.push((offset, take));
            }
            offset += take;
            len -= take;
            room -= take;
        }
    }
    out
}
