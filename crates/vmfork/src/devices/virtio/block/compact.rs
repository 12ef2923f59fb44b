//! Compaction of frozen disk layers: every fork or snapshot of a VM that wrote its disk since
//! the last one freezes a layer, so a VM that keeps writing and is forked again and again
//! grows a stack that every read of an unwritten chunk walks and that holds a file per layer.
//! Past [`MAX_LAYERS`], a background thread merges adjacent layers (the smallest pair first,
//! so each chunk is copied O(log n) times over a VM's life) into an equal stack of at most
//! [`TARGET_LAYERS`], and swaps it in if the stack has not changed meanwhile. Forks keep the
//! stacks they were given; the merge never runs in a pause.
//!
//! A diff snapshot after a compaction holds the chunks of the merged layers again (they are
//! new layers to it): larger than needed, never wrong.

use super::disk::{DiskInstant, Layer};
use std::io;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// Layers a disk's frozen stack may hold before it is compacted.
pub(super) const MAX_LAYERS: usize = 16;
/// Layers a compaction leaves.
pub(super) const TARGET_LAYERS: usize = 4;

type Cell = Weak<Mutex<DiskInstant>>;

/// Hands a disk's stack to the compactor thread (started at the first call; without it,
/// stacks simply stay deep).
pub(super) fn submit(cell: Cell) {
    static COMPACTOR: OnceLock<Option<Mutex<Sender<Cell>>>> = OnceLock::new();
    let sender = COMPACTOR.get_or_init(|| {
        let (tx, rx) = channel::<Cell>();
        std::thread::Builder::new()
            .name("vmfork-disk-compact".into())
            .spawn(move || {
                crate::confine::seccomp::confine_vmm_thread();
                for cell in rx {
                    if let Some(cell) = cell.upgrade() {
                        // A failure (no memory for a memfd) leaves the stack as it was.
                        let _ = compact(&cell);
                    }
                }
            })
            .ok()
            .map(|_| Mutex::new(tx))
    });
    if let Some(sender) = sender {
        let _ = sender.lock().unwrap_or_else(|p| p.into_inner()).send(cell);
    }
}

/// Compacts the stack in `cell` if it is deeper than [`TARGET_LAYERS`]: merges off the lock,
/// swaps under it (with any layer frozen meanwhile kept on top).
pub(super) fn compact(cell: &Mutex<DiskInstant>) -> io::Result<()> {
    let seen = cell.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if seen.layers.len() <= TARGET_LAYERS {
        return Ok(());
    }
    let merged = DiskInstant {
        base: Arc::clone(&seen.base),
        layers: Arc::from(merge_to(&seen.layers, TARGET_LAYERS)?),
    };
    swap(cell, &seen, merged);
    Ok(())
}

/// Puts `merged` in `cell` in place of `seen`, keeping the layers frozen on top of it since
/// (freezes only add layers); whether it did. A stack that no longer starts with `seen` (a
/// reset or load replaced it) is left alone.
fn swap(cell: &Mutex<DiskInstant>, seen: &DiskInstant, merged: DiskInstant) -> bool {
    let mut current = cell.lock().unwrap_or_else(|p| p.into_inner());
    let extends = std::sync::Arc::ptr_eq(&current.base, &seen.base)
        && current.layers.len() >= seen.layers.len()
        && current
            .layers
            .iter()
            .zip(seen.layers.iter())
            .all(|(a, b)| Arc::ptr_eq(a, b));
    if extends {
        let layers: Vec<Arc<Layer>> = merged
            .layers
            .iter()
            .chain(current.layers[seen.layers.len()..].iter())
            .cloned()
            .collect();
        *current = DiskInstant {
            base: merged.base,
            layers: Arc::from(layers),
        };
    }
    extends
}

/// `layers` merged pairwise, the smallest adjacent pair first, down to `target` layers.
fn merge_to(layers: &[Arc<Layer>], target: usize) -> io::Result<Vec<Arc<Layer>>> {
    let mut layers = layers.to_vec();
    while layers.len() > target.max(1) {
        let size = |l: &Arc<Layer>| l.chunks().len();
        let i = (0..layers.len() - 1)
            .min_by_key(|&i| size(&layers[i]) + size(&layers[i + 1]))
            .unwrap_or(0);
        let merged = Layer::merge(&layers[i..i + 2])?;
        layers.splice(i..i + 2, [Arc::new(merged)]);
    }
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::super::disk::{BaseImage, Disk, CHUNK};
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_deep_stack_is_compacted_to_the_same_disk() {
        let path = std::env::temp_dir().join(format!("vmfork-compact-{}", std::process::id()));
        let chunks = 64u64;
        std::fs::write(&path, vec![0x11u8; (chunks * CHUNK) as usize]).unwrap();
        let base = Arc::new(BaseImage::open(&path).unwrap());
        let mut disk = Disk::new(DiskInstant::new(base));
        let mut expected = vec![0x11u8; (chunks * CHUNK) as usize];
        // 40 generations, each writing a few chunks (some again), each frozen (a fork).
        let mut forks = Vec::new();
        for generation in 0..40u64 {
            for k in 0..3 {
                let chunk = (generation * 7 + k * 13) % chunks;
                let byte = (generation * 3 + k) as u8;
                let at = chunk * CHUNK + 100;
                disk.write(at, &[byte; 200]).unwrap();
                expected[at as usize..at as usize + 200].fill(byte);
            }
            forks.push((disk.freeze(), expected.clone()));
        }
        // The compactor runs in the background; wait for it (or do it here if it is slow).
        let deadline = Instant::now() + Duration::from_secs(5);
        while disk.below().layers.len() > MAX_LAYERS && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        disk.compact_now().unwrap();
        assert!(disk.below().layers.len() <= TARGET_LAYERS);
        let mut all = vec![0u8; expected.len()];
        disk.read(0, &mut all).unwrap();
        assert!(all == expected, "the compacted disk reads differently");
        // Every fork still sees the disk as of its instant.
        for (instant, then) in forks.iter().step_by(7) {
            let fork = Disk::new(instant.clone());
            fork.read(0, &mut all).unwrap();
            assert!(&all == then);
        }
        // A freeze during a compaction: its layer stays on top of the merged ones.
        let cell = Mutex::new(disk.below());
        let seen = cell.lock().unwrap().clone();
        let merged = DiskInstant {
            base: Arc::clone(&seen.base),
            layers: Arc::from(merge_to(&seen.layers, 1).unwrap()),
        };
        let mut later = Disk::new(seen.clone());
        later.write(5, &[0xee; 3]).unwrap();
        let extended = later.freeze();
        *cell.lock().unwrap() = extended.clone();
        assert!(swap(&cell, &seen, merged.clone()));
        let now = Disk::new(cell.lock().unwrap().clone());
        assert_eq!(now.below().layers.len(), 2);
        let mut bytes = [0u8; 3];
        now.read(5, &mut bytes).unwrap();
        assert_eq!(bytes, [0xee; 3]);
        // A stack replaced meanwhile (a reset to another instant) is left alone.
        let other = forks[3].0.clone();
        *cell.lock().unwrap() = other.clone();
        assert!(!swap(&cell, &seen, merged));
        assert!(*cell.lock().unwrap() == other);
        std::fs::remove_file(path).unwrap();
    }
}
