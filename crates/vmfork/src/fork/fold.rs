//! Folding: a VM that forked (or snapshotted) and whose children and snapshot writers are all
//! gone still keeps its RAM file as frozen at its first fork, the layers of its later
//! generations, and private copies of everything it wrote: up to twice its RAM. Once nothing
//! else uses its image, the folder copies the pages that differ back into the VM's own RAM file
//! and maps the RAM shared over it again, as before the first fork: it goes back to its RAM
//! size. The copy runs while the VM does (pre-copy rounds); the mapping is swapped a chunk at a
//! time, each chunk in a pause of about a millisecond. The fold holds the VM's operation lock
//! throughout, so no fork or snapshot sees a file half folded (they wait for it).

use crate::memory::{DirtyPages, PAGE_SIZE};
use crate::vm::{pool, VmShared};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

/// How often the folder looks at the VMs it watches.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// RAM swapped back per pause.
const CHUNK_BYTES: u64 = 8 << 20;
/// Pre-copy rounds at most before the chunk pauses copy what is left.
const ROUNDS: usize = 4;

fn watched() -> &'static Mutex<Vec<Weak<VmShared>>> {
    static WATCHED: OnceLock<Mutex<Vec<Weak<VmShared>>>> = OnceLock::new();
    WATCHED.get_or_init(|| {
        // No thread: VMs simply stay unfolded.
        let _ = std::thread::Builder::new()
            .name("vmfork-fold".into())
            .spawn(|| {
                crate::confine::seccomp::confine_vmm_thread();
                fold_forever()
            });
        Mutex::new(Vec::new())
    })
}

/// Has the folder watch `vm` (a VM that just froze its RAM file for the first time).
pub(crate) fn watch(vm: Weak<VmShared>) {
    watched().lock().unwrap_or_else(|p| p.into_inner()).push(vm);
}

fn fold_forever() {
    loop {
        std::thread::sleep(CHECK_INTERVAL);
        let vms: Vec<Weak<VmShared>> = {
            let mut list = watched().lock().unwrap_or_else(|p| p.into_inner());
            list.retain(|w| w.strong_count() > 0);
            list.clone()
        };
        for vm in vms {
            let Some(shared) = vm.upgrade() else { continue };
            let folded = try_fold(&shared);
            if matches!(folded, Ok(true)) {
                let mut list = watched().lock().unwrap_or_else(|p| p.into_inner());
                list.retain(|w| !w.ptr_eq(&vm));
            }
        }
    }
}

/// Folds `vm` if nothing but itself uses its image; `Ok(true)` when it was folded.
pub(crate) fn try_fold(vm: &VmShared) -> crate::Result<bool> {
    let _op = vm.exclusive();
    if !foldable(vm) {
        return Ok(false);
    }
    pool::forget_base(vm.ram.backing());
    let size = vm.ram.size();
    // Every page that may differ from the file: the image's layer pages and all written since.
    let mut pending = {
        let mut tracking = vm.tracking.lock().unwrap_or_else(|p| p.into_inner());
        vm.collect_dirty(&mut tracking)?;
        let mut pages = tracking.since_image.clone();
        if let Some(image) = &tracking.image {
            for offset in image.overlay_pages() {
                pages.mark((offset / PAGE_SIZE) as usize);
            }
        }
        tracking.since_round = Some(DirtyPages::new(size));
        pages
    };
    let folded = fold_into_file(vm, &mut pending);
    let mut tracking = vm.tracking.lock().unwrap_or_else(|p| p.into_inner());
    tracking.since_round = None;
    if let Err(e) = folded {
        // Part of the RAM may write its file in place while the image still names that file
        // as frozen: a later fork's children would see those writes. Stop the VM instead.
        vm.control.finish(crate::ExitReason::InternalError {
            detail: format!("folding its memory back into its RAM file failed: {e}"),
            dump: None,
        });
        vm.kicks.kick_all();
        return Err(e);
    }
    // As before the first fork: no image, nothing written since one.
    let image = tracking.image.take();
    tracking.since_image.clear();
    tracking.since_origin.clear();
    drop(tracking);
    pool::reap(Box::new(image));
    Ok(true)
}

/// The VM is a root (its RAM file its own) and nothing else holds its image or its file.
fn foldable(vm: &VmShared) -> bool {
    if vm.origin.is_some() || vm.background_pause_impossible() {
        return false;
    }
    let tracking = vm.tracking.lock().unwrap_or_else(|p| p.into_inner());
    let Some(image) = &tracking.image else {
        return false;
    };
    // Held by the VM's tracking alone, and the file by the VM's RAM and that image alone.
    Arc::strong_count(image) == 1 && Arc::strong_count(vm.ram.backing()) == 2
}

fn fold_into_file(vm: &VmShared, pending: &mut DirtyPages) -> crate::Result<()> {
    let file = vm.ram.backing();
    // Pre-copy while the VM runs: its pages that differ go into its file (where its mapping
    // does not read them: it has private or layer pages there).
    for _ in 0..ROUNDS {
        vm.ram.mapping().copy_pages_to_file(pending, file)?;
        let mut tracking = vm.tracking.lock().unwrap_or_else(|p| p.into_inner());
        vm.collect_dirty(&mut tracking)?;
        let size = vm.ram.size();
        *pending = tracking
            .since_round
            .as_mut()
            .map(|r| std::mem::replace(r, DirtyPages::new(size)))
            .unwrap_or_else(|| DirtyPages::new(size));
        if pending.count() < 512 {
            break;
        }
    }
    // Swap the mapping a chunk at a time, copying what was written since into the chunk first.
    let size = vm.ram.size();
    let mut offset = 0;
    while offset < size {
        let len = CHUNK_BYTES.min(size - offset);
        // foldable() ruled out a VM run inline, and the op lock keeps it so.
        let swapped = vm
            .with_vcpus_held(|| {
                let mut tracking = vm.tracking.lock().unwrap_or_else(|p| p.into_inner());
                vm.collect_dirty(&mut tracking)?;
                if let Some(round) = tracking.since_round.as_mut() {
                    pending.union(round);
                    round.clear();
                }
                drop(tracking);
                let chunk = pending.take_range(offset, len);
                vm.ram.mapping().copy_pages_to_file(&chunk, file)?;
                vm.ram.share_back(offset, len)
            })
            .ok_or(crate::Error::State {
                actual: "running inline",
                wanted: "running on its own threads or paused",
            })?;
        pool::reap(Box::new(swapped?));
        offset += len;
    }
    Ok(())
}
